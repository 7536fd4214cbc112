"""launch.sweep, replicas and the FedEFM tools used as a user would: inputs the runner cannot take, what the
sweep prints when it is stopped, the messages of runs that cannot be replicas, the FedEFM grid's workdir checks."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # the launch/ package lives next to fedkd/

from launch import sweep as launcher  # noqa: E402


def test_a_fedefm_config_is_refused_with_the_way_to_run_it(tmp_path, capsys):
  """launch.sweep runs FedAvg-task configs only; a FedEFM config gets one line that says how its seeds and a
  KD-weight grid run instead (not 'config.task is not a known task'), exit 2, nothing written."""
  out = tmp_path / "out"
  for args in (["--seeds=0,1"], ["--sweep=tiny"], []):  # configs/fedefm.py has no get_sweep
    with pytest.raises(SystemExit) as e:
      launcher.main(["--config=configs/fedefm.py:tiny", f"--out={out}", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedkd: error: ") and "\n" not in err, err
    assert "experiment.seeds" in err and "--replica_config" in err and "not a known task" not in err, err
    assert not out.exists()


def test_an_interrupted_sweep_counts_the_runs_it_stopped_not_the_processes(tmp_path, capsys, monkeypatch):
  """Ctrl-C / SIGTERM while one program trains 3 replicas: 'interrupted; 3 run(s) stopped', and the process
  is ended (here a stand-in that sleeps; the real runs save their round and resume, tests/test_sweep.py)."""
  defn = launcher.build("configs/quickstart.py", "lr_grid,tiny", [], [0])  # 3 learning rates: one group
  out = str(tmp_path / "out")
  started = []

  def sleeper(defn, runs, out, configs=None):
    started.append([r["name"] for r in runs])
    return [sys.executable, "-c", "import time; time.sleep(60)"]

  real_sleep, calls = launcher.time.sleep, []

  def interrupt(seconds):  # the runner's first wait is interrupted, later ones (subprocess's) are real
    calls.append(seconds)
    if len(calls) == 1:
      raise KeyboardInterrupt
    real_sleep(seconds)

  monkeypatch.setattr(launcher, "unit_command", sleeper)
  monkeypatch.setattr(launcher.time, "sleep", interrupt)
  with pytest.raises(KeyboardInterrupt):
    launcher.run_all(defn, out, 1, dict(os.environ), replicas=True)
  assert started == [[r["name"] for r in defn["runs"]]]  # one process for the 3 runs
  lines = capsys.readouterr().out.splitlines()
  assert lines[-1] == "[sweep] interrupted; 3 run(s) stopped. Re-run the same command to resume them.", lines


def test_why_a_stateful_algorithm_is_not_a_replica_reads_as_a_sentence():
  from fedkd.tasks import replicas

  defn = launcher.build(
    "configs/quickstart.py", "tiny", ["--config.algorithm.name=scaffold", "--config.client_optimizer.name=sgd"], [0, 1]
  )
  configs = launcher._run_configs(defn, [r for r in defn["runs"] if r["overrides"]["method"] == "fedavg"])
  assert replicas.why_not(configs) == "algorithm 'scaffold' (it keeps per-client state) is not supported as replicas"


@pytest.mark.parametrize(
  "flag", ["--seeds=0,1", "--replica_config=client_optimizer.learning_rate=0.1,0.2", "--replica_workdirs=a,b"]
)
def test_replica_flags_in_extra_are_refused_before_anything_runs(flag):
  """--extra=--seeds=0,1 made every run train its seeds into sub-folders of its workdir (OUT/<run>/seed-0, ...)
  and then fail with 'exited 0 but the latest checkpoint is round None' after the whole training."""
  with pytest.raises(launcher.InputError, match="launch.sweep's own --seeds"):
    launcher.build("configs/quickstart.py", "tiny", [flag])


def test_a_run_workdir_as_out_is_refused_and_its_tables_kept(tmp_path, capsys):
  """--out pointing at a fedkd.main workdir (here a FedEFM experiment's: results.md, results.csv,
  results_raw.jsonl) replaced its results.md / results.csv with an empty sweep table."""
  work = tmp_path / "fedefm_seg"
  (work / "fedavg__seed-0").mkdir(parents=True)  # a folder named like a run of the sweep
  files = {"config.json": '{"task": "fedefm"}', "results_raw.jsonl": "{}\n", "results.md": "# FedEFM\n"}
  files["results.csv"] = "method,seeds\nfedavg,5\n"
  for name, text in files.items():
    (work / name).write_text(text)
  for extra in (["--aggregate_only"], []):  # (the old code ran the sweep into it)
    with pytest.raises(SystemExit) as e:
      launcher.main(["--config=configs/quickstart.py", "--sweep=tiny", f"--out={work}", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedkd: error: ") and "\n" not in err and "workdir of a fedkd.main run" in err, err
    assert {n: (work / n).read_text() for n in files} == files
    assert sorted(os.listdir(work)) == sorted([*files, "fedavg__seed-0"])  # no sweep.json, no tables


def _fedefm_tiny(**over):
  from fedkd.config import find_config_file
  import importlib.util

  spec = importlib.util.spec_from_file_location("fedefm_cfg_usage", find_config_file("configs/fedefm.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  c.experiment.methods, c.experiment.kd_methods = "scratch", ""
  from fedkd.sweep import apply_overrides

  return apply_overrides(c, over)


def test_a_kd_weight_grid_checks_every_workdir_before_the_first_experiment_trains(tmp_path):
  """fedkd.main --replica_config=fedefm.beta=0.3,0.5 into workdirs of which the second holds results of
  another config: refused before anything trains (it was refused only after the first experiment had run
  to the end, which at the GPU size is hours)."""
  from fedkd.config import ConfigError
  from fedkd.tasks import fedefm

  first, second = str(tmp_path / "fedefm.beta-0.3"), tmp_path / "fedefm.beta-0.5"
  second.mkdir()
  other = _fedefm_tiny(**{"fedefm.beta": 0.5, "pretrain.num_rounds": 3})
  held = {
    "config.json": other.to_json(indent=2),
    "results_raw.jsonl": '{"unseen_percent": 100.0, "method": "scratch", "teacher_kd": false, "seed": 0}\n',
  }
  for name, text in held.items():
    (second / name).write_text(text)
  configs = [_fedefm_tiny(**{"fedefm.beta": b}) for b in (0.3, 0.5)]
  with pytest.raises(ConfigError, match=r"holds results of another config \(config.pretrain.num_rounds differs\)"):
    fedefm.run_replicas(configs, [first, str(second)], log=lambda _: None)
  assert not os.path.exists(first)  # nothing trained, nothing written
  assert {n: (second / n).read_text() for n in held} == held


def test_a_failed_runs_error_line_is_reported_whole(tmp_path):
  """A diverged run's one-line error (about 330 characters, naming the round, the likely cause and the flag
  that helps) was cut at 300 characters, mid-word ('... to drop such clie'); a longer one is cut visibly."""
  err = tmp_path / "stderr.log"
  line = (
    "fedkd: error: training diverged in round 1: loss nan, non-finite updates from client(s) [0, 1] of 2; likely "
    "cause: a learning rate too large (config.client_optimizer.learning_rate=1e+30, server_optimizer.learning_rate=1)"
    ": lower it, or set --config.engine.skip_nonfinite_clients=True to drop such clients"
  )
  err.write_text("old run\n" + "E1202 a note\n" + line + "\n\n")
  assert launcher._last_line(str(err), 0) == line
  err.write_text("x" * 5000 + "\n")
  cut = launcher._last_line(str(err), 0)
  assert cut.endswith(" [...]") and cut.startswith("x" * 100) and len(cut) < 1000


def test_a_mistyped_metric_is_refused_and_the_plots_are_kept(tmp_path, capsys):
  """--aggregate_only --metric=dice/cathter drew no vs_<key>.png / curves_sites.png and removed the ones there."""
  out = tmp_path / "lr"
  defn = launcher.build("configs/quickstart.py", "lr_grid,tiny", [], [0])
  (out / defn["runs"][0]["name"]).mkdir(parents=True)
  (out / "sweep.json").write_text(json.dumps(defn))
  plots = {"vs_client_optimizer.learning_rate.png": "png 1", "curves_sites.png": "png 2"}
  for name, text in plots.items():
    (out / name).write_text(text)
  before = sorted(os.listdir(out))
  with pytest.raises(SystemExit) as e:
    launcher.main([f"--out={out}", "--aggregate_only", "--metric=dice/cathter"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("fedkd: error: --metric='dice/cathter'") and "dice/catheter" in err and "\n" not in err, err
  assert sorted(os.listdir(out)) == before and {n: (out / n).read_text() for n in plots} == plots
  assert "unseen/dice/guidewire" in launcher.metric_choices()
  # dice/vessel is a class name, but the quickstart's 3-class models (background, catheter, guidewire) never
  # log it: refused by the sweep's own models' classes, the plots kept
  with pytest.raises(SystemExit) as e:
    launcher.main([f"--out={out}", "--aggregate_only", "--metric=dice/vessel"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "--metric='dice/vessel' is not logged by this sweep's runs" in err and "dice/guidewire" in err, err
  assert "dice/vessel" not in err.split("use one of")[1], err
  assert sorted(os.listdir(out)) == before and {n: (out / n).read_text() for n in plots} == plots
