"""Stopping at a round boundary: SIGTERM (spot/preemptible VMs, Slurm, Kubernetes), the JAX/orbax
preemption notice of multi-process runs, and Ctrl-C.

A training loop wraps its rounds in ``with StopSignals() as stop:`` and, after each finished round,
calls ``stop.requested(round)``. When that is true, the loop saves a checkpoint of that round and
raises :class:`Stopped`; the entry point prints ``preempted at round N (checkpoint saved); re-run the same command to resume`` and exits 0
(SIGTERM / preemption) or 130 (Ctrl-C). A second Ctrl-C stops at once (KeyboardInterrupt): the last
saved checkpoint stays, and the entry point prints how to resume. While a checkpoint is being written
(:func:`completing`) the second Ctrl-C takes effect when the write is done: raised inside orbax's wait it
left orbax's own traceback on the console and the run's saved round unknown to the message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import threading


_completing = 0  # depth of completing() blocks in this process (the main thread's)
_deferred = False  # a second Ctrl-C arrived inside one


@contextlib.contextmanager
def completing():
  """A block (a checkpoint write) that a second Ctrl-C does not cut: it is raised as KeyboardInterrupt when the
  outermost such block ends (normally; an exception leaving the block wins)."""
  global _completing, _deferred
  _completing += 1
  try:
    yield
  finally:
    _completing -= 1
  if not _completing and _deferred:
    _deferred = False
    raise KeyboardInterrupt


@contextlib.contextmanager
def held_signals():
  """A short block (files renamed into place one after another) that Ctrl-C, SIGTERM and SIGHUP do not cut: a signal
  that arrives inside it is acted on, as the handler before the block would have, once the block ends (main
  thread only; elsewhere a no-op)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  arrived: list[int] = []
  held = [signal.SIGINT, signal.SIGTERM]
  if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
    held.append(signal.SIGHUP)
  old = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in held}
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  for s in dict.fromkeys(arrived):
    signal.raise_signal(s)  # the handler now in place: KeyboardInterrupt for Ctrl-C, the default ends the process


def _resend_a_dropped_ctrl_c(unraisable) -> None:
  """``sys.unraisablehook`` while :func:`ctrl_c_raises` or :class:`StopSignals` is active: a KeyboardInterrupt raised
  where Python drops exceptions (a gc callback such as JAX's, a weakref callback, a ``__del__``) was printed as
  "Exception ignored in ..." and lost (the program ran on and exited 0); SIGINT is sent again a moment later
  instead, so that it lands where it stops the program. Anything else goes to the hook this one replaced."""
  if isinstance(unraisable.exc_value, KeyboardInterrupt):
    again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
    again.daemon = True  # a program already on its way out is not held up by it
    again.start()
    return
  _replaced[0](unraisable)


_replaced: list = []  # the hook _resend_a_dropped_ctrl_c replaced, while it is installed


@contextlib.contextmanager
def ctrl_c_raises():
  """A Ctrl-C in the block stops it with KeyboardInterrupt even when the exception is first raised where Python
  drops exceptions (see :func:`_resend_a_dropped_ctrl_c`); the entry points run inside one. Nested blocks share
  the outermost one's hook."""
  if sys.unraisablehook is _resend_a_dropped_ctrl_c:
    yield
    return
  _replaced[:] = [sys.unraisablehook]
  sys.unraisablehook = _resend_a_dropped_ctrl_c
  try:
    yield
  finally:
    if sys.unraisablehook is _resend_a_dropped_ctrl_c:
      sys.unraisablehook = _replaced[0]
    _replaced.clear()


class Stopped(Exception):
  """A run stopped cleanly at a round boundary after saving (``round_``: the saved round)."""

  def __init__(self, round_: int, reason: str, what: str = "round"):
    super().__init__(f"{reason} at {what} {round_}")
    self.round, self.reason, self.what = round_, reason, what

  @property
  def exit_code(self) -> int:
    return EXIT_CODES.get(self.reason, 0)


EXIT_CODES = {"interrupted": 130, "hung up": 129}  # 128 + SIGINT / SIGHUP; preempted (SIGTERM): 0


# StopSignals.phase: what a stop signal's notice says (Ctrl-C's, SIGTERM's / SIGHUP's, a second Ctrl-C's)
PHASES = {
  "round": (
    "stopping after this round (its checkpoint is saved)",
    "saving this round's checkpoint, then stopping",
    "press Ctrl-C again to stop at once without saving it",
  ),
  "fine-tune": (
    "stopping at the next check of this fine-tune (it restarts on re-run; finished runs are kept)",
    "stopping at the next check of this fine-tune (it restarts on re-run; finished runs are kept)",
    "press Ctrl-C again to stop at once",
  ),
}


