"""The round engine at odd but valid shapes and settings, as a user meets them: client counts that no chunk
or device count divides, a mesh over some of the devices, one client, bf16 compute with remat, a robust
aggregator under the unrolled layout, the deprecated engine keys beside the new ones, and the start-up
line naming what the round runs. Each round against an independent per-client loop (float64 numpy updates
of jitted per-client gradients, one device)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_engine import LR, _max_diff, _setup

from fedkd.config import ConfigError
from fedkd.fl import algorithms, engine
from fedkd.fl.aggregate import Median
from fedkd.fl.algorithm import ClientContext
from fedkd.sharding import client_mesh, shard_clients


@functools.cache
def _value_and_grad(apply, loss_fn, compute_dtype=None):
  """One client's (loss, gradient) on params and images cast to ``compute_dtype`` (None: as given)."""

  def cast(t):
    return t if compute_dtype is None else jax.tree.map(lambda a: jnp.asarray(a, compute_dtype), t)

  return jax.jit(jax.value_and_grad(lambda p, x, y: loss_fn(apply(cast(p), cast(x)).astype(jnp.float32), y)))


def _reference(apply, params, loss_fn, xs, ys, weights, compute_dtype=None, aggregate="mean"):
  """Client by client: plain SGD(LR) over its local steps (float64 numpy updates), then the weighted mean
  (or the coordinate-wise median) of the deltas added to the server params. Returns (new params, the
  weighted mean of the clients' mean step losses, [C] those losses)."""
  vg = _value_and_grad(apply, loss_fn, compute_dtype)
  server = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  deltas, losses = [], []
  for c in range(xs.shape[0]):
    p, step_losses = server, []
    for s in range(xs.shape[1]):
      loss, g = vg(jax.tree.map(np.float32, p), xs[c, s], ys[c, s])
      step_losses.append(float(loss))
      p = jax.tree.map(lambda a, b: a - LR * np.asarray(b, np.float64), p, g)
    deltas.append(jax.tree.map(np.subtract, p, server))
    losses.append(np.mean(step_losses))
  w = np.asarray(weights, np.float64) / np.sum(weights)
  if aggregate == "median":
    step = jax.tree.map(lambda *d: np.median(np.stack(d), axis=0), *deltas)
  else:
    step = jax.tree.map(lambda *d: sum(wi * di for wi, di in zip(w, d)), *deltas)
  losses = np.asarray(losses)
  return jax.tree.map(np.add, server, step), float(np.dot(w, losses)), losses


def _round(clients, n_dev, options, *, seed=0, compute_dtype=None, remat=False, aggregator=None):
  """One engine round of ``clients`` clients on ``n_dev`` devices: (problem, new state, metrics)."""
  apply, params, loss_fn, xs, ys, weights = _setup(seed=seed, clients=clients)
  alg = algorithms.FedAvg(optax.sgd(1.0, momentum=0.9))  # first step: the mean delta; a momentum state
  if aggregator is not None:
    alg.aggregator = aggregator
  mesh = client_mesh(n_dev)
  ctx = ClientContext(apply, loss_fn, optax.sgd(LR), compute_dtype=compute_dtype, remat=remat)
  fn = engine.make_round_fn(alg, ctx, mesh, options)
  state = alg.init(params, jax.random.key(0))
  batch, w = shard_clients(({"x": jnp.asarray(xs), "y": jnp.asarray(ys)}, jnp.asarray(weights)), mesh)
  state, _, metrics = fn(state, None, batch, w)
  return (apply, params, loss_fn, xs, ys, weights), state, metrics


