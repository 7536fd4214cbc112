"""The jitted, sharded FedAvg round against an independent per-client Python loop."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedkd.fl import algorithms, engine
from fedkd.fl.algorithm import ClientContext, init_rows
from fedkd.losses import make_segmentation_loss
from fedkd.models import init_model, init_params
from fedkd.sharding import client_mesh, replicate, shard_clients

C, S, B, H = 8, 2, 2, 16
LR = 0.05


@functools.cache
def _problem(seed):
  """The model, loss and all C clients' data of :func:`_setup` for ``seed``, built once per process: the
  tests then share one ``apply`` / ``loss_fn`` and so the reference gradients' compiled programs."""
  model_cfg = ml_collections.ConfigDict(dict(name="unet", width=4, depth=1, groups=2, num_classes=3))
  apply, params = init_params(model_cfg, seed)
  loss_fn = make_segmentation_loss(ml_collections.ConfigDict(dict(ce_weight=0.5, dice_weight=0.5)))
  kx, ky = jax.random.split(jax.random.key(seed + 1))
  xs = np.asarray(jax.random.normal(kx, (C, S, B, H, H, 1)))
  ys = np.asarray(jax.random.randint(ky, (C, S, B, H, H), 0, 3))
  weights = np.array([5, 1, 3, 8, 2, 2, 7, 4], np.float32)  # unequal client data sizes
  return apply, params, loss_fn, xs, ys, weights


def _setup(seed=0, clients=4):
  """A tiny UNet (one level: compile time) and ``clients`` clients of unequal data sizes (fresh copies of
  the arrays and containers: a test may change them)."""
  apply, params, loss_fn, xs, ys, weights = _problem(seed)
  params = jax.tree.map(lambda a: a, params)
  return apply, params, loss_fn, xs[:clients].copy(), ys[:clients].copy(), weights[:clients].copy()


@functools.cache
def seg_grad(apply, loss_fn, compute_dtype=None):
  """The jitted gradient of one client's segmentation loss, one per (apply, loss, dtype) per process.
  ``compute_dtype``: the gradient is computed on params and images cast to it."""
  cast = (
    (lambda t: t) if compute_dtype is None else (lambda t: jax.tree.map(lambda a: jnp.asarray(a, compute_dtype), t))
  )
  return jax.jit(jax.grad(lambda p, x, y: loss_fn(apply(cast(p), cast(x)).astype(jnp.float32), y)))


def client_deltas(apply, loss_fn, params, xs, ys, compute_dtype=None):
  """Each client trained on its own with plain SGD(LR) (numpy updates on f32 weights): its delta.
  ``compute_dtype``: the gradient is computed on params and images cast to it."""
  grad = seg_grad(apply, loss_fn, compute_dtype)
  server = jax.tree.map(np.asarray, params)
  deltas = []
  for c in range(xs.shape[0]):
    p = server
    for s in range(xs.shape[1]):
      g = grad(p, xs[c, s], ys[c, s])
      p = jax.tree.map(lambda a, b: np.asarray(a) - LR * np.asarray(b, np.float32), p, g)
    deltas.append(jax.tree.map(lambda a, b: a - b, p, server))
  return deltas


def _reference_round(apply, loss_fn, params, xs, ys, weights, server_lr=1.0, compute_dtype=None):
  """Each client trained on its own (:func:`client_deltas`), then the weighted mean."""
  server = jax.tree.map(np.asarray, params)
  deltas = client_deltas(apply, loss_fn, params, xs, ys, compute_dtype)
  w = weights / weights.sum()
  mean = jax.tree.map(lambda *d: sum(wi * di for wi, di in zip(w, d)), *deltas)
  return jax.tree.map(lambda a, d: a + server_lr * d, server, mean)


