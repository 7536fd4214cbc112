"""The FL algorithms in combinations a user runs them in: partial participation over several rounds with
per-client state, client dropout, per-client step counts, unequal data sizes and stateful server
optimizers, each against a per-client numpy loop written from the paper's equations (the gradient of ONE
client's segmentation loss by ``jax.grad``; every SGD step, control variate, normalisation, momentum
buffer, adaptive moment and mean in numpy); and a Ditto client whose personal model diverges, which must
count as a non-finite client.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_algorithms import _data, _grad_fn, _local_sgd_np
from test_engine import LR, _build, _max_diff, _tree_np

from fedkd.fl import algorithms, engine
from fedkd.fl.algorithm import init_rows
from fedkd.sharding import replicate, shard_clients


def _run_rounds(alg, apply, loss_fn, params, rounds, n_total, layout="vmap", n_dev=2, chunk=8):
  """``rounds``: (ids, xs, ys, weights, steps, reported) through engine.make_round_fn, the rows kept in a
  numpy table of ``n_total`` clients (a client not sampled keeps its row). Returns (state, table)."""
  fn, mesh, _ = _build(apply, loss_fn, n_dev, layout, algorithm=alg, chunk=chunk)
  # replicated on the mesh as the round returns it: every round runs one compiled program
  state = replicate(alg.init(params, jax.random.key(0)), mesh)
  table = init_rows(alg, params, n_total)
  table = None if table is None else jax.tree.map(np.array, table)
  for ids, xs, ys, weights, steps, reported in rounds:
    rows = None if table is None else jax.tree.map(lambda a: jnp.asarray(a[ids]), table)
    batch = {"x": jnp.asarray(xs), "y": jnp.asarray(ys)}
    if steps is not None:
      batch["steps"] = jnp.asarray(steps, jnp.int32)
    if reported is not None:
      batch["reported"] = jnp.asarray(reported)
    rows, batch, w = shard_clients((rows, batch, jnp.asarray(weights)), mesh)
    state, new_rows, m = fn(state, rows, batch, w)
    assert bool(m["finite"])
    if table is not None:
      table = jax.tree.map(lambda t, v: (t.__setitem__(ids, np.asarray(v)), t)[1], table, new_rows)
  return state, table


def _silenced(xs, reported):
  """The round's data with NaN images for the clients that do not report (they must count nowhere)."""
  xs = xs.copy()
  xs[~np.asarray(reported)] = np.nan
  return xs


# --------------------------------------------------------------------------------------------- SCAFFOLD


def _scaffold_np(grad, x, c, c_i, rounds, server_lr, n_total):
  """Karimireddy et al. 2020, Algorithm 1, option II, with client i taking its own K_i steps:
  y <- y - lr (g_i(y) - c_i + c) K_i times, c_i+ = c_i - c + (x - y_i) / (K_i lr);
  x <- x + eta_g (1/|S|) sum_{i in S} (y_i - x), c <- c + (1/N) sum_{i in S} (c_i+ - c_i),
  S the clients that reported."""
  for ids, xs, ys, _, steps, reported in rounds:
    dys, dcs = [], []
    for row, cid in enumerate(ids):
      if not reported[row]:
        continue
      corr = jax.tree.map(lambda a, b: a - b, c, c_i[cid])
      y = _local_sgd_np(grad, x, xs[row], ys[row], steps[row], extra=lambda p, corr=corr: corr)
      new = jax.tree.map(lambda ci, cc, xx, yy, k=steps[row]: ci - cc + (xx - yy) / (k * LR), c_i[cid], c, x, y)
      dys.append(jax.tree.map(np.subtract, y, x))
      dcs.append(jax.tree.map(np.subtract, new, c_i[cid]))
      c_i[cid] = new
    x = jax.tree.map(lambda a, *d: a + server_lr * sum(d) / len(d), x, *dys)
    c = jax.tree.map(lambda a, *d: a + sum(d) / n_total, c, *dcs)
  return x, c, c_i


