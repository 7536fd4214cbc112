"""FedBN and Ditto, the personalisation methods: rounds of the jitted, sharded engine (rows carried over
two rounds of overlapping client samples) against per-client numpy loops written from each paper.

The references take (loss, gradient) of ONE client's segmentation loss from ``jax.value_and_grad``; the SGD steps,
FedBN's kept / zeroed normalisation leaves, Ditto's proximal gradient lambda (v - w) and the weighted
means are numpy. Which leaves are normalisation parameters the tests read off the nnx module tree (the
GroupNorm / LayerNorm modules), not from :func:`fedkd.fl.algorithms.fedbn.is_norm`.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from test_algorithms import _data, _local_sgd_np, _weighted_mean
from test_engine import LR, _build, _max_diff, _tree_np

from fedkd.fl import algorithms
from fedkd.fl.algorithm import init_rows
from fedkd.fl.algorithms.fedbn import is_norm, norm_leaves
from fedkd.models import build_model
from fedkd.sharding import replicate, shard_clients

TINY_UNET = dict(name="unet", width=4, depth=1, groups=2, num_classes=3)  # tests/test_engine.py's _setup
TINY_TRANSUNET = dict(
  name="transunet",
  num_classes=3,
  image_size=16,
  patch_size=4,
  stem_width=4,
  hidden=16,
  num_layers=2,
  num_heads=2,
  mlp_dim=16,
  decoder_width=16,
  skips=True,
)
N_TOTAL = 6
SAMPLES = [np.arange(4), np.array([2, 5, 3, 4])]  # round 2: clients 2 and 3 again, 4 and 5 new
STEPS = [[2, 1, 2, 2], [1, 2, 2, 1]]  # per round, per client: unequal local work (batch["steps"])


def _plain(path):
  """A jax key path as a tuple of plain keys."""
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def _norm_paths(model):
  """{param path} of every GroupNorm / LayerNorm scale and bias, read off the nnx module tree."""
  paths = set()
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.GroupNorm, nnx.LayerNorm)):
      paths |= {tuple(path) + (k,) for k in ("scale", "bias") if getattr(node, k, None) is not None}
  return paths


@functools.cache
def _problem():
  """tests/test_engine.py's tiny UNet problem (4 clients, 2 local batches each; one model for the whole
  file, so the references' jitted gradients compile once) and the model's norm-leaf mask."""
  apply, params, loss_fn, xs, ys, weights = _data(seed=12, steps=2)
  paths = _norm_paths(build_model(ml_collections.ConfigDict(TINY_UNET), 0))
  mask = jax.tree_util.tree_map_with_path(lambda p, _: _plain(p) in paths, params)
  return apply, params, loss_fn, xs, ys, weights, mask


@functools.cache
def _value_grad_fn(apply, loss_fn):
  """(loss, gradient) of one client's segmentation loss (f32, jitted), as (float, float64 numpy tree)."""
  vg = jax.jit(jax.value_and_grad(lambda p, x, y: loss_fn(apply(p, x), y)))

  def f(p, x, y):
    loss, g = vg(jax.tree.map(np.float32, p), x, y)
    return float(loss), _tree_np(g)

  return f


def _grad(apply, loss_fn):
  vg = _value_grad_fn(apply, loss_fn)
  return lambda p, x, y: vg(p, x, y)[1]


def _rounds(xs, ys, weights, steps=None):
  """The two rounds of SAMPLES: (ids, xs, ys, weights, steps); round 2 sees the data reversed."""
  out = []
  for r, ids in enumerate(SAMPLES):
    st = None if steps is None else steps[r]
    out.append((ids, xs[::-1] if r else xs, ys[::-1] if r else ys, weights, st))
  return out


