"""Workdir paths (local and gs:// through etils.epath), the lock, atomic metrics records."""

import json
import os
import re

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from fedkd import workdir as wd
from fedkd.logs import BadJsonLine, RunLog, json_lines, read_jsonl


@pytest.fixture
def fake_gcs(tmp_path):
  """gs://bucket/... served from tmp_path/bucket/... (etils' own backend mock)."""
  root = tmp_path / "bucket"
  root.mkdir()

  def local(p):
    p = os.fspath(p)
    assert not p.startswith("gs:/") or p.startswith("gs://bucket"), p  # never a mangled 'gs:/x' path
    return str(root) + p[len("gs://bucket") :] if p.startswith("gs://bucket") else p

  def one(fn, path, *a, **k):
    return fn(local(path), *a, **k)

  def two(fn, path, dst, *a, **k):
    return fn(local(path), local(dst), *a, **k)

  def walk(fn, top, **k):
    yield from fn(local(top), **k)

  with epath_testing.mock_epath(
    open=one,
    exists=one,
    isdir=one,
    listdir=one,
    glob=one,
    makedirs=one,
    mkdir=one,
    rmtree=one,
    remove=one,
    stat=one,
    rename=two,
    replace=two,
    copy=two,
    walk=walk,
  ):
    yield root


