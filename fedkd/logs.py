"""Run logging: metrics.jsonl (one JSON object per evaluation), rounds.jsonl (one per training round),
TensorBoard event files, progress lines.

``metrics.jsonl`` is rewritten whole through a temporary file and a rename on every record (it holds
one line per evaluation, so this stays small), which works on object stores (``gs://``) and never
leaves a cut line; a cut last line left by an older writer is dropped with a note when a run resumes.
``rounds.jsonl`` is appended to locally (rewritten whole on object stores); a cut last line is dropped
the same way. On resume, TensorBoard events after the resumed round (written before the run died, and
written again by the resumed run) are dropped from ``tb/``'s event files, so that no step appears twice.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import threading
from typing import Any
from collections.abc import Callable

from fedkd.report import is_finite_number
from fedkd.workdir import as_path, is_remote, write_atomic


def progress_bar(done: int, total: int, width: int = 20) -> str:
  filled = int(round(width * done / max(total, 1)))
  return "[" + "#" * filled + "." * (width - filled) + f"] {100 * done / max(total, 1):3.0f}%"


def duration(seconds: float) -> str:
  """A round's time in 7 characters: seconds to 2 decimals from 0.1 s up, milliseconds below (a GPU round)."""
  return f"{seconds:6.2f}s" if seconds >= 0.1 else f"{seconds * 1e3:5.1f}ms"


def compiling_line(r: int) -> str:
  """The line a run prints before its first round ``r``, whose call compiles the round program (tens of seconds
  on a CPU, with nothing else printed meanwhile); :func:`round_line` then marks that round's time."""
  return f"round {r}: compiling the round program; later rounds reuse it"


def round_line(r: int, num_rounds: int, losses: str, seconds: float, pace: str) -> str:
  """The line a run prints at the end of round ``r`` (fedkd.tasks.fedavg and the replicas alike): the round, a
  progress bar, the loss(es), the round's time (:func:`duration`) and the pace; :func:`parse_round_line` reads
  it back."""
  return f"round {r:>4}/{num_rounds} {progress_bar(r, num_rounds)}  loss {losses}  {duration(seconds)}  {pace}"


_ROUND_LINE = re.compile(r"^round +(\d+)/(\d+) \[[#.]*\] +\d+%  loss .*?  +(\d+\.\d+)(ms|s)  ")


def parse_round_line(line: str) -> tuple[int, int, float] | None:
  """``(round, num_rounds, seconds)`` of a :func:`round_line`; None for any other line (``round 0 (untrained)``,
  ``round 3: dropped client(s) ...``). The seconds are as printed: hundredths, or tenths of a millisecond."""
  m = _ROUND_LINE.match(line)
  if m is None:
    return None
  value = float(m.group(3))
  return int(m.group(1)), int(m.group(2)), value / 1e3 if m.group(4) == "ms" else value


def evaluations_left(r: int, last_round: int, every: int) -> int:
  """How many evaluations rounds ``r + 1`` .. ``last_round`` hold: every ``every``-th round and the last."""
  if r >= last_round:
    return 0
  return last_round // every - r // every + (last_round % every != 0)


def is_count(v) -> bool:
  """A JSON whole number (an int, not a bool)."""
  return isinstance(v, int) and not isinstance(v, bool)


# the fields of a run's records that it reads back on resume, and what each must be
RECORD_FIELDS = {"round": (is_count, "a whole number")}
ROUND_FIELDS = RECORD_FIELDS | {
  "comm/bytes_up": (is_finite_number, "a number"),
  "comm/bytes_down": (is_finite_number, "a number"),
}


class BadJsonLine(ValueError):
  """A line of a JSON-lines text that is not JSON and not its cut-short last line (:func:`json_lines`)."""

  def __init__(self, number: int, error: ValueError):
    super().__init__(f"line {number}: {error}")
    self.number, self.error = number, error


def json_lines(text: str) -> tuple[list[tuple[int, str, Any]], int | None]:
  """``(number, line, value)`` of each non-blank line of a JSON-lines text (lines numbered from 1, blank ones
  counted), and the number of its last line when that one has no newline after it and is not JSON, else None: a
  write cut short by a kill, or a crashed write's NUL padding, which the caller leaves out (with a note). Any
  other line that is not JSON raises :class:`BadJsonLine`: a line with its newline was written whole. The one
  reader of every JSON-lines file fedkd appends to (metrics.jsonl, rounds.jsonl, FedEFM's results_raw.jsonl)."""
  lines = text.split("\n")  # the last item is "" when the text ends with a newline
  out: list[tuple[int, str, Any]] = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      out.append((number, line, json.loads(line)))
    except ValueError as e:
      if number == len(lines):
        return out, number
      raise BadJsonLine(number, e) from None
  return out, None


