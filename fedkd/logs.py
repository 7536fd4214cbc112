"""Run logging: metrics.jsonl (one JSON object per evaluation), TensorBoard event files, progress lines."""
from __future__ import annotations

import json
import os


def progress_bar(done: int, total: int, width: int = 20) -> str:
  filled = int(round(width * done / max(total, 1)))
  return "[" + "#" * filled + "." * (width - filled) + f"] {100 * done / max(total, 1):3.0f}%"


class RunLog:
  """Appends evaluation records to ``metrics.jsonl`` and writes scalars to TensorBoard (``tb/``)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tb")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(self.tb_dir, flush_secs=10)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, float(v), step)

  def record(self, rec: dict) -> None:
    """One evaluation: a metrics.jsonl line and every numeric field as a TensorBoard scalar."""
    if not self.enabled:
      return
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    self.scalars(rec["round"], {f"eval/{k}": v for k, v in rec.items()
                                if k != "round" and isinstance(v, (int, float))})

  def truncate_after(self, last_round: int) -> None:
    """Drops records written after the checkpoint being resumed from (they will be recomputed)."""
    if not self.enabled or not os.path.exists(self.metrics_path):
      return
    with open(self.metrics_path) as f:
      lines = [ln for ln in f if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln)["round"] <= last_round]
    if len(keep) != len(lines):
      tmp = self.metrics_path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.metrics_path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
