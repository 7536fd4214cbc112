"""Replicas of one program (fedkd.tasks.replicas) for a combination tests/test_replicas.py does not run: FedNova
with a FedYogi server whose learning rate differs between the replicas, clients sampled 2 of 4. The reference is
each replica's own single run (fedkd.tasks.fedavg.run, where the learning rate is a Python constant): the same
parameters and rng bit for bit, the same rounds.jsonl and metrics.jsonl byte for byte, and a replica's checkpoint
continued by a single run ends where the uninterrupted single run does."""

import jax
import numpy as np

from fedkd.tasks import fedavg, replicas
from test_training import tiny_config


def _configs(num_rounds):
  out = []
  for seed, server_lr in ((0, 0.01), (1, 0.03)):
    c = tiny_config(num_rounds=num_rounds, seed=seed)
    c.algorithm.name = "fednova"
    c.client_optimizer.name, c.client_optimizer.learning_rate = "sgd", 0.05
    c.server_optimizer.name, c.server_optimizer.learning_rate = "yogi", server_lr
    c.eval.every = c.checkpoint.every = 1
    out.append(c)
  return out


def _assert_same_state(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _lines(path):
  return path.read_text().splitlines()


def test_fednova_yogi_lr_grid_replicas_write_their_single_runs_files_and_checkpoints(tmp_path):
  singles = [fedavg.run(c, str(tmp_path / f"s{c.seed}"), log=lambda _: None) for c in _configs(3)]
  configs = _configs(2)
  wds = [tmp_path / f"r{c.seed}" for c in configs]
  replicas.run(configs, [str(w) for w in wds], log=lambda _: None)
  for i, c in enumerate(configs):
    single = tmp_path / f"s{c.seed}"
    # rounds 1-2 of the 3-round single run, line for line: losses, sampled clients, bytes, evaluations (each
    # replica's own server learning rate: the other's would change its losses from round 2 on)
    assert _lines(wds[i] / "rounds.jsonl") == _lines(single / "rounds.jsonl")[:2]
    assert _lines(wds[i] / "metrics.jsonl") == _lines(single / "metrics.jsonl")[:3]
  # a replica's workdir is an ordinary run's: a single run continues it to round 3 and ends where the
  # uninterrupted single run ended, parameters, server optimizer state and rng bit for bit
  c = _configs(3)[1]
  cont = fedavg.run(c, str(wds[1]), log=lambda _: None)
  _assert_same_state(cont["state"], singles[1]["state"])
  assert _lines(wds[1] / "rounds.jsonl") == _lines(tmp_path / "s1" / "rounds.jsonl")
  assert _lines(wds[1] / "metrics.jsonl") == _lines(tmp_path / "s1" / "metrics.jsonl")
