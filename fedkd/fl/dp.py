"""User-level differential privacy for FedAvg: DP-FedAvg (McMahan, Ramage, Talwar & Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018), with a fixed-size client sample.

Round t samples m = ``clients_per_round`` of the N clients without replacement. Client i runs the inner
algorithm's local training from the server model w_t (FedAvg, FedProx, MOON, FedBN or Ditto:
``config.DP_ALGORITHMS``, whose uploads are plain model deltas) and clips its delta to the L2 ball of radius C = ``clip_norm`` (the norm over every floating leaf of the whole update):

    clip(d_i) = d_i * min(1, C / ||d_i||_2),

the server adds Gaussian noise of standard deviation z C (z = ``noise_multiplier``) to the SUM of the
clipped deltas and divides by the fixed m_exp = ``expected_clients`` (the configured clients per round,
not the number that reported, so one client's presence does not change the denominator):

    mean_t = (sum_{i in S_t} clip(d_i) + N(0, z^2 C^2 I)) / m_exp,

and hands mean_t to the inner algorithm's server step (server SGD with learning rate 1: w_{t+1} = w_t +
mean_t; FedAdam etc. work on it unchanged, as post-processing). Every client counts equally: the data-size
weights are not used (a client's influence must be bounded by C alone).

The clipped deltas travel through the engine's ``sums`` (summed unweighted over the round's clients and
``psum``-ed; ``skip_nonfinite`` zeroes a broken client's), the ``upload`` is empty, so the model-sized tree
is reduced once. The noise is ONE draw per round on the server from ``server["rng"]`` (the round key the
training task stores there): ``normal(fold_in(key, NOISE_STREAM), (P,))`` for the P floating parameters, cut
into the leaves in ``jax.tree.leaves`` order (:func:`noise_like`); the server step runs replicated on every
device, so every device draws the same noise, whatever the layout, and a resumed run draws it again.

Accounting (:func:`epsilon`, :func:`max_rounds`): Google's ``dp_accounting`` RDP accountant. Sampling m of
N clients without replacement is analysed under the REPLACE_ONE neighbouring relation (one client's data
replaced by anything; Wang, Balle & Kasiviswanathan 2019, Theorem 27). Replacing a client can move the sum
of clipped deltas by up to 2C (from d to -d), so the noise z C is a Gaussian mechanism with noise
multiplier z / 2 relative to that sensitivity; this is what the accountant is given (the RDP accountant
takes the multiplier relative to the relation's sensitivity). With m = N (every client every round) the
round is that unsampled Gaussian mechanism. Sampling never weakens privacy (a mixture of the neighbouring
outputs), so the unsampled bound holds for m < N as well; the smaller of the two epsilons is reported (the
without-replacement bound is the looser one at high sampling rates). The rounds compose adaptively.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from fedkd.fl.algorithm import ClientOutput

# the server's round key is folded with this for the noise: its own stream
NOISE_STREAM = 0x44504E5A  # "DPNZ"
# L2 sensitivity of the sum of clipped deltas, in units of the clip norm, when one client is replaced
REPLACE_ONE_SENSITIVITY = 2.0
# epsilon is computed at min(noise_multiplier, this): more noise cannot spend more (a sound upper bound)
LARGEST_NOISE = 1e6
ACCOUNTING = (
  "privacy: (epsilon, delta) for user-level DP from dp_accounting's RDP accountant, with the m clients of a round "
  "sampled uniformly without replacement from the N (Wang, Balle & Kasiviswanathan 2019) under the REPLACE_ONE "
  "relation (one client's data replaced, so the clipped sum's sensitivity is 2 x clip and the accountant's noise "
  "multiplier is z/2), composed over the rounds (or the unsampled bound, which also holds, where it is smaller)"
)


def _floating(x) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def global_norm(tree) -> jax.Array:
  """L2 norm (f32) over every floating leaf of ``tree``: finite for every finite tree whose norm is below the
  float32 maximum (3.4e38), inf above it (the squares are of the values divided by a power of two that
  brings the largest magnitude into [1, 4), exact, so an update of 1e20, or of 1e38 in one entry, has its norm:
  neither inf nor NaN nor, through a reciprocal flushed to zero, 0); NaN/Inf for a tree that holds one."""
  leaves = [jnp.asarray(a, jnp.float32) for a in jax.tree.leaves(tree) if _floating(a)]
  zero = jnp.zeros((), jnp.float32)
  big = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(a), initial=0.0) for a in leaves], zero)
  # big in [2^(e-1), 2^e); the values are divided by 2^k, k = e - 1 kept in [-126, 126], so that 2^k and its
  # reciprocal are normal floats (XLA:CPU divides by multiplying with the reciprocal, and flushes a subnormal
  # one, 2^-127, to 0)
  k = jnp.where((big > 0) & jnp.isfinite(big), jnp.clip(jnp.frexp(big)[1] - 1, -126, 126), 0)
  scale = jnp.ldexp(jnp.float32(1), k)
  sq = [jnp.sum(jnp.square(a / scale)) for a in leaves]
  return jnp.sqrt(sum(sq, zero)) * scale


def clip_update(tree, clip_norm: float):
  """(``tree`` scaled by min(1, clip_norm / norm), norm): the global L2 norm over its floating leaves (f32);
  a zero tree is returned as it is. Non-floating leaves are unchanged, the others keep their dtype. Where
  clip_norm / norm is below the smallest normal float32 (1.2e-38: a norm above 8.5e37 x clip_norm, or inf)
  the factor may be flushed to zero (XLA:CPU flushes subnormals), and the update with it: still inside the
  ball."""
  norm = global_norm(tree)
  over = norm > clip_norm
  scale = jnp.where(over, clip_norm / jnp.where(over, norm, 1.0), 1.0)
  clipped = jax.tree.map(lambda a: (a.astype(jnp.float32) * scale).astype(a.dtype) if _floating(a) else a, tree)
  return clipped, norm


def noise_like(tree, key, std: float):
  """std * N(0, I) for every floating leaf of ``tree`` (f32; zeros for the others): ONE draw of P normals
  from ``key`` (P: the floating leaves' total size), cut into those leaves in ``jax.tree.leaves`` order.
  (One draw, not one per leaf: XLA:CPU compiles a separate draw per leaf in about 0.5 s each.)"""
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [math.prod(jnp.shape(a)) if _floating(a) else 0 for a in leaves]
  flat = std * jax.random.normal(key, (sum(sizes),), jnp.float32)
  out, offset = [], 0
  for a, n in zip(leaves, sizes):
    if _floating(a):
      out.append(flat[offset : offset + n].reshape(jnp.shape(a)))
    else:
      out.append(jnp.zeros(jnp.shape(a), jnp.float32))
    offset += n
  return jax.tree.unflatten(treedef, out)


def round_noise_key(server: dict) -> jax.Array:
  """The noise key of a round: the server's round key folded with :data:`NOISE_STREAM`."""
  return jax.random.fold_in(jax.random.wrap_key_data(server["rng"]), NOISE_STREAM)


def _is_mean(aggregator) -> bool:
  from fedkd.fl.aggregate import Mean

  return aggregator is Mean or (isinstance(aggregator, str) and aggregator == "mean")


class DPFedAvg:
  """DP-FedAvg around ``inner`` (``fedkd.fl.algorithm`` interface; see the module docstring).

  ``inner``: an algorithm whose upload is a plain model delta (the tree of the server's ``params``), whose
  aggregator is the weighted ``mean`` and whose clients return no ``sums``: FedAvg, FedProx, MOON, FedBN, Ditto
  (``fedkd.config.DP_ALGORITHMS``; not SCAFFOLD, FedNova, gossip or the robust aggregators). ``clip_norm`` C > 0, ``noise_multiplier`` z >= 0
  (numbers, or traced scalars: a traced z = 0 adds zero noise), ``expected_clients`` the fixed denominator
  (the configured clients per round). ``noise_std``: the noise's standard deviation z C when the caller
  has it exactly (replicas pass z C rounded once, from float64, as a single run's ``z * C`` of Python
  floats is), else None: z C here.

  Per-client metrics added to the inner ones: ``dp_norm`` (the update's L2 norm before clipping) and
  ``dp_clipped`` (1.0 when it was clipped). A client whose delta holds a NaN/Inf reports a NaN loss, so the
  engine's ``skip_nonfinite`` (which sees the empty upload and the loss) drops it from the sum.
  Everything else (init, init_row, gather, the server step after the noise, ...) is ``inner``'s."""

  def __init__(self, inner, clip_norm: float, noise_multiplier: float, expected_clients: int, noise_std=None):
    if not _is_mean(getattr(inner, "aggregator", None)):
      raise ValueError(
        f"DP-FedAvg needs an inner algorithm with the 'mean' aggregator; {inner.name} uses {inner.aggregator!r}"
      )
    if isinstance(clip_norm, (int, float)) and not clip_norm > 0:
      raise ValueError(f"DP-FedAvg needs clip_norm > 0, got {clip_norm}")
    if isinstance(noise_multiplier, (int, float)) and not noise_multiplier >= 0:
      raise ValueError(f"DP-FedAvg needs noise_multiplier >= 0, got {noise_multiplier}")
    if int(expected_clients) != expected_clients or int(expected_clients) < 1:
      raise ValueError(f"DP-FedAvg needs expected_clients >= 1 (an integer), got {expected_clients}")
    self.inner = inner
    # floats, or traced scalars (replicas of one program that differ in them: fedkd.tasks.replicas)
    self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
    self.noise_std = noise_multiplier * clip_norm if noise_std is None else noise_std
    self.expected_clients = int(expected_clients)
    self.name = f"{inner.name}+dp"

  def __getattr__(self, attr):  # aggregator, init, init_row, gather, ...: the inner algorithm's
    if attr == "inner":  # not set yet (copy / unpickling): no recursion
      raise AttributeError(attr)
    return getattr(self.inner, attr)

  def client(self, ctx, server, row, batch, gathered) -> ClientOutput:
    out = self.inner.client(ctx, server, row, batch, gathered)
    if out.sums is not None:
      raise ValueError(f"DP-FedAvg needs an inner algorithm without client sums; {self.inner.name} returns some")
    params = server["params"]
    if jax.tree.structure(out.upload) != jax.tree.structure(params) or any(
      jnp.shape(u) != jnp.shape(p) for u, p in zip(jax.tree.leaves(out.upload), jax.tree.leaves(params))
    ):
      raise ValueError(f"DP-FedAvg needs an inner algorithm that uploads a model delta; {self.inner.name} does not")
    clipped, norm = clip_update(out.upload, self.clip_norm)
    finite = jnp.isfinite(norm)  # a NaN/Inf anywhere in the delta makes the norm non-finite
    metrics = dict(out.metrics or {})
    metrics.update(dp_norm=norm, dp_clipped=(norm > self.clip_norm).astype(jnp.float32))
    return out._replace(
      upload={},
      loss=jnp.where(finite, out.loss, jnp.nan),
      sums={"sum": clipped, "reported": jnp.ones((), jnp.float32)},
      metrics=metrics,
    )

  def server(self, server, aggregate, sums, rows):
    total = sums["sum"]
    if not isinstance(self.noise_multiplier, (int, float)) or self.noise_multiplier > 0:  # traced: always
      noise = noise_like(total, round_noise_key(server), self.noise_std)
      total = jax.tree.map(lambda s, n: s.astype(jnp.float32) + n if _floating(s) else s, total, noise)
    mean = jax.tree.map(
      lambda s, p: (s / self.expected_clients).astype(p.dtype) if _floating(s) else s, total, sums["sum"]
    )
    return self.inner.server(server, mean, None, rows)


# ------------------------------------------------------------------------------------------ accounting


def _check(noise_multiplier, num_clients, clients_per_round, delta):
  if not float(noise_multiplier) >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
  if not 1 <= int(clients_per_round) <= int(num_clients):
    raise ValueError(f"need 1 <= clients_per_round <= num_clients, got {clients_per_round} of {num_clients}")
  if not 0 < float(delta) < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}")


