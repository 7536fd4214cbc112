"""A fork server for command-line runs that a test signals while they run (tests/test_resume_robustness.py,
tests/test_multiprocess.py): each run is a fork of one process that imported the entry points once, instead
of a fresh ``python -m`` that imports them again (about 2 s of CPU a run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds for one run (a loaded 2-core machine compiles for minutes)


# A fork server (like tests/cli_server.py, which answers only after a case ended): imports the entry
# points and the training task once, then runs each case as a fork of itself, as ``python -m <module>
# args`` would (the module's run(); stdout/stderr to files), and answers at once with the child's pid,
# so that the test can signal it. No JAX backend is started before a fork. Commands, one JSON line
# each: {"run": module, "args", "out", "err"} -> {"pid"}; {"poll": pid} / {"wait": pid} -> {"code":
# the exit status as subprocess reports it (-N: killed by signal N), or null while it runs}. Each
# finished case's CPU time goes to stderr (shown with pytest -s).
_SERVER = r"""
import importlib, json, os, signal, sys, traceback
for name in ("fedkd.main", "fedkd.eval", "fedkd.tasks.fedavg"):  # fedavg: orbax, tensorstore, flax, ...
  importlib.import_module(name)
print(json.dumps({"ready": True}), flush=True)
codes, cmd_of = {}, {}
for line in sys.stdin:
  cmd = json.loads(line)
  if "run" in cmd:
    pid = os.fork()
    if pid == 0:
      for fd, path in ((1, cmd["out"]), (2, cmd["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
      os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
      sys.stdin = open(os.devnull)
      signal.signal(signal.SIGINT, signal.default_int_handler)
      code = 0
      try:
        sys.argv = [cmd["run"], *cmd["args"]]
        importlib.import_module(cmd["run"]).run()
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:
        traceback.print_exc()
        code = 1
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
    cmd_of[pid] = " ".join([cmd["run"]] + [a for a in cmd["args"] if "round" in a or "workdir" in a])
    print(json.dumps({"pid": pid}), flush=True)
  else:
    pid = cmd.get("poll") or cmd["wait"]
    if pid not in codes:
      done, status, usage = os.wait4(pid, os.WNOHANG if "poll" in cmd else 0)
      if done:
        codes[pid] = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        sys.stderr.write(f"[fork server] {cmd_of.get(pid)}: exit {codes[pid]}, {cpu:.1f} s CPU\n")
    print(json.dumps({"code": codes.get(pid)}), flush=True)
"""


class Server:
  """The fork server: ``env`` is its environment and so every run's (a run's own variables cannot differ).
  Without PYTHONUNBUFFERED in it: the runs' stdout is a file, so the round lines the tests wait for while a run
  is alive only arrive because fedkd's entry points line-buffer their output (fedkd.cli.line_buffered)."""

  def __init__(self, env: dict):
    self.proc = subprocess.Popen(
      [sys.executable, "-c", _SERVER], cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert json.loads(self.proc.stdout.readline())["ready"]
    self.lock = threading.Lock()
    self.pids: list[int] = []

  def ask(self, cmd: dict) -> dict:
    with self.lock:
      self.proc.stdin.write(json.dumps(cmd) + "\n")
      self.proc.stdin.flush()
      return json.loads(self.proc.stdout.readline())

  def close(self):
    for pid in self.pids:  # runs left behind by a failed test
      if self.ask({"poll": pid})["code"] is None:
        os.kill(pid, signal.SIGKILL)
        self.ask({"wait": pid})
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


class Proc:
  """One run of ``python -m <module> args`` (a fork of the server): its stdout lines as they appear
  (with arrival times), its stderr, its exit code."""

  def __init__(self, server: Server, module: str, args: list[str], log_dir: str):
    os.makedirs(log_dir, exist_ok=True)
    stem = os.path.join(log_dir, f"{module}-{time.time_ns()}")
    self.out_path, self.err_path, self.server = stem + ".out", stem + ".err", server
    for path in (self.out_path, self.err_path):
      open(path, "w").close()  # readable before the child opens them
    self.pid = server.ask({"run": module, "args": [str(a) for a in args], "out": self.out_path, "err": self.err_path})[
      "pid"
    ]
    server.pids.append(self.pid)
    self.lines: list[tuple[float, str]] = []
    self._pos, self._partial, self.code = 0, "", None

  def _read(self) -> list[str]:
    """New complete stdout lines."""
    with open(self.out_path, errors="replace") as f:
      f.seek(self._pos)
      text = f.read()
      self._pos = f.tell()
    *new, self._partial = (self._partial + text).split("\n")
    now = time.monotonic()
    self.lines += [(now, ln) for ln in new]
    return new

  def _poll(self) -> bool:
    if self.code is None:
      self.code = self.server.ask({"poll": self.pid})["code"]
    return self.code is not None

  def wait_for(self, pred, timeout: float = TIMEOUT) -> str | None:
    """The next stdout line with ``pred(line)``; None when the process ended first."""
    deadline = time.monotonic() + timeout
    while True:
      ended = self._poll()
      for ln in self._read():
        if pred(ln):
          return ln
      if ended:
        return None
      if time.monotonic() > deadline:
        self.signal(signal.SIGKILL)
        raise AssertionError(f"no expected line within {timeout}s; stdout: {self.stdout[-2000:]}")
      time.sleep(0.02)

  def signal(self, sig) -> None:
    os.kill(self.pid, sig)

  def finish(self, timeout: float = TIMEOUT) -> int:
    """The exit code (-N: killed by signal N), after the process ended; all of stdout read."""
    if self.wait_for(lambda _: False, timeout) is None:
      self._read()
      if self._partial:
        self.lines.append((time.monotonic(), self._partial))
        self._partial = ""
    return self.code

  @property
  def stdout(self) -> str:
    return "\n".join(ln for _, ln in self.lines)

  @property
  def stderr(self) -> str:
    return open(self.err_path, errors="replace").read()
