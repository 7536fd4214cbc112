"""Compressed uploads (fedkd.fl.compress): the int8 quantiser's grid and unbiasedness, top-k against a
numpy argsort, error feedback through the engine against a per-client numpy loop, the byte counts
against hand-computed numbers, FedNova's dict upload and the row composition.

The references are numpy (the top-k selection, the residuals, the weighted mean, the 256-level grid);
the engine rounds' local training is tests/test_algorithms.py's per-client numpy SGD loop.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_algorithms import _grad_fn, _local_sgd_np, _weighted_mean
from test_engine import _build, _max_diff, _setup, _tree_np

from fedkd.fl import algorithms, compress
from fedkd.fl.algorithm import ClientContext, init_rows
from fedkd.sharding import replicate, shard_clients

# ------------------------------------------------------------------------------------------------ int8


def test_int8_on_the_grid_within_one_step_and_unbiased():
  rng = np.random.default_rng(0)
  u = rng.normal(0.3, 2.0, (6, 7)).astype(np.float32)
  lo, hi = float(u.min()), float(u.max())
  scale = (hi - lo) / 255
  n = 4000
  keys = jax.random.split(jax.random.key(1), n)
  dec = np.asarray(jax.jit(jax.vmap(lambda k: compress.quantize_int8(jnp.asarray(u), k)))(keys), np.float64)
  assert dec.shape == (n, 6, 7) and dec.dtype == np.float64
  # on the 256-level grid of [min, max]
  level = (dec - lo) / scale
  assert np.max(np.abs(level - np.round(level))) < 2e-3
  assert np.round(level).min() >= 0 and np.round(level).max() <= 255
  # within one grid step of the value, and rounded to one of its two neighbours
  assert np.max(np.abs(dec - u)) < scale * (1 + 1e-4)
  # unbiased: the mean over n draws is u up to 5 standard errors (the variance of one draw is <= scale^2 / 4)
  assert np.max(np.abs(dec.mean(0) - u)) < 5 * scale / (2 * math.sqrt(n))
  # ... and the rounding is random (not round-to-nearest): an interior entry takes both neighbours
  assert np.all(dec.std(0)[(u > lo) & (u < hi)] > 0)
  # the wire format: uint8 levels and the range
  q, qlo, qhi = compress.encode_int8(jnp.asarray(u), keys[0])
  assert q.dtype == jnp.uint8 and float(qlo) == lo and float(qhi) == hi
  np.testing.assert_allclose(np.asarray(compress.decode_int8(q, qlo, qhi)), dec[0], atol=1e-5)


def test_int8_of_an_upload_spanning_more_than_float32s_range_stays_on_its_grid():
  """hi - lo of [-2e38, 2e38] overflows float32: every value decoded as NaN (reviewer). In float64 numpy the grid
  step is (hi - lo) / 255; every decoded value lies on that grid, within one step of its input, and finite."""
  u = np.array([-2e38, 2e38, 1.0, 2.0, -3e37, 1.5e38], np.float32)
  lo, hi = float(u.min()), float(u.max())
  step = (hi - lo) / 255  # float64: 1.57e36
  for seed in range(20):
    dec = np.asarray(compress.quantize_int8(jnp.asarray(u), jax.random.key(seed)), np.float64)
    assert np.isfinite(dec).all(), dec
    level = (dec - lo) / step
    assert np.max(np.abs(level - np.round(level))) < 1e-4
    assert np.max(np.abs(dec - u.astype(np.float64))) <= step * (1 + 1e-5)
  assert float(compress.decode_int8(jnp.uint8(255), jnp.float32(lo), jnp.float32(hi))) == hi
  assert float(compress.decode_int8(jnp.uint8(0), jnp.float32(lo), jnp.float32(hi))) == lo


def test_int8_tree_draws_leaf_l_from_fold_in_key_l():
  """The documented stream: leaf l's rounding noise is jax.random.uniform(fold_in(key, l)) of its shape (a
  recorded run's uploads depend on it), pushed through lo + floor((x - lo) / s + U) s, s = (hi - lo) / 255;
  leaves sent exactly (the integer one) keep their index in the count."""
  key = jax.random.key(11)
  tree = {
    "a": jnp.linspace(-1.0, 2.0, 37).reshape(37),
    "b": jnp.arange(4, dtype=jnp.int32),
    "c": jnp.cos(jnp.arange(12.0)),
  }
  got = compress.int8_tree(tree, key)
  for l, name in enumerate(sorted(tree)):  # jax.tree.leaves order: the sorted keys
    x = np.asarray(tree[name])
    if x.dtype.kind != "f":
      np.testing.assert_array_equal(np.asarray(got[name]), x)
      continue
    u = np.asarray(jax.random.uniform(jax.random.fold_in(key, l), x.shape, jnp.float32))
    lo, hi = x.min(), x.max()
    s = np.float32((hi - lo) / 255.0)
    want = lo + np.clip(np.floor((x - lo) / s + u), 0, 255) * s
    np.testing.assert_allclose(np.asarray(got[name]), want, atol=1e-6)


def test_int8_sends_constant_scalar_and_integer_leaves_exactly():
  key = jax.random.key(0)
  tree = {"c": jnp.full((4, 3), 0.37), "s": jnp.float32(1.2345678), "one": jnp.array([3.3]), "i": jnp.arange(5)}
  out = compress.int8_tree(tree, key)
  for k in tree:
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(tree[k]))
    assert out[k].dtype == tree[k].dtype


# ----------------------------------------------------------------------------------------------- top-k


def _topk_np(v, k):
  """numpy: v on the k entries of largest |v| (argsort), zeros elsewhere."""
  flat = np.asarray(v, np.float64).reshape(-1)
  keep = np.argsort(-np.abs(flat), kind="stable")[:k]
  out = np.zeros_like(flat)
  out[keep] = flat[keep]
  return out.reshape(np.shape(v))


def test_topk_count():
  assert compress.topk_count(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001 in floating point
  assert compress.topk_count(72, 0.1) == 8 and compress.topk_count(8, 0.1) == 1
  assert compress.topk_count(10, 0.001) == 1 and compress.topk_count(10, 1.0) == 10


def test_topk_equals_numpy_argsort():
  rng = np.random.default_rng(1)
  tree = {"a": rng.normal(size=(5, 7)), "b": rng.normal(size=(13,)), "s": np.float32(0.7)}
  tree = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  ks = {"a": 7, "b": 3}  # ceil(0.2 * 35), ceil(0.2 * 13)
  sent, res = compress.topk_tree(tree, 0.2)
  assert res is None
  for name, k in ks.items():
    np.testing.assert_array_equal(np.asarray(sent[name], np.float64), _topk_np(tree[name], k))
    assert int(np.count_nonzero(np.asarray(sent[name]))) == k
  assert float(sent["s"]) == float(tree["s"])
  # with a residual: top-k of update + residual, the rest carried
  residual = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=np.shape(a)), jnp.float32), tree)
  residual["s"] = jnp.float32(0.0)
  sent, res = compress.topk_tree(tree, 0.2, residual)
  for name, k in ks.items():
    v = np.asarray(tree[name], np.float64) + np.asarray(residual[name], np.float64)
    np.testing.assert_allclose(np.asarray(sent[name]), _topk_np(v, k), atol=1e-6)
    np.testing.assert_allclose(np.asarray(res[name]), v - _topk_np(v, k), atol=1e-6)
  assert float(res["s"]) == 0.0 and float(sent["s"]) == float(tree["s"])


def test_error_feedback_telescopes_for_one_client():
  """sum over rounds of what was sent + the final residual = sum of the true updates."""
  rng = np.random.default_rng(2)
  step = jax.jit(lambda u, e: compress.topk_tree(u, 0.05, e))
  shapes = {"k": (3, 3, 2, 4), "b": (4,)}
  residual = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
  total_sent = {k: np.zeros(s) for k, s in shapes.items()}
  total_true = {k: np.zeros(s) for k, s in shapes.items()}
  for _ in range(6):
    u = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    sent, residual = step(u, residual)
    for k in shapes:
      assert int(np.count_nonzero(np.asarray(sent[k]))) == {"k": 4, "b": 1}[k]  # ceil(0.05 * 72), ceil(0.2)
      total_sent[k] += np.asarray(sent[k], np.float64)
      total_true[k] += u[k]
  for k in shapes:
    np.testing.assert_allclose(total_sent[k] + np.asarray(residual[k]), total_true[k], atol=1e-5)
  assert max(float(np.max(np.abs(np.asarray(r)))) for r in residual.values()) > 0.1  # something was held back


# --------------------------------------------------------------------------- error feedback in the engine

# 0.3: k = 2 of the 4-channel conv biases, whose gradients come in +-equal pairs under GroupNorm(2 groups)
# (k = 1 would pick one of a tie by rounding)
FRACTION, ROUNDS = 0.3, 3


@pytest.fixture(scope="module")
def problem():
  """tests/test_engine.py's tiny UNet and 4 clients, and each client's local SGD delta from a server model
  (tests/test_algorithms.py's numpy loop, float64, one jitted gradient)."""
  apply, params, loss_fn, xs, ys, weights = _setup(seed=2, clients=4)
  grad = _grad_fn(apply, loss_fn)

  def deltas(server):
    return [
      jax.tree.map(np.subtract, _local_sgd_np(grad, server, xs[c], ys[c], xs.shape[1]), server)
      for c in range(xs.shape[0])
    ]

  return apply, params, loss_fn, xs, ys, weights, deltas


def _ef_reference(params, weights, deltas):
  """FedAvg with top-k + error feedback, client by client: each round every client trains from the server
  model, sends numpy top-k of delta + residual and keeps the rest; the server adds the weighted mean of
  what was sent. Returns (server params, residuals per client, per-round relative errors [ROUNDS, C])."""
  server = _tree_np(params)
  residual = [jax.tree.map(np.zeros_like, server) for _ in weights]
  w = weights / weights.sum()
  errors, margin = [], np.inf
  for _ in range(ROUNDS):
    sent = []
    for c, d in enumerate(deltas(server)):
      v = jax.tree.map(np.add, d, residual[c])
      s = jax.tree.map(lambda a: _topk_np(a, max(1, math.ceil(FRACTION * a.size))) if a.size > 1 else a, v)
      for a in jax.tree.leaves(v):  # the selection is well posed: no near-tie at the k-th magnitude
        k = max(1, math.ceil(FRACTION * a.size))
        m = np.sort(np.abs(a.reshape(-1)))[::-1]
        if 1 < a.size and k < a.size and m[k - 1] > 0:  # (among zeros the choice does not matter)
          margin = min(margin, (m[k - 1] - m[k]) / m[k - 1])
      residual[c] = jax.tree.map(np.subtract, v, s)
      diff = sum(float(np.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(d)))
      errors.append(math.sqrt(diff / sum(float(np.sum(b**2)) for b in jax.tree.leaves(d))))
      sent.append(s)
    server = jax.tree.map(lambda x, *s: x + sum(wi * si for wi, si in zip(w, s)), server, *sent)
  assert margin > 1e-4, margin
  return server, residual, np.asarray(errors).reshape(ROUNDS, -1)


@pytest.fixture(scope="module")
def ef_reference(problem):
  _, params, _, _, _, weights, deltas = problem
  return _ef_reference(params, weights, deltas)


@pytest.mark.parametrize("layout,n_dev,chunk", [("vmap", 2, 8), ("chunked", 1, 2)])
def test_topk_error_feedback_rounds_equal_per_client_loop(problem, ef_reference, layout, n_dev, chunk):
  apply, params, loss_fn, xs, ys, weights, _ = problem
  ref, ref_res, ref_err = ef_reference
  alg = compress.Compressed(algorithms.FedAvg(optax.sgd(1.0)), "topk", FRACTION)
  fn, mesh, _ = _build(apply, loss_fn, n_dev, layout, algorithm=alg, chunk=chunk)
  state = replicate(alg.init(params, jax.random.key(0)), mesh)  # as the round returns it: one compilation
  rows = init_rows(alg, params, xs.shape[0])
  assert set(rows) == {"residual"}
  batch, w = shard_clients(({"x": jnp.asarray(xs), "y": jnp.asarray(ys)}, jnp.asarray(weights)), mesh)
  for r in range(ROUNDS):
    rows = shard_clients(rows, mesh)
    state, rows, metrics = fn(state, rows, batch, w)
    np.testing.assert_allclose(np.asarray(metrics["compress_error"]), ref_err[r], rtol=1e-3)
  assert _max_diff(ref, state["params"]) < 5e-5
  for c in range(xs.shape[0]):
    assert _max_diff(ref_res[c], jax.tree.map(lambda a: a[c], rows["residual"])) < 5e-5, c
  # compression acted: most of each update was held back, and the residuals are not small
  assert float(np.min(ref_err)) > 0.3
  assert min(float(np.max(np.abs(a))) for a in jax.tree.leaves(ref_res[0]) if a.size > 1) > 0
  assert int(state["round"]) == ROUNDS


def test_int8_round_keyed_by_global_client_id(problem):
  """One int8 FedAvg round (4 devices) with global ids 5, 2, 7, 0: the server model is the weighted
  mean of numpy's quantisation of each client's delta, its uniforms drawn from the documented key."""
  apply, params, loss_fn, xs, ys, weights, deltas = problem
  ids = np.array([5, 2, 7, 0], np.int32)
  alg = compress.Compressed(algorithms.FedAvg(optax.sgd(1.0)), "int8")
  assert alg.init_row(params) is None
  fn, mesh, _ = _build(apply, loss_fn, 4, "vmap", algorithm=alg)
  state = alg.init(params, jax.random.key(4))
  batch = {"x": jnp.asarray(xs), "y": jnp.asarray(ys), "client_id": jnp.asarray(ids)}
  batch, w = shard_clients((batch, jnp.asarray(weights)), mesh)
  state, rows, metrics = fn(state, None, batch, w)
  assert rows is None

  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(4), compress.STREAM), 0)  # round 0
  shapes = [a.shape for a in jax.tree.leaves(params)]
  noise = jax.jit(
    lambda i: [jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, i), l), s) for l, s in enumerate(shapes)]
  )
  sent = []
  for c, d in enumerate(deltas(_tree_np(params))):
    leaves, treedef = jax.tree.flatten(d)
    out = []
    for a, u in zip(leaves, noise(int(ids[c]))):
      lo, hi = a.min(), a.max()
      scale = (hi - lo) / 255
      out.append(lo + np.clip(np.floor((a - lo) / scale + np.asarray(u)), 0, 255) * scale)
    sent.append(jax.tree.unflatten(treedef, out))
  ref = jax.tree.map(np.add, _tree_np(params), _weighted_mean(sent, weights))
  assert _max_diff(ref, state["params"]) < 5e-5
  assert np.all((np.asarray(metrics["compress_error"]) > 1e-4) & (np.asarray(metrics["compress_error"]) < 0.05))


