"""Robust aggregators (fedkd.fl.aggregate) inside a shard_map over 1 and 8 devices against numpy, and
one FedAvg round with the coordinate-wise median through the engine against a per-client loop."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from fedkd.fl import aggregate, algorithms, attacks, engine
from fedkd.fl.aggregate import KINDS, Krum, Median, MultiKrum, NormClip, TrimmedMean, make_aggregator
from fedkd.fl.algorithm import ClientContext
from fedkd.losses import make_segmentation_loss
from fedkd.models import init_params
from fedkd.sharding import CLIENTS, client_mesh, shard_clients
import test_engine

C = 16  # clients of the round: 16 on 1 device, 2 per device on 8


def _uploads(seed=0, clients=C):
  """Random client updates: a pytree of 3 float32 leaves whose sizes (15, 7, 12) are not multiples of 8."""
  rng = np.random.default_rng(seed)
  return {
    "a": rng.normal(size=(clients, 3, 5)).astype(np.float32),
    "b": {"c": rng.normal(size=(clients, 7)).astype(np.float32) * 3.0},
    "d": rng.normal(size=(clients, 2, 2, 3)).astype(np.float32) + 1.0,
  }


def _weights(zeros=(1, 6, 11), clients=C):
  w = np.arange(1, clients + 1, dtype=np.float32)
  w[list(zeros)] = 0.0
  return w


def _aggregate(agg, uploads, weights, n_dev):
  """``agg`` as the engine calls it: in a shard_map over ``n_dev`` devices, the clients split over them."""
  mesh = client_mesh(n_dev)

  def body(u, w):
    total = jax.lax.psum(jnp.sum(w), CLIENTS)
    if agg.linear:
      return agg.finish(agg.partial(u, w), total)
    return agg.finish(u, total, None, w)

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(CLIENTS), P(CLIENTS)), out_specs=P()))
  out = fn(*shard_clients((jax.tree.map(jnp.asarray, uploads), jnp.asarray(weights)), mesh))
  return jax.tree.map(np.asarray, out)


def _per_leaf(fn, uploads, weights):
  keep = np.asarray(weights) > 0
  return jax.tree.map(lambda u: fn(u[keep].astype(np.float64)), uploads)


def _flat(uploads):
  """[C, P] float64: each client's update, every leaf flattened."""
  return np.concatenate([np.asarray(u, np.float64).reshape(u.shape[0], -1) for u in jax.tree.leaves(uploads)], 1)


def _close(got, ref, tol=1e-5):
  assert jax.tree.structure(got) == jax.tree.structure(ref)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert g.dtype == np.float32 and g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=tol, atol=tol)


def _trimmed_np(beta):
  def fn(u):
    m = u.shape[0]
    t = math.floor(beta * m)
    return np.sort(u, axis=0)[t : m - t].mean(axis=0)

  return fn


def _krum_np(uploads, weights, f, k):
  """Brute force: score_i = sum of the m - f - 2 smallest squared distances to the other counting clients."""
  x = _flat(uploads)
  ids = [i for i in range(len(weights)) if weights[i] > 0]
  m = len(ids)
  scores = []
  for i in ids:
    d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in ids if j != i)
    scores.append(sum(d[: m - f - 2]))
  best = [ids[j] for j in np.argsort(scores, kind="stable")[:k]]
  return jax.tree.map(lambda u: np.asarray(u, np.float64)[best].mean(axis=0), uploads), best


@pytest.mark.parametrize("n_dev", [1, 8])
@pytest.mark.parametrize("zeros", [(1, 6, 11), (0, 5, 9, 15)])  # m = 13 (odd) and 12 (even)
def test_median(n_dev, zeros):
  uploads, weights = _uploads(1), _weights(zeros)
  _close(_aggregate(Median(), uploads, weights, n_dev), _per_leaf(lambda u: np.median(u, axis=0), uploads, weights))


