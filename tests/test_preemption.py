"""fedkd.preemption: a second Ctrl-C while a checkpoint is being written takes effect once the write is done (raised
inside orbax's wait it left orbax's traceback on the console), and at once anywhere else."""

import os
import signal
import sys
import threading

import numpy as np
import pytest

from fedkd import checkpoint as ckpt_lib
from fedkd import preemption
from fedkd.preemption import StopSignals

pytestmark = pytest.mark.skipif(
  threading.current_thread() is not threading.main_thread(), reason="StopSignals catches signals in the main thread"
)


def _ctrl_c():
  os.kill(os.getpid(), signal.SIGINT)  # delivered to this (main) thread before os.kill returns


def test_a_second_ctrl_c_waits_for_the_checkpoint_being_written():
  lines, reached = [], []
  with StopSignals(log=lines.append) as stop:
    _ctrl_c()
    assert stop.reason == "interrupted"
    with pytest.raises(KeyboardInterrupt):
      with preemption.completing():
        with preemption.completing():  # nested: only the outermost block's end raises
          _ctrl_c()
          _ctrl_c()
          reached.append("inner")
        reached.append("outer")
    assert reached == ["inner", "outer"]
    assert sum("stopping once the checkpoint being written is complete" in ln for ln in lines) == 1
    with pytest.raises(KeyboardInterrupt):  # outside a write: at once
      _ctrl_c()
    with preemption.completing():  # the deferred stop was spent: a later block ends normally
      pass


def test_the_checkpointers_wait_finishes_before_the_second_ctrl_c_stops(tmp_path, monkeypatch):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), 2)
  try:
    with StopSignals(log=lambda _: None):
      _ctrl_c()
      ckpt.save(1, {"w": np.arange(3.0)}, {"seed": 0})
      real = ckpt._mngr.wait_until_finished
      finished = []

      def wait_with_ctrl_c():
        _ctrl_c()  # the second Ctrl-C arrives while orbax finishes the write
        real()
        finished.append(True)

      with monkeypatch.context() as m:
        m.setattr(ckpt._mngr, "wait_until_finished", wait_with_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
          ckpt.wait()
      assert finished == [True]  # raised after orbax's wait returned, not inside it
    assert ckpt.all_rounds() == [1]
    np.testing.assert_array_equal(ckpt.restore(1, {"w": np.zeros(3)})[0]["w"], np.arange(3.0))
  finally:
    ckpt.close()


def _ctrl_c_inside_a_gc_callback(then):
  """A SIGINT whose handler runs inside a gc callback (as one landing in JAX's does), then ``then()``: returns
  whether the callback ran."""
  import gc

  fired = []

  def callback(phase, info):
    if phase == "start" and not fired:
      fired.append(True)
      _ctrl_c()
      for _ in range(1000):  # the handler runs here, inside the callback
        pass

  gc.callbacks.append(callback)
  try:
    gc.collect()
    then()
  finally:
    gc.callbacks.remove(callback)
  return bool(fired)


def _wait(seconds):
  import time

  end = time.monotonic() + seconds
  while time.monotonic() < end:
    time.sleep(0.01)


def test_a_ctrl_c_that_lands_in_a_gc_callback_is_sent_again_not_lost():
  """An exception raised in a gc or weakref callback or a __del__ is printed ("Exception ignored in") and dropped: a
  Ctrl-C whose KeyboardInterrupt was raised inside JAX's gc callback was lost and fedkd.eval ran on to exit 0. Inside
  the entry points' ctrl_c_raises it is sent again and stops the program; a second Ctrl-C of a run stopping at a
  round boundary too."""
  hook = sys.unraisablehook
  with preemption.ctrl_c_raises():
    with pytest.raises(KeyboardInterrupt):
      assert _ctrl_c_inside_a_gc_callback(lambda: _wait(5))
  assert sys.unraisablehook is hook
  lines = []
  with StopSignals(log=lines.append) as stop:
    _ctrl_c()
    assert stop.reason == "interrupted"
    with pytest.raises(KeyboardInterrupt):
      _ctrl_c_inside_a_gc_callback(lambda: _wait(5))


def test_nested_ctrl_c_blocks_share_one_hook_and_restore_the_first():
  """fedkd.main's StopSignals runs inside the entry point's ctrl_c_raises: the inner block keeps the outer hook
  (it delegated to itself: RecursionError on any other unraisable exception), the outer restores the original."""
  hook, seen = sys.unraisablehook, []
  sys.unraisablehook = seen.append
  try:
    with preemption.ctrl_c_raises():
      with StopSignals():
        with preemption.ctrl_c_raises():

          class Noisy:
            def __del__(self):
              raise ValueError("dropped")

          Noisy()
      assert sys.unraisablehook is preemption._resend_a_dropped_ctrl_c
    assert sys.unraisablehook == seen.append
  finally:
    sys.unraisablehook = hook
  assert [type(u.exc_value) for u in seen] == [ValueError]
