"""fedkd.hostmem: XLA:CPU's per-execution temporary buffer is reused, not faulted in afresh every call.

The reference is the kernel's own count of minor page faults (``getrusage``) around repeated calls of a
program whose temporary buffer is 64 MiB, in a fresh process per setting (malloc settings are per
process and must come before JAX starts its threads)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import json, resource
from fedkd import hostmem
state = hostmem.reuse_freed_memory()
import jax, jax.numpy as jnp
# the [8192, 2048] f32 activation (64 MiB) lives in the temporary buffer only: a second matmul reads it
f = jax.jit(lambda a, b: jnp.sum(jnp.tanh(a @ b).T @ a))
a, b = jnp.ones((8192, 8), jnp.float32), jnp.ones((8, 2048), jnp.float32)
exe = f.lower(a, b).compile()
temp = exe.memory_analysis().temp_size_in_bytes
for _ in range(5):  # the heap settles over the first few calls
  exe(a, b).block_until_ready()
faults = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  exe(a, b).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(state=state, temp=temp, faults=faults)))
"""


def _probe(setting: str) -> dict:
  env = dict(os.environ, FEDKD_MALLOC=setting, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_temporary_buffer_is_reused_instead_of_faulted_in_every_call():
  pages = None
  for setting in ("system", "reuse"):
    r = _probe(setting)
    assert r["state"] == setting
    assert r["temp"] >= 64 * 2**20, r
    pages = r["temp"] // 4096
    if setting == "system":
      # glibc's default: the buffer is a fresh mmap per call, every page faulted in again
      assert min(r["faults"]) > pages // 2, r
    else:
      assert max(r["faults"][1:]) < pages // 20, r


def test_unknown_setting_is_a_one_line_error():
  env = dict(os.environ, FEDKD_MALLOC="jemalloc")
  out = subprocess.run(
    [sys.executable, "-m", "fedkd.main", "--help"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
  )
  assert out.returncode == 2
  assert "FEDKD_MALLOC='jemalloc'" in out.stderr and "'system'" in out.stderr
  assert "Traceback" not in out.stderr