def _build(
  apply,
  loss_fn,
  n_dev,
  layout,
  lowering="xla",
  *,
  algorithm=None,
  server_tx=None,
  chunk=8,
  unroll=False,
  in_flight=0,
  **ctx_kw,
):
  """(round_fn, mesh, algorithm) for the test problem: client SGD(LR). Local steps as a scan (``unroll``:
  unrolled, the CPU default; a program ~2x the size to compile, so only where that path is the subject)."""
  server_tx = server_tx or optax.sgd(1.0)
  alg = algorithm or algorithms.FedAvg(server_tx)
  mesh = client_mesh(n_dev)
  opts = engine.EngineOptions(layout, lowering, chunk, unroll_local_steps=unroll, clients_in_flight=in_flight)
  fn = engine.make_round_fn(alg, ClientContext(apply, loss_fn, optax.sgd(LR), **ctx_kw), mesh, opts)
  return fn, mesh, alg


def _engine_round(
  apply,
  loss_fn,
  params,
  xs,
  ys,
  weights,
  n_dev,
  layout,
  lowering="xla",
  server_lr=1.0,
  chunk=8,
  unroll=False,
  in_flight=0,
):
  fn, mesh, alg = _build(
    apply,
    loss_fn,
    n_dev,
    layout,
    lowering,
    server_tx=optax.sgd(server_lr),
    chunk=chunk,
    unroll=unroll,
    in_flight=in_flight,
  )
  state = alg.init(params, jax.random.key(0))
  xs, ys, weights = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  state, _, metrics = fn(state, None, {"x": xs, "y": ys}, weights)
  return jax.tree.map(np.asarray, state["params"]), metrics


def _max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@functools.cache
def _reference_round_of_setup():
  """:func:`_reference_round` on ``_setup()``, once per process (every layout must give this round)."""
  apply, params, loss_fn, xs, ys, weights = _setup()
  return _reference_round(apply, loss_fn, params, xs, ys, weights)


@pytest.mark.parametrize(
  "layout,lowering,n_dev,chunk,unroll",  # unroll: local steps unrolled (the CPU default) instead of a scan
  [
    ("vmap", "xla", 4, 8, True),
    ("vmap", "gemm", 2, 8, False),
    ("vmap", "wgrad", 4, 8, False),
    ("unroll", "xla", 4, 8, True),
    ("unroll", "gemm", 2, 8, False),
    ("unroll", "wgrad", 2, 8, False),
    ("unroll", "matmul", 2, 8, False),  # the CPU default lowering
    ("chunked", "gemm", 1, 2, True),  # two chunks of 2 on one device
    ("chunked", "wgrad", 1, 3, False),  # chunk 3 of 4 clients -> chunks of 2
    ("chunked", "xla", 2, 1, False),  # one client at a time
  ],
)
def test_round_equals_per_client_loop(layout, lowering, n_dev, chunk, unroll):
  apply, params, loss_fn, xs, ys, weights = _setup()
  ref = _reference_round_of_setup()
  got, metrics = _engine_round(
    apply, loss_fn, params, xs, ys, weights, n_dev, layout, lowering, chunk=chunk, unroll=unroll
  )
  assert jax.tree.structure(ref) == jax.tree.structure(got)
  assert _max_diff(ref, got) < 2e-5
  # the round really moved the model (a no-op engine would fail the check above only by luck)
  assert _max_diff(params, got) > 1e-3
  assert metrics["client_loss"].shape == (4,)


@functools.cache
def _unroll_on_one_device(clients, in_flight, unroll):
  """(compiled round, algorithm, sharded batch) of ``_setup(seed=2, clients)`` on one device, unroll +
  matmul: traced and compiled once per process, shared by the equivalence and memory tests below."""
  apply, params, loss_fn, xs, ys, weights = _setup(seed=2, clients=clients)
  fn, mesh, alg = _build(apply, loss_fn, 1, "unroll", "matmul", unroll=unroll, in_flight=in_flight)
  batch = shard_clients(({"x": jnp.asarray(xs), "y": jnp.asarray(ys)}, jnp.asarray(weights)), mesh)
  return fn.lower(alg.init(params, jax.random.key(0)), None, *batch).compile(), alg, batch


def _unroll_round_on_one_device(params, clients, in_flight, unroll):
  compiled, alg, batch = _unroll_on_one_device(clients, in_flight, unroll)
  state, _, metrics = compiled(alg.init(params, jax.random.key(0)), None, *batch)
  return jax.tree.map(np.asarray, state["params"]), metrics


