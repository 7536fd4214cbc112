"""DP-FedAvg (fedkd.fl.dp): clipping against numpy, rounds of the jitted, sharded engine against a per-client
numpy loop (clip, sum, fixed denominator), the server noise's scale, stream and reproducibility, and the RDP
accountant's epsilon against the exact (analytic) epsilon of the Gaussian mechanism."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy.optimize import brentq
from scipy.stats import norm
from test_engine import LR, _setup, client_deltas

from fedkd.fl import algorithms, dp, engine
from fedkd.fl.algorithm import ClientContext, ClientOutput, init_rows
from fedkd.models import init_model
from fedkd.sharding import client_mesh, shard_clients

# (layout, devices, chunk) of the noiseless and the noisy rounds: the empty upload goes through every layout
NOISELESS = [("vmap", 2, 8), ("chunked", 1, 2)]  # chunked: 3 chunks of 2 clients on one device
NOISY = [("vmap", 2, 8), ("unroll", 6, 8)]
CLIENTS, BAD, EXPECTED = 6, 4, 8  # client BAD gets a NaN image; 8 expected clients, 6 present, 5 finite
Z = 1.5  # the noise multiplier of the noisy rounds


def _f64(tree):
  return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


def _norm(tree) -> float:
  return math.sqrt(sum(float(np.sum(a * a)) for a in _f64(tree)))


@functools.cache
def _problem():
  """The test_engine set-up with 6 clients (client BAD: a NaN image), the finite clients' numpy SGD deltas,
  a clip norm between the smallest two of their norms (one client below it, the others clipped) and the
  numpy DP-FedAvg update: (sum of the clipped deltas) / EXPECTED, the data-size weights ignored."""
  apply, params, loss_fn, xs, ys, weights = _setup(seed=2, clients=CLIENTS)
  xs = xs.copy()
  xs[BAD, 1, 0, 5, 5, 0] = np.nan
  finite = [c for c in range(CLIENTS) if c != BAD]
  deltas = dict(zip(finite, client_deltas(apply, loss_fn, params, xs[finite], ys[finite])))
  norms = {c: _norm(d) for c, d in deltas.items()}
  lo, second = sorted(norms.values())[:2]
  clip = 0.5 * (lo + second)
  clipped = {
    c: jax.tree.map(lambda a, c=c: np.asarray(a, np.float64) * min(1.0, clip / norms[c]), d) for c, d in deltas.items()
  }
  update = jax.tree.map(lambda *d: sum(d) / EXPECTED, *clipped.values())
  unclipped = jax.tree.map(lambda *d: sum(np.asarray(a, np.float64) for a in d) / EXPECTED, *deltas.values())
  return apply, params, loss_fn, xs, ys, weights, clip, norms, update, unclipped


@functools.cache
def _round_fn(layout, n_dev, chunk, z):
  apply, params, loss_fn, *_, clip, _, _, _ = _problem()
  alg = dp.DPFedAvg(algorithms.FedAvg(optax.sgd(1.0)), clip, z, EXPECTED)
  opts = engine.EngineOptions(layout, "xla", chunk, unroll_local_steps=False)
  mesh = client_mesh(n_dev)
  fn = engine.make_round_fn(alg, ClientContext(apply, loss_fn, optax.sgd(LR)), mesh, opts, skip_nonfinite=True)
  return fn, mesh, alg


def _dp_round(layout, n_dev, chunk, z, rng=0):
  """One DP round through the engine from the set-up's params -> (the update new - old as float64 leaves,
  metrics); ``rng``: the round key the task would put into ``server["rng"]``."""
  _, params, _, xs, ys, weights, *_ = _problem()
  fn, mesh, alg = _round_fn(layout, n_dev, chunk, z)
  state = alg.init(params, jax.random.key(123))
  state = dict(state, rng=jax.random.key_data(jax.random.key(rng)))
  batch, w = shard_clients(({"x": jnp.asarray(xs), "y": jnp.asarray(ys)}, jnp.asarray(weights)), mesh)
  state, _, metrics = fn(state, None, batch, w)
  update = [n - o for n, o in zip(_f64(state["params"]), _f64(params))]
  return update, jax.tree.map(np.asarray, metrics)


def _max_abs(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------- clipping


def test_clip_update_against_numpy():
  rng = np.random.default_rng(0)
  tree = {
    "a": rng.normal(size=(3, 4)).astype(np.float32),
    "b": [rng.normal(size=(5,)).astype(np.float32), np.arange(3, dtype=np.int32)],
    "c": rng.normal(size=(2, 2)).astype(jnp.bfloat16),
  }
  floats = [tree["a"], tree["b"][0], tree["c"]]
  ref_norm = math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in floats))
  for clip in (0.5 * ref_norm, 2.0 * ref_norm):
    got, got_norm = jax.jit(dp.clip_update, static_argnums=1)(tree, clip)
    assert got_norm.dtype == jnp.float32 and abs(float(got_norm) - ref_norm) < 1e-5 * ref_norm
    scale = min(1.0, clip / ref_norm)
    np.testing.assert_allclose(np.asarray(got["a"]), tree["a"] * scale, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got["b"][0]), tree["b"][0] * scale, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got["c"], np.float32), np.asarray(tree["c"], np.float32) * scale, rtol=1e-2)
    assert got["c"].dtype == jnp.bfloat16 and got["b"][1].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(got["b"][1]), tree["b"][1])  # integer leaves untouched
    if scale < 1:
      assert abs(_norm([got["a"], got["b"][0], got["c"]]) - clip) < 1e-2 * clip
  zeros = jax.tree.map(np.zeros_like, tree)
  got, got_norm = dp.clip_update(zeros, 1.0)
  assert float(got_norm) == 0.0 and all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(got))


# ------------------------------------------------------------------------------------------- rounds


def _check_metrics(metrics):
  *_, clip, norms, _, _ = _problem()
  finite = np.array([c != BAD for c in range(CLIENTS)])
  np.testing.assert_array_equal(metrics["client_finite"], finite)
  for c in range(CLIENTS):
    if c == BAD:
      continue
    assert abs(metrics["dp_norm"][c] - norms[c]) < 1e-4 * norms[c], c
    assert metrics["dp_clipped"][c] == float(norms[c] > clip), c
  assert 0 < int(metrics["dp_clipped"][finite].sum()) < finite.sum()  # some clients clipped, some not


@pytest.mark.parametrize("layout,n_dev,chunk", NOISELESS)
def test_noiseless_round_equals_per_client_clip_and_sum(layout, n_dev, chunk):
  """z = 0: the engine's round is params + (sum of the finite clients' clipped deltas) / EXPECTED (the NaN
  client dropped by skip_nonfinite, the data-size weights ignored, 6 clients present of 8 expected)."""
  *_, ref, unclipped = _problem()
  got, metrics = _dp_round(layout, n_dev, chunk, 0.0)
  ref = _f64(ref)
  scale = max(float(np.max(np.abs(r))) for r in ref)
  err = _max_abs(got, ref)
  assert err < 1e-3 * scale, (err, scale)
  assert _max_abs(_f64(unclipped), ref) > 30 * err  # clipping really acted, by far more than the tolerance
  _check_metrics(metrics)


def _noise_reference(rng, std):
  """The documented stream: P = (number of parameters) normals from fold_in(key, NOISE_STREAM), cut into the
  leaves in jax.tree.leaves order."""
  params = jax.tree.leaves(_problem()[1])
  key = jax.random.fold_in(jax.random.key(rng), dp.NOISE_STREAM)
  flat = std * np.asarray(jax.random.normal(key, (sum(p.size for p in params),), jnp.float32), np.float64)
  cuts = np.cumsum([p.size for p in params])[:-1]
  return [a.reshape(p.shape) for a, p in zip(np.split(flat, cuts), params)]


def test_noise_scale_stream_and_reproducibility():
  """With z > 0 the round moves by the noiseless update plus z C / m N(0, I): its std over every coordinate is
  z C / m (to sampling error), its mean ~0; it is the same in the vmap and unrolled layouts and on a repeated
  call, follows the documented key stream, and changes with the server's round key."""
  *_, clip, _, ref, _ = _problem()
  base, _ = _dp_round("vmap", 2, 8, 0.0)
  std = Z * clip / EXPECTED
  rounds = {layout: _dp_round(layout, n, k, Z) for layout, n, k in NOISY}
  noise = {layout: [g - b for g, b in zip(got, base)] for layout, (got, _) in rounds.items()}
  flat = np.concatenate([a.ravel() for a in noise["vmap"]])
  p = flat.size
  assert p > 1000
  # sample std of p normals: relative standard error 1/sqrt(2p) ~ 1.7%; 5 of those
  assert abs(flat.std() / std - 1) < 5 / math.sqrt(2 * p), flat.std() / std
  assert abs(flat.mean()) < 5 * std / math.sqrt(p)
  # the same noise in both layouts (up to the f32 sums' reduction order), bitwise on a repeated call
  assert _max_abs(noise["vmap"], noise["unroll"]) < 1e-3 * std
  again, _ = _dp_round("vmap", 2, 8, Z)
  for a, b in zip(again, rounds["vmap"][0]):
    np.testing.assert_array_equal(a, b)
  # the whole unrolled round against numpy: (sum of clipped deltas + the documented noise) / EXPECTED
  expected = [r + n / EXPECTED for r, n in zip(_f64(ref), _noise_reference(0, Z * clip))]
  assert _max_abs(rounds["unroll"][0], expected) < 1e-3 * std
  _check_metrics(rounds["unroll"][1])
  other = [g - b for g, b in zip(_dp_round("vmap", 2, 8, Z, rng=1)[0], base)]
  flat_other = np.concatenate([a.ravel() for a in other])
  assert abs(np.corrcoef(flat, flat_other)[0, 1]) < 0.15
  assert abs(flat_other.std() / std - 1) < 5 / math.sqrt(2 * p)