def read_jsonl(path, note: Callable[[str], None] | None = None, fields: dict | None = None) -> list[dict]:
  """The records of a JSON-lines file (:func:`json_lines`; a cut last line is dropped with a note). A bad line
  elsewhere, a line that is not a JSON object, or a record whose field of ``fields`` ({key: (check, what it must
  be)}) fails its check, is a UserError naming the file and line."""
  from fedkd.errors import UserError

  path = as_path(path)
  if not path.exists():
    return []
  fix = "repair or delete that line, or use a new --workdir"
  try:
    lines, cut = json_lines(path.read_bytes().decode("utf-8", errors="replace"))
  except BadJsonLine as e:
    raise UserError(f"{path}:{e.number} is not a JSON record; {fix}") from None
  if cut is not None:
    (note or (lambda m: print(m, file=sys.stderr)))(
      f"note: dropped a cut last line of {path} (a write interrupted by a kill)"
    )
  out = []
  for number, _, rec in lines:
    if not isinstance(rec, dict):
      raise UserError(f"{path}:{number} is a JSON {type(rec).__name__}, not a record (an object); {fix}")
    for key, (ok, what) in (fields or {}).items():
      if key in rec and not ok(rec[key]):
        raise UserError(f"{path}:{number}: {key!r} is {json.dumps(rec[key])[:40]}, not {what}; {fix}")
    out.append(rec)
  return out


def _tfrecords(data: bytes):
  """(raw record bytes with their framing, payload) of each whole record of a TFRecord file (TensorBoard's
  event files); a record cut by a kill ends the list."""
  i = 0
  while i + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[i : i + 8])
    end = i + 12 + n + 4
    if end > len(data):
      return
    yield data[i:end], data[i + 12 : i + 12 + n]
    i = end


def drop_tb_steps_after(tb_dir, last_round: int) -> None:
  """Removes the scalar events of steps > ``last_round`` from the event files in ``tb_dir`` (local), so that a
  resumed run, which logs those rounds again, leaves one value per tag and step; a file left with no scalar
  is deleted. Records are copied unchanged (their checksums stay valid); a record cut by a kill is dropped."""
  if not os.path.isdir(tb_dir):
    return
  from tensorboardX.proto import event_pb2

  for name in sorted(os.listdir(tb_dir)):
    path = os.path.join(tb_dir, name)
    if name.startswith(".rewrite-") and name.endswith(".tmp") and os.path.isfile(path):  # a rewrite cut by a kill
      os.remove(path)
      continue
    if "tfevents" not in name or not os.path.isfile(path):
      continue
    with open(path, "rb") as f:
      data = f.read()
    kept, summaries, changed = [], 0, False
    for raw, payload in _tfrecords(data):
      event = event_pb2.Event()
      try:
        event.ParseFromString(payload)
      except Exception:  # noqa: BLE001 - a damaged record: TensorBoard stops reading the file there too
        break
      if event.HasField("summary") and event.step > last_round:
        changed = True
        continue
      summaries += event.HasField("summary")
      kept.append(raw)
    changed = changed or sum(map(len, kept)) != len(data)
    if not changed:
      continue
    if not summaries:
      os.remove(path)
      continue
    tmp = os.path.join(tb_dir, f".rewrite-{os.getpid()}.tmp")  # no "tfevents" in it: TensorBoard ignores it
    with open(tmp, "wb") as f:
      f.write(b"".join(kept))
    os.replace(tmp, path)


# tensorboardX writes events in a thread of its own: a full disk (or a read-only one) ends that thread with a
# traceback on stderr, beside the one line the run's own write reports. The hook keeps the error instead, and
# the next scalar (or the close) reports it as that line.
_tb_errors: list[OSError] = []
_previous_excepthook = threading.excepthook


def _tensorboard_thread_errors(args) -> None:
  from fedkd.workdir import environment_oserror

  err = environment_oserror(args.exc_value)
  if err is not None and args.thread is not None and type(args.thread).__module__.startswith("tensorboardX"):
    _tb_errors.append(err)
    return
  _previous_excepthook(args)


threading.excepthook = _tensorboard_thread_errors


