"""launch.sweep / fedkd.sweep as a user meets them: runs that are the same run written two ways, an --out that is
a folder of one's own tables and figures, and an interrupt that arrives while a run's process starts."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # the launch/ package lives next to fedkd/

from fedkd import sweep as S  # noqa: E402
from fedkd.config import base_config  # noqa: E402
from fedkd.logs import read_jsonl  # noqa: E402
from launch import sweep as launcher  # noqa: E402


@pytest.mark.parametrize(
  "sweep,first,second",
  [
    ([{"seed": 0}, {}], "seed-0", "base"),  # the default seed written out, and left out
    ([{"quantity_skew": 1}, {"quantity_skew": 1.0}], "quantity_skew-1", "quantity_skew-1.0"),  # int for a float key
    (
      [{"method": "fedavg", "seed": 1}, {"method": "fedavg", "seed": 1, "server_optimizer.momentum": 0.0}],
      "fedavg__seed-1",
      "fedavg__server_optimizer.momentum-0.0__seed-1",
    ),
  ],
)
def test_overrides_that_give_the_same_config_are_a_repeated_run(sweep, first, second):
  """{} and {"seed": 0} trained the same run twice and tabulated it as 2 seeds of one group (std 0 over
  identical numbers); 1 and 1.0 made two rows (and two points at x=1) of one setting."""
  c = base_config()
  assert c.seed == 0 and c.server_optimizer.momentum == 0.0  # the values written out are the defaults
  a, b = (S.apply_overrides(c, o).to_dict() for o in sweep)
  assert a == b  # the same run
  assert S.run_names(sweep) == [first, second]  # which the names hide
  with pytest.raises(S.SweepError, match=rf"^run 1 \('{second}'\) repeats run 0 \({first}\): .* same config"):
    S.validate_sweep(sweep, c)


def test_a_different_method_label_or_seed_is_not_a_repeated_run():
  c = base_config()
  sweep = [
    {"method": "fedavg"},
    {"method": "fedavgm", "server_optimizer.momentum": 0.0},
    {"method": "fedavg", "seed": 1},
  ]
  assert [x.seed for x in S.validate_sweep(sweep, c)] == [0, 0, 1]


def _config(path):
  path.write_text(
    textwrap.dedent("""
      from fedkd.config import base_config

      def get_config(arg=None):
        return base_config()

      def get_sweep(arg=None):
        return [{"seed": 0}]
      """)
  )
  return str(path)


def test_an_out_folder_of_ones_own_tables_and_figures_is_refused_and_kept(tmp_path, capsys):
  """--out=<a folder with one's own results.md, runs.csv, curves.png, vs_lr.png>: the sweep replaced the tables
  and removed the plots it did not draw (vs_lr.png) after its runs; now one line, exit 2, nothing written."""
  out = tmp_path / "figures"
  out.mkdir()
  mine = {"results.md": "# my table\n", "runs.csv": "a,b\n1,2\n", "curves.png": "png", "vs_lr.png": "png"}
  for name, text in mine.items():
    (out / name).write_text(text)
  cfg = _config(tmp_path / "cfg.py")
  for args in ([], ["--aggregate_only"]):
    with pytest.raises(SystemExit) as e:
      launcher.main([f"--config={cfg}", f"--out={out}", "--extra=--cpu_devices=0", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("fedkd: error: ") and "\n" not in err, err
    assert "not a sweep directory (no sweep.json)" in err and "curves.png" in err and "directory of its own" in err
    assert sorted(os.listdir(out)) == sorted(mine) and all((out / n).read_text() == t for n, t in mine.items())


def test_a_sweep_directory_and_a_folder_of_other_files_are_still_taken(tmp_path):
  """What the refusal leaves alone: a sweep's own directory (sweep.json: its tables are rewritten) and a folder
  that holds none of the sweep's output names."""
  sweep_dir, other = tmp_path / "sweep", tmp_path / "other"
  sweep_dir.mkdir()
  other.mkdir()
  (sweep_dir / "sweep.json").write_text("{}")
  (sweep_dir / "results.md").write_text("old table")
  (other / "notes.md").write_text("mine")
  (other / "results.txt").write_text("mine")
  launcher._check_not_foreign(str(sweep_dir))
  launcher._check_not_foreign(str(other))


