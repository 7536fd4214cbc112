"""Two CPU processes on localhost with a coordinator = one process with the same device count."""

import json
import os
import re
import signal
import socket

import jax
import numpy as np
import pytest

from fedkd import sweep
from fedkd.evaluate import load_run

from _fork_server import Proc, Server

# the sweep's tiny run, with 4 clients (2 per process), ROUNDS rounds, every round evaluated and a checkpoint at the end
ROUNDS = 4
OVERRIDES = [
  f"--config.{k}={v}"
  for k, v in {
    **sweep.TINY,
    "num_rounds": ROUNDS,
    "num_clients": 4,
    "clients_per_round": 4,
    "eval.every": 1,
    "eval.max_sites": 1,
    "checkpoint.every": ROUNDS,
  }.items()
]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _args(workdir, *extra):
  return ["--config=configs/quickstart.py", f"--workdir={workdir}", *OVERRIDES, *extra]  # extra after: it wins


def _params(workdir):
  """Final params, restored with the config stored in the checkpoint onto this process's devices."""
  _, _, params, r = load_run(str(workdir), None)
  assert r == ROUNDS
  return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.fixture(scope="module")
def server():
  """Every run a fork of one server process that imported fedkd's entry points once (tests/_fork_server.py),
  as ``python -m fedkd.main`` would run. Devices from --cpu_devices only; the suite's XLA flags (its backend
  optimisation level) and its persistent compilation cache stay: the processes compile the same programs as
  other tests' runs of this config (4 clients, 2 per process: tests/test_training.py's tiny_config shapes)."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "PYTHONUNBUFFERED")}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  env["JAX_PLATFORMS"] = "cpu"
  s = Server(env)
  yield s
  s.close()  # SIGKILLs any run a failed test left


def _two_processes(server, workdir, stop_after=None, module="fedkd.main", extra=(), each=lambda i: ()):
  """``_args`` (+ ``extra``, + ``each(process id)``) as two processes of 2 CPU devices each with a coordinator:
  [(exit code, stdout, stderr)] per process. ``stop_after``: SIGTERM to process 1 only once process 0 printed
  that round's line."""
  port = _free_port()
  ps = [
    Proc(
      server,
      module,
      _args(
        workdir,
        *extra,
        "--cpu_devices=2",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        *each(i),
      ),
      f"{workdir}-logs",
    )
    for i in range(2)
  ]
  if stop_after is not None:  # process 0 prints the rounds
    assert ps[0].wait_for(lambda ln: re.match(rf"round\s+{stop_after}/{ROUNDS} ", ln)), ps[0].stderr[-2000:]
    ps[1].signal(signal.SIGTERM)
  return [(p.finish(), p.stdout, p.stderr) for p in ps]


@pytest.fixture(scope="module")
def uninterrupted(server, tmp_path_factory):
  """One uninterrupted two-process run: (workdir, [(exit code, stdout, stderr)] per process); the run both
  tests compare against (one process with the same devices; the same two processes stopped and resumed)."""
  work = tmp_path_factory.mktemp("multiprocess") / "uninterrupted"
  return work, _two_processes(server, work)


def test_two_processes_equal_one_process(server, tmp_path, uninterrupted):
  single = tmp_path / "single"
  p = Proc(server, "fedkd.main", _args(single, "--cpu_devices=4"), str(tmp_path / "logs"))
  assert p.finish() == 0, p.stderr[-2000:]
  assert "4 device(s) on the 'clients' axis" in p.stdout

  multi, outs = uninterrupted
  for code, _, err in outs:
    assert code == 0, err[-2000:]
  assert "4 device(s) on the 'clients' axis" in outs[0][1]  # process 0 reports the global mesh
  assert re.search(r"clients run as unroll( \((\d+|all) in flight\))? with matmul convs", outs[0][1])  # 'auto' on CPU
  # only process 0 speaks (process 1 may show gloo's own connection lines)
  assert not [l for l in outs[1][1].splitlines() if l.startswith(("round", "fedkd", "held-out"))]

  a, b = _params(single), _params(multi)
  assert len(a) == len(b)
  # the same program, but the weighted delta sum is all-reduced across processes (gloo) in place of
  # in-process: float32 rounding of a re-associated sum, carried through the later rounds of training
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
  rec_single = open(single / "metrics.jsonl").read().splitlines()
  rec_multi = open(multi / "metrics.jsonl").read().splitlines()
  assert len(rec_single) == len(rec_multi) == ROUNDS + 1


def test_sigterm_to_one_process_stops_all_and_resumes_exactly(server, tmp_path, uninterrupted):
  """SIGTERM to process 1 only (one worker of a slice preempted): both processes stop after the same
  round, saved, exit 0 with the resume line; re-running the command continues to metrics equal to an
  uninterrupted two-process run's, number for number."""
  ref, outs = uninterrupted
  for code, _, err in outs:
    assert code == 0, err[-2000:]
  work = tmp_path / "work"
  stopped = _two_processes(server, work, stop_after=1)
  rounds = set()
  for code, _, err in stopped:
    assert code == 0, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("fedkd: ")]
    assert len(lines) == 1 and lines[0].endswith("(checkpoint saved); re-run the same command to resume"), err[-2000:]
    rounds.add(int(re.match(r"fedkd: preempted at round (\d+) ", lines[0]).group(1)))
  assert len(rounds) == 1 and 1 <= min(rounds) < ROUNDS, rounds  # the same round on both, before the last
  assert sorted(os.listdir(work / "checkpoints")) == [str(min(rounds))]
  resumed = _two_processes(server, work)
  for code, _, err in resumed:
    assert code == 0, err[-2000:]
  assert f"resuming from round {min(rounds)}" in resumed[0][1]
  a = [json.loads(ln) for ln in open(ref / "metrics.jsonl")]
  b = [json.loads(ln) for ln in open(work / "metrics.jsonl")]
  assert [r["round"] for r in a] == list(range(ROUNDS + 1))
  assert a == b


def test_sigterm_during_a_checkpoint_save_stops_every_process_at_that_round(server, tmp_path):
  """SIGTERM to process 1 right after its save of round 2, after that round's stop check (tests/_save_signal_main.py):
  both processes stop at round 2, the round just saved, instead of training round 3 first (a preemption notice
  leaves seconds, not another round)."""
  work = tmp_path / "work"
  outs = _two_processes(server, work, module="tests._save_signal_main", extra=["--config.checkpoint.every=2"])
  for code, _, err in outs:
    assert code == 0, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("fedkd: ")]
    assert len(lines) == 1 and lines[0].startswith("fedkd: preempted at round 2 (checkpoint saved)"), err[-2000:]
  assert "SIGTERM: saving this round's checkpoint, then stopping" in outs[1][2]
  assert sorted(os.listdir(work / "checkpoints")) == ["2"]
  assert [json.loads(ln)["round"] for ln in open(work / "rounds.jsonl")] == [1, 2]


def test_two_clients_a_round_on_two_processes_take_one_device_of_each(server, tmp_path):
  """clients_per_round=2 on 2 processes x 2 devices: the automatic mesh took devices[:2], both process 0's, and
  process 1 crashed. It now takes one device of each process, and the run trains to its end."""
  outs = _two_processes(server, tmp_path / "work", extra=["--config.clients_per_round=2"])
  for code, _, err in outs:
    assert code == 0, err[-2000:]
  assert "2 device(s) on the 'clients' axis" in outs[0][1]
  assert [json.loads(ln)["round"] for ln in open(tmp_path / "work" / "metrics.jsonl")] == list(range(ROUNDS + 1))
