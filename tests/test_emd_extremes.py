"""EMD and the FedEFM silo update at the edges: feature rows of any scale (scipy LP / numpy cosine as the
reference), zero rows, zero-mass nodes under the default schedule (ott-jax and scipy LP), the accepted
epsilon range's ends, and a padded neighbour slot that holds a non-finite expert."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


from fedkd.distill.emd import CONVERGED_TOL, cosine_cost, emd_similarity, sinkhorn_plan
from test_emd import _lp_plan as _lp


def _np_cost(u, v):
  """1 - cos in float64; zero rows have cos 0."""
  u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)

  def unit(x):
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(n > 0, x / np.where(n > 0, n, 1.0), 0.0)

  return np.clip(1.0 - unit(u) @ unit(v).T, 0.0, 2.0)


_sim = jax.jit(emd_similarity, static_argnames=("epsilon", "num_iters", "debias", "return_error"))


@pytest.mark.parametrize("scale", [1e-20, 1e-13, 1e20])
def test_cosine_cost_and_similarity_do_not_depend_on_the_feature_scale(scale):
  """Rows of norm ~1e-13 fell under the squared-norm floor (1e-24) and rows past ~1e19 overflowed it, so
  their cosine came out ~0 (S 0.049 against the LP's 0.338 at 1e-13, 0.0 against 0.300 at 1e20)."""
  rng = np.random.default_rng(0)
  u = rng.normal(size=(5, 4))
  v = rng.normal(size=(6, 4))
  us = (u * scale).astype(np.float32)
  c_ref = _np_cost(u, v)  # the cosine is scale free: the reference uses the unscaled rows
  np.testing.assert_allclose(np.asarray(cosine_cost(jnp.asarray(us), jnp.asarray(v, jnp.float32))), c_ref, atol=1e-6)
  s_lp = float(np.sum((1.0 - c_ref) * _lp(c_ref, np.full(5, 0.2), np.full(6, 1 / 6))))
  s, err = _sim(jnp.asarray(us), jnp.asarray(v, jnp.float32), epsilon=1e-3, return_error=True)
  assert abs(float(s) - s_lp) < 1e-3 and float(err) < CONVERGED_TOL, (float(s), s_lp, float(err))
  # scaling both sets changes nothing either (the biased S as the unscaled one's, to float32 rounding)
  both = _sim(jnp.asarray(us), jnp.asarray(v * scale, jnp.float32), epsilon=0.05, debias=True)
  plain = _sim(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32), epsilon=0.05, debias=True)
  assert abs(float(both) - float(plain)) < 1e-5, (float(both), float(plain))


def test_a_zero_row_has_cos_zero_and_no_gradient():
  """A zero token (e.g. a ReLU'd UNet bottleneck pixel) has cos 0 with everything; its gradient was 1e12 x
  the plan's pull (1.1e11 here) from the 1e-24 floor of the squared norm, which blows up a step taken with
  detach_weights=False. Now 0, and the other rows' gradient is the central difference of S."""
  rng = np.random.default_rng(1)
  u = rng.normal(size=(6, 8)).astype(np.float32)
  v = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
  u[2] = 0.0
  np.testing.assert_allclose(np.asarray(cosine_cost(jnp.asarray(u), v))[2], 1.0, atol=0)

  def f(x):
    return emd_similarity(x, v, epsilon=0.1)

  g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(u)))
  assert np.all(g[2] == 0.0), g[2]
  fj, h = jax.jit(f), 1e-2
  for i, j in ((0, 0), (3, 5), (5, 7)):
    e = np.zeros(u.shape, np.float32)
    e[i, j] = h
    fd = (float(fj(jnp.asarray(u + e))) - float(fj(jnp.asarray(u - e)))) / (2 * h)
    assert abs(g[i, j] - fd) < 2e-3 + 0.05 * abs(fd), (i, j, g[i, j], fd)


