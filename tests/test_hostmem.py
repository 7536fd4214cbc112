"""fedkd.hostmem: with freed host memory kept, a CPU program's temporary buffer is not faulted in again
at every execution. Checked against the kernel's own count of this process's minor page faults
(``getrusage``) and the page count of XLA's buffer plan, in fresh processes (the setting is
process-wide and must come before JAX's CPU backend starts)."""

import json
import os
import sys

import procs
import pytest

from fedkd import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One program whose buffer plan holds a 128 MiB temporary (the 8192 x 4096 product feeds two reductions
# of the softmax, so XLA materialises it), run 8 times; prints the faults of each run as JSON.
PROBE = """
import json, resource, sys
from fedkd import hostmem
kept = hostmem.apply(sys.argv[1])
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jax.nn.softmax(x @ w, axis=-1)[:, 0].sum())
x, w = jnp.ones((8192, 64), jnp.float32), jnp.full((64, 4096), 0.01, jnp.float32)
exe = f.lower(x, w).compile()
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(exe(x, w))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
pages = exe.memory_analysis().temp_size_in_bytes // resource.getpagesize()
print(json.dumps(dict(kept=kept, pages=pages, faults=faults)))
"""


def _probe(mode: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "XLA_FLAGS"))}
  env["JAX_PLATFORMS"] = "cpu"
  out = procs.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(hostmem._mallopt() is None, reason="needs Linux with glibc")
def test_kept_memory_is_not_faulted_in_again():
  """'release' (glibc's defaults): every run maps the temporary buffer afresh and faults in about every
  page of it; 'keep': after the first runs the buffer stays mapped, and later runs fault in almost none.
  Where the buffer lands in the kept heap depends on which thread runs the program and what else it holds;
  on a loaded machine a process can place it anew for several runs (seen: 1 process in about 10 under 3
  busy loops), so 'keep' gets up to three fresh processes, and 'release' never shows the effect."""
  released = _probe("release")
  late = lambda r: sorted(r["faults"][3:])[len(r["faults"][3:]) // 2]  # noqa: E731 - median of runs 4-8
  assert released["kept"] is False and late(released) > 0.8 * released["pages"], released
  tries = []
  for _ in range(3):
    kept = _probe("keep")
    assert kept["pages"] >= 128 * 2**20 // 4096 - 1 and released["pages"] == kept["pages"]
    assert kept["kept"] is True
    tries.append(kept)
    if late(kept) < 0.05 * kept["pages"]:
      break
  assert late(tries[-1]) < 0.05 * tries[-1]["pages"], tries


def test_apply_checks_its_mode_and_when_it_runs():
  """An unknown mode is a ValueError naming the choices; in a process whose JAX backend has started
  (this one: conftest ran JAX), 'keep' is refused with a RuntimeError, 'auto' and 'release' change nothing."""
  import jax

  jax.devices()
  with pytest.raises(ValueError, match="'auto', 'keep', 'release'|auto, keep, release"):
    hostmem.apply("kept")
  assert hostmem.apply("release") is False
  assert hostmem.apply("auto") is False
  if hostmem._mallopt() is not None:
    with pytest.raises(RuntimeError, match="before any JAX computation"):
      hostmem.apply("keep")
  assert hostmem.kept() is False


def test_auto_keeps_only_where_jax_runs_on_the_cpu(monkeypatch):
  """'auto' decides by JAX_PLATFORMS (jax_platforms), and where it is unset by whether a GPU/TPU plugin of
  JAX is installed."""
  for platforms, plugins, want in (
    ("cpu", ["cuda12"], True),
    ("cuda,cpu", [], False),
    ("", [], True),
    ("", ["cuda12"], False),
    ("tpu", [], False),
  ):
    monkeypatch.setattr(hostmem, "_accelerator_plugins", lambda plugins=plugins: plugins)
    assert hostmem._cpu_first(platforms) is want, (platforms, plugins)
