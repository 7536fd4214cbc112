"""Cross-device federated learning as a user meets it: many registered clients, few sampled per round,
per-client state on the host, and the aggregation / privacy settings at the edges of their valid ranges,
each against an independent reference (a closed form, a numpy loop, or a property any correct answer has)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_aggregate import _aggregate, _krum_np, _uploads

from fedkd.fl import dp
from fedkd.fl.aggregate import Krum, Median, MultiKrum, NormClip

PRIVACY_TINY = [
  "--config.image_size=32",
  "--config.model.width=4",
  "--config.model.depth=1",
  "--config.model.groups=2",
  "--config.local_steps=1",
  "--config.eval.examples_per_site=2",
  "--config.eval.max_sites=1",
]


# ------------------------------------------------------------------------------------ privacy accounting


def _one_round_lower_bound(q: float, delta: float) -> float:
  """A lower bound on the epsilon of ONE round of DP-FedAvg with negligible noise: with probability q the
  client is sampled and (noise far below its 2C move) the sign of one coordinate of the output shows
  whether its update was +C e_1 or -C e_1; otherwise that sign is a fair coin. The event 'sign +' then has
  probability q + (1 - q) / 2 on one dataset and (1 - q) / 2 on the other, so e^eps (1 - q) / 2 + delta
  >= q + (1 - q) / 2."""
  return math.log1p(2 * (q - delta) / (1 - q))


@pytest.mark.parametrize("z", [1e-155, 1e-200, 1e-300])
def test_epsilon_at_a_tiny_noise_multiplier_is_huge_not_zero(z):
  """32 of 10,000 clients: below z ~ 1e-154 the accountant's sampled RDP overflows to NaN, which it reads as
  epsilon 0 ('perfect privacy'); less noise can never spend less than more noise does."""
  n, m, rounds, delta = 10_000, 32, 60, 1e-5
  got = dp.epsilon(z, n, m, rounds, delta)
  assert got >= _one_round_lower_bound(m / n, delta) > 0.006
  assert got >= dp.epsilon(1e-3, n, m, rounds, delta) > 1e7  # monotone in z


@pytest.mark.parametrize("z", [1e9, 1e12, 1e300])
def test_epsilon_at_a_huge_noise_multiplier_is_a_small_number(z):
  """A huge noise multiplier is valid (config.dp.noise_multiplier >= 0): epsilon is a small number no
  larger than at z = 1e3 (more noise never spends more), not a math domain error from the accountant."""
  n, m, rounds, delta = 10_000, 32, 60, 1e-5
  small = dp.epsilon(1e3, n, m, rounds, delta)
  got = dp.epsilon(z, n, m, rounds, delta)
  assert 0.0 <= got <= small < 0.05
  assert 0 <= dp.epsilon(z, n, n, rounds, delta) <= dp.epsilon(1e3, n, n, rounds, delta)
  assert dp.max_rounds(0.5, z, n, m, delta, limit=10) == 10


def test_privacy_run_with_a_huge_noise_multiplier_starts_and_reports_its_epsilon(cli, tmp_path):
  """configs/privacy.py with 2 of 50 clients and noise multiplier 1e9 (clip 1e-12, so the noise stays
  small): the run plans, trains and reports epsilon instead of dying in the accountant."""
  r = cli.run(
    "fedkd.main",
    [
      "--config=configs/privacy.py:clients=50,per_round=2,rounds=1",
      f"--workdir={tmp_path / 'w'}",
      *PRIVACY_TINY,
      "--config.dp.noise_multiplier=1e9",
      "--config.dp.clip_norm=1e-12",
    ],
  )
  assert r.code == 0 and not r.traceback, r.stderr[-3000:]
  assert "2 of 50 clients per round -> (0, 1e-05)-DP after 1 rounds" in r.stdout, r.stdout


# ------------------------------------------------------------------------------- robust aggregation


@pytest.mark.parametrize("n_dev", [1, 8])
@pytest.mark.parametrize("factor", [1e3, 1e25, -3e30])
def test_krum_and_multi_krum_leave_out_attackers_of_any_finite_size(n_dev, factor):
  """Two attackers (round indices 0 and 3, so a choice by index would take one) send their update times
  ``factor``, a finite float32 upload however large (config.attack.factor only has to be finite). Krum and
  multi-Krum choose what a float64 brute force chooses: honest clients only. Before, from ~1e19 on the
  squared distances overflowed to inf - inf = NaN and Krum returned the attacker's update."""
  clients, attackers = 8, [0, 3]
  uploads = jax.tree.map(lambda a: 0.01 * a, _uploads(seed=4, clients=clients))
  for u in jax.tree.leaves(uploads):
    u[attackers] *= np.float32(factor)
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(uploads))
  weights = np.ones(clients, np.float32)
  weights[5] = 0.0  # one client did not report: m = 7
  for agg, k in ((Krum(2), 1), (MultiKrum(2), 7 - 2)):
    ref, best = _krum_np(uploads, weights, 2, k)
    assert not set(best) & set(attackers), best
    got = _aggregate(agg, uploads, weights, n_dev)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def _f64_norm(rows) -> np.ndarray:
  """Each row's L2 norm in float64 (Python floats: no overflow below 1e308)."""
  return np.sqrt(np.sum(np.square(np.asarray(rows, np.float64)), axis=-1))