def test_default_schedule_with_zero_mass_nodes():
  """Marginals with zeros (nodes without mass, e.g. padding tokens): the default schedule's over-relaxed
  step computed (1 - omega)(-inf) + omega(-inf) = NaN for those nodes and the whole plan was NaN. Now the
  plan equals ott-jax's converged one, and its transport value is the LP's at a small epsilon."""
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn

  rng = np.random.default_rng(3)
  c = jnp.asarray(rng.uniform(0.0, 2.0, size=(6, 4)), jnp.float32)
  a = jnp.array([0.3, 0.0, 0.2, 0.1, 0.4, 0.0], jnp.float32)
  b = jnp.array([0.25, 0.25, 0.5, 0.0], jnp.float32)
  plan, err = jax.jit(lambda c: sinkhorn_plan(c, a, b, epsilon=0.05, return_error=True))(c)
  plan = np.asarray(plan)
  assert np.isfinite(plan).all() and float(err) < CONVERGED_TOL, float(err)
  assert np.all(plan[[1, 5]] == 0.0) and np.all(plan[:, 3] == 0.0)
  solver = sinkhorn.Sinkhorn(lse_mode=True, threshold=1e-6, max_iterations=20000)
  ref = solver(linear_problem.LinearProblem(geometry.Geometry(cost_matrix=c, epsilon=0.05), a=a, b=b))
  assert bool(ref.converged)
  np.testing.assert_allclose(plan, np.asarray(ref.matrix), atol=2e-5)
  plan_small = np.asarray(jax.jit(lambda c: sinkhorn_plan(c, a, b, epsilon=1e-3))(c))
  c64 = np.asarray(c, np.float64)
  lp_value = float(np.sum(c64 * _lp(c64, np.asarray(a, np.float64), np.asarray(b, np.float64))))
  assert abs(float(np.sum(c64 * plan_small)) - lp_value) < 5e-3


def test_similarity_at_the_ends_of_the_accepted_epsilon_range():
  """config accepts fedefm.emd_epsilon in [1e-4, 1e4]: at 1e-4 the default schedule reaches the exact LP
  (scipy), at 1e4 the independent plan a b^T (closed form), both converged."""
  rng = np.random.default_rng(4)
  u = rng.normal(size=(9, 8)).astype(np.float32)
  v = rng.normal(size=(12, 8)).astype(np.float32)
  c = _np_cost(u, v)
  a, b = np.full(9, 1 / 9), np.full(12, 1 / 12)
  s_lp = float(np.sum((1.0 - c) * _lp(c, a, b)))
  s, err = _sim(jnp.asarray(u), jnp.asarray(v), epsilon=1e-4, return_error=True)
  assert abs(float(s) - s_lp) < 2e-4 and float(err) < CONVERGED_TOL, (float(s), s_lp, float(err))
  s, err = _sim(jnp.asarray(u), jnp.asarray(v), epsilon=1e4, return_error=True)
  assert abs(float(s) - float(np.sum((1.0 - c) * np.outer(a, b)))) < 1e-4 and float(err) < CONVERGED_TOL


def _client(xs, ys, nbr, mask, mode):
  import test_fedefm as tf

  from fedkd.distill.fedefm import FedEFMOptions, FedEFMSilo
  from fedkd.fl.algorithm import ClientContext
  from fedkd.losses import cross_entropy

  opts = FedEFMOptions(**{**tf.OPTS, "weight_mode": mode, "emd_iters": 0, "emd_debias": True, "emd_epsilon": 0.05})
  alg = FedEFMSilo(opts, optax.sgd(tf.LR_E))
  ctx = ClientContext(lambda q, x: tf.apply_wf(q, x)[0], cross_entropy, optax.sgd(tf.LR_L), apply_wf=tf.apply_wf)
  batch = {"x": jnp.asarray(xs[1]), "y": jnp.asarray(ys[1]), "nbr": jnp.asarray(nbr), "nbr_mask": jnp.asarray(mask)}
  gathered = alg.gather({"x": jnp.asarray(xs), "y": jnp.asarray(ys)})
  out = jax.jit(lambda p: alg.client(ctx, {"round": 0}, alg.init_row(p), batch, gathered))(tf.init(0))
  return out


@pytest.mark.parametrize("mode", ["softmax", "sum", "raw"])
def test_a_padded_slot_never_reaches_the_update(mode):
  """Silo 1 with neighbour 0 and a padded slot (mask False) that holds a non-finite expert (here silo 2's
  images are NaN): the update equals silo 1's update with neighbour 0 alone, the padded weight is exactly
  0. The padded expert's loss entered the KD sum as 0 * NaN = NaN (loss nan, every parameter NaN)."""
  import test_fedefm as tf

  xs, ys = tf.data(0)
  xs = xs.copy()
  xs[2] = np.nan
  padded = _client(xs, ys, [0, 2], [True, False], mode)
  alone = _client(xs, ys, [0], [True], mode)
  assert np.isfinite(float(padded.loss)), float(padded.loss)
  w = np.asarray(padded.metrics["w"])
  assert w[1] == 0.0 and np.isfinite(w).all(), w
  np.testing.assert_allclose(w[0], np.asarray(alone.metrics["w"])[0], rtol=1e-6)
  for got, want in zip(jax.tree.leaves(padded.upload), jax.tree.leaves(alone.upload)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
  # a NaN expert in a real slot is not hidden: the run must see it
  assert np.isnan(float(_client(xs, ys, [0, 2], [True, True], mode).loss))
  # the same inputs give the same expert and the same update, bit for bit
  again = _client(xs, ys, [0, 2], [True, False], mode)
  for x, y in zip(jax.tree.leaves(padded.upload), jax.tree.leaves(again.upload)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
