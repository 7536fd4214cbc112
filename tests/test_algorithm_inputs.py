"""Algorithm inputs that once broke a round: a stateful client optimizer (Adam) with heterogeneous local
work, and the algorithm wrappers under ``copy``. Each is checked against an independent reference (a
numpy Adam loop per client, plain attribute semantics)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_engine import _max_diff, _setup, _tree_np, seg_grad

from fedkd.fl import algorithms, attacks, compress, dp, engine
from fedkd.fl.algorithm import ClientContext
from fedkd.sharding import client_mesh, shard_clients

# eps well above the gradients' float32 rounding: with 1e-8, a coordinate whose gradient is ~0 takes a step of
# +-lr or 0 depending on the last bit, in any two programs (the engine's and a plain loop alike)
ADAM_LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-3


def _adam_np(grad, start, xs, ys, steps):
  """``steps`` Adam steps (Kingma & Ba 2015, bias-corrected, eps outside the root as optax) in numpy float64."""
  p = start
  m = jax.tree.map(np.zeros_like, p)
  v = jax.tree.map(np.zeros_like, p)
  for t in range(1, steps + 1):
    g = _tree_np(grad(jax.tree.map(np.float32, p), xs[t - 1], ys[t - 1]))
    m = jax.tree.map(lambda a, b: B1 * a + (1 - B1) * b, m, g)
    v = jax.tree.map(lambda a, b: B2 * a + (1 - B2) * b * b, v, g)
    p = jax.tree.map(
      lambda q, a, b: q - ADAM_LR * (a / (1 - B1**t)) / (np.sqrt(b / (1 - B2**t)) + EPS),
      p,
      m,
      v,
    )
  return p


@pytest.mark.parametrize("layout,n_dev", [("unroll", 1), ("vmap", 2)])
def test_adam_clients_with_their_own_step_counts_equal_a_numpy_adam_loop(layout, n_dev):
  """FedAvg with Adam clients (the default client optimizer) and per-client step counts
  (``algorithm.local_steps_min``): x <- sum_i p_i y_i, y_i after tau_i Adam steps from x. Adam's step
  counter is a fresh (replicated) scalar, and masking it per client used to fail to trace inside the
  engine's shard_map."""
  apply, params, loss_fn, xs, ys, weights = _setup(seed=11, clients=4)
  steps = [2, 1, 2, 1]
  grad, x = seg_grad(apply, loss_fn), _tree_np(params)
  p = np.asarray(weights, np.float64) / np.sum(weights)
  ys_np = [_adam_np(grad, x, xs[c], ys[c], steps[c]) for c in range(4)]
  ref = jax.tree.map(lambda *d: sum(pi * di for pi, di in zip(p, d)), *ys_np)

  alg = algorithms.FedAvg(optax.sgd(1.0))
  mesh = client_mesh(n_dev)
  opts = engine.EngineOptions(layout, "xla", 8, unroll_local_steps=False, clients_in_flight=0)
  fn = engine.make_round_fn(alg, ClientContext(apply, loss_fn, optax.adam(ADAM_LR, eps=EPS)), mesh, opts)
  batch = {"x": jnp.asarray(xs), "y": jnp.asarray(ys), "steps": jnp.asarray(steps, jnp.int32)}
  batch, w = shard_clients((batch, jnp.asarray(weights)), mesh)
  state, _, _ = fn(alg.init(params, jax.random.key(0)), None, batch, w)
  assert _max_diff(ref, state["params"]) < 2e-5
  # the masked steps changed nothing: all clients at their full count is a different round
  full = jax.tree.map(
    lambda *d: sum(pi * di for pi, di in zip(p, d)), *[_adam_np(grad, x, xs[c], ys[c], 2) for c in range(4)]
  )
  assert _max_diff(full, state["params"]) > 1e-4


def test_wrapped_algorithms_copy_like_plain_objects():
  """copy.copy of every wrapper gives an object with the same attributes (a wrapper whose
  ``__getattr__`` forwards to ``inner`` must not recurse while ``inner`` is not set yet)."""
  inner = algorithms.FedAvg(optax.sgd(1.0))
  wrapped = [
    attacks.Attacked(inner, attacks.make_attack("sign_flip", ())),
    compress.Compressed(inner, "topk", fraction=0.1),
    dp.DPFedAvg(inner, 0.1, 1.0, 4),
  ]
  for w in wrapped:
    c = copy.copy(w)
    assert c is not w and c.inner is inner and c.name == w.name
    assert c.aggregator == inner.aggregator  # forwarded to the inner algorithm
