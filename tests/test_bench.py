"""The benchmarks of bench/ (run from the repository root; not part of the installed package).

bench.conv: every client-batched conv formulation agrees with XLA's vmapped convolution. bench.measure:
the layout x lowering candidates per backend, a failing candidate is skipped with its error, the fastest
timed one is chosen, the caller's state is untouched and the chosen round equals a per-client loop
(tests/test_engine.py's reference). python -m bench: its layout/lowering flags, its rows, --measure
end to end in two processes.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import procs
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ is a top-level folder of the checkout, not an installed package
  sys.path.insert(0, ROOT)

import bench.__main__ as round_bench  # noqa: E402
import test_bench_usage  # noqa: E402
import test_engine  # noqa: E402
from bench import conv as bench_conv  # noqa: E402
from bench import measure  # noqa: E402
from fedkd.config import base_config  # noqa: E402
from fedkd.fl import algorithms, engine  # noqa: E402
from fedkd.fl.algorithm import ClientContext  # noqa: E402
from fedkd.fl.engine import EngineOptions  # noqa: E402
from fedkd.sharding import client_mesh, shard_clients  # noqa: E402

TINY = ["--clients", "3", "--batch", "2", "--size", "8", "--cin", "4", "--cout", "5", "--reps", "1"]


def _rows(capsys, argv):
  bench_conv.main(TINY + argv)
  return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_every_formulation_and_pass_matches_vmap(capsys):
  rows = _rows(capsys, [])
  assert {(r["formulation"], r["pass"]) for r in rows} == {
    (f, p) for f in bench_conv.FORMULATIONS for p in bench_conv.PASSES
  }
  for r in rows:
    assert r["ms"] > 0 and r["ratio"] > 0
    if r["formulation"] != "centralized":
      assert r["max_rel_err"] < 1e-5, r  # f32: the same sums in another order


def test_compile_only_times_nothing(capsys):
  # former names are accepted: vmap = xla, hybrid = wgrad
  rows = _rows(capsys, ["--compile-only", "--formulations", "vmap,hybrid", "--passes", "all"])
  assert [(r["name"], r["formulation"], r["pass"]) for r in rows] == [
    ("compiled", "xla", "all"),
    ("compiled", "wgrad", "all"),
  ]
  assert all("ms" not in r for r in rows)


def _labels(*args):
  return [measure.label(o) for o in measure.candidates(*args)]


def test_measure_candidates():
  assert _labels("cpu", 64, 8) == ["unroll+matmul", "unroll+xla", "vmap+gemm", "vmap+xla"]
  assert _labels("gpu", 16, 4) == [
    "vmap+wgrad",
    "vmap+gemm",
    "chunked(4)+gemm",
    "vmap+xla",
    "chunked(1)+xla",
    "unroll+xla",
  ]
  # one chunk holding the whole shard is vmap+gemm: not timed twice; more than 16 clients are not unrolled
  assert _labels("gpu", 16, 16) == ["vmap+wgrad", "vmap+gemm", "vmap+xla", "chunked(1)+xla", "unroll+xla"]
  assert _labels("tpu", 128, 16) == ["vmap+wgrad", "vmap+gemm", "chunked(16)+gemm", "vmap+xla", "chunked(1)+xla"]
  assert all(o.unroll_local_steps for o in measure.candidates("cpu", 4, 8, True))
  assert not any(o.unroll_local_steps for o in measure.candidates("gpu", 4, 8, False))


@pytest.mark.parametrize(
  "opts",
  [EngineOptions("vmap", "wgrad", 8), EngineOptions("chunked", "xla", 1), EngineOptions("chunked", "gemm", 16)],
)
def test_measure_flags_select_the_options(opts):
  """The recommended flags, applied to the config schema, resolve to the measured options."""
  c = base_config()
  for flag in measure.flags(opts).split():
    key, value = flag[len("--config.engine.") :].split("=")
    c.engine[key] = type(c.engine[key])(value)
  layout, lowering, chunk = engine.legacy_options(c.engine)
  got = engine.resolve(layout, lowering, False, platform="gpu", model="unet", clients_per_shard=64, client_chunk=chunk)
  assert (got.layout, got.lowering) == (opts.layout, opts.lowering)
  assert got.layout != "chunked" or got.client_chunk == opts.client_chunk


def test_measure_skips_failures_and_leaves_state_untouched():
  apply, params, loss_fn, xs, ys, weights = test_engine._setup(seed=7, clients=4)
  mesh = client_mesh(2)
  alg = algorithms.FedAvg(optax.sgd(1.0))
  ctx = ClientContext(apply, loss_fn, optax.sgd(test_engine.LR))

  def out_of_memory(*args):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 62.7GiB.\nmore detail")

  def build(o):
    return out_of_memory if o.lowering == "wgrad" else engine.make_round_fn(alg, ctx, mesh, o)

  options = [
    EngineOptions("unroll", "xla", 8, True),
    EngineOptions("no_such_layout", "xla", 8, True),  # fails to build
    EngineOptions("vmap", "gemm", 8, True),
    EngineOptions("vmap", "wgrad", 8, True),  # fails when it runs
  ]
  state = alg.init(params, jax.random.key(0))
  sx, sy, sw = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  emitted = []
  best, fn, results = measure.measure(
    build, options, (state, None, {"x": sx, "y": sy}, sw), reps=1, emit=emitted.append
  )
  assert emitted == results and [r["candidate"] for r in results] == [measure.label(o) for o in options]
  assert "no_such_layout" in results[1]["error"] and "sec_per_round" not in results[1]
  assert results[3]["error"] == "RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 62.7GiB."
  timed = [results[0], results[2]]
  assert all(r["sec_per_round"] > 0 and r["first_call_s"] > 0 and "error" not in r for r in timed)
  assert measure.label(best) == min(timed, key=lambda r: r["sec_per_round"])["candidate"]
  assert best in (options[0], options[2])
  # the measured rounds ran on copies: the state is alive (not donated) and still the initial one
  assert not any(a.is_deleted() for a in jax.tree.leaves(state))
  assert test_engine._max_diff(state["params"], params) == 0
  got = jax.tree.map(np.asarray, fn(state, None, {"x": sx, "y": sy}, sw)[0]["params"])
  assert test_engine._max_diff(test_engine._reference_round(apply, loss_fn, params, xs, ys, weights), got) < 2e-5


def test_measure_fails_when_nothing_runs():
  def build(o):
    raise ValueError(f"cannot build {o.layout}")

  with pytest.raises(RuntimeError, match="vmap\\+xla: ValueError: cannot build vmap"):
    measure.measure(build, [EngineOptions("vmap", "xla")], (), reps=1)


def _bench_args(argv):
  return round_bench._resolve(round_bench._parser().parse_args(argv))


def test_bench_pairs_layouts_and_former_names():
  """--pairs / --layouts x --lowerings name the engine options the rows time (former strategy names
  map to their layout + lowering); 'auto' is the engine's choice for the backend and model."""
  a = _bench_args(
    ["--pairs", "hybrid,bgemm,vmap,unroll,chunked,map,vmap:gemm,chunked:wgrad:2,auto:auto", "--chunk", "4"]
  )
  got = [(o.layout, o.lowering, o.client_chunk) for o in round_bench.engine_options(a, "gpu", 8)]
  assert got == [
    ("vmap", "wgrad", 4),
    ("vmap", "gemm", 4),
    ("vmap", "xla", 4),
    ("unroll", "xla", 4),
    ("chunked", "gemm", 4),
    ("chunked", "xla", 1),
    # vmap:gemm repeats bgemm: dropped
    ("chunked", "wgrad", 2),
    # auto:auto on a GPU with 8 UNet clients per device is vmap + wgrad (docs/engine.md): a repeat
  ]
  a = _bench_args(["--layouts", "vmap,chunked", "--lowerings", "xla,gemm", "--unroll", "true"])
  opts = round_bench.engine_options(a, "gpu", 8)
  assert [(o.layout, o.lowering) for o in opts] == [
    ("vmap", "xla"),
    ("vmap", "gemm"),
    ("chunked", "xla"),
    ("chunked", "gemm"),
  ]
  assert all(o.unroll_local_steps and o.client_chunk == 8 for o in opts)
  assert [(o.layout, o.lowering) for o in round_bench.engine_options(_bench_args([]), "cpu", 8)] == [
    ("unroll", "matmul")
  ]
  assert round_bench.engine_options(_bench_args(["--layouts", "none"]), "cpu", 8) == []
  assert len(round_bench.engine_options(_bench_args(["--layouts", "all", "--lowerings", "all"]), "cpu", 8)) == 12
  for bad in (["--pairs", "gconv"], ["--pairs", "vmap:gemm:0"], ["--layouts", "vmap", "--lowerings", "winograd"]):
    with pytest.raises(SystemExit):
      round_bench.engine_options(_bench_args(bad), "cpu", 8)
  # --in-flight: one row per value for unroll; other layouts ignore it (one row)
  a = _bench_args(["--pairs", "unroll:matmul,vmap:xla", "--in-flight", "2,0,1"])
  got = [(o.layout, o.clients_in_flight) for o in round_bench.engine_options(a, "cpu", 8)]
  assert got == [("unroll", 2), ("unroll", 0), ("unroll", 1), ("vmap", 0)]
  for bad in ("two", "-1", "auto,x"):
    with pytest.raises(SystemExit):
      round_bench.engine_options(_bench_args(["--in-flight", bad]), "cpu", 8)


