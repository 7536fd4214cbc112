"""DP-FedAvg at the edges (fedkd.fl.dp): the update norm and the clipping of finite updates with entries near
the float32 maximum against numpy, and the accountant at scale (up to 10^6 rounds, one client of 10^6 per
round to every client every round, noise 0.3 to 50, delta 1e-3 to 1e-12) against dp_accounting itself, with
the per-round epsilon and max_rounds' search cheap enough for every round of a run."""

import math
import time
import warnings

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedkd.fl import dp
from test_compress import _topk_np
from test_dp import _Fixed

# ------------------------------------------------------------------------------------- norms and clipping


def _np_norm(tree) -> float:
  return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in jax.tree.leaves(tree)))


@pytest.mark.parametrize("big", [1e20, 1e37, 1e38, 1.5e38, 2e38, 3e38])
def test_norm_and_clip_of_huge_finite_updates(big):
  """A finite update whose largest entry is near the float32 maximum (2^126 = 8.5e37 and above) has its
  norm (numpy's, in float64), is clipped into the C-ball and counts as finite; eagerly and under jit."""
  upload = {"w": jnp.array([big, 1.0, -2.0], jnp.float32), "b": jnp.full((2, 2), 0.5, jnp.float32)}
  params = jax.tree.map(jnp.zeros_like, upload)
  ref = _np_norm(upload)
  clip = 0.1
  alg = dp.DPFedAvg(_Fixed(upload), clip, 0.0, 2)
  for run in (lambda f, x: f(x), lambda f, x: jax.jit(f)(x)):
    norm = float(run(dp.global_norm, upload))
    assert norm == pytest.approx(ref, rel=1e-6)
    out = run(lambda p: alg.client(None, {"params": p}, None, {}, None), params)
    assert float(out.metrics["dp_norm"]) == pytest.approx(ref, rel=1e-6)
    assert float(out.metrics["dp_clipped"]) == 1.0 and math.isfinite(float(out.loss))
    assert _np_norm(out.sums["sum"]) <= clip * (1 + 1e-6)


def test_norm_above_the_float32_maximum_is_inf_and_the_client_counts_as_non_finite():
  upload = {"w": jnp.full((4,), 3e38, jnp.float32)}  # norm 6e38: not a float32
  assert float(jax.jit(dp.global_norm)(upload)) == math.inf
  out = dp.DPFedAvg(_Fixed(upload), 1.0, 0.0, 2).client(None, {"params": upload}, None, {}, None)
  assert math.isnan(float(out.loss)) and _np_norm(out.sums["sum"]) <= 1.0


# ------------------------------------------------------------------------------------------ accounting


def _accountant_epsilon(z, n, m, rounds, delta):
  """dp_accounting's RDP epsilon, REPLACE_ONE, multiplier z / 2: m of n sampled without replacement or
  unsampled, whichever is smaller (only unsampled when m = n)."""

  def eps(event):
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      return float(acc.get_epsilon(delta))

  gauss = dp_accounting.GaussianDpEvent(z / 2)
  if m == n:
    return eps(gauss)
  return min(eps(gauss), eps(dp_accounting.SampledWithoutReplacementDpEvent(n, m, gauss)))


# (z, N, m, delta): a tiny and a moderate sampling rate, every client every round, low to high noise
SCALE = [(0.3, 10**6, 1, 1e-12), (1.0, 10_000, 32, 1e-5), (50.0, 10_000, 32, 1e-3), (5.0, 20, 20, 1e-12)]


@pytest.mark.parametrize("z,n,m,delta", SCALE)
def test_epsilon_equals_dp_accounting_up_to_a_million_rounds(z, n, m, delta):
  """Bitwise dp_accounting's number at 10^4, 10^5 and 10^6 rounds, growing with the rounds."""
  got = [dp.epsilon(z, n, m, r, delta) for r in (10**4, 10**5, 10**6)]
  assert got == [_accountant_epsilon(z, n, m, r, delta) for r in (10**4, 10**5, 10**6)]
  assert got[0] <= got[1] <= got[2]