def test_gs_workdir_paths_lock_and_metrics(fake_gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = wd.prepare("gs://bucket/runs/a")
  assert isinstance(path, epath.Path) and os.fspath(path) == "gs://bucket/runs/a"
  assert (fake_gcs / "runs" / "a").is_dir() and not (tmp_path / "gs:").exists()
  with wd.Lock(path):
    held = json.loads((fake_gcs / "runs" / "a" / ".lock").read_text())
    assert held["pid"] == os.getpid()
    with pytest.raises(wd.WorkdirError, match="in use by pid"):  # a holder on another host
      (fake_gcs / "runs" / "a" / ".lock").write_text(json.dumps(dict(held, host="other-host")))
      wd.Lock(path).acquire()
  # a lock record of a dead process on this host is taken over
  (fake_gcs / "runs" / "a" / ".lock").write_text(json.dumps(dict(held, pid=2**22 + 12345)))
  notes = []
  lock = wd.Lock(path, log=notes.append)
  lock.acquire()
  assert notes and "took over" in notes[0]
  lock.release()
  assert not (fake_gcs / "runs" / "a" / ".lock").exists()
  log = RunLog(path)
  log.record({"round": 0, "dice/catheter": 0.25})
  log.record({"round": 5, "dice/catheter": 0.5})
  log.close()
  text = (fake_gcs / "runs" / "a" / "metrics.jsonl").read_text()
  assert [json.loads(ln) for ln in text.splitlines()] == [
    {"round": 0, "dice/catheter": 0.25},
    {"round": 5, "dice/catheter": 0.5},
  ]
  assert not [p for p in os.listdir(fake_gcs / "runs" / "a") if ".tmp" in p]


def test_prepare_refuses_files_and_expands_home(tmp_path, monkeypatch):
  (tmp_path / "f").write_text("x")
  with pytest.raises(wd.WorkdirError, match="is a file"):
    wd.prepare(str(tmp_path / "f"))
  with pytest.raises(wd.WorkdirError, match="a parent of it is a file"):
    wd.prepare(str(tmp_path / "f" / "run"))
  with pytest.raises(wd.WorkdirError, match=r"^--out=.* is a file"):  # an output folder is named by its flag
    wd.prepare(str(tmp_path / "f"), flag="--out")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  assert os.fspath(wd.prepare("~/runs/x")) == str(tmp_path / "home" / "runs" / "x")
  assert not (tmp_path / "~").exists()


def test_prepare_refuses_entries_of_the_wrong_kind_and_blank_paths(tmp_path):
  """A file where fedkd keeps a folder (checkpoints: orbax's save threads then waited forever) or a folder
  where it writes a file: refused before anything is written, the entry left as it was."""
  for name, make in (
    ("checkpoints", "file"),
    ("tb", "file"),
    ("eval", "file"),
    ("config.json", "dir"),
    ("metrics.jsonl", "dir"),
    ("rounds.jsonl", "dir"),
  ):
    run = tmp_path / f"run_{name}"
    run.mkdir()
    (run / name).mkdir() if make == "dir" else (run / name).write_text("mine")
    with pytest.raises(wd.WorkdirError, match=f"{name} is a {'folder' if make == 'dir' else 'file'}"):
      wd.prepare(str(run))
    assert sorted(p.name for p in run.iterdir()) == [name]
    assert (run / name).is_dir() if make == "dir" else (run / name).read_text() == "mine"
  for blank in ("", " ", "\t"):
    with pytest.raises(wd.WorkdirError, match="is empty"):
      wd.prepare(blank)


def test_check_task_refuses_another_tasks_workdir_and_foreign_config_json(tmp_path):
  """A FedAvg run into a FedEFM experiment's workdir replaced its config.json: refused, file untouched."""
  cases = {
    "fedefm_run": ('{"task": "fedefm", "seed": 0}', r"holds a 'fedefm' run .*not a 'fedavg' one"),
    "foreign": ('{"a": 1}', "not a config fedkd wrote"),
    "list": ("[1, 2]", "not a config fedkd wrote"),
    "cut": ('{"task": "fed', "is unreadable"),
  }
  for name, (text, message) in cases.items():
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(text)
    with pytest.raises(wd.WorkdirError, match=message):
      wd.check_task(epath.Path(run), "fedavg")
    assert (run / "config.json").read_text() == text
  ok = tmp_path / "ok"
  ok.mkdir()
  wd.check_task(epath.Path(ok), "fedavg")  # no config.json yet
  (ok / "config.json").write_text('{"seed": 0, "num_rounds": 3}')  # no task key: a fedavg run
  wd.check_task(epath.Path(ok), "fedavg")
  with pytest.raises(wd.WorkdirError, match="holds a 'fedavg' run"):
    wd.check_task(epath.Path(ok), "fedefm")


def test_an_error_exit_does_not_wait_forever_for_a_stuck_thread(tmp_path):
  """After an error, Python's exit joins every non-daemon thread; one that never finishes (as orbax's
  after a failed asynchronous save) must not keep the process alive: the error line, then exit 2."""
  script = tmp_path / "stuck.py"
  script.write_text(
    "import functools\n"
    "import threading\n"
    "from fedkd import cli\n"
    "from fedkd.errors import UserError\n"
    "def main(argv):\n"
    "  threading.Thread(target=threading.Event().wait).start()  # non-daemon, waits forever\n"
    "  raise UserError('the problem; the fix')\n"
    "cli._exit_past_stuck_threads = functools.partial(cli._exit_past_stuck_threads, grace_s=1.0)  # not 10 s\n"
    "cli.run_app(main, ['stuck'], uses_config=False)\n"
  )
  import subprocess
  import sys

  proc = subprocess.run(
    [sys.executable, str(script)],
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 2, proc.stderr
  assert "fedkd: error: the problem; the fix" in proc.stderr and "did not finish" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_cut_last_metrics_line_dropped_with_note(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"round": 0, "loss": 1.0}\n{"round": 5, "loss": 0.5}\n{"round": 10, "lo')
  notes = []
  assert read_jsonl(p, notes.append) == [{"round": 0, "loss": 1.0}, {"round": 5, "loss": 0.5}]
  assert len(notes) == 1 and "cut last line" in notes[0]
  p.write_text('{"round": 0}\ngarbage\n{"round": 5}\n')  # damage inside the file is not silently skipped
  with pytest.raises(Exception, match="metrics.jsonl:2"):
    read_jsonl(p)


def test_one_reader_for_every_json_lines_file(tmp_path):
  """metrics.jsonl / rounds.jsonl, FedEFM's results_raw.jsonl and its contrast had three readers that numbered
  lines differently (blank lines skipped in one) and disagreed on what a cut write is; one rule now: only a last
  line without its newline may be a cut write, and a line's number counts blank lines."""
  text = '{"a": 1}\n\n[2]\n{"b": 3}\n{"c": 4'
  lines, cut = json_lines(text)
  assert [(n, v) for n, _, v in lines] == [(1, {"a": 1}), (3, [2]), (4, {"b": 3})] and cut == 5
  assert json_lines('{"a": 1}\n{"b": 2}') == ([(1, '{"a": 1}', {"a": 1}), (2, '{"b": 2}', {"b": 2})], None)
  assert json_lines("") == ([], None) and json_lines("\n\n") == ([], None)
  with pytest.raises(BadJsonLine) as e:  # a broken last line with its newline was written whole
    json_lines('{"a": 1}\n{"b": \n')
  assert e.value.number == 2
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"round": 0}\n\n{"round": 5}\n[1, 2]\n')  # a complete last line that is no record
  with pytest.raises(Exception, match=r"metrics.jsonl:4 is a JSON list, not a record"):
    read_jsonl(p)
  p.write_text('{"round": 0}\n\ngarbage\n{"round": 5}\n')
  with pytest.raises(Exception, match=r"metrics.jsonl:3 is not a JSON record"):  # was line 2: blanks skipped
    read_jsonl(p)


@pytest.mark.parametrize(
  "name,line,shown",
  [
    ("metrics.jsonl", '{"round": "2", "dice/catheter": 0.5}', "'round' is \"2\", not a whole number"),
    ("metrics.jsonl", '{"round": 2.5}', "'round' is 2.5, not a whole number"),
    ("rounds.jsonl", '{"round": 2, "comm/bytes_up": null}', "'comm/bytes_up' is null, not a number"),
    ("rounds.jsonl", '{"round": 2, "comm/bytes_down": "1e6"}', "'comm/bytes_down' is \"1e6\", not a number"),
    ("rounds.jsonl", '{"round": true}', "'round' is true, not a whole number"),
  ],
)
def test_a_record_field_a_resume_reads_must_have_its_type(tmp_path, name, line, shown):
  """A metrics.jsonl / rounds.jsonl record edited by hand: a resume compared its round with ints (TypeError) or
  summed its bytes as floats (TypeError on null), with a traceback. The file and line are named, as for a line
  that is not JSON; every other field is the user's business."""
  from fedkd.errors import UserError

  (tmp_path / name).write_text('{"round": 1, "comm/bytes_up": 5.0, "note": null}\n' + line + '\n{"round": 3}\n')
  with pytest.raises(UserError, match=re.escape(f"{name}:2: {shown}; repair or delete that line")):
    RunLog(tmp_path, enabled=True)


def test_runlog_fresh_start_drops_old_records(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"round": 0, "x": 1}\n{"round": 1, "x": 2}\n')
  log = RunLog(tmp_path, enabled=True)
  log.truncate_after(-1)
  log.record({"round": 0, "x": 3})
  log.close()
  assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 0, "x": 3}\n'


@pytest.mark.parametrize(
  "files, task, refused",
  [
    (["results_raw.jsonl"], "fedavg", "fedefm"),
    (["foundations/"], "fedavg", "fedefm"),
    (["checkpoints/u100_fedefm_dfl_seed0/2/"], "fedavg", "fedefm"),  # a first foundation being pretrained
    (["metrics.jsonl"], "fedefm", "fedavg"),
    (["checkpoints/3/"], "fedefm", "fedavg"),
    (["checkpoints/3/", "metrics.jsonl"], "fedavg", None),
    (["results_raw.jsonl", "foundations/"], "fedefm", None),
  ],
)
def test_a_workdir_without_its_config_json_is_recognised_by_its_files(tmp_path, files, task, refused):
  """config.json deleted (or not copied along): a FedEFM experiment ran into a FedAvg run's checkpoints (or a
  FedAvg run into a FedEFM one's results), exit 0, and neither could be resumed or evaluated afterwards."""
  for f in files:
    p = tmp_path / f.rstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.mkdir() if f.endswith("/") else p.write_text("{}\n")
  if refused is None:
    wd.check_task(epath.Path(tmp_path), task)
    return
  with pytest.raises(wd.WorkdirError) as e:
    wd.check_task(epath.Path(tmp_path), task)
  assert f"holds the files of a {refused!r} run" in str(e.value) and "config.json is missing" in str(e.value)


def test_saved_task_refuses_a_config_json_whose_task_is_not_a_name(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"task": 5, "seed": 0}))  # was: "holds a 5 run"
  with pytest.raises(wd.WorkdirError, match="is not a config fedkd wrote"):
    wd.saved_task(epath.Path(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"seed": 0}))  # written before tasks existed: fedavg
  assert wd.saved_task(epath.Path(tmp_path)) == "fedavg"