# four clients with unrolled local steps: the programs test_clients_in_flight_bounds_the_temporary_memory measures
@pytest.mark.parametrize("clients,in_flight,unroll", [(4, 1, True), (3, 2, False)])
def test_unroll_with_clients_in_flight_equals_per_client_loop(clients, in_flight, unroll):
  """Four clients on one device with at most 1 of them in flight, three with at most 2: the per-client
  loop's round, and the unordered unroll's (the same left-to-right sum of the parts)."""
  apply, params, loss_fn, xs, ys, weights = _setup(seed=2, clients=clients)
  ref = _reference_round(apply, loss_fn, params, xs, ys, weights)
  got, metrics = _unroll_round_on_one_device(params, clients, in_flight, unroll)
  free, free_metrics = _unroll_round_on_one_device(params, clients, 0, unroll)
  assert _max_diff(ref, got) < 2e-5
  assert _max_diff(free, got) < 1e-6
  np.testing.assert_allclose(np.asarray(metrics["client_loss"]), np.asarray(free_metrics["client_loss"]), rtol=1e-6)
  assert _max_diff(params, got) > 1e-3


def test_clients_in_flight_bounds_the_temporary_memory():
  """XLA's buffer plan for four unrolled clients with unrolled local steps (the CPU default): one client
  in flight needs well under half the temporary memory of XLA's own schedule, which runs the clients in
  lockstep and so keeps every client's activations alive at once (0.41x measured)."""

  def temp(in_flight):
    return _unroll_on_one_device(4, in_flight, True)[0].memory_analysis().temp_size_in_bytes

  ordered, free = temp(1), temp(0)
  assert ordered < 0.5 * free, (ordered, free)


def test_clients_in_flight_auto_is_the_host_cores_per_device(monkeypatch):
  """'auto': with unroll on CPU the host cores over the CPU devices (at least 1), elsewhere 0; a number
  passes through; the config accepts 'auto' and whole numbers >= 0 (also as command-line text)."""
  import os

  from fedkd.config import clients_in_flight, unroll_local_steps

  devices = jax.local_device_count("cpu")
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
  assert engine.resolve("auto", "auto", "auto", platform="cpu").clients_in_flight == max(1, 16 // devices)
  assert engine.resolve("vmap", "auto", "auto", platform="cpu").clients_in_flight == 0
  assert engine.resolve("unroll", "xla", False, platform="gpu").clients_in_flight == 0
  assert engine.resolve("unroll", "matmul", "auto", platform="cpu", clients_in_flight=3).clients_in_flight == 3
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
  assert engine.resolve("unroll", "matmul", "auto", platform="cpu").clients_in_flight == 1
  # where freed host memory is kept and reaches the round (fedkd.hostmem: one CPU device), 4 x cores
  from fedkd import hostmem

  assert not hostmem.in_effect()  # this process: glibc's defaults, 8 CPU devices
  monkeypatch.setattr(hostmem, "in_effect", lambda: True)
  assert engine.resolve("unroll", "matmul", "auto", platform="cpu").clients_in_flight == 4
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
  assert engine.resolve("unroll", "matmul", "auto", platform="cpu").clients_in_flight == 4 * max(1, 16 // devices)
  assert engine.resolve("unroll", "xla", False, platform="gpu").clients_in_flight == 0
  # the log names the bound, or 'all' where a device holds no more clients than it
  opts = engine.EngineOptions("unroll", "matmul", 8, unroll_local_steps=True, clients_in_flight=8)
  assert "unroll (all in flight)" in engine.describe(opts, 4) and "host memory kept" in engine.describe(opts, 8)
  assert "unroll (8 in flight)" in engine.describe(opts, 16) and "unroll (8 in flight)" in engine.describe(opts)
  for value, want in (("auto", "auto"), (0, 0), (2, 2), ("3", 3), (-1, None), (True, None), ("two", None), (1.5, None)):
    assert clients_in_flight(ml_collections.ConfigDict({"clients_in_flight": value})) == want, value
  for value, want in (("auto", "auto"), (True, True), ("False", False), ("true", True), ("no", None), (1, None)):
    assert unroll_local_steps(ml_collections.ConfigDict({"unroll_local_steps": value})) is want, value


def test_server_optimizer_scales_the_mean_delta():
  apply, params, loss_fn, xs, ys, weights = _setup(seed=3)
  ref = _reference_round(apply, loss_fn, params, xs, ys, weights, server_lr=0.5)
  got, _ = _engine_round(apply, loss_fn, params, xs, ys, weights, 2, "vmap", server_lr=0.5)
  assert _max_diff(ref, got) < 2e-5


def test_weights_matter():
  """Equal weights give a different model than skewed weights (the weighting is not ignored)."""
  apply, params, loss_fn, xs, ys, weights = _setup()
  fn, mesh, alg = _build(apply, loss_fn, 2, "vmap")  # one program for both weightings

  def round_with(w):
    sx, sy, sw = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(w)), mesh)
    return fn(alg.init(params, jax.random.key(0)), None, {"x": sx, "y": sy}, sw)[0]["params"]

  a, b = round_with(weights), round_with(np.ones_like(weights))
  assert _max_diff(a, b) > 1e-4


