"""End-to-end federated training: exact resume, metrics file, bad checkpoint/config handling."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from fedkd.checkpoint import CheckpointError
from fedkd.config import ConfigError, base_config, validate
from fedkd.data import pipeline
from fedkd.models import init_model
from fedkd.tasks import fedavg
from test_docs import assert_outputs_documented


def tiny_config(**overrides):
  c = base_config()
  c.num_rounds = 4
  c.num_clients = 4
  c.clients_per_round = 2
  c.local_steps = 1
  c.batch_size = 2
  c.image_size = 32
  c.quantity_skew = 0.5
  c.model.width = 4
  c.model.depth = 1
  c.model.groups = 2
  c.eval.every = 2
  c.eval.examples_per_site = 2
  c.eval.max_sites = 1
  c.checkpoint.every = 2
  for k, v in overrides.items():
    c[k] = v
  return c


class Interrupt(Exception):
  pass


def _quiet(_):
  pass


def test_resume_after_interruption_is_bitwise_identical(tmp_path):
  full = fedavg.run(tiny_config(), str(tmp_path / "full"), log=_quiet)

  def crash_in_round_3(line):
    if line.startswith("round    3/"):
      raise Interrupt  # dies after round 3 finished but before its checkpoint (saved every 2)

  work = str(tmp_path / "resumed")
  with pytest.raises(Interrupt):
    fedavg.run(tiny_config(), work, log=crash_in_round_3)
  lines = []
  resumed = fedavg.run(tiny_config(), work, log=lines.append)
  assert any("resuming from round 2" in ln for ln in lines)
  # the first round's compile is announced once, just before that round (3 on resume) starts
  rounds = [i for i, ln in enumerate(lines) if ln.startswith("round ") and "/" in ln.split()[1]]
  assert [ln for ln in lines if "compiling" in ln] == ["round 3: compiling the round program; later rounds reuse it"]
  assert lines[rounds[0] - 1] == "round 3: compiling the round program; later rounds reuse it"
  assert lines[rounds[0]].startswith("round    3/4 ")
  for a, b in zip(jax.tree.leaves(full["state"]["params"]), jax.tree.leaves(resumed["state"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(full["state"]["rng"]), np.asarray(resumed["state"]["rng"]))
  # metrics.jsonl: evaluations at rounds 0, 2, 4 once each, same numbers as the uninterrupted run
  recs = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  full_recs = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  assert [r["round"] for r in recs] == [0, 2, 4]
  assert recs == full_recs
  for key in ("dice/catheter", "dice/guidewire", "iou/catheter", "unseen/dice/guidewire"):
    assert 0.0 <= recs[-1][key] <= 1.0


@pytest.mark.parametrize("evaluated", [True, False])
def test_a_model_whose_outputs_overflow_is_a_divergence_not_a_result(tmp_path, evaluated):
  """Adam steps of 1e30: round 1's update and parameters are finite, but the model's logits overflow to NaN.
  Before, its evaluation scored argmax(NaN) = background (Dice 0, exit 0) and its checkpoint was kept as the
  last good one. Now the round stops as diverged before its record, evaluation or checkpoint is written,
  whether it is an evaluated round or only a saved one (eval.every=4, checkpoint.every=1)."""
  from fedkd.errors import DivergedError

  c = tiny_config(**{"num_rounds": 2})
  c.client_optimizer.learning_rate = 1e30
  c.checkpoint.every, c.eval.every = 1, (1 if evaluated else 4)
  work = tmp_path / "w"
  with pytest.raises(DivergedError, match=r"^training diverged by round 1: the model's outputs are not finite "):
    fedavg.run(c, str(work), log=_quiet)
  assert [json.loads(ln)["round"] for ln in open(work / "metrics.jsonl")] == [0]
  assert not (work / "rounds.jsonl").exists() or not (work / "rounds.jsonl").read_text().strip()
  assert not [d for d in os.listdir(work / "checkpoints") if d.isdigit()]


def test_an_evaluated_round_predicts_each_held_out_image_once(tmp_path, monkeypatch):
  """The finite-outputs check of an evaluated round is its evaluation (made before the round's record), not a
  batch predicted twice; a round only saved predicts one batch."""
  from fedkd.evaluate import Evaluator

  seen, sizes = [], []
  predict = Evaluator.predict

  def counted(self, params, images):
    if not sizes:
      sizes.extend(len(im) for im, _ in self.sets.values())
    seen.append(len(images))
    return predict(self, params, images)

  monkeypatch.setattr(Evaluator, "predict", counted)
  c = tiny_config(num_rounds=4)
  c.eval.every, c.checkpoint.every = 2, 1
  fedavg.run(c, str(tmp_path / "w"), log=_quiet)
  # rounds 0, 2, 4 evaluated (every site's images once), rounds 1 and 3 saved (one batch of the first site)
  assert sum(seen) == 3 * sum(sizes) + 2 * min(c.eval.batch_size, sizes[0]), (seen, sizes)


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
  """A finished 2-round run of tiny_config (seed 0): (workdir, fedavg.run's result)."""
  work = str(tmp_path_factory.mktemp("two") / "a")
  return work, fedavg.run(tiny_config(num_rounds=2), work, log=_quiet)


def test_a_finished_runs_files_are_the_documented_ones(two_rounds):
  assert_outputs_documented(two_rounds[0], "FedAvg-family")
  assert {"metrics.jsonl", "config.json", "checkpoints"} <= set(os.listdir(two_rounds[0]))


def test_same_seed_same_numbers_other_seed_differs(two_rounds, tmp_path):
  _, a = two_rounds
  b = fedavg.run(tiny_config(num_rounds=2), str(tmp_path / "b"), log=_quiet)
  c = fedavg.run(tiny_config(num_rounds=2, seed=1), str(tmp_path / "c"), log=_quiet)
  la, lb, lc = (jax.tree.leaves(x["state"]["params"]) for x in (a, b, c))
  assert all(np.array_equal(x, y) for x, y in zip(la, lb))
  assert not all(np.array_equal(x, y) for x, y in zip(la, lc))


def test_resume_with_a_different_model_is_refused_and_keeps_the_checkpoint(two_rounds, tmp_path):
  work = str(tmp_path / "w")
  shutil.copytree(two_rounds[0], work)  # a finished 2-round run
  before = sorted(os.listdir(os.path.join(work, "checkpoints")))
  c = tiny_config(num_rounds=4)
  c.model.width = 8
  tb_before = sorted(os.listdir(os.path.join(work, "tb")))
  cfg_before = open(os.path.join(work, "config.json")).read()
  with pytest.raises(CheckpointError, match="use a new --workdir"):
    fedavg.run(c, work, log=_quiet)
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == before
  # a refused resume leaves no new (empty) TensorBoard event file and the config.json as it was
  assert sorted(os.listdir(os.path.join(work, "tb"))) == tb_before
  assert open(os.path.join(work, "config.json")).read() == cfg_before


def test_an_extended_resume_records_the_new_num_rounds_in_config_json(two_rounds, tmp_path):
  work = str(tmp_path / "w")
  shutil.copytree(two_rounds[0], work)
  assert json.load(open(os.path.join(work, "config.json")))["num_rounds"] == 2
  fedavg.run(tiny_config(num_rounds=3), work, log=_quiet)
  assert json.load(open(os.path.join(work, "config.json")))["num_rounds"] == 3


def test_client_sizes_are_unequal_with_skew_and_weight_the_mean():
  c = tiny_config()
  sizes = pipeline.client_sizes(c)
  assert len(set(sizes.tolist())) > 1 and sizes.min() >= c.batch_size
  idx = pipeline.round_indices(c, 1, np.array([0, 3]), sizes)
  assert idx.shape == (2, c.local_steps * c.batch_size)
  assert (idx[0] < sizes[0]).all() and (idx[1] < sizes[3]).all()


@pytest.mark.parametrize(
  "key,value,needle",
  [
    ("clients_per_round", 9, "clients_per_round"),
    ("batch_size", 0, "batch_size"),
    ("image_size", -8, "image_size"),
    ("num_rounds", 0, "num_rounds"),
    ("local_steps", 0, "local_steps"),
    ("engine.compute_dtype", "float16", "compute_dtype"),
    ("engine.client_layout", "pmap", "client_layout"),
    ("engine.conv_lowering", "winograd", "conv_lowering"),
    ("engine.client_parallelism", "pmap", "client_parallelism"),
    ("engine.client_parallelism", "measure", "python -m bench --measure"),
    ("engine.chunk_strategy", "map", "chunk_strategy"),
    ("algorithm.name", "fedyogi", "algorithm.name"),  # (fedprox exists now)
    ("algorithm.client_state", "disk", "client_state"),  # read by scaffold (set below for this key)
    ("algorithm.name", "scaffold", "client_optimizer.name='sgd'"),
  ],
)
def test_validate_names_the_bad_key(key, value, needle):
  c = tiny_config()
  *groups, leaf = key.split(".")
  node = c
  for g in groups:
    node = node[g]
  node[leaf] = value
  if key == "algorithm.client_state":  # a stateless algorithm leaves it unread (noted, not range-checked)
    c.algorithm.name, c.client_optimizer.name = "scaffold", "sgd"
  with pytest.raises(ConfigError, match=needle):
    validate(c, 8)


def test_validate_rejects_a_client_count_the_mesh_cannot_split():
  c = tiny_config(clients_per_round=3)
  c.mesh.client_devices = 2
  with pytest.raises(ConfigError, match="mesh.client_devices=1"):
    validate(c, 2)
  c.mesh.client_devices = 1
  assert validate(c, 8) == 1
  c.mesh.client_devices = 0  # automatic: the largest device count that splits the clients
  assert validate(c, 8) == 1
  c.clients_per_round = 4
  assert validate(c, 8) == 4


def test_mesh_advice_can_be_followed():
  """With 4 clients on 8 devices the first advice was 'use a multiple of 8' clients per round (at most 4 are
  sampled), and too many devices got '0 (all)' although 0 picks the devices that split the clients (here 4)."""
  c = tiny_config(num_clients=4, clients_per_round=4)
  c.mesh.client_devices = 8
  with pytest.raises(ConfigError) as e:
    validate(c, 8)
  assert "multiple" not in str(e.value) and "set --config.mesh.client_devices=4" in str(e.value), e.value
  c.mesh.client_devices = 16
  with pytest.raises(ConfigError, match=r"use a value in 1\.\.8, or 0 \(automatic: .* here 4\)"):
    validate(c, 8)
  c.mesh.client_devices = 0
  assert validate(c, 8) == 4  # what the message said 0 gives


@pytest.mark.parametrize(
  "args,devices,needle",
  [
    (["--config.num_clinets=3"], 1, "did you mean --config.num_clients"),
    (["--config.clients_per_round=9"], 1, "config.clients_per_round=9 is larger than config.num_clients=4"),
    (["--config.batch_size=0"], 1, "config.batch_size=0 must be a positive number"),
    (["--config.image_size=-64"], 1, "config.image_size=-64 must be a positive number"),
    (["--config.clients_per_round=3", "--config.mesh.client_devices=2"], 2, "cannot be split over the 2 devices"),
    (["--config.num_clients=abc"], 1, "--config.num_clients"),
  ],
)
def test_cli_bad_config_is_one_clear_line(cli, args, devices, needle):
  r = cli.run(
    "fedkd.main",
    [
      "--config=configs/quickstart.py",
      "--workdir=/nonexistent/should_not_be_created",
      f"--cpu_devices={devices}",
      *args,
    ],
    timeout=120,
  )
  assert r.code == 2, r.stderr
  err = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
  assert err[0].startswith("fedkd: error:") and needle in err[0], err[0]
  assert not os.path.exists("/nonexistent/should_not_be_created")


def test_attack_and_robust_aggregator_from_the_config(tmp_path):
  """config.attack / config.aggregator reach the round: 1 of 2 clients sends x -10 updates and norm
  clipping (clip 1e-3) bounds the server's step (the unclipped attacked mean through the engine:
  tests/test_aggregate.py)."""
  moved = {}
  for agg in ("norm_clip",):
    c = tiny_config(num_rounds=1, num_clients=2, clients_per_round=2)
    c.attack.name, c.attack.fraction = "scale", 0.5
    c.aggregator.name, c.aggregator.clip_norm = agg, 1e-3
    lines = []
    out = fedavg.run(c, str(tmp_path / agg), log=lines.append)
    assert "1 attacker client(s) (scale)" in lines[0] and (agg == "mean" or "aggregator norm_clip" in lines[0])
    _, _, p0 = init_model(c.model, c.seed)
    step = np.sqrt(
      sum(
        float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
        for a, b in zip(jax.tree.leaves(out["state"]["params"]), jax.tree.leaves(p0))
      )
    )
    moved[agg] = step
  assert 0 < moved["norm_clip"] <= 1e-3 * (1 + 1e-4), moved  # (unclipped, the attacked mean: test_aggregate.py)


@pytest.mark.parametrize(
  "overrides,needle",
  [
    ({"aggregator.name": "median", "algorithm.name": "scaffold"}, "works with config.algorithm.name"),
    ({"aggregator.name": "krum", "aggregator.krum_f": 2}, "needs at least krum_f"),
    ({"aggregator.name": "trimmed_mean", "aggregator.trim_beta": 0.5}, "config.aggregator.trim_beta"),
    # floor(0.2 x 4) = 0 values dropped: silently the plain mean, which the attacker passes
    ({"aggregator.name": "trimmed_mean", "aggregator.trim_beta": 0.2}, r"drops floor\(0.2 x 4\) = 0 values.*>= 0.25"),
    # multi-Krum of every client of the round: the plain mean (explicit k, or krum_f=0 with k = clients - f)
    ({"aggregator.name": "multi_krum", "aggregator.multi_krum_k": 4}, r"multi_krum_k=4 averages all 4 clients"),
    ({"aggregator.name": "multi_krum", "aggregator.krum_f": 0}, r"krum_f=0 \(k = clients - krum_f = 4\) averages all"),
    # 1e39 is finite in float64 but inf in the float32 update it multiplies
    ({"attack.name": "scale", "attack.factor": 1e39}, "finite in float32"),
    ({"aggregator.name": "median", "engine.skip_nonfinite_clients": True}, "needs a linear aggregator"),
    ({"attack.name": "scale", "attack.fraction": 0.0}, "config.attack.fraction"),
    ({"attack.name": "bogus"}, "config.attack.name"),
    # round(0.9 x 4) = 4 of 4 clients attack: no honest update left
    ({"attack.name": "sign_flip", "attack.fraction": 0.9}, "makes all 4 client.s. attackers"),
  ],
)
def test_robustness_config_errors(overrides, needle):
  c = tiny_config(clients_per_round=4, num_clients=4)
  for k, v in overrides.items():
    group, key = k.split(".")
    c[group][key] = v
  if c.algorithm.name == "scaffold":
    c.client_optimizer.name, c.client_optimizer.momentum = "sgd", 0.0
  with pytest.raises(ConfigError, match=needle):
    validate(c, 1)


def test_tensorboard_gets_every_comm_field_of_the_round_record():
  """docs/outputs.md promises TensorBoard `comm/*`: the same four values as rounds.jsonl."""
  rec, scalars = fedavg.round_logs(3, 0.5, [0, 1], 2, 10.0, 20.0, 30.0, 60.0)
  want = {"comm/bytes_up": 10.0, "comm/bytes_down": 20.0, "comm/bytes_up_total": 30.0, "comm/bytes_down_total": 60.0}
  assert {k: v for k, v in rec.items() if k.startswith("comm/")} == want
  assert {k: v for k, v in scalars.items() if k.startswith("comm/")} == want


def test_a_refused_resume_names_every_key_that_differs():
  """Six keys differed and the message said '6 key(s) differ' but named five (num_clients, the one to pass,
  cut without a mark)."""
  from fedkd import checkpoint as ckpt_lib
  from fedkd.tasks.fedavg import _check_resumable

  saved = tiny_config()
  current = tiny_config(num_rounds=4, num_clients=8, clients_per_round=4, batch_size=4, image_size=64, seed=3)
  current.eval.examples_per_site = saved.eval.examples_per_site + 1
  current.local_steps = 2
  with pytest.raises(ckpt_lib.ResumeRefused) as e:
    _check_resumable(saved.to_dict(), current.to_dict(), "ck")
  keys = ["batch_size", "clients_per_round", "image_size", "local_steps", "num_clients", "seed"]
  assert f"(6 key(s) differ: {', '.join(keys)})" in str(e.value), e.value
  for i in range(4):
    current[f"unknown_{i}"] = i  # ten keys: eight named, and how many more
  with pytest.raises(
    ckpt_lib.ResumeRefused, match=r"\(10 key\(s\) differ: batch_size, .*, seed, unknown_0, unknown_1 and 2 more\)"
  ):
    _check_resumable(saved.to_dict(), current.to_dict(), "ck")


def test_a_finished_run_run_again_says_there_is_nothing_to_train(tmp_path):
  """It printed 'resuming from round 1', evaluated and printed the table again, as if it had trained on."""
  c = tiny_config(num_rounds=1)
  fedavg.run(c, str(tmp_path / "w"), log=lambda _: None)
  lines = []
  fedavg.run(c, str(tmp_path / "w"), log=lines.append)
  assert any(
    ln == f"note: {tmp_path / 'w'} already finished round 1: nothing to train; scoring the restored model (raise "
    "--config.num_rounds to train on)"
    for ln in lines
  ), lines
  assert not any(ln.startswith("round    1/") for ln in lines), lines