@pytest.mark.parametrize("layout,n_dev,chunk", [("vmap", 2, 8), ("chunked", 1, 2)])
def test_scaffold_with_own_step_counts_dropout_and_partial_participation_equals_paper(layout, n_dev, chunk):
  """Three SCAFFOLD rounds, 4 of 7 clients each: every client its own step count K_i (its control variate
  divides by its own K_i), a client that does not report (NaN data; counts in neither mean, keeps c_i),
  clients sampled again after sitting out a round (their c_i carried), server lr 0.5, unequal data sizes
  (not used by the paper's uniform mean). The server control stays (1/N) sum over ALL N clients' c_i."""
  apply, params, loss_fn, xs, ys, weights = _data(seed=21, steps=3)
  n_total, server_lr = 7, 0.5
  rounds = [
    (np.array([0, 1, 2, 3]), xs, ys, weights, [3, 1, 2, 1], np.array([True, True, True, True])),
    (np.array([2, 5, 6, 4]), xs[::-1], ys[::-1], weights[::-1], [1, 3, 2, 2], np.array([True, False, True, True])),
    (np.array([5, 0, 3, 6]), xs[:, ::-1], ys[:, ::-1], weights, [2, 2, 3, 1], np.array([True, True, True, True])),
  ]
  rounds = [(ids, _silenced(rx, rep), ry, w, st, rep) for ids, rx, ry, w, st, rep in rounds]
  zeros = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  ref_x, ref_c, ref_ci = _scaffold_np(
    _grad_fn(apply, loss_fn), _tree_np(params), zeros, {i: zeros for i in range(n_total)}, rounds, server_lr, n_total
  )
  alg = algorithms.make("scaffold", optax.sgd(server_lr), client_lr=LR, num_clients=n_total)
  state, table = _run_rounds(alg, apply, loss_fn, params, rounds, n_total, layout, n_dev, chunk)
  assert _max_diff(ref_x, state["params"]) < 5e-5
  assert _max_diff(ref_c, state["control"]) < 5e-4
  for cid in range(n_total):
    assert _max_diff(ref_ci[cid], jax.tree.map(lambda t: t[cid], table)) < 5e-4, cid
  # client 5 did not report in round 2: its first control variate is from round 3; client 1: from round 1
  assert _max_diff(zeros, jax.tree.map(lambda t: t[1], table)) > 1e-3
  # c = (1/N) sum_i c_i over every registered client (the paper's invariant with c = c_i = 0 at the start)
  mean_ci = jax.tree.map(lambda t: np.mean(np.asarray(t, np.float64), 0), table)
  assert _max_diff(mean_ci, state["control"]) < 1e-6
  # K_i matters: dividing every c_i by the longest K instead ends elsewhere
  flat = [(ids, rx, ry, w, [3] * 4, rep) for ids, rx, ry, w, _, rep in rounds]
  grad, start = _grad_fn(apply, loss_fn), {i: zeros for i in range(n_total)}
  assert _max_diff(ref_c, _scaffold_np(grad, _tree_np(params), zeros, start, flat, server_lr, n_total)[1]) > 1e-4


# ---------------------------------------------------------------------------------------------- FedNova


def _fednova_momentum_np(grad, x, rounds, server_lr, beta):
  """Wang et al. 2020 (a_i = tau_i) over the reporting clients, p_i = n_i / sum_{reporting} n_j:
  d = sum p_i (y_i - x) / tau_i, Delta = (sum p_i tau_i) d; the server's heavy-ball step on -Delta
  (b <- beta b - Delta, x <- x - lr b; FedAvgM, Hsu et al. 2019)."""
  buf = jax.tree.map(np.zeros_like, x)
  for _, xs, ys, weights, steps, reported in rounds:
    keep = [i for i in range(xs.shape[0]) if reported[i]]
    p = np.asarray(weights, np.float64)[keep] / np.sum(np.asarray(weights, np.float64)[keep])
    tau = np.asarray(steps, np.float64)[keep]
    ds = [
      jax.tree.map(lambda y, a, t=tau[j]: (y - a) / t, _local_sgd_np(grad, x, xs[i], ys[i], steps[i]), x)
      for j, i in enumerate(keep)
    ]
    tau_eff = float(np.sum(p * tau))
    delta = jax.tree.map(lambda *d: tau_eff * sum(pi * di for pi, di in zip(p, d)), *ds)
    buf = jax.tree.map(lambda b, d: beta * b - d, buf, delta)
    x = jax.tree.map(lambda a, b: a - server_lr * b, x, buf)
  return x


