"""FedProx, FedNova, SCAFFOLD (the paper's weighting) and the FedOpt server optimizers: rounds of the
jitted, sharded engine against plain per-client loops written from each paper's equations.

The references take gradients of ONE client's segmentation loss with ``jax.grad``; every other piece
(the SGD steps, FedProx's proximal gradient, the masked step counts, FedNova's normalisation, the
weighted / uniform means, SCAFFOLD's control variates, Reddi et al.'s Algorithm 2) is numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_engine import LR, _build, _max_diff, _problem, _setup, _tree_np, seg_grad

from fedkd import config as config_lib
from fedkd.config import ConfigError
from fedkd.fl import algorithms, engine
from fedkd.fl.algorithm import init_rows
from fedkd.sharding import replicate, shard_clients

# (layout, devices, chunk): every layout, on 1 and on 2+ devices
LAYOUTS = [("vmap", 2, 8), ("chunked", 1, 2), ("unroll", 4, 8)]


def _data(seed, clients=4, steps=4):
  """``steps`` local batches per client (the two of tests/test_engine.py's set-up, then reversed)."""
  _, params, _, xs, ys, weights = _setup(seed=seed, clients=clients)
  # the same model for every seed, so one apply / loss (apply is a pure function of the params): the reference
  # gradient (seg_grad) is traced once per process, not once per seed
  apply, _, loss_fn, *_ = _problem(0)
  xs = np.concatenate([xs, xs[:, ::-1]], 1)[:, :steps]
  ys = np.concatenate([ys, ys[:, ::-1]], 1)[:, :steps]
  return apply, params, loss_fn, xs, ys, weights


def _grad_fn(apply, loss_fn):
  g = seg_grad(apply, loss_fn)
  return lambda p, x, y: _tree_np(g(jax.tree.map(np.float32, p), x, y))


def _local_sgd_np(grad, start, xs, ys, steps, extra=None):
  """``steps`` plain SGD steps (numpy); ``extra(p)``: a params-shaped term added to each gradient."""
  p = start
  for s in range(steps):
    g = grad(p, xs[s], ys[s])
    if extra is not None:
      g = jax.tree.map(np.add, g, extra(p))
    p = jax.tree.map(lambda a, b: a - LR * b, p, g)
  return p


def _weighted_mean(trees, weights):
  p = np.asarray(weights, np.float64) / np.sum(weights)
  return jax.tree.map(lambda *d: sum(pi * di for pi, di in zip(p, d)), *trees)


def _engine_round(alg, apply, loss_fn, params, xs, ys, weights, layout, n_dev, chunk, steps=None, server=None):
  fn, mesh, _ = _build(apply, loss_fn, n_dev, layout, algorithm=alg, chunk=chunk)
  state = server if server is not None else alg.init(params, jax.random.key(0))
  batch = {"x": jnp.asarray(xs), "y": jnp.asarray(ys)}
  if steps is not None:
    batch["steps"] = jnp.asarray(steps, jnp.int32)
  batch, w = shard_clients((batch, jnp.asarray(weights)), mesh)
  state, _, metrics = fn(state, None, batch, w)
  return state, metrics


# ---------------------------------------------------------------------------------------------- FedProx


def _fedprox_reference(apply, loss_fn, params, xs, ys, weights, mu, steps):
  """Li et al. 2020: each client runs SGD on F_i(w) + (mu/2)||w - w_t||^2 (gradient of the proximal term
  mu (w - w_t), numpy); the server takes the data-size weighted mean (FedAvg's)."""
  grad, x = _grad_fn(apply, loss_fn), _tree_np(params)
  locals_ = [
    _local_sgd_np(grad, x, xs[c], ys[c], steps[c], extra=lambda p: jax.tree.map(lambda a, b: mu * (a - b), p, x))
    for c in range(xs.shape[0])
  ]
  return _weighted_mean(locals_, weights)


@pytest.mark.parametrize("layout,n_dev,chunk", LAYOUTS)
def test_fedprox_equals_per_client_loop(layout, n_dev, chunk):
  apply, params, loss_fn, xs, ys, weights = _data(seed=5, steps=3)
  mu = 4.0
  ref = _fedprox_reference(apply, loss_fn, params, xs, ys, weights, mu, [3] * 4)
  state, _ = _engine_round(
    algorithms.FedProx(optax.sgd(1.0), mu), apply, loss_fn, params, xs, ys, weights, layout, n_dev, chunk
  )
  assert _max_diff(ref, state["params"]) < 2e-5
  # the proximal term acted: mu = 0 (FedAvg) ends elsewhere
  assert _max_diff(ref, _fedprox_reference(apply, loss_fn, params, xs, ys, weights, 0.0, [3] * 4)) > 1e-4


def test_fedprox_with_unequal_local_steps():
  """FedProx's variable local work: per-client step counts in batch['steps'] (masked in the scan)."""
  apply, params, loss_fn, xs, ys, weights = _data(seed=6, steps=4)
  steps = [4, 1, 3, 2]
  ref = _fedprox_reference(apply, loss_fn, params, xs, ys, weights, 1.0, steps)
  alg = algorithms.FedProx(optax.sgd(1.0), 1.0)
  state, _ = _engine_round(alg, apply, loss_fn, params, xs, ys, weights, "vmap", 2, 8, steps=steps)
  assert _max_diff(ref, state["params"]) < 2e-5


# ---------------------------------------------------------------------------------------------- FedNova


def _fednova_reference(apply, loss_fn, params, xs, ys, weights, steps):
  """Wang et al. 2020 with plain SGD (a_i = tau_i): d_i = (x - y_i) / tau_i, p_i = n_i / sum n,
  tau_eff = sum p_i tau_i, x <- x - tau_eff sum p_i d_i."""
  grad, x = _grad_fn(apply, loss_fn), _tree_np(params)
  p = np.asarray(weights, np.float64) / np.sum(weights)
  tau = np.asarray(steps, np.float64)
  ds = [
    jax.tree.map(lambda a, b: (a - b) / tau[c], x, _local_sgd_np(grad, x, xs[c], ys[c], steps[c]))
    for c in range(xs.shape[0])
  ]
  tau_eff = float(np.sum(p * tau))
  return jax.tree.map(lambda a, *d: a - tau_eff * sum(pi * di for pi, di in zip(p, d)), x, *ds)


def _fedavg_reference(apply, loss_fn, params, xs, ys, weights, steps):
  """McMahan et al. 2017: x <- sum_i p_i y_i (client i after its own number of SGD steps)."""
  grad, x = _grad_fn(apply, loss_fn), _tree_np(params)
  return _weighted_mean([_local_sgd_np(grad, x, xs[c], ys[c], steps[c]) for c in range(xs.shape[0])], weights)


@pytest.mark.parametrize("layout,n_dev,chunk", LAYOUTS)
def test_fednova_unequal_steps_equals_per_client_loop(layout, n_dev, chunk):
  apply, params, loss_fn, xs, ys, weights = _data(seed=7, steps=4)
  steps = [4, 1, 3, 2]
  ref = _fednova_reference(apply, loss_fn, params, xs, ys, weights, steps)
  alg = algorithms.FedNova(optax.sgd(1.0))
  state, metrics = _engine_round(alg, apply, loss_fn, params, xs, ys, weights, layout, n_dev, chunk, steps=steps)
  assert _max_diff(ref, state["params"]) < 2e-5
  # with unequal work FedNova is not FedAvg (which over-weights the clients that took more steps)
  assert _max_diff(ref, _fedavg_reference(apply, loss_fn, params, xs, ys, weights, steps)) > 1e-4
  # each client's reported loss is the mean over the steps it took, not over the masked ones
  first = float(jax.jit(lambda p, x, y: loss_fn(apply(p, x), y))(params, xs[1, 0], ys[1, 0]))
  np.testing.assert_allclose(np.asarray(metrics["client_loss"])[1], first, rtol=1e-5)  # client 1: one step


def test_fednova_with_equal_steps_is_fedavg():
  # 4 local batches: the explicit counts' program is test_fednova_unequal_steps_equals_per_client_loop's chunked one
  apply, params, loss_fn, xs, ys, weights = _data(seed=8, steps=4)
  ref = _fedavg_reference(apply, loss_fn, params, xs, ys, weights, [4] * 4)
  alg = algorithms.FedNova(optax.sgd(1.0))
  implicit, _ = _engine_round(alg, apply, loss_fn, params, xs, ys, weights, "vmap", 2, 8)
  explicit, _ = _engine_round(alg, apply, loss_fn, params, xs, ys, weights, "chunked", 1, 2, steps=[4] * 4)
  assert _max_diff(ref, implicit["params"]) < 2e-5
  assert _max_diff(ref, explicit["params"]) < 2e-5


@pytest.mark.parametrize("layout,n_dev,chunk", [("vmap", 1, 8), ("chunked", 2, 1)])
def test_fedavg_masks_the_steps_beyond_each_clients_count(layout, n_dev, chunk):
  """The shared masking (local_sgd's ``steps``): FedAvg with per-client counts = the truncated loop."""
  apply, params, loss_fn, xs, ys, weights = _data(seed=9, steps=4)
  steps = [2, 4, 1, 3]
  ref = _fedavg_reference(apply, loss_fn, params, xs, ys, weights, steps)
  state, _ = _engine_round(
    algorithms.FedAvg(optax.sgd(1.0)), apply, loss_fn, params, xs, ys, weights, layout, n_dev, chunk, steps=steps
  )
  assert _max_diff(ref, state["params"]) < 2e-5


# --------------------------------------------------------------------------------------------- SCAFFOLD


def _scaffold_uniform_reference(apply, loss_fn, server, control, client_c, rounds, server_lr):
  """Karimireddy et al. 2020, Algorithm 1 with option II: y_i <- y_i - lr (g_i(y_i) - c_i + c) for K
  steps, c_i+ = c_i - c + (x - y_i)/(K lr); x <- x + eta_g (1/|S|) sum dy_i, c <- c + (1/N) sum dc_i.
  ``rounds``: (client ids, xs, ys) per round (the data-size weights play no part)."""
  grad = _grad_fn(apply, loss_fn)
  n_total = len(client_c)
  for ids, xs, ys in rounds:
    dys, dcs = [], []
    for row, cid in enumerate(ids):
      corr = jax.tree.map(lambda c, ci: c - ci, control, client_c[cid])
      y = _local_sgd_np(grad, server, xs[row], ys[row], xs.shape[1], extra=lambda p, corr=corr: corr)
      new_ci = jax.tree.map(
        lambda ci, c, x, yi: ci - c + (x - yi) / (xs.shape[1] * LR), client_c[cid], control, server, y
      )
      dcs.append(jax.tree.map(np.subtract, new_ci, client_c[cid]))
      dys.append(jax.tree.map(np.subtract, y, server))
      client_c[cid] = new_ci
    server = jax.tree.map(lambda x, *d: x + server_lr * sum(d) / len(ids), server, *dys)
    control = jax.tree.map(lambda c, *d: c + sum(d) / n_total, control, *dcs)
  return server, control, client_c


@pytest.mark.parametrize("layout,n_dev,chunk", [("vmap", 2, 8), ("chunked", 1, 2)])  # unroll: test_pre_redesign
def test_scaffold_uniform_equals_paper(layout, n_dev, chunk):
  """Two rounds, overlapping samples (some clients start from c_i != 0), unequal data-size weights."""
  apply, params, loss_fn, xs, ys, weights = _data(seed=4, steps=2)
  n_total, server_lr = 6, 0.7
  samples = [np.arange(0, 4), np.array([2, 5, 3, 4])]
  rounds = [(ids, xs[::-1] if r else xs, ys[::-1] if r else ys) for r, ids in enumerate(samples)]
  zeros = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  ref_x, ref_c, ref_ci = _scaffold_uniform_reference(
    apply, loss_fn, _tree_np(params), zeros, {i: zeros for i in range(n_total)}, rounds, server_lr
  )
  alg = algorithms.make("scaffold", optax.sgd(server_lr), client_lr=LR, num_clients=n_total)
  assert alg.weighting == "uniform"  # the default
  fn, mesh, _ = _build(apply, loss_fn, n_dev, layout, algorithm=alg, chunk=chunk)
  # replicated on the mesh as the round returns it: both rounds run one compiled program
  state = replicate(alg.init(params, jax.random.key(0)), mesh)
  table = jax.tree.map(np.array, init_rows(alg, params, n_total))
  for ids, rx, ry in rounds:
    rows = jax.tree.map(lambda a: jnp.asarray(a[ids]), table)
    rows, rx, ry, rw = shard_clients((rows, jnp.asarray(rx), jnp.asarray(ry), jnp.asarray(weights)), mesh)
    state, new_rows, _ = fn(state, rows, {"x": rx, "y": ry}, rw)
    table = jax.tree.map(lambda t, r: (t.__setitem__(ids, np.asarray(r)), t)[1], table, new_rows)
  assert _max_diff(ref_x, state["params"]) < 5e-5
  assert _max_diff(ref_c, state["control"]) < 5e-4
  for cid in range(n_total):
    assert _max_diff(ref_ci[cid], jax.tree.map(lambda t: t[cid], table)) < 5e-4, cid
  if layout == "vmap":  # the weighting matters: data-size weighting ends elsewhere
    old = algorithms.Scaffold(optax.sgd(server_lr), LR, n_total, weighting="data_size")
    fn, mesh, _ = _build(apply, loss_fn, n_dev, layout, algorithm=old, chunk=chunk)
    rows, rx, ry, rw = shard_clients(
      (init_rows(old, params, 4), jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh
    )
    s_old, _, _ = fn(old.init(params, jax.random.key(0)), rows, {"x": rx, "y": ry}, rw)
    s_new = _scaffold_uniform_reference(
      apply, loss_fn, _tree_np(params), zeros, {i: zeros for i in range(n_total)}, rounds[:1], server_lr
    )[0]
    assert _max_diff(s_old["params"], s_new) > 1e-4


# ----------------------------------------------------------------------------------------------- FedOpt


def _server_cfg(name, **kw):
  c = config_lib.base_config().server_optimizer
  c.name = name
  c.learning_rate = 0.1
  for k, v in kw.items():
    c[k] = v
  return c


def _reddi_np(name, deltas, lr, b1, b2, eps, v0):
  """Reddi et al. 2021, Algorithm 2 (server part), numpy: the params' moves over the rounds' mean
  deltas Delta_t; adam is optax's (Kingma & Ba, with bias correction, which Algorithm 2 omits)."""
  m, v, x = 0.0, (0.0 if name == "adam" else v0), 0.0  # adam's moments start at 0
  for t, d in enumerate(deltas, 1):
    m = b1 * m + (1 - b1) * d
    if name == "adagrad":
      v = v + d * d
    elif name == "yogi":
      v = v - (1 - b2) * d * d * np.sign(v - d * d)
    else:  # adam
      v = b2 * v + (1 - b2) * d * d
    if name == "adam":
      mh, vh = m / (1 - b1**t), v / (1 - b2**t)
      x = x + lr * mh / (np.sqrt(vh) + eps)
    else:
      x = x + lr * m / (np.sqrt(v) + eps)
  return x


@pytest.mark.parametrize("name", ["yogi", "adagrad", "adam"])
@pytest.mark.parametrize("kw", [{}, dict(b1=0.5, b2=0.9, eps=1e-2, initial_accumulator=0.0)])
def test_server_optimizer_equals_reddi_algorithm_2(name, kw):
  cfg = _server_cfg(name, **kw)
  tx = engine.make_optimizer(cfg)
  rng = np.random.default_rng(0)
  # a pseudo-gradient with entries small and large against eps, of both signs, over three rounds
  deltas = [rng.normal(size=(5, 3)) * np.array([1e-4, 1e-2, 1.0])[None] for _ in range(3)]
  params = {"w": jnp.zeros((5, 3), jnp.float32)}
  state = tx.init(params)
  moved = []
  for d in deltas:
    updates, state = tx.update({"w": -jnp.asarray(d, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    moved.append(np.asarray(params["w"], np.float64))
  for t in (1, 3):  # one server step, and three (state carried between rounds)
    want = _reddi_np(name, deltas[:t], cfg.learning_rate, cfg.b1, cfg.b2, cfg.eps, cfg.initial_accumulator)
    np.testing.assert_allclose(moved[t - 1], want, rtol=2e-4, atol=1e-7)


def test_fedyogi_round_through_the_engine():
  """One FedAvg round with the yogi server optimizer: the weighted mean delta of the per-client loop,
  then Algorithm 2's step (numpy)."""
  apply, params, loss_fn, xs, ys, weights = _data(seed=10, steps=2)
  cfg = _server_cfg("yogi")
  ref_mean = jax.tree.map(
    lambda a, b: a - b, _fedavg_reference(apply, loss_fn, params, xs, ys, weights, [2] * 4), _tree_np(params)
  )
  alg = algorithms.FedAvg(engine.make_optimizer(cfg))
  state, _ = _engine_round(alg, apply, loss_fn, params, xs, ys, weights, "vmap", 2, 8)
  want = jax.tree.map(
    lambda p, d: p + _reddi_np("yogi", [d], cfg.learning_rate, cfg.b1, cfg.b2, cfg.eps, cfg.initial_accumulator),
    _tree_np(params),
    ref_mean,
  )
  assert _max_diff(want, state["params"]) < 1e-4
  assert _max_diff(params, state["params"]) > 1e-3


def test_client_optimizer_keeps_optax_defaults():
  """client_optimizer has no b1/b2/eps keys: client Adam stays optax's default Adam."""
  c = config_lib.base_config().client_optimizer
  assert "eps" not in c
  g = {"w": jnp.asarray([1e-6, 1.0])}
  ours = engine.make_optimizer(c).update(g, engine.make_optimizer(c).init(g))[0]
  theirs = optax.adam(c.learning_rate).update(g, optax.adam(c.learning_rate).init(g))[0]
  np.testing.assert_array_equal(ours["w"], theirs["w"])


# ----------------------------------------------------------------------------------- config validation


def _cfg(**kw):
  c = config_lib.base_config()
  for k, v in kw.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.mark.parametrize(
  "kw,needle",
  [
    ({"algorithm.name": "fedprox", "algorithm.prox_mu": -0.1}, "config.algorithm.prox_mu=-0.1"),
    (
      {"algorithm.name": "scaffold", "client_optimizer.name": "sgd", "algorithm.scaffold_weighting": "size"},
      "config.algorithm.scaffold_weighting='size' is unknown",
    ),
    (
      {"algorithm.name": "scaffold", "client_optimizer.name": "sgd", "client_optimizer.momentum": 0.9},
      "--config.client_optimizer.momentum=0",
    ),
    ({"algorithm.name": "fednova"}, "config.algorithm.name='fednova' needs config.client_optimizer.name='sgd'"),
    ({"algorithm.local_steps_min": 5, "local_steps": 2}, "config.algorithm.local_steps_min=5"),
    ({"algorithm.local_steps_min": -1}, "config.algorithm.local_steps_min=-1"),
    ({"server_optimizer.name": "lamb"}, "config.server_optimizer.name='lamb' is unknown"),
    ({"client_optimizer.name": "yogi"}, "config.client_optimizer.name='yogi' is unknown"),
    ({"server_optimizer.name": "adam", "server_optimizer.eps": 0.0}, "config.server_optimizer.eps=0.0"),
    ({"server_optimizer.name": "adam", "server_optimizer.b2": 1.0}, "config.server_optimizer.b2=1.0"),
    (
      {"server_optimizer.name": "yogi", "server_optimizer.initial_accumulator": -1.0},
      "config.server_optimizer.initial_accumulator=-1.0",
    ),
  ],
)
def test_config_rejects_bad_values_in_one_line(kw, needle):
  with pytest.raises(ConfigError) as e:
    config_lib.validate(_cfg(**kw), 1)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_config_accepts_the_new_methods():
  for kw in (
    {"algorithm.name": "fedprox", "algorithm.prox_mu": 0.0},
    {"algorithm.name": "fednova", "client_optimizer.name": "sgd", "algorithm.local_steps_min": 1},
    {"algorithm.name": "scaffold", "client_optimizer.name": "sgd", "algorithm.scaffold_weighting": "data_size"},
    {"server_optimizer.name": "yogi"},
    {"server_optimizer.name": "adagrad", "server_optimizer.initial_accumulator": 0.0},
  ):
    config_lib.validate(_cfg(**kw), 1)


# ------------------------------------------------------------------------------------- the fedavg task


def test_local_step_draws_are_in_range_and_follow_the_round_key():
  from fedkd.tasks.fedavg import draw_local_steps, sample_clients

  key = jax.random.key(3)
  a = draw_local_steps(key, 2, 5, 64)
  assert a.dtype == np.int32 and a.min() >= 2 and a.max() <= 5 and len(set(a.tolist())) == 4
  np.testing.assert_array_equal(a, draw_local_steps(key, 2, 5, 64))  # resume draws the same
  assert not np.array_equal(a, draw_local_steps(jax.random.key(4), 2, 5, 64))
  # the client sampling from the same key is unchanged by the draw
  np.testing.assert_array_equal(sample_clients(key, 10, 4), np.asarray(jax.random.choice(key, 10, (4,), replace=False)))


def test_resume_of_a_checkpoint_from_before_a_behaviour_changing_key():
  """A SCAFFOLD / server-Adam checkpoint written before scaffold_weighting / b2 / eps existed resumes
  only with the old values (the new defaults would change the run mid-way)."""
  from fedkd.checkpoint import ResumeRefused
  from fedkd.tasks.fedavg import _check_resumable

  def saved(c):
    d = c.to_dict()
    del d["algorithm"]["scaffold_weighting"], d["server_optimizer"]["b2"], d["server_optimizer"]["eps"]
    return d

  old = _cfg(**{"algorithm.name": "scaffold", "client_optimizer.name": "sgd"})
  with pytest.raises(ResumeRefused, match="--config.algorithm.scaffold_weighting=data_size"):
    _check_resumable(saved(old), old.to_dict(), "ckpt")
  _check_resumable(
    saved(old),
    _cfg(
      **{"algorithm.name": "scaffold", "client_optimizer.name": "sgd", "algorithm.scaffold_weighting": "data_size"}
    ).to_dict(),
    "ckpt",
  )
  adam = _cfg(**{"server_optimizer.name": "adam"})
  with pytest.raises(ResumeRefused, match="server_optimizer.b2"):
    _check_resumable(saved(adam), adam.to_dict(), "ckpt")
  _check_resumable(
    saved(adam),
    _cfg(**{"server_optimizer.name": "adam", "server_optimizer.b2": 0.999, "server_optimizer.eps": 1e-8}).to_dict(),
    "ckpt",
  )
  fedavg = _cfg()  # server SGD: the new keys change nothing, it resumes
  _check_resumable(saved(fedavg), fedavg.to_dict(), "ckpt")


def test_fednova_run_with_drawn_local_steps_resumes_bitwise(tmp_path, monkeypatch):
  """config.algorithm.local_steps_min through fedkd.tasks.fedavg: the counts are drawn every round (in
  range) and an interrupted run resumes to the same numbers (the draw follows the checkpointed rng)."""
  from test_training import tiny_config

  from fedkd.tasks import fedavg

  drawn = []
  real = fedavg.draw_local_steps
  monkeypatch.setattr(fedavg, "draw_local_steps", lambda *a: drawn.append(real(*a)) or drawn[-1])

  def cfg():
    c = tiny_config(num_rounds=3, local_steps=2)  # unrolled local steps: 2 keep the program small
    c.algorithm.name, c.algorithm.local_steps_min = "fednova", 1
    c.client_optimizer.name, c.client_optimizer.learning_rate = "sgd", 0.05
    return c

  lines = []
  full = fedavg.run(cfg(), str(tmp_path / "full"), log=lines.append)
  assert any("1-2 local steps" in ln for ln in lines)
  full_draws = [d.tolist() for d in drawn]
  assert len(full_draws) == 3 and all(1 <= s <= 2 for d in full_draws for s in d)
  assert len({s for d in full_draws for s in d}) == 2  # both counts drawn

  class Interrupt(Exception):
    pass

  def crash_in_round_3(line):
    if line.startswith("round    3/"):
      raise Interrupt  # after round 3, before its checkpoint (every 2)

  work = str(tmp_path / "resumed")
  with pytest.raises(Interrupt):
    fedavg.run(cfg(), work, log=crash_in_round_3)
  drawn.clear()
  resumed = fedavg.run(cfg(), work, log=lambda _: None)
  assert [d.tolist() for d in drawn] == full_draws[2:]  # round 3 again, same counts
  for a, b in zip(jax.tree.leaves(full["state"]["params"]), jax.tree.leaves(resumed["state"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scaffold_uniform_skips_a_nonfinite_client():
  """engine.skip_nonfinite_clients: a client with NaN data counts neither in (1/|S|) sum dy_i nor in
  the control update, and keeps its c_i; the others' round is the paper's over them alone."""
  from fedkd.fl.algorithm import ClientContext
  from fedkd.sharding import client_mesh

  apply, params, loss_fn, xs, ys, weights = _data(seed=11, steps=2)
  xs = xs.copy()
  xs[2] = np.nan
  n_total = 5
  zeros = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  keep = np.array([0, 1, 3])
  ref_x, ref_c, _ = _scaffold_uniform_reference(
    apply, loss_fn, _tree_np(params), zeros, {i: zeros for i in range(n_total)}, [(keep, xs[keep], ys[keep])], 1.0
  )
  alg = algorithms.Scaffold(optax.sgd(1.0), LR, n_total)
  mesh = client_mesh(2)
  opts = engine.EngineOptions("vmap", "xla", 8, unroll_local_steps=False)
  fn = engine.make_round_fn(alg, ClientContext(apply, loss_fn, optax.sgd(LR)), mesh, opts, skip_nonfinite=True)
  rows, bx, by, bw = shard_clients(
    (init_rows(alg, params, 4), jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh
  )
  state, new_rows, m = fn(alg.init(params, jax.random.key(0)), rows, {"x": bx, "y": by}, bw)
  assert np.asarray(m["client_finite"]).tolist() == [True, True, False, True]
  assert _max_diff(ref_x, state["params"]) < 5e-5
  assert _max_diff(ref_c, state["control"]) < 5e-4
  assert _max_diff(zeros, jax.tree.map(lambda a: a[2], new_rows)) == 0.0


@pytest.mark.parametrize("layout,n_dev,chunk", [("vmap", 2, 8), ("chunked", 2, 1)])
def test_dropout_leaves_out_the_clients_that_did_not_report(layout, n_dev, chunk):
  """batch["reported"] (client dropout): a client that did not report counts neither in SCAFFOLD's
  (1/|S|) sum dy_i nor in the control update, keeps its c_i and is left out of the mean loss; its
  NaN data (it computed nothing usable) does not make the round diverge. The reference is the paper's
  round over the clients that reported."""
  apply, params, loss_fn, xs, ys, weights = _data(seed=12, steps=2)
  xs = xs.copy()
  xs[1] = np.nan
  reported = np.array([True, False, True, True])
  n_total = 5
  zeros = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  keep = np.flatnonzero(reported)
  ref_x, ref_c, _ = _scaffold_uniform_reference(
    apply, loss_fn, _tree_np(params), zeros, {i: zeros for i in range(n_total)}, [(keep, xs[keep], ys[keep])], 1.0
  )
  alg = algorithms.Scaffold(optax.sgd(1.0), LR, n_total)
  fn, mesh, _ = _build(apply, loss_fn, n_dev, layout, algorithm=alg, chunk=chunk)
  rows, bx, by, br, bw = shard_clients(
    (init_rows(alg, params, 4), jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(reported), jnp.asarray(weights)),
    mesh,
  )
  state, new_rows, m = fn(alg.init(params, jax.random.key(0)), rows, {"x": bx, "y": by, "reported": br}, bw)
  assert np.asarray(m["client_finite"]).all() and bool(m["finite"])
  assert _max_diff(ref_x, state["params"]) < 5e-5
  assert _max_diff(ref_c, state["control"]) < 5e-4
  assert _max_diff(zeros, jax.tree.map(lambda a: a[1], new_rows)) == 0.0
  losses = np.asarray(m["client_loss"])
  w = np.asarray(weights, np.float64) * reported
  np.testing.assert_allclose(float(m["loss"]), np.sum(w[keep] * losses[keep]) / np.sum(w), rtol=1e-5)


def test_dropout_draws_follow_the_round_key():
  """Each client fails with probability p (a binomial count over many rounds), from the round's key."""
  from fedkd.tasks.fedavg import draw_reported

  keys = jax.random.split(jax.random.key(3), 400)
  draws = np.stack([draw_reported(k, 0.3, 8) for k in keys])
  assert abs(draws.mean() - 0.7) < 4 * np.sqrt(0.7 * 0.3 / draws.size)
  np.testing.assert_array_equal(draw_reported(keys[5], 0.3, 8), draws[5])
  assert draw_reported(keys[5], 0.0, 8).all()
  assert not np.array_equal(draws[5], draws[6])


@pytest.mark.parametrize("server_tx", ["momentum", "adam"])
def test_a_round_in_which_nobody_reports_leaves_the_server_where_it_was(server_tx):
  """Client dropout: after a round where every client reported (the server optimizer now holds momentum /
  Adam moments), a round where none did leaves the server params and optimizer state bitwise as they were
  (no step on the zero aggregate), and only the round counter advances."""
  apply, params, loss_fn, xs, ys, weights = _data(seed=13, steps=2)
  tx = optax.sgd(1.0, momentum=0.9) if server_tx == "momentum" else optax.adam(0.01)
  fn, mesh, alg = _build(apply, loss_fn, 2, "vmap", server_tx=tx)
  bx, by, bw = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  everyone, nobody = (shard_clients(jnp.asarray(np.full(4, v)), mesh) for v in (True, False))
  # the initial state replicated on the mesh as the round returns it: both rounds run one compiled program
  state = replicate(alg.init(params, jax.random.key(0)), mesh)
  state, _, _ = fn(state, None, {"x": bx, "y": by, "reported": everyone}, bw)
  before = jax.tree.map(np.asarray, state)
  assert _max_diff(_tree_np(params), before["params"]) > 0  # the first round moved the model
  state, _, m = fn(state, None, {"x": bx, "y": by, "reported": nobody}, bw)
  assert int(state["round"]) == int(before["round"]) + 1 == 2 and bool(m["finite"])
  for key in ("params", "opt_state"):
    for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(state[key])):
      np.testing.assert_array_equal(a, np.asarray(b))
