"""tests/procs.py: a timed-out child's whole process group is SIGKILLed (a grandchild that ignores
SIGTERM included) and the test fails with a clear message; budgets scale with the machine's load."""

import os
import signal
import subprocess
import sys
import time

import procs
import pytest

# bash ignores SIGTERM from here on and so does its child (an ignored signal stays ignored across exec);
# the grandchild writes its pid to $1, then both wait a minute.
SCRIPT = 'trap "" TERM; sleep 60 & echo $! > "$1"; echo started; wait'


def _alive(pid: int) -> bool:
  """Whether pid runs (a zombie, which a container's init may never reap, counts as gone)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
  except FileNotFoundError:
    return False
  except OSError:  # no /proc
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    return True


def _gone(pid: int, within: float = 2.0) -> bool:
  end = time.monotonic() + within
  while _alive(pid):
    if time.monotonic() > end:
      return False
    time.sleep(0.02)
  return True


def _read_pid(path, within: float = 5.0) -> int:
  end = time.monotonic() + within
  while True:
    text = path.read_text().strip() if path.exists() else ""
    if text:
      return int(text)
    assert time.monotonic() < end, f"no pid in {path}"
    time.sleep(0.02)


@pytest.fixture
def idle(monkeypatch):
  """An idle machine, no scale from the environment: timeout(s) == s."""
  monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
  monkeypatch.delenv(procs.SCALE_ENV, raising=False)


@pytest.fixture
def pidfiles(tmp_path):
  """pidfiles(n): n paths for grandchildren's pids; any grandchild still running at teardown (the test
  failed) is killed."""
  made = []

  def make(n):
    made.extend(tmp_path / f"grandchild{len(made) + i}.pid" for i in range(n))
    return made[-n:]

  yield make
  for f in made:
    text = f.read_text().strip() if f.exists() else ""
    if text:
      try:
        os.kill(int(text), signal.SIGKILL)
      except ProcessLookupError:
        pass


def test_run_returns_like_subprocess_run(idle):
  r = procs.run(
    [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], timeout=30
  )
  assert isinstance(r, subprocess.CompletedProcess)
  assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
  r = procs.run(["cat"], input="piped", timeout=30)
  assert (r.returncode, r.stdout) == (0, "piped")


def test_run_timeout_kills_the_process_group(idle, pidfiles):
  (pidfile,) = pidfiles(1)
  t0 = time.monotonic()
  with pytest.raises(pytest.fail.Exception) as e:
    procs.run(["bash", "-c", SCRIPT, "bash", str(pidfile)], timeout=1)
  assert time.monotonic() - t0 < 4
  pid = _read_pid(pidfile, within=0)
  assert _gone(pid), f"grandchild {pid} survived the timeout"
  msg = str(e.value)
  assert "timed out after 1 s" in msg and "a budget of 1 s" in msg
  assert "load average" in msg and f"on {os.cpu_count()} CPU(s)" in msg
  assert f"$ bash -c {SCRIPT} bash {pidfile}" in msg
  assert "--- stdout (last 2000 chars):\nstarted" in msg  # the output so far


def test_group_kills_children_left_running(idle, pidfiles):
  files = pidfiles(2)
  with pytest.raises(RuntimeError):
    with procs.group() as popen:
      ps = [popen(["bash", "-c", SCRIPT, "bash", str(f)]) for f in files]
      pids = [_read_pid(f) for f in files]
      raise RuntimeError("a failed assertion, say")
  assert [p.returncode for p in ps] == [-signal.SIGKILL] * 2
  assert all(_gone(pid) for pid in pids), pids


def test_communicate_all_fails_on_timeout_and_kills_everything(idle, pidfiles):
  (pidfile,) = pidfiles(1)
  t0 = time.monotonic()
  with pytest.raises(pytest.fail.Exception) as e:
    with procs.group() as popen:
      quick = popen(["echo", "quick"])
      slow = popen(["bash", "-c", SCRIPT, "bash", str(pidfile)])
      procs.communicate_all([quick, slow], timeout=1)
  assert time.monotonic() - t0 < 4
  pid = _read_pid(pidfile, within=0)
  assert (quick.returncode, slow.returncode) == (0, -signal.SIGKILL)
  assert _gone(pid), f"grandchild {pid} survived the timeout"
  msg = str(e.value)
  assert "timed out after 1 s" in msg and "load average" in msg
  assert "$ echo quick\n--- stdout (last 2000 chars):\nquick" in msg
  assert f"$ bash -c {SCRIPT} bash {pidfile}\n--- stdout (last 2000 chars):\nstarted" in msg


def test_communicate_all_returns_every_output(idle):
  with procs.group() as popen:
    ps = [popen([sys.executable, "-c", f"import sys; print({i}); sys.exit({i})"]) for i in range(3)]
    outs = procs.communicate_all(ps, timeout=30)
  assert outs == [(f"{i}\n", "") for i in range(3)]
  assert [p.returncode for p in ps] == [0, 1, 2]


def test_timeout_scales_with_load_and_env(monkeypatch):
  monkeypatch.delenv(procs.SCALE_ENV, raising=False)
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  for avg, expected in ((0.5, 100), (2.0, 100), (3.0, 150), (6.0, 300), (8.0, 400), (50.0, 400)):
    monkeypatch.setattr(os, "getloadavg", lambda avg=avg: (avg, 0.0, 0.0))
    assert procs.timeout(100) == pytest.approx(expected), avg
  monkeypatch.setenv(procs.SCALE_ENV, "2.5")
  assert procs.timeout(100) == pytest.approx(4 * 2.5 * 100)  # the env scale is not capped
  monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 0.0, 0.0))
  assert procs.timeout(100) == pytest.approx(250)

  def unknown():
    raise OSError("no load average")

  monkeypatch.setattr(os, "getloadavg", unknown)
  assert procs.timeout(100) == pytest.approx(250)
  monkeypatch.setenv(procs.SCALE_ENV, "")
  assert procs.timeout(100) == pytest.approx(100)
  for bad in ("fast", "0", "-1"):
    monkeypatch.setenv(procs.SCALE_ENV, bad)
    with pytest.raises(ValueError, match=procs.SCALE_ENV):
      procs.timeout(100)
