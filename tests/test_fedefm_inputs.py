"""FedEFM settings at the edges of what works: refused before anything trains (one-line ConfigError) where
the numbers would be meaningless, accepted (and correct against an exact reference) at the edges kept."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedkd.config import ConfigError
from fedkd.distill.emd import emd_similarity
from test_emd import _lp_similarity as exact_similarity


def _tiny():
  spec = importlib.util.spec_from_file_location(
    "fedefm_cfg_inputs", os.path.join(os.path.dirname(__file__), "..", "configs", "fedefm.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("tiny")


REFUSED = [
  # 1e-20: plans with an L1 marginal error of 30 (or NaN) and EMD weights that mean nothing, silently;
  # 1e-12: the default schedule runs ~1e7 Sinkhorn iterations per solve (the run never ends)
  ("fedefm.emd_epsilon", 1e-20, r"config.fedefm.emd_epsilon=1e-20 must be a number in \[0.0001, 10000\]"),
  ("fedefm.emd_epsilon", 1e-12, r"config.fedefm.emd_epsilon=1e-12 must be a number in \["),
  ("fedefm.emd_epsilon", 1e38, r"config.fedefm.emd_epsilon=1e\+38 must be a number in \["),  # NaN similarities
  ("fedefm.weight_temperature", 1e-40, r"config.fedefm.weight_temperature=1e-40 must be a number >= 1e-06"),
  # a directed ring was asked for; the undirected ring would run (directed is read for files only)
  (
    "fedefm.directed",
    True,
    r"config.fedefm.directed=True applies to file:<path> topologies only, not to topology='ring'",
  ),
  # each size would be trained twice and shown as two equal columns
  ("downstream.scarce_examples", "4,8,4", r"config.downstream.scarce_examples='4,8,4' lists 4 more than once"),
]


@pytest.mark.parametrize("key,value,match", REFUSED, ids=[f"{k}={v}" for k, v, _ in REFUSED])
def test_unusable_setting_is_refused_before_training(key, value, match, tmp_path):
  from fedkd.tasks import fedefm as task

  c = _tiny()
  group, _, name = key.rpartition(".")
  c[group][name] = value
  with pytest.raises(ConfigError, match=match) as e:
    task.Experiment(c, str(tmp_path / "fe"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "fe").exists()


def _lp_similarity(u, v):
  """Exact EMD similarity (scipy's HiGHS LP) with the cosine cost and uniform node weights."""
  un = u / np.linalg.norm(u, axis=1, keepdims=True)
  vn = v / np.linalg.norm(v, axis=1, keepdims=True)
  c = 1.0 - un @ vn.T
  n, m = c.shape
  return exact_similarity(c, np.full(n, 1.0 / n), np.full(m, 1.0 / m)), float(np.mean(1.0 - c))


def test_emd_epsilon_range_edges_are_accepted_and_accurate():
  """Both ends of the accepted range work: at 1e-4 the default solve gives the LP similarity, at 1e4 the
  plan is a b^T (S = the mean similarity over all node pairs)."""
  from fedkd.tasks import fedefm as task

  for eps in (1e-4, 1e4):
    c = _tiny()
    c.fedefm.emd_epsilon = eps
    task.validate(c)
  rng = np.random.default_rng(3)
  for n, m, d in [(7, 5, 8), (12, 12, 4)]:
    u, v = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    lp, independent = _lp_similarity(u, v)
    s_lo, err = jax.jit(lambda a, b: emd_similarity(a, b, epsilon=1e-4, return_error=True))(
      jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
    )
    assert abs(float(s_lo) - lp) < 2e-3 and float(err) < 2e-3, (float(s_lo), lp, float(err))
    s_hi = emd_similarity(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32), epsilon=1e4)
    assert abs(float(s_hi) - independent) < 1e-4, (float(s_hi), independent)


def test_workdir_holding_only_foundations_refuses_another_config(tmp_path):
  """A run stopped during its first fine-tune leaves config.json and foundations/ but no result and no
  checkpoint; a re-run with another pretraining setting must not reuse that foundation as its own."""
  from fedkd.tasks import fedefm as task

  w = tmp_path / "fe"
  (w / "foundations").mkdir(parents=True)
  old = _tiny()
  old.experiment.methods, old.experiment.kd_methods = "fedavg", ""
  (w / "config.json").write_text(old.to_json(indent=2))
  saved = b"the foundation of the first config"
  (w / "foundations" / "u100_fedavg_seed0.npz").write_bytes(saved)
  new = _tiny()
  new.experiment.methods, new.experiment.kd_methods = "fedavg", ""
  new.pretrain.learning_rate = 0.5
  with pytest.raises(ConfigError, match=r"holds foundations pretrained under another config \(config.pretrain") as e:
    task.Experiment(new, str(w)).run()
  assert "\n" not in str(e.value)
  assert (w / "foundations" / "u100_fedavg_seed0.npz").read_bytes() == saved  # nothing lost or rewritten
  assert json.loads((w / "config.json").read_text()) == json.loads(old.to_json())
  # a downstream setting does not change a foundation: it passes the check and the foundation is read (this
  # stand-in file is then refused as damaged, which shows it was the one reused)
  other = _tiny()
  other.experiment.methods, other.experiment.kd_methods = "fedavg", ""
  other.downstream.steps += 1
  with pytest.raises(ConfigError) as e:
    task.Experiment(other, str(w), log=lambda _: None).run()
  assert "another config" not in str(e.value) and "u100_fedavg_seed0.npz" in str(e.value), str(e.value)


