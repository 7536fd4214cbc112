"""fedkd.preemption: a second Ctrl-C while a checkpoint is being written takes effect once the write is done (raised
inside orbax's wait it left orbax's traceback on the console), and at once anywhere else."""

import os
import signal
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