def test_an_interrupt_while_a_run_starts_stops_that_run_too(tmp_path, monkeypatch):
  """SIGTERM (or Ctrl-C) that reached the sweep just after it started a run's process, before it held the
  process's handle, stopped the sweep and left that process training alone (it then held the run's workdir
  lock, so the re-run failed that run). Now the interrupt waits until the process is held and stops it."""
  defn = launcher.build(_config(tmp_path / "cfg.py"), None, [])
  started = []
  real_popen = launcher.subprocess.Popen

  def popen(*args, **kwargs):  # the signal comes the moment the child exists
    p = real_popen(*args, **kwargs)
    started.append(p)
    os.kill(os.getpid(), signal.SIGTERM)
    return p

  monkeypatch.setattr(launcher, "unit_command", lambda *a, **k: [sys.executable, "-c", "import time; time.sleep(60)"])
  monkeypatch.setattr(launcher.subprocess, "Popen", popen)
  old = signal.signal(signal.SIGTERM, launcher._interrupt)  # as launcher.main installs it
  t0 = time.time()
  try:
    with pytest.raises(KeyboardInterrupt):
      launcher.run_all(defn, str(tmp_path / "out"), 1, dict(os.environ))
    assert len(started) == 1
    try:
      rc = started[0].wait(timeout=5)
    except subprocess.TimeoutExpired:
      rc = None
    assert rc == -signal.SIGTERM, f"the run's process was left running (exit status {rc})"
    assert time.time() - t0 < 30
  finally:
    signal.signal(signal.SIGTERM, old)
    for p in started:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_sigterm_to_the_sweep_leaves_ctrl_c_and_sigterm_as_they_were(tmp_path, monkeypatch):
  """launch.main installs its SIGTERM / Ctrl-C handlers for the runs only: a caller's own handlers are back after."""
  monkeypatch.setattr(launcher, "run_all", lambda *a, **k: [])
  monkeypatch.setattr(launcher, "aggregate", lambda *a, **k: [])

  def mine(signum, frame):
    pass

  old = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    assert launcher.main([f"--config={_config(tmp_path / 'cfg.py')}", f"--out={tmp_path / 'out'}"]) == 0
    assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
  finally:
    for s, h in old.items():
      signal.signal(s, h)


