"""Two CPU processes on localhost with a coordinator = one process with the same device count."""

import json
import os
import re
import signal
import socket
import sys

import jax
import numpy as np
import procs

from fedkd import sweep
from fedkd.evaluate import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the sweep's tiny run, with 4 clients (2 per process) and a checkpoint and evaluation every 2 rounds
OVERRIDES = [
  f"--config.{k}={v}"
  for k, v in {
    **sweep.TINY,
    "num_rounds": 2,
    "num_clients": 4,
    "clients_per_round": 4,
    "eval.every": 2,
    "eval.max_sites": 1,
    "checkpoint.every": 2,
  }.items()
]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _cmd(workdir, *extra):
  return [
    sys.executable,
    "-m",
    "fedkd.main",
    "--config=configs/quickstart.py",
    f"--workdir={workdir}",
    *OVERRIDES,
    *extra,
  ]


def _params(workdir):
  """Final params, restored with the config stored in the checkpoint onto this process's devices."""
  _, _, params, r = load_run(str(workdir), None)
  assert r == 2
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_two_processes_equal_one_process(tmp_path):
  # Devices from --cpu_devices only; the suite's XLA flags (its backend optimisation level) and its
  # persistent compilation cache stay: the processes compile the same programs as other tests' runs of
  # this config (4 clients, 2 per process: tests/test_training.py's tiny_config shapes).
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  env["JAX_PLATFORMS"] = "cpu"
  single = tmp_path / "single"
  r = procs.run(_cmd(single, "--cpu_devices=4"), cwd=ROOT, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "4 device(s) on the 'clients' axis" in r.stdout

  multi = tmp_path / "multi"
  port = _free_port()
  # both processes (and anything they start) are SIGKILLed as a group if this fails or times out
  with procs.group() as popen:
    ps = [
      popen(
        _cmd(
          multi,
          "--cpu_devices=2",
          f"--coordinator_address=localhost:{port}",
          "--num_processes=2",
          f"--process_id={i}",
        ),
        cwd=ROOT,
        env=env,
      )
      for i in range(2)
    ]
    outs = procs.communicate_all(ps, timeout=300)
  for p, (out, err) in zip(ps, outs):
    assert p.returncode == 0, err[-2000:]
  assert "4 device(s) on the 'clients' axis" in outs[0][0]  # process 0 reports the global mesh
  assert re.search(r"clients run as unroll( \((\d+|all) in flight\))? with matmul convs", outs[0][0])  # 'auto' on CPU
  # only process 0 speaks (process 1 may show gloo's own connection lines)
  assert not [l for l in outs[1][0].splitlines() if l.startswith(("round", "fedkd", "held-out"))]

  a, b = _params(single), _params(multi)
  assert len(a) == len(b)
  # the same program, but the weighted delta sum is all-reduced across processes (gloo) in place of
  # in-process: float32 rounding of a re-associated sum, carried through a second round of training
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
  rec_single = open(single / "metrics.jsonl").read().splitlines()
  rec_multi = open(multi / "metrics.jsonl").read().splitlines()
  assert len(rec_single) == len(rec_multi) == 2


def test_sigterm_to_one_process_stops_all_and_resumes_exactly(tmp_path):
  """SIGTERM to process 1 only (one worker of a slice preempted): both processes stop after the same
  round, saved, exit 0 with the resume line; re-running the command continues to metrics equal to an
  uninterrupted two-process run's, number for number."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  env["JAX_PLATFORMS"] = "cpu"
  five = ["--config.num_rounds=5", "--config.checkpoint.every=5", "--config.eval.every=1"]  # after OVERRIDES: win

  def run(workdir, stop_after=None):
    port = _free_port()
    with procs.group() as popen:
      ps = [
        popen(
          [
            *_cmd(workdir, "--cpu_devices=2", *five),
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
          ],
          cwd=ROOT,
          env={**env, "PYTHONUNBUFFERED": "1"},
        )
        for i in range(2)
      ]
      head = []
      if stop_after is not None:
        for line in ps[0].stdout:  # process 0 prints the rounds
          head.append(line)
          if re.match(rf"round\s+{stop_after}/5 ", line):
            ps[1].send_signal(signal.SIGTERM)
            break
      outs = procs.communicate_all(ps, timeout=300)
    return [
      (p.returncode, "".join(head) + out if i == 0 else out, err) for i, (p, (out, err)) in enumerate(zip(ps, outs))
    ]

  ref, work = tmp_path / "ref", tmp_path / "work"
  for code, _, err in run(ref):
    assert code == 0, err[-2000:]
  stopped = run(work, stop_after=1)
  rounds = set()
  for code, _, err in stopped:
    assert code == 0, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("fedkd: ")]
    assert len(lines) == 1 and lines[0].endswith("(checkpoint saved); re-run the same command to resume"), err[-2000:]
    rounds.add(int(re.match(r"fedkd: preempted at round (\d+) ", lines[0]).group(1)))
  assert len(rounds) == 1 and 1 <= min(rounds) < 5, rounds  # the same round on both, before the last
  assert sorted(os.listdir(work / "checkpoints")) == [str(min(rounds))]
  resumed = run(work)
  for code, _, err in resumed:
    assert code == 0, err[-2000:]
  assert f"resuming from round {min(rounds)}" in resumed[0][1]
  a = [json.loads(ln) for ln in open(ref / "metrics.jsonl")]
  b = [json.loads(ln) for ln in open(work / "metrics.jsonl")]
  assert [r["round"] for r in a] == [0, 1, 2, 3, 4, 5]
  assert a == b