# ---------------------------------------------------------------------------------------------- bytes


def test_upload_bytes_by_hand():
  tree = {"kernel": jax.ShapeDtypeStruct((3, 3, 1, 8), jnp.float32), "bias": jax.ShapeDtypeStruct((8,), jnp.float32)}
  assert compress.upload_bytes("none", tree) == compress.dense_bytes(tree) == 72 * 4 + 8 * 4 == 320
  assert compress.upload_bytes("int8", tree) == (72 + 8) + (8 + 8) == 96
  # top-k 10%: kernel k = ceil(7.2) = 8, bias k = ceil(0.8) = 1; 8 bytes (f32 value + int32 index) each
  assert compress.upload_bytes("topk", tree, 0.1) == (8 + 1) * 8 == 72
  assert compress.upload_bytes("topk", tree, 0.01) == (1 + 1) * 8 == 16
  # FedNova's upload: the scalar tau at full size (4 bytes); arrays count like their shapes
  nova = {"d": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree), "tau": jnp.float32(3.0)}
  assert compress.upload_bytes("int8", nova) == 96 + 4
  assert compress.upload_bytes("topk", nova, 0.1) == 72 + 4
  assert compress.upload_bytes("none", nova) == 324
  # a bf16 leaf: 2-byte values; an integer leaf at full size
  assert compress.upload_bytes("topk", {"h": jax.ShapeDtypeStruct((10,), jnp.bfloat16)}, 0.5) == 5 * (2 + 4)
  assert compress.upload_bytes("int8", {"n": jax.ShapeDtypeStruct((10,), jnp.int32)}) == 40
  with pytest.raises(ValueError, match="fraction"):
    compress.upload_bytes("topk", tree)
  with pytest.raises(ValueError, match="unknown compression"):
    compress.upload_bytes("fp16", tree)
  alg = compress.Compressed(algorithms.FedAvg(optax.sgd(1.0)), "topk", 0.1)
  assert alg.bytes_per_client(tree) == 72 and compress.dense_bytes(tree) == 320
  assert alg.bytes_per_client(tree, upload_like=nova) == 76
  assert compress.Compressed(algorithms.FedAvg(optax.sgd(1.0)), "int8").bytes_per_client(tree) == 96


