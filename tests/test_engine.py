"""The jitted, sharded FedAvg round against an independent per-client Python loop."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedkd.fl import engine
from fedkd.losses import make_segmentation_loss
from fedkd.models import init_params
from fedkd.sharding import client_mesh, shard_clients

C, S, B, H = 8, 2, 2, 16
LR = 0.05


def _setup(seed=0):
  model_cfg = ml_collections.ConfigDict(dict(name="unet", width=4, depth=2, groups=2, num_classes=3))
  apply, params = init_params(model_cfg, seed)
  loss_fn = make_segmentation_loss(ml_collections.ConfigDict(dict(ce_weight=0.5, dice_weight=0.5)))
  kx, ky = jax.random.split(jax.random.key(seed + 1))
  xs = np.asarray(jax.random.normal(kx, (C, S, B, H, H, 1)))
  ys = np.asarray(jax.random.randint(ky, (C, S, B, H, H), 0, 3))
  weights = np.array([5, 1, 3, 8, 2, 2, 7, 4], np.float32)  # unequal client data sizes
  return apply, params, loss_fn, xs, ys, weights


def _reference_round(apply, loss_fn, params, xs, ys, weights, server_lr=1.0):
  """Each client trained on its own with plain SGD (numpy updates), then the weighted mean."""
  grad = jax.jit(jax.grad(lambda p, x, y: loss_fn(apply(p, x), y)))
  server = jax.tree.map(np.asarray, params)
  deltas = []
  for c in range(xs.shape[0]):
    p = server
    for s in range(xs.shape[1]):
      g = grad(p, xs[c, s], ys[c, s])
      p = jax.tree.map(lambda a, b: np.asarray(a) - LR * np.asarray(b), p, g)
    deltas.append(jax.tree.map(lambda a, b: a - b, p, server))
  w = weights / weights.sum()
  mean = jax.tree.map(lambda *d: sum(wi * di for wi, di in zip(w, d)), *deltas)
  return jax.tree.map(lambda a, d: a + server_lr * d, server, mean)


def _engine_round(apply, loss_fn, params, xs, ys, weights, n_dev, parallelism, server_lr=1.0, chunk=8):
  mesh = client_mesh(n_dev)
  server_tx = optax.sgd(server_lr)
  fn = engine.make_round_fn(apply, loss_fn, optax.sgd(LR), server_tx, mesh,
                            client_parallelism=parallelism, unroll_local_steps=True, client_chunk=chunk)
  state = engine.init_server_state(jax.tree.map(jnp.array, params), server_tx, jax.random.key(0))
  state, metrics = fn(state, *shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh))
  return jax.tree.map(np.asarray, state["params"]), metrics


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("parallelism", ["vmap", "unroll"])
def test_round_equals_per_client_loop(parallelism):
  apply, params, loss_fn, xs, ys, weights = _setup()
  ref = _reference_round(apply, loss_fn, params, xs, ys, weights)
  got, metrics = _engine_round(apply, loss_fn, params, xs, ys, weights, 4, parallelism)
  assert jax.tree.structure(ref) == jax.tree.structure(got)
  assert _max_diff(ref, got) < 2e-5
  # the round really moved the model (a no-op engine would fail the check above only by luck)
  assert _max_diff(params, got) > 1e-3
  assert metrics["client_loss"].shape == (C,)


@pytest.mark.parametrize("parallelism,n_dev,chunk", [("chunked", 2, 2), ("map", 4, 1)])
def test_chunked_and_map_strategies_equal_per_client_loop(parallelism, n_dev, chunk):
  apply, params, loss_fn, xs, ys, weights = _setup()
  ref = _reference_round(apply, loss_fn, params, xs, ys, weights)
  got, metrics = _engine_round(apply, loss_fn, params, xs, ys, weights, n_dev, parallelism, chunk=chunk)
  assert _max_diff(ref, got) < 2e-5
  assert metrics["client_loss"].shape == (C,)


def test_server_optimizer_scales_the_mean_delta():
  apply, params, loss_fn, xs, ys, weights = _setup(seed=3)
  ref = _reference_round(apply, loss_fn, params, xs, ys, weights, server_lr=0.5)
  got, _ = _engine_round(apply, loss_fn, params, xs, ys, weights, 2, "vmap", server_lr=0.5)
  assert _max_diff(ref, got) < 2e-5


def test_weights_matter():
  """Equal weights give a different model than skewed weights (the weighting is not ignored)."""
  apply, params, loss_fn, xs, ys, weights = _setup()
  a, _ = _engine_round(apply, loss_fn, params, xs, ys, weights, 1, "unroll")
  b, _ = _engine_round(apply, loss_fn, params, xs, ys, np.ones_like(weights), 1, "unroll")
  assert _max_diff(a, b) > 1e-4


def test_same_round_on_1_2_4_8_devices():
  assert jax.device_count() >= 8
  apply, params, loss_fn, xs, ys, weights = _setup(seed=1)
  outs = {n: _engine_round(apply, loss_fn, params, xs, ys, weights, n, "vmap")[0] for n in (1, 2, 4, 8)}
  for n in (2, 4, 8):
    assert _max_diff(outs[1], outs[n]) < 1e-5, n


def test_round_is_one_program_sharded_over_clients():
  """The round lowers to one jitted computation whose client inputs are split over the mesh."""
  apply, params, loss_fn, xs, ys, weights = _setup()
  mesh = client_mesh(8)
  fn = engine.make_round_fn(apply, loss_fn, optax.sgd(LR), optax.sgd(1.0), mesh,
                            client_parallelism="vmap", unroll_local_steps=True)
  state = engine.init_server_state(params, optax.sgd(1.0), jax.random.key(0))
  sx, sy, sw = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  assert len(sx.sharding.device_set) == 8
  assert sx.addressable_shards[0].data.shape[0] == C // 8
  text = fn.lower(state, sx, sy, sw).as_text()
  assert "all-reduce" in text or "all_reduce" in text
