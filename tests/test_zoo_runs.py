"""The issue-14 methods reach a training run: client dropout and who reported per round, DP-FedAvg's
privacy spent and its target-epsilon stop, compressed uploads and their bytes, personal models evaluated
on their own sites. The methods themselves are checked against per-client references in
tests/test_algorithms.py (dropout), tests/test_dp.py, tests/test_compress.py and tests/test_personal.py."""

import json
import math
import os

import dp_accounting
import jax
import numpy as np
import pytest

from fedkd.config import ConfigError
from fedkd.data import pipeline
from fedkd.evaluate import Evaluator, summarize
from fedkd.models import init_model
from fedkd.tasks import fedavg
from test_training import tiny_config


def _jsonl(path):
  with open(path) as f:
    return [json.loads(ln) for ln in f]


def _accountant_epsilon(z, n, m, rounds, delta):
  """dp_accounting's RDP epsilon for ``rounds`` rounds of m of n clients sampled without replacement,
  REPLACE_ONE (sum sensitivity 2 x clip: multiplier z / 2), or of the unsampled mechanism if smaller."""
  if rounds == 0:
    return 0.0

  def eps(event):
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(acc.get_epsilon(delta))

  gauss = dp_accounting.GaussianDpEvent(z / 2)
  return min(eps(gauss), eps(dp_accounting.SampledWithoutReplacementDpEvent(n, m, gauss)))