# ---------------------------------------------- FedNova's dict upload, composite rows (direct client calls)


def _linear_problem(steps=3):
  """A tiny linear least-squares model (compiles in no time) for direct client calls."""
  rng = np.random.default_rng(5)
  params = {
    "w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
  }
  ctx = ClientContext(lambda q, x: x @ q["w"] + q["b"], lambda o, y: jnp.mean((o - y) ** 2), optax.sgd(0.1))
  batch = {
    "x": jnp.asarray(rng.normal(size=(steps, 4, 6)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(steps, 4, 3)), jnp.float32),
    "steps": jnp.int32(2),
    "client_id": jnp.int32(3),
  }
  return params, ctx, batch


def _client(alg, ctx, server, row, batch):
  return jax.jit(lambda s, r, b: alg.client(ctx, s, r, b, None))(server, row, batch)


def test_fednova_dict_upload_passes_through():
  params, ctx, batch = _linear_problem()
  inner = algorithms.FedNova(optax.sgd(1.0))
  server = inner.init(params, jax.random.key(0))
  true = _client(inner, ctx, server, None, batch).upload
  assert float(true["tau"]) == 2.0

  ef = compress.Compressed(inner, "topk", 0.25)
  row = ef.init_row(params)
  assert set(row) == {"residual"} and jax.tree.structure(row["residual"]) == jax.tree.structure(params)
  out = _client(ef, ctx, server, row, batch)
  assert float(out.upload["tau"]) == 2.0  # sent exactly
  for name, k in (("w", 5), ("b", 1)):  # ceil(0.25 * 18), ceil(0.75)
    d = np.asarray(true["d"][name], np.float64)
    np.testing.assert_allclose(np.asarray(out.upload["d"][name]), _topk_np(d, k), atol=1e-7)
    np.testing.assert_allclose(np.asarray(out.row["residual"][name]), d - _topk_np(d, k), atol=1e-7)
  assert set(out.row) == {"residual"} and set(out.metrics) == {"compress_error"}

  q = compress.Compressed(inner, "int8")
  assert q.init_row(params) is None
  out = _client(q, ctx, server, None, batch)
  assert float(out.upload["tau"]) == 2.0 and out.row is None
  w = np.asarray(true["d"]["w"], np.float64)
  scale = (w.max() - w.min()) / 255
  level = (np.asarray(out.upload["d"]["w"], np.float64) - w.min()) / scale
  assert np.max(np.abs(level - np.round(level))) < 2e-3 and np.max(np.abs(level * scale + w.min() - w)) < scale
  # the randomness follows the client's global id
  other = _client(q, ctx, server, None, dict(batch, client_id=jnp.int32(4))).upload
  assert not np.array_equal(np.asarray(other["d"]["w"]), np.asarray(out.upload["d"]["w"]))
  with pytest.raises(ValueError, match="client_id"):
    _client(q, ctx, server, None, {k: v for k, v in batch.items() if k != "client_id"})


