"""Determinism and exact resume of the FedAvg-family task across algorithms, wrappers and layouts.

Each case stacks several features into one small program (one compile): an algorithm with per-client rows
(MOON on the device, Ditto on the host) or without (FedProx), a server optimizer (FedAdam, FedYogi, FedAvgM), an
upload wrapper (int8 / top-k compression, DP-FedAvg, an attack with a robust aggregator), client dropout,
drawn local step counts and client sampling (clients_per_round < num_clients). Every case is checked
against a separate uninterrupted run of the same config:

a run stopped by a real SIGTERM after round 1 (``fedkd.preemption.StopSignals``), continued with a
*smaller* ``num_rounds`` (2, so no next round is drawn ahead) and then extended to the full run's 3, has the
same ``rounds.jsonl`` and ``metrics.jsonl`` and bitwise the same server state and client rows.

Cases already covered elsewhere are left out (FedAvg crash/SIGTERM/kill: test_resume_robustness.py;
SCAFFOLD host/device: test_client_state.py; FedBN/Ditto crash: test_zoo_runs.py; FedNova drawn steps:
test_algorithms.py). Two layouts (unroll, chunked) are compared through the task with FedBN's rows and
wrappers; per-client loops of each layout are in test_engine.py, test_personal.py, test_dp.py.
"""

import json
import os
import signal
import threading

import jax
import numpy as np
import pytest

from fedkd.preemption import StopSignals, Stopped
from fedkd.tasks import fedavg
from test_training import tiny_config

# Each case: overrides of tiny_config (3 rounds, 2 of 4 clients per round, evaluations and checkpoints
# every 2 rounds).
CASES = {
  # MOON rows on the device, int8 uploads keyed by round and client id, Gaussian attackers under norm
  # clipping, dropout and drawn step counts from the round key, FedAdam's moments in the server state
  "moon_int8_gauss_dropout_fedadam": {
    "algorithm.name": "moon",
    "algorithm.client_state": "device",
    "algorithm.dropout": 0.3,
    "algorithm.local_steps_min": 1,
    "compress.name": "int8",
    "attack.name": "gaussian",
    "attack.fraction": 0.25,
    "aggregator.name": "norm_clip",
    "server_optimizer.name": "adam",
    "server_optimizer.learning_rate": 0.01,
  },
  # Ditto's personal models and top-k residuals in one host row, FedYogi, the coordinate-wise median
  "ditto_topk_median_fedyogi": {
    "algorithm.name": "ditto",
    "algorithm.client_state": "host",
    "compress.name": "topk",
    "compress.fraction": 0.2,
    "aggregator.name": "median",
    "server_optimizer.name": "yogi",
    "server_optimizer.learning_rate": 0.01,
  },
  # FedProx under DP-FedAvg (one noise draw per round from the server key), FedAvgM, drawn step counts
  "fedprox_dp_fedavgm": {
    "algorithm.name": "fedprox",
    "algorithm.prox_mu": 0.1,
    "algorithm.local_steps_min": 1,
    "dp.enabled": True,
    "dp.noise_multiplier": 0.5,
    "server_optimizer.momentum": 0.9,
  },
}


def _config(overrides, **more):
  c = tiny_config(num_rounds=3, local_steps=2)
  # local steps in a lax.scan, not unrolled (the same step function; half the program to compile): neither
  # resuming nor the client layouts compared below depend on it
  c.engine.unroll_local_steps = "false"
  for key, value in {**overrides, **more}.items():
    *groups, last = key.split(".")
    node = c
    for g in groups:
      node = node[g]
    node[last] = value
  return c


def _jsonl(work, name):
  with open(os.path.join(work, name)) as f:
    return [json.loads(ln) for ln in f if ln.strip()]


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _quiet(_):
  pass


def _sigterm_after_round_1(line):
  if line.startswith("round    1/"):
    os.kill(os.getpid(), signal.SIGTERM)  # StopSignals catches it: the run saves round 1 and stops