@pytest.mark.parametrize("n_dev", [1, 8])
@pytest.mark.parametrize("beta", [0.0, 0.2, 0.45])
def test_trimmed_mean(n_dev, beta):
  uploads, weights = _uploads(2), _weights()
  got = _aggregate(TrimmedMean(beta), uploads, weights, n_dev)
  _close(got, _per_leaf(_trimmed_np(beta), uploads, weights))


@pytest.mark.parametrize("n_dev", [1, 8])
def test_krum(n_dev):
  uploads, weights = _uploads(3), _weights()
  ref, best = _krum_np(uploads, weights, f=3, k=1)
  got = _aggregate(Krum(f=3), uploads, weights, n_dev)
  _close(got, ref, tol=0)  # Krum returns one client's upload exactly
  assert weights[best[0]] > 0


@pytest.mark.parametrize("n_dev", [1, 8])
@pytest.mark.parametrize("f,k", [(2, 4), (3, None)])
def test_multi_krum(n_dev, f, k):
  uploads, weights = _uploads(4), _weights()
  m = int(np.sum(weights > 0))
  ref, _ = _krum_np(uploads, weights, f=f, k=m - f if k is None else k)
  _close(_aggregate(MultiKrum(f=f, k=k), uploads, weights, n_dev), ref)


def test_krum_scores_sum_the_nearest_other_counting_clients():
  """Each counting client's score is the sum of its m - f - 2 (at least 1, at most m - 1) smallest squared
  distances to the OTHER counting clients (its own distance 0 is not a neighbour), +inf for the others; against a
  loop over random symmetric distances with 3 of 9 clients not counting, for f = 0 .. 5."""
  rng = np.random.default_rng(0)
  d = rng.uniform(1.0, 10.0, (9, 9))
  d = d + d.T
  np.fill_diagonal(d, 0.0)
  counting = np.ones(9, bool)
  counting[[1, 4, 7]] = False
  ids = np.flatnonzero(counting)
  m = len(ids)
  for f in range(6):
    got = np.asarray(aggregate.krum_scores(jnp.asarray(d, jnp.float32), jnp.asarray(counting), f))
    for i in range(9):
      if not counting[i]:
        assert got[i] == np.inf
        continue
      near = sorted(d[i, j] for j in ids if j != i)
      np.testing.assert_allclose(got[i], sum(near[: min(max(m - f - 2, 1), m - 1)]), rtol=1e-6)


def test_krum_rejects_outliers():
  """Three far-away attackers: Krum and multi-Krum pick honest clients, the median ignores them."""
  uploads, weights = _uploads(5), _weights(zeros=())
  bad = [2, 9, 14]
  for leaf in jax.tree.leaves(uploads):
    leaf[bad] = 100.0
  honest = [i for i in range(C) if i not in bad]
  krum = _aggregate(Krum(f=3), uploads, weights, 8)
  assert any(
    all(np.array_equal(a, leaf[i]) for a, leaf in zip(jax.tree.leaves(krum), jax.tree.leaves(uploads))) for i in honest
  )
  multi = _aggregate(MultiKrum(f=3), uploads, weights, 8)
  assert all(np.max(np.abs(a)) < 20 for a in jax.tree.leaves(multi))
  median = _aggregate(Median(), uploads, weights, 8)
  assert all(np.max(np.abs(a)) < 20 for a in jax.tree.leaves(median))


@pytest.mark.parametrize("n_dev", [1, 8])
def test_norm_clip(n_dev):
  uploads, weights = _uploads(6), _weights()
  norms = np.linalg.norm(_flat(uploads), axis=1)
  clip = float(np.median(norms))  # about half the clients are clipped
  scale = np.minimum(1.0, clip / norms)
  w = weights * scale / weights.sum()
  ref = jax.tree.map(lambda u: np.tensordot(w, np.asarray(u, np.float64), axes=1), uploads)
  _close(_aggregate(NormClip(clip), uploads, weights, n_dev), ref)
  # a clip above every norm is the plain weighted mean
  mean = jax.tree.map(lambda u: np.tensordot(weights / weights.sum(), np.asarray(u, np.float64), axes=1), uploads)
  _close(_aggregate(NormClip(float(norms.max()) * 2), uploads, weights, n_dev), mean)