class RunLog:
  """Writes evaluation records to ``metrics.jsonl``, one record per training round to ``rounds.jsonl``
  and scalars to TensorBoard (``tb/``)."""

  def __init__(self, workdir: Any, enabled: bool = True, note: Callable[[str], None] | None = None):
    self.enabled = enabled
    workdir = as_path(workdir)
    self.metrics_path = workdir / "metrics.jsonl"
    self.rounds_path = workdir / "rounds.jsonl"
    self.tb_dir = workdir / "tb"
    self._tb = None
    self._tb_errors_seen = len(_tb_errors)
    self._records: list[dict] = []
    self._rounds: list[dict] = []
    # tensorboardX writes local files; its event file is opened with the first scalar, so a run refused
    # (or with nothing left to do) on resume adds no empty event file to tb/
    self._tb_wanted = enabled and not is_remote(workdir)
    self._note = note or (lambda m: print(m, file=sys.stderr))
    if enabled:
      self._records = read_jsonl(self.metrics_path, note, RECORD_FIELDS)
      self._rounds = read_jsonl(self.rounds_path, note, ROUND_FIELDS)

  def _check_tb(self) -> None:
    if len(_tb_errors) > self._tb_errors_seen:  # since this log opened its writer (another run's in this process)
      from fedkd.workdir import WorkdirError, describe_os_error

      raise WorkdirError(describe_os_error(_tb_errors[-1], self.tb_dir))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._check_tb()
    if self._tb is None and self._tb_wanted and values:
      from tensorboardX import SummaryWriter

      # tensorboardX names the file by the second it opens it (and truncates a file of that name), and
      # TensorBoard reads a folder's files in name order: the whole time in nanoseconds, taken just before, keeps
      # a file opened in the same second from overwriting the last one and sorts the files as they were written
      # (the nanoseconds within the second sorted a file opened just before a second began after one opened
      # later in that second, whose steps TensorBoard would then see go backwards)
      import time

      self._tb_errors_seen = len(_tb_errors)
      self._tb = SummaryWriter(str(self.tb_dir), flush_secs=10, filename_suffix=f".{time.time_ns():020d}")
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

  @property
  def rounds(self) -> list[dict]:
    """The rounds.jsonl records kept (after :meth:`truncate_after`, those up to the resumed round)."""
    return list(self._rounds)

  def round_record(self, rec: dict) -> None:
    """One training round (``round``, loss, who took part, ...): a ``rounds.jsonl`` line, appended."""
    if not self.enabled:
      return
    self._rounds.append(rec)
    if is_remote(self.rounds_path):  # object stores cannot append: rewrite it whole
      write_atomic(self.rounds_path, "".join(json.dumps(r) + "\n" for r in self._rounds))
      return
    with open(str(self.rounds_path), "a") as f:  # a kill mid-line leaves a cut last line, dropped on resume
      f.write(json.dumps(rec) + "\n")

  def truncate_after(self, last_round: int) -> None:
    """Drops records written after the checkpoint being resumed from (they will be recomputed);
    ``last_round=-1``: a fresh start drops every record (round 0 is not duplicated)."""
    if not self.enabled:
      return
    keep = [r for r in self._records if r.get("round", -1) <= last_round]
    if len(keep) != len(self._records) or (not keep and self.metrics_path.exists()):
      self._records = keep
      self._write()
    if last_round > 0 and not any(r.get("round") == 0 for r in keep):  # every run records round 0 first
      self._note(
        f"note: {self.metrics_path} lacks the round-0 record (the untrained model) that every run writes first, so "
        f"it was deleted or not copied along with checkpoints/: the evaluations before the resumed round "
        f"{last_round} stay missing there"
      )
    # rewritten whenever it exists: it is appended to, so a cut last line must not stay in it
    self._rounds = [r for r in self._rounds if r.get("round", -1) <= last_round]
    have = {r.get("round") for r in self._rounds}
    missing = [r for r in range(1, last_round + 1) if r not in have]
    if missing:  # a workdir whose rounds.jsonl was deleted, or not copied along with checkpoints/
      shown = ", ".join(map(str, missing[:3])) + (f", ... {missing[-1]}" if len(missing) > 3 else "")
      self._note(
        f"note: {self.rounds_path} lacks {len(missing)} of the {last_round} rounds before the resumed one "
        f"(round {shown}); they stay missing there, and totals summed over it (comm/bytes_up_total, "
        "comm/bytes_down_total) leave them out"
      )
    if self.rounds_path.exists():
      write_atomic(self.rounds_path, "".join(json.dumps(r) + "\n" for r in self._rounds))
    if self._tb_wanted and self._tb is None:  # before this run's first scalar: its own file is not open yet
      drop_tb_steps_after(os.fspath(self.tb_dir), last_round)

  def flush(self) -> None:
    """Writes the TensorBoard scalars so far to disk: a run killed after its next checkpoint keeps them, and a
    resume, which drops only the steps after that checkpoint, never writes them again. tensorboardX queues
    events for a writer thread, and its ``flush`` leaves the queue alone; ``close`` drains it, so the writer is
    closed and the next scalar opens a new event file (TensorBoard reads a folder's files as one run)."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._check_tb()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      if sys.exc_info()[1] is None:  # (not in place of the error that stops the run)
        self._check_tb()