def test_a_full_disk_under_tensorboards_writer_thread_is_the_runs_one_line(tmp_path, monkeypatch, capfd):
  """tensorboardX writes events in a thread of its own: on a full disk that thread died with a traceback on
  stderr beside the run's one-line error (reviewer: a 400 KiB tmpfs, 3 of 3 runs). The error is kept and the
  next scalar reports it as the one line, naming tb/; the thread prints nothing."""
  import errno

  from tensorboardX import event_file_writer

  def full(self, event):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr("fedkd.logs._tb_errors", [])
  log = RunLog(tmp_path, enabled=True)
  log.scalars(1, {"x": 1.0})  # opens the event file (its first event written here)
  monkeypatch.setattr(event_file_writer.EventsWriter, "write_event", full)
  log.scalars(2, {"x": 2.0})  # written by the thread, which fails
  worker = log._tb.file_writer.event_writer._worker  # tensorboardX's writer thread
  worker.join(timeout=30)
  assert not worker.is_alive()
  with pytest.raises(wd.WorkdirError) as e:
    log.scalars(3, {"x": 3.0})
  want = f"no space left in {tmp_path / 'tb'}; free some space (or use another --workdir) and re-run to resume"
  assert str(e.value) == want
  err = capfd.readouterr().err
  assert "Traceback" not in err and "OSError" not in err, err
