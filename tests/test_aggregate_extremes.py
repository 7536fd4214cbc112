"""Robust aggregators (fedkd.fl.aggregate) at the edges of float32 and of pytree shapes, against numpy."""

import math

import numpy as np
import pytest
from test_aggregate import _aggregate

from fedkd.fl.aggregate import Krum, Median, MultiKrum, NormClip, TrimmedMean

TOP = float(np.finfo(np.float32).max)


def _trimmed_f64(values, beta):
  """numpy in float64: sort each coordinate, drop floor(beta m) at each end, average the rest."""
  m = values.shape[0]
  t = math.floor(beta * m)
  return np.sort(np.asarray(values, np.float64), axis=0)[t : m - t].mean(axis=0)


@pytest.mark.parametrize("n_dev", [1, 8])
@pytest.mark.parametrize(
  "rows,beta",
  [
    # 3 of 8 attackers send 2e38: after dropping one value at each end two of them are kept; their sum overflows
    ([[2e38, 0.0]] * 3 + [[-1.0 * i, float(i)] for i in range(3, 8)], 0.125),
    ([[2e38, 0.0]] * 3 + [[-1.0 * i, float(i)] for i in range(3, 8)], 0.2),
    # every kept value at float32's largest (either sign): the mean is that value, not inf
    ([[TOP, -TOP]] * 8, 0.0),
    ([[TOP, -TOP]] * 6 + [[1.0, 2.0]] * 2, 0.25),
    # +max and -max kept together: their sum is inf - inf = NaN in float32, their mean is 0
    ([[TOP, 1.0], [TOP, 2.0], [-TOP, 3.0], [-TOP, 4.0]] * 2, 0.0),
  ],
)
def test_trimmed_mean_of_huge_kept_values_is_their_finite_mean(n_dev, rows, beta):
  """aggregator trimmed_mean with finite uploads near float32's largest (a strong scale attack): the result is
  the float64 trimmed mean, as the median and Krum give theirs, not inf / NaN from adding the values first
  (which stopped the run as diverged)."""
  values = np.asarray(rows, np.float32)
  assert np.isfinite(values).all()
  weights = np.ones(values.shape[0], np.float32)
  got = _aggregate(TrimmedMean(beta), {"w": values}, weights, n_dev)["w"]
  ref = _trimmed_f64(values, beta)
  assert np.isfinite(got).all(), got
  # float32's error bound for a mean: a few ulps of the largest value added (+max and -max cancel to 0 +- that)
  np.testing.assert_array_less(np.abs(got - ref), 1e-6 * (np.abs(ref) + np.abs(values).max(axis=0)))


@pytest.mark.parametrize("n_dev", [1, 8])
def test_trimmed_mean_with_a_client_left_out_and_huge_values(n_dev):
  """The overflow-safe mean counts only the clients that count (weight 0 and NaN uploads are left out)."""
  values = np.asarray([[3e38, 1.0]] * 4 + [[np.nan, 2.0], [-5.0, 7.0], [1.0, 3.0], [2.0, 4.0]], np.float32)
  weights = np.ones(8, np.float32)
  weights[7] = 0.0
  got = _aggregate(TrimmedMean(0.2), {"w": values}, weights, n_dev)["w"]
  counting = [0, 1, 2, 3, 5, 6]  # client 4 has a NaN, client 7 weight 0
  np.testing.assert_allclose(got, _trimmed_f64(values[counting], 0.2), rtol=1e-6)


@pytest.mark.parametrize("n_dev", [1, 8])
def test_every_aggregator_takes_an_upload_with_an_empty_leaf(n_dev):
  """An upload pytree with a zero-size leaf (as the mean, Krum and norm clipping take it): the median and the
  trimmed mean give that leaf back empty and the others as numpy, instead of failing to lower an all_gather
  of an empty slice."""
  rng = np.random.default_rng(3)
  clients = 8
  uploads = {
    "w": rng.normal(size=(clients, 3, 5)).astype(np.float32),
    "empty": np.zeros((clients, 0, 4), np.float32),
    "s": rng.normal(size=(clients,)).astype(np.float32),
  }
  weights = np.ones(clients, np.float32)
  weights[2] = 0.0
  keep = weights > 0
  for agg, ref in (
    (Median(), lambda u: np.median(u[keep].astype(np.float64), axis=0)),
    (TrimmedMean(0.2), lambda u: _trimmed_f64(u[keep], 0.2)),
  ):
    got = _aggregate(agg, uploads, weights, n_dev)
    assert got["empty"].shape == (0, 4) and got["empty"].dtype == np.float32, agg
    for key in ("w", "s"):
      np.testing.assert_allclose(got[key], ref(uploads[key]), rtol=1e-5, atol=1e-6, err_msg=f"{agg} {key}")
  for agg in (Krum(1), MultiKrum(1), NormClip(1.0)):
    assert _aggregate(agg, uploads, weights, n_dev)["empty"].shape == (0, 4), agg


