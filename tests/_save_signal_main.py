"""``python -m fedkd.main`` with SIGTERM sent to this process right after its checkpoint save of round
``SIGNAL_ROUND``, on the process given ``--process_id=SIGNAL_PROCESS`` only: a preemption notice that arrives
while a checkpoint is written, after the round's stop check (tests/test_multiprocess.py; a fork-server
module, so the patch lives in that run only)."""

import os
import signal
import sys

SIGNAL_ROUND, SIGNAL_PROCESS = 2, 1


def run():
  from fedkd import main
  from fedkd.checkpoint import Checkpointer

  me = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--process_id=")), 0)
  real_save = Checkpointer.save

  def save(self, round_, *args, **kwargs):
    out = real_save(self, round_, *args, **kwargs)
    if round_ == SIGNAL_ROUND and me == SIGNAL_PROCESS:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  Checkpointer.save = save
  main.run()
