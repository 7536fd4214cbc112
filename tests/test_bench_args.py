"""python -m bench --devices: more devices than JAX sees, a count that does not divide --clients, or a negative
one is ``bench: error: ...`` and exit 2 (as the bench's other bad flags), not a traceback from the mesh."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--size=32 --clients=2 --steps=1 --batch=2 --width=4 --depth=1 --rounds=1 --no-centralized".split()


@pytest.mark.parametrize(
  "extra, needles",
  [
    (["--devices=5"], ["--devices=5 but only 1 cpu device(s) are visible", "--devices <= 1"]),
    (["--devices=-1"], ["--devices=-1 must be >= 0"]),
    (["--devices=2", "--cpu_devices=2", "--clients=3"], ["--clients=3 is not divisible by --devices=2"]),
    (["--devices=2", "--cpu_devices=2", "--scale=2,3"], ["--scale=3 is not divisible by --devices=2"]),
    (["--scale=a"], ["--scale=a: 'a' is not a client count"]),
    (["--scale=64,0"], ["'0' is not a client count"]),
    (["--cpu_devices=0"], ["--cpu_devices=0 must be an integer >= 1"]),
    (["--cpu_devices=-2"], ["--cpu_devices=-2 must be an integer >= 1"]),
  ],
)
def test_bad_devices_is_one_bench_error_line(cli, extra, needles):
  """``python -m bench`` as a fresh process (a fork of the CLI server that starts its own JAX backend)."""
  xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device" not in f)
  r = cli.run("bench.__main__", [*TINY, *extra], env={"XLA_FLAGS": xla_flags}, timeout=180)
  assert r.code == 2 and not r.traceback, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("bench: error: "), r.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  assert '"name": "fed_round"' not in r.stdout  # refused before timing anything


def test_fedkd_bench_is_the_bench_from_any_folder(tmp_path):
  """``python -m fedkd.bench`` (the name the project brief gives) runs ``python -m bench`` from outside the
  checkout: its flags, and its bad-flag line."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [sys.executable, "-m", "fedkd.bench", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert r.returncode == 0 and "--workload" in r.stdout and "--measure" in r.stdout, r.stderr[-2000:]
  r = subprocess.run(
    [sys.executable, "-m", "fedkd.bench", "--devices=-1"], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert r.returncode == 2 and "--devices=-1 must be >= 0" in r.stderr and "Traceback" not in r.stderr, r.stderr