def test_rows_compose_with_a_stateful_inner_algorithm():
  """SCAFFOLD (row c_i, uniform mean over sums['delta']) under top-k without and with error feedback."""
  params, ctx, batch = _linear_problem()
  batch = {k: v for k, v in batch.items() if k != "steps"}
  inner = algorithms.Scaffold(optax.sgd(1.0), 0.1, num_clients=4)
  server = inner.init(params, jax.random.key(0))
  c_i = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, jnp.float32), params)
  true = _client(inner, ctx, server, c_i, batch)

  plain = compress.Compressed(inner, "topk", 0.25, error_feedback=False)
  row = plain.init_row(params)
  assert set(row) == {"inner"}
  out = _client(plain, ctx, server, {"inner": c_i}, batch)
  assert set(out.row) == {"inner"} and _max_diff(out.row["inner"], true.row) == 0
  assert int(np.count_nonzero(np.asarray(out.upload["w"]))) == 5
  assert _max_diff(out.sums["delta"], out.upload) == 0  # the uniform mean averages what was received
  assert _max_diff(out.sums["dc"], true.sums["dc"]) == 0

  ef = compress.Compressed(inner, "topk", 0.25)
  row = ef.init_row(params)
  assert set(row) == {"inner", "residual"}
  out = _client(ef, ctx, server, {"inner": c_i, "residual": row["residual"]}, batch)
  assert set(out.row) == {"inner", "residual"}
  # the server step gets the inner rows and puts them back
  rows = jax.tree.map(lambda a: a[None], out.row)
  sums = jax.tree.map(lambda a: a, out.sums)
  new_server, new_rows = ef.server(server, out.upload, sums, rows)
  assert set(new_rows) == {"inner", "residual"} and _max_diff(new_rows["residual"], rows["residual"]) == 0
  assert int(new_server["round"]) == 1


def test_wrapper_forwards_and_validates():
  inner = algorithms.FedAvg(optax.sgd(1.0))
  inner.aggregator = "median"
  alg = compress.Compressed(inner, "topk", 0.5)
  assert alg.aggregator == "median" and alg.name == "fedavg+topk" and alg.gather({}) is None
  assert alg.personal({"w": 1}, {"residual": 0}) is None  # FedAvg has no personal model

  class Personal:
    name = "p"

    def init_row(self, params):
      return {"v": params}

    def personal(self, params, row):
      return ("personal", row)

  p = compress.Compressed(Personal(), "int8")
  assert p.init_row(1.0) == {"inner": {"v": 1.0}}
  assert p.personal(0, {"inner": "mine"}) == ("personal", "mine")
  with pytest.raises(ValueError, match="unknown compression"):
    compress.Compressed(inner, "fp8")
  with pytest.raises(ValueError, match="fraction"):
    compress.Compressed(inner, "topk", 0.0)
  with pytest.raises(ValueError, match="error feedback needs"):
    compress._model_part({"a": jnp.ones(3), "b": jnp.ones(4)}, jax.tree.structure({"w": 0}))
