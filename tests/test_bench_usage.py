"""The bench tools' numbers against hand counts: which rounds are timed (known sleeps in known rounds), the
images a row counts, ratios, the recorded command, and bad flags as one line."""

import argparse
import json
import os
import stat
import subprocess
import sys
import time

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ is a top-level folder of the checkout, not an installed package
  sys.path.insert(0, ROOT)

import bench.__main__ as round_bench  # noqa: E402
from bench import conv as bench_conv  # noqa: E402
from bench import fedefm_stack, measure, replicas  # noqa: E402
from bench import pipeline as pipeline_bench  # noqa: E402


def _round_line(r: int, n: int, printed_s: float) -> str:
  """fedkd.tasks.fedavg / replicas' round line (its time as fedkd.logs.duration prints it)."""
  from fedkd.logs import round_line

  return round_line(r, n, "0.5000", printed_s, "(includes compilation)")


@pytest.mark.parametrize("first_s", [1.25, 0.0042])
def test_replicas_steady_rounds_are_clocked_not_read_from_the_two_decimal_line(first_s):
  """Rounds of a few milliseconds print coarsely: the steady rounds (2 .. N-1) are clocked between round
  lines; the first round's compile-inclusive seconds come from its line (in ms below 0.1 s, as a GPU round
  with a cached compile prints); the last (evaluating) round is out."""
  sleeps = [0.0, 0.004, 0.007, 0.006, 0.3]  # rounds 1..5; round 5 evaluates and saves before its line

  def run(log):
    log("round 0 (untrained): dice catheter 0.1000  guidewire 0.2000")
    for r, s in enumerate(sleeps, 1):
      time.sleep(s)
      log(_round_line(r, len(sleeps), first_s if r == 1 else 0.0))

  wall, secs = replicas._timed(run)
  assert secs[0] == pytest.approx(first_s, rel=1e-9)
  steady = secs[1:]
  assert len(steady) == 3  # rounds 2, 3, 4
  for got, slept in zip(steady, sleeps[1:4]):
    assert slept <= got < slept + 0.1, (steady, sleeps)
  assert wall >= sum(sleeps)


def test_pipeline_train_row_times_rounds_three_to_n_minus_one(monkeypatch):
  """bench/pipeline.py's train row on a real (tiny, synthetic) FedAvg run of 4 rounds: the timed rounds are
  3 .. N-1 = round 3 alone. Round 2 waits 1 s for its batches and round 3 0.3 s; the reference time of
  round 3 is clocked here, from round 2's line to round 3's."""
  from fedkd.data import pipeline
  from fedkd.tasks import fedavg

  real_data, real_run = pipeline.make_client_data, fedavg.run
  delay = {2: 1.0, 3: 0.3}
  lines = {}

  def make(config):
    data = real_data(config)
    inner = data.round_batches

    def round_batches(round_, *args, **kw):
      time.sleep(delay.get(round_, 0.0))
      return inner(round_, *args, **kw)

    data.round_batches = round_batches
    return data

  def run(config, workdir, log):
    def seen(line):
      if line.startswith("round ") and "/" in line.split()[1]:
        lines[int(line.split()[1].split("/")[0])] = time.perf_counter()
      log(line)

    return real_run(config, workdir, log=seen)

  monkeypatch.setattr(pipeline, "make_client_data", make)
  monkeypatch.setattr(fedavg, "run", run)
  a = argparse.Namespace(size=32, clients=2, steps=1, batch=2, rounds=4, data_dir=None)
  row = pipeline_bench.train_row(a, "synthetic", 0, [], "")
  assert sorted(lines) == [1, 2, 3, 4]
  assert row["sec_per_round"] == pytest.approx(lines[3] - lines[2], abs=0.01), (row, lines)
  assert 0.3 <= row["input_wait_s"] < 0.4, row
  assert row["images_per_s"] == pytest.approx(2 * 1 * 2 / row["sec_per_round"], abs=0.05)


