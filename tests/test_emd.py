"""EMD similarity: Sinkhorn vs an exact LP (scipy linprog / linear_sum_assignment) and ott-jax, the
default (annealed, converged) schedule and its reported marginal error, the debiased similarity,
identity, gradients (finite differences), jit/vmap/shard_map, real FedEFM token features, weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy.optimize import linear_sum_assignment, linprog

from fedkd.distill.emd import (
  CONVERGED_TOL,
  cosine_cost,
  dense_features_to_nodes,
  emd_marginals,
  emd_plan,
  emd_similarity,
  emd_weights,
  sinkhorn_plan,
  sinkhorn_schedule,
)


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
  return float(np.sum((1.0 - c) * _lp_plan(c, a, b)))


def _lp_plan(c, a, b):
  """The exact transport plan of min <c, x> s.t. row sums a, column sums b, x >= 0 (scipy HiGHS)."""
  n, m = c.shape
  a_eq = np.zeros((n + m, n * m))
  for p in range(n):
    a_eq[p, p * m : (p + 1) * m] = 1.0
  for q in range(m):
    a_eq[n + q, q::m] = 1.0
  res = linprog(c.ravel(), A_eq=a_eq, b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs")
  assert res.status == 0
  return res.x.reshape(n, m)


def _np_marginal_error(plan, a, b):
  plan = np.asarray(plan, np.float64)
  return float(np.abs(plan.sum(1) - np.asarray(a)).sum() + np.abs(plan.sum(0) - np.asarray(b)).sum())


# One jitted entry point (static solver settings) shared by the tests, so shapes compile once.
_sim = jax.jit(emd_similarity, static_argnames=("epsilon", "marginals", "num_iters", "debias", "return_error"))


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


@pytest.mark.parametrize(
  "marginals, num_iters, debias",
  [("uniform", 300, False), ("cross_reference", 300, False), ("uniform", None, False), ("cross_reference", None, True)],
)
def test_gradient_matches_finite_differences(marginals, num_iters, debias):
  """Reverse mode through the unrolled iterations (fixed count, or the default annealed schedule, with
  and without the debiasing terms) against central differences of the same function."""
  rng = np.random.default_rng(3)
  u, v = _pair(rng, 5, 4, positive=True)
  u, v = jnp.asarray(u), jnp.asarray(v)

  def sim(x):
    return emd_similarity(x, v, epsilon=0.1, marginals=marginals, num_iters=num_iters, debias=debias)

  f = jax.jit(sim)
  g = np.asarray(jax.jit(jax.grad(sim))(u))
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


@pytest.mark.parametrize(
  "sims,mask",
  [
    ([0.3, -0.2, 0.5], [True, True, True]),  # a negative similarity counts as 0
    ([0.1, -0.1, 0.4], [True, True, False]),  # sum 0.0 over the valid ones: was a division by ~0 (inf weights)
    ([-0.3, -0.1, 0.9], [True, True, False]),  # nothing positive among the valid: uniform
    ([1e-9, -1e-9, 0.0], [True, True, True]),
  ],
)
def test_sum_weights_are_a_distribution_whatever_the_signs(sims, mask):
  """'sum' mode is max(S, 0) / sum max(S, 0) over the valid neighbours (numpy), uniform over them when no S is
  positive: the debiased S can be negative, and S / sum S gave negative or unbounded weights."""
  s, m = np.array(sims, np.float64), np.array(mask)
  pos = np.where(m, np.maximum(s, 0.0), 0.0)
  want = pos / pos.sum() if pos.sum() > 0 else m / m.sum()
  got = np.asarray(emd_weights(jnp.array(sims), "sum", mask=jnp.array(mask)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert np.isfinite(got).all() and (got >= 0).all() and abs(got.sum() - 1.0) < 1e-5


def test_a_nan_similarity_is_not_hidden_by_any_weight_mode():
  """max(NaN, 0) is NaN, so 'sum' took the 'no positive similarity' branch and returned uniform weights; every
  mode now passes the NaN on (the run then reports it), as softmax and raw did."""
  s = jnp.array([0.3, jnp.nan, 0.5])
  for mode in ("softmax", "sum", "raw"):
    assert np.isnan(np.asarray(emd_weights(s, mode))).any(), mode


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


# --- the default (annealed) schedule, its reported error, the debiased similarity --------------------


def test_schedule_is_static_and_annealed():
  for eps, num_iters, relaxed in ((0.05, 118, 45), (0.01, 194, 100), (1e-3, 441, 317)):
    sched = sinkhorn_schedule(eps)
    assert sched.num_iters == num_iters and sched.relaxed == relaxed, (eps, sched.num_iters, sched.relaxed)
    anneal = np.asarray(sched.anneal)
    assert anneal[0] == 1.0 and np.all(anneal > eps) and np.all(np.diff(anneal) <= 0)
    assert np.all(np.append(anneal[1:], eps) / anneal >= 0.8 - 1e-12)  # gentle geometric steps down to eps
  assert sinkhorn_schedule(1.5).anneal == ()  # no annealing above the start
  for bad in (0.0, -0.1, float("inf"), float("nan")):
    with pytest.raises(ValueError):
      sinkhorn_schedule(bad)


def test_default_path_matches_exact_lp_at_small_epsilon():
  """epsilon 1e-3 with every other argument at its default (uniform marginals, num_iters=None): within
  0.02 of the exact LP (scipy), and the reported marginal error is below the threshold. The old
  behaviour (200 plain iterations, the previous default) fails the same check on some of these sets and
  its reported error flags exactly those."""
  rng = np.random.default_rng(10)
  default = jax.jit(lambda u, v: emd_similarity(u, v, epsilon=1e-3, return_error=True))
  old = jax.jit(lambda u, v: emd_similarity(u, v, epsilon=1e-3, num_iters=200, return_error=True))
  old_misses = 0
  for n, m in [(3, 6), (5, 4), (6, 6), (8, 8), (12, 9)]:
    for trial in range(2):
      u, v = _pair(rng, n, m, positive=trial == 1)
      c = _np_cost(u, v)
      s_lp = _lp_similarity(c, np.full(n, 1.0 / n), np.full(m, 1.0 / m))
      if n == m:  # uniform marginals, n = m: the LP optimum is an assignment (Birkhoff)
        rows, cols = linear_sum_assignment(c)
        assert abs(s_lp - (1.0 - c[rows, cols].mean())) < 1e-6
      s, err = default(jnp.asarray(u), jnp.asarray(v))
      assert abs(float(s) - s_lp) <= 0.02, (n, m, trial, float(s), s_lp)
      assert float(err) < CONVERGED_TOL, (n, m, trial, float(err))
      s_old, err_old = old(jnp.asarray(u), jnp.asarray(v))
      if abs(float(s_old) - s_lp) > 0.02:
        old_misses += 1
        assert float(err_old) >= CONVERGED_TOL, (n, m, trial, float(s_old), s_lp, float(err_old))
  assert old_misses >= 1  # the check can fail: the unconverged old default does


@pytest.mark.parametrize("num_iters", [None, 3])
def test_reported_error_is_the_plans_marginal_violation(num_iters):
  rng = np.random.default_rng(11)
  u, v = _pair(rng, 7, 5, positive=True)
  u, v = jnp.asarray(u), jnp.asarray(v)

  @jax.jit(static_argnames="marginals")
  def run(u, v, marginals):
    kw = dict(epsilon=0.02, marginals=marginals, num_iters=num_iters)
    cost, plan, err = emd_plan(u, v, return_error=True, **kw)
    a, b = emd_marginals(u, v, marginals)
    plan2, err2 = sinkhorn_plan(cost, a, b, epsilon=0.02, num_iters=num_iters, return_error=True)
    s, err3 = emd_similarity(u, v, return_error=True, **kw)
    return cost, plan, err, a, b, plan2, err2, s, err3, emd_similarity(u, v, **kw)

  for marginals in ("uniform", "cross_reference"):
    cost, plan, err, a, b, plan2, err2, s, err3, s_plain = run(u, v, marginals)
    np.testing.assert_allclose(float(err), _np_marginal_error(plan, a, b), rtol=1e-4, atol=1e-7)
    assert (float(err) < CONVERGED_TOL) == (num_iters is None), float(err)  # 3 iterations are far from it
    np.testing.assert_allclose(np.asarray(plan2), np.asarray(plan), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose([float(err2), float(err3)], float(err), rtol=1e-5)
    np.testing.assert_allclose(float(s), float(jnp.sum((1.0 - cost) * plan)), rtol=1e-5)
    np.testing.assert_allclose(float(s_plain), float(s), rtol=1e-6)


def test_default_plan_equals_converged_ott_jax():
  """The default schedule's plan against ott-jax's Sinkhorn run to a tight threshold (an independent
  solver, converged): the same entropic plan."""
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn

  rng = np.random.default_rng(12)
  u, v = _pair(rng, 9, 6, positive=True)
  c = cosine_cost(jnp.asarray(u), jnp.asarray(v))
  for marginals, eps in (("uniform", 0.01), ("cross_reference", 0.05)):
    a, b = emd_marginals(jnp.asarray(u), jnp.asarray(v), marginals)
    ours, err = sinkhorn_plan(c, a, b, epsilon=eps, return_error=True)
    solver = sinkhorn.Sinkhorn(lse_mode=True, threshold=1e-5, max_iterations=20000)
    out = solver(linear_problem.LinearProblem(geometry.Geometry(cost_matrix=c, epsilon=eps), a=a, b=b))
    assert bool(out.converged)
    assert float(err) < CONVERGED_TOL
    np.testing.assert_allclose(np.asarray(ours), np.asarray(out.matrix), atol=2e-4)


def _tokens(rng, n=64, d=32, shared=2.0):
  """Token-like node features: a shared component (as in an encoder's tokens), then LayerNorm."""
  z = rng.normal(size=(n, d)) + shared * rng.normal(size=(1, d))
  return ((z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True)).astype(np.float32)


def _assignment_similarity(u, v):
  c = _np_cost(u, v)
  rows, cols = linear_sum_assignment(c)
  return 1.0 - c[rows, cols].mean()


def test_debiased_identity_and_mixed_sizes():
  rng = np.random.default_rng(13)

  @jax.jit(static_argnames=("marginals", "num_iters"))
  def self_sims(u, marginals, num_iters):  # (biased S(u, u), debiased S(u, u))
    kw = dict(epsilon=0.05, marginals=marginals, num_iters=num_iters)
    return emd_similarity(u, u, **kw), emd_similarity(u, u, debias=True, **kw)

  for (n, d), marginals, iters in (
    ((6, 4), "uniform", (None, 50)),
    ((16, 8), "cross_reference", (None,)),
    ((64, 32), "uniform", (None,)),
  ):
    u = jnp.asarray(_tokens(rng, n, d, shared=1.5))
    for num_iters in iters:
      s, s_deb = self_sims(u, marginals, num_iters)
      assert abs(float(s_deb) - 1.0) <= 1e-5, (n, marginals, num_iters, float(s_deb))
      assert float(s) < 1.0 - 1e-3  # while the biased S(u, u) is not 1
  # n != m: three separate solves, the documented combination of the plain similarities
  u, v = (jnp.asarray(x) for x in _pair(rng, 7, 5, d=6))
  plain = jax.jit(lambda x, y: jnp.stack([emd_similarity(*p, epsilon=0.05) for p in ((x, y), (x, x), (y, y))]))(u, v)
  s, err = jax.jit(lambda x, y: emd_similarity(x, y, epsilon=0.05, debias=True, return_error=True))(u, v)
  np.testing.assert_allclose(float(s), float(plain[0] - 0.5 * (plain[1] + plain[2]) + 1.0), atol=1e-6)
  assert float(err) < CONVERGED_TOL


def test_debiased_perturbation_family():
  """v = u + t * noise on token-like sets at the production setting (epsilon 0.05, uniform, default
  schedule), against the exact LP (assignment) similarity. Debiased: 1 at t = 0, strictly decreasing,
  within a quarter of the biased error of the LP value for small t. Biased: off the LP value by more
  than the differences it should measure, by an amount that depends on the node set, so it rates a
  perturbed pair of one set above the identical pair of another."""
  rng = np.random.default_rng(14)
  ts = np.array([0.0, 0.05, 0.1, 0.2, 0.4, 0.8], np.float32)
  both = jax.jit(
    jax.vmap(
      lambda a, b: jnp.stack([emd_similarity(a, b, epsilon=0.05), emd_similarity(a, b, epsilon=0.05, debias=True)])
    )
  )
  res = {}
  for shared in (1.0, 2.0):  # less / more correlated tokens (more correlated: larger entropic bias)
    u = _tokens(rng, shared=shared)
    noise = rng.normal(size=u.shape).astype(np.float32)
    vs = u[None] + ts[:, None, None] * noise[None]
    s, s_deb = np.asarray(both(jnp.broadcast_to(jnp.asarray(u), vs.shape), jnp.asarray(vs))).T
    s_lp = np.array([_assignment_similarity(u, v) for v in vs])
    res[shared] = s, s_deb, s_lp
    assert abs(s_deb[0] - 1.0) <= 1e-5 and np.all(np.diff(s_deb) < 0), s_deb
    small = ts <= 0.2
    assert np.all(np.abs(s_deb - s_lp)[small] <= 0.25 * np.abs(s - s_lp)[small] + 1e-3), (s, s_deb, s_lp)
  s, s_deb, s_lp = res[2.0]
  assert 1.0 - s[0] > 2.0 * (s_lp[0] - s_lp[3])  # the bias of S(u, u) > twice the real change up to t = 0.2
  # across node sets: biased S of a t = 0.4 copy of the less correlated set > biased S(u, u) of the other
  assert res[1.0][0][4] > res[2.0][0][0], (res[1.0][0], res[2.0][0])
  assert res[1.0][1][4] < res[2.0][1][0]  # debiased: every identical pair (1) above every perturbed one


def test_production_token_features():
  """FedEFM's teacher (fedefm_base_config) on a few synthetic images: its dense features [B, 8, 8, C]
  (LayerNorm'd encoder tokens, 64 nodes), model 0 against itself, a slightly perturbed copy and another
  init, at FedEFM's epsilon 0.05 with the default (converged) schedule."""
  from fedkd.config import fedefm_base_config
  from fedkd.models import init_model

  cfg = fedefm_base_config()
  _, apply_wf, p0 = init_model(cfg.teacher, 0)
  p1 = init_model(cfg.teacher, 1)[2]
  leaves, treedef = jax.tree.flatten(p0)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  p_pert = jax.tree.unflatten(
    treedef, [x + 0.05 * jnp.std(x) * jax.random.normal(k, x.shape) if x.size > 1 else x for x, k in zip(leaves, keys)]
  )
  x = jnp.asarray(np.random.default_rng(15).uniform(size=(4, 32, 32, 1)), jnp.float32)
  nodes = jax.jit(lambda p: dense_features_to_nodes(apply_wf(p, x)[1]))
  u, v_pert, v_other = nodes(p0), nodes(p_pert), nodes(p1)
  assert u.shape == (4, 64, cfg.teacher.hidden)

  @jax.jit
  def sims(a, b):
    one = lambda x, y, d: emd_similarity(x, y, epsilon=0.05, debias=d, return_error=True)  # noqa: E731
    s, e = jax.vmap(lambda x, y: one(x, y, False))(a, b)
    sd, ed = jax.vmap(lambda x, y: one(x, y, True))(a, b)
    return s, sd, jnp.maximum(jnp.max(e), jnp.max(ed))

  out = {
    name: [np.asarray(t) for t in sims(u, v)] for name, v in (("self", u), ("perturbed", v_pert), ("other", v_other))
  }
  for name, (s, sd, err) in out.items():
    print(f"{name}: S={np.round(s, 4)} S_deb={np.round(sd, 4)} max marginal error={float(err):.1e}")
    assert float(err) < CONVERGED_TOL, name
  s_self, sd_self, _ = out["self"]
  assert np.all(np.abs(sd_self - 1.0) <= 1e-5) and np.all(s_self < 0.98)  # biased S(u, u) well below 1
  assert np.all(out["perturbed"][1] < 1.0 - 1e-3) and np.all(out["other"][1] < out["perturbed"][1])


def test_shard_map_with_varying_axes_check():
  """The default schedule (plain, debiased, with its error, and its gradient) inside jax.shard_map with
  the varying-manual-axes check on (the engine's setting), equal to the same computation outside; ott-
  jax's solver, as a control, is rejected by that check."""
  from fedkd.sharding import CLIENTS, client_mesh, shard_clients

  mesh = client_mesh(8)
  rng = np.random.default_rng(16)
  us = jnp.asarray(rng.normal(size=(16, 6, 4)), jnp.float32)
  vs = jnp.asarray(rng.normal(size=(16, 6, 4)), jnp.float32)

  def per_client(a, b):
    s, err = emd_similarity(a, b, epsilon=0.05, debias=True, return_error=True)
    return s, err, jax.grad(lambda x: emd_similarity(x, b, epsilon=0.05, marginals="cross_reference"))(a)

  sharded = jax.jit(
    jax.shard_map(jax.vmap(per_client), mesh=mesh, in_specs=(P(CLIENTS), P(CLIENTS)), out_specs=P(CLIENTS))
  )
  got = sharded(*shard_clients((us, vs), mesh))
  want = jax.jit(jax.vmap(per_client))(us, vs)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
  assert float(jnp.max(got[1])) < CONVERGED_TOL

  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn

  def ott_client(a, b):
    x, y = emd_marginals(a, b)
    geom = geometry.Geometry(cost_matrix=cosine_cost(a, b), epsilon=0.05)
    return sinkhorn.Sinkhorn()(linear_problem.LinearProblem(geom, a=x, b=y)).reg_ot_cost

  control = jax.shard_map(jax.vmap(ott_client), mesh=mesh, in_specs=(P(CLIENTS), P(CLIENTS)), out_specs=P(CLIENTS))
  with pytest.raises(TypeError, match="cond branches"):
    jax.jit(control)(*shard_clients((us, vs), mesh))


def test_cost_analysis_counts_every_sinkhorn_iteration_when_asked():
  """XLA's cost analysis counts a loop body once; under counting_every_iteration the FLOPs grow
  linearly with the iterations (k more iterations: k times one iteration's FLOPs), and the values are
  unchanged."""
  from fedkd.distill import emd as emd_lib

  rng = np.random.default_rng(0)
  u, v = (jnp.asarray(rng.normal(size=(12, 5)), jnp.float32) for _ in range(2))

  def flops(iters, counting):
    fn = jax.jit(lambda a, b: emd_lib.emd_similarity(a, b, epsilon=0.1, num_iters=iters))
    if counting:
      with emd_lib.counting_every_iteration():
        return fn.lower(u, v).cost_analysis()["flops"], fn(u, v)
    return fn.lower(u, v).cost_analysis()["flops"], fn(u, v)

  (f10, s10), (f20, _), (f30, _) = (flops(k, True) for k in (10, 20, 30))
  assert f20 - f10 > 0 and f30 - f20 == pytest.approx(f20 - f10, rel=0.01)
  assert (f20 - f10) / 10 > 12 * 12  # at least one op per cost-matrix entry per iteration
  g10, r10 = flops(10, False)
  g20, _ = flops(20, False)
  assert g10 == g20 and f10 > g10  # without: the loop body counted once
  np.testing.assert_allclose(float(s10), float(r10), rtol=1e-6)
