"""Test setup: 8 simulated CPU devices, set before any JAX computation."""

import os
import signal
import tempfile

# Ctrl-C as at a terminal: pytest started in the background of a non-interactive shell inherits SIGINT
# ignored, and its subprocesses would inherit that (a test's Ctrl-C then reaches no one: Python installs no
# KeyboardInterrupt handler, bash cannot trap it). A handler of this process is reset to the default in a
# child, so every subprocess starts as one typed at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile fast: the suite mostly compiles small programs once. XLA's lowest backend optimisation level
# cuts its time by about a third; XLA:CPU's older loop emitters instead of its fusion emitters compile
# the synthetic generator in 3.3 s instead of 5.2 s (user CPU of a resume test + the pre-redesign
# checks: 95 s instead of 126 s). Numerics are compared with tolerances or run against the same
# program (subprocesses inherit the flags).
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# One persistent XLA compilation cache for the whole run (both xdist workers and every subprocess a
# test starts inherit it): resumed runs, CLI runs and repeated tiny configs compile the same round
# programs many times. Entries are keyed by the program, its compile options and the JAX version, so a
# cache left by an earlier run can only be hit by an identical program. Every compile is cached, the small
# ones too: a fresh process (each CLI case) otherwise compiles ~100 one-operation programs (parameter init,
# slicing, metrics) again, ~1 s of a tiny run's 6 s. Whole suite from an empty cache on 2 cores: 969 s
# against 1031 s with only compiles over 0.5 s cached, 1151 s with no cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fedkd-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


# The slowest modules first, longest first (seconds of test time per file, measured on 2 cores with
# pytest --durations=0): pytest-xdist hands out whole files in collection order, so a long file collected
# last would run alone at the end while the other worker idles. Order within a file is kept.
SLOW_FIRST = (
  "test_resume_robustness.py",  # 121 s
  "test_sweep.py",  # 108 s
  "test_fedefm_resume.py",  # 102 s
  "test_replicas.py",  # 89 s
  "test_algorithms.py",  # 85 s
  "test_engine.py",  # 83 s
  "test_zoo_runs.py",  # 63 s
  "test_multiprocess.py",  # ~60 s (with the SIGTERM-to-one-process test)
  "test_resume_matrix.py",  # ~52 s warm
  "test_fedefm_endpoints.py",  # 53 s
  "test_bench.py",  # 46 s
  "test_emd.py",  # 43 s
  "test_fedefm.py",  # 43 s
  "test_bad_inputs.py",  # 38 s
  "test_pipeline.py",  # 37 s
  "test_fedefm_transfer.py",  # 35 s
  "test_training.py",  # 35 s
  "test_conv.py",  # 30 s
  "test_client_state.py",  # 30 s
  "test_aggregate.py",  # 28 s
  "test_packaging.py",  # 27 s
  "test_personal.py",  # 26 s
  "test_pre_redesign.py",  # 23 s
  "test_dp.py",  # 20 s
  "test_compress.py",  # 18 s
  "test_models.py",  # 17 s
  "test_synth.py",  # 15 s
  "test_losses.py",  # 14 s
  "test_eval.py",  # 13 s
  "test_preview.py",  # 11 s
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


@pytest.fixture(scope="session")
def cli():
  """One fork server per test worker for the command-line cases (tests/cli_server.py: the entry points
  imported once; every case a fresh fork that starts its own JAX backend)."""
  from cli_harness import CLI

  c = CLI()
  yield c
  c.close()