def test_fednova_with_fedavgm_dropout_and_unequal_steps_two_rounds():
  """FedNova's normalised delta through a momentum server over two rounds; in round 2 a client does not
  report, so tau_eff and the p_i are over the other three. The momentum carries round 1 into round 2."""
  apply, params, loss_fn, xs, ys, weights = _data(seed=22, steps=4)
  server_lr, beta = 0.5, 0.9
  rounds = [
    (np.arange(4), xs, ys, weights, [4, 1, 3, 2], np.array([True] * 4)),
    (np.arange(4), xs[:, ::-1], ys[:, ::-1], weights, [1, 4, 2, 3], np.array([False, True, True, True])),
  ]
  rounds = [(ids, _silenced(rx, rep), ry, w, st, rep) for ids, rx, ry, w, st, rep in rounds]
  ref = _fednova_momentum_np(_grad_fn(apply, loss_fn), _tree_np(params), rounds, server_lr, beta)
  alg = algorithms.FedNova(engine.make_optimizer(_sgd_cfg(server_lr, beta)))
  state, _ = _run_rounds(alg, apply, loss_fn, params, rounds, 4, "chunked", 2, 1)
  assert _max_diff(ref, state["params"]) < 5e-5
  # momentum acted: without it (beta = 0) the two rounds end elsewhere
  assert _max_diff(ref, _fednova_momentum_np(_grad_fn(apply, loss_fn), _tree_np(params), rounds, server_lr, 0.0)) > 1e-4


def _sgd_cfg(lr, momentum):
  from fedkd import config as config_lib

  c = config_lib.base_config().server_optimizer
  c.learning_rate, c.momentum = lr, momentum
  return c


# ------------------------------------------------------------------------------------- Ditto and FedBN


def _adagrad_np(x, deltas, lr, b1, eps, v0):
  """Reddi et al. 2021, Algorithm 2, FedAdagrad: m = b1 m + (1 - b1) Delta, v = v + Delta^2,
  x = x + lr m / (sqrt(v) + eps), over the rounds' mean deltas."""
  m = jax.tree.map(np.zeros_like, x)
  v = jax.tree.map(lambda a: np.full_like(a, v0), x)
  for d in deltas:
    m = jax.tree.map(lambda a, b: b1 * a + (1 - b1) * b, m, d)
    v = jax.tree.map(lambda a, b: a + b * b, v, d)
    x = jax.tree.map(lambda a, mm, vv: a + lr * mm / (np.sqrt(vv) + eps), x, m, v)
  return x


def _ditto_np(grad, x, rounds, lam, n_total, server):
  """Li et al. 2021, Algorithm 1 over the reporting clients: w_i = SGD from w on F_i, v_i = SGD from v_i on
  F_i with the gradient + lam (v_i - w); the weighted mean of the deltas through ``server`` (a function of
  (x, list of mean deltas so far)). A client that does not report keeps its v_i."""
  vs, deltas = {cid: x for cid in range(n_total)}, []
  x0 = x
  for ids, xs, ys, weights, steps, reported in rounds:
    ups, ws = [], []
    for row, cid in enumerate(ids):
      if not reported[row]:
        continue
      ups.append(jax.tree.map(np.subtract, _local_sgd_np(grad, x, xs[row], ys[row], steps[row]), x))
      pull = lambda v, x=x: jax.tree.map(lambda a, b: lam * (a - b), v, x)  # noqa: E731
      vs[cid] = _local_sgd_np(grad, vs[cid], xs[row], ys[row], steps[row], extra=pull)
      ws.append(weights[row])
    p = np.asarray(ws, np.float64) / np.sum(ws)
    deltas.append(jax.tree.map(lambda *d: sum(pi * di for pi, di in zip(p, d)), *ups))
    x = server(x0, deltas)
  return x, vs


def test_ditto_with_fedadagrad_dropout_and_partial_participation():
  """Ditto's global part through FedAdagrad over two rounds of 4 of 6 clients; in round 2 client 3 does not
  report: its personal model stays the one of round 1, the new client 5 trains from the initial model."""
  apply, params, loss_fn, xs, ys, weights = _data(seed=23, steps=2)
  lam, n_total, lr, b1, eps, v0 = 2.0, 6, 0.05, 0.9, 1e-3, 1e-6
  rounds = [
    (np.array([0, 1, 2, 3]), xs, ys, weights, [2, 1, 2, 2], np.array([True] * 4)),
    (np.array([3, 5, 1, 4]), xs[::-1], ys[::-1], weights, [1, 2, 2, 1], np.array([False, True, True, True])),
  ]
  rounds = [(ids, _silenced(rx, rep), ry, w, st, rep) for ids, rx, ry, w, st, rep in rounds]
  server = lambda x0, ds: _adagrad_np(x0, ds, lr, b1, eps, v0)  # noqa: E731
  ref_x, ref_v = _ditto_np(_grad_fn(apply, loss_fn), _tree_np(params), rounds, lam, n_total, server)
  tx = engine.make_optimizer(_adagrad_cfg(lr, b1, eps, v0))
  alg = algorithms.make("ditto", tx, client_lr=LR, num_clients=n_total, ditto_lambda=lam)
  state, table = _run_rounds(alg, apply, loss_fn, params, rounds, n_total)
  assert _max_diff(ref_x, state["params"]) < 5e-5
  for cid in range(n_total):
    assert _max_diff(ref_v[cid], alg.personal(state["params"], jax.tree.map(lambda t: t[cid], table))) < 5e-5, cid
  # client 3 did not report in round 2: its personal model is the one it left round 1 with
  after_1 = _ditto_np(_grad_fn(apply, loss_fn), _tree_np(params), rounds[:1], lam, n_total, server)[1]
  assert _max_diff(after_1[3], ref_v[3]) == 0.0 and _max_diff(after_1[1], ref_v[1]) > 1e-3