def test_no_counting_client_gives_zeros():
  uploads, weights = _uploads(7), np.zeros(C, np.float32)
  for agg in (Median(), TrimmedMean(0.2), Krum(1), MultiKrum(1)):
    got = _aggregate(agg, uploads, weights, 8)
    assert all(np.all(a == 0) for a in jax.tree.leaves(got)), agg


@pytest.mark.parametrize("n_dev", [1, 8])
def test_nonfinite_clients_do_not_count(n_dev):
  """A client whose upload holds NaN or Inf is dropped like a zero-weight one."""
  uploads, weights = _uploads(12), _weights()
  uploads["a"][4, 1, 2] = np.nan
  uploads["b"]["c"][13, 0] = np.inf
  dropped = weights.copy()
  dropped[[4, 13]] = 0.0
  clean = jax.tree.map(lambda u: np.where(np.isfinite(u), u, 0.0).astype(np.float32), uploads)
  _close(_aggregate(Median(), uploads, weights, n_dev), _per_leaf(lambda u: np.median(u, axis=0), clean, dropped))
  _close(_aggregate(TrimmedMean(0.2), uploads, weights, n_dev), _per_leaf(_trimmed_np(0.2), clean, dropped))
  _close(_aggregate(MultiKrum(f=2, k=4), uploads, weights, n_dev), _krum_np(clean, dropped, f=2, k=4)[0])


def test_without_all_gather_invariant(monkeypatch):
  """The fallback for JAX releases without all_gather_invariant (all_gather + pmax) gives the same result."""
  monkeypatch.setattr(aggregate, "_all_gather_invariant", None)
  uploads, weights = _uploads(8), _weights()
  _close(_aggregate(Median(), uploads, weights, 8), _per_leaf(lambda u: np.median(u, axis=0), uploads, weights))


def test_make_aggregator():
  assert set(KINDS) == {"mean", "gossip", "median", "trimmed_mean", "krum", "multi_krum", "norm_clip"}
  assert make_aggregator("mean") is aggregate.Mean
  assert make_aggregator("trimmed_mean", beta=0.25).beta == 0.25
  assert (make_aggregator("krum", f=2).f, make_aggregator("krum", f=2).k) == (2, 1)
  assert make_aggregator("multi_krum", f=2, k=5).k == 5
  assert make_aggregator("norm_clip", clip=0.5).clip == 0.5
  assert repr(make_aggregator("median")) == "median()"
  for name in KINDS:
    agg = make_aggregator(name)
    assert agg.linear == (name in ("mean", "norm_clip")) and agg.per_client == (name == "gossip")
  with pytest.raises(ValueError, match="unknown aggregator"):
    make_aggregator("mode")
  with pytest.raises(ValueError):
    make_aggregator("trimmed_mean", beta=0.5)
  with pytest.raises(ValueError):
    make_aggregator("norm_clip", clip=0.0)
  with pytest.raises(TypeError):
    make_aggregator("mean", beta=0.1)
  assert isinstance(aggregate.AGGREGATORS["median"], Median)  # an algorithm may name it: aggregator = "median"


# --- end to end: one FedAvg round with the median through the engine ------------------------------------

S, B, H, LR = 2, 2, 16, 0.05