def _accountant():
  import dp_accounting
  from dp_accounting.rdp import rdp_privacy_accountant

  return rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


def _round_event(z: float, num_clients: int, clients_per_round: int | None):
  """One round as a dp_accounting event: the Gaussian with multiplier z / 2, its clients sampled without
  replacement (``clients_per_round`` None: unsampled)."""
  import dp_accounting

  gaussian = dp_accounting.GaussianDpEvent(z / REPLACE_ONE_SENSITIVITY)
  if clients_per_round is None:
    return gaussian
  return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, gaussian)


@functools.lru_cache(maxsize=64)
def _one_round_rdp(z: float, num_clients: int, clients_per_round: int | None, warning_action: str):
  """(orders, RDP at each order) that dp_accounting's RdpAccountant holds after composing one round, with
  RuntimeWarnings under ``warning_action`` ("ignore" or "error"); None where the accountant keeps them
  under other names; the exception (not raised) where it fails."""
  accountant = _accountant()
  with warnings.catch_warnings():
    warnings.simplefilter(warning_action, RuntimeWarning)
    try:
      accountant.compose(_round_event(z, num_clients, clients_per_round))
    except (ArithmeticError, ValueError, RuntimeWarning) as e:
      return e
  orders, rdp = getattr(accountant, "_orders", None), getattr(accountant, "_rdp", None)
  if not (isinstance(orders, np.ndarray) and isinstance(rdp, np.ndarray) and orders.shape == rdp.shape):
    return None
  return orders.copy(), rdp.copy()


