"""Run logging: metrics.jsonl (one JSON object per evaluation), TensorBoard event files, progress lines.

``metrics.jsonl`` is rewritten whole through a temporary file and a rename on every record (it holds
one line per evaluation, so this stays small), which works on object stores (``gs://``) and never
leaves a cut line; a cut last line left by an older writer is dropped with a note when a run resumes.
"""

from __future__ import annotations

import json
import sys
from typing import Any
from collections.abc import Callable

from fedkd.workdir import as_path, is_remote, write_atomic


def progress_bar(done: int, total: int, width: int = 20) -> str:
  filled = int(round(width * done / max(total, 1)))
  return "[" + "#" * filled + "." * (width - filled) + f"] {100 * done / max(total, 1):3.0f}%"


def read_jsonl(path, note: Callable[[str], None] | None = None) -> list[dict]:
  """The records of a JSON-lines file; a last line that does not parse (a write cut by a kill) is
  dropped with a note. A bad line elsewhere is a ValueError naming the file and line."""
  path = as_path(path)
  if not path.exists():
    return []
  lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
  out = []
  for i, ln in enumerate(lines):
    try:
      rec = json.loads(ln)
      if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    except ValueError:
      if i == len(lines) - 1:
        (note or (lambda m: print(m, file=sys.stderr)))(
          f"note: dropped a cut last line of {path} (a write interrupted by a kill)"
        )
        break
      from fedkd.errors import UserError

      raise UserError(
        f"{path}:{i + 1} is not a JSON record; repair or delete that line, or use a new --workdir"
      ) from None
    out.append(rec)
  return out


class RunLog:
  """Writes evaluation records to ``metrics.jsonl`` and scalars to TensorBoard (``tb/``)."""

  def __init__(self, workdir: Any, enabled: bool = True, note: Callable[[str], None] | None = None):
    self.enabled = enabled
    workdir = as_path(workdir)
    self.metrics_path = workdir / "metrics.jsonl"
    self.tb_dir = workdir / "tb"
    self._tb = None
    self._records: list[dict] = []
    if enabled:
      self._records = read_jsonl(self.metrics_path, note)
      if not is_remote(workdir):  # tensorboardX writes local files
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.tb_dir), flush_secs=10)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, float(v), step)

  def _write(self) -> None:
    write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self._records))

  def record(self, rec: dict) -> None:
    """One evaluation: a metrics.jsonl line and every numeric field as a TensorBoard scalar."""
    if not self.enabled:
      return
    self._records.append(rec)
    self._write()
    self.scalars(rec["round"], {f"eval/{k}": v for k, v in rec.items() if k != "round" and isinstance(v, (int, float))})

  def truncate_after(self, last_round: int) -> None:
    """Drops records written after the checkpoint being resumed from (they will be recomputed);
    ``last_round=-1``: a fresh start drops every record (round 0 is not duplicated)."""
    if not self.enabled:
      return
    keep = [r for r in self._records if r.get("round", -1) <= last_round]
    if len(keep) != len(self._records) or (not keep and self.metrics_path.exists()):
      self._records = keep
      self._write()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