def _problem(seed, clients):
  """A one-level UNet, the segmentation loss and ``clients`` clients' random batches [clients, S, B, H, H]."""
  model_cfg = ml_collections.ConfigDict(dict(name="unet", width=4, depth=1, groups=2, num_classes=3))
  apply, params = init_params(model_cfg, 0)
  loss_fn = make_segmentation_loss(ml_collections.ConfigDict(dict(ce_weight=0.5, dice_weight=0.5)))
  kx, ky = jax.random.split(jax.random.key(seed))
  xs = np.asarray(jax.random.normal(kx, (clients, S, B, H, H, 1)))
  ys = np.asarray(jax.random.randint(ky, (clients, S, B, H, H), 0, 3))
  return apply, params, loss_fn, xs, ys


def _deltas(apply, loss_fn, params, xs, ys):
  """Each client trained on its own with plain SGD (tests/test_engine.py's per-client loop): its delta."""
  assert LR == test_engine.LR
  return test_engine.client_deltas(apply, loss_fn, params, xs, ys)


@pytest.mark.parametrize("layout,n_dev,chunk", [("vmap", 4, 8), ("chunked", 1, 3)])
def test_fedavg_round_with_median(layout, n_dev, chunk):
  """The median of the counting clients' deltas; a client with a NaN image (5) does not count, and neither its
  loss nor anything else makes the round non-finite (the run would stop: the median already left it out)."""
  clients = 8
  apply, params, loss_fn, xs, ys = _problem(1, clients)
  xs = xs.copy()
  xs[5, 1, 0, 2, 2, 0] = np.nan
  weights = np.array([5, 1, 0, 8, 2, 2, 7, 4], np.float32)  # client 2 does not count, nor NaN client 5: m = 6

  alg = algorithms.FedAvg(optax.sgd(1.0))
  alg.aggregator = Median()
  mesh = client_mesh(n_dev)
  opts = engine.EngineOptions(layout, "xla", chunk, unroll_local_steps=False)
  fn = engine.make_round_fn(alg, ClientContext(apply, loss_fn, optax.sgd(LR)), mesh, opts)
  state = alg.init(params, jax.random.key(0))
  sx, sy, sw = shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(weights)), mesh)
  state, _, metrics = fn(state, None, {"x": sx, "y": sy}, sw)

  deltas = _deltas(apply, loss_fn, params, xs, ys)
  keep = [i for i in range(clients) if weights[i] > 0 and i != 5]
  median = jax.tree.map(lambda *d: np.median(np.stack([d[i] for i in keep]), axis=0), *deltas)
  ref = jax.tree.map(lambda p, d: np.asarray(p) + d, params, median)
  got = jax.tree.map(np.asarray, state["params"])
  assert jax.tree.structure(ref) == jax.tree.structure(got)
  err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
  assert err < 2e-5
  moved = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)))
  assert moved > 1e-3
  # the median is not the weighted mean (the aggregator object was really used)
  w = weights / weights.sum()
  mean = jax.tree.map(lambda *d: sum(w[i] * d[i] for i in keep), *deltas)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(median))) > 1e-4
  assert bool(metrics["finite"])
  np.testing.assert_array_equal(np.asarray(metrics["client_finite"]), np.arange(clients) != 5)
  losses = np.asarray(metrics["client_loss"], np.float64)
  assert np.isnan(losses[5]) and np.isfinite(losses[keep]).all()
  np.testing.assert_allclose(float(metrics["loss"]), weights[keep] @ losses[keep] / weights[keep].sum(), rtol=1e-5)