def test_same_round_on_1_2_4_8_devices():
  assert jax.device_count() >= 8
  apply, params, loss_fn, xs, ys, weights = _setup(seed=1, clients=8)
  outs = {n: _engine_round(apply, loss_fn, params, xs, ys, weights, n, "vmap")[0] for n in (1, 2, 4, 8)}
  for n in (2, 4, 8):
    assert _max_diff(outs[1], outs[n]) < 1e-5, n


def test_round_is_one_program_sharded_over_clients():
  """The round lowers to one jitted computation whose client inputs are split over the mesh."""
  apply, params, loss_fn, xs, ys, weights = _setup(clients=8)
  fn, mesh, alg = _build(apply, loss_fn, 8, "vmap")
  state = alg.init(params, jax.random.key(0))
  sx, sy, sw = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  assert len(sx.sharding.device_set) == 8
  assert sx.addressable_shards[0].data.shape[0] == C // 8
  text = fn.lower(state, None, {"x": sx, "y": sy}, sw).as_text()
  assert "all-reduce" in text or "all_reduce" in text


def _tree_np(t):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), t)


def _scaffold_reference(apply, loss_fn, server, control, client_c, rounds):
  """SCAFFOLD option II, client by client with numpy updates (SGD, server lr 1, weighted mean delta,
  control update (1/N) sum of c_i changes). ``rounds``: list of (client ids, xs, ys, weights)."""
  grad = seg_grad(apply, loss_fn)
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


def assert_scaffold_rounds(apply, params, loss_fn, xs, ys, weights, n_dev, layout, lowering="xla"):
  """Two SCAFFOLD rounds over overlapping client samples (the second round's clients 2 and 3 start from their own
  control variates, c_i != 0) against the client-by-client numpy loop: server params, server control and every
  client's control; and the correction really acted (the control moved)."""
  n_total, samples = 6, [np.arange(0, 4), np.array([2, 5, 3, 4])]
  rounds = [(ids, xs[::-1] if r else xs, ys[::-1] if r else ys, weights) for r, ids in enumerate(samples)]
  zeros = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  ref_server, ref_control, ref_c = _scaffold_reference(
    apply, loss_fn, _tree_np(params), zeros, {i: zeros for i in range(n_total)}, rounds
  )
  alg = algorithms.Scaffold(optax.sgd(1.0), LR, n_total, weighting="data_size")  # the reference weights by size
  # unroll: one client in flight, so the control-variate sums go through the ordered running sum
  fn, mesh, _ = _build(
    apply, loss_fn, n_dev, layout, lowering, algorithm=alg, chunk=2, in_flight=int(layout == "unroll")
  )
  # the state placed as the round returns it (replicated on the mesh): both rounds run one compiled program
  state = replicate(alg.init(params, jax.random.key(0)), mesh)
  table = jax.tree.map(np.array, init_rows(alg, params, n_total))
  for ids, rx, ry, rw in rounds:
    rows = jax.tree.map(lambda a: jnp.asarray(a[ids]), table)
    rows, rx, ry, rw = shard_clients((rows, jnp.asarray(rx), jnp.asarray(ry), jnp.asarray(rw)), mesh)
    state, new_rows, _ = fn(state, rows, {"x": rx, "y": ry}, rw)
    table = jax.tree.map(lambda t, r: (t.__setitem__(ids, np.asarray(r)), t)[1], table, new_rows)
  assert _max_diff(ref_server, state["params"]) < 5e-5
  assert _max_diff(ref_control, state["control"]) < 5e-4
  for cid in range(n_total):
    assert _max_diff(ref_c[cid], jax.tree.map(lambda t: t[cid], table)) < 5e-4, cid
  # the correction really acted: plain FedAvg from the same start ends elsewhere
  assert _max_diff(ref_control, zeros) > 1e-3