@pytest.mark.parametrize(
  "agg, reported, nan_client, aggregated",
  [
    (Krum(f=1), [1, 0, 1, 1], None, False),  # 3 counting < f + 3 = 4
    (MultiKrum(f=1, k=2), [1, 1, 1, 1], 2, False),  # a NaN upload leaves 3
    (Krum(f=1), [1, 1, 1, 1], None, True),
    (TrimmedMean(0.25), [1, 1, 0, 1], None, False),  # floor(0.25 x 3) = 0: the plain mean of 3
    (TrimmedMean(0.25), [1, 1, 1, 1], None, True),
    (Median(), [0, 1, 0, 1], None, True),  # no minimum
  ],
)
def test_too_few_counting_clients_keep_the_server_model(agg, reported, nan_client, aggregated):
  """With clients dropped out (or non-finite), Krum scored 2 clients against 1 neighbour each and took the
  attacker's upload, and the trimmed mean trimmed nothing: the minimum was checked on clients_per_round only.
  Below the aggregator's minimum of counting clients the server keeps its model, momentum included."""
  import jax
  import jax.numpy as jnp
  import optax
  from test_aggregate import LR, _problem

  from fedkd.fl import algorithms, engine
  from fedkd.fl.algorithm import ClientContext
  from fedkd.sharding import client_mesh, shard_clients

  clients = 4
  apply, params, loss_fn, xs, ys = _problem(3, clients)
  if nan_client is not None:
    xs = xs.copy()
    xs[nan_client, 0, 0, 1, 1, 0] = np.nan
  alg = algorithms.FedAvg(optax.sgd(1.0, momentum=0.9))
  alg.aggregator = agg
  mesh = client_mesh(2)
  fn = engine.make_round_fn(
    alg, ClientContext(apply, loss_fn, optax.sgd(LR)), mesh, engine.EngineOptions("vmap", "xla")
  )
  w = np.array([50.0, 60.0, 70.0, 80.0], np.float32)  # examples per client: the loss is their weighted mean
  sx, sy, sw = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(w)), mesh)
  everyone = shard_clients(jnp.ones(clients, bool), mesh)
  state = alg.init(params, jax.random.key(0))
  state, _, m1 = fn(state, None, {"x": sx, "y": sy, "reported": everyone}, sw)  # momentum now non-zero
  assert bool(m1["aggregated"]) == (nan_client is None or not isinstance(agg, MultiKrum))
  before = jax.tree.map(np.asarray, state)
  some = shard_clients(jnp.asarray(np.asarray(reported, bool)), mesh)
  state, _, m2 = fn(state, None, {"x": sx, "y": sy, "reported": some}, sw)
  assert bool(m2["aggregated"]) == aggregated
  # the round's loss is the mean over the counting clients either way (it was their sum when the model was kept)
  counting = np.asarray(reported, bool) & np.asarray(m2["client_finite"])
  losses = np.asarray(m2["client_loss"], np.float64)[counting]
  assert float(m2["loss"]) == pytest.approx(float(w[counting] @ losses / w[counting].sum()), rel=1e-5)
  after = jax.tree.map(np.asarray, state)
  moved = max(
    float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]))
  )
  if aggregated:
    assert moved > 1e-4
  else:
    assert moved == 0.0  # no server step: a momentum step on a zero aggregate would move it
    assert int(after["round"]) == int(before["round"]) + 1


def test_the_dropout_note_gives_the_share_of_rounds_with_too_few_clients():
  """P(Binomial(m, 1 - dropout) < min): 1 - 6/32 for Krum (f=1: 4 of 5) at dropout 0.5; 1 - 0.9^4 for the trimmed
  mean at beta 0.25 (all 4 of 4) at dropout 0.1; none for the median or without dropout."""
  from fedkd.config import base_config, dropout_note

  c = base_config()
  c.aggregator.name, c.clients_per_round, c.algorithm.dropout = "krum", 5, 0.5
  assert "krum needs 4 of the 5 clients of a round to report; in about 81.2% of the rounds" in dropout_note(
    c, Krum(1).min_counting
  )
  c.aggregator.name, c.clients_per_round, c.algorithm.dropout = "trimmed_mean", 4, 0.1
  assert f"in about {100 * (1 - 0.9**4):.3g}% of the rounds" in dropout_note(c, TrimmedMean(0.25).min_counting)
  assert dropout_note(c, getattr(Median(), "min_counting", 1)) is None
  c.algorithm.dropout = 0.0
  assert dropout_note(c, TrimmedMean(0.25).min_counting) is None