def _engine_rounds(alg, apply, loss_fn, params, rounds, layout, n_dev, chunk, table=None):
  """The rounds through engine.make_round_fn, the rows kept in a numpy table of N_TOTAL clients."""
  fn, mesh, _ = _build(apply, loss_fn, n_dev, layout, algorithm=alg, chunk=chunk)
  # replicated on the mesh as the round returns it: every round runs one compiled program
  state = replicate(alg.init(params, jax.random.key(0)), mesh)
  if table is None:
    table = jax.tree.map(np.array, init_rows(alg, params, N_TOTAL))
  metrics = []
  for ids, rx, ry, rw, steps in rounds:
    rows = jax.tree.map(lambda a: jnp.asarray(a[ids]), table)
    batch = {"x": jnp.asarray(rx), "y": jnp.asarray(ry)}
    if steps is not None:
      batch["steps"] = jnp.asarray(steps, jnp.int32)
    rows, batch, rw = shard_clients((rows, batch, jnp.asarray(rw)), mesh)
    state, new_rows, m = fn(state, rows, batch, rw)
    table = jax.tree.map(lambda t, v: (t.__setitem__(ids, np.asarray(v)), t)[1], table, new_rows)
    metrics.append(jax.tree.map(np.asarray, m))
  return state, table, metrics


def _row(table, cid):
  return jax.tree.map(lambda t: t[cid], table)


# ------------------------------------------------------------------------------------------------ FedBN


@pytest.mark.parametrize("model_cfg", [TINY_UNET, TINY_TRANSUNET], ids=["unet", "transunet"])
def test_is_norm_selects_exactly_the_normalisation_leaves(model_cfg):
  model = build_model(ml_collections.ConfigDict(model_cfg), 0)
  params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
  want = _norm_paths(model)
  got = {_plain(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0] if is_norm(p)}
  assert got == want and want
  layers = {p[:-1] for p in want}  # every norm layer contributes (its scale and its bias)
  assert {p[:-1] for p in got} == layers and len(got) == 2 * len(layers)
  kinds = {type(n).__name__ for _, n in nnx.iter_graph(model) if isinstance(n, (nnx.GroupNorm, nnx.LayerNorm))}
  assert kinds == ({"GroupNorm"} if model_cfg["name"] == "unet" else {"GroupNorm", "LayerNorm"})
  # the row: the params tree pruned to exactly these leaves (plain-key paths work like jax key paths)
  row = norm_leaves(params)
  assert {_plain(p) for p, _ in jax.tree_util.tree_flatten_with_path(row)[0]} == want
  assert all(is_norm(p) for p in want)
  # conv / linear biases and the position embedding are not norm leaves
  assert not any(is_norm(p) for p in [("head", "bias"), ("encoder", "pos_embed"), ("mid", "conv1", "bias")])


def _fedbn_reference(apply, loss_fn, params, mask, rounds):
  """Li et al. 2021 with the norm leaves ``mask``: client i starts from the server model with its own
  norm leaves, runs SGD, uploads its delta with the norm leaves zeroed and keeps its local norm leaves;
  the server adds the data-size weighted mean delta. Returns (server, {client: its personal model})."""
  grad, x = _grad(apply, loss_fn), _tree_np(params)
  keep = {cid: x for cid in range(N_TOTAL)}  # client -> a model whose norm leaves are the client's
  for ids, xs, ys, weights, steps in rounds:
    deltas = []
    for r, cid in enumerate(ids):
      start = jax.tree.map(lambda m, b, a: b if m else a, mask, keep[cid], x)
      y = _local_sgd_np(grad, start, xs[r], ys[r], xs.shape[1] if steps is None else steps[r])
      deltas.append(jax.tree.map(lambda m, a, b: np.zeros_like(a) if m else a - b, mask, y, start))
      keep[cid] = y
    x = jax.tree.map(np.add, x, _weighted_mean(deltas, weights))
  return x, {cid: jax.tree.map(lambda m, b, a: b if m else a, mask, keep[cid], x) for cid in keep}


