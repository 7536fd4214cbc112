"""Aggregation of the clients' uploads over the 'clients' mesh axis (inside the engine's shard_map).

An aggregator turns the uploads of a device's clients (leading axis n, the device's rows) into what
the algorithm's server step receives:

``mean``    the weighted mean sum_i w_i u_i / sum_i w_i over every client of the round (a ``psum``
            over the axis): one replicated pytree. Centralised FL (FedAvg, FedEFM CFL). It is
            *linear*: a device may reduce its clients in parts (``partial``) and add the parts up,
            so the engine's chunked layout never holds more than one chunk's uploads.
``gossip``  one mixed model per client, row i = sum_j W_ij u_j for the round's mixing matrix W [C, C]
            (``all_gather`` of every upload, then this device's rows of W): decentralised FL (FedEFM
            DFL, RING, MATCHA). CFL is the complete graph with W_ij = w_j / sum w.

Aggregators that need every client's update at once (coordinate-wise median, trimmed mean, Krum)
follow the ``gossip`` pattern: ``linear = False`` and a ``finish(uploads, total_weight, mixing,
weights)`` that receives the device's stacked uploads and their weights [n] (0 for a client that does
not count this round) and may ``all_gather`` / reduce-scatter them over the axis. An algorithm names
its aggregator (``aggregator = "mean"``) or holds an aggregator object (one with parameters).

Robust aggregators (Byzantine-tolerant estimates of the clients' mean delta; one replicated pytree, so
FedAvg's server step applies them unchanged). A client *counts* when its weight is > 0 and its upload
holds no NaN/Inf (the non-linear ones drop such a client themselves; the engine's ``skip_nonfinite``
serves ``norm_clip``); beyond that the weights are not used (the robust statistics are unweighted),
except by ``norm_clip``:

``median``        coordinate-wise median of the counting clients' uploads;
``trimmed_mean``  coordinate-wise mean after dropping the floor(beta m) largest and smallest values
                  of the m counting clients (Yin et al. 2018);
``krum``          the upload of the client with the lowest Krum score (Blanchard et al. 2017): the sum of
                  squared distances to its m - f - 2 nearest other counting clients, f assumed Byzantine;
``multi_krum``    the mean of the k lowest-score uploads (k = m - f by default);
``norm_clip``     each upload scaled to L2 norm <= clip (over all its leaves), then the weighted mean.
                  Linear, like ``mean``: works with every layout and keeps only P floats per device.

The non-linear ones never gather whole uploads: an ``all_to_all`` gives each of the D devices every
client's values of 1/D of the coordinates (C x P/D floats for C clients of P parameters), the
coordinate-wise statistic is computed there and the result ``all_gather``-ed (P floats); Krum sums its
C x C Gram matrix over the devices' coordinate slices (a ``psum``) and averages the chosen uploads as a
weighted ``psum``. With no counting client the result is zeros (the server does not move). The engine
keeps the device's n stacked uploads (n x P) alive for them in every layout (chunked included).
:func:`make_aggregator` builds one by name with its parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedkd.sharding import CLIENTS

try:  # varying -> invariant (one replicated value); jax.lax exposes it in newer releases only
  from jax.lax import all_gather_invariant as _all_gather_invariant
except ImportError:  # pragma: no cover - depends on the JAX release
  try:
    from jax._src.lax.parallel import all_gather_invariant as _all_gather_invariant
  except ImportError:
    _all_gather_invariant = None


def mix(W, stacked):
  """One gossip contraction new_i = sum_j W[i, j] x_j on the leading (client) axis of every floating
  leaf of ``stacked`` ([N, ...]); W: [M, N] (M = N: every client's new model; fewer rows: those
  clients'). float32 at full matmul precision (no TF32/bf16 passes on accelerators), cast back to
  each leaf's dtype; non-floating leaves (e.g. step counters) are returned unchanged (square W)."""
  w = jnp.asarray(W, jnp.float32)

  def one(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return x
    return jnp.tensordot(w, x.astype(jnp.float32), axes=(1, 0), precision=jax.lax.Precision.HIGHEST).astype(x.dtype)

  return jax.tree.map(one, stacked)


class Mean:
  name = "mean"
  linear = True
  per_client = False  # the result is one replicated pytree

  @staticmethod
  def partial(uploads, weights):
    """This device's part: sum over its clients of w_i u_i."""
    return jax.tree.map(lambda u: jnp.tensordot(weights, u, axes=1), uploads)

  @staticmethod
  def finish(part, total_weight, mixing=None):
    """All devices' parts -> the weighted mean (``total_weight`` = sum of every client's weight)."""
    return jax.tree.map(lambda s: jax.lax.psum(s, CLIENTS) / total_weight, part)


class Gossip:
  name = "gossip"
  linear = False
  per_client = True  # one mixed pytree per client (rows, split like the clients)

  @staticmethod
  def finish(uploads, total_weight, mixing, weights=None):
    """Row i of this device = sum_j W[i, j] u_j over every client j of the round (f32, exact matmul)."""
    everyone = jax.tree.map(lambda a: jax.lax.all_gather(a, CLIENTS, tiled=True), uploads)
    n_local = jax.tree.leaves(uploads)[0].shape[0]
    rows = jax.lax.dynamic_slice_in_dim(mixing, jax.lax.axis_index(CLIENTS) * n_local, n_local, axis=0)
    return mix(rows, everyone)


# --- robust aggregation (Byzantine-tolerant estimates of the clients' mean delta) -----------------------

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def _gather_invariant(x):
  """Every device's ``x`` concatenated on axis 0, as one replicated (invariant) value."""
  if _all_gather_invariant is not None:
    return _all_gather_invariant(x, CLIENTS, tiled=True)
  # identical on every device, so the max is exact; it only marks the value replicated
  return jax.lax.pmax(jax.lax.all_gather(x, CLIENTS, tiled=True), CLIENTS)


def _counting(uploads, weights):
  """[C] bool, replicated: which clients of the round count: weight > 0 (every client when ``weights`` is
  None) and an upload without NaN/Inf (a broken or Byzantine client must not poison the statistic)."""
  n = jax.tree.leaves(uploads)[0].shape[0]
  w = jnp.ones((n,), F32) if weights is None else jnp.asarray(weights, F32)
  ok = w > 0
  for u in jax.tree.leaves(uploads):
    ok = ok & jnp.all(jnp.isfinite(u.reshape(n, -1)), axis=1)
  return _gather_invariant(ok.astype(F32)) > 0


def _coordinate_slice(leaf):
  """This device's clients' ``leaf`` [n, ...] -> (every client's values of this device's 1/D of the leaf's
  coordinates [C, ceil(K/D)] f32, K): an ``all_to_all`` (coordinates zero-padded to a multiple of D)."""
  n = leaf.shape[0]
  flat = leaf.reshape(n, -1).astype(F32)
  k = flat.shape[1]
  d = jax.lax.axis_size(CLIENTS)
  padded = -(-k // d) * d
  if padded != k:
    flat = jnp.pad(flat, ((0, 0), (0, padded - k)))
  return jax.lax.all_to_all(flat, CLIENTS, 1, 0, tiled=True), k


def _coordinatewise(uploads, weights, statistic):
  """``statistic(values [C, k], counting [C], m) -> [k]`` on every coordinate of every leaf; the whole
  result replicated (zeros when no client counts)."""
  counting = _counting(uploads, weights)
  m = jnp.sum(counting.astype(jnp.int32))

  def leaf(u):
    if math.prod(u.shape[1:]) == 0:  # nothing to compute (an all_gather of an empty slice does not lower)
      return jnp.zeros(u.shape[1:], u.dtype)
    values, k = _coordinate_slice(u)
    mine = jnp.where(m > 0, statistic(values, counting, m), 0.0)
    return _gather_invariant(mine)[:k].reshape(u.shape[1:]).astype(u.dtype)

  return jax.tree.map(leaf, uploads)


def _sorted_counting(values, counting):
  """Each coordinate's values sorted over the clients; the m counting ones first (the others as +inf)."""
  return jnp.sort(jnp.where(counting[:, None], values, jnp.inf), axis=0)


def _median_of_counting(values, counting, m):
  """[k]: each coordinate's median over the m counting clients (mean of the two middle values for even m,
  formed so that two huge values do not overflow: lo + (hi - lo) / 2 when they share a sign, else (lo + hi) / 2)."""
  s = _sorted_counting(values, counting)
  lo = jax.lax.dynamic_index_in_dim(s, jnp.maximum(m - 1, 0) // 2, 0, keepdims=False)
  hi = jax.lax.dynamic_index_in_dim(s, m // 2, 0, keepdims=False)
  return jnp.where((lo >= 0) == (hi >= 0), lo + 0.5 * (hi - lo), 0.5 * (lo + hi))


class Median:
  """Coordinate-wise median of the counting clients' uploads (mean of the two middle values for even m).

  Memory per device (C clients of the round, P parameters, D devices): the ``all_to_all`` slice
  C x ceil(P/D) f32 and its sorted copy (about 2 C P / D floats), plus the P-float result; never the
  C x P of an ``all_gather``."""

  name = "median"
  linear = False
  per_client = False

  def finish(self, uploads, total_weight=None, mixing=None, weights=None):
    return _coordinatewise(uploads, weights, _median_of_counting)

  def __repr__(self):
    return "median()"


class TrimmedMean:
  """Coordinate-wise trimmed mean: of the m counting clients, drop the floor(beta m) largest and the
  floor(beta m) smallest values of each coordinate and average the rest (0 <= beta < 1/2). Finite for any
  finite uploads: kept values near float32's largest give their mean, not inf from adding them first.

  Memory per device: as :class:`Median`, about 2 C P / D floats plus the P-float result."""

  name = "trimmed_mean"
  linear = False
  per_client = False

  def __init__(self, beta: float = 0.1):
    if not 0.0 <= beta < 0.5:
      raise ValueError(f"trimmed_mean needs 0 <= beta < 0.5, got {beta}")
    self.beta = float(beta)

  @property
  def min_counting(self) -> int:
    """The fewest counting clients that trim anything (floor(beta m) >= 1); fewer: the plain mean, so the engine
    keeps the server's model that round. 1 for beta = 0 (the plain mean asked for)."""
    if self.beta <= 0:
      return 1
    m = max(1, math.ceil(1.0 / self.beta))  # then the floor in float64, as finish counts it
    while math.floor(self.beta * m) < 1:
      m += 1
    while m > 1 and math.floor(self.beta * (m - 1)) >= 1:
      m -= 1
    return m

  def finish(self, uploads, total_weight=None, mixing=None, weights=None):
    def trimmed(values, counting, m):
      c = values.shape[0]
      # floor(beta * m) in Python's float64 for every possible m (exactly numpy's count)
      t = jnp.asarray([math.floor(self.beta * j) for j in range(c + 1)], jnp.int32)[m]
      s = _sorted_counting(values, counting)
      pos = jnp.arange(c)[:, None]
      keep = (pos >= t) & (pos < m - t)
      kept = jnp.where(keep, s, 0.0)
      count = jnp.maximum(m - 2 * t, 1).astype(F32)
      mean = jnp.sum(kept, axis=0) / count  # as before the fallback existed, bit for bit
      share = 1.0 / count
      # where that sum overflows float32 (the mean cannot): each value scaled by the share first; the clip
      # only undoes rounding (a mean of values in [-max, max] lies there)
      top = jnp.finfo(F32).max
      return jnp.where(jnp.isfinite(mean), mean, jnp.clip(jnp.sum(kept * share, axis=0), -top, top))

    return _coordinatewise(uploads, weights, trimmed)

  def __repr__(self):
    return f"trimmed_mean(beta={self.beta})"


def krum_scores(sq_dist, counting, f: int):
  """Krum scores [C] from the squared distances [C, C] of the round's clients: client i's sum of squared
  distances to its m - f - 2 nearest other counting clients (at least 1, at most m - 1); +inf for a
  client that does not count."""
  c = sq_dist.shape[0]
  m = jnp.sum(counting.astype(jnp.int32))
  neighbours = jnp.minimum(jnp.maximum(m - f - 2, 1), jnp.maximum(m - 1, 0))
  others = counting[None, :] & ~jnp.eye(c, dtype=bool)
  nearest = jnp.sort(jnp.where(others, sq_dist, jnp.inf), axis=1)
  scores = jnp.sum(jnp.where(jnp.arange(c)[None, :] < neighbours, nearest, 0.0), axis=1)
  return jnp.where(counting, scores, jnp.inf)


class MultiKrum:
  """Multi-Krum (Blanchard et al. 2017, f assumed Byzantine clients): the mean of the k counting uploads
  with the lowest Krum scores (:func:`krum_scores`; k = m - f when None, clipped to [1, m]); ties go to
  the client earlier in the round's order. The distances are over each client's whole update (every leaf
  flattened). The score needs m >= f + 3 counting clients (:attr:`min_counting`): with fewer (clients dropped
  out or non-finite) the engine keeps the server's model that round.

  The Gram matrix is of the uploads centred on their coordinate-wise median, and a squared distance past
  float32's range counts as inf, so an upload of any finite size never wins by overflowing the arithmetic.

  Memory per device: the ``all_to_all`` slice C x ceil(P/D) f32, its sorted copy (for the median) and its
  centred copy (about 3 C P / D floats), the C x C Gram matrix, and the P-float result (a weighted ``psum``
  of the chosen uploads)."""

  name = "multi_krum"
  linear = False
  per_client = False

  def __init__(self, f: int = 1, k: int | None = None):
    if int(f) < 0 or (k is not None and int(k) < 1):
      raise ValueError(f"{self.name} needs f >= 0 and k >= 1 (or None), got f={f}, k={k}")
    self.f = int(f)
    self.k = None if k is None else int(k)
    self.min_counting = self.f + 3

  def finish(self, uploads, total_weight=None, mixing=None, weights=None):
    counting = _counting(uploads, weights)
    m = jnp.sum(counting.astype(jnp.int32))
    c = counting.shape[0]
    gram = jnp.zeros((c, c), F32)
    for leaf in jax.tree.leaves(uploads):
      values, _ = _coordinate_slice(leaf)
      # centred on the counting clients' coordinate-wise median (local): no cancellation in |a|^2 + |b|^2 - 2ab,
      # also beside a Byzantine upload of 1e25, which would drag a mean (and the honest clients with it)
      x = jnp.where(counting[:, None], values - _median_of_counting(values, counting, m), 0.0)
      gram = gram + jnp.matmul(x, x.T, precision=HIGHEST)
    gram = jax.lax.psum(gram, CLIENTS)
    sq = jnp.diagonal(gram)
    sq_dist = sq[:, None] + sq[None, :] - 2.0 * gram
    # a distance past float32's range is inf (a huge upload: |a|^2 overflows, inf - inf is NaN), not NaN
    sq_dist = jnp.maximum(jnp.where(jnp.isnan(sq_dist), jnp.inf, sq_dist), 0.0)
    scores = krum_scores(sq_dist, counting, self.f)
    k = jnp.clip(m - self.f if self.k is None else self.k, 1, jnp.maximum(m, 1))
    rank = jnp.zeros((c,), jnp.int32).at[jnp.argsort(scores, stable=True)].set(jnp.arange(c, dtype=jnp.int32))
    chosen = ((rank < k) & counting).astype(F32)
    chosen = chosen / jnp.maximum(jnp.sum(chosen), 1.0)
    n = jax.tree.leaves(uploads)[0].shape[0]
    mine = jax.lax.dynamic_slice_in_dim(chosen, jax.lax.axis_index(CLIENTS) * n, n)

    def mean_of_chosen(u):
      dtype = u.dtype
      u = jnp.where((mine > 0).reshape((-1,) + (1,) * (u.ndim - 1)), u.astype(F32), 0.0)  # 0 * NaN is NaN
      part = jnp.tensordot(mine, u, axes=1, precision=HIGHEST)
      return jax.lax.psum(part, CLIENTS).astype(dtype)

    return jax.tree.map(mean_of_chosen, uploads)

  def __repr__(self):
    return f"{self.name}(f={self.f}, k={self.k})"


class Krum(MultiKrum):
  """Krum (Blanchard et al. 2017): the upload of the counting client with the lowest Krum score
  (multi-Krum with k = 1). Memory per device: as :class:`MultiKrum`."""

  name = "krum"

  def __init__(self, f: int = 1):
    super().__init__(f, 1)

  def __repr__(self):
    return f"krum(f={self.f})"


class NormClip:
  """Each client's upload scaled to L2 norm <= ``clip`` (the norm over all its leaves), then the weighted
  mean. Linear like :class:`Mean` (clipping in ``partial``, ``psum`` in ``finish``), so it works with every
  engine layout, the chunked one included, and with ``skip_nonfinite``.

  Memory per device: P floats (the device's part), as :class:`Mean`."""

  name = "norm_clip"
  linear = True
  per_client = False

  def __init__(self, clip: float = 1.0):
    if not clip > 0:
      raise ValueError(f"norm_clip needs clip > 0, got {clip}")
    self.clip = float(clip)

  def partial(self, uploads, weights):
    from fedkd.fl.dp import global_norm  # finite for a huge finite upload: it is clipped, not zeroed by clip / inf

    norm = jax.vmap(global_norm)(uploads)
    scale = jnp.where(norm > self.clip, self.clip / jnp.where(norm > self.clip, norm, 1.0), 1.0)
    return Mean.partial(uploads, weights * scale)

  @staticmethod
  def finish(part, total_weight, mixing=None):
    return Mean.finish(part, total_weight)

  def __repr__(self):
    return f"norm_clip(clip={self.clip})"


# Aggregators by name: a class or an object without required parameters (what ``Algorithm.aggregator``
# may name); :func:`make_aggregator` builds any of KINDS with its parameters.
AGGREGATORS = {"mean": Mean, "gossip": Gossip, "median": Median()}
KINDS = {
  "mean": Mean,
  "gossip": Gossip,
  "median": Median,
  "trimmed_mean": TrimmedMean,
  "krum": Krum,
  "multi_krum": MultiKrum,
  "norm_clip": NormClip,
}


def make_aggregator(name: str, **params):
  """The aggregator ``name`` (one of :data:`KINDS`) with its parameters, e.g.
  ``make_aggregator("trimmed_mean", beta=0.2)``, ``make_aggregator("krum", f=2)``,
  ``make_aggregator("multi_krum", f=2, k=5)``, ``make_aggregator("norm_clip", clip=0.5)``."""
  if name not in KINDS:
    raise ValueError(f"unknown aggregator {name!r}; use one of {', '.join(KINDS)}")
  if name in ("mean", "gossip"):
    if params:
      raise TypeError(f"aggregator {name!r} takes no parameters, got {sorted(params)}")
    return KINDS[name]
  return KINDS[name](**params)