def _adagrad_cfg(lr, b1, eps, v0):
  from fedkd import config as config_lib

  c = config_lib.base_config().server_optimizer
  c.name, c.learning_rate, c.b1, c.eps, c.initial_accumulator = "adagrad", lr, b1, eps, v0
  return c


def _norm_mask(params):
  """Which leaves of the tiny UNet's params are GroupNorm scales / biases, read off the nnx module tree."""
  import ml_collections
  from test_personal import TINY_UNET, _norm_paths, _plain

  from fedkd.models import build_model

  paths = _norm_paths(build_model(ml_collections.ConfigDict(TINY_UNET), 0))
  return jax.tree_util.tree_map_with_path(lambda p, _: _plain(p) in paths, params)


def _fedbn_np(grad, x, mask, rounds, combine, n_total):
  """Li et al. 2021 (FedBN): client i trains from x with its own norm leaves b_i; its delta with the norm
  leaves zeroed goes up, its trained norm leaves stay (only when it reports); the server adds
  ``combine(deltas of the reporting clients, their weights)`` and keeps its own norm leaves."""
  keep = {cid: x for cid in range(n_total)}  # b_i: the norm leaves of keep[cid]
  for ids, xs, ys, weights, steps, reported in rounds:
    deltas, ws = [], []
    for row, cid in enumerate(ids):
      if not reported[row]:
        continue
      start = jax.tree.map(lambda m, b, a: b if m else a, mask, keep[cid], x)
      y = _local_sgd_np(grad, start, xs[row], ys[row], steps[row])
      deltas.append(jax.tree.map(lambda m, a, b: np.zeros_like(a) if m else a - b, mask, y, start))
      ws.append(weights[row])
      keep[cid] = y
    x = jax.tree.map(lambda m, a, d: a if m else a + d, mask, x, combine(deltas, np.asarray(ws, np.float64)))
  return x, {cid: jax.tree.map(lambda m, b, a: b if m else a, mask, keep[cid], x) for cid in keep}


def _median(deltas, _):
  return jax.tree.map(lambda *d: np.median(np.stack(d), axis=0), *deltas)


def _dp_sum(clip, m):
  """DP-FedAvg without noise (McMahan et al. 2018): sum_i d_i min(1, C / ||d_i||) / m, m the configured
  clients per round (a fixed denominator, also when fewer report)."""

  def combine(deltas, _):
    clipped = []
    for d in deltas:
      norm = np.sqrt(sum(np.sum(a * a) for a in jax.tree.leaves(d)))
      combine.norms.append(norm)
      clipped.append(jax.tree.map(lambda a, s=min(1.0, clip / norm): a * s, d))
    return jax.tree.map(lambda *d: sum(d) / m, *clipped)

  combine.norms = []
  return combine


