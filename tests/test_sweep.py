"""Sweeps: override helpers, names, validation, the runner (run / skip / resume / fail), aggregation,
and the TPU VM launcher's --dry_run. Training runs are tiny fedkd.main subprocesses."""

import csv
import json
import os
import re
import shutil
import sys
import textwrap

import numpy as np
import procs
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # the launch/ package lives next to fedkd/

from fedkd import sweep as S  # noqa: E402
from test_docs import assert_outputs_documented, documented_outputs  # noqa: E402
from fedkd.config import base_config  # noqa: E402
from launch import sweep as launcher  # noqa: E402

METRICS = (
  "dice/catheter",
  "dice/guidewire",
  "iou/catheter",
  "iou/guidewire",
  "unseen/dice/catheter",
  "unseen/dice/guidewire",
)


def _env():
  """The runs' environment: one CPU device each, but the suite's XLA flags (its backend optimisation
  level) and its persistent compilation cache (JAX_COMPILATION_CACHE_DIR, which wins over the sweep's
  own OUT/jax_cache): the seeds of a method, the resumed run and other tests' runs of the same tiny
  config compile nothing again."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _launch(*args, timeout=300):
  # the sweep's runs are its children: in its process group, SIGKILLed with it on timeout
  return procs.run([sys.executable, "-m", "launch.sweep", *args], cwd=ROOT, env=_env(), timeout=timeout)


def _write_config(path, sweep_src):
  path.write_text(
    textwrap.dedent("""
      from fedkd.config import base_config

      def get_config(arg=None):
        return base_config()
      """)
    + (f"\ndef get_sweep(arg=None):\n  return {sweep_src}\n" if sweep_src is not None else "")
  )
  return str(path)


# ---------------------------------------------------------------- definition helpers


def test_product_zipped_concat():
  assert S.product(seed=[0, 1], **{"model.width": [8, 16]}) == [
    {"seed": 0, "model.width": 8},
    {"seed": 0, "model.width": 16},
    {"seed": 1, "model.width": 8},
    {"seed": 1, "model.width": 16},
  ]
  methods = [{"method": "a", "server_optimizer.momentum": 0.0}, {"method": "b", "server_optimizer.momentum": 0.9}]
  assert S.product(methods, seed=[3]) == [
    {"method": "a", "server_optimizer.momentum": 0.0, "seed": 3},
    {"method": "b", "server_optimizer.momentum": 0.9, "seed": 3},
  ]
  assert S.product(S.product(seed=[0, 1]), methods) == [
    {"seed": 0, **methods[0]},
    {"seed": 0, **methods[1]},
    {"seed": 1, **methods[0]},
    {"seed": 1, **methods[1]},
  ]
  assert S.zipped(seed=[0, 1], quantity_skew=[0.0, 0.5]) == [
    {"seed": 0, "quantity_skew": 0.0},
    {"seed": 1, "quantity_skew": 0.5},
  ]
  assert S.zipped(methods, seed=[5, 6]) == [{**methods[0], "seed": 5}, {**methods[1], "seed": 6}]
  with pytest.raises(S.SweepError, match="equal lengths"):
    S.zipped(seed=[0, 1], quantity_skew=[0.0])
  with pytest.raises(S.SweepError, match="set twice"):
    S.product([{"seed": 0}], seed=[1])
  a, b = S.product(seed=[0]), [{"seed": 1}]
  assert S.concat(a, b) == a + b == [{"seed": 0}, {"seed": 1}]
  assert S.product() == [{}]


def test_run_names_are_stable_short_and_safe():
  o = {"method": "fedavgm", "server_optimizer.momentum": 0.9, "seed": 1}
  assert S.run_name(o) == "fedavgm__server_optimizer.momentum-0.9__seed-1"
  assert S.run_name(dict(reversed(list(o.items())))) == S.run_name(o)  # key order does not matter
  weird = S.run_name({"method": "a/b c", "data.source": "tfds:x/y", "seed": 0})
  assert "/" not in weird and " " not in weird and ":" not in weird
  long = S.run_name({f"k{i}": "v" * 20 for i in range(10)})
  assert len(long) <= 100 and long == S.run_name({f"k{i}": "v" * 20 for i in range(10)})
  # The quickstart sweep: the method label explains the server settings, names stay short.
  quickstart = launcher.load_config_module(os.path.join(ROOT, "configs", "quickstart.py"))
  sweep = quickstart.get_sweep("tiny")
  assert S.run_names(sweep) == ["fedavg__seed-0", "fedavgm__seed-0", "fedavg__seed-1", "fedavgm__seed-1"]
  assert S.varying_keys(sweep) == []
  fedavg_unet = launcher.load_config_module(os.path.join(ROOT, "configs", "fedavg_unet.py"))
  sweep = fedavg_unet.get_sweep("seeds=2")
  assert len(sweep) == 6 and S.varying_keys(sweep) == ["quantity_skew"]
  assert S.run_names(sweep)[1] == "fedavg__quantity_skew-0.5__seed-0"
  assert len(S.validate_sweep(sweep, fedavg_unet.get_config("runlocal"))) == 6


def test_validate_sweep_errors():
  c = base_config()
  with pytest.raises(S.SweepError, match=r"unknown config key 'sed'; did you mean 'seed'\?"):
    S.validate_sweep([{"seed": 0}, {"sed": 1}], c)
  with pytest.raises(S.SweepError, match="did you mean 'server_optimizer.momentum'"):
    S.validate_sweep([{"server_optimizer.momentun": 0.9}], c)
  with pytest.raises(S.SweepError, match="empty"):
    S.validate_sweep([], c)
  with pytest.raises(S.SweepError, match="group of keys"):
    S.validate_sweep([{"model": 3}], c)
  with pytest.raises(S.SweepError, match="num_rounds"):
    S.validate_sweep([{"num_rounds": 1.5}], c)
  with pytest.raises(S.SweepError, match="repeats run 0"):
    S.validate_sweep([{"seed": 1}, {"seed": 1}], c)
  with pytest.raises(S.SweepError, match="GroupNorm"):  # fedkd.config.validate runs on every run
    S.validate_sweep([{"model.width": 6}], c)
  with pytest.raises(S.SweepError, match="also set by --extra"):
    S.validate_sweep([{"seed": 1}], c, {"seed": 2})
  # errors name a run by its workdir name (method label + the keys that vary), not by all its overrides
  two = [{"method": m, "seed": 0, "num_rounds": 2, "eval.every": 1} for m in ("a", "b")]
  with pytest.raises(S.SweepError, match=r"^run 0 \('a__seed-0'\): config.num_rounds is swept"):
    S.validate_sweep(two, c, {"num_rounds": 4})
  configs = S.validate_sweep([{"method": "m", "seed": 3}], c, {"num_rounds": 4})
  assert configs[0].seed == 3 and configs[0].num_rounds == 4 and c.seed == 0


def test_bad_input_one_line_error_and_nothing_written(tmp_path, capsys):
  out = tmp_path / "out"
  cases = [
    (_write_config(tmp_path / "typo.py", '[{"seed": 0}, {"sed": 1}]'), "did you mean 'seed'"),
    (_write_config(tmp_path / "nosweep.py", None), "has no get_sweep"),
    (_write_config(tmp_path / "empty.py", "[]"), "sweep is empty"),
    (str(tmp_path / "missing.py"), "not found"),
  ]
  for cfg, expected in cases:
    with pytest.raises(SystemExit) as e:
      launcher.main([f"--config={cfg}", f"--out={out}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedkd: error: ") and "\n" not in err and expected in err, err
    assert not out.exists()  # checked before any run directory (or the sweep dir) is created
  # An existing sweep directory is left as it was.
  out.mkdir()
  (out / "sweep.json").write_text("old")
  with pytest.raises(SystemExit):
    launcher.main([f"--config={cases[0][0]}", f"--out={out}", "--extra=--config.num_rounds=2"])
  assert (out / "sweep.json").read_text() == "old" and os.listdir(out) == ["sweep.json"]
  capsys.readouterr()


def test_seeds_flag_one_run_per_seed_or_replaces_the_sweeps_seeds(tmp_path, capsys):
  """--seeds (what launch/seeds.sh did): alone, one run per seed of a config without get_sweep; with
  --sweep, the sweep's other overrides crossed with these seeds."""
  plain = _write_config(tmp_path / "plain.py", None)
  defn = launcher.build(plain, None, ["--config.num_rounds=3"], [2, 0])
  assert [(r["name"], r["overrides"], r["num_rounds"]) for r in defn["runs"]] == [
    ("seed-2", {"seed": 2}, 3),
    ("seed-0", {"seed": 0}, 3),
  ]
  assert defn["seeds"] == [2, 0] and defn["varying_keys"] == []
  cmd = launcher.run_command(defn, defn["runs"][0], "OUT")
  assert cmd[-3:] == [f"--workdir={os.path.join('OUT', 'seed-2')}", "--config.seed=2", "--config.num_rounds=3"]
  # With --sweep: the quickstart's tiny sweep is {fedavg, fedavgm} x seeds {0, 1}; --seeds=7 keeps the
  # two methods (each once) with seed 7, in the sweep's order.
  qs = os.path.join(ROOT, "configs", "quickstart.py")
  methods = launcher.load_config_module(qs).get_sweep("tiny")[:2]
  assert [m["method"] for m in methods] == ["fedavg", "fedavgm"] and {m["seed"] for m in methods} == {0}
  defn = launcher.build(qs, "tiny", [], [7])
  assert [r["overrides"] for r in defn["runs"]] == [dict(m, seed=7) for m in methods]
  assert [r["name"] for r in defn["runs"]] == ["fedavg__seed-7", "fedavgm__seed-7"]
  assert [r["overrides"]["seed"] for r in launcher.build(qs, "tiny", [], [3, 4])["runs"]] == [3, 3, 4, 4]
  assert launcher.parse_seeds(" 0, 5 ,1") == [0, 5, 1]
  out = tmp_path / "out"
  for bad, expected in (("0,x", "comma list of integers"), (",", "empty"), ("1,1", "distinct"), ("-1", ">= 0")):
    with pytest.raises(SystemExit) as e:
      launcher.main([f"--config={plain}", f"--seeds={bad}", f"--out={out}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("fedkd: error: --seeds") and expected in err, err
    assert not out.exists()


# ---------------------------------------------------------------- the runner on real runs


SMALL = [
  f"--extra={a}"
  for a in (
    "--config.num_rounds=2",
    "--config.num_clients=2",
    "--config.clients_per_round=2",
    "--config.image_size=32",
    "--config.local_steps=1",
    "--config.batch_size=2",
    "--config.model.width=4",
    "--config.model.depth=1",
    "--config.eval.examples_per_site=2",
    "--config.eval.every=2",
  )
]


def test_replicas_flag_runs_the_seeds_as_one_program_and_skips_them_after(tmp_path, capsys):
  """--replicas: the seeds of the quickstart share one fedkd.main process (--seeds); every run gets its
  workdir, DONE file and metrics; a second invocation skips them. (First of the real runs: SMALL has the data
  and evaluation shapes of the quickstart's tiny sweep, so the two runs the next test starts side by side load
  those programs from the persistent compilation cache instead of both compiling them at once.)"""
  out = tmp_path / "sweep"
  args = ["--config=configs/quickstart.py", "--seeds=0,1", f"--out={out}", "--replicas", *SMALL]
  r = _launch(*args)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  for n in ("seed-0", "seed-1"):
    assert f"{n}: started (new, one of 2 replicas in one program)" in r.stdout, r.stdout
    assert f"{n}: finished in" in r.stdout
    cmd = json.loads((out / n / "DONE").read_text())["command"]
    assert "--seeds=0,1" in cmd and f"--replica_workdirs={out / 'seed-0'},{out / 'seed-1'}" in cmd
    assert [json.loads(x)["round"] for x in (out / n / "metrics.jsonl").read_text().splitlines()] == [0, 2]
    assert json.loads((out / n / "config.json").read_text())["seed"] == int(n[-1])
  assert "2 replicas (seeds 0, 1) as one program" in (out / "seed-0" / "stdout.log").read_text()
  assert launcher.main(list(args)) == 0  # in this process: no run starts
  again = capsys.readouterr().out
  assert again.count("skipped (finished: round 2/2)") == 2 and "started" not in again, again
  for name in ("results.md", "results.csv", "runs.csv"):  # runs.csv was written without a word
    assert f"[sweep] wrote {out / name}" in again, again
  md = (out / "results.md").read_text()  # byte counts as whole numbers (27504.0000 ± 0.0000)
  up = json.loads((out / "seed-0" / "metrics.jsonl").read_text().splitlines()[-1])["comm/bytes_up_total"]
  assert up > 1000 and f"| {up:.0f} ± 0 |" in md and f"{up:.4f}" not in md, md


def test_tiny_quickstart_sweep_run_skip_resume_aggregate(tmp_path, capsys):
  """The quickstart's tiny sweep with one seed (its two methods, run side by side): run, skip, resume,
  aggregate. (The mean +- sample std over several seeds: test_aggregate_only_groups_and_plots_a_numeric_key.)"""
  out = tmp_path / "sweep"
  args = ["--config=configs/quickstart.py", "--sweep=tiny,seeds=1", f"--out={out}", "--parallel=2"]
  r = _launch(*args)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  names = ["fedavg__seed-0", "fedavgm__seed-0"]
  for n in names:
    assert f"{n}: started (new)" in r.stdout and f"{n}: finished in" in r.stdout, r.stdout
    assert (out / n / "DONE").exists()
  assert r.stdout.index(f"{names[1]}: started") < r.stdout.index(f"{names[0]}: finished"), r.stdout  # side by side
  cmd = json.loads((out / "fedavgm__seed-0" / "DONE").read_text())["command"]
  assert "--config.server_optimizer.momentum=0.9" in cmd and "--config.seed=0" in cmd
  assert json.loads((out / "fedavg__seed-0" / "config.json").read_text())["server_optimizer"]["momentum"] == 0.0
  assert [x["name"] for x in json.loads((out / "sweep.json").read_text())["runs"]] == names
  stamps = {n: ((out / n / "DONE").stat().st_mtime_ns, (out / n / "metrics.jsonl").stat().st_mtime_ns) for n in names}

  # Second invocation (in this process: no run starts): everything is finished, nothing runs again.
  assert launcher.main(list(args)) == 0
  again = capsys.readouterr().out
  assert again.count("skipped (finished: round 2/2)") == 2 and "started" not in again, again
  assert stamps == {
    n: ((out / n / "DONE").stat().st_mtime_ns, (out / n / "metrics.jsonl").stat().st_mtime_ns) for n in names
  }

  # The same command with another learning rate: the finished runs ran at the config's 0.003, so they are
  # not reused (nor tabulated) as results of 0.1; refused before anything is written.
  def snapshot():
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if "jax_cache" not in p.parts}

  before, sweep_json = snapshot(), (out / "sweep.json").read_text()
  for extra in ([], ["--aggregate_only"]):
    with pytest.raises(SystemExit) as e:
      launcher.main([*args, "--extra=--config.client_optimizer.learning_rate=0.1", *extra])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("fedkd: error: ") and "\n" not in err, err
    assert "run fedavg__seed-0" in err and "config.client_optimizer.learning_rate=0.003" in err, err
    assert "0.1" in err and "new --out" in err and f"delete {out / 'fedavg__seed-0'}" in err, err
    assert snapshot() == before and (out / "sweep.json").read_text() == sweep_json
  # What may differ is what fedkd.main lets change when it resumes a run: more rounds (the runs are then
  # extended), other eval / checkpoint settings. Fewer rounds than a workdir holds, or a model setting, may not.
  defn = launcher.build("configs/quickstart.py", "tiny,seeds=1", [])
  launcher.check_reuse(defn, str(out))
  for run in defn["runs"]:
    run["overrides"].update({"num_rounds": 4, "eval.every": 2, "checkpoint.every": 2})
    run["num_rounds"] = 4
  launcher.check_reuse(defn, str(out))
  # a run the sweep would skip as finished may not be scored otherwise (its table would not say so); one
  # it extends is evaluated again with the new values
  for key, value in (("eval.examples_per_site", 5), ("eval.max_sites", 1)):
    short = launcher.build("configs/quickstart.py", "tiny,seeds=1", [])
    for run in short["runs"]:
      run["overrides"][key] = value
    with pytest.raises(
      launcher.InputError, match=rf"is finished with config.{key}=\S+, but this sweep gives it {value}"
    ):
      launcher.check_reuse(short, str(out))
    defn["runs"][0]["overrides"][key] = value
  launcher.check_reuse(defn, str(out))
  defn["runs"][1]["overrides"]["model.width"] = 8
  with pytest.raises(launcher.InputError, match=r"run fedavgm__seed-0 is finished with config.model.width=4, but"):
    launcher.check_reuse(defn, str(out))
  defn = launcher.build("configs/quickstart.py", "tiny,seeds=1", [])
  for run in defn["runs"]:
    run["overrides"]["num_rounds"] = run["num_rounds"] = 1
  with pytest.raises(launcher.InputError, match=r"fedavg__seed-0 already holds round 2, beyond config.num_rounds=1"):
    launcher.check_reuse(defn, str(out))
  # a key the saved config lacks (added to the schema later) counts as its default (a key the run reads: fedprox's
  # prox_mu; a FedAvg run reads none, and a key neither config reads may differ)
  saved = json.loads((out / "fedavg__seed-0" / "config.json").read_text())
  saved["algorithm"]["name"] = "fedprox"
  current = json.loads(json.dumps(saved))
  del saved["algorithm"]["prox_mu"]
  assert current["algorithm"]["prox_mu"] == base_config().algorithm.prox_mu
  assert launcher.config_difference(saved, current) == []
  current["algorithm"]["prox_mu"] = base_config().algorithm.prox_mu + 1.0
  assert launcher.config_difference(saved, current) == [("algorithm.prox_mu", None, current["algorithm"]["prox_mu"])]
  saved["algorithm"]["name"] = current["algorithm"]["name"] = "fedavg"
  assert launcher.config_difference(saved, current) == []

  # An interrupted run (no DONE, last checkpoint gone) resumes from its latest checkpoint.
  victim = out / "fedavgm__seed-0"
  (victim / "DONE").unlink()
  shutil.rmtree(victim / "checkpoints" / "2")
  r = _launch(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "fedavgm__seed-0: started (resuming from round 1 of 2)" in r.stdout, r.stdout
  assert r.stdout.count("skipped") == 1 and r.stdout.count("started") == 1
  assert "resuming from round 1" in (victim / "stdout.log").read_text()
  assert (victim / "DONE").exists() and launcher.latest_checkpoint(str(victim)) == 2
  assert [json.loads(x)["round"] for x in (victim / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]

  # Aggregation: one row per method from the last record; one seed: the mean is that record's value and
  # the sample std is undefined (nan in the CSV, n/a in the table).
  last = {n: [json.loads(x) for x in (out / n / "metrics.jsonl").read_text().splitlines()][-1] for n in names}
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [row["method"] for row in rows] == ["fedavg", "fedavgm"]
  for row in rows:
    assert row["seeds"] == "1" and row["round"] == "2"
    for m in METRICS:
      np.testing.assert_allclose(float(row[f"{m}_mean"]), last[f"{row['method']}__seed-0"][m], rtol=1e-12, atol=1e-15)
      assert np.isnan(float(row[f"{m}_std"]))
  md = (out / "results.md").read_text().splitlines()
  assert sum(line.startswith("| fedavg") for line in md) == 2 and "ddof=1" in "\n".join(md) and "± n/a" in "\n".join(md)
  assert "2 of 2 runs finished" in "\n".join(md) and "Left out" not in "\n".join(md)
  assert [row["unfinished"] for row in rows] == ["0", "0"]
  with open(out / "runs.csv") as f:
    assert [(row["run"], row["finished"], row["round"]) for row in csv.DictReader(f)] == [
      (n, "true", "2") for n in names
    ]
  assert (out / "curves.png").stat().st_size > 0 and not list(out.glob("vs_*.png"))
  assert_outputs_documented(out, "launch.sweep", ignore=names)
  for n in names:
    assert_outputs_documented(out / n, "launch.sweep", ignore=documented_outputs("FedAvg-family"))


@pytest.mark.parametrize(
  "flag,shown",
  [
    ("--no_such_flag=1", "fedkd.main has no flag --no_such_flag; its flags: --config, "),
    ("--cpu_device=2", "fedkd.main has no flag --cpu_device; did you mean --cpu_devices?"),
    # fedkd.cli defines them for fedkd.eval and the preview; fedkd.main refuses them
    ("--out=elsewhere", "fedkd.main has no flag --out; its flags: --config, "),
    ("--frames=3", "fedkd.main has no flag --frames; its flags: --config, "),
    # the value is parsed as fedkd.main's flag would parse it (absl); values of the right type that a run refuses
    # (--cpu_devices=0, below) are the run's to refuse
    ("--cpu_devices=abc", "invalid literal for int()"),
    ("--num_processes=2.5", "invalid literal for int()"),
  ],
)
def test_an_extra_flag_fedkd_main_refuses_is_refused_before_anything_is_written(tmp_path, capsys, flag, shown):
  """Every run failed on it (exit 2 each, the sweep 1) after --out was made and filled with logs and tables."""
  cfg = _write_config(tmp_path / "two.py", '[{"seed": 0}, {"seed": 1}]')
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    launcher.main([f"--config={cfg}", f"--out={out}", f"--extra={flag}"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith(f"fedkd: error: --extra={flag}: ") and shown in err, err
  assert "\n" not in err and not out.exists()
  if "has no flag" in shown:
    assert "--out," not in err and "--frames," not in err and "--workdir" in err


def test_failed_runs_are_reported_and_do_not_stop_the_sweep(tmp_path):
  cfg = _write_config(tmp_path / "two.py", '[{"seed": 0}, {"seed": 1}]')
  out = tmp_path / "out"
  r = _launch(f"--config={cfg}", f"--out={out}", "--extra=--cpu_devices=0")  # a flag fedkd.main refuses per run
  assert r.returncode == 1
  lines = r.stdout.splitlines()
  for n in ("seed-0", "seed-1"):
    failed = [x for x in lines if f"{n}: FAILED with exit code 2" in x]
    assert failed and "fedkd: error:" in failed[0], r.stdout
    assert not (out / n / "DONE").exists()
  assert "2 of 2 run(s) failed" in r.stdout
  # each failure names a log that exists (the two seeds ran as one program, which logs into the first one's folder)
  logs = re.findall(r"\(log (\S+stderr\.log)\)", r.stdout)
  assert len(logs) == 2 and all(os.path.isfile(p) for p in logs), logs
  # neither run is in the tables; they say so and why
  md = (out / "results.md").read_text()
  assert "0 of 2 runs finished" in md and "2 failed: seed-0, seed-1" in md, md
  with open(out / "results.csv") as f:
    assert [(row["seeds"], row["unfinished"]) for row in csv.DictReader(f)] == [("0", "2")]
  with open(out / "runs.csv") as f:
    assert [(row["run"], row["finished"]) for row in csv.DictReader(f)] == [("seed-0", "false"), ("seed-1", "false")]


# ---------------------------------------------------------------- aggregation on made-up runs


def _done(workdir, num_rounds=2):
  """The DONE file launch.sweep writes after a run's successful exit."""
  (workdir / "DONE").write_text(json.dumps({"name": workdir.name, "num_rounds": num_rounds}) + "\n")


def test_aggregate_only_groups_and_plots_a_numeric_key(tmp_path, capsys):
  sweep = S.product(S.product(seed=[0, 1, 2]), [{"method": "fedavg"}], quantity_skew=[0.0, 1.0])
  defn = {
    "config": "configs/fedavg_unet.py",
    "sweep": None,
    "extra": [],
    "varying_keys": S.varying_keys(sweep),
    "runs": [{"name": n, "overrides": o, "num_rounds": 2} for n, o in zip(S.run_names(sweep), sweep)],
  }
  rng = np.random.default_rng(0)
  finals = {}
  for run in defn["runs"]:
    (tmp_path / run["name"]).mkdir()
    recs = [{"round": r, **{m: float(rng.uniform()) for m in METRICS}, "site/a/dice/catheter": 0.5} for r in (0, 1, 2)]
    finals[run["name"]] = recs[-1]
    (tmp_path / run["name"] / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    _done(tmp_path / run["name"])
  (tmp_path / "sweep.json").write_text(json.dumps(defn))
  assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["quantity_skew"], r["seeds"]) for r in rows] == [
    ("fedavg", "0.0", "3"),
    ("fedavg", "1.0", "3"),
  ]
  for row in rows:
    vals = np.array(
      [finals[f"fedavg__quantity_skew-{row['quantity_skew']}__seed-{s}"]["dice/guidewire"] for s in range(3)]
    )
    np.testing.assert_allclose(float(row["dice/guidewire_mean"]), vals.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(row["dice/guidewire_std"]), vals.std(ddof=1), rtol=1e-9)
  assert (tmp_path / "vs_quantity_skew.png").stat().st_size > 0 and (tmp_path / "curves.png").exists()
  assert (tmp_path / "curves_sites.png").stat().st_size > 0  # Dice per site vs round
  assert "site/" not in (tmp_path / "results.csv").read_text()
  assert not (tmp_path / "vs_bytes_up.png").exists()  # the records carry no bytes: no such plot
  # the same sweep without its numeric key: the vs_ plot of the key no longer swept goes with it
  defn["varying_keys"] = ["seed", "method"]
  for run in defn["runs"]:
    run["overrides"]["quantity_skew"] = "x"
  (tmp_path / "sweep.json").write_text(json.dumps(defn))
  assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  assert not (tmp_path / "vs_quantity_skew.png").exists() and (tmp_path / "curves.png").exists()
  capsys.readouterr()


def test_aggregate_leaves_out_runs_that_did_not_finish(tmp_path, capsys):
  """Only runs with a DONE file for the sweep's num_rounds are tabulated and plotted: not a run that
  diverged after logging round 1, nor one whose DONE is of an earlier, shorter sweep, nor one never
  started; the tables count them per group and the caption says which and why. runs.csv keeps every run
  with a finished column."""
  sweep = S.product(S.product(seed=[0, 1, 2]), [{"method": "a"}, {"method": "b"}])
  defn = {
    "config": "configs/quickstart.py",
    "sweep": None,
    "extra": [],
    "varying_keys": [],
    "runs": [{"name": n, "overrides": o, "num_rounds": 2} for n, o in zip(S.run_names(sweep), sweep)],
  }
  assert [r["name"] for r in defn["runs"]] == [f"{m}__seed-{s}" for s in range(3) for m in "ab"]
  dice = {"a__seed-0": 0.2, "a__seed-1": 0.4, "a__seed-2": 0.9, "b__seed-0": 0.3, "b__seed-1": 0.5, "b__seed-2": 0.7}
  for name, d in dice.items():
    (tmp_path / name).mkdir()
    last = 2 if name != "a__seed-2" else 1  # a__seed-2 diverged in round 2: round 1 logged, no DONE
    recs = [{"round": r, "dice/catheter": d * r / last} for r in range(last + 1)]
    (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    if name != "a__seed-2":
      _done(tmp_path / name, num_rounds=1 if name == "b__seed-1" else 2)  # b__seed-1: DONE of a 1-round sweep
  shutil.rmtree(tmp_path / "b__seed-2")  # never started
  (tmp_path / "sweep.json").write_text(json.dumps(defn))
  assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  out = capsys.readouterr().out
  assert "3 of 6 run(s) left out of the tables and plots" in out, out
  with open(tmp_path / "results.csv") as f:
    rows = {r["method"]: r for r in csv.DictReader(f)}
  assert (rows["a"]["seeds"], rows["a"]["unfinished"], rows["b"]["seeds"], rows["b"]["unfinished"]) == (
    "2",
    "1",
    "1",
    "2",
  )
  np.testing.assert_allclose(float(rows["a"]["dice/catheter_mean"]), 0.3, rtol=1e-12)  # mean of 0.2 and 0.4
  np.testing.assert_allclose(float(rows["a"]["dice/catheter_std"]), np.std([0.2, 0.4], ddof=1), rtol=1e-9)
  assert float(rows["b"]["dice/catheter_mean"]) == 0.3 and np.isnan(float(rows["b"]["dice/catheter_std"]))
  md = (tmp_path / "results.md").read_text()
  assert "3 of 6 runs finished" in md, md
  assert "2 without DONE (failed, stopped or still running): a__seed-2, b__seed-1" in md, md
  assert "1 not started: b__seed-2" in md, md
  with open(tmp_path / "runs.csv") as f:
    runs = [(r["run"], r["finished"], r["round"]) for r in csv.DictReader(f)]
  assert sorted(runs) == [
    ("a__seed-0", "true", "2"),
    ("a__seed-1", "true", "2"),
    ("a__seed-2", "false", "1"),
    ("b__seed-0", "true", "2"),
    ("b__seed-1", "false", "2"),
    ("b__seed-2", "false", ""),
  ]
  # The runner passes the runs that failed in this invocation: named as failed.
  launcher.aggregate(defn, str(tmp_path), failures=[("a__seed-2", 2, "fedkd: error: training diverged")])
  assert "1 failed: a__seed-2; 1 without DONE" in (tmp_path / "results.md").read_text()
  # No finished run at all: every group is a row with 0 seeds, and no curves are drawn.
  for n in ("a__seed-0", "a__seed-1", "b__seed-0"):
    (tmp_path / n / "DONE").unlink()
  # the plots of the earlier aggregation are removed, not left to show runs the tables no longer hold; a
  # file the sweep does not draw stays
  assert (tmp_path / "curves.png").exists()
  (tmp_path / "notes.png").write_text("mine")
  assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  assert (tmp_path / "notes.png").read_text() == "mine"
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [list(r.items()) for r in rows] == [
    [("method", "a"), ("seeds", "0"), ("unfinished", "3"), ("round", "")],
    [("method", "b"), ("seeds", "0"), ("unfinished", "3"), ("round", "")],
  ]  # no metric of an unfinished run
  assert "0 of 6 runs finished" in (tmp_path / "results.md").read_text()
  assert not (tmp_path / "curves.png").exists()
  capsys.readouterr()


def test_aggregate_only_without_runs_is_one_line_error(tmp_path, capsys):
  """--aggregate_only on a missing --out, one without sweep.json, a sweep.json that is not one, or a
  sweep directory without any of the sweep's runs: one line, exit 2, nothing created or changed."""
  missing, empty, broken = tmp_path / "missing", tmp_path / "empty", tmp_path / "broken"
  empty.mkdir()
  broken.mkdir()
  (broken / "sweep.json").write_text("{not json")
  cases = [
    (["--config=configs/quickstart.py", f"--out={missing}"], f"--out={missing} does not exist"),
    ([f"--out={missing}"], f"--out={missing} does not exist"),
    (["--config=configs/quickstart.py", f"--out={empty}"], f"--out={empty} holds no runs of this sweep"),
    ([f"--out={empty}"], f"{empty / 'sweep.json'} not found"),
    ([f"--out={broken}"], f"{broken / 'sweep.json'} cannot be read"),
  ]
  for args, expected in cases:
    with pytest.raises(SystemExit) as e:
      launcher.main([*args, "--aggregate_only"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("fedkd: error: ") and "\n" not in err and expected in err, err
    assert not missing.exists() and os.listdir(empty) == [] and os.listdir(broken) == ["sweep.json"]
  assert (broken / "sweep.json").read_text() == "{not json"


def test_aggregate_plots_accuracy_vs_bytes_and_vs_epsilon(tmp_path, capsys):
  """Runs that log comm/bytes_up_total and dp/epsilon get them as table columns (mean over seeds) and
  plots of Dice against them; a no-noise group (epsilon inf) is left out of the epsilon line."""
  noise = {"none": (float("inf"), 4e6), "z1": (5.0, 4e6), "z2": (1.0, 4e6), "topk": (None, 1e5)}
  sweep = S.product(S.product(seed=[0, 1]), [{"method": m} for m in noise])
  defn = {
    "config": "configs/quickstart.py",
    "sweep": None,
    "extra": [],
    "varying_keys": S.varying_keys(sweep),
    "runs": [{"name": n, "overrides": o, "num_rounds": 2} for n, o in zip(S.run_names(sweep), sweep)],
  }
  for run in defn["runs"]:
    (tmp_path / run["name"]).mkdir()
    eps, sent = noise[run["overrides"]["method"]]
    last = {"round": 2, "dice/catheter": 0.5 + 0.1 * run["overrides"]["seed"], "comm/bytes_up_total": sent}
    if eps is not None:
      last["dp/epsilon"] = eps
    (tmp_path / run["name"] / "metrics.jsonl").write_text(json.dumps(last) + "\n")
    _done(tmp_path / run["name"])
  (tmp_path / "sweep.json").write_text(json.dumps(defn))
  assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  with open(tmp_path / "results.csv") as f:
    rows = {r["method"]: r for r in csv.DictReader(f)}
  assert float(rows["topk"]["comm/bytes_up_total_mean"]) == 1e5
  assert float(rows["z2"]["dp/epsilon_mean"]) == 1.0
  assert (tmp_path / "vs_bytes_up.png").stat().st_size > 0 and (tmp_path / "vs_epsilon.png").stat().st_size > 0
  capsys.readouterr()


# ---------------------------------------------------------------- cloud / cluster recipes


def _tpu(*args):
  return procs.run(["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), *args], cwd=ROOT, timeout=60)


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
  r = _tpu(
    "--dry_run",
    "--name=fk1",
    "--zone=us-central2-b",
    "--accelerator_type=v4-16",
    "--version=tpu-ubuntu2204-base",
    "--spot",
    "--project=proj",
    "--",
    "python",
    "-m",
    "fedkd.main",
    "--config=configs/fedavg_unet.py",
    "--workdir=runs/tpu",
  )
  assert r.returncode == 0, r.stderr
  lines = [x for x in r.stdout.splitlines() if x.startswith("+ ")]
  create = [x for x in lines if "tpu-vm create" in x]
  assert len(create) == 1
  for flag in (
    "fk1",
    "--zone=us-central2-b",
    "--accelerator-type=v4-16",
    "--version=tpu-ubuntu2204-base",
    "--spot",
    "--project=proj",
  ):
    assert flag in create[0].split(), (flag, create[0])
  scp_all = [x for x in lines if "tpu-vm scp" in x and "--worker=all" in x]
  ssh_all = [x for x in lines if "tpu-vm ssh" in x and "--worker=all" in x]
  assert scp_all and len(ssh_all) == 3
  # jax[tpu] quoted for the worker's shell (jax\[tpu\]), then the whole command for the dry-run line
  assert "pip\\ install" in ssh_all[1] and "jax\\\\\\[tpu\\\\\\]" in ssh_all[1]
  assert "fedkd.main" in ssh_all[2] and "--workdir=runs/tpu" in ssh_all[2]
  fetch = [x for x in lines if "tpu-vm scp" in x and "--worker=0" in x]
  assert fetch and "fk1:fedkd/runs" in fetch[0]
  assert "tpu-vm delete fk1" in lines[-1] and "--quiet" in lines[-1]  # the EXIT trap deletes the VM
  order = [
    next(i for i, x in enumerate(lines) if k in x) for k in ("create", "pip", "fedkd.main", "--worker=0", "delete")
  ]
  assert order == sorted(order)

  r = _tpu("--dry_run", "--queued", "--keep", "--name=fk2", "--zone=z", "--", "echo", "hi")
  assert r.returncode == 0, r.stderr
  assert "queued-resources create fk2-qr --node-id=fk2 --zone=z --accelerator-type=v4-8" in r.stdout
  assert "--runtime-version=tpu-ubuntu2204-base" in r.stdout and "--spot" not in r.stdout
  assert "delete" not in r.stdout and "keeping TPU VM fk2" in r.stderr

  r = _tpu("--dry_run", "--zone=z", "--", "echo")
  assert r.returncode == 2 and "fedkd: error: --name is required" in r.stderr and "usage:" in r.stderr
  r = _tpu("--name=a", "--zone=z", "--bogus")
  assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr


def test_slurm_recipe_is_valid_bash():
  path = os.path.join(ROOT, "launch", "slurm.sbatch")
  assert procs.run(["bash", "-n", path], timeout=60).returncode == 0
  text = open(path).read()
  assert "--ntasks-per-node=1" in text and "srun" in text and "python -m fedkd.main" in text


@pytest.mark.parametrize(
  "spec,arg,runs,methods",
  [
    ("configs/zoo.py", None, 30, 15),
    ("configs/zoo.py", "tiny,seeds=1,only=fedbn+scaffold", 2, 2),
    ("configs/privacy.py", None, 8, 4),
    ("configs/robust.py", "tiny", 15, 5),
  ],
)
def test_shipped_sweeps_validate(spec, arg, runs, methods):
  """The sweep configs the docs quote build and validate (every run's config) without running."""
  defn = launcher.build(spec, arg, [])
  assert len(defn["runs"]) == runs
  assert len({r["overrides"]["method"] for r in defn["runs"]}) == methods


def test_replica_groups_fall_back_to_processes_and_say_why(tmp_path, capsys):
  """Runs that differ in more than their seed, or that a replica program cannot hold, stay one process
  each; runs equal but for their seed form one group."""
  defn = launcher.build("configs/quickstart.py", None, ["--config.aggregator.name=median"], [0, 1])
  todo = list(enumerate(defn["runs"], 1))
  units = launcher.replica_groups(defn, todo, str(tmp_path))
  assert [len(u) for u in units] == [1, 1]
  assert "one process per run (aggregator 'median' is not supported as replicas)" in capsys.readouterr().out
  defn = launcher.build("configs/quickstart.py", None, [], [0, 1, 2])
  assert [len(u) for u in launcher.replica_groups(defn, list(enumerate(defn["runs"], 1)), str(tmp_path))] == [3]
  # different progress (a group split over --parallel programs, then interrupted): a group resumes from one
  # round, so the runs at each round form their own group (seeds 0 and 2 together, not three processes)
  ck = tmp_path / "seed-1" / "checkpoints" / "1"
  ck.mkdir(parents=True)
  units = launcher.replica_groups(defn, list(enumerate(defn["runs"], 1)), str(tmp_path))
  assert [[run["name"] for _, run in u] for u in units] == [["seed-0", "seed-2"], ["seed-1"]]
  assert "one program per checkpoint round (2 at no checkpoint, 1 at round 1)" in capsys.readouterr().out
  # multi-process runs stay one process group per run
  multi = launcher.build("configs/quickstart.py", None, ["--num_processes=2"], [0, 1])
  assert [len(u) for u in launcher.replica_groups(multi, list(enumerate(multi["runs"], 1)), str(tmp_path))] == [1, 1]
  assert "one process per run (multi-process runs (--num_processes=2))" in capsys.readouterr().out
  # a sweep folder whose path holds ',' (which separates --replica_workdirs): every run its own process
  units = launcher.replica_groups(defn, list(enumerate(defn["runs"], 1)), str(tmp_path / "a,b"))
  assert [len(u) for u in units] == [1, 1, 1]
  assert "holds ',', which separates --replica_workdirs" in capsys.readouterr().out
  # a learning-rate grid x seeds is one group; the differing keys travel as per-replica lists
  defn = launcher.build("configs/quickstart.py", "lr_grid,tiny", [], [0, 1])
  (unit,) = launcher.replica_groups(defn, list(enumerate(defn["runs"], 1)), str(tmp_path / "grid"))
  cmd = launcher.replica_command(defn, [run for _, run in unit], str(tmp_path / "grid"))
  assert "--seeds=0,0,0,1,1,1" in cmd
  assert "--replica_config=client_optimizer.learning_rate=0.001,0.003,0.01,0.001,0.003,0.01" in cmd
  assert not any(a.startswith(("--config.seed", "--config.client_optimizer")) for a in cmd), cmd
  # a key that only some runs override travels with every run's own value (the config's for the others)
  runs = [{"name": "a", "overrides": {"seed": 0}}, {"name": "b", "overrides": {"seed": 0, "algorithm.prox_mu": 0.5}}]
  cmd = launcher.replica_command({"config": "configs/quickstart.py", "extra": []}, runs, str(tmp_path / "mixed"))
  assert "--replica_config=algorithm.prox_mu=0.01,0.5" in cmd and "--config.seed=0" in cmd, cmd


def test_replica_groups_span_method_labels_and_fill_the_parallel_slots(tmp_path, capsys):
  """The privacy sweep's 4 noise levels (a method label each) x 2 seeds are one group of replicas; under
  --parallel=2 / 3 it runs as 2 / 3 contiguous near-equal programs, each command carrying its own runs'
  noise and seeds; a lone run is never split."""
  defn = launcher.build("configs/privacy.py", "tiny", [], [0, 1])
  todo = list(enumerate(defn["runs"], 1))
  assert len({r["overrides"]["method"] for r in defn["runs"]}) == 4 and len(todo) == 8
  assert [len(u) for u in launcher.replica_groups(defn, todo, str(tmp_path))] == [8]
  units = launcher.replica_groups(defn, todo, str(tmp_path), parallel=2)
  assert [[i for i, _ in u] for u in units] == [[1, 2, 3, 4], [5, 6, 7, 8]]
  assert "8 replicas as 2 programs (sizes 4, 4) to keep --parallel=2 processes busy" in capsys.readouterr().out
  assert [len(u) for u in launcher.replica_groups(defn, todo, str(tmp_path), parallel=3)] == [3, 3, 2]
  assert [len(u) for u in launcher.replica_groups(defn, todo, str(tmp_path), parallel=20)] == [1] * 8
  for seed, unit in enumerate(units):
    cmd = launcher.replica_command(defn, [run for _, run in unit], str(tmp_path))
    assert "--replica_config=dp.noise_multiplier=0.0,0.7,1.0,2.0" in cmd and f"--config.seed={seed}" in cmd, cmd
    assert not any(a.startswith("--config.method") for a in cmd), cmd
  # runs that differ in more than the replica keys stay apart, and single runs are not split
  defn = launcher.build("configs/quickstart.py", None, [], [0, 1, 2])
  defn["runs"].append({**defn["runs"][0], "name": "median", "overrides": {"aggregator.name": "median", "seed": 0}})
  units = launcher.replica_groups(defn, list(enumerate(defn["runs"], 1)), str(tmp_path), parallel=3)
  assert [[i for i, _ in u] for u in units] == [[1, 2], [3], [4]]
