"""Workdir paths (local and gs:// through etils.epath), the lock, atomic metrics records."""

import json
import os

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from fedkd import workdir as wd
from fedkd.logs import RunLog, read_jsonl


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
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  assert os.fspath(wd.prepare("~/runs/x")) == str(tmp_path / "home" / "runs" / "x")
  assert not (tmp_path / "~").exists()


def test_cut_last_metrics_line_dropped_with_note(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"round": 0, "loss": 1.0}\n{"round": 5, "loss": 0.5}\n{"round": 10, "lo')
  notes = []
  assert read_jsonl(p, notes.append) == [{"round": 0, "loss": 1.0}, {"round": 5, "loss": 0.5}]
  assert len(notes) == 1 and "cut last line" in notes[0]
  p.write_text('{"round": 0}\ngarbage\n{"round": 5}\n')  # damage inside the file is not silently skipped
  with pytest.raises(Exception, match="metrics.jsonl:2"):
    read_jsonl(p)


def test_runlog_fresh_start_drops_old_records(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"round": 0, "x": 1}\n{"round": 1, "x": 2}\n')
  log = RunLog(tmp_path, enabled=True)
  log.truncate_after(-1)
  log.record({"round": 0, "x": 3})
  log.close()
  assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 0, "x": 3}\n'