def test_fedefm_stack_times_the_round_lines_only(monkeypatch):
  """A note logged after the last round must not shift the rounds: with warm-up 1 and 5 rounds, the timed
  round is round 4 (round 1 compiles, 2 compiles the distilling program, 3 is left out, 5 scores)."""
  from fedkd.tasks import fedefm as task

  sleeps = {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.05, 5: 1.0}

  class Experiment:
    def __init__(self, c, workdir, log):
      self.c, self.log = c, log

    def pretrain(self, method, percent, seed):
      n = self.c.pretrain.num_rounds
      for r in range(1, n + 1):
        time.sleep(sleeps[r])
        self.log(f"  100% unseen, {method}, seed 0: pretraining round {r}/{n}  loss 0.5000  1.00 rounds/s")
      self.log(f"  100% unseen, {method}, seed 0: note: some EMD solves did not converge")

  monkeypatch.setattr(task, "Experiment", Experiment)
  sec, images = fedefm_stack.seconds_per_round("fedefm", 2, 5, "runlocal")
  assert 0.05 <= sec < 0.5
  from configs.fedefm import get_config

  p = get_config("runlocal").pretrain
  assert images == 2 * p.local_steps * p.batch_size


def test_conv_ratio_when_the_ceiling_is_listed_last(capsys):
  """--formulations xla,centralized: the ceiling is timed first, so the xla row has its ratio."""
  argv = "--clients 2 --batch 1 --size 8 --cin 2 --cout 3 --reps 3 --formulations xla,centralized --passes fwd,all"
  bench_conv.main(argv.split())
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["formulation"], r["pass"]) for r in rows] == [
    ("centralized", "fwd"),
    ("xla", "fwd"),
    ("centralized", "all"),
    ("xla", "all"),
  ]
  for c, x in (rows[:2], rows[2:]):
    assert x["ratio"] == pytest.approx(c["ms"] / x["ms"], rel=1e-2, abs=1e-3)
  flop = 2 * 2 * 1 * 8**2 * 9 * 2 * 3  # clients x batch x pixels x taps x cin x cout multiply-adds
  for r in rows:
    # 4 significant digits (a CPU's 0.0003 TFLOP/s read 0.0 at 2 decimals)
    assert r["tflops"] == pytest.approx(flop * (3 if r["pass"] == "all" else 1) / (r["ms"] * 1e-3) / 1e12, rel=1e-2)
    assert r["reps"] == 3 and r["command"] == "python -m bench.conv " + argv


def test_round_rows_count_every_clients_images_and_record_the_command(capsys, monkeypatch):
  """2 clients x 3 steps x batch 2 = 12 images per round for the federated round and the ceiling alike,
  both on the same 2 devices (the ceiling data parallel), so that their ratio compares like hardware."""
  placed = {}
  real_compiled = round_bench._compiled

  def compiled(fn, *args):  # the devices holding each program's images
    x = args[1] if len(args) == 3 else args[2]["x"]
    placed["centralized" if len(args) == 3 else "fed_round"] = len(x.sharding.device_set)
    return real_compiled(fn, *args)

  monkeypatch.setattr(round_bench, "_compiled", compiled)
  _fake_generator(monkeypatch)
  argv = "--size 8 --clients 2 --steps 3 --batch 2 --width 2 --depth 1 --rounds 2 --devices 2 --pairs vmap:xla"
  round_bench.main(argv.split())
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["name"] for r in rows] == ["synth", "centralized", "fed_round"]
  assert placed == {"centralized": 2, "fed_round": 2}
  for r in rows:
    assert r["command"] == "python -m bench " + argv and r["rounds"] == 2
  for r in rows[1:]:
    assert r["images_per_s"] == pytest.approx(12 / r["sec_per_round"], rel=1e-2)
  assert rows[0]["images_per_s"] == pytest.approx(12 / rows[0]["sec_per_call"], rel=1e-2)
  assert rows[1]["devices"] == rows[2]["devices"] == 2
  assert rows[2]["ratio"] == pytest.approx(rows[1]["sec_per_round"] / rows[2]["sec_per_round"], rel=1e-2, abs=1e-3)