def _assert_same_run(work, out, ref_work, ref):
  """Same rounds.jsonl and metrics.jsonl, bitwise the same server state and client rows."""
  assert _jsonl(work, "rounds.jsonl") == _jsonl(ref_work, "rounds.jsonl")
  assert _jsonl(work, "metrics.jsonl") == _jsonl(ref_work, "metrics.jsonl")
  _assert_trees_equal(out["state"], ref["state"])
  assert ("client_state" in out) == ("client_state" in ref)
  if "client_state" in ref:
    _assert_trees_equal(out["client_state"], ref["client_state"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigterm_then_shorter_then_extended_resume_equals_the_uninterrupted_run(case, tmp_path):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("SIGTERM is caught by StopSignals in the main thread only")
  full_work, work = str(tmp_path / "full"), str(tmp_path / "resumed")
  full = fedavg.run(_config(CASES[case]), full_work, log=_quiet)
  rounds = _jsonl(full_work, "rounds.jsonl")
  assert [r["round"] for r in rounds] == [1, 2, 3]
  assert len({tuple(r["clients"]) for r in rounds}) > 1  # 2 of 4 clients sampled, not always the same

  with pytest.raises(Stopped) as stopped, StopSignals(log=_quiet) as stop:
    fedavg.run(_config(CASES[case]), work, log=_sigterm_after_round_1, stop=stop)
  assert stopped.value.round == 1 and stopped.value.exit_code == 0
  assert [r["round"] for r in _jsonl(work, "rounds.jsonl")] == [1]

  lines = []
  fedavg.run(_config(CASES[case], num_rounds=2), work, log=lines.append)  # a shorter run: no next round drawn
  assert any("resuming from round 1" in ln for ln in lines)
  lines = []
  resumed = fedavg.run(_config(CASES[case]), work, log=lines.append)  # extended to the full run's 3 rounds
  assert any("resuming from round 2" in ln for ln in lines)
  _assert_same_run(work, resumed, full_work, full)


def test_layouts_agree_through_the_task_with_rows_and_wrappers(tmp_path):
  """4 clients: unroll on two devices (two clients unrolled on each, one in flight: the in-order sum; each
  unrolled client adds to the program XLA compiles) and chunked on one device (a scan over vmapped pairs)
  are the same math for FedBN's rows, dropout, drawn step counts and Gaussian attackers under
  norm clipping: same clients and participants, losses within float rounding, parameters and rows within
  a few 1e-5. (Not top-k or int8: their selection / rounding is discontinuous, so a last-bit difference
  can send another entry or level; GroupNorm makes some update entries tie exactly in magnitude.)"""
  case = {
    "algorithm.name": "fedbn",
    "algorithm.dropout": 0.3,
    "algorithm.local_steps_min": 1,
    "attack.name": "gaussian",
    "attack.fraction": 0.25,
    "aggregator.name": "norm_clip",
  }
  layouts = {
    "unroll": {"engine.client_layout": "unroll", "engine.clients_in_flight": "1", "mesh.client_devices": 2},
    "chunked": {"engine.client_layout": "chunked", "engine.client_chunk": 2, "mesh.client_devices": 1},
  }
  out, rounds = {}, {}
  for name, engine in layouts.items():
    work = str(tmp_path / name)
    lines = []
    out[name] = fedavg.run(_config({**case, **engine}, num_rounds=2, clients_per_round=4), work, log=lines.append)
    assert any(f"clients run as {name}" in ln for ln in lines)
    rounds[name] = _jsonl(work, "rounds.jsonl")
  a, b = rounds["unroll"], rounds["chunked"]
  assert [{k: v for k, v in r.items() if k != "loss"} for r in a] == [
    {k: v for k, v in r.items() if k != "loss"} for r in b
  ]
  assert any(r["participants"] < 4 for r in a)  # somebody dropped out
  np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
  for part in ("state", "client_state"):
    la, lb = jax.tree.leaves(out["unroll"][part]), jax.tree.leaves(out["chunked"][part])
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=5e-5)


def test_sigterm_during_a_checkpoint_save_stops_after_that_round(tmp_path, monkeypatch):
  """SIGTERM while round 2's checkpoint is being saved (after the round's stop check): round 2 is saved, so the
  run stops there, not after training round 3 (a preemption notice leaves seconds, not another round)."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("SIGTERM is caught by StopSignals in the main thread only")
  from fedkd.checkpoint import Checkpointer

  real_save = Checkpointer.save

  def save(self, round_, *args, **kwargs):
    real_save(self, round_, *args, **kwargs)
    if round_ == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(Checkpointer, "save", save)
  work = str(tmp_path / "w")
  with pytest.raises(Stopped) as stopped, StopSignals(log=_quiet) as stop:
    fedavg.run(tiny_config(num_rounds=4), work, log=_quiet, stop=stop)
  assert stopped.value.round == 2 and stopped.value.exit_code == 0
  assert [r["round"] for r in _jsonl(work, "rounds.jsonl")] == [1, 2]
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2"]