@pytest.mark.parametrize(
  "layout,n_dev,chunk,steps", [("vmap", 2, 8, STEPS), ("chunked", 1, 2, None)], ids=["vmap-steps", "chunked"]
)
def test_fedbn_two_rounds_equal_per_client_loop(layout, n_dev, chunk, steps):
  apply, params, loss_fn, xs, ys, weights, mask = _problem()
  rounds = _rounds(xs, ys, weights, steps)
  ref_x, ref_personal = _fedbn_reference(apply, loss_fn, params, mask, rounds)
  alg = algorithms.make("fedbn", optax.sgd(1.0), client_lr=LR, num_clients=N_TOTAL)
  state, table, _ = _engine_rounds(alg, apply, loss_fn, params, rounds, layout, n_dev, chunk)

  # the server: its norm leaves never move, the rest is the mean of the (norm-zeroed) deltas
  assert _max_diff(ref_x, state["params"]) < 5e-5
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(params), jax.tree.leaves(state["params"])):
    if m:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _max_diff(params, state["params"]) > 1e-3
  # every client's personal model (server params + its norm leaves), hence its row
  for cid in range(N_TOTAL):
    mine = alg.personal(state["params"], _row(table, cid))
    assert jax.tree.structure(mine) == jax.tree.structure(params)
    assert _max_diff(ref_personal[cid], mine) < 5e-5, cid
  # the rows really are per client: the sampled clients' norm layers moved, and apart
  moved = [_max_diff(norm_leaves(params), _row(table, cid)) for cid in range(N_TOTAL)]
  assert min(moved) > 1e-4 and _max_diff(_row(table, 2), _row(table, 3)) > 1e-4
  assert algorithms.FedAvg(optax.sgd(1.0)).personal(params, None) is None  # the base class's default