def _fake_generator(monkeypatch):
  from fedkd.data import synth

  def images(seed, table, ids, idx, size):  # the generator's shapes, without compiling the generator
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.uniform(kx, idx.shape + (size, size, 1)), jax.random.randint(ky, idx.shape + (size, size), 0, 3)

  monkeypatch.setattr(synth, "generate", images)


def test_a_diverged_round_is_an_error_row_not_a_time(capsys, monkeypatch):
  """SGD at learning rate 1e30 sends the loss to NaN: neither the ceiling nor the round reports a time."""
  _fake_generator(monkeypatch)
  argv = "--size 8 --clients 2 --steps 2 --batch 1 --width 2 --depth 1 --rounds 2 --devices 1 --pairs unroll:xla"
  round_bench.main(argv.split() + ["--optimizer", "sgd", "--lr", "1e30"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["name"] for r in rows] == ["synth", "centralized", "fed_round"]
  for r in rows[1:]:
    assert r["error"].startswith("FloatingPointError: the training loss is nan"), r
    assert "sec_per_round" not in r and "images_per_s" not in r and "ratio" not in r


@pytest.mark.parametrize(
  "argv, needle",
  [
    (["--width", "12"], "--width=12: the UNet's GroupNorms use 8 groups"),
    (["--model", "transunet", "--size", "16", "--depth", "1"], "--size=16: the TransUNet's patches are 16 px"),
    (["--model", "transunet", "--size", "40", "--depth", "1"], "give a multiple of 16, at least 32"),
    (["--model", "transunet", "--size", "20"], "--size=20: the TransUNet's patches are 16 px"),  # not --depth's
    (["--lr", "nan"], "--lr=nan must be a positive number"),
    (["--lr", "-1"], "--lr=-1.0 must be a positive number"),
  ],
)
def test_round_bench_bad_model_flags_are_one_line(argv, needle, capsys):
  with pytest.raises(SystemExit) as e:
    round_bench._resolve(round_bench._parser().parse_args(argv))
  assert e.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("bench: error: ") and needle in lines[0], lines


@pytest.mark.parametrize(
  "args, needle",
  [
    (["bench/replicas.py", "--seeds", "0,1", "--rounds", "2"], "replicas: error: --rounds=2: give 3 or more"),
    (["bench/pipeline.py", "--data_dir", "{tmp}", "--rounds", "3"], "pipeline: error: --rounds=3: give 4 or more"),
    (["bench/fedefm_torch.py", "--rounds", "1"], "fedefm_torch: error: --rounds=1: give 2 or more"),
    (["bench/fedefm_torch.py", "--threads", "-1"], "fedefm_torch: error: --threads=-1 must be >= 0"),
    (["bench/fedefm_grid.py", "--betas", ","], "fedefm_grid: error: --betas=',' names no value"),
    (["bench/leafrand_compile.py", "--clients", "0"], "leafrand_compile: error: --clients=0: give 1 or more"),
  ],
)
def test_bench_tool_round_counts_are_one_line(args, needle, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  args = [x.replace("{tmp}", str(tmp_path)) for x in args]
  r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(needle), r.stderr[-2000:]
  assert not r.stdout.strip()


def test_gpu_script_counts_timed_out_and_skipped_steps(tmp_path):
  """bench/gpu.sh with a stand-in python3: its first step times out (exit 124), its second takes 3 s of a
  32 s budget, so the remaining 7 round steps and the HLO report are skipped; the last line counts them."""
  fake = tmp_path / "bin" / "python3"
  fake.parent.mkdir()
  fake.write_text(
    "#!/bin/sh\n"
    'case "$*" in\n'
    '  -c*) echo "jax fake [CpuDevice(id=0)]";;\n'
    '  *"--workload A --chunk 4 --pairs vmap:wgrad,vmap:xla"*) exit 124;;\n'
    '  *"--workload B"*) sleep 3; echo \'{"name": "fed_round"}\';;\n'
    "  *) exit 0;;\n"
    "esac\n"
  )
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", OUT=str(tmp_path / "out"), PHASE1="0")
  r = subprocess.run(["bash", "bench/gpu.sh", "", "32"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  last = r.stdout.strip().splitlines()[-1]
  assert "1 JSON lines" in last and "0 step(s) failed" in last, r.stdout
  assert "1 timed out" in last and "8 skipped for the budget" in last, r.stdout


def test_measure_rules_out_a_candidate_whose_loss_is_not_finite():
  """--measure must not recommend a candidate whose round diverges, however fast it is."""
  import jax.numpy as jnp

  from fedkd.fl.engine import EngineOptions

  def build(opts):
    loss = jnp.float32("nan") if opts.layout == "vmap" else jnp.float32(0.5)
    slow = opts.layout == "unroll"

    def round_fn(x):
      if slow:
        time.sleep(0.05)
      return x, None, {"loss": loss}

    return round_fn

  options = [EngineOptions("unroll", "xla"), EngineOptions("vmap", "xla")]
  best, _, results = measure.measure(build, options, (jnp.ones(3),), reps=1)
  assert results[1]["error"].startswith("FloatingPointError: the round's loss is nan"), results
  assert "sec_per_round" not in results[1] and results[0]["sec_per_round"] >= 0.05
  assert best == options[0]


def test_measure_times_its_candidates_in_alternation_after_one_first_call_each():
  """--measure timed each candidate's calls back to back, one candidate after another: a machine slowing down
  during the measurement favoured the first candidates. Now one first call each, then turns that start one
  candidate later; a candidate that diverges in a later call is ruled out there."""
  import jax.numpy as jnp

  from fedkd.fl.engine import EngineOptions

  order = []

  def build(opts):
    calls = [0]

    def round_fn(x):
      order.append(opts.lowering)
      calls[0] += 1
      late_nan = opts.lowering == "gemm" and calls[0] == 3  # its second timed call
      return x, None, {"loss": jnp.float32("nan") if late_nan else jnp.float32(0.5)}

    return round_fn

  options = [EngineOptions("vmap", "xla"), EngineOptions("vmap", "gemm"), EngineOptions("vmap", "wgrad")]
  best, _, results = measure.measure(build, options, (jnp.ones(3),), reps=3)
  assert order == ["xla", "gemm", "wgrad"] + ["xla", "gemm", "wgrad"] + ["gemm", "wgrad", "xla"] + ["xla", "wgrad"]
  assert (
    results[1]["error"].startswith("FloatingPointError: the round's loss is nan") and "sec_per_round" not in results[1]
  )
  assert all(results[i]["sec_per_round"] >= 0 and results[i]["first_call_s"] >= 0 for i in (0, 2))
  assert best in (options[0], options[2])


@pytest.mark.parametrize(
  "argv, needle",
  [
    (["--size", "64"], "bench: error: --size does not apply to --measure"),
    (["--pairs", "vmap:xla"], "bench: error: --pairs does not apply to --measure"),
    (["--dtype", "bfloat16"], "bench: error: --dtype does not apply to --measure"),
  ],
)
def test_measure_refuses_the_round_benchmarks_flags(argv, needle, capsys):
  """--measure times the config's round: --size, --pairs, --dtype ... were ignored without a word."""
  with pytest.raises(SystemExit) as e:
    round_bench.main(["--measure", "--config=configs/quickstart.py", *argv])
  assert e.value.code == 2
  assert capsys.readouterr().err.strip() == needle + (
    ", which times the round of --config with the config's sizes, model and dtype; drop it, or set the config's "
    "key (e.g. --config.image_size=128)"
  )