@pytest.mark.parametrize("out", ["", "/dev/null/sweep"])
def test_an_empty_or_uncreatable_out_is_one_line(tmp_path, capsys, out):
  """--out=$OUT with OUT unset (--out=) and an --out under a file ended in a FileNotFoundError /
  NotADirectoryError traceback from os.makedirs."""
  with pytest.raises(SystemExit) as e:
    launcher.main([f"--config={_config(tmp_path / 'cfg.py')}", f"--out={out}"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("fedkd: error: --out=") and "\n" not in err, err
  assert ("is empty" in err) if not out else ("cannot be created (Not a directory)" in err), err


@pytest.mark.parametrize(
  "env, needle",
  [
    ({"FEDKD_MULTIHOST": "1"}, "FEDKD_MULTIHOST=1, so this is one process of several"),
    ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS=4, so this is one process of several"),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "TPU_WORKER_HOSTNAMES lists 2 hosts"),
    ({"FEDKD_MULTIHOST": "yes"}, "FEDKD_MULTIHOST='yes' must be 1"),
  ],
)
def test_a_sweep_started_as_one_process_of_several_is_one_line(tmp_path, monkeypatch, capsys, env, needle):
  """launch/tpu_vm.sh on a slice of several workers (FEDKD_MULTIHOST=1), or srun with several tasks: every
  process ran the whole sweep into the same --out, and every run of it tried to join all of them."""
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(SystemExit) as e:
    launcher.main([f"--config={_config(tmp_path / 'cfg.py')}", f"--out={tmp_path / 'out'}"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("fedkd: error: " + needle) and "\n" not in err, err
  assert not (tmp_path / "out").exists()


def test_an_unreadable_sweep_json_is_replaced_not_a_traceback(tmp_path, monkeypatch, capsys):
  """A sweep directory whose sweep.json is cut short (disk full, an editor) made the re-run end in a
  JSONDecodeError traceback; it is a definition to replace like another sweep's."""
  ran = []
  monkeypatch.setattr(launcher, "run_all", lambda defn, out, *a, **k: ran.append(defn["runs"]) or [])
  monkeypatch.setattr(launcher, "aggregate", lambda *a, **k: [])
  out = tmp_path / "out"
  out.mkdir()
  (out / "sweep.json").write_text('{"config": "cfg.py", "runs": [')
  assert launcher.main([f"--config={_config(tmp_path / 'cfg.py')}", f"--out={out}"]) == 0
  assert "described another sweep; replacing it" in capsys.readouterr().out
  assert [r["name"] for r in launcher._read_definition(str(out))["runs"]] == ["seed-0"] == [r["name"] for r in ran[0]]


def _finished_sweep(tmp_path, sweep_expr: str, seed: int):
  """A sweep of ``get_sweep() = sweep_expr`` over base_config whose runs all finished (a metrics.jsonl of rounds 0
  and 2 with random dice/catheter, a DONE), aggregated with --aggregate_only; returns the definition's runs with
  each one's final dice/catheter, and the rows of results.csv."""
  import csv
  import json

  import numpy as np

  cfg = tmp_path / "cfg.py"
  cfg.write_text(
    textwrap.dedent(f"""
      from fedkd.config import base_config
      from fedkd.sweep import product

      def get_config(arg=None):
        return base_config()

      def get_sweep(arg=None):
        return {sweep_expr}
      """)
  )
  out = tmp_path / "out"
  defn = launcher.build(str(cfg), None, [])
  out.mkdir()
  rng = np.random.default_rng(seed)
  final = []
  for run in defn["runs"]:
    wd = out / run["name"]
    wd.mkdir()
    recs = [{"round": r, "dice/catheter": float(rng.uniform()), "dice/guidewire": 0.5} for r in (0, 2)]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    (wd / "DONE").write_text(json.dumps({"name": run["name"], "num_rounds": 2}))
    run["num_rounds"] = 2
    final.append((run["overrides"], recs[-1]["dice/catheter"]))
  (out / "sweep.json").write_text(json.dumps(defn))
  assert launcher.main([f"--out={out}", "--aggregate_only"]) == 0
  with open(out / "results.csv") as f:
    return final, list(csv.DictReader(f))


def test_a_setting_written_1_in_one_run_and_1_0_in_another_is_one_group(tmp_path, capsys):
  """Seeds added later as product(seed=[2], quantity_skew=[0, 1]) next to seeds 0, 1 at [0.0, 1.0]: the table
  had 4 rows (quantity_skew 0.0 and 1.0 with 2 seeds, 0 and 1 with 1 seed and std n/a) for 2 settings."""
  import numpy as np

  runs, rows = _finished_sweep(
    tmp_path, "product(seed=[0, 1], quantity_skew=[0.0, 1.0]) + product(seed=[2], quantity_skew=[0, 1])", 1
  )
  final = {(float(o["quantity_skew"]), o["seed"]): v for o, v in runs}
  assert [(float(r["quantity_skew"]), r["seeds"]) for r in rows] == [(0.0, "3"), (1.0, "3")]
  for row in rows:
    vals = np.array([final[(float(row["quantity_skew"]), s)] for s in (0, 1, 2)])
    np.testing.assert_allclose(float(row["dice/catheter_mean"]), vals.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(row["dice/catheter_std"]), vals.std(ddof=1), rtol=1e-9)


def test_a_run_that_writes_a_default_explicitly_is_in_the_group_of_those_that_leave_it_out(tmp_path, capsys):
  """Seed 2 added as {"seed": 2, "quantity_skew": 0.0} beside seeds 0, 1 that leave the key at its default 0.0:
  the same setting, yet results.csv had two rows (seeds 0, 1 and seed 2 alone, std n/a). Grouped by their full
  configs, one row of 3 seeds; its mean and std against numpy."""
  import numpy as np

  runs, rows = _finished_sweep(tmp_path, 'product(seed=[0, 1]) + [{"seed": 2, "quantity_skew": 0.0}]', 2)
  final = [v for _, v in runs]
  (row,) = rows
  assert row["seeds"] == "3"
  np.testing.assert_allclose(float(row["dice/catheter_mean"]), np.mean(final), rtol=1e-12)
  np.testing.assert_allclose(float(row["dice/catheter_std"]), np.std(final, ddof=1), rtol=1e-9)


def _dp_config(path, targets):
  path.write_text(
    textwrap.dedent(f"""
      from fedkd.config import base_config
      from fedkd.sweep import TINY, product

      def get_config(arg=None):
        c = base_config()
        c.dp.enabled = True
        c.dp.noise_multiplier = 1.0
        return c

      def get_sweep(arg=None):
        return product([TINY], **{{"dp.target_epsilon": {targets!r}}})
      """)
  )
  return str(path)


def test_a_run_its_privacy_budget_stops_is_finished_not_failed(tmp_path, monkeypatch, capsys):
  """A dp.target_epsilon sweep: fedkd.main stops a run after the last round its budget allows and exits 0;
  the sweep called that 'FAILED with exit code 1: exited 0 but the latest checkpoint is round 1, not 2', left
  it out of the tables, exited 1 and trained it again on every re-run."""
  from fedkd.fl import dp

  defn = launcher.build(_dp_config(tmp_path / "dp.py", [12.0, 20.0]), None, [])
  eps = [dp.epsilon(1.0, 2, 2, r, base_config().dp.delta) for r in (1, 2)]  # TINY: 2 of 2 clients, 2 rounds
  assert eps[0] <= 12.0 < eps[1] <= 20.0  # the budget of 12 allows round 1 only, that of 20 both

  def trainer(defn, runs, out, configs=None):  # what fedkd.main leaves: checkpoints and evaluations to its last round
    wd = os.path.join(out, runs[0]["name"])
    last = 1 if "12.0" in runs[0]["name"] else 2
    script = (
      f"import json, os; os.makedirs({os.path.join(wd, 'checkpoints', str(last))!r}); "
      f"open({os.path.join(wd, 'metrics.jsonl')!r}, 'w').write(''.join(json.dumps({{'round': r, "
      f"'dice/catheter': 0.1 * r}}) + '\\n' for r in range({last} + 1)))"
    )
    return [sys.executable, "-c", script]

  monkeypatch.setattr(launcher, "unit_command", trainer)
  out = str(tmp_path / "out")
  assert launcher.run_all(defn, out, 2, dict(os.environ)) == []
  said = capsys.readouterr().out
  assert [(r["num_rounds"], launcher.last_round(r)) for r in defn["runs"]] == [(2, 1), (2, 2)]
  assert "dp.target_epsilon-12.0: finished in" in said and "(round 1/2 (dp.target_epsilon's budget))" in said, said
  assert [g["runs"][0]["last"]["round"] for g in launcher.collect(defn, out)] == [1, 2]  # both tabulated
  assert launcher.run_all(defn, out, 2, dict(os.environ)) == []  # and skipped when run again
  assert capsys.readouterr().out.count("skipped (finished: round") == 2
  # a budget lowered below what a workdir holds: refused, not tabulated under a budget it overspent
  lower = launcher.build(_dp_config(tmp_path / "dp.py", [11.0, 20.0]), None, [])
  lower["runs"][0]["name"] = defn["runs"][1]["name"]  # holds round 2; 11 allows round 1
  with pytest.raises(launcher.InputError, match=r"holds round 2, beyond round 1, the last that its config.dp"):
    launcher.check_reuse({**lower, "runs": lower["runs"][:1]}, out)


def test_a_privacy_budget_that_allows_no_round_is_refused_before_any_run(tmp_path):
  """target_epsilon below one round's epsilon: every such run failed at its start, after the others had run."""
  with pytest.raises(launcher.InputError, match=r"^run 0 \(dp.target_epsilon-5.0\): config.dp.target_epsilon=5 allows"):
    launcher.build(_dp_config(tmp_path / "dp.py", [5.0, 20.0]), None, [])


def test_a_second_interrupt_stops_runs_that_are_still_saving(tmp_path, monkeypatch, capsys):
  """Ctrl-C, then Ctrl-C again while the sweep waits (up to 30 s) for its runs to save and exit: the second
  one ended the sweep with the runs left running; now it kills them (they resume from their last checkpoint)."""
  defn = launcher.build(_config(tmp_path / "cfg.py"), None, [])
  started = []
  real_popen, real_sleep = launcher.subprocess.Popen, launcher.time.sleep

  def popen(*args, **kwargs):
    started.append(real_popen(*args, **kwargs))
    return started[-1]

  ready = tmp_path / "ready"

  def first_interrupt(seconds):  # the runner's first wait: Ctrl-C; the second one comes 1 s into its 30 s wait
    while not ready.exists() and started[0].poll() is None:  # the stand-in has set its SIGTERM aside
      real_sleep(0.05)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    raise KeyboardInterrupt

  slow = (  # a run that takes long to save its round
    f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); open({str(ready)!r}, 'w').close(); "
    "time.sleep(60)"
  )
  monkeypatch.setattr(launcher, "unit_command", lambda *a, **k: [sys.executable, "-c", slow])
  monkeypatch.setattr(launcher.subprocess, "Popen", popen)
  monkeypatch.setattr(launcher.time, "sleep", first_interrupt)
  old = signal.signal(signal.SIGALRM, launcher._interrupt)
  t0 = time.time()
  try:
    with pytest.raises(KeyboardInterrupt):
      launcher.run_all(defn, str(tmp_path / "out"), 1, dict(os.environ))
    assert started[0].poll() == -signal.SIGKILL, "the run was left running"
    assert time.time() - t0 < 20
    assert "interrupted; 1 run(s) stopped" in capsys.readouterr().out
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)
    for p in started:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_a_folder_where_sweep_json_goes_is_one_line_and_kept(tmp_path, capsys, monkeypatch):
  """A folder named sweep.json in --out ended in an IsADirectoryError traceback from the rename."""
  monkeypatch.setattr(launcher, "run_all", lambda *a, **k: pytest.fail("no run may start"))
  out = tmp_path / "out"
  (out / "sweep.json").mkdir(parents=True)
  (out / "sweep.json" / "keep.txt").write_text("mine")
  with pytest.raises(SystemExit) as e:
    launcher.main([f"--config={_config(tmp_path / 'cfg.py')}", f"--out={out}"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and "sweep.json cannot be written" in err and "\n" not in err, err
  assert (out / "sweep.json" / "keep.txt").read_text() == "mine"
  assert sorted(os.listdir(out)) == ["sweep.json"]  # no temporary left behind


def test_a_group_whose_score_is_nan_is_left_out_of_every_plot(tmp_path, monkeypatch):
  """As docs/outputs.md says: a group with a NaN (or missing) score in a finished run's last evaluation is marked
  in the table and left out of the plots; curves.png drew it in every panel."""
  from fedkd import report

  def run(name, seed, dice):
    records = [{"round": 0, "dice/catheter": 0.1, "dice/guidewire": 0.1}]
    records.append({"round": 2, "dice/catheter": dice, "dice/guidewire": 0.5, "site/a/dice/catheter": 0.4})
    return {"name": name, "seed": seed, "records": records, "last": records[-1], "finished": True}

  groups = []
  for lr, dices in ((0.1, (0.6, 0.7)), (0.2, (0.5, float("nan"))), (0.3, (0.4, 0.45))):
    runs = [run(f"lr-{lr}__seed-{s}", s, d) for s, d in enumerate(dices)]
    groups.append({"label": f"lr={lr}", "overrides": {"client_optimizer.learning_rate": lr}, "runs": runs})
    groups[-1]["members"] = runs
  drawn = {}

  def curves(groups, metrics, path, **kw):
    drawn[os.path.basename(path)] = [label for label, _ in groups]
    return True

  def errorbar(lines, key, ylabel, path):
    drawn[os.path.basename(path)] = sorted(x for pts in lines.values() for x, _ in pts)

  monkeypatch.setattr(report, "curves_plot", curves)
  monkeypatch.setattr(report, "errorbar_plot", errorbar)
  defn = {"varying_keys": ["client_optimizer.learning_rate"]}
  launcher.write_plots(defn, str(tmp_path), groups, "dice/catheter")
  assert drawn == {
    "curves.png": ["lr=0.1", "lr=0.3"],
    "curves_sites.png": ["lr=0.1", "lr=0.3"],
    "vs_client_optimizer.learning_rate.png": [0.1, 0.3],
  }


def test_the_sweep_reads_metrics_jsonl_as_fedkd_main_does(tmp_path):
  """Every line that did not parse was skipped anywhere in the file ('fedkd.main drops them when it resumes'),
  so a run whose damaged middle line fedkd.main refuses was tabulated; now only a cut last line is left out."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"round": 0, "dice/catheter": 0.1}\n\n{"round": 2, "dice/catheter": 0.5}\n{"round": 4, "di')
  assert [r["round"] for r in launcher.read_metrics(str(tmp_path))] == [0, 2]
  path.write_text('{"round": 0}\n{"round": 2, \n{"round": 4}\n')
  with pytest.raises(launcher.InputError, match=r"metrics.jsonl:2 is not JSON; repair or delete that line"):
    launcher.read_metrics(str(tmp_path))
  with pytest.raises(Exception, match=r"metrics.jsonl:2 is not a JSON record"):  # what a resume says of it
    read_jsonl(path)