@pytest.mark.parametrize(
  "clients,n_dev,layout,lowering,chunk,in_flight,remat",
  [
    (6, 2, "chunked", "gemm", 2, 0, True),  # 3 clients per device, client_chunk=2: chunks of 1; remat
    (5, 1, "chunked", "wgrad", 4, 0, False),  # 5 clients (prime), client_chunk=4: one at a time
    (6, 2, "unroll", "matmul", 8, 2, False),  # 3 per device, 2 in flight: a bound that does not divide them
    (3, 3, "vmap", "xla", 8, 0, False),  # a mesh over 3 of the 8 devices
    (1, 1, "unroll", "matmul", 8, 1, False),  # one client
    (2, 2, "chunked", "xla", 8, 0, False),  # one client per device, client_chunk above it
  ],
)
def test_round_at_odd_shapes_equals_per_client_loop(clients, n_dev, layout, lowering, chunk, in_flight, remat):
  opts = engine.EngineOptions(layout, lowering, chunk, unroll_local_steps=False, clients_in_flight=in_flight)
  problem, state, m = _round(clients, n_dev, opts, seed=clients, remat=remat)
  ref, ref_loss, ref_losses = _reference(*problem)
  assert _max_diff(ref, state["params"]) < 2e-5
  assert _max_diff(problem[1], state["params"]) > 1e-3  # the round moved the model
  np.testing.assert_allclose(np.asarray(m["client_loss"]), ref_losses, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), ref_loss, rtol=1e-5)
  assert bool(m["finite"]) and np.asarray(m["client_finite"]).all()