def test_a_robust_run_whose_every_client_diverged_names_the_aggregator_not_skip_nonfinite_clients():
  """The stop of a run with a robust aggregator that dropped every client: its advice is not the
  engine.skip_nonfinite_clients=True that validation refuses with a robust aggregator."""
  from fedkd.config import ConfigError, base_config, validate
  from fedkd.tasks.fedavg import _diverged

  c = base_config()
  c.aggregator.name = "median"
  m = {"loss": float("nan"), "client_finite": np.zeros(4, bool)}
  msg = str(_diverged(3, m, np.arange(4), c, 2, "/w/checkpoints", counted=False))
  assert "loss none, non-finite updates from client(s) [0, 1, 2, 3] of 4" in msg
  assert "(aggregator.name='median' dropped every reporting client)" in msg and "skip_nonfinite" not in msg
  c.engine.skip_nonfinite_clients = True
  with pytest.raises(ConfigError, match="skip_nonfinite_clients=True needs a linear aggregator"):
    validate(c, 8)
  c.aggregator.name, c.engine.skip_nonfinite_clients = "mean", False
  msg = str(_diverged(3, m, np.arange(4), c, 2, "/w", False))  # every client counted: the mean loss is NaN
  assert "loss nan, non-finite updates" in msg and "set --config.engine.skip_nonfinite_clients=True" in msg


# --- attacks (fedkd.fl.attacks) on the uploads of a set of clients, inside the shard_map -----------------

ATTACKERS = (3, 10, 12)


def _attacked(attack, uploads, n_dev, key=None):
  mesh = client_mesh(n_dev)

  def body(u, k):
    n = jax.tree.leaves(u)[0].shape[0]
    return attack(u, attacks.device_client_ids(n), k)

  k = jax.random.key(0) if key is None else key
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(CLIENTS), P()), out_specs=P(CLIENTS)))
  return jax.tree.map(np.asarray, fn(shard_clients(jax.tree.map(jnp.asarray, uploads), mesh), k))


def _expected(uploads, fn):
  """numpy: ``fn`` applied to the attackers' rows, the others unchanged."""

  def leaf(u):
    out = np.array(u)
    out[list(ATTACKERS)] = fn(out[list(ATTACKERS)])
    return out

  return jax.tree.map(leaf, uploads)


@pytest.mark.parametrize("n_dev", [1, 8])
def test_sign_flip_and_scale(n_dev):
  uploads = _uploads(9)
  got = _attacked(attacks.make_attack("sign_flip", ATTACKERS), uploads, n_dev)
  _close(got, _expected(uploads, lambda u: -u), tol=0)
  got = _attacked(attacks.make_attack("scale", ATTACKERS), uploads, n_dev)
  _close(got, _expected(uploads, lambda u: np.float32(-10.0) * u), tol=0)
  got = _attacked(attacks.make_attack("scale", ATTACKERS, factor=3.0), uploads, n_dev)
  _close(got, _expected(uploads, lambda u: np.float32(3.0) * u), tol=0)


@pytest.mark.parametrize("additive", [False, True])
def test_gaussian_attack(additive):
  uploads, key, std = _uploads(10), jax.random.key(7), 0.5
  attack = attacks.make_attack("gaussian", ATTACKERS, std=std, additive=additive)
  got = {n: _attacked(attack, uploads, n, key) for n in (1, 8)}
  _close(got[8], got[1], tol=0)  # the noise does not depend on the split over devices
  leaves = jax.tree.leaves(uploads)
  ref = jax.tree.map(np.array, uploads)
  ref_leaves = jax.tree.leaves(ref)
  for i in ATTACKERS:
    for index, u in enumerate(leaves):
      noise = std * np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), index), u.shape[1:]))
      ref_leaves[index][i] = u[i] + noise if additive else noise
  _close(got[8], ref)
  # the noise has the asked scale and differs between attackers
  big = {"w": np.zeros((C, 4000), np.float32)}
  noisy = _attacked(attacks.make_attack("gaussian", ATTACKERS, std=std), big, 8, key)["w"]
  assert abs(float(noisy[list(ATTACKERS)].std()) - std) < 0.02
  assert not np.allclose(noisy[3], noisy[10])
  assert np.all(noisy[[i for i in range(C) if i not in ATTACKERS]] == 0)