@pytest.mark.parametrize("wrap", ["median", "dp"])
def test_fedbn_under_a_robust_aggregator_or_dp_with_dropout(wrap):
  """FedBN with the coordinate-wise median (of the reporting clients' norm-zeroed deltas) or DP-FedAvg
  (noise 0, clipped sum over a fixed denominator) over two rounds of 4 of 5 clients; in round 2 client 2
  does not report. The clients' norm leaves are their own unclipped trained ones, the server's never move."""
  from fedkd.fl import aggregate, dp

  apply, params, loss_fn, xs, ys, weights = _data(seed=24, steps=2)
  mask, n_total, clip = _norm_mask(params), 5, 0.014
  rounds = [
    (np.array([0, 1, 2, 3]), xs, ys, weights, [2, 2, 1, 2], np.array([True] * 4)),
    (np.array([1, 4, 2, 0]), xs[::-1], ys[::-1], weights, [2, 1, 2, 2], np.array([True, True, False, True])),
  ]
  rounds = [(ids, _silenced(rx, rep), ry, w, st, rep) for ids, rx, ry, w, st, rep in rounds]
  combine = _median if wrap == "median" else _dp_sum(clip, 4)
  ref_x, ref_personal = _fedbn_np(_grad_fn(apply, loss_fn), _tree_np(params), mask, rounds, combine, n_total)
  if wrap == "dp":  # some updates clipped, some not
    assert min(combine.norms) < clip < max(combine.norms), combine.norms
  alg = algorithms.FedBN(optax.sgd(1.0))
  if wrap == "median":
    alg.aggregator = aggregate.make_aggregator("median")
  else:
    alg = dp.DPFedAvg(alg, clip, 0.0, 4)
  state, table = _run_rounds(alg, apply, loss_fn, params, rounds, n_total)
  assert _max_diff(ref_x, state["params"]) < 5e-5
  for cid in range(n_total):
    assert _max_diff(ref_personal[cid], alg.personal(state["params"], jax.tree.map(lambda t: t[cid], table))) < 5e-5
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(params), jax.tree.leaves(state["params"])):
    if m:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the statistic acted: the weighted mean of the same deltas ends elsewhere
  mean = _fedbn_np(_grad_fn(apply, loss_fn), _tree_np(params), mask, rounds, _wmean, n_total)[0]
  assert _max_diff(ref_x, mean) > 1e-4


def _wmean(deltas, w):
  p = w / w.sum()
  return jax.tree.map(lambda *d: sum(pi * di for pi, di in zip(p, d)), *deltas)


def _fedavg_over(apply, loss_fn, params, xs, ys, weights, keep):
  """Server params after one FedAvg round (server lr 1, 2 local SGD steps) over clients ``keep`` only (numpy)."""
  grad, x = _grad_fn(apply, loss_fn), _tree_np(params)
  ups = [jax.tree.map(np.subtract, _local_sgd_np(grad, x, xs[c], ys[c], 2), x) for c in keep]
  p = weights[keep].astype(np.float64) / weights[keep].sum()
  return jax.tree.map(lambda a, *d: a + sum(pi * di for pi, di in zip(p, d)), x, *ups)