# (the unrolled layout: tests/test_pre_redesign.py, bitwise against the recorded SCAFFOLD rounds)
@pytest.mark.parametrize("layout,n_dev", [("vmap", 2), ("chunked", 1), ("unroll", 2)])
def test_scaffold_equals_per_client_loop(layout, n_dev):
  """Two SCAFFOLD rounds over overlapping client samples (so some clients start from c_i != 0)."""
  apply, params, loss_fn, xs, ys, weights = _setup(seed=4, clients=4)
  assert_scaffold_rounds(apply, params, loss_fn, xs, ys, weights, n_dev, layout)


@functools.cache
def _moon_grad(apply, apply_wf, loss_fn, tau):
  """The jitted gradient of one MOON client's loss; ``mu`` an argument (one program for every mu)."""

  def rep(p, x):
    f = apply_wf(p, x)[1].mean(axis=(1, 2))
    return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

  def moon_loss(q, glob, prev, x, y, mu):
    z, zg, zp = rep(q, x), jax.lax.stop_gradient(rep(glob, x)), jax.lax.stop_gradient(rep(prev, x))
    logits = jnp.stack([jnp.sum(z * zg, -1), jnp.sum(z * zp, -1)], -1) / tau
    return loss_fn(apply(q, x), y) - mu * jnp.mean(jax.nn.log_softmax(logits, -1)[:, 0])

  return jax.jit(jax.grad(moon_loss))


def _moon_reference(apply, apply_wf, loss_fn, params, samples, xs, ys, weights, mu, tau):
  """MOON client by client (numpy SGD updates): the contrastive term written out with an explicit
  log-softmax over (positive, negative); a client sampled again contrasts with its own last model."""
  grad = _moon_grad(apply, apply_wf, loss_fn, tau)
  server, prevs = _tree_np(params), {}
  for r, ids in enumerate(samples):
    rx, ry = (xs[::-1], ys[::-1]) if r else (xs, ys)
    deltas = []
    for row, cid in enumerate(ids):
      prev, q = prevs.get(cid, server), server
      for s in range(rx.shape[1]):
        g = grad(*(jax.tree.map(np.float32, t) for t in (q, server, prev)), rx[row, s], ry[row, s], np.float32(mu))
        q = jax.tree.map(lambda a, b: a - LR * np.asarray(b, np.float64), q, g)
      prevs[cid] = q
      deltas.append(jax.tree.map(np.subtract, q, server))
    w = weights / weights.sum()
    server = jax.tree.map(lambda x, *d: x + sum(wi * di for wi, di in zip(w, d)), server, *deltas)
  return server


