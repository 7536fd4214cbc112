"""Test setup: 8 simulated CPU devices, set before any JAX computation."""

import gc
import json
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

# Fewer garbage collections: a test worker holds every test module's imports (jax, flax, optax, orbax, grain,
# tensorflow-datasets, scipy: about 290,000 tracked objects), and JAX's tracing and lowering allocate objects fast,
# so Python's default thresholds (a young-generation pass every 700 allocations, an older one every 10 of those)
# made collection 7% of a worker's CPU samples (perf, tests/test_algorithms.py: gc_collect_main and its visitors;
# 1% with these settings; that file's user CPU 68-81 s against 60-62 s). The objects alive once the tests are
# collected are frozen: no pass walks them again. Whole suite, fresh clones, one after the other on 2 cores:
# 893.8 s wall and 1708 s of CPU against 950.4 s and 1826 s with the defaults.
GC_THRESHOLDS = (100_000, 20, 100)
gc.set_threshold(*GC_THRESHOLDS)


def pytest_collection_finish(session):
  gc.collect()
  gc.freeze()


# The slowest files first, longest first: pytest-xdist hands out whole files in collection order, so a long file
# collected last would run alone at the end while the other worker idles. file_seconds.json holds each file's
# seconds of test time from a whole-suite run on 2 cores (regenerate: tests/file_seconds.py); a file it does not
# know yet goes first, where a long one costs nothing. Order within a file is kept.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "file_seconds.json")) as _f:
  FILE_SECONDS = json.load(_f)


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: -FILE_SECONDS.get(os.path.basename(str(item.fspath)), float("inf")))


@pytest.fixture(scope="session")
def cli():
  """One fork server per test worker for the command-line cases (tests/cli_server.py: the entry points
  imported once; every case a fresh fork that starts its own JAX backend)."""
  from cli_harness import CLI

  c = CLI()
  yield c
  c.close()


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
  """A finished tiny run (tests/test_training.py's tiny_config, no site evaluated) with checkpoints of rounds 2
  and 4, trained once per test module; a test that damages it works on its own copy."""
  from fedkd.tasks import fedavg
  from test_training import tiny_config

  work = tmp_path_factory.mktemp("run4") / "run"
  cfg = tiny_config(num_rounds=4)
  cfg.eval.max_sites = 0
  fedavg.run(cfg, str(work), log=lambda _: None)
  assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
  return work
