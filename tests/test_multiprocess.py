"""Two CPU processes on localhost with a coordinator = one process with the same device count."""

import os
import re
import socket
import sys

import jax
import numpy as np
import procs

from fedkd.evaluate import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = [
  "--config.num_rounds=2",
  "--config.num_clients=4",
  "--config.clients_per_round=4",
  "--config.local_steps=1",
  "--config.batch_size=2",
  "--config.image_size=32",
  "--config.model.width=4",
  "--config.model.depth=1",
  "--config.model.groups=2",
  "--config.eval.every=2",
  "--config.eval.examples_per_site=2",
  "--config.eval.max_sites=1",
  "--config.checkpoint.every=2",
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