def test_moon_equals_per_client_loop():
  """Two MOON rounds over overlapping samples (clients 1 and 3 contrast with their own previous model)."""
  model_cfg = ml_collections.ConfigDict(dict(name="unet", width=4, depth=1, groups=2, num_classes=3))
  apply, apply_wf, params = init_model(model_cfg, 0)
  _, _, loss_fn, xs, ys, weights = _setup(seed=8, clients=4)
  mu, tau, samples = 0.7, 0.5, [np.arange(4), np.array([1, 3, 4, 5])]
  ref = _moon_reference(apply, apply_wf, loss_fn, params, samples, xs, ys, weights, mu, tau)

  alg = algorithms.Moon(optax.sgd(1.0), mu, tau)
  fn, mesh, _ = _build(apply, loss_fn, 2, "vmap", algorithm=alg, apply_wf=apply_wf)
  state = replicate(alg.init(params, jax.random.key(0)), mesh)  # as the round returns it: one program
  table = jax.tree.map(np.array, init_rows(alg, params, 6))
  for r, ids in enumerate(samples):
    rx, ry = (xs[::-1], ys[::-1]) if r else (xs, ys)
    rows = jax.tree.map(lambda a: jnp.asarray(a[ids]), table)
    rows, rx, ry, rw = shard_clients((rows, jnp.asarray(rx), jnp.asarray(ry), jnp.asarray(weights)), mesh)
    state, new_rows, m = fn(state, rows, {"x": rx, "y": ry}, rw)
    table = jax.tree.map(lambda t, v: (t.__setitem__(ids, np.asarray(v)), t)[1], table, new_rows)
  assert _max_diff(ref, state["params"]) < 5e-5
  assert m["moon"].shape == (4,) and bool(jnp.all(m["moon"] > 0))
  # the contrastive term acted: the same loop without it ends elsewhere
  plain = _moon_reference(apply, apply_wf, loss_fn, params, samples, xs, ys, weights, 0.0, tau)
  assert _max_diff(plain, ref) > 1e-5


@pytest.mark.parametrize("layout,lowering", [("unroll", "xla")])  # gemm / wgrad in bf16: test_conv.py
def test_bf16_compute_keeps_f32_master_weights(layout, lowering):
  apply, params, loss_fn, xs, ys, weights = _setup(seed=5, clients=4)
  fn, mesh, alg = _build(apply, loss_fn, 2, layout, lowering, compute_dtype=jnp.bfloat16)
  state = alg.init(params, jax.random.key(0))
  xs_, ys_, w_ = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  state, _, _ = fn(state, None, {"x": xs_, "y": ys_}, w_)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(state["params"]))
  ref16 = _reference_round(apply, loss_fn, params, xs, ys, weights, compute_dtype=jnp.bfloat16)
  ref32 = _reference_round(apply, loss_fn, params, xs, ys, weights)
  step = _max_diff(ref32, params)
  # the bf16 round is the bf16 reference up to bf16 rounding, and it is not the f32 round
  assert _max_diff(ref16, state["params"]) < 0.05 * step
  assert _max_diff(ref32, ref16) > 1e-6


@pytest.mark.parametrize("layout,lowering", [("vmap", "wgrad")])
def test_remat_gives_the_same_round(layout, lowering):
  apply, params, loss_fn, xs, ys, weights = _setup(seed=6, clients=4)
  outs = []
  for remat in (False, True):
    fn, mesh, alg = _build(apply, loss_fn, 2, layout, lowering, chunk=2, remat=remat)
    state = alg.init(params, jax.random.key(0))
    xs_, ys_, w_ = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
    outs.append(fn(state, None, {"x": xs_, "y": ys_}, w_)[0])
  assert _max_diff(outs[0]["params"], outs[1]["params"]) < 1e-5
  assert _max_diff(outs[0]["params"], params) > 1e-3


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
  fn, mesh, alg = _build(apply, loss_fn, 8, "chunked", "gemm", chunk=32)
  state = alg.init(params, jax.random.key(0))
  xs_, ys_, w_ = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  state, _, metrics = fn(state, None, {"x": xs_, "y": ys_}, w_)
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
    ("cpu", "unet", 4, ("unroll", "matmul", True)),
    ("cpu", "transunet", 128, ("unroll", "matmul", True)),
    ("gpu", "unet", 16, ("vmap", "wgrad", False)),
    ("gpu", "transunet", 16, ("vmap", "gemm", False)),
    ("gpu", "unet", 17, ("chunked", "gemm", False)),
    ("tpu", "transunet", 128, ("chunked", "gemm", False)),
    ("gpu", None, None, ("chunked", "gemm", False)),
    ("gpu", "resnet", 4, ("chunked", "gemm", False)),
  ],
)
def test_auto_engine_options_per_backend(platform, model, per_shard, expected):
  """'auto' resolves to the options measured fastest on each backend and model (docs/engine.md): at
  most 16 clients per accelerator the model's best, more (or unknown) chunked + gemm; explicit
  settings pass through."""
  o = engine.resolve("auto", "auto", "auto", platform=platform, model=model, clients_per_shard=per_shard)
  assert (o.layout, o.lowering, o.unroll_local_steps) == expected
  o = engine.resolve("chunked", "wgrad", False, platform=platform, model=model, client_chunk=4)
  assert (o.layout, o.lowering, o.client_chunk, o.unroll_local_steps) == ("chunked", "wgrad", 4, False)
  with pytest.raises(ValueError, match="unknown client layout"):
    engine.resolve("gconv", "xla", False, platform=platform)
  if platform == "cpu":  # matmul was measured with unroll only; another CPU layout keeps XLA's convs
    assert engine.resolve("vmap", "auto", "auto", platform=platform, model=model).lowering == "xla"