@pytest.mark.parametrize("n_dev", [1, 8])
def test_norm_clip_clips_a_huge_update_instead_of_zeroing_it(n_dev):
  """aggregator norm_clip: an attacker's finite upload of norm 5e20 is scaled to norm ``clip`` like any
  other (the float64 reference), not multiplied by clip / inf = 0 because its squared norm overflowed."""
  rng = np.random.default_rng(5)
  clients, clip = 8, 0.05
  uploads = {"a": (0.01 * rng.normal(size=(clients, 3, 5))).astype(np.float32), "b": rng.normal(size=(clients, 7))}
  uploads["b"] = (0.01 * uploads["b"]).astype(np.float32)
  uploads["a"][2] *= np.float32(1e22)
  uploads["b"][2] *= np.float32(1e22)
  weights = np.arange(1, clients + 1, dtype=np.float32)
  flat = np.concatenate([uploads["a"].reshape(clients, -1), uploads["b"]], axis=1).astype(np.float64)
  norms = _f64_norm(flat)
  assert norms[2] > 1e19 and np.isfinite(flat).all()
  scaled = flat * np.minimum(1.0, clip / norms)[:, None]
  ref = (weights[:, None] * scaled).sum(0) / weights.sum()
  got = _aggregate(NormClip(clip), uploads, weights, n_dev)
  got = np.concatenate([got["a"].ravel(), got["b"].ravel()])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-9)


def test_dp_clips_a_huge_finite_update_to_the_clip_norm():
  """DP-FedAvg's clip: an update of norm 5e20 (finite) has that norm and is clipped to C, as the float64
  reference; it is not taken for a NaN (which made its loss NaN: a 'diverged' run or a dropped client)."""
  tree = {"w": np.array([[3e20, -4e20]], np.float32), "b": np.ones((3,), np.float32), "step": np.int32(7)}
  clipped, norm = dp.clip_update(jax.tree.map(jnp.asarray, tree), 0.3)
  flat = np.concatenate([tree["w"].ravel(), tree["b"]]).astype(np.float64)
  ref_norm = float(_f64_norm(flat))
  np.testing.assert_allclose(float(norm), ref_norm, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(clipped["w"]).ravel(), tree["w"].ravel() * 0.3 / ref_norm, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(clipped["b"]), tree["b"] * 0.3 / ref_norm, rtol=1e-6)
  assert int(clipped["step"]) == 7
  # a tree that does hold a NaN / Inf still has a non-finite norm (the client is dropped)
  assert not np.isfinite(float(dp.global_norm({"w": jnp.array([jnp.nan, 1.0])})))
  assert not np.isfinite(float(dp.global_norm({"w": jnp.array([1.0, -jnp.inf])})))


@pytest.mark.parametrize("n_dev", [1, 8])
def test_median_of_two_huge_middle_values_is_finite(n_dev):
  """aggregator median with an even number of clients whose two middle values are near float32's largest
  (a majority of attackers): their mean, as numpy's median in float64, not inf from adding them first."""
  clients = 8
  big = np.float32(3e38)
  uploads = {"w": np.array([[big, i] if i < 5 else [-1.0, i] for i in range(clients)], np.float32)}
  weights = np.ones(clients, np.float32)
  got = _aggregate(Median(), uploads, weights, n_dev)["w"]
  ref = np.median(uploads["w"].astype(np.float64), axis=0)
  assert np.isfinite(got).all(), got
  np.testing.assert_allclose(got, ref, rtol=1e-6)
