"""The FedEFM experiment at odd but valid settings, as a user runs it: the controls under gossip, warm-up
rounds that cover the whole run, NaN in a results file (the experiment's and the contrast command's)."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from fedkd import checkpoint as ckpt_lib
from fedkd.config import ConfigError
from fedkd.distill.fedefm import stack
from fedkd.fl import topology
from fedkd.tasks import fedefm as task

_spec = importlib.util.spec_from_file_location(
  "fedefm_cfg_usage", os.path.join(os.path.dirname(__file__), "..", "configs", "fedefm.py")
)
cfgmod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfgmod)


def tiny(**overrides):
  c = cfgmod.get_config("tiny")
  for key, value in overrides.items():
    group, _, name = key.rpartition(".")
    (c[group] if group else c)[name] = value
  return c


def _silo_models(exp, method):
  """The stacked silo models [N, ...] after the last pretraining round (its checkpoint)."""
  like = {"params": stack(exp.init_foundation(0), exp.c.pretrain.num_silos)}
  like["prev"] = like["params"]
  ckpt = ckpt_lib.Checkpointer(exp.checkpoint_dir(method, 100.0, 0), 2)
  try:
    state, _ = ckpt.restore(exp.c.pretrain.num_rounds, like)
  finally:
    ckpt.close()
  return [np.asarray(a) for a in jax.tree.leaves(state["params"])]


@pytest.mark.parametrize("method", ["fedefm_uniform", "fedefm_e0"])
def test_controls_mix_like_fedefm_under_gossip(method, tmp_path):
  """With fedefm.mixing=dfl the controls of FedEFM (uniform weights, no experts) gossip as FedEFM does,
  so each changes one ingredient: after a round on a ring of 4 the silos hold different models (CFL would
  leave one model), and the models moved per silo are gossip's 2 out + 2 in, plus 2 per neighbour for the
  uniform control's overseas experts (fedefm_e0 sends none: its experts are the silo's own model)."""
  c = tiny(**{"fedefm.mixing": "dfl", "pretrain.num_rounds": 1, "fedefm.warmup_rounds": 0})
  exp = task.Experiment(c, str(tmp_path / "fe"), log=lambda _: None)
  _, summary = exp.pretrain(method, 100.0, 0)
  rows = _silo_models(exp, method)
  assert any(not np.allclose(a[0], a[1]) for a in rows)  # gossip: silo 0 and 1 differ
  n = c.pretrain.num_silos
  assert topology.ring(n).astype(bool).sum() - n == 2 * n  # 2 neighbours each
  moves = 4 + (4 if method == "fedefm_uniform" else 0)
  model_bytes = sum(a[0].nbytes for a in rows)
  assert summary["cost"]["mb_per_silo_round"] == round(moves * model_bytes / 1e6, 4)


def test_warmup_rounds_that_cover_the_run_are_refused():
  """warmup_rounds >= num_rounds: no round distils, so FedEFM and its controls would silently be the
  warm-up baseline (the contrasts then compare FedAvg with itself); without a distilling method it runs."""
  for warmup, rounds in ((2, 2), (5, 2)):
    c = tiny(**{"fedefm.warmup_rounds": warmup, "pretrain.num_rounds": rounds})
    with pytest.raises(ConfigError, match=rf"warmup_rounds={warmup} leaves no distilling round .* fedefm would"):
      task.validate(c)
  task.validate(tiny(**{"fedefm.warmup_rounds": 1, "pretrain.num_rounds": 2}))
  task.validate(
    tiny(**{"fedefm.warmup_rounds": 5, "experiment.methods": "scratch,fedavg", "experiment.kd_methods": ""})
  )
  c = tiny(**{"fedefm.warmup_rounds": 2, "experiment.methods": "fedavg", "experiment.kd_methods": ""})
  c.experiment.ablation_percents, c.experiment.ablation_methods = "50", "fedavg,fedefm_e0"
  with pytest.raises(ConfigError, match=r"fedefm_e0 would never distil"):
    task.validate(c)


def _record(method, seed, value):
  r = {k: value for k in task.RESULT_KEYS[4:]}
  r.update(unseen_percent=100.0, method=method, teacher_kd=False, seed=seed, foundation=None)
  return r


def test_nan_in_results_raw_is_refused_and_nothing_is_written(tmp_path):
  """A finished record holding NaN (a run that went wrong, a hand edit) is not a result: re-running the
  command names the file, the record and the fix instead of writing nan into results.md; nothing changes."""
  c = tiny(**{"experiment.methods": "scratch", "experiment.kd_methods": ""})
  work = tmp_path / "fe"
  work.mkdir()
  (work / "config.json").write_text(c.to_json(indent=2))
  raw = work / "results_raw.jsonl"
  text = json.dumps(_record("scratch", 0, float("nan"))) + "\n"
  raw.write_text(text)
  with pytest.raises(ConfigError, match=r"results_raw.jsonl: the record of scratch seed 0 holds nan for .*delete") as e:
    task.run(c, str(work), log=lambda _: None)
  assert "\n" not in str(e.value)
  assert raw.read_text() == text and sorted(os.listdir(work)) == ["config.json", "results_raw.jsonl"]
  text = json.dumps(dict(_record("scratch", 0, 0.5), **{"dice/mean": "0.5"})) + "\n"  # a hand edit
  raw.write_text(text)
  with pytest.raises(ConfigError, match=r"the record of scratch seed 0 holds '0.5' for dice/mean, not a result"):
    task.run(c, str(work), log=lambda _: None)
  assert raw.read_text() == text and sorted(os.listdir(work)) == ["config.json", "results_raw.jsonl"]


def test_contrast_of_a_nan_result_is_one_line_error(cli, tmp_path):
  """fedefm_contrast over a key one record holds as NaN: one line naming the side, seed and key (it
  printed '+nan (n/a: 3 seed)' and exit 0); the other keys still contrast, against scipy."""
  from scipy import stats

  rng = np.random.default_rng(4)
  vals = {side: rng.uniform(size=3) for side in "ab"}
  for side in "ab":
    (tmp_path / side).mkdir()
    recs = [_record("fedefm", s, float(vals[side][s])) for s in range(3)]
    if side == "a":
      recs[1]["dice/guidewire"] = float("nan")
    (tmp_path / side / "results_raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  args = [f"--a={tmp_path / 'a'}:fedefm", f"--b={tmp_path / 'b'}:fedefm"]
  r = cli.run("fedkd.tasks.fedefm_contrast", args + ["--keys=dice/mean,dice/guidewire"])
  assert r.code == 2 and not r.traceback and r.stdout == "", r.stderr
  line = r.stderr.strip()
  assert "\n" not in line and "--a: the record of seed 1 holds nan for 'dice/guidewire'" in line, line
  r = cli.run("fedkd.tasks.fedefm_contrast", args + ["--keys=dice/mean"])
  assert r.code == 0, r.stderr
  p = stats.ttest_rel(vals["a"], vals["b"]).pvalue
  assert f"p={p:.3g}" in r.stdout, r.stdout


def test_emd_error_counts_only_real_neighbours():
  """emd.error_max (and the 'did not converge' note) is over the plans of real neighbours: a silo that
  receives from nobody reports 0 (it reported the error of a padded slot's unused solve), and a silo with
  one neighbour in a table padded to two reports what it reports with that neighbour alone."""
  import test_fedefm as tf

  xs, ys = tf.data(1)
  padded = np.zeros((tf.N, tf.N), bool)  # rows receive: 0 <- nobody, 1 <- 0 and 2, 2 <- 1, 3 <- 2
  padded[1, [0, 2]] = padded[2, 1] = padded[3, 2] = True
  alone = np.zeros((tf.N, tf.N), bool)  # one in-neighbour each, silo 2 still <- 1
  alone[1, 0] = alone[2, 1] = alone[3, 2] = alone[0, 3] = True
  errors = {}
  for name, adj in (("padded", padded), ("alone", alone)):
    params = stack(tf.init(0), tf.N)  # a fresh copy: the round donates it
    _, metrics = tf.engine_round(params, xs, ys, adj, np.eye(tf.N, dtype=np.float32), "cfl", 1)
    errors[name] = np.asarray(metrics["emd_error"])
  assert errors["alone"][2] > 1e-4  # unconverged plans (emd_iters=30 at epsilon 0.1): a real error to keep
  assert errors["padded"][0] == 0.0
  np.testing.assert_allclose(errors["padded"][2], errors["alone"][2], rtol=1e-3)


def test_one_silo_is_refused_for_distilling_methods():
  """One silo has no neighbour: FedEFM would distil from nobody and score as its baseline (a 1-silo run
  gave fedefm and matcha the same foundation, 0.1608, and the same student); without FedEFM it runs."""
  for topo in ("ring", "complete"):
    c = tiny(**{"pretrain.num_silos": 1, "fedefm.topology": topo})
    with pytest.raises(ConfigError, match=r"num_silos=1: silo 0 has no neighbour .* fedefm would distil from nobody"):
      task.validate(c)
  task.validate(tiny(**{"pretrain.num_silos": 1, "experiment.methods": "fedavg,matcha", "experiment.kd_methods": ""}))


def test_config_seed_is_refused_with_the_key_that_sets_the_seeds():
  """--config.seed=3 was read nowhere: the run silently used experiment.seeds ('0')."""
  with pytest.raises(ConfigError, match=r"config.seed=3 is not used by FedEFM, .* --config.experiment.seeds=3"):
    task.validate(tiny(seed=3))
  task.validate(tiny(**{"experiment.seeds": "3"}))


def test_emd_weight_heatmap_rows_name_the_real_neighbours(tmp_path, monkeypatch):
  """emd_weights_fedefm.png: one row per (silo, in-neighbour) named by the neighbour's silo id, padded
  slots left out. On the path 0-1-2-3 silo 2's first neighbour is silo 1 (the rows read 'silo 2 <- nbr 0')
  and silos 0 and 3 have one neighbour (a row of padding zeros each was drawn)."""
  from fedkd import report

  path = tmp_path / "path.txt"
  path.write_text("0 1\n1 2\n2 3\n")
  exp = task.Experiment(tiny(**{"fedefm.topology": f"file:{path}"}), str(tmp_path / "fe"), log=lambda _: None)
  os.makedirs(exp.workdir)
  drawn = {}
  monkeypatch.setattr(report, "heatmap", lambda m, labels, *a, **k: drawn.update(m=np.asarray(m), labels=labels))
  w = np.zeros((3, 4, 2))  # rounds x silos x slots; each silo's neighbours in ascending order, then padding
  links = [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)]
  for i, j in links:
    k = 0 if (i, j) in ((0, 1), (1, 0), (2, 1), (3, 2)) else 1
    w[:, i, k] = 0.1 * (i + 1) + 0.01 * j + np.arange(3)
  row = _record("fedefm", 0, 0.5)
  row.update(foundation=0.3, w_history=w.tolist())
  exp.write_tables([row])
  assert drawn["labels"] == [f"silo {i} <- silo {j}" for i, j in links]
  np.testing.assert_allclose(drawn["m"], [0.1 * (i + 1) + 0.01 * j + np.arange(3) for i, j in links])


def test_expert_steps_zero_names_the_control_method():
  """The docs call fedefm_e0 the expert_steps = 0 control; --config.fedefm.expert_steps=0 says to run it."""
  with pytest.raises(
    ConfigError, match=r"expert_steps=0 must be an integer >= 1; .* is the method fedefm_e0: add it to "
  ):
    task.validate(tiny(**{"fedefm.expert_steps": 0}))


def test_emd_weight_spread_is_over_real_neighbours(tmp_path):
  """endpoints.md's 'EMD weight spread': uniform weights on the path 0-1-2-3 (two silos with one neighbour,
  padded to two slots) spread 0 (it was the std with the padding zeros, 0.354); on a ring, with each silo's
  weights summing to 1, it is numpy's std over silos x neighbours, as before."""
  path = tmp_path / "path.txt"
  path.write_text("0 1\n1 2\n2 3\n")
  over = {"experiment.methods": "fedefm_uniform", "experiment.kd_methods": "", "downstream.probe": False}
  # one distilling round under gossip: the round program of test_controls_mix_like_fedefm_under_gossip's
  # fedefm_uniform (the topology is an input; its neighbour table is [4, 2] on the ring and on the path)
  over.update({"fedefm.mixing": "dfl", "pretrain.num_rounds": 1, "fedefm.warmup_rounds": 0})
  c = tiny(**over, **{"fedefm.topology": f"file:{path}", "downstream.scarce_examples": ""})
  (row,) = task.run(c, str(tmp_path / "fe"), log=lambda _: None)
  assert np.asarray(row["w_history"]).shape == (1, 4, 2)
  assert row["emd"]["w_spread"] == 0.0
  ring = topology.ring(4) > 0
  np.fill_diagonal(ring, False)
  w = np.random.default_rng(0).dirichlet([1, 1], size=4)
  np.testing.assert_allclose(task.weight_spread(w, ring), np.std(w), rtol=1e-12)


