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


def _setup(seed=0, clients=C):
  model_cfg = ml_collections.ConfigDict(dict(name="unet", width=4, depth=2, groups=2, num_classes=3))
  apply, params = init_params(model_cfg, seed)
  loss_fn = make_segmentation_loss(ml_collections.ConfigDict(dict(ce_weight=0.5, dice_weight=0.5)))
  kx, ky = jax.random.split(jax.random.key(seed + 1))
  xs = np.asarray(jax.random.normal(kx, (C, S, B, H, H, 1)))
  ys = np.asarray(jax.random.randint(ky, (C, S, B, H, H), 0, 3))
  weights = np.array([5, 1, 3, 8, 2, 2, 7, 4], np.float32)  # unequal client data sizes
  return apply, params, loss_fn, xs[:clients], ys[:clients], weights[:clients]


def _reference_round(apply, loss_fn, params, xs, ys, weights, server_lr=1.0, compute_dtype=None):
  """Each client trained on its own with plain SGD (numpy updates on f32 weights), then the weighted
  mean. ``compute_dtype``: the gradient is computed on params and images cast to it."""
  cast = (
    (lambda t: t)
    if compute_dtype is None
    # noqa: E731
    else (lambda t: jax.tree.map(lambda a: jnp.asarray(a, compute_dtype), t))
  )
  grad = jax.jit(jax.grad(lambda p, x, y: loss_fn(apply(cast(p), cast(x)).astype(jnp.float32), y)))
  server = jax.tree.map(np.asarray, params)
  deltas = []
  for c in range(xs.shape[0]):
    p = server
    for s in range(xs.shape[1]):
      g = grad(p, xs[c, s], ys[c, s])
      p = jax.tree.map(lambda a, b: np.asarray(a) - LR * np.asarray(b, np.float32), p, g)
    deltas.append(jax.tree.map(lambda a, b: a - b, p, server))
  w = weights / weights.sum()
  mean = jax.tree.map(lambda *d: sum(wi * di for wi, di in zip(w, d)), *deltas)
  return jax.tree.map(lambda a, d: a + server_lr * d, server, mean)


def _engine_round(
  apply, loss_fn, params, xs, ys, weights, n_dev, parallelism, server_lr=1.0, chunk=8, chunk_strategy="bgemm"
):
  mesh = client_mesh(n_dev)
  server_tx = optax.sgd(server_lr)
  fn = engine.make_round_fn(
    apply,
    loss_fn,
    optax.sgd(LR),
    server_tx,
    mesh,
    client_parallelism=parallelism,
    unroll_local_steps=True,
    client_chunk=chunk,
    chunk_strategy=chunk_strategy,
  )
  state = engine.init_server_state(jax.tree.map(jnp.array, params), server_tx, jax.random.key(0))
  state, metrics = fn(state, *shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh))
  return jax.tree.map(np.asarray, state["params"]), metrics


def _max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.parametrize("parallelism", ["vmap", "gconv", "bgemm", "hybrid", "unroll"])
def test_round_equals_per_client_loop(parallelism):
  apply, params, loss_fn, xs, ys, weights = _setup()
  ref = _reference_round(apply, loss_fn, params, xs, ys, weights)
  got, metrics = _engine_round(apply, loss_fn, params, xs, ys, weights, 4, parallelism)
  assert jax.tree.structure(ref) == jax.tree.structure(got)
  assert _max_diff(ref, got) < 2e-5
  # the round really moved the model (a no-op engine would fail the check above only by luck)
  assert _max_diff(params, got) > 1e-3
  assert metrics["client_loss"].shape == (C,)


@pytest.mark.parametrize(
  "parallelism,n_dev,chunk,inner",
  [("chunked", 2, 2, "bgemm"), ("chunked", 1, 3, "bgemm"), ("chunked", 2, 2, "hybrid"), ("map", 4, 1, "bgemm")],
)
def test_chunked_and_map_strategies_equal_per_client_loop(parallelism, n_dev, chunk, inner):
  apply, params, loss_fn, xs, ys, weights = _setup()
  ref = _reference_round(apply, loss_fn, params, xs, ys, weights)
  got, metrics = _engine_round(
    apply, loss_fn, params, xs, ys, weights, n_dev, parallelism, chunk=chunk, chunk_strategy=inner
  )
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
  a, _ = _engine_round(apply, loss_fn, params, xs, ys, weights, 2, "vmap")
  b, _ = _engine_round(apply, loss_fn, params, xs, ys, np.ones_like(weights), 2, "vmap")
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
  fn = engine.make_round_fn(
    apply, loss_fn, optax.sgd(LR), optax.sgd(1.0), mesh, client_parallelism="vmap", unroll_local_steps=True
  )
  state = engine.init_server_state(params, optax.sgd(1.0), jax.random.key(0))
  sx, sy, sw = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  assert len(sx.sharding.device_set) == 8
  assert sx.addressable_shards[0].data.shape[0] == C // 8
  text = fn.lower(state, sx, sy, sw).as_text()
  assert "all-reduce" in text or "all_reduce" in text


