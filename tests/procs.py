"""Subprocesses for tests: each child in its own process group, the whole group SIGKILLed on timeout.

A test that times out in ``subprocess.run`` kills only its direct child (and ``Popen.communicate``
kills nothing): the child's own children (``launch.sweep``'s runs, ``fedkd.main``'s processes, a
grandchild that ignores SIGTERM) keep running after pytest has exited. Here every child starts in a new
session (``start_new_session=True``: it leads its own process group, which its descendants inherit),
and on timeout, failure or interruption the whole group gets SIGKILL, then the child is reaped.

``timeout(seconds)`` sizes a test's budget to the machine (its load, ``FEDKD_TEST_TIMEOUT_SCALE``).
``run(cmd, timeout=...)`` is ``subprocess.run(cmd, capture_output=True, text=True, timeout=...)`` with
that; a timeout is a ``pytest.fail`` naming the command, the timeout used, the load and the output's
tail. For several children at once::

  with procs.group() as popen:
    ps = [popen(cmd_a), popen(cmd_b)]
    outs = procs.communicate_all(ps, timeout=300)  # [(stdout, stderr), ...]; returncodes set

leaving the with-block (normally, by a failed assertion or a timeout) SIGKILLs the process group of
every child that is still running and reaps it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

MAX_LOAD_SCALE = 4.0  # a loaded machine stretches a budget at most this much
SCALE_ENV = "FEDKD_TEST_TIMEOUT_SCALE"
TAIL = 2000  # characters of each stream a timeout message shows
_REAP_S = 10.0  # how long to wait for a killed child's pipes to close


def load() -> tuple[float, int]:
  """(load average over the last minute, CPU count); (0.0, count) where the load is unknown."""
  cpus = os.cpu_count() or 1
  try:
    return os.getloadavg()[0], cpus
  except (AttributeError, OSError):
    return 0.0, cpus


def load_scale() -> float:
  """max(1, load average over the last minute / CPU count), at most MAX_LOAD_SCALE."""
  avg, cpus = load()
  return min(MAX_LOAD_SCALE, max(1.0, avg / cpus))


def timeout(seconds: float) -> float:
  """A test's budget of ``seconds`` (for an idle machine) sized to this one.

  Multiplied by the machine's load (``load_scale()``: the load average over the last minute per CPU,
  at least 1 and at most 4, read when this is called) and by the environment variable
  ``FEDKD_TEST_TIMEOUT_SCALE`` (a float, default 1: e.g. 3 on a slow machine or under a debugger).
  """
  raw = os.environ.get(SCALE_ENV, "").strip()
  try:
    scale = float(raw) if raw else 1.0
  except ValueError:
    raise ValueError(f"{SCALE_ENV} must be a number, got {raw!r}") from None
  if not scale > 0:
    raise ValueError(f"{SCALE_ENV} must be positive, got {raw!r}")
  return seconds * load_scale() * scale


_size = timeout  # run() and communicate_all() take a parameter named timeout


def _describe_load() -> str:
  avg, cpus = load()
  return f"load average {avg:.2f} over the last minute on {cpus} CPU(s)"


def _tail(text) -> str:
  if text is None:
    return ""
  if isinstance(text, bytes):
    text = text.decode(errors="replace")
  return text[-TAIL:]


def _cmd_str(cmd) -> str:
  return cmd if isinstance(cmd, str) else " ".join(str(c) for c in cmd)


def _killpg(p: subprocess.Popen) -> None:
  """SIGKILL the process group p leads, if p is not reaped yet (its pid, the group's id, is still
  reserved then: the signal cannot reach a stranger)."""
  if p.returncode is not None:
    return
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(p.pid, signal.SIGKILL)


def _reap(p: subprocess.Popen) -> tuple[str, str]:
  """Wait for a killed p and return what its pipes still had; gives up on pipes that a descendant
  which left the group keeps open."""
  try:
    return p.communicate(timeout=_REAP_S)
  except (subprocess.TimeoutExpired, ValueError, OSError):  # ValueError, OSError: pipes read by another thread
    for f in (p.stdin, p.stdout, p.stderr):
      if f is not None:
        with contextlib.suppress(OSError):
          f.close()
    p.wait()
    return "", ""


def _timeout_message(cmds, budget: float, used: float, outputs) -> str:
  lines = [f"timed out after {used:.0f} s (a budget of {budget:g} s sized to this machine; {_describe_load()})"]
  lines.append("the process group of each command was killed (SIGKILL)")
  for cmd, (out, err) in zip(cmds, outputs):
    lines.append(f"$ {_cmd_str(cmd)}")
    lines.append(f"--- stdout (last {TAIL} chars):\n{_tail(out)}")
    lines.append(f"--- stderr (last {TAIL} chars):\n{_tail(err)}")
  return "\n".join(lines)


def run(cmd, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
  """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout(timeout))``, the child in its
  own process group. On timeout (or an interruption) the whole group gets SIGKILL and is reaped; a
  timeout then fails the test with the command, the timeout used, the load and the output's tail.

  kwargs go to ``subprocess.Popen`` (cwd, env, ...; stdout/stderr/text override the defaults), except
  ``input``, which is written to the child's stdin.
  """
  used = _size(timeout)
  stdin_data = kwargs.pop("input", None)
  if stdin_data is not None:
    kwargs.setdefault("stdin", subprocess.PIPE)
  kwargs.setdefault("stdout", subprocess.PIPE)
  kwargs.setdefault("stderr", subprocess.PIPE)
  kwargs.setdefault("text", True)
  p = subprocess.Popen(cmd, start_new_session=True, **kwargs)
  try:
    out, err = p.communicate(stdin_data, timeout=used)
  except subprocess.TimeoutExpired:
    _killpg(p)
    out, err = _reap(p)
    pytest.fail(_timeout_message([cmd], timeout, used, [(out, err)]), pytrace=False)
  finally:  # KeyboardInterrupt, or any error while waiting: leave nothing running
    if p.returncode is None:
      _killpg(p)
      _reap(p)
  return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@contextlib.contextmanager
def group() -> Iterator:
  """Yields ``popen(cmd, **kwargs)``: ``subprocess.Popen`` with its own process group (stdout and
  stderr piped, text mode unless kwargs say otherwise). Leaving the block SIGKILLs the process group of
  every child still running and reaps it, whether the block ended normally, by a failure or by a
  timeout."""
  started: list[subprocess.Popen] = []

  def popen(cmd, **kwargs) -> subprocess.Popen:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    p = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    started.append(p)
    return p

  try:
    yield popen
  finally:
    for p in started:
      _killpg(p)
    for p in started:
      if p.returncode is None:
        _reap(p)


def communicate_all(ps: Sequence[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
  """Waits for every child of ``ps`` under one deadline (``timeout(timeout)`` from now), reading all of
  their pipes at once (a child blocked on a full pipe cannot stall the others). Returns each child's
  (stdout, stderr), its returncode set. On timeout SIGKILLs every child's process group, reaps them
  and fails the test with the commands, the timeout used, the load and each output's tail."""
  used = _size(timeout)
  results: list = [None] * len(ps)

  def wait(i: int) -> None:
    try:
      results[i] = ps[i].communicate()
    except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread
      results[i] = e

  threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(len(ps))]
  for t in threads:
    t.start()
  deadline = time.monotonic() + used
  try:
    for t in threads:
      t.join(max(0.0, deadline - time.monotonic()))
    timed_out = any(t.is_alive() for t in threads)
  finally:
    if any(t.is_alive() for t in threads):  # timed out, or interrupted: kill everything, then reap
      for p in ps:
        _killpg(p)
      for t in threads:
        t.join(_REAP_S)
  if timed_out:
    outputs = [r if isinstance(r, tuple) else ("", "") for r in results]
    pytest.fail(_timeout_message([p.args for p in ps], timeout, used, outputs), pytrace=False)
  for r in results:
    if isinstance(r, BaseException):
      raise r
  return results
