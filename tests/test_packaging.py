"""A non-editable install works from another directory: configs resolve from the installed package,
the Gaia graph is packaged, and the quickstart runs (tiny) with its checkout nowhere on the path."""

import os
import sys

import numpy as np
import procs

from test_resume_robustness import TINY as RESUME_TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One round of tests/test_workdir_usage.py's tiny quickstart (the resume tests' 2 clients on a 32 px, 2-level UNet,
# one device on the clients axis, every round evaluated and saved): its programs, which the suite's persistent
# compilation cache may hold already (the cache key leaves out source locations: the installed copy's programs
# are the checkout's).
TINY = [a for a in RESUME_TINY if not a.startswith("--config.checkpoint.max_to_keep=")] + ["--config.num_rounds=1"]


def test_wheel_install_runs_from_elsewhere(tmp_path):
  target = tmp_path / "site"
  # pip install . (not editable) of this checkout, without dependencies (the test env has them)
  r = procs.run(
    [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), ROOT],
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  installed = target / "fedkd"
  for rel in (
    "configs/quickstart.py",
    "configs/fedefm.py",
    "configs/topologies/gaia.txt",
    "launch/sweep.py",
    "launch/tpu_vm.sh",
    "assets/preview.png",
  ):
    assert (installed / rel).is_file(), rel
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
  env.pop("JAX_NUM_CPU_DEVICES", None)
  probe = (
    "import fedkd, fedkd.fl.topology as t; print(fedkd.__file__); a = t.gaia_adjacency(); print(a.shape, int(a.sum()))"
  )
  r = procs.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.splitlines()[0].startswith(str(target)), r.stdout  # the installed copy, not the checkout
  # the Gaia graph read from the package equals the checkout's file
  edges = [
    tuple(map(int, ln.split()[:2]))
    for ln in open(os.path.join(ROOT, "configs", "topologies", "gaia.txt"))
    if ln.strip() and not ln.startswith("#")
  ]
  n = 1 + max(max(e) for e in edges)
  ref = np.zeros((n, n), int)
  for i, j in edges:
    ref[i, j] = ref[j, i] = 1
  assert r.stdout.splitlines()[1] == f"({n}, {n}) {int(ref.sum())}", (r.stdout, n, ref.sum())
  work = tmp_path / "run"
  r = procs.run(
    [sys.executable, "-m", "fedkd.main", "--config=configs/quickstart.py", f"--workdir={work}", *TINY],
    cwd=elsewhere,
    env=env,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert (work / "metrics.jsonl").is_file() and (work / "checkpoints" / "1").is_dir()