@pytest.mark.parametrize(
  "layout,lowering,n_dev,chunk,in_flight,remat",
  [
    ("vmap", "gemm", 2, 8, 0, False),
    ("chunked", "wgrad", 1, 2, 0, False),
    ("unroll", "matmul", 2, 8, 1, True),  # the CPU default, with remat
  ],
)
def test_bf16_round_keeps_f32_master_weights_in_every_layout(layout, lowering, n_dev, chunk, in_flight, remat):
  """bf16 compute: every float leaf of the new server state (params, server momentum) is float32, and the
  round is the bf16 reference loop within the tolerance docs/engine.md states (5% of the round's largest
  parameter change), closer to it than to the f32 loop by far (measured 0.05-0.6% against 7.5%)."""
  opts = engine.EngineOptions(layout, lowering, chunk, unroll_local_steps=False, clients_in_flight=in_flight)
  problem, state, m = _round(4, n_dev, opts, seed=5, compute_dtype=jnp.bfloat16, remat=remat)
  floats = [leaf for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert len(floats) >= 2 * len(jax.tree.leaves(problem[1]))  # params and the momentum trace
  assert all(leaf.dtype == jnp.float32 for leaf in floats)
  ref16, loss16, _ = _reference(*problem, compute_dtype=jnp.bfloat16)
  ref32, _, _ = _reference(*problem)
  step = _max_diff(ref32, problem[1])
  err16, err32 = _max_diff(ref16, state["params"]), _max_diff(ref32, state["params"])
  assert err16 < 0.05 * step, (err16, step)
  assert err16 < 0.25 * err32, (err16, err32)  # a round computed in f32 would fail this
  np.testing.assert_allclose(float(m["loss"]), loss16, rtol=1e-2)


def test_describe_names_the_chunk_the_round_runs():
  """A chunk is the largest divisor of a device's clients up to client_chunk; the log line says which."""
  opts = engine.EngineOptions("chunked", "xla", 4)
  assert "chunks of 1: the largest divisor of 7 clients per device up to client_chunk=4" in engine.describe(opts, 7)
  assert "chunks of 3: the largest divisor of 6" in engine.describe(opts, 6)
  assert "chunks of 4)" in engine.describe(opts, 8) and "chunks of 2)" in engine.describe(opts, 2)
  assert "chunks of 4)" in engine.describe(opts)  # clients per device unknown
  for clients in (1, 6, 7, 12, 127):
    for chunk in (1, 2, 4, 8):
      k = engine.chunk_size(clients, chunk)
      assert clients % k == 0 and k <= chunk and not any(clients % d == 0 for d in range(k + 1, chunk + 1)), (
        clients,
        chunk,
      )
      assert f"chunks of {k}" in engine.describe(engine.EngineOptions("chunked", "xla", chunk), clients)


def test_unroll_under_median_ignores_the_in_flight_bound_and_says_so():
  """clients_in_flight orders a linear aggregate only: under the median the unrolled round runs XLA's
  schedule (effective_options drops the bound, so the log does not claim it) and equals numpy's median
  of the per-client loop's deltas."""
  opts = engine.EngineOptions("unroll", "matmul", 8, unroll_local_steps=False, clients_in_flight=1)
  mean_alg, median_alg = algorithms.FedAvg(optax.sgd(1.0)), algorithms.FedAvg(optax.sgd(1.0))
  median_alg.aggregator = Median()
  assert engine.effective_options(opts, mean_alg) == opts
  assert engine.effective_options(opts, median_alg).clients_in_flight == 0
  assert "in flight" not in engine.describe(engine.effective_options(opts, median_alg), 3)
  assert "(1 in flight)" in engine.describe(engine.effective_options(opts, mean_alg), 3)
  problem, state, _ = _round(4, 2, opts, seed=9, aggregator=Median())  # 2 clients unrolled per device
  ref, _, _ = _reference(*problem, aggregate="median")
  assert _max_diff(ref, state["params"]) < 2e-5
  mean, _, _ = _reference(*problem)
  assert _max_diff(mean, ref) > 1e-4  # the median is not the mean


def _engine_cfg(**kw):
  base = dict(client_layout="auto", conv_lowering="auto", client_chunk=8, client_parallelism="", chunk_strategy="")
  return ml_collections.ConfigDict(dict(base, **kw))


@pytest.mark.parametrize(
  "kw,expected",
  [
    (dict(client_parallelism="hybrid", client_layout="vmap"), ("vmap", "wgrad", 8)),  # the same meaning: fine
    (dict(client_parallelism="map", conv_lowering="xla"), ("chunked", "xla", 1)),
    (dict(chunk_strategy="hybrid", client_layout="chunked", conv_lowering="wgrad"), ("chunked", "wgrad", 8)),
    (dict(client_parallelism="hybrid", client_layout="chunked"), "client_parallelism='hybrid' (deprecated) means"),
    (dict(client_parallelism="chunked", conv_lowering="xla"), "remove --config.engine.client_parallelism"),
    (dict(chunk_strategy="bgemm", conv_lowering="wgrad"), "remove --config.engine.chunk_strategy"),
    (dict(client_parallelism="vmap", chunk_strategy="hybrid"), "applies to client_parallelism='chunked' only"),
  ],
)
def test_deprecated_engine_keys_beside_new_ones(kw, expected):
  """A deprecated key that says the same as the new keys maps as before; one that contradicts them (so
  that one of the two would be silently ignored) is a ConfigError naming the key to remove."""
  if isinstance(expected, tuple):
    assert engine.legacy_options(_engine_cfg(**kw)) == expected
  else:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
      engine.legacy_options(_engine_cfg(**kw))


QS = "--config=configs/quickstart.py"
TINY = [
  "--config.num_rounds=1",
  "--config.image_size=32",
  "--config.model.width=4",
  "--config.model.depth=1",
  "--config.model.groups=2",
  "--config.local_steps=1",
  "--config.batch_size=2",
  "--config.eval.examples_per_site=2",
  "--config.eval.max_sites=1",
]


def test_main_prints_the_layout_it_runs(cli, tmp_path):
  """6 clients on --cpu_devices=8: 2 devices (gcd), 3 clients each, client_chunk=2: chunks of 1."""
  r = cli.run(
    "fedkd.main",
    [QS, f"--workdir={tmp_path / 'w'}", *TINY, "--cpu_devices=8", "--config.num_clients=6"]
    + ["--config.clients_per_round=6", "--config.engine.client_layout=chunked", "--config.engine.client_chunk=2"],
  )
  out = r.stdout + r.stderr
  assert r.code == 0 and not r.traceback, out[-2000:]
  assert "2 device(s) on the 'clients' axis" in out, out[-2000:]
  assert "clients run as chunked (chunks of 1: the largest divisor of 3 clients per device up to client_chunk=2)" in out


def test_main_refuses_a_deprecated_key_that_contradicts_the_layout(cli, tmp_path):
  work = tmp_path / "w"
  r = cli.run(
    "fedkd.main",
    [
      QS,
      f"--workdir={work}",
      *TINY,
      "--config.engine.client_parallelism=hybrid",
      "--config.engine.client_layout=chunked",
    ],
  )
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.code == 2 and not r.traceback, r.stderr[-2000:]
  assert len(lines) == 1 and "remove --config.engine.client_parallelism" in lines[0], lines
