"""EMD similarity: Sinkhorn vs an exact LP (scipy linprog), identity, gradients, jit/vmap, weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from fedkd.distill.emd import cosine_cost, dense_features_to_nodes, emd_marginals, emd_similarity, emd_weights


def _np_cost(u, v):
  u = np.asarray(u, np.float64)
  v = np.asarray(v, np.float64)
  un = u / np.linalg.norm(u, axis=1, keepdims=True)
  vn = v / np.linalg.norm(v, axis=1, keepdims=True)
  return np.clip(1.0 - un @ vn.T, 0.0, 2.0)


def _np_cross_reference(u, v):
  """Independent numpy version of the DeepEMD node weights (the floor only matters when every score
  is <= 0, where the documented result is the uniform distribution)."""
  u = np.asarray(u, np.float64)
  v = np.asarray(v, np.float64)

  def norm(w):
    return w / w.sum() if w.sum() > 0 else np.full(w.shape, 1.0 / w.size)

  return norm(np.maximum(u @ v.mean(0), 0.0)), norm(np.maximum(v @ u.mean(0), 0.0))


def _lp_similarity(c, a, b):
  """Exact EMD: min <c, x> s.t. row sums a, column sums b, x >= 0; returns sum (1 - c) x."""
  n, m = c.shape
  a_eq = np.zeros((n + m, n * m))
  for p in range(n):
    a_eq[p, p * m : (p + 1) * m] = 1.0
  for q in range(m):
    a_eq[n + q, q::m] = 1.0
  res = linprog(c.ravel(), A_eq=a_eq, b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs")
  assert res.status == 0
  x = res.x.reshape(n, m)
  return float(np.sum((1.0 - c) * x))


# One jitted entry point (static solver settings) shared by the tests, so shapes compile once.
_sim = jax.jit(emd_similarity, static_argnames=("epsilon", "marginals", "num_iters"))


def _pair(rng, n, m, d=4, positive=False):
  u = rng.normal(size=(n, d)).astype(np.float32)
  v = rng.normal(size=(m, d)).astype(np.float32)
  if positive:  # mostly-positive features (as after a ReLU) keep many cross-reference weights > 0
    u, v = np.abs(u) + 0.1 * u, np.abs(v) + 0.1 * v
  return u, v


@pytest.mark.parametrize("marginals", ["uniform", "cross_reference"])
def test_matches_exact_lp(marginals):
  rng = np.random.default_rng(0)
  sims = jax.jit(lambda u, v: emd_similarity(u, v, epsilon=1e-3, marginals=marginals, num_iters=3000))
  for n, m in [(3, 6), (5, 4), (6, 6)]:
    for trial in range(2):
      u, v = _pair(rng, n, m, positive=trial == 1)
      c = _np_cost(u, v)
      if marginals == "uniform":
        a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
      else:
        a, b = _np_cross_reference(u, v)
      s_lp = _lp_similarity(c, a, b)
      s = float(sims(jnp.asarray(u), jnp.asarray(v)))
      assert abs(s - s_lp) < 1e-2, (n, m, trial, s, s_lp)


def test_cross_reference_marginals_and_floor():
  rng = np.random.default_rng(1)
  u, v = _pair(rng, 5, 4, positive=True)
  a, b = emd_marginals(jnp.asarray(u), jnp.asarray(v), "cross_reference")
  a_ref, b_ref = _np_cross_reference(u, v)
  np.testing.assert_allclose(np.asarray(a), a_ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(b), b_ref, atol=1e-5)
  # all-zero scores (v orthogonal in mean to u, here v = 0) -> a valid (uniform) distribution
  a0, b0 = emd_marginals(jnp.asarray(u), jnp.zeros((4, 4)), "cross_reference")
  np.testing.assert_allclose(np.asarray(a0), np.full(5, 0.2), atol=1e-6)
  np.testing.assert_allclose(np.asarray(b0), np.full(4, 0.25), atol=1e-6)
  s = _sim(jnp.asarray(u), jnp.zeros((4, 4)), marginals="cross_reference")
  assert np.isfinite(float(s))


def test_identical_sets_similarity_one():
  rng = np.random.default_rng(2)
  for n in (6, 16):
    u = jnp.asarray(rng.normal(size=(n, 8)), jnp.float32)
    assert abs(float(_sim(u, u)) - 1.0) < 1e-3
    # a permutation of the same nodes is also a perfect match
    assert abs(float(_sim(u, u[::-1])) - 1.0) < 1e-3
  # anti-aligned sets (every node of v opposite to every node of u) are maximally dissimilar
  w = jnp.asarray(rng.normal(size=(1, 8)), jnp.float32)
  assert abs(float(_sim(jnp.tile(w, (6, 1)), -2.0 * jnp.tile(w, (6, 1)))) + 1.0) < 1e-3


@pytest.mark.parametrize("marginals", ["uniform", "cross_reference"])
def test_gradient_matches_finite_differences(marginals):
  rng = np.random.default_rng(3)
  u, v = _pair(rng, 5, 4, positive=True)
  u, v = jnp.asarray(u), jnp.asarray(v)
  f = jax.jit(lambda x: emd_similarity(x, v, epsilon=0.1, marginals=marginals, num_iters=300))
  g = np.asarray(jax.jit(jax.grad(lambda x: emd_similarity(x, v, epsilon=0.1, marginals=marginals, num_iters=300)))(u))
  assert np.all(np.isfinite(g))
  h = 1e-2
  fd = np.zeros(u.shape, np.float64)
  for i in range(u.shape[0]):
    for j in range(u.shape[1]):
      e = np.zeros(u.shape, np.float32)
      e[i, j] = h
      fd[i, j] = (float(f(u + e)) - float(f(u - e))) / (2 * h)
  rel = np.linalg.norm(g - fd) / max(np.linalg.norm(fd), 1e-8)
  assert rel < 5e-2, (rel, g, fd)


def test_jit_vmap_and_grad_at_default_epsilon():
  rng = np.random.default_rng(4)
  us = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
  vs = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  batched = jax.jit(jax.vmap(emd_similarity))(us, vs)
  single = np.array([float(_sim(us[i], vs[i])) for i in range(3)])
  np.testing.assert_allclose(np.asarray(batched), single, atol=1e-5)
  # cross-reference marginals at epsilon = 0.01 make ott's implicit differentiation singular; the
  # unrolled gradients used here must stay finite
  grads = jax.jit(jax.vmap(jax.grad(lambda x, y: emd_similarity(x, y, marginals="cross_reference"))))(us, vs)
  assert grads.shape == us.shape and bool(jnp.all(jnp.isfinite(grads)))


def test_cosine_cost_and_nodes():
  rng = np.random.default_rng(5)
  f = rng.normal(size=(4, 3, 5)).astype(np.float32)
  nodes = dense_features_to_nodes(jnp.asarray(f))
  assert nodes.shape == (12, 5)
  np.testing.assert_array_equal(np.asarray(nodes)[4], f[1, 1])
  c = cosine_cost(nodes, nodes[:7])
  np.testing.assert_allclose(np.asarray(c), _np_cost(f.reshape(12, 5), f.reshape(12, 5)[:7]), atol=1e-5)


def test_emd_weights():
  s = jnp.array([0.2, 0.5, 0.9])
  np.testing.assert_allclose(
    np.asarray(emd_weights(s, "softmax", temperature=0.5)),
    np.exp(np.array([0.4, 1.0, 1.8])) / np.exp([0.4, 1.0, 1.8]).sum(),
    rtol=1e-5,
  )
  np.testing.assert_allclose(np.asarray(emd_weights(s, "sum")), np.array([0.2, 0.5, 0.9]) / 1.6, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(emd_weights(s, "raw")), np.asarray(s))
  w = emd_weights(s, "softmax", mask=jnp.array([True, False, True]))
  np.testing.assert_allclose(
    np.asarray(w),
    [np.exp(0.2) / (np.exp(0.2) + np.exp(0.9)), 0.0, np.exp(0.9) / (np.exp(0.2) + np.exp(0.9))],
    rtol=1e-5,
  )
  # detach: no gradient flows through the weights; without detach it does
  g_det = jax.grad(lambda x: jnp.sum(emd_weights(x, "softmax") * jnp.arange(3.0)))(s)
  g_live = jax.grad(lambda x: jnp.sum(emd_weights(x, "softmax", detach=False) * jnp.arange(3.0)))(s)
  assert float(jnp.abs(g_det).sum()) == 0.0 and float(jnp.abs(g_live).sum()) > 0.0
  with pytest.raises(ValueError):
    emd_weights(s, "nope")


@pytest.mark.parametrize("marginals", ["uniform", "cross_reference"])
def test_sinkhorn_equals_ott_jax(marginals):
  """fedkd's fixed-iteration log-domain Sinkhorn against ott-jax's solver (lse mode, no early stop, the
  same iteration count) on the same cost and marginals: the same transport plan."""
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn

  from fedkd.distill.emd import sinkhorn_plan

  rng = np.random.default_rng(6)
  u, v = _pair(rng, 7, 5, positive=True)
  c = cosine_cost(jnp.asarray(u), jnp.asarray(v))
  a, b = emd_marginals(jnp.asarray(u), jnp.asarray(v), marginals)
  for eps, iters in ((0.05, 50), (0.01, 200)):
    ours = sinkhorn_plan(c, a, b, epsilon=eps, num_iters=iters)
    solver = sinkhorn.Sinkhorn(lse_mode=True, threshold=0.0, max_iterations=iters, inner_iterations=10)
    ref = solver(linear_problem.LinearProblem(geometry.Geometry(cost_matrix=c, epsilon=eps), a=a, b=b)).matrix
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ours).sum(0), np.asarray(b), atol=1e-4)  # column marginals after a g step