def _tree_np(t):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), t)


def _scaffold_reference(apply, loss_fn, server, control, client_c, rounds):
  """SCAFFOLD option II, client by client with numpy updates (SGD, server lr 1, weighted mean delta,
  control update (1/N) sum of c_i changes). ``rounds``: list of (client ids, xs, ys, weights)."""
  grad = jax.jit(jax.grad(lambda p, x, y: loss_fn(apply(p, x), y)))
  n_total = len(client_c)
  for ids, xs, ys, weights in rounds:
    deltas, dcs = [], []
    for row, cid in enumerate(ids):
      y = server
      for s in range(xs.shape[1]):
        g = _tree_np(grad(jax.tree.map(np.float32, y), xs[row, s], ys[row, s]))
        y = jax.tree.map(lambda p, gi, c, ci: p - LR * (gi + c - ci), y, g, control, client_c[cid])
      new_ci = jax.tree.map(
        lambda ci, c, x, yi: ci - c + (x - yi) / (xs.shape[1] * LR), client_c[cid], control, server, y
      )
      dcs.append(jax.tree.map(np.subtract, new_ci, client_c[cid]))
      client_c[cid] = new_ci
      deltas.append(jax.tree.map(np.subtract, y, server))
    w = weights / weights.sum()
    server = jax.tree.map(lambda x, *d: x + sum(wi * di for wi, di in zip(w, d)), server, *deltas)
    control = jax.tree.map(lambda c, *d: c + sum(d) / n_total, control, *dcs)
  return server, control, client_c


@pytest.mark.parametrize("parallelism,n_dev", [("vmap", 2), ("unroll", 4), ("chunked", 1)])
def test_scaffold_equals_per_client_loop(parallelism, n_dev):
  """Two SCAFFOLD rounds over overlapping client samples (so some clients start from c_i != 0)."""
  apply, params, loss_fn, xs, ys, weights = _setup(seed=4, clients=4)
  n_total = 6
  samples = [np.arange(0, 4), np.array([2, 5, 3, 4])]
  rounds = [(ids, xs[::-1] if r else xs, ys[::-1] if r else ys, weights) for r, ids in enumerate(samples)]
  zeros = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  ref_server, ref_control, ref_c = _scaffold_reference(
    apply, loss_fn, _tree_np(params), zeros, {i: zeros for i in range(n_total)}, rounds
  )

  mesh = client_mesh(n_dev)
  fn = engine.make_round_fn(
    apply,
    loss_fn,
    optax.sgd(LR),
    optax.sgd(1.0),
    mesh,
    client_parallelism=parallelism,
    unroll_local_steps=True,
    client_chunk=2,
    algorithm="scaffold",
    client_lr=LR,
    num_clients=n_total,
  )
  state = engine.init_server_state(params, optax.sgd(1.0), jax.random.key(0), algorithm="scaffold")
  table = jax.tree.map(np.array, engine.init_client_state(params, n_total, "scaffold"))
  for ids, rx, ry, rw in rounds:
    rows = jax.tree.map(lambda a: jnp.asarray(a[ids]), table)
    state, _, new_rows = fn(state, *shard_clients((jnp.asarray(rx), jnp.asarray(ry), jnp.asarray(rw), rows), mesh))
    table = jax.tree.map(lambda t, r: (t.__setitem__(ids, np.asarray(r)), t)[1], table, new_rows)
  assert _max_diff(ref_server, state["params"]) < 5e-5
  assert _max_diff(ref_control, state["control"]) < 5e-4
  for cid in range(n_total):
    assert _max_diff(ref_c[cid], jax.tree.map(lambda t: t[cid], table)) < 5e-4, cid
  # the correction really acted: plain FedAvg from the same start ends elsewhere
  assert _max_diff(ref_control, zeros) > 1e-3