def test_dropout_dp_and_topk_in_one_run_stop_at_the_privacy_budget_and_resume(tmp_path):
  """8 clients, 4 per round, each failing to report with p = 0.5; DP-FedAvg (z = 1) with a target
  epsilon between the accountant's values after 3 and 4 rounds; top-10% uploads. The run stops after
  round 3 of 6; rounds.jsonl says who took part and what they sent; raising the target resumes it."""
  c = tiny_config(num_rounds=6, num_clients=8, clients_per_round=4)
  c.eval.every, c.checkpoint.every = 3, 3
  c.algorithm.dropout = 0.5
  c.dp.enabled, c.dp.clip_norm, c.dp.noise_multiplier, c.dp.delta = True, 0.01, 1.0, 1e-3
  eps = [_accountant_epsilon(1.0, 8, 4, r, 1e-3) for r in range(7)]
  assert all(a < b for a, b in zip(eps, eps[1:]))
  c.dp.target_epsilon = (eps[3] + eps[4]) / 2
  c.compress.name, c.compress.fraction = "topk", 0.1
  work = str(tmp_path / "w")
  lines = []
  fedavg.run(c, work, log=lines.append)
  text = "\n".join(lines)
  assert "allows 3 of the 6 rounds" in text and "stopped after round 3 of 6" in text, text[-2000:]
  assert "privacy: epsilon" in text and "communication:" in text

  # what one client sends: per tensor the ceil(10%) largest entries, 4-byte value + 4-byte index each
  _, _, params = init_model(c.model, c.seed)
  per_client = sum(8 * math.ceil(0.1 * a.size) if a.size > 1 else 4 for a in jax.tree.leaves(params))
  rounds = _jsonl(os.path.join(work, "rounds.jsonl"))
  assert [r["round"] for r in rounds] == [1, 2, 3]
  for r in rounds:
    assert len(r["clients"]) == 4 and set(r["reported"]) <= set(r["clients"])
    assert r["participants"] == len(r["reported"])
    assert r["comm/bytes_up"] == per_client * r["participants"]
    assert r["dp/epsilon"] == pytest.approx(eps[r["round"]], rel=1e-9)
    # top-10% of each tensor: some of the update is not sent (in (0, 1)); nobody reported: no error
    err = r["comm/compress_error"]
    assert (err is None) if not r["participants"] else 0 < err < 1, r
  assert sum(r["participants"] for r in rounds) < 12  # somebody dropped out (p = 0.5, 12 draws)
  last = _jsonl(os.path.join(work, "metrics.jsonl"))[-1]
  assert last["round"] == 3 and last["dp/epsilon"] == pytest.approx(eps[3], rel=1e-9)
  assert last["comm/bytes_up_total"] == sum(r["comm/bytes_up"] for r in rounds)

  # a target lowered below what the 3 rounds spent: it said "allows 3 of the 6 rounds" (the rounds done, not
  # what the target allows) and "round 4 would spend ...", never that the budget was already exceeded
  c.dp.target_epsilon = (eps[1] + eps[2]) / 2
  lines = []
  fedavg.run(c, work, log=lines.append)
  text = "\n".join(lines)
  assert "allows 3 of the 6" not in text, text
  assert (
    f"already finished round 3: nothing to train; scoring the restored model (config.dp.target_epsilon="
    f"{c.dp.target_epsilon:g} allows 1 round(s), and its 3 rounds have already spent epsilon {eps[3]:.3f})"
  ) in text, text
  assert f"stopped after round 3 of 6: its rounds have spent epsilon {eps[3]:.3f} > config.dp.target_epsilon" in text
  assert [r["round"] for r in _jsonl(os.path.join(work, "rounds.jsonl"))] == [1, 2, 3]

  c.dp.target_epsilon = 0.0  # may change on resume: the run continues to round 6 ...
  lines = []
  resumed = fedavg.run(c, work, log=lines.append)
  assert any("resuming from round 3" in ln for ln in lines)
  rounds = _jsonl(os.path.join(work, "rounds.jsonl"))
  assert [r["round"] for r in rounds] == list(range(1, 7))
  assert _jsonl(os.path.join(work, "metrics.jsonl"))[-1]["dp/epsilon"] == pytest.approx(eps[6], rel=1e-9)
  # ... exactly as an uninterrupted run: dropout draws, DP noise, top-k residual rows, every parameter
  full = fedavg.run(c, str(tmp_path / "full"), log=lambda _: None)
  assert _jsonl(os.path.join(tmp_path / "full", "rounds.jsonl")) == rounds
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(full["client_state"]), jax.tree.leaves(resumed["client_state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ditto_evaluates_each_training_site_with_its_clients_personal_model(tmp_path):
  """The per-site records of a Ditto run are the Evaluator's numbers for each client's personal model
  (its row), the unseen site the global model's. The default lambda: the round program is
  test_personal_state_resumes_exactly's (compiled once)."""
  c = tiny_config(num_rounds=2, num_clients=2, clients_per_round=2)
  c.algorithm.name = "ditto"
  c.eval.every, c.eval.max_sites = 2, 2
  lines = []
  out = fedavg.run(c, str(tmp_path / "d"), log=lines.append)
  assert any("personal models" in ln for ln in lines)
  apply, _, _ = init_model(c.model, c.seed)
  data = pipeline.make_client_data(c)
  ev = Evaluator(c, apply, data.eval_sets([0, 1]))
  ids, rows = out["client_state"]["ids"], out["client_state"]["rows"]
  assert list(ids) == [0, 1]
  personal = {data.site_names[i]: jax.tree.map(lambda a, i=i: np.asarray(a)[i], rows) for i in range(2)}
  want = summarize(2, ev(jax.device_get(out["state"]["params"]), personal), data.unseen_name)
  got = out["metrics"]
  for k, v in want.items():
    assert got[k] == v, k
  glob = ev(jax.device_get(out["state"]["params"]))
  assert glob[data.unseen_name] == {k[len("unseen/") :]: v for k, v in got.items() if k.startswith("unseen/")}


def test_ditto_scores_a_never_sampled_clients_site_with_the_global_model(tmp_path):
  """One of four clients sampled in the only round: the other three sites were scored with their rows, the
  untrained initial model (round 0's numbers in the training-site mean). They are now scored with the global
  model, the sampled client's site with its personal model, and the final table says which."""
  c = tiny_config(num_rounds=1, num_clients=4, clients_per_round=1)
  c.algorithm.name = "ditto"
  c.eval.every, c.eval.max_sites = 1, 4
  lines = []
  out = fedavg.run(c, str(tmp_path / "d"), log=lines.append)
  apply, _, _ = init_model(c.model, c.seed)
  data = pipeline.make_client_data(c)
  ev = Evaluator(c, apply, data.eval_sets(list(range(4))))
  (sampled,) = out["client_state"]["ids"]
  row = jax.tree.map(lambda a: np.asarray(a)[0], out["client_state"]["rows"])
  glob = jax.device_get(out["state"]["params"])
  want = summarize(1, ev(glob, {data.site_names[sampled]: row}), data.unseen_name)
  for k, v in want.items():
    assert out["metrics"][k] == v, k
  never = [data.site_names[i] for i in range(4) if i != sampled]
  header = [ln for ln in lines if ln.startswith("\nheld-out Dice")]
  assert (
    header
    and f"{', '.join(never)} with the global model: its client never trained (not sampled, or dropped)" in header[0]
  ), header
  untrained = ev(init_model(c.model, c.seed)[2])  # what those sites scored before
  assert any(untrained[n] != ev(glob)[n] for n in never)


def test_a_privacy_budget_that_allows_no_round_is_a_config_error_before_anything_is_written(tmp_path):
  c = tiny_config(num_clients=4, clients_per_round=4)
  c.dp.enabled, c.dp.noise_multiplier, c.dp.delta = True, 2.0, 1e-3
  c.dp.target_epsilon = 0.5 * _accountant_epsilon(2.0, 4, 4, 1, 1e-3)
  with pytest.raises(ConfigError, match=r"dp.target_epsilon=.* allows no round: one round already spends epsilon"):
    fedavg.run(c, str(tmp_path / "w"), log=lambda _: None)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", ["fedbn", "ditto"])
def test_personal_state_resumes_exactly(name, tmp_path):
  """FedBN's normalisation rows and Ditto's personal models go through the checkpoint: a run killed after
  round 3 (checkpoints every 2 rounds) and resumed ends bitwise where an uninterrupted run does."""
  c = tiny_config(num_rounds=4, num_clients=4, clients_per_round=2)
  c.algorithm.name = name
  full = fedavg.run(c, str(tmp_path / "full"), log=lambda _: None)

  class Killed(Exception):
    pass

  def die_after_round_3(line):
    if line.startswith("round    3/"):
      raise Killed

  work = str(tmp_path / "w")
  with pytest.raises(Killed):
    fedavg.run(c, work, log=die_after_round_3)
  lines = []
  resumed = fedavg.run(c, work, log=lines.append)
  assert any("resuming from round 2" in ln for ln in lines)
  for part in ("state", "client_state"):
    a, b = jax.tree.leaves(full[part]), jax.tree.leaves(resumed[part])
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _jsonl(os.path.join(work, "metrics.jsonl")) == _jsonl(os.path.join(tmp_path / "full", "metrics.jsonl"))


def test_a_round_in_which_no_sampled_client_reports_has_no_loss(tmp_path):
  """With algorithm.dropout every sampled client may fail to report: such a round has no training loss
  (null in rounds.jsonl, 'none' on the console), not a loss of 0, nor a DP median norm or clipped fraction
  (null), while its epsilon is spent."""
  c = tiny_config(num_rounds=4, num_clients=2, clients_per_round=1)
  c.algorithm.dropout = 0.9
  c.dp.enabled, c.dp.clip_norm, c.dp.noise_multiplier, c.dp.delta = True, 0.01, 1.0, 1e-3
  c.eval.every, c.checkpoint.every = 4, 4
  work = str(tmp_path / "w")
  lines = []
  fedavg.run(c, work, log=lines.append)
  rounds = _jsonl(os.path.join(work, "rounds.jsonl"))
  assert [r["round"] for r in rounds] == [1, 2, 3, 4]
  silent = [r["round"] for r in rounds if r["participants"] == 0]
  assert silent, rounds  # p = 0.9 per round: at least one silent round in 4 (this seed has several)
  for r in rounds:
    assert (r["loss"] is None) == (r["participants"] == 0), r
    assert r["dp/epsilon"] == pytest.approx(_accountant_epsilon(1.0, 2, 1, r["round"], 1e-3), rel=1e-9)
    if r["loss"] is not None:
      assert math.isfinite(r["loss"]) and r["loss"] > 0
      assert r["dp/median_norm"] > 0 and r["dp/clipped_fraction"] in (0.0, 1.0)
    else:
      assert r["dp/median_norm"] is None and r["dp/clipped_fraction"] is None
  for r in silent:
    (line,) = [ln for ln in lines if ln.startswith(f"round {r:>4}/")]
    assert "loss   none (no sampled client reported)" in line, line


def test_dropout_with_skipped_clients_stops_when_every_reporting_client_diverged(tmp_path):
  """engine.skip_nonfinite_clients with dropout: a round whose reporting clients all have non-finite updates
  stops the run as diverged (as without dropout), even though the clients that did not report count as
  finite; it does not go on with a kept server and a loss of 0."""
  from fedkd.tasks.fedavg import DivergedError

  c = tiny_config(num_rounds=3, num_clients=4, clients_per_round=4)
  c.algorithm.dropout = 0.5
  c.engine.skip_nonfinite_clients = True
  c.client_optimizer.learning_rate, c.local_steps = 1e38, 2  # the second local step overflows
  work = str(tmp_path / "w")
  with pytest.raises(DivergedError, match="training diverged in round 1: .*non-finite updates from client"):
    fedavg.run(c, work, log=lambda _: None)
  assert not os.path.exists(os.path.join(work, "rounds.jsonl")) or not _jsonl(os.path.join(work, "rounds.jsonl"))
