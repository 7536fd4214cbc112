"""Signals that stop a run in combination, the terminal closing, and what a killed run's TensorBoard keeps.

- SIGTERM, then one Ctrl-C (a scheduler's notice, then the user): that Ctrl-C was taken as a second one and
  stopped the run at once without saving; Ctrl-C then SIGTERM (launch.sweep terminating a child the terminal
  already interrupted) reported "preempted" and exited 0.
- SIGHUP (an SSH session or terminal closed) killed the run without saving its round; under ``nohup`` it is
  ignored and must stay so.
- A run SIGKILLed after a checkpoint lost the TensorBoard scalars of the rounds that checkpoint holds
  (tensorboardX buffers up to 10 s), and the resumed run, which restarts after that round, never wrote them.
"""

from __future__ import annotations

import glob
import os
import signal
import struct
import subprocess
import sys
import threading

import pytest

from fedkd.preemption import Stopped, StopSignals

pytestmark = pytest.mark.skipif(
  threading.current_thread() is not threading.main_thread(), reason="StopSignals catches signals in the main thread"
)
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _send(sig):
  os.kill(os.getpid(), sig)  # delivered to this (main) thread before os.kill returns


def test_a_ctrl_c_after_sigterm_is_the_first_ctrl_c():
  lines = []
  with StopSignals(log=lines.append) as stop:
    _send(signal.SIGTERM)
    _send(signal.SIGINT)  # was: KeyboardInterrupt, nothing saved
    assert stop.reason == "interrupted"
    assert lines[-1].strip().startswith("Ctrl-C: already stopping after this round (its checkpoint is saved)")
    with pytest.raises(KeyboardInterrupt):
      _send(signal.SIGINT)
  assert Stopped(3, stop.reason).exit_code == 130


def test_sigterm_after_a_ctrl_c_keeps_it_an_interrupt():
  lines = []
  with StopSignals(log=lines.append) as stop:
    _send(signal.SIGINT)
    _send(signal.SIGTERM)  # was: reason 'preempted', exit 0
    assert stop.reason == "interrupted"
  assert len(lines) == 1, lines


def test_sighup_saves_and_stops_unless_ignored():
  lines = []
  with StopSignals(log=lines.append) as stop:
    _send(signal.SIGHUP)  # was: the process ended by the signal
    assert stop.reason == "hung up"
  assert lines == ["\nSIGHUP: saving this round's checkpoint, then stopping"]
  assert Stopped(3, stop.reason).exit_code == 129
  before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
  try:
    with StopSignals(log=lines.append) as stop:
      _send(signal.SIGHUP)
      assert stop.reason is None
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGHUP, before)


HUNG_UP = """
import os, sys, time
sys.path.insert(0, {root!r})
from fedkd.preemption import StopSignals
res = open(sys.argv[1], "w", buffering=1)
with StopSignals() as stop:
  res.write("ready\\n")
  while not stop.reason:
    time.sleep(0.01)
  for i in range(3):  # the round's own output after the notice
    print("round line", i, flush=True)
  res.write(f"reason={{stop.reason}} printed\\n")
"""


def test_sighup_from_a_closed_terminal_stops_at_the_next_save():
  """The terminal closed: every write to it then fails (EIO), so the SIGHUP notice, and the round's own output
  after it, raised OSError mid-round; the run died without saving instead of stopping after its round."""
  import pty
  import tempfile
  import time

  out = os.path.join(tempfile.mkdtemp(), "result.txt")
  pid, fd = pty.fork()
  if pid == 0:  # the child: a run on the terminal
    os.execv(sys.executable, [sys.executable, "-c", HUNG_UP.format(root=ROOT), out])
  deadline = time.monotonic() + 60
  while not (os.path.exists(out) and "ready" in open(out).read()):
    assert time.monotonic() < deadline, "the child never started"
    time.sleep(0.05)
  os.close(fd)  # the terminal closes: the kernel sends SIGHUP to the child, which leads its session
  _, status = os.waitpid(pid, 0)
  assert os.waitstatus_to_exitcode(status) == 0
  assert open(out).read().splitlines() == ["ready", "reason=hung up printed"]


KILLED_AFTER_SAVE = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
from fedkd import checkpoint
from fedkd.tasks import fedavg
from test_training import tiny_config
from tensorboardX import event_file_writer
write = event_file_writer.EventsWriter.write_event
def slow_write(self, event):  # a busy disk: the writer thread lags behind the queue
  time.sleep(0.05)
  return write(self, event)
event_file_writer.EventsWriter.write_event = slow_write
save = checkpoint.Checkpointer.save
def save_then_die(self, r, *args, **kwargs):
  save(self, r, *args, **kwargs)
  if r == int(sys.argv[2]):
    self.wait()
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save_then_die
fedavg.run(tiny_config(num_rounds=4), sys.argv[1], log=lambda m: None)
"""


def _steps(tb_dir, tag: str) -> list[int]:
  """The steps of every ``tag`` scalar in tb_dir's event files, read with TensorBoard's record framing
  (length, its CRC, payload, its CRC) and tensorboardX's Event message."""
  from tensorboardX.proto import event_pb2

  steps = []
  for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
    data, i = open(path, "rb").read(), 0
    while i + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      i += 12 + n + 4
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return sorted(steps)


def test_a_run_killed_after_a_checkpoint_keeps_that_rounds_tensorboard_scalars(tmp_path):
  work = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  script = KILLED_AFTER_SAVE.format(tests=TESTS)
  r = subprocess.run(
    [sys.executable, "-c", script, str(work), "2"], env=env, capture_output=True, text=True, timeout=600
  )
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  # was [] or [1]: the buffer died with the process. The evaluation's scalars are a round's last ones.
  assert _steps(work / "tb", "train/loss") == [1, 2] and _steps(work / "tb", "eval/dice/catheter") == [0, 2]
  r = subprocess.run(
    [sys.executable, "-c", script, str(work), "-1"], env=env, capture_output=True, text=True, timeout=600
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert _steps(work / "tb", "train/loss") == [1, 2, 3, 4]  # each round once, as docs/outputs.md says
  assert _steps(work / "tb", "eval/dice/catheter") == [0, 2, 4]


def test_a_fine_tunes_notice_speaks_of_the_fine_tune_not_a_round_checkpoint():
  """FedEFM's downstream fine-tunes keep no round checkpoint: the notice said 'stopping after this round (its
  checkpoint is saved)'. The experiment sets the phase while it fine-tunes, and restores it after."""
  import types

  import optax

  from fedkd.tasks.fedefm import Experiment

  lines = []
  with StopSignals(log=lines.append) as stop:
    seen = []
    fake = types.SimpleNamespace(stop=stop, _train_steps=lambda *a: seen.append(stop.phase) or "trained")
    assert Experiment._train(fake, {"w": 0.0}, (None, optax.sgd(0.1)), None, [], [], 1, None, 0.0, "l", "w") == (
      "trained"
    )
    assert seen == ["fine-tune"] and stop.phase == "round"
    stop.phase = "fine-tune"
    _send(signal.SIGTERM)
  assert lines == [
    "\nSIGTERM: stopping at the next check of this fine-tune (it restarts on re-run; finished runs are kept)"
  ]