def test_per_round_epsilon_and_max_rounds_are_fast():
  """A run asks for epsilon after every round (rounds.jsonl) and for max_rounds at its start: after the first
  call of a (z, N, m), a new round count costs milliseconds, not the accountant's 0.2-1 s."""
  z, n, m, delta = 0.9, 10_000, 32, 1e-5  # not used elsewhere: nothing cached
  dp.epsilon(z, n, m, 1, delta)
  t0 = time.perf_counter()
  got = [dp.epsilon(z, n, m, r, delta) for r in range(2, 22)]
  seconds = time.perf_counter() - t0
  assert seconds < 1.0, seconds  # dp_accounting alone: about 20 x 0.5 s
  assert got[0] == _accountant_epsilon(z, n, m, 2, delta) and got[-1] == _accountant_epsilon(z, n, m, 21, delta)
  target = got[-1]
  t0 = time.perf_counter()
  r = dp.max_rounds(target, z, n, m, delta, limit=10**6)
  assert time.perf_counter() - t0 < 2.0
  assert r == 21
  assert dp.epsilon(z, n, m, r + 1, delta) == _accountant_epsilon(z, n, m, r + 1, delta) > target


# ------------------------------------------------------------------------------- compression inside DP


def test_dp_clips_the_compressed_upload():
  """As the training task builds it (DPFedAvg around Compressed), a client compresses first and clips what
  it would send: top-k (with error feedback) of update + residual, then scaled into the C-ball (numpy);
  the residual keeps what top-k left out, unclipped. int8: the decoded upload, clipped, within C."""
  from fedkd.fl import compress

  rng = np.random.default_rng(0)
  upload = {
    "w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
  }
  residual = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in upload.items()}
  server = {"params": jax.tree.map(jnp.zeros_like, upload), "rng": jax.random.key_data(jax.random.key(0)), "round": 0}
  clip = 0.5
  alg = dp.DPFedAvg(compress.Compressed(_Fixed(upload), "topk", 0.2), clip, 0.0, 4)
  out = alg.client(None, server, {"residual": residual}, {"client_id": jnp.int32(3)}, None)
  v = {k: np.asarray(upload[k], np.float64) + np.asarray(residual[k], np.float64) for k in upload}
  sent = {"w": _topk_np(v["w"], 6), "b": _topk_np(v["b"], 2)}  # ceil(0.2 * 30), ceil(0.2 * 7)
  factor = min(1.0, clip / _np_norm(sent))
  assert factor < 1  # clipping acts
  for k in upload:
    np.testing.assert_allclose(np.asarray(out.sums["sum"][k]), sent[k] * factor, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out.row["residual"][k]), v[k] - sent[k], rtol=1e-5, atol=1e-6)
  assert float(out.metrics["dp_norm"]) == pytest.approx(_np_norm(sent), rel=1e-5)

  alg = dp.DPFedAvg(compress.Compressed(_Fixed(upload), "int8"), clip, 0.0, 4)
  out = alg.client(None, server, None, {"client_id": jnp.int32(3)}, None)
  decoded = compress.Compressed(_Fixed(upload), "int8").client(None, server, None, {"client_id": jnp.int32(3)}, None)
  norm = _np_norm(decoded.upload)
  assert float(out.metrics["dp_norm"]) == pytest.approx(norm, rel=1e-5) and norm > clip
  for k in upload:
    np.testing.assert_allclose(np.asarray(out.sums["sum"][k]), np.asarray(decoded.upload[k]) * clip / norm, rtol=1e-5)
  assert _np_norm(out.sums["sum"]) <= clip * (1 + 1e-6)


def test_the_cached_accountant_failure_does_not_pile_up_frames():
  """At a tiny z the sampled accountant fails and the failure is cached; re-raising the same exception object
  appended the frames of every call to its traceback (4,010 frames after 2,000 calls)."""
  import traceback

  for r in range(1, 60):
    dp.epsilon(1e-160, 100, 10, r, 1e-5)
  failure = dp._one_round_rdp(1e-160, 100, 10, "error")
  assert isinstance(failure, Exception)
  assert len(traceback.extract_tb(failure.__traceback__)) <= 3