def test_a_ditto_client_whose_personal_model_diverges_counts_as_non_finite():
  """Plain SGD with lr * lambda = 5 > 2 makes the personal model overshoot w by a factor 4 per step: client 1,
  whose personal model starts 1e30 away, ends non-finite while its global part (trained from w) is finite.
  The client must count as non-finite: with skip_nonfinite it keeps its old row and the round is FedAvg
  over the other three (numpy), instead of a NaN row that stops the run as 'the aggregate became non-finite'
  (and that skip_nonfinite cannot drop)."""
  from fedkd.fl.algorithm import ClientContext
  from fedkd.sharding import client_mesh

  apply, params, loss_fn, xs, ys, weights = _data(seed=25, steps=2)
  alg = algorithms.Ditto(optax.sgd(1.0), 5.0 / LR)
  table = jax.tree.map(np.array, init_rows(alg, params, 4))
  for leaf in jax.tree.leaves(table):
    leaf[1] += 1e30
  mesh = client_mesh(2)
  opts = engine.EngineOptions("vmap", "xla", 8)
  fn = engine.make_round_fn(alg, ClientContext(apply, loss_fn, optax.sgd(LR)), mesh, opts, skip_nonfinite=True)
  old = jax.tree.map(lambda t: t[1].copy(), table)
  rows, bx, by, bw = shard_clients((table, jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  state, new_rows, m = fn(alg.init(params, jax.random.key(0)), rows, {"x": bx, "y": by}, bw)
  assert np.asarray(m["client_finite"]).tolist() == [True, False, True, True]
  assert bool(m["finite"])
  assert _max_diff(old, jax.tree.map(lambda t: t[1], new_rows)) == 0.0
  assert _max_diff(_fedavg_over(apply, loss_fn, params, xs, ys, weights, [0, 2, 3]), state["params"]) < 5e-5


class _RowBlowsUp(algorithms.FedAvg):
  """FedAvg plus a per-client row r -> r / (r - 1): the client whose row is 1 gets an inf row while its upload
  and loss stay finite (the shape of a FedBN norm layer or a personal model that diverged after the last step)."""

  def init_row(self, params):
    return jnp.zeros(3, jnp.float32)

  def client(self, ctx, server, row, batch, gathered):
    out = super().client(ctx, server, None, batch, gathered)
    return out._replace(row=row / (row - 1.0))


@pytest.mark.parametrize("skip", [True, False])
def test_a_client_whose_new_row_is_non_finite_counts_as_non_finite(skip):
  """The engine judges a client by its new row too: client 1's inf row flags it; with skip_nonfinite it keeps its
  old row and the server is FedAvg over the other three (numpy), without it the round reports it non-finite."""
  from fedkd.fl.algorithm import ClientContext
  from fedkd.sharding import client_mesh

  apply, params, loss_fn, xs, ys, weights = _data(seed=26, steps=2)
  alg = _RowBlowsUp(optax.sgd(1.0))
  table = np.zeros((4, 3), np.float32)
  table[1] = 1.0
  mesh = client_mesh(2)
  opts = engine.EngineOptions("vmap", "xla", 8)
  fn = engine.make_round_fn(alg, ClientContext(apply, loss_fn, optax.sgd(LR)), mesh, opts, skip_nonfinite=skip)
  rows, bx, by, bw = shard_clients((jnp.asarray(table), jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  state, new_rows, m = fn(alg.init(params, jax.random.key(0)), rows, {"x": bx, "y": by}, bw)
  assert np.asarray(m["client_finite"]).tolist() == [True, False, True, True]
  if not skip:
    return
  np.testing.assert_array_equal(np.asarray(new_rows)[1], table[1])  # its old row kept
  assert _max_diff(_fedavg_over(apply, loss_fn, params, xs, ys, weights, [0, 2, 3]), state["params"]) < 5e-5


def test_the_diverged_message_fits_the_run():
  """With skip_nonfinite_clients on and no client's update counted, the round has no loss (it printed the
  empty round's 0.0) and the advice to turn the flag on is left out; Ditto / FedProx name their pull weight."""
  from fedkd import config as fc
  from fedkd.tasks import fedavg

  c = fc.base_config()
  c.algorithm.name, c.algorithm.ditto_lambda, c.engine.skip_nonfinite_clients = "ditto", 100.0, True
  m = {"loss": 0.0, "client_finite": np.array([False, False])}
  msg = str(fedavg._diverged(5, m, np.array([3, 7]), c, 4, "/w/checkpoints", counted=False))
  assert msg.startswith("training diverged in round 5: loss none, non-finite updates from client(s) [3, 7] of 2;")
  assert "config.algorithm.ditto_lambda=100 too large for it" in msg
  assert "set --config.engine.skip_nonfinite_clients=True" not in msg
  assert "lower it (engine.skip_nonfinite_clients dropped every reporting client);" in msg
  # every client finite but the aggregate not (a server step too large): nothing about dropped clients
  msg = str(fedavg._diverged(5, {"loss": 0.3, "client_finite": np.array([True, True])}, np.array([3, 7]), c, 4, "/w"))
  assert "loss 0.3, the aggregate became non-finite;" in msg and ": lower it; the last good checkpoint" in msg
  c.algorithm.name, c.engine.skip_nonfinite_clients = "fedavg", False
  msg = str(fedavg._diverged(5, dict(m, loss=float("nan")), np.array([3, 7]), c, None, "/w/checkpoints"))
  assert "loss nan," in msg and "too large for it" not in msg and "no checkpoint was written" in msg
  assert "or set --config.engine.skip_nonfinite_clients=True to drop such clients" in msg
  assert "DP noise" not in msg
  # every client finite, skipping off: the overflow is the aggregate's (a server learning rate of 1e38), and
  # dropping clients cannot help: the hint was given all the same
  msg = str(fedavg._diverged(5, {"loss": 0.3, "client_finite": np.array([True, True])}, np.array([3, 7]), c, 4, "/w"))
  assert "the aggregate became non-finite;" in msg and "skip_nonfinite_clients" not in msg, msg
  # DP on: the noise the server adds to the mean update is named, std z C / m (docs/algorithms.md)
  c.dp.enabled, c.dp.noise_multiplier, c.dp.clip_norm, c.clients_per_round = True, 1e9, 0.1, 4
  msg = str(fedavg._diverged(2, dict(m, loss=float("nan")), np.array([3, 7]), c, None, "/w/checkpoints"))
  assert "or the DP noise (std 2.5e+07 per coordinate of the averaged update: config.dp.noise_multiplier=1e+09" in msg