def test_attacked_round_median_and_krum_hold():
  """Scaled (x -10) attackers drag the mean away; the median and Krum stay near the honest mean."""
  uploads = {"w": np.random.default_rng(11).normal(1.0, 0.1, size=(C, 50)).astype(np.float32)}
  weights = np.ones(C, np.float32)
  bad = _attacked(attacks.make_attack("scale", ATTACKERS), uploads, 8)
  honest = np.delete(uploads["w"], ATTACKERS, axis=0).mean(axis=0)
  mean = _aggregate(aggregate.Mean, bad, weights, 8)["w"]
  assert np.max(np.abs(mean - honest)) > 1.0
  for agg in (Median(), TrimmedMean(0.2), Krum(f=3), MultiKrum(f=3)):
    assert np.max(np.abs(_aggregate(agg, bad, weights, 8)["w"] - honest)) < 0.5, agg


def test_make_attack():
  assert set(attacks.ATTACKS) == {"sign_flip", "scale", "gaussian"}
  with pytest.raises(ValueError, match="unknown attack"):
    attacks.make_attack("label_flip", (0,))
  with pytest.raises(TypeError):
    attacks.make_attack("sign_flip", (0,), factor=2.0)
  with pytest.raises(ValueError, match="needs a key"):
    attacks.make_attack("gaussian", (0,))(_uploads(0), jnp.arange(C))
  # outside a shard_map: ids = arange(n); a non-floating leaf is left alone
  tree = {"x": jnp.ones((4, 2)), "n": jnp.arange(4)}
  out = attacks.make_attack("sign_flip", (1,))(tree, jnp.arange(4))
  np.testing.assert_array_equal(out["x"][:, 0], [1, -1, 1, 1])
  np.testing.assert_array_equal(out["n"], np.arange(4))
  assert not bool(jnp.any(attacks.attacker_mask(jnp.arange(4), ())))


# --- the wrapper the fedavg task uses: attacker clients flagged in the batch, inside the one round --------


@pytest.mark.parametrize("layout,n_dev,chunk", [("vmap", 2, 8), ("chunked", 1, 2)])
def test_attacked_fedavg_round_with_trimmed_mean(layout, n_dev, chunk):
  """Clients 1 and 6 (flagged by batch['attacker']) send 10 x their delta negated; the server takes the
  trimmed mean (beta 0.25: 2 dropped at each end of 8): equal to numpy on the per-client loop's deltas."""
  clients = 8
  apply, params, loss_fn, xs, ys = _problem(2, clients)
  flags = np.zeros(clients, bool)
  flags[[1, 6]] = True

  inner = algorithms.FedAvg(optax.sgd(1.0))
  inner.aggregator = TrimmedMean(0.25)
  alg = attacks.Attacked(inner, attacks.make_attack("scale", (), factor=-10.0))
  mesh = client_mesh(n_dev)
  opts = engine.EngineOptions(layout, "xla", chunk, unroll_local_steps=False)
  fn = engine.make_round_fn(alg, ClientContext(apply, loss_fn, optax.sgd(LR)), mesh, opts)
  state = alg.init(params, jax.random.key(0))
  batch = dict(
    zip(
      ("x", "y", "attacker", "client_id"),
      shard_clients((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(flags), jnp.arange(clients)), mesh),
    )
  )
  state, _, _ = fn(state, None, batch, shard_clients(jnp.ones(clients), mesh))

  deltas = _deltas(apply, loss_fn, params, xs, ys)
  sent = [jax.tree.map(lambda d: -10.0 * d, d) if flags[i] else d for i, d in enumerate(deltas)]
  trimmed = jax.tree.map(lambda *d: np.sort(np.stack(d), axis=0)[2:-2].mean(axis=0), *sent)
  ref = jax.tree.map(lambda p, d: np.asarray(p) + d, params, trimmed)
  err = max(
    float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state["params"]))
  )
  assert err < 2e-5
  honest = jax.tree.map(lambda *d: np.mean(np.stack(d), axis=0), *sent)  # what the plain mean would take
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(honest), jax.tree.leaves(trimmed))) > 1e-3
