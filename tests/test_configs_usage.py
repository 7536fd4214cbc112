"""The shipped experiment configs and the tables launch.sweep makes of their runs, used as a user would: what
each config and variant sets against what its docstring says, and results.md / results.csv / runs.csv of
hand-made sweep folders (NaN, missing metrics, groups of unequal size, dotted keys, long labels, broken files)
against numpy."""

import csv
import json
import math
import os
import re
import sys
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # the launch/ package lives next to fedkd/

from fedkd import report  # noqa: E402
from fedkd import sweep as S  # noqa: E402
from launch import sweep as launcher  # noqa: E402


def _sweep_dir(path, sweep, lasts, config="configs/quickstart.py"):
  """A sweep folder as launch.sweep leaves it: sweep.json, and per run a metrics.jsonl (a round-1 record,
  then ``lasts[i]`` as round 2) and a DONE file. Returns the run names."""
  names = S.run_names(sweep)
  defn = {
    "config": config,
    "sweep": None,
    "extra": [],
    "varying_keys": S.varying_keys(sweep),
    "runs": [{"name": n, "overrides": o, "num_rounds": 2} for n, o in zip(names, sweep)],
  }
  path.mkdir(exist_ok=True)
  for name, last in zip(names, lasts):
    (path / name).mkdir()
    recs = [{"round": 1, "dice/catheter": 0.01, "dice/guidewire": 0.01}, {"round": 2, **last}]
    (path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (path / name / "DONE").write_text(json.dumps({"name": name, "num_rounds": 2}) + "\n")
  (path / "sweep.json").write_text(json.dumps(defn))
  return names


def _rows(path, name="results.csv"):
  with open(path / name) as f:
    return list(csv.DictReader(f))


def test_nan_or_missing_metrics_are_marked_in_the_table_not_averaged(tmp_path, capsys):
  """A run whose last evaluation holds NaN (json NaN), null or lacks a metric its group's other runs hold:
  the group's cell said 'nan ± n/a' (n/a is the single-seed mark; here 3 seeds), or, for a missing metric,
  was the mean of the other seeds under a 'seeds' column of 3. Now the cell says what is wrong, the CSV
  holds nan, the caption and the sweep's output name the run; every other cell is numpy's mean and std."""
  rng = np.random.default_rng(0)
  sweep = S.product(S.product(seed=[0, 1, 2]), [{"method": m} for m in ("nan", "null", "lacks", "ok")])
  lasts = []
  for o in sweep:
    last = {"dice/catheter": float(rng.uniform()), "dice/guidewire": float(rng.uniform())}
    if o["seed"] == 1 and o["method"] == "nan":
      last["dice/catheter"] = float("nan")
    if o["seed"] == 1 and o["method"] == "null":
      last["dice/catheter"] = None
    if o["seed"] == 2 and o["method"] == "lacks":
      del last["dice/guidewire"]
    lasts.append(last)
  names = _sweep_dir(tmp_path, sweep, lasts)
  assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  out = capsys.readouterr().out
  rows = {r["method"]: r for r in _rows(tmp_path)}
  by = {m: [last for o, last in zip(sweep, lasts) if o["method"] == m] for m in ("nan", "null", "lacks", "ok")}
  for method, metric in (("nan", "dice/catheter"), ("null", "dice/catheter"), ("lacks", "dice/guidewire")):
    assert math.isnan(float(rows[method][f"{metric}_mean"])) and math.isnan(float(rows[method][f"{metric}_std"]))
    other = "dice/guidewire" if metric == "dice/catheter" else "dice/catheter"
    vals = np.array([last[other] for last in by[method]])
    np.testing.assert_allclose(float(rows[method][f"{other}_mean"]), vals.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(rows[method][f"{other}_std"]), vals.std(ddof=1), rtol=1e-9)
  for metric in ("dice/catheter", "dice/guidewire"):
    vals = np.array([last[metric] for last in by["ok"]])
    np.testing.assert_allclose(float(rows["ok"][f"{metric}_mean"]), vals.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(rows["ok"][f"{metric}_std"]), vals.std(ddof=1), rtol=1e-9)
  assert {r["seeds"] for r in rows.values()} == {"3"}
  md = (tmp_path / "results.md").read_text()
  assert "| nan | 3 | 0 | 2 | NaN in 1 of 3 seeds |" in md, md
  assert "| null | 3 | 0 | 2 | missing in 1 of 3 seeds |" in md, md
  assert md.count("missing in 1 of 3 seeds |") == 2 and "nan ±" not in md.lower(), md
  bad = f"{names[sweep.index({'seed': 1, 'method': 'nan'})]} (dice/catheter)"
  assert f"Not averaged: NaN or missing in the last evaluation of {bad}" in md, md
  assert "lacks__seed-2 (dice/guidewire)" in md and "lacks__seed-2 (dice/guidewire)" in out, out
  runs = {r["run"]: r for r in _rows(tmp_path, "runs.csv")}
  assert runs["null__seed-1"]["dice/catheter"] == "nan" and runs["lacks__seed-2"]["dice/guidewire"] == "nan"
  assert float(runs["ok__seed-0"]["dice/catheter"]) == by["ok"][0]["dice/catheter"]


def test_report_cells_mark_nan_and_none_and_infinity():
  """fedkd.report's cell for values over seeds: NaN or None among them is not averaged (was 'nan ± n/a',
  and None was silently NaN); an infinite mean (epsilon without noise) is 'inf' (was 'inf ± n/a', whose n/a
  means one seed)."""
  assert report.not_results([0.5, float("nan"), 0.7]) == "NaN in 1 of 3 seeds"
  assert report.not_results([None, float("nan")]) == "NaN or missing in 2 of 2 seeds"
  assert report.not_results([None]) == "missing in 1 of 1 seed"
  assert report.not_results([0.5, float("inf"), 3]) == ""
  assert report.format_mean_std(float("inf"), float("nan")) == "inf"
  assert report.format_mean_std(float("-inf"), float("nan")) == "-inf"
  assert report.format_mean_std(float("nan"), float("nan")) == "NaN"
  assert report.format_mean_std(0.5, float("nan")) == "0.5000 ± n/a"


def test_inf_epsilon_with_two_seeds_is_inf_in_the_table(tmp_path):
  """The privacy sweep's z=0 group (epsilon inf in both seeds) read 'inf ± n/a' beside a seeds column of 2."""
  sweep = S.product(S.product(seed=[0, 1]), [{"method": "z=0"}, {"method": "z=1"}])
  eps = {"z=0": float("inf"), "z=1": 5.2}
  lasts = [{"dice/catheter": 0.5 + 0.1 * o["seed"], "dp/epsilon": eps[o["method"]]} for o in sweep]
  _sweep_dir(tmp_path, sweep, lasts, config="configs/privacy.py")
  assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  md = (tmp_path / "results.md").read_text()
  assert "| z=0 | 2 | 0 | 2 | 0.5500 ± 0.0707 | inf |" in md, md
  assert f"| z=1 | 2 | 0 | 2 | 0.5500 ± {np.std([0.5, 0.6], ddof=1):.4f} | 5.2000 ± 0.0000 |" in md, md
  assert (tmp_path / "vs_epsilon.png").exists() is False  # one finite epsilon: no line to draw


def test_a_folder_where_the_sweep_table_goes_is_one_line_and_replaces_nothing(tmp_path, capsys):
  """A folder named results.md in the sweep folder: a traceback (IsADirectoryError) after results.csv was
  already replaced; now one line naming it, and results.csv as it was."""
  sweep = S.product(seed=[0, 1])
  _sweep_dir(tmp_path, sweep, [{"dice/catheter": 0.5}, {"dice/catheter": 0.6}])
  (tmp_path / "results.md").mkdir()
  (tmp_path / "results.csv").write_text("mine\n")
  with pytest.raises(SystemExit) as e:
    launcher.main([f"--out={tmp_path}", "--aggregate_only"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "results.md" in err and "Traceback" not in err, err
  assert (tmp_path / "results.csv").read_text() == "mine\n"


def test_unequal_groups_dotted_keys_one_seed_and_long_labels(tmp_path, capsys):
  """Groups of 3, 2 and 1 finished seeds (one run without DONE), a dotted swept key as a column and a
  120-character method label: numbers are numpy's, the one-seed std is n/a / nan, the long name is cut
  with a hash; plots draw without matplotlib's 'tight layout not applied' (the legend of a long label
  squeezed the panels to slivers)."""
  lr = "client_optimizer.learning_rate"
  long = "m" * 120
  sweep = S.product(S.product(seed=[0, 1, 2]), [{"method": "a"}], **{lr: [0.001, 0.01]})
  sweep.append({"method": long, "seed": 0, lr: 0.001})
  rng = np.random.default_rng(3)
  lasts = [{"dice/catheter": float(rng.uniform()), "unseen/dice/catheter": float(rng.uniform())} for _ in sweep]
  names = _sweep_dir(tmp_path, sweep, lasts)
  assert all(len(n) <= 100 for n in names) and names[-1].startswith("m" * 80)
  (tmp_path / names[sweep.index({"method": "a", "seed": 2, lr: 0.01})] / "DONE").unlink()
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  capsys.readouterr()
  rows = _rows(tmp_path)
  assert [(r["method"], r[lr], r["seeds"], r["unfinished"]) for r in rows] == [
    ("a", "0.001", "3", "0"),
    ("a", "0.01", "2", "1"),
    (long, "0.001", "1", "0"),
  ]
  for row, seeds in zip(rows, ([0, 1, 2], [0, 1], [0])):
    vals = np.array(
      [
        last["dice/catheter"]
        for o, last in zip(sweep, lasts)
        if o["method"] == row["method"] and o[lr] == float(row[lr]) and o["seed"] in seeds
      ]
    )
    np.testing.assert_allclose(float(row["dice/catheter_mean"]), vals.mean(), rtol=1e-12)
    if len(vals) > 1:
      np.testing.assert_allclose(float(row["dice/catheter_std"]), vals.std(ddof=1), rtol=1e-9)
    else:
      assert math.isnan(float(row["dice/catheter_std"]))
  md = (tmp_path / "results.md").read_text()
  assert f"| {long} | 0.001 | 1 | 0 | 2 | {vals[0]:.4f} ± n/a |" in md
  assert (tmp_path / f"vs_{lr}.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0
  label = report.legend_label(f"{long} {lr}=0.001")
  assert len(label) <= report.LEGEND_CHARS and label.startswith("mmm") and label.endswith("rate=0.001")


@pytest.mark.parametrize(
  "defn,needle",
  [
    ({"config": "configs/quickstart.py", "varying_keys": [], "runs": ["a"]}, "run 0 is not a run of a sweep"),
    ({"config": "configs/quickstart.py", "runs": [{"name": "a", "overrides": {}, "num_rounds": 2}]}, "varying_keys"),
    ({"config": "configs/quickstart.py", "varying_keys": [], "runs": [{"name": "a"}]}, "run 0 is not a run"),
    ({"config": "configs/quickstart.py", "varying_keys": [], "runs": [{"name": "a", "overrides": {}}]}, "num_rounds"),
    (
      {
        "config": "configs/quickstart.py",
        "varying_keys": [],
        "runs": [{"name": "..", "overrides": {}, "num_rounds": 2}],
      },
      "run 0",
    ),
  ],
)
def test_a_sweep_json_that_is_not_one_is_a_one_line_error(tmp_path, capsys, defn, needle):
  """--aggregate_only of a folder whose sweep.json was edited or written by something else: a traceback
  (TypeError / KeyError) before; one line, exit 2, nothing written."""
  (tmp_path / "a").mkdir()
  (tmp_path / "sweep.json").write_text(json.dumps(defn))
  with pytest.raises(SystemExit) as e:
    launcher.main([f"--out={tmp_path}", "--aggregate_only"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("fedkd: error: ") and "\n" not in err and needle in err, err
  assert sorted(os.listdir(tmp_path)) == ["a", "sweep.json"]


@pytest.mark.parametrize("line", ["[1, 2]", '{"dice/catheter": 0.5}', '{"round": "2", "dice/catheter": 0.5}', '"x"'])
def test_a_metrics_line_that_is_no_record_is_a_one_line_error_naming_it(tmp_path, capsys, line):
  """A run's metrics.jsonl with a JSON line that is not a record of a round: a traceback before; now one line
  naming the file and line, exit 2, no tables written. A cut (unparsable) line is still skipped."""
  names = _sweep_dir(tmp_path, [{"seed": 0}, {"seed": 1}], [{"dice/catheter": 0.5}, {"dice/catheter": 0.7}])
  path = tmp_path / names[1] / "metrics.jsonl"
  path.write_text(path.read_text() + '{"round": 3, "dice/cath')  # a write cut by a kill: skipped
  assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  capsys.readouterr()
  assert float(_rows(tmp_path)[0]["dice/catheter_mean"]) == pytest.approx(0.6, rel=1e-12)
  for n in ("results.md", "results.csv", "runs.csv", "curves.png"):
    os.remove(tmp_path / n)
  path.write_text(line + "\n" + path.read_text())
  with pytest.raises(SystemExit) as e:
    launcher.main([f"--out={tmp_path}", "--aggregate_only"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("fedkd: error: ") and "\n" not in err, err
  assert f"{path}:1 is not an evaluation record" in err, err
  assert sorted(os.listdir(tmp_path)) == sorted([*names, "sweep.json"])


# ---------------------------------------------------------------- the shipped configs


def _config(spec):
  module = launcher.load_config_module(spec.split(":")[0], need_sweep=False)
  return module.get_config(spec.split(":", 1)[1] if ":" in spec else None)


@pytest.mark.parametrize(
  "spec,expect",
  [
    # quickstart's docstring: 150 rounds x 4 clients x 4 local steps x batch 8, 64 px
    (
      "configs/quickstart.py",
      {
        "num_rounds": 150,
        "num_clients": 4,
        "clients_per_round": 4,
        "local_steps": 4,
        "batch_size": 8,
        "image_size": 64,
      },
    ),
    ("configs/fedavg_unet.py", {"num_clients": 16, "clients_per_round": 16, "image_size": 128}),
    (
      "configs/fedavg_unet.py:clients=64,per_round=16,skew=0.5",
      {"num_clients": 64, "clients_per_round": 16, "quantity_skew": 0.5},
    ),
    ("configs/cross_device.py", {"num_clients": 10_000, "clients_per_round": 32, "num_rounds": 60, "image_size": 64}),
    ("configs/cross_device.py:clients=8", {"num_clients": 8, "clients_per_round": 8}),  # all 8 each round
    ("configs/cross_device.py:device", {"algorithm.client_state": "device", "algorithm.name": "scaffold"}),
    ("configs/cross_device.py", {"algorithm.client_state": "host", "eval.max_sites": 5}),
    ("configs/privacy.py:rounds=20", {"num_rounds": 20, "algorithm.name": "fedavg", "dp.clip_norm": 0.3}),
    ("configs/privacy.py", {"server_optimizer.momentum": 0.9, "dp.enabled": True, "dp.delta": 1e-5}),
    ("configs/robust.py", {"num_rounds": 50, "num_clients": 4, "attack.name": "none", "attack.factor": -10.0}),
    ("configs/zoo.py", {"num_rounds": 50, "eval.every": 10, "image_size": 64}),
  ],
)
def test_each_config_sets_what_its_docstring_says(spec, expect):
  from fedkd.config import validate, value_at

  c = _config(spec)
  validate(c, 1)
  assert {k: value_at(c, k) for k in expect} == expect


def test_the_privacy_sweep_spends_the_epsilons_its_docstring_quotes():
  """configs/privacy.py: z = 0.7, 1.0, 2.0 spend epsilon about 14, 5.2 and 0.84 at delta 1e-5 over the 60
  rounds (the accountant on each run's own config); z = 0 only clips."""
  from fedkd.fl import dp

  defn = launcher.build("configs/privacy.py", None, [])
  configs = launcher._run_configs(defn, defn["runs"])
  eps = {}
  for run, c in zip(defn["runs"], configs):
    z = c.dp.noise_multiplier
    assert run["overrides"]["method"] == f"z={z:g}" and c.dp.enabled and c.dp.clip_norm == 0.3
    if z:
      eps[z] = dp.epsilon(z, c.num_clients, c.clients_per_round, c.num_rounds, c.dp.delta)
  assert sorted(eps) == [0.7, 1.0, 2.0] and 0.0 in {c.dp.noise_multiplier for c in configs}
  assert round(eps[0.7]) == 14 and round(eps[1.0], 1) == 5.2 and round(eps[2.0], 2) == 0.84


def test_the_robust_sweep_attacks_with_one_of_four_and_trims_one_at_each_end():
  """configs/robust.py: round(0.2 x 4) = 1 attacker sending -10 x its update; trimmed_mean's beta x 4 = 1
  client dropped at each end; krum assumes f = 1; the clean method has no attacker."""
  defn = launcher.build("configs/robust.py", "seeds=1", [])
  configs = {r["overrides"]["method"]: c for r, c in zip(defn["runs"], launcher._run_configs(defn, defn["runs"]))}
  assert list(configs) == ["clean", "mean", "median", "trimmed_mean", "krum"]
  assert configs["clean"].attack.name == "none" and configs["clean"].aggregator.name == "mean"
  for m, c in configs.items():
    assert round(c.attack.fraction * c.num_clients) == 1 and c.clients_per_round == c.num_clients == 4
    if m != "clean":
      assert (c.attack.name, c.attack.factor, c.aggregator.name) == ("scale", -10.0, m)
  assert configs["trimmed_mean"].aggregator.trim_beta * 4 == 1 and configs["krum"].aggregator.krum_f == 1
  # n = 4 clients, f = 1: outside Blanchard et al.'s n > 2f + 2 = 4, which the run says on its first lines
  from fedkd.config import krum_note

  note = krum_note(configs["krum"])
  assert note.startswith("note: ") and "more than 2 krum_f + 2 = 4 clients per round; with 4 it runs" in note
  assert all(krum_note(c) is None for m, c in configs.items() if m != "krum")
  for n, f, multi, expected in ((5, 1, False, None), (7, 2, True, None), (6, 2, True, "= 6"), (5, 2, False, "= 6")):
    c = configs["krum"].copy_and_resolve_references()
    c.clients_per_round, c.aggregator.krum_f = n, f
    c.aggregator.name = "multi_krum" if multi else "krum"
    assert (krum_note(c) is None) if expected is None else (expected in krum_note(c)), (n, f)


def test_every_shipped_sweep_and_variant_validates_and_tiny_shrinks_every_run():
  """Every get_sweep argument the configs' docstrings quote builds and validates; with ``tiny`` each run has
  fedkd.sweep.TINY's settings (the robust sweep keeps 4 clients: Krum needs f + 3)."""
  from fedkd.config import value_at

  cases = [
    ("configs/quickstart.py", None, 4),
    ("configs/quickstart.py", "seeds=5", 10),
    ("configs/quickstart.py", "lr_grid,tiny", 6),
    ("configs/fedavg_unet.py:runlocal", "tiny", 9),
    ("configs/fedavg_unet.py", "fedavgm,seeds=5", 30),
    ("configs/privacy.py", "tiny", 8),
    ("configs/robust.py", "attack=sign_flip,tiny", 15),
    ("configs/zoo.py", "seeds=3,only=fedavg+fedbn", 6),
    ("configs/zoo.py", "tiny", 30),
  ]
  for spec, arg, n in cases:
    defn = launcher.build(spec, arg, [])
    assert len(defn["runs"]) == n, (spec, arg)
    if arg and "tiny" in arg:
      for c in launcher._run_configs(defn, defn["runs"]):
        tiny = dict(S.TINY, **({"num_clients": 4, "clients_per_round": 4} if "robust" in spec else {}))
        assert {k: value_at(c, k) for k in tiny} == tiny, (spec, arg)


def test_a_bad_metrics_line_stops_a_sweep_before_any_run_starts(tmp_path, capsys):
  """Re-running a sweep whose run folder holds a final checkpoint and a metrics.jsonl line that is not a
  record (a list, here): a traceback (AttributeError) before; one line naming the file, exit 2, no run started."""
  defn = launcher.build("configs/quickstart.py", "tiny,seeds=1", [])
  first = tmp_path / defn["runs"][0]["name"]
  (first / "checkpoints" / "2").mkdir(parents=True)
  (first / "metrics.jsonl").write_text('[1, 2]\n{"round": 2, "dice/catheter": 0.5}\n')
  with pytest.raises(SystemExit) as e:
    launcher.main(["--config=configs/quickstart.py", "--sweep=tiny,seeds=1", f"--out={tmp_path}"])
  err = capsys.readouterr().err.strip()
  assert (
    e.value.code == 2
    and err
    == f"fedkd: error: {first / 'metrics.jsonl'}:1 is not an evaluation record (a "
    "JSON object with an integer round); repair or delete that line, or that run's folder"
  ), err
  assert sorted(os.listdir(tmp_path)) == sorted([first.name, "sweep.json"])  # no other run's folder


def test_a_group_with_a_missing_or_nan_score_is_not_a_point_of_the_vs_key_plot(tmp_path, capsys, monkeypatch):
  """vs_quantity_skew.png drew the mean of the seeds that had the metric (silently 2 of 3) as the group's
  point; now only groups whose every finished run holds a number are points, each at numpy's mean of them."""
  sweep = S.product(S.product(seed=[0, 1, 2]), [{"method": "fedavg"}], quantity_skew=[0.0, 0.5, 1.0])
  rng = np.random.default_rng(5)
  lasts = [{"dice/catheter": float(rng.uniform())} for _ in sweep]
  lasts[sweep.index({"seed": 1, "method": "fedavg", "quantity_skew": 0.5})] = {"dice/guidewire": 0.3}
  lasts[sweep.index({"seed": 2, "method": "fedavg", "quantity_skew": 1.0})]["dice/catheter"] = float("nan")
  _sweep_dir(tmp_path, sweep, lasts, config="configs/fedavg_unet.py")
  drawn = {}
  real = report.errorbar_plot
  monkeypatch.setattr(report, "errorbar_plot", lambda lines, *a, **k: (drawn.update(lines), real(lines, *a, **k)))
  assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  capsys.readouterr()
  want = [last["dice/catheter"] for o, last in zip(sweep, lasts) if o["quantity_skew"] == 0.0]
  assert list(drawn) == ["fedavg"] and len(drawn["fedavg"]) == 1, drawn
  x, vals = drawn["fedavg"][0]
  assert x == 0.0 and vals == want
  assert (tmp_path / "vs_quantity_skew.png").stat().st_size > 0


def _plotted(monkeypatch):
  """{picture file name: {legend text: the (x, y) points of its line in the first panel}} of what fedkd.report
  draws next."""
  import matplotlib.axes
  import matplotlib.figure

  drawn, axes = {}, []
  real_legend, real_savefig = matplotlib.axes.Axes.legend, matplotlib.figure.Figure.savefig

  def legend(self, *a, **kw):
    axes.append(self)
    return real_legend(self, *a, **kw)

  def savefig(self, path, *a, **kw):
    lines = {}
    for ax in axes:
      for line in ax.get_lines():
        if not line.get_label().startswith("_"):
          lines.setdefault(line.get_label(), list(zip(map(float, line.get_xdata()), map(float, line.get_ydata()))))
      for c in ax.containers:  # errorbar lines
        lines[c.get_label()] = list(zip(map(float, c.lines[0].get_xdata()), map(float, c.lines[0].get_ydata())))
    drawn[os.path.basename(str(path))] = lines
    axes.clear()
    return real_savefig(self, path, *a, **kw)

  monkeypatch.setattr(matplotlib.axes.Axes, "legend", legend)
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
  return drawn


def test_groups_whose_labels_differ_in_the_middle_keep_distinct_legends(tmp_path, monkeypatch, capsys):
  """Labels over 48 characters lose their middle in a legend; with two dotted learning-rate keys the middle
  held the client learning rate, so curves.png showed 0.001 and 0.003 under one label twice."""
  clr, slr = "client_optimizer.learning_rate", "server_optimizer.learning_rate"
  sweep = S.product(S.product(seed=[0, 1]), [{"method": "fedavg", "quantity_skew": 0.5}], **{clr: [1e-3, 3e-3]})
  sweep = S.product(sweep, **{slr: [1.0, 0.5]})
  lasts = [{"dice/catheter": 0.1 * o[clr] * 1e3 + 0.3 * o[slr] + 0.01 * o["seed"]} for o in sweep]
  _sweep_dir(tmp_path, sweep, lasts)
  drawn = _plotted(monkeypatch)
  assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  capsys.readouterr()
  curves = drawn["curves.png"]
  assert len(curves) == 4, curves  # four groups, four legend entries
  for c in (1e-3, 3e-3):
    for s in (1.0, 0.5):
      (label,) = [k for k in curves if f"{c:g}" in k and f"learning_rate={s:g}" in k]
      want = np.mean([0.1 * c * 1e3 + 0.3 * s + 0.01 * seed for seed in (0, 1)])
      assert curves[label][-1] == pytest.approx((2.0, want)), (label, curves[label])


def test_the_privacy_plot_draws_one_line_per_setting_and_a_pipe_keeps_its_table_cell(tmp_path, monkeypatch, capsys):
  """vs_epsilon.png joined every DP group into one line named DP-FedAvg: with two algorithms it zig-zagged
  between them. A '|' in a method label split its results.md row (every later cell one column right)."""
  sweep = S.product(
    S.product(seed=[0, 1]),
    [{"algorithm.name": a} for a in ("fedavg", "fedprox")],
    [{"method": f"z|{z:g}", "dp.noise_multiplier": z} for z in (0.5, 1.0)],
  )
  eps = {0.5: 20.0, 1.0: 5.0}
  score = {("fedavg", 0.5): 0.7, ("fedavg", 1.0): 0.6, ("fedprox", 0.5): 0.5, ("fedprox", 1.0): 0.4}
  lasts = [
    {"dice/catheter": score[o["algorithm.name"], o["dp.noise_multiplier"]] + 0.01 * o["seed"], "dp/epsilon": 0.0}
    for o in sweep
  ]
  for o, last in zip(sweep, lasts):
    last["dp/epsilon"] = eps[o["dp.noise_multiplier"]]
  _sweep_dir(tmp_path, sweep, lasts, config="configs/privacy.py")
  drawn = _plotted(monkeypatch)
  assert launcher.main([f"--out={tmp_path}", "--aggregate_only"]) == 0
  capsys.readouterr()
  lines = drawn["vs_epsilon.png"]
  assert sorted(lines) == ["algorithm.name=fedavg", "algorithm.name=fedprox"], lines
  for a in ("fedavg", "fedprox"):
    want = [(eps[z], score[a, z] + 0.005) for z in (1.0, 0.5)]  # by epsilon: 5, then 20
    np.testing.assert_allclose(lines[f"algorithm.name={a}"], want)
  rows = [ln for ln in (tmp_path / "results.md").read_text().splitlines() if ln.startswith("| z")]
  assert len(rows) == 4 and all(ln.startswith("| z\\|") for ln in rows), rows
  header = next(ln for ln in (tmp_path / "results.md").read_text().splitlines() if ln.startswith("| method"))
  cells = lambda ln: [c for c in re.split(r"(?<!\\)\|", ln)[1:-1]]  # noqa: E731 - a Markdown row's cells
  assert all(len(cells(ln)) == len(cells(header)) for ln in rows), (header, rows)


@pytest.mark.parametrize("source, refused", [("synthetic", False), ("tfds:xray_folder", True)])
def test_a_finished_run_scored_on_other_tfds_test_records_is_not_reused(source, refused):
  """eval.pick picks which TFDS test records are scored: a finished run re-used under another pick was
  tabulated under the new value (eval.examples_per_site was refused already); on synthetic data it changes
  nothing, so a finished synthetic run stays reusable."""
  from fedkd.config import base_config

  saved = base_config().to_dict()
  saved["data"]["source"] = source
  current = json.loads(json.dumps(saved))
  current["eval"]["pick"] = "first"
  got = launcher.config_difference(saved, current, finished=True)
  assert got == ([("eval.pick", "spread", "first")] if refused else []), got
  assert launcher.config_difference(saved, current, finished=False) == []  # an unfinished run rescored: fine


def test_a_key_neither_run_reads_may_change_on_resume():
  """A FedAvg run given --config.algorithm.prox_mu=0.5 is told the key has no effect, then refused on resume
  without it ('was written with config.algorithm.prox_mu=0.5'); so were dp.* with DP off. A key that either run
  reads still counts. FedEFM: engine.host_memory (process memory only) and fedefm.moon_mu without a moon method."""
  from fedkd.config import base_config
  from fedkd.tasks import fedavg
  from fedkd.tasks import fedefm as task

  def flat(c):
    return json.loads(c.to_json())

  saved = base_config()
  saved.algorithm.prox_mu, saved.dp.clip_norm = 0.5, 3.0
  assert fedavg.resume_differences(flat(saved), flat(base_config())) == []
  fedavg._check_resumable(flat(saved), flat(base_config()), "w")
  now = base_config()
  now.algorithm.name = "fedprox"
  assert fedavg.resume_differences(flat(saved), flat(now)) == ["algorithm.name", "algorithm.prox_mu"]
  now = base_config()
  now.dp.enabled = True
  assert fedavg.resume_differences(flat(saved), flat(now)) == ["dp.clip_norm", "dp.enabled"]

  cfg = runpy_config("configs/fedefm.py", "tiny")
  cfg.experiment.methods = "scratch,fedavg"
  old = flat(cfg)
  cfg.engine.host_memory, cfg.fedefm.moon_mu = "release", cfg.fedefm.moon_mu + 1.0
  assert task.config_difference(old, flat(cfg)) is None
  cfg.pretrain.num_rounds += 1
  assert task.config_difference(old, flat(cfg)) == "config.pretrain.num_rounds differs"


def runpy_config(path, arg):
  import runpy

  return runpy.run_path(os.path.join(ROOT, path))["get_config"](arg)


def test_keys_a_tfds_or_robust_run_does_not_read_are_named_and_may_change():
  """No note named examples_per_client / quantity_skew on TFDS sites split by site (the pipeline reads them for
  synthetic clients and the iid split only), rng_streams without a named stream, or clients_in_flight under a
  robust aggregator (the engine runs those clients on XLA's schedule); and a resume refused their change."""
  from fedkd.config import base_config, unused_notes
  from fedkd.data.pipeline import client_sizes
  from fedkd.tasks import fedavg

  def given(**kv):
    c = base_config()
    c.data.source = kv.pop("source", "synthetic")
    for k, v in kv.items():
      group, _, key = k.rpartition("__")
      (c[group] if group else c)[key] = v
    return c

  notes = " ".join(unused_notes(given(source="tfds:xray_folder", examples_per_client=9, quantity_skew=0.3)))
  assert "config.examples_per_client=9 has no effect" in notes and "config.quantity_skew=0.3 has no effect" in notes
  iid = given(source="tfds:xray_folder", data__partition="iid", quantity_skew=0.3)
  assert "quantity_skew" not in " ".join(unused_notes(iid))  # the iid split draws skewed sizes
  assert "rng_streams=1 has no effect" in " ".join(unused_notes(given(rng_streams=1, quantity_skew=0.0)))
  skewed = given(rng_streams=1, quantity_skew=0.5)
  assert "rng_streams" not in " ".join(unused_notes(skewed))
  assert (client_sizes(skewed) != client_sizes(given(rng_streams=2, quantity_skew=0.5))).any()  # it is read there
  robust = given(aggregator__name="median", engine__clients_in_flight="2")
  assert "config.engine.clients_in_flight='2' has no effect" in " ".join(unused_notes(robust))
  old = json.loads(given(source="tfds:xray_folder", examples_per_client=9).to_json())
  assert fedavg.resume_differences(old, json.loads(given(source="tfds:xray_folder").to_json())) == []