@pytest.mark.parametrize("parallelism", ["unroll", "hybrid"])  # bgemm's bf16 convs: test_conv.py
def test_bf16_compute_keeps_f32_master_weights(parallelism):
  apply, params, loss_fn, xs, ys, weights = _setup(seed=5, clients=4)
  mesh = client_mesh(2)
  fn = engine.make_round_fn(
    apply,
    loss_fn,
    optax.sgd(LR),
    optax.sgd(1.0),
    mesh,
    client_parallelism=parallelism,
    unroll_local_steps=True,
    compute_dtype=jnp.bfloat16,
  )
  state = engine.init_server_state(params, optax.sgd(1.0), jax.random.key(0))
  state, _ = fn(state, *shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh))
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(state["params"]))
  ref16 = _reference_round(apply, loss_fn, params, xs, ys, weights, compute_dtype=jnp.bfloat16)
  ref32 = _reference_round(apply, loss_fn, params, xs, ys, weights)
  step = _max_diff(ref32, params)
  # the bf16 round is the bf16 reference up to bf16 rounding, and it is not the f32 round
  assert _max_diff(ref16, state["params"]) < 0.05 * step
  assert _max_diff(ref32, ref16) > 1e-6


@pytest.mark.parametrize("parallelism", ["chunked", "hybrid"])
def test_remat_gives_the_same_round(parallelism):
  apply, params, loss_fn, xs, ys, weights = _setup(seed=6, clients=4)
  outs = []
  for remat in (False, True):
    mesh = client_mesh(2)
    fn = engine.make_round_fn(
      apply,
      loss_fn,
      optax.sgd(LR),
      optax.sgd(1.0),
      mesh,
      client_parallelism=parallelism,
      unroll_local_steps=True,
      remat=remat,
      client_chunk=2,
    )
    state = engine.init_server_state(params, optax.sgd(1.0), jax.random.key(0))
    outs.append(fn(state, *shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh))[0])
  assert _max_diff(outs[0]["params"], outs[1]["params"]) < 1e-5
  assert _max_diff(outs[0]["params"], params) > 1e-3


def test_measure_strategy_skips_failures_and_leaves_state_untouched():
  apply, params, loss_fn, xs, ys, weights = _setup(seed=7, clients=4)
  mesh = client_mesh(2)
  build = lambda par: engine.make_round_fn(
    apply,
    loss_fn,
    optax.sgd(LR),
    optax.sgd(1.0),
    mesh,  # noqa: E731
    client_parallelism=par,
    unroll_local_steps=True,
  )
  state = engine.init_server_state(params, optax.sgd(1.0), jax.random.key(0))
  batch = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  logs = []
  best, fn, results = engine.measure_strategy(
    build, ["unroll", "no_such_strategy", "vmap"], state, batch, reps=1, log=logs.append
  )
  assert best in ("unroll", "vmap") and len(logs) == 3
  assert "error" in results[1] and "no_such_strategy" in results[1]["error"]
  assert all(r["sec_per_round"] > 0 for r in (results[0], results[2]))
  assert best == min((results[0], results[2]), key=lambda r: r["sec_per_round"])["strategy"]
  # the measured rounds ran on copies: the state is still usable and still the initial one
  assert _max_diff(state["params"], params) == 0
  got = jax.tree.map(np.asarray, fn(state, *batch)[0]["params"])
  assert _max_diff(_reference_round(apply, loss_fn, params, xs, ys, weights), got) < 2e-5


def test_1024_clients_in_one_round_chunked_on_8_devices():
  """1,024 clients (128 per device, scanned in chunks of 32) equal the per-client loop."""
  n = 1024
  model_cfg = ml_collections.ConfigDict(dict(name="unet", width=2, depth=1, groups=1, num_classes=3))
  apply, params = init_params(model_cfg, 0)
  loss_fn = make_segmentation_loss(ml_collections.ConfigDict(dict(ce_weight=0.5, dice_weight=0.5)))
  rng = np.random.default_rng(0)
  xs = rng.standard_normal((n, 1, 1, 8, 8, 1)).astype(np.float32)
  ys = rng.integers(0, 3, (n, 1, 1, 8, 8)).astype(np.int32)
  weights = rng.integers(1, 10, n).astype(np.float32)
  mesh = client_mesh(8)
  fn = engine.make_round_fn(
    apply,
    loss_fn,
    optax.sgd(LR),
    optax.sgd(1.0),
    mesh,
    client_parallelism="chunked",
    unroll_local_steps=True,
    client_chunk=32,
  )
  state = engine.init_server_state(params, optax.sgd(1.0), jax.random.key(0))
  state, metrics = fn(state, *shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh))
  assert metrics["client_loss"].shape == (n,)
  # reference: one SGD step per client (jitted gradient, numpy update), weighted mean of the deltas
  grads = jax.jit(jax.vmap(jax.grad(lambda p, x, y: loss_fn(apply(p, x), y)), in_axes=(None, 0, 0)))
  g = jax.tree.map(np.asarray, grads(params, jnp.asarray(xs[:, 0]), jnp.asarray(ys[:, 0])))
  w = weights / weights.sum()
  ref = jax.tree.map(lambda p, gi: np.asarray(p) - LR * np.tensordot(w, gi, axes=1), params, g)
  assert _max_diff(ref, state["params"]) < 1e-5
  assert _max_diff(params, state["params"]) > 1e-4