def _rdp_epsilon(
  z: float, num_clients: int, clients_per_round: int | None, rounds: int, delta: float, warning_action: str
) -> float:
  """dp_accounting's RDP epsilon at ``delta`` after ``rounds`` rounds, RuntimeWarnings under
  ``warning_action``: the number that composing ``SelfComposedDpEvent(event, rounds)`` into a fresh
  ``RdpAccountant`` and ``get_epsilon(delta)`` give (the accountant adds rounds x the one-round RDP to zeros
  and converts that with ``compute_epsilon``), with the one-round RDP computed once per (z, N, m): a
  millisecond a call instead of 0.2 to 1 s, so a run's per-round accounting and :func:`max_rounds`' search
  cost next to nothing. Raises what the accountant raises."""
  from dp_accounting.rdp import rdp_privacy_accountant

  one = _one_round_rdp(z, num_clients, clients_per_round, warning_action)
  if isinstance(one, Exception):
    raise one.with_traceback(None)  # the cached exception: no frames piled up from earlier calls
  with warnings.catch_warnings():
    warnings.simplefilter(warning_action, RuntimeWarning)
    if one is None:  # a dp_accounting that keeps the RDP elsewhere: the accountant itself, every time
      import dp_accounting

      accountant = _accountant()
      accountant.compose(dp_accounting.SelfComposedDpEvent(_round_event(z, num_clients, clients_per_round), rounds))
      return float(accountant.get_epsilon(delta))
    orders, rdp = one
    return float(rdp_privacy_accountant.compute_epsilon(orders, rounds * rdp, delta)[0])


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, num_clients: int, clients_per_round: int, rounds: int, delta: float) -> float:
  """epsilon of ``rounds`` DP-FedAvg rounds at ``delta`` (:data:`ACCOUNTING`): user-level, REPLACE_ONE,
  ``clients_per_round`` of ``num_clients`` sampled without replacement (the smaller of that bound and the
  unsampled Gaussian's; only the latter when they are equal).
  ``noise_multiplier`` 0 -> inf (for rounds > 0); ``rounds`` 0 -> 0."""
  _check(noise_multiplier, num_clients, clients_per_round, delta)
  if int(rounds) < 0:
    raise ValueError(f"rounds must be >= 0, got {rounds}")
  if int(rounds) == 0:
    return 0.0
  if float(noise_multiplier) == 0:
    return math.inf
  n, m, rounds, delta = int(num_clients), int(clients_per_round), int(rounds), float(delta)
  # epsilon does not grow with z, so beyond LARGEST_NOISE the value there is a valid upper bound (a tiny
  # one: 0.0035 for every client in each of 60 rounds at delta 1e-5); past ~1e8 the accountant fails in a
  # math function, and it overflows on z**2 around 1e154
  z = min(float(noise_multiplier), LARGEST_NOISE)
  # at tiny z, alpha / z**2 overflows to inf: an infinite epsilon, rightly
  unsampled = _rdp_epsilon(z, n, None, rounds, delta, "ignore")
  if m == n:
    return unsampled
  # the without-replacement bound is looser than no sampling at high rates (q = 0.9: 235 vs 166 at z = 1,
  # 50 rounds, delta 1e-5); sampling never hurts, so the unsampled bound holds too: the smaller one.
  # At tiny noise multipliers (z < ~1e-154) the sampled RDP overflows to NaN, which get_epsilon turns into
  # 0.0 ("perfect privacy"); then, as wherever the sampled accountant fails, only the unsampled bound, which
  # holds for every sample size, is reported.
  try:
    bound = _rdp_epsilon(z, n, m, rounds, delta, "error")
  except (ArithmeticError, ValueError, RuntimeWarning):
    return unsampled
  return unsampled if math.isnan(bound) else min(bound, unsampled)