@pytest.mark.parametrize(
  "old,strategy,expected",
  [
    ("vmap", "", ("vmap", "xla", 8)),
    ("bgemm", "", ("vmap", "gemm", 8)),
    ("hybrid", "", ("vmap", "wgrad", 8)),
    ("unroll", "", ("unroll", "xla", 8)),
    ("chunked", "", ("chunked", "gemm", 8)),
    ("chunked", "hybrid", ("chunked", "wgrad", 8)),
    ("map", "", ("chunked", "xla", 1)),
    ("", "", ("auto", "auto", 8)),
  ],
)
def test_deprecated_client_parallelism_maps_to_the_two_knobs(old, strategy, expected):
  cfg = ml_collections.ConfigDict(
    dict(client_layout="auto", conv_lowering="auto", client_chunk=8, client_parallelism=old, chunk_strategy=strategy)
  )
  lines = []
  assert engine.legacy_options(cfg, lines.append) == expected
  assert len(lines) == (1 if old else 0) and (not old or "deprecated" in lines[0])


# chunked: zeroing happens per chunk inside the scan (vmap / unroll zero the same stacked rows); unroll with
# one client in flight: a NaN client's part must not reach the clients after it through the ordering
# (unroll on 4 devices: client 6 is followed by client 7 on its device)
@pytest.mark.parametrize("layout,n_dev,chunk,in_flight", [("chunked", 2, 2, 0), ("unroll", 4, 8, 1)])
def test_skip_nonfinite_clients_drops_them_from_the_aggregate(layout, n_dev, chunk, in_flight):
  """Clients 1 and 6 get NaN images: with skip_nonfinite the round equals the per-client loop over the
  six finite clients; client_finite flags exactly them; without it the round reports non-finite."""
  apply, params, loss_fn, xs, ys, weights = _setup(clients=C)
  xs = xs.copy()
  xs[1, 0, 0, 3, 3, 0] = np.nan
  xs[6, 1] = np.nan
  keep = np.array([c not in (1, 6) for c in range(C)])
  ref = _reference_round(apply, loss_fn, params, xs[keep], ys[keep], weights[keep])
  mesh = client_mesh(n_dev)
  for skip in (True, False):
    alg = algorithms.FedAvg(optax.sgd(1.0))
    opts = engine.EngineOptions(layout, "xla", chunk, unroll_local_steps=False, clients_in_flight=in_flight)
    fn = engine.make_round_fn(alg, ClientContext(apply, loss_fn, optax.sgd(LR)), mesh, opts, skip_nonfinite=skip)
    state = alg.init(params, jax.random.key(0))
    xs_, ys_, w_ = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
    state, _, m = fn(state, None, {"x": xs_, "y": ys_}, w_)
    np.testing.assert_array_equal(np.asarray(m["client_finite"]), keep)
    if skip:
      assert bool(m["finite"]) and np.isfinite(float(m["loss"]))
      assert _max_diff(ref, jax.tree.map(np.asarray, state["params"])) < 2e-5
    else:
      assert not bool(m["finite"])