@pytest.mark.parametrize(
  "platform,model,per_shard,expected",
  [
    ("cpu", "unet", 4, ("unroll", True)),
    ("cpu", "transunet", 128, ("unroll", True)),
    ("gpu", "unet", 16, ("hybrid", False)),
    ("gpu", "transunet", 16, ("bgemm", False)),
    ("gpu", "unet", 17, ("chunked", False)),
    ("tpu", "transunet", 128, ("chunked", False)),
    ("gpu", None, None, ("chunked", False)),
    ("gpu", "resnet", 4, ("chunked", False)),
  ],
)
def test_auto_engine_options_per_backend(platform, model, per_shard, expected):
  """'auto' resolves to the strategy measured fastest on each backend and model (README tables):
  at most 16 clients per accelerator the model's best, more (or unknown) 'chunked'; explicit
  settings pass through."""
  cfg = ml_collections.ConfigDict(dict(client_parallelism="auto", unroll_local_steps="auto"))
  assert engine.resolve_engine_options(cfg, platform, model, per_shard) == expected
  cfg = ml_collections.ConfigDict(dict(client_parallelism="measure", unroll_local_steps=False))
  assert engine.resolve_engine_options(cfg, platform, model, per_shard) == ("measure", False)


def test_measure_candidates():
  assert engine.measure_candidates("cpu", 64, 8) == ["unroll", "bgemm", "vmap"]
  assert engine.measure_candidates("gpu", 16, 4) == ["hybrid", "bgemm", "chunked", "vmap", "map", "unroll"]
  # one chunk = bgemm; more than 16 clients are not unrolled
  assert engine.measure_candidates("gpu", 16, 16) == ["hybrid", "bgemm", "vmap", "map", "unroll"]
  assert engine.measure_candidates("gpu", 128, 16) == ["hybrid", "bgemm", "chunked", "vmap", "map"]


@pytest.mark.parametrize("parallelism,n_dev,chunk", [("vmap", 4, 8), ("unroll", 2, 8), ("chunked", 2, 2)])
def test_skip_nonfinite_clients_drops_them_from_the_aggregate(parallelism, n_dev, chunk):
  """Clients 1 and 6 get NaN images: with skip_nonfinite the round equals the per-client loop over the
  six finite clients; client_finite flags exactly them; without it the round reports non-finite."""
  apply, params, loss_fn, xs, ys, weights = _setup()
  xs = xs.copy()
  xs[1, 0, 0, 3, 3, 0] = np.nan
  xs[6, 1] = np.nan
  keep = np.array([c not in (1, 6) for c in range(C)])
  ref = _reference_round(apply, loss_fn, params, xs[keep], ys[keep], weights[keep])
  mesh = client_mesh(n_dev)
  for skip in (True, False):
    fn = engine.make_round_fn(
      apply,
      loss_fn,
      optax.sgd(LR),
      optax.sgd(1.0),
      mesh,
      client_parallelism=parallelism,
      unroll_local_steps=True,
      client_chunk=chunk,
      skip_nonfinite=skip,
    )
    state = engine.init_server_state(jax.tree.map(jnp.array, params), optax.sgd(1.0), jax.random.key(0))
    state, m = fn(state, *shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh))
    np.testing.assert_array_equal(np.asarray(m["client_finite"]), keep)
    if skip:
      assert bool(m["finite"]) and np.isfinite(float(m["loss"]))
      assert _max_diff(ref, jax.tree.map(np.asarray, state["params"])) < 2e-5
    else:
      assert not bool(m["finite"])