def max_rounds(
  target_epsilon: float, noise_multiplier: float, num_clients: int, clients_per_round: int, delta: float, limit: int
) -> int:
  """The largest r <= ``limit`` with ``epsilon(noise_multiplier, num_clients, clients_per_round, r, delta)``
  <= ``target_epsilon`` (epsilon grows with r: a binary search, about log2(limit) accountant calls)."""
  if not float(target_epsilon) >= 0:
    raise ValueError(f"target_epsilon must be >= 0, got {target_epsilon}")
  if int(limit) < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  eps = lambda r: epsilon(float(noise_multiplier), int(num_clients), int(clients_per_round), r, float(delta))
  lo, hi = 0, int(limit)  # eps(lo) <= target always (eps(0) = 0)
  if eps(hi) <= target_epsilon:
    return hi
  while hi - lo > 1:  # eps(lo) <= target < eps(hi)
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if eps(mid) <= target_epsilon else (lo, mid)
  return lo


def describe(
  noise_multiplier: float, clip_norm: float, num_clients: int, clients_per_round: int, rounds: int, delta: float
) -> str:
  """One line for logs: the mechanism and its (epsilon, delta) after ``rounds``."""
  eps = epsilon(float(noise_multiplier), int(num_clients), int(clients_per_round), int(rounds), float(delta))
  return (
    f"DP-FedAvg: clip {clip_norm:g}, noise multiplier {noise_multiplier:g}, {clients_per_round} of {num_clients} "
    f"clients per round -> ({eps:.3g}, {delta:g})-DP after {rounds} rounds"
  )
