"""Test setup: 8 simulated CPU devices, set before any JAX computation."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile at XLA's lowest backend optimisation level: the suite mostly compiles small programs once,
# and this cuts its time by about a third; numerics are compared with tolerances or run against the
# same program (subprocesses inherit it).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