def _detach_from_hung_up_terminal() -> None:
  """After SIGHUP, writes to the closed terminal fail (EIO), which would stop the run mid-round instead of
  at its next save: stdout and stderr that are a terminal go to /dev/null (files and pipes stay). A hung-up
  terminal is no longer ``isatty``; it is still a character device."""
  null = None
  for fd in (1, 2):
    try:
      if not stat.S_ISCHR(os.fstat(fd).st_mode):
        continue
      if null is None:
        null = os.open(os.devnull, os.O_WRONLY)
      os.dup2(null, fd)
    except OSError:
      continue
  if null is not None:
    os.close(null)


class StopSignals:
  """Catches SIGTERM, SIGHUP (unless ignored, as under ``nohup``) and the first SIGINT while active (main thread
  only; elsewhere a no-op). The run's stop ``reason``: "interrupted" once a Ctrl-C came (whatever came before
  or after it), else "hung up" (the terminal closed) or "preempted" (SIGTERM, a preemption notice)."""

  def __init__(self, log=None):
    self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    self.reason: str | None = None
    self.phase = "round"  # what the loop does now, for the notices (PHASES); a task sets it
    self._ctrl_c = False
    self._old: dict = {}

  def _on_signal(self, signum, frame):
    global _deferred
    if signum == signal.SIGINT:
      if self._ctrl_c:  # second Ctrl-C: stop now, or once the checkpoint being written is complete
        if _completing:
          if not _deferred:
            self.log("\nCtrl-C again: stopping once the checkpoint being written is complete")
          _deferred = True
          return
        raise KeyboardInterrupt
      self._ctrl_c, stopping = True, self.reason is not None
      self.reason = "interrupted"
      self._say(f"\nCtrl-C: {'already ' if stopping else ''}{PHASES[self.phase][0]}; {PHASES[self.phase][2]}")
      return
    if signum == signal.SIGHUP:
      _detach_from_hung_up_terminal()
    if self.reason is None:
      self.reason = "hung up" if signum == signal.SIGHUP else "preempted"
      self._say(f"\n{signal.Signals(signum).name}: {PHASES[self.phase][1]}")

  def _say(self, text: str) -> None:
    try:
      self.log(text)
    except OSError:  # a console that is gone: the stop goes on without its notice
      pass

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._on_signal)
      if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # nohup's SIG_IGN stays: the run goes on
        self._old[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_signal)
    self._resend = ctrl_c_raises()  # a second Ctrl-C raised where Python drops it is sent again
    self._resend.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self._resend.__exit__(None, None, None)
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old.clear()

  def requested(self, step: int) -> bool:
    """True when the run should stop after ``step``: a signal here, or (multi-process runs) on any
    process or through JAX's preemption sync point, so every process stops at the same step."""
    import jax

    if jax.process_count() == 1:
      return self.reason is not None
    from jax.experimental import multihost_utils

    try:
      notice = bool(multihost_utils.reached_preemption_sync_point(step))
    except Exception:  # noqa: BLE001 - the preemption service is off (e.g. CPU clusters)
      notice = False
    return self.signalled_anywhere(notice)

  def signalled_anywhere(self, notice: bool = False) -> bool:
    """Multi-process runs: whether a signal (or ``notice``) reached any process, by one all-gather of the
    processes' flags; every process must call it at the same point of the run."""
    import numpy as np
    from jax.experimental import multihost_utils

    anyone = bool(np.max(multihost_utils.process_allgather(np.int32(self.reason is not None or notice))))
    if anyone and self.reason is None:
      self.reason = "preempted"
    return anyone


def requested_again(stop, step: int) -> bool:
  """A second check within ``step`` after ``stop.requested(step)`` was False (``stop``: a :class:`StopSignals` or
  None), made after the step's checkpoint save: True when a signal arrived during the save, so the run stops at
  the step just saved rather than after the next one. In a multi-process run the processes agree through one
  more all-gather of their flags (every process saves at the same steps, so all of them get here; JAX's
  preemption sync point is asked once per step, in ``requested``)."""
  import jax

  if stop is None:
    return False
  return stop.requested(step) if jax.process_count() == 1 else stop.signalled_anywhere()