def test_kd_methods_outside_methods_are_named_at_the_start(tmp_path):
  """experiment.kd_methods lists fedefm, which methods does not run: the plan has no +KD run of it (as
  before) and the start says so, instead of skipping it in silence."""
  from fedkd.tasks import fedefm as task

  c = _tiny()
  c.experiment.methods, c.experiment.kd_methods = "scratch,fedavg", "fedavg,fedefm"
  exp = task.Experiment(c, str(tmp_path / "fe"), log=lambda _: None)
  assert sorted({m for _, m, kd, _ in exp.plan() if kd}) == ["fedavg"]
  notes = exp.plan_notes()
  assert len(notes) == 1 and "kd_methods lists fedefm, not in experiment.methods" in notes[0], notes
  c.experiment.kd_methods = "fedavg"
  assert task.Experiment(c, str(tmp_path / "fe2"), log=lambda _: None).plan_notes() == []


def test_a_plan_whose_silos_label_no_teacher_class_is_refused_before_training(tmp_path):
  """teacher.num_classes=3 makes vessels background: a silo set holding only vessel-only sources would
  leave the segmentation foundation no (source, class) pair to score; that plan is refused before anything
  trains. The expected refusal is derived from the synthetic sources' own labelling (sites.DATA_TYPE_FLAGS)."""
  from fedkd.data import sites
  from fedkd.data.silos import DATA_TYPES, SiloData
  from fedkd.tasks import fedefm as task

  c = _tiny()
  c.teacher.num_classes = 3
  c.pretrain.num_silos, c.pretrain.unseen_percent = 1, 100
  c.experiment.methods, c.experiment.kd_methods, c.experiment.seeds = "fedavg", "", "0"
  held = np.unique(SiloData(c).silo_types(100, 0))
  # which sources label catheter or guidewire (the classes a 3-class teacher has), from the generator's flags
  flags = [sites.DATA_TYPE_FLAGS[sites.DATA_TYPES.index(DATA_TYPES[s][1])] for s in held]
  scorable = any(f[0] > 0.5 or f[1] > 0.5 for f in flags)
  assert not scorable, "the tiny plan should hold vessel-only sources only; pick another silo setup"
  exp = task.Experiment(c, str(tmp_path / "fe"), log=lambda _: None)
  with pytest.raises(ConfigError, match=r"label no class of the 3-class teacher") as e:
    exp.check_workdir()
  assert "\n" not in str(e.value)
  c.teacher.num_classes = 4  # vessels scored: accepted
  task.Experiment(c, str(tmp_path / "fe4"), log=lambda _: None).check_workdir()


@pytest.mark.parametrize(
  "edges,names",
  [
    # a chain (edge i j: j receives from i): silo 0 receives nothing (was "silo 0 has no neighbour")
    ("0 1\n1 2\n2 3\n", r"node 0 never receives the model of node\(s\) \[1, 2, 3\]\)"),
    ("0 1\n1 0\n1 2\n2 3\n3 2\n", r"node 0 never receives the model of node\(s\) \[2, 3\]\)"),  # 0<->1 -> 2<->3
  ],
)
def test_a_directed_file_that_is_not_strongly_connected_names_the_key(edges, names, tmp_path):
  """Gossip over a directed file needs a path from every silo to every other (checked by a breadth-first
  search by hand here: the silos named are those that cannot reach or be reached from silo 0); the one-line
  error names config.fedefm.topology and the file."""
  from fedkd.tasks import fedefm as task

  path = tmp_path / "chain.txt"
  path.write_text(edges)
  c = _tiny()
  c.pretrain.num_silos = 4
  c.fedefm.topology, c.fedefm.directed = f"file:{path}", True
  with pytest.raises(ConfigError, match=rf"config.fedefm.topology='file:{path}' is a directed graph that is not "):
    task.Experiment(c, str(tmp_path / "fe"))
  with pytest.raises(ConfigError, match=names):
    task.Experiment(c, str(tmp_path / "fe"))
  assert not (tmp_path / "fe").exists()