# ----------------------------------------------------------------------------------- wrapper contract


def test_wrapper_forwards_and_adds_metrics():
  """init / init_row / aggregator are the inner algorithm's; MOON's own metrics are kept next to dp_*."""
  model_cfg = ml_collections.ConfigDict(dict(name="unet", width=4, depth=1, groups=2, num_classes=3))
  apply, apply_wf, params = init_model(model_cfg, 0)
  _, _, loss_fn, xs, ys, _ = _setup(clients=1)
  inner = algorithms.Moon(optax.sgd(1.0), 0.5, 0.5)
  alg = dp.DPFedAvg(inner, 1.0, 1.0, 4)
  assert alg.aggregator == "mean" and alg.name == "moon+dp"
  state = alg.init(params, jax.random.key(0))
  assert set(state) == set(inner.init(params, jax.random.key(0)))
  row = jax.tree.map(lambda a: a[0], init_rows(alg, params, 1))
  ctx = ClientContext(apply, loss_fn, optax.sgd(LR), apply_wf=apply_wf)
  out = jax.eval_shape(lambda s, r, b: alg.client(ctx, s, r, b, None), state, row, {"x": xs[0], "y": ys[0]})
  assert out.upload == {} and set(out.metrics) == {"seg", "moon", "dp_norm", "dp_clipped"}
  assert jax.tree.structure(out.sums["sum"]) == jax.tree.structure(params)
  assert jax.tree.structure(out.row) == jax.tree.structure(row)