def _unbalanced_digraph(tmp_path):
  """A file topology on 4 silos, 0 -> 1 -> 2 -> 3 -> 0 and 0 -> 2: silo 0 sends twice, silo 2 receives twice."""
  path = tmp_path / "digraph.txt"
  path.write_text("0 1\n1 2\n2 3\n3 0\n0 2\n")
  return {"fedefm.topology": f"file:{path}", "fedefm.directed": True, "experiment.methods": "fedefm_dfl,fedavg"}


@pytest.mark.parametrize("gradient_push", [True, False])
def test_gradient_push_is_a_switch_of_push_sum_gossip(gradient_push, tmp_path):
  """config.fedefm.gradient_push: on a digraph that is not balanced, FedEFM-DFL's silo steps are scaled by
  1 / their push-sum weights only when it is on; the start notes say which form runs. MATCHA and CFL methods
  never push-sum."""
  exp = task.Experiment(
    tiny(**_unbalanced_digraph(tmp_path), **{"fedefm.gradient_push": gradient_push}), str(tmp_path / "fe")
  )
  assert exp.push_sum
  assert exp._gradient_push("fedefm_dfl") is gradient_push
  assert not exp._gradient_push("fedavg") and not exp._gradient_push("matcha")
  (note,) = [n for n in exp.plan_notes() if "push-sum" in n]
  assert note.startswith("the topology is a directed graph that is not balanced: fedefm_dfl mixes by push-sum")
  assert ("gradient-push" in note) is gradient_push and ("unscaled" in note) is not gradient_push