def test_round_benchmark_rows(capsys, monkeypatch):
  from fedkd.data import synth

  def images(seed, table, ids, idx, size):  # the generator's shapes, without compiling the generator
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.uniform(kx, idx.shape + (size, size, 1)), jax.random.randint(ky, idx.shape + (size, size), 0, 3)

  monkeypatch.setattr(synth, "generate", images)
  tiny = "--size 16 --clients 2 --steps 1 --batch 1 --width 2 --depth 1 --rounds 1 --devices 2"
  round_bench.main(tiny.split() + ["--pairs", "chunked:xla:1"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["name"] for r in rows] == ["synth", "centralized", "fed_round"]
  central, fed = rows[1], rows[2]
  assert (fed["layout"], fed["lowering"], fed["chunk"], fed["devices"]) == ("chunked", "xla", 1, 2)
  assert fed["sec_per_round"] > 0 and central["sec_per_round"] > 0
  assert fed["images_per_s"] == pytest.approx(2 / fed["sec_per_round"], rel=1e-2)
  assert fed["ratio"] == pytest.approx(central["sec_per_round"] / fed["sec_per_round"], rel=1e-2, abs=1e-3)


def test_the_ceiling_is_the_fastest_centralized_step_over_the_rows_lowerings(capsys, monkeypatch):
  """The ceiling was timed with XLA's convs only while the CPU default round ran under the matmul lowering,
  which speeds the centralized step up too (reviewer: 1.22x): the round's ratio read 1.09 against a ceiling it
  did not beat. One centralized row per lowering the rows use (and xla); the ratio is against the fastest."""
  from fedkd.data import synth
  from fedkd.fl import engine

  def images(seed, table, ids, idx, size):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.uniform(kx, idx.shape + (size, size, 1)), jax.random.randint(ky, idx.shape + (size, size), 0, 3)

  monkeypatch.setattr(synth, "generate", images)
  seen = []
  real = engine._lowered
  monkeypatch.setattr(engine, "_lowered", lambda lowering: seen.append(lowering) or real(lowering))
  tiny = "--size 16 --clients 2 --steps 1 --batch 1 --width 2 --depth 1 --rounds 1 --devices 1"
  round_bench.main(tiny.split() + ["--pairs", "unroll:matmul,vmap:gemm,unroll:xla"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  central = {r["lowering"]: r["sec_per_round"] for r in rows if r["name"] == "centralized"}
  assert list(central) == ["xla", "matmul", "gemm"] and seen[:3] == ["xla", "matmul", "gemm"]
  best = min(central, key=central.get)
  for fed in [r for r in rows if r["name"] == "fed_round"]:
    assert fed["ceiling_lowering"] == best
    assert fed["ratio"] == pytest.approx(central[best] / fed["sec_per_round"], rel=1e-2, abs=1e-3)
  round_bench.main(tiny.split() + ["--pairs", "unroll:matmul", "--ceiling", "xla"])  # bench/gpu.sh's: one compile
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["name"], r.get("lowering")) for r in rows] == [
    ("synth", None),
    ("centralized", "xla"),
    ("fed_round", "matmul"),
  ]
  assert rows[2]["ceiling_lowering"] == "xla"


def test_a_rows_chunk_is_the_chunk_the_round_runs(capsys, monkeypatch):
  """--chunk 3 over 4 clients runs chunks of 2 (engine.chunk_size: the largest divisor up to 3); the row said 3."""
  from fedkd.data import synth

  def images(seed, table, ids, idx, size):
    return jnp.zeros(idx.shape + (size, size, 1)), jnp.zeros(idx.shape + (size, size), jnp.int32)

  monkeypatch.setattr(synth, "generate", images)
  tiny = "--size 8 --clients 4 --steps 1 --batch 1 --width 2 --depth 1 --rounds 1 --devices 1 --no-centralized"
  round_bench.main(tiny.split() + ["--pairs", "chunked:xla:3"])
  (fed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"fed_round"' in line]
  assert (fed["layout"], fed["chunk"]) == ("chunked", 2)


def test_scale_rows_resolve_auto_for_their_own_client_count(capsys, monkeypatch):
  """--scale with the 'auto' layout took the layout auto picks for --clients for every count (on a GPU: vmap for
  8 clients where the engine runs 1,024 chunked); each count is resolved for its own clients per device."""
  from fedkd.data import synth

  def images(seed, table, ids, idx, size):
    return jnp.zeros(idx.shape + (size, size, 1)), jnp.zeros(idx.shape + (size, size), jnp.int32)

  monkeypatch.setattr(synth, "generate", images)
  asked = []
  real = round_bench.engine_options
  monkeypatch.setattr(round_bench, "engine_options", lambda a, platform, n: asked.append(n) or real(a, platform, n))
  tiny = "--size 8 --clients 2 --steps 1 --batch 1 --width 2 --depth 1 --rounds 1 --devices 1 --scale 1,3"
  round_bench.main(tiny.split())
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"scale"' in line]
  assert [r["round_clients"] for r in rows] == [1, 3] and asked == [2, 1, 3], asked


def test_rows_are_timed_in_alternation_so_a_drifting_machine_slows_each_alike():
  """The ceiling and each round were timed one after another, so a machine slowing down during the run (clock,
  load) slowed the rows timed last. Two identical programs on a machine that slows with every call it makes:
  timed in alternation, their times agree (each turn starts one program later); one after another, the second
  took 2.7x the first."""
  import time

  order, calls = [], [0]

  def program(k):
    def run():
      order.append(k)
      calls[0] += 1
      time.sleep(0.01 * calls[0])  # the machine slows down as the run goes on
      return jnp.zeros(())

    return run

  ta, tb = round_bench._time_alternating([program(0), program(1)], 4)
  assert ta["calls"] == tb["calls"] == 4 and ta["error"] is tb["error"] is None
  assert order == [0, 1, 1, 0, 0, 1, 1, 0]  # turns starting one program later
  assert ta["sec"] == pytest.approx(tb["sec"], rel=0.15)
  assert ta["sec"] == pytest.approx(0.01 * (1 + 4 + 5 + 8) / 4, rel=0.25)  # the calls it made: 1st, 4th, 5th, 8th


def test_the_ceiling_and_the_rounds_are_timed_together(capsys, monkeypatch):
  """python -m bench compiles the centralized steps and the rounds first, then times them all in one alternation."""
  test_bench_usage._fake_generator(monkeypatch)
  seen = []
  real = round_bench._time_alternating
  monkeypatch.setattr(
    round_bench, "_time_alternating", lambda calls, reps, **kw: seen.append(len(calls)) or real(calls, reps, **kw)
  )
  tiny = "--size 8 --clients 2 --steps 1 --batch 1 --width 2 --depth 1 --rounds 2 --devices 1"
  round_bench.main(tiny.split() + ["--pairs", "vmap:xla,unroll:matmul"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["name"] for r in rows] == ["synth", "centralized", "centralized", "fed_round", "fed_round"]
  assert seen == [1, 4]  # the synth row alone; then xla and matmul ceilings with both rounds


def test_a_sigterm_while_timing_prints_the_calls_done(capsys, monkeypatch):
  """bench/gpu.sh ends a step that runs out of time with SIGTERM (and SIGKILL 10 s later); the rows are printed
  once all are timed, so the step's times were lost. The call under way finishes, the rows are printed with the
  calls each program made, exit 143; also when the signal comes in the last turn (--rounds 2)."""
  import signal

  test_bench_usage._fake_generator(monkeypatch)
  real = round_bench._time_alternating

  def terminated_in_the_last_turn(calls, reps, **kw):
    if len(calls) == 1:  # the synth row's
      return real(calls, 1, **kw)
    calls = list(calls)
    fed = calls[1]
    n = [0]

    def call():
      n[0] += 1
      if n[0] == 2:  # the round's second timed call: the first of turn 2, before the centralized step's
        os.kill(os.getpid(), signal.SIGTERM)
      return fed()

    return real([calls[0], call], reps, **kw)

  monkeypatch.setattr(round_bench, "_time_alternating", terminated_in_the_last_turn)
  tiny = "--size 8 --clients 2 --steps 1 --batch 1 --width 2 --depth 1 --rounds 2 --devices 1 --pairs vmap:xla"
  with pytest.raises(SystemExit) as e:
    round_bench.main(tiny.split())
  assert e.value.code == 143
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["name"], r.get("timed_calls")) for r in rows] == [("synth", None), ("centralized", 1), ("fed_round", None)]
  assert rows[2]["sec_per_round"] > 0 and "ratio" in rows[2]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone


def test_a_program_that_fails_while_timed_is_an_error_row_and_the_others_are_timed():
  """An exception in one program's timed call (e.g. out of memory) lost every row; now that program's row."""
  calls = [0]

  def fine():
    calls[0] += 1
    return jnp.zeros(())

  def fails():
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

  ok, bad = round_bench._time_alternating([fine, fails], 3)
  assert ok["calls"] == calls[0] == 3 and ok["error"] is None and ok["sec"] >= 0
  assert bad["calls"] == 0 and str(bad["error"]) == "RESOURCE_EXHAUSTED: out of memory"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous mmap + getrusage page faults")
def test_timing_counts_the_page_faults_of_fresh_host_memory():
  """_time's page_faults_per_round: a call that maps 8 MiB afresh and writes every page faults each one in."""
  import mmap

  pages = 2048

  def fresh_buffer():
    with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
      for i in range(pages):
        m[i * mmap.PAGESIZE] = 1

  sec, faults = round_bench._time(fresh_buffer, 3)
  assert sec > 0
  assert pages <= faults < pages + 512  # plus whatever the interpreter itself touched


def test_measure_cli_in_two_processes(tmp_path):
  """python -m bench --measure --config=...: one row per CPU candidate and the fastest one's flags;
  two processes with a coordinator time it together and run process 0's choice."""
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES",)}
  env["JAX_PLATFORMS"] = "cpu"
  tiny = (
    "--config.num_clients=4 --config.clients_per_round=4 --config.local_steps=1 --config.batch_size=1 "
    "--config.image_size=32 --config.model.width=2 --config.model.depth=1 --config.model.groups=1"
  )
  with procs.group() as popen:  # both processes SIGKILLed as a group if this fails or times out
    ps = [
      popen(
        [sys.executable, "-m", "bench", "--measure", "--rounds=1", "--config=configs/quickstart.py", *tiny.split()]
        + ["--cpu_devices=2", f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT,
        env=env,
      )
      for i in range(2)
    ]
    outs = procs.communicate_all(ps, timeout=600)
  for p, (_, err) in zip(ps, outs):
    assert p.returncode == 0, err[-3000:]
  rows = [json.loads(line) for line in outs[0][0].splitlines() if line.startswith("{")]
  assert [r["name"] for r in rows] == ["measure"] * 4 + ["measure_best"]
  assert [r["candidate"] for r in rows[:4]] == ["unroll+matmul", "unroll+xla", "vmap+gemm", "vmap+xla"]
  assert all(r["devices"] == 4 and r["processes"] == 2 and r["clients_per_device"] == 1 for r in rows[:4])
  command = "python -m bench --measure --rounds=1 --config=configs/quickstart.py " + tiny
  assert all(r["rounds"] == 1 and r["device"] == "cpu" and r["command"].startswith(command) for r in rows)
  timed = [r for r in rows[:4] if "error" not in r]
  assert timed and all(r["sec_per_round"] > 0 for r in timed)
  best = rows[4]
  assert best["candidate"] in [r["candidate"] for r in timed]
  assert best["flags"] == (
    f"--config.engine.client_layout={best['layout']} --config.engine.conv_lowering={best['lowering']}"
  )
  assert f"run with {best['flags']}" in outs[0][1]
  assert not [line for line in outs[1][0].splitlines() if line.startswith("{")]  # process 0 speaks
  assert f"process 1 runs {best['candidate']} (process 0's choice)" in outs[1][1]


@pytest.mark.parametrize(
  "args, line",
  [
    (["--config=configs/fedefm.py"], "bench: error: --measure times"),
    # fedkd's flag parser's error: it said 'fedkd: error:', unlike every other bench error
    ([], "bench: error: --config is required, e.g. --config=configs/quickstart.py"),
  ],
)
def test_measure_cli_errors_are_bench_errors(args, line):
  r = procs.run(
    [sys.executable, "-m", "bench", "--measure", *args],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=300,
  )
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(line), r.stderr
  assert "Traceback" not in r.stderr


def test_measure_refuses_a_client_chunk_its_chunked_candidates_cannot_take():
  """With client_layout='vmap' the config leaves engine.client_chunk unread (validate checks its type only), but
  --measure times chunked candidates with it: 0 ended in 'max() arg is an empty sequence' on GPU."""
  from fedkd.config import ConfigError

  c = base_config()
  c.engine.client_layout, c.engine.client_chunk = "vmap", 0
  with pytest.raises(ConfigError, match=r"config.engine.client_chunk=0 must be an integer >= 1: --measure times"):
    measure.measure_config(c)


def test_bench_is_not_installed_with_fedkd():
  """pyproject lists the installed packages explicitly; bench/ is not one of them."""
  text = open(os.path.join(ROOT, "pyproject.toml")).read()
  packages = text.split("packages = [", 1)[1].split("]", 1)[0]
  assert "fedkd" in packages and "bench" not in packages


def test_vs_torch_alternates_and_reports_the_ratio(tmp_path):
  """bench/vs_torch.py alternates the anchor's torch row and fedkd's round and reports fedkd / torch
  images/s per pair of medians; the anchor here is a stand-in that prints a known torch row."""
  anchor = tmp_path / "anchor.py"
  anchor.write_text(
    "import json, sys\n"
    "assert '--which' in sys.argv and 'torch' in sys.argv\n"
    "print(json.dumps({'name': 'torch_seq', 'images_per_s': 4.0}))\n"
  )
  tiny = ["--size", "16", "--clients", "2", "--steps", "1", "--batch", "1", "--width", "2"]
  cmd = [sys.executable, "bench/vs_torch.py", "--anchor", str(anchor), "--pairs", "2", "--rounds", "1", *tiny]
  # bench flags after '--' override vs_torch's: a 1-level UNet in place of the anchor's 4 (a third of the compile)
  extra = ["--", "--pairs", "unroll:matmul", "--depth", "1"]
  out = procs.run(cmd + ["--cache", str(tmp_path / "cache"), *extra], cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["name"] for r in rows] == ["torch_seq", "fed_round", "torch_seq", "fed_round", "vs_torch"]
  fed = sorted(r["images_per_s"] for r in rows if r["name"] == "fed_round")
  summary = rows[-1]
  assert summary["torch_images_per_s"] == 4.0
  k = rows[1]["in_flight"]  # engine.clients_in_flight 'auto': this host's cores per device
  assert summary["ratio"] == {f"unroll(k={k})+matmul@1dev": round((fed[0] + fed[1]) / 2 / 4.0, 3)}
  # fedkd's clients train as the anchor's do: SGD at 0.01 on the cross-entropy alone
  assert summary["fedkd_workload"] == {"optimizer": "sgd", "lr": 0.01, "loss": "ce"}
  bad = procs.run([sys.executable, "bench/vs_torch.py", "--anchor", str(tmp_path / "missing.py")], cwd=ROOT, timeout=60)
  assert bad.returncode != 0 and "no anchor script" in bad.stderr