class _Fixed:
  """A stand-in inner algorithm: uploads a given delta with loss 1."""

  name, aggregator = "fixed", "mean"

  def __init__(self, upload):
    self.upload = upload

  def client(self, ctx, server, row, batch, gathered):
    return ClientOutput(upload=self.upload, loss=jnp.float32(1.0))


def test_nonfinite_delta_reports_a_nan_loss():
  """A NaN in the delta (with a finite loss) turns the loss NaN, so skip_nonfinite drops the client."""
  params = {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
  for value, finite in ((jnp.nan, False), (0.5, True)):
    alg = dp.DPFedAvg(_Fixed({"w": jnp.array([0.0, value, 0.0]), "b": jnp.float32(0.0)}), 1.0, 0.0, 2)
    out = alg.client(None, {"params": params}, None, {}, None)
    assert bool(jnp.isfinite(out.loss)) == finite and float(out.sums["reported"]) == 1.0


class _Median(algorithms.FedAvg):
  aggregator = "median"


def test_errors():
  apply, params, loss_fn, xs, ys, _ = _setup(clients=1)
  sgd = optax.sgd(1.0)
  with pytest.raises(ValueError, match="'mean' aggregator"):
    dp.DPFedAvg(_Median(sgd), 1.0, 1.0, 4)
  for kw in (dict(clip_norm=0.0), dict(noise_multiplier=-1.0), dict(expected_clients=0)):
    with pytest.raises(ValueError, match=next(iter(kw))):
      dp.DPFedAvg(algorithms.FedAvg(sgd), **{**dict(clip_norm=1.0, noise_multiplier=1.0, expected_clients=4), **kw})
  ctx = ClientContext(apply, loss_fn, optax.sgd(LR))
  batch = {"x": xs[0], "y": ys[0]}
  # SCAFFOLD returns client sums, FedNova uploads {d, tau}: both refused when the client is traced
  for inner, needle in ((algorithms.Scaffold(sgd, LR, 4), "sums"), (algorithms.FedNova(sgd), "model delta")):
    alg = dp.DPFedAvg(inner, 1.0, 1.0, 4)
    state = alg.init(params, jax.random.key(0))
    rows = init_rows(alg, params, 1)
    row = None if rows is None else jax.tree.map(lambda a: a[0], rows)
    with pytest.raises(ValueError, match=needle):
      jax.eval_shape(lambda s, r, b, alg=alg: alg.client(ctx, s, r, b, None), state, row, batch)
  with pytest.raises(ValueError, match="clients_per_round"):
    dp.epsilon(1.0, 10, 11, 5, 1e-5)
  with pytest.raises(ValueError, match="delta"):
    dp.epsilon(1.0, 10, 5, 5, 0.0)


# ------------------------------------------------------------------------------------------ accounting


def _exact_gaussian_epsilon(s: float, delta: float) -> float:
  """The exact epsilon at ``delta`` of one Gaussian mechanism with noise multiplier ``s`` (noise std over
  the L2 sensitivity), Balle & Wang 2018: delta(eps) = Phi(-eps s + 1/(2s)) - e^eps Phi(-eps s - 1/(2s))."""
  f = lambda e: norm.cdf(-e * s + 1 / (2 * s)) - math.exp(e + norm.logcdf(-e * s - 1 / (2 * s))) - delta
  return brentq(f, 0.0, 1000.0, xtol=1e-12)


@pytest.mark.parametrize("z,rounds,delta", [(1.0, 1, 1e-5), (4.0, 16, 1e-5), (8.0, 25, 1e-6), (12.0, 4, 1e-5)])
def test_full_participation_epsilon_vs_exact_gaussian(z, rounds, delta):
  """Every client every round: replacing one client moves the clipped sum by up to 2C, so a round is a
  Gaussian mechanism with multiplier z C / (2C) = z / 2, and T of them compose to one with multiplier
  z / (2 sqrt(T)). The RDP epsilon upper-bounds that mechanism's exact epsilon and is within 25% of it."""
  exact = _exact_gaussian_epsilon(z / 2 / math.sqrt(rounds), delta)
  got = dp.epsilon(z, 20, 20, rounds, delta)
  assert exact <= got <= 1.25 * exact, (got, exact)


def test_subsampled_epsilon_is_monotone_and_max_rounds_is_consistent():
  z, n, delta = 1.0, 100, 1e-5
  by_rate = [dp.epsilon(z, n, m, 50, delta) for m in (100, 90, 20, 10)]
  # fewer clients per round: more amplification; sampling never costs privacy (at 90 of 100 the
  # without-replacement bound alone would exceed full participation's)
  assert by_rate[0] >= by_rate[1] > by_rate[2] > by_rate[3] > 0
  assert dp.epsilon(z, n, 10, 20, delta) < dp.epsilon(z, n, 10, 50, delta)  # more rounds: more epsilon
  assert dp.epsilon(z, n, 10, 0, delta) == 0.0 and dp.epsilon(0.0, n, 10, 3, delta) == math.inf
  target = dp.epsilon(z, n, 10, 20, delta) * 1.5
  r = dp.max_rounds(target, z, n, 10, delta, limit=64)
  assert 20 < r < 64
  assert dp.epsilon(z, n, 10, r, delta) <= target < dp.epsilon(z, n, 10, r + 1, delta)
  assert dp.max_rounds(1e9, z, n, 10, delta, limit=37) == 37
  assert dp.max_rounds(target, 0.0, n, 10, delta, limit=400) == 0
  assert "RDP" in dp.ACCOUNTING and "without replacement" in dp.ACCOUNTING


def test_an_attackers_upload_is_clipped_like_any_other(tmp_path):
  """The clip bounds every upload the server sums, an attacker's included (docs/algorithms.md): a noiseless DP
  round of the tiny run in which client 0 sends -1e4 x its delta moves the model by at most C (the mean of m
  uploads of norm <= C: the triangle inequality), while that attacker's raw upload alone would move it far more."""
  from fedkd.evaluate import load_run
  from fedkd.tasks import fedavg
  from test_training import tiny_config

  c = tiny_config(num_rounds=1, clients_per_round=4)
  c.checkpoint.every, c.eval.max_sites = 1, 0
  c.dp.enabled, c.dp.noise_multiplier, c.dp.clip_norm = True, 0.0, 0.01
  c.attack.name, c.attack.factor, c.attack.fraction = "scale", -1e4, 0.25  # client 0 of 4, sampled every round
  fedavg.run(c, str(tmp_path / "run"), log=lambda _: None)
  _, _, params, r = load_run(str(tmp_path / "run"), None)
  _, _, start = init_model(c.model, c.seed)
  leaves = jax.tree.leaves

  def distance(tree):
    return math.sqrt(
      sum(float(np.sum((np.float64(a) - np.float64(b)) ** 2)) for a, b in zip(leaves(tree), leaves(start)))
    )

  moved = distance(params)
  assert r == 1 and 0 < moved <= c.dp.clip_norm * (1 + 1e-4), moved
  # the same round without DP: nothing bounds the attacker's upload, and the model moves over 100 C
  c.dp.enabled = False
  fedavg.run(c, str(tmp_path / "raw"), log=lambda _: None)
  _, _, raw, _ = load_run(str(tmp_path / "raw"), None)
  raw_moved = distance(raw)
  assert raw_moved > 100 * c.dp.clip_norm, raw_moved