def test_a_push_sum_workdir_from_before_gradient_push_continues_only_unscaled(tmp_path):
  """A workdir whose config.json predates config.fedefm.gradient_push (its push-sum gossip ran with unscaled
  steps) is refused at the default, naming the value it ran with, before anything is written; with that value
  it matches. A saved config of a named topology (undirected or balanced: no push-sum) matches at any value."""
  over = _unbalanced_digraph(tmp_path)
  work = tmp_path / "fe"
  work.mkdir()
  old = json.loads(tiny(**over).to_json())
  del old["fedefm"]["gradient_push"]
  (work / "config.json").write_text(json.dumps(old))
  raw = json.dumps({"unseen_percent": 100.0, "method": "fedefm_dfl", "teacher_kd": False, "seed": 0}) + "\n"
  (work / "results_raw.jsonl").write_text(raw)
  with pytest.raises(
    ConfigError,
    match=r"holds results of another config \(config.fedefm.gradient_push differs: written before the key "
    r"existed, it ran as False \(--config.fedefm.gradient_push=False\)\)",
  ):
    task.run(tiny(**over), str(work), log=lambda _: None)
  assert sorted(os.listdir(work)) == ["config.json", "results_raw.jsonl"]
  assert (work / "results_raw.jsonl").read_text() == raw
  current = json.loads(tiny(**over, **{"fedefm.gradient_push": False}).to_json())
  assert task.config_difference(old, current) is None
  ring = json.loads(tiny().to_json())
  del ring["fedefm"]["gradient_push"]
  assert task.config_difference(ring, json.loads(tiny().to_json())) is None
  # a named topology has no push-sum: neither config reads the key, so its value may differ
  assert task.config_difference(ring, json.loads(tiny(**{"fedefm.gradient_push": False}).to_json())) is None