def test_fedbn_server_keeps_norm_leaves_under_a_decaying_optimizer():
  """The server's norm leaves stay put even if the server optimizer moves params with a zero update."""
  _, params, _, _, _, _, mask = _problem()
  alg = algorithms.FedBN(optax.adamw(0.1, weight_decay=0.5))
  state = alg.init(params, jax.random.key(0))
  aggregate = jax.tree.map(lambda m, a: jnp.zeros_like(a) if m else jnp.ones_like(a), mask, params)
  new, _ = jax.jit(alg.server)(state, aggregate, None, None)
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(params), jax.tree.leaves(new["params"])):
    assert np.array_equal(np.asarray(a), np.asarray(b)) == m
  with pytest.raises(ValueError, match="normalisation"):
    alg.init_row({"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}})


# ------------------------------------------------------------------------------------------------ Ditto


def _sgd_with_losses(vg, start, xs, ys, steps, extra=None):
  """``steps`` SGD(LR) steps (numpy) -> (params, mean segmentation loss over them); ``extra(p)``: a
  params-shaped term added to each gradient."""
  p, losses = start, []
  for s in range(steps):
    loss, g = vg(p, xs[s], ys[s])
    if extra is not None:
      g = jax.tree.map(np.add, g, extra(p))
    p = jax.tree.map(lambda a, b: a - LR * b, p, g)
    losses.append(loss)
  return p, float(np.mean(losses))


def _ditto_reference(apply, loss_fn, params, lam, rounds, personal=None):
  """Li et al. 2021, Algorithm 1 with FedAvg as the global solver: w_i = SGD from w on F_i (uploaded as
  w_i - w, weighted mean at the server); v_i = SGD from v_i on F_i with the gradient + lam (v_i - w),
  w the model received. Returns (server, {client: v_i}, [per round: (client losses, personal losses)])."""
  vg, x = _value_grad_fn(apply, loss_fn), _tree_np(params)
  vs = dict(personal) if personal is not None else {cid: x for cid in range(N_TOTAL)}
  per_round = []
  for ids, xs, ys, weights, steps in rounds:
    deltas, losses, plosses = [], [], []
    for r, cid in enumerate(ids):
      k = xs.shape[1] if steps is None else steps[r]
      w_i, loss = _sgd_with_losses(vg, x, xs[r], ys[r], k)
      pull = lambda v, x=x: jax.tree.map(lambda a, b: lam * (a - b), v, x)  # noqa: E731
      vs[cid], ploss = _sgd_with_losses(vg, vs[cid], xs[r], ys[r], k, extra=pull)
      deltas.append(jax.tree.map(np.subtract, w_i, x))
      losses.append(loss)
      plosses.append(ploss)
    x = jax.tree.map(np.add, x, _weighted_mean(deltas, weights))
    per_round.append((np.array(losses), np.array(plosses)))
  return x, vs, per_round


@pytest.mark.parametrize(
  "layout,n_dev,chunk,steps", [("vmap", 2, 8, STEPS), ("unroll", 4, 8, None)], ids=["vmap-steps", "unroll"]
)
def test_ditto_two_rounds_equal_per_client_loop(layout, n_dev, chunk, steps):
  apply, params, loss_fn, xs, ys, weights, _ = _problem()
  lam = 3.0
  rounds = _rounds(xs, ys, weights, steps)
  ref_x, ref_v, ref_losses = _ditto_reference(apply, loss_fn, params, lam, rounds)
  alg = algorithms.make("ditto", optax.sgd(1.0), client_lr=LR, num_clients=N_TOTAL, ditto_lambda=lam)
  assert alg.lam == lam
  state, table, metrics = _engine_rounds(alg, apply, loss_fn, params, rounds, layout, n_dev, chunk)
  assert _max_diff(ref_x, state["params"]) < 5e-5  # the global model is FedAvg's
  for cid in range(N_TOTAL):
    mine = alg.personal(state["params"], _row(table, cid))
    assert _max_diff(ref_v[cid], mine) < 5e-5, cid
  for m, (losses, plosses) in zip(metrics, ref_losses):
    np.testing.assert_allclose(m["client_loss"], losses, rtol=1e-5)
    np.testing.assert_allclose(m["personal_loss"], plosses, rtol=1e-5)
  # client 3's personal model carried its round-1 state into round 2: it is not the global model
  assert _max_diff(ref_v[3], ref_x) > 1e-3 and _max_diff(ref_v[0], ref_x) > 1e-3


@pytest.mark.parametrize("lam", [0.0, 1.0 / LR])
def test_ditto_lambda_limits(lam):
  """One local step from personal models v_i far from w. lambda = 0: the personal part is plain SGD
  from v_i (w plays no part). lambda = 1/lr, the strongest pull SGD(lr) takes in one step: the step
  v - lr (grad F_i(v) + lambda (v - w)) lands at w - lr grad F_i(v) whatever v was, next to w."""
  apply, params, loss_fn, xs, ys, weights, _ = _problem()
  xs, ys = xs[:, :1], ys[:, :1]  # one local step (compile time)
  alg = algorithms.Ditto(optax.sgd(1.0), lam)
  rng = np.random.default_rng(0)
  table = jax.tree.map(lambda a: np.array(a + 0.5 * rng.standard_normal((N_TOTAL,) + a.shape), np.float32), params)
  v0 = {cid: _tree_np(_row(table, cid)) for cid in range(N_TOTAL)}
  _, table, _ = _engine_rounds(
    alg, apply, loss_fn, params, [(np.arange(4), xs, ys, weights, None)], "vmap", 2, 8, table
  )
  grad, w = _grad(apply, loss_fn), _tree_np(params)
  for c in range(4):
    got = _row(table, c)
    if lam == 0.0:
      want = _local_sgd_np(grad, v0[c], xs[c], ys[c], 1)
    else:  # the closed form
      want = jax.tree.map(lambda a, g: a - LR * g, w, grad(v0[c], xs[c, 0], ys[c, 0]))
      assert _max_diff(got, w) < 0.1 * _max_diff(v0[c], w)
    assert _max_diff(want, got) < 5e-5, c
  for cid in (4, 5):  # not sampled: untouched
    assert _max_diff(v0[cid], _row(table, cid)) == 0.0


def test_fedbn_counts_only_the_shared_leaves_as_sent(tmp_path):
  """FedBN's uploads hold its normalisation leaves as zeros, and comm/bytes_up counted them as sent (and the
  server's norm leaves as received). They stay with each client: the bytes are float32 of the other leaves,
  counted here by module name (every convolution kernel and bias; no GroupNorm scale or bias)."""
  import json
  import os

  from test_training import tiny_config

  from fedkd.models import init_params
  from fedkd.tasks import fedavg

  c = tiny_config(num_rounds=1, num_clients=2, clients_per_round=2)
  c.algorithm.name = "fedbn"
  fedavg.run(c, str(tmp_path / "w"), log=lambda _: None)
  (rec,) = [json.loads(line) for line in open(os.path.join(tmp_path / "w", "rounds.jsonl"))]
  _, params = init_params(c.model, c.seed)
  keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  shared = sum(a.size for k, a in zip(keys, jax.tree.leaves(params)) if "['norm" not in k)
  assert 0 < shared < sum(a.size for a in jax.tree.leaves(params))
  assert rec["comm/bytes_up"] == rec["comm/bytes_down"] == 2 * 4 * shared
