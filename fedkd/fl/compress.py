"""Compression of the clients' uploads, simulated inside the round, with communication accounting.

A client compresses what it sends up (``ClientOutput.upload``); the server receives and decodes it. This
is a simulation: :class:`Compressed` returns the *decoded* dense upload, so the engine's aggregation
(:mod:`fedkd.fl.aggregate`) runs unchanged on the values the server would reconstruct, and
:func:`upload_bytes` counts what the encoded message would weigh on the wire. A leaf is *compressed*
when it is floating and has more than one element; scalar leaves (FedNova's tau), one-element leaves and
non-floating leaves are sent exactly.

``int8``: 8-bit stochastic quantisation with a per-tensor range (QSGD-style stochastic rounding:
Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS
2017; Suresh et al., "Distributed Mean Estimation with Limited Communication", ICML 2017, stochastic
k-level quantisation with k = 256). For a leaf u:

    lo = min(u),  hi = max(u),  scale = (hi - lo) / 255,
    q = clip(floor((u - lo) / scale + U), 0, 255)  with U ~ Uniform[0, 1) per entry   (sent: q as uint8, lo, hi)
    decoded = lo + q * scale

E[decoded] = u (unbiased) and |decoded - u| < scale. A leaf with hi == lo is sent exactly. The
randomness of client i, leaf l (``jax.tree.leaves`` order of the upload) is
``uniform(fold_in(fold_in(K, i), l))`` with the round key ``K = fold_in(fold_in(server["rng"], STREAM),
server["round"])`` (:data:`STREAM`: a fixed constant, so the stream is not the attacks' one,
:mod:`fedkd.fl.attacks`, which folds the round straight into ``server["rng"]``) and i =
``batch["client_id"]``, the client's global id: the same draw on any device split, client layout and
on resume. No memory is kept (the quantiser is unbiased).

``topk``: top-k sparsification with error feedback (Stich, Cordonnier & Jaggi, "Sparsified SGD with
Memory", NeurIPS 2018; Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression
Schemes", ICML 2019). Per leaf of n elements, k = max(1, ceil(fraction * n)) (the product is rounded to
9 decimals first, so 0.07 * 100 gives 7, not 8). With the client's residual e (zeros at first):

    v = u + e,   sent = v on the k entries of largest |v| (jax.lax.top_k; 0 elsewhere),   e <- v - sent

so sum over rounds of sent + e_T = sum over rounds of u (nothing is lost, only delayed). With
``error_feedback=False`` there is no residual: sent = top-k of u.

Rows. The residual is a per-client row shaped like the model params (f32 zeros at first). It is applied
to the *model part* of the upload: the upload itself when it has the params' tree structure (FedAvg,
FedProx, SCAFFOLD, MOON, FedBN, Ditto: model deltas; FedEFM: the model), or the one entry of a dict
upload that has it (FedNova's ``{"d": tree, "tau": scalar}``: ``d`` gets the residual, ``tau`` is sent
exactly). Any other leaf of an error-feedback upload must be a scalar (else a ValueError at trace time).
The composite row is ``{"inner": the inner algorithm's row, "residual": params-shaped}``, without
"inner" when the inner algorithm is stateless and without "residual" for int8 / top-k without error
feedback; None when both are absent. A client the engine leaves out of a round (non-finite with
``skip_nonfinite``, or not ``batch["reported"]``) keeps its old row, residual included.

What is *not* compressed: the plain ``sums`` a client returns (SCAFFOLD's control-variate change
``dc``), except SCAFFOLD's ``weighting='uniform'`` ``sums["delta"]`` (the uploads themselves, summed for
the uniform mean), which is replaced by the decoded upload so the server averages what it received.

Bytes (:func:`upload_bytes`, one client, one round, from shapes alone). ``none``: every leaf at its
dtype's itemsize (4 bytes per float32 element). ``int8``: a compressed leaf costs 1 byte per element +
8 bytes (lo and hi as float32); every compressed leaf is counted as quantised, also one that turns out
constant at run time (sent exactly: the static count cannot know it, and an all-equal update is rare).
``topk``: a compressed leaf costs k * (itemsize value + 4-byte int32 index), 8 bytes per kept float32
entry. Leaves sent exactly (scalars, one-element and non-floating leaves) cost their full size. Not
counted: message headers, shapes and framing, and the ``sums`` (SCAFFOLD's ``dc``, as large again as
the upload). Every leaf of the upload is counted, also leaves an algorithm always sends as zeros (FedBN's
norm leaves). :meth:`Compressed.bytes_per_client` takes the upload to be params-shaped unless told
otherwise (FedNova's adds the 4-byte tau).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedkd.fl import leafrand

KINDS = ("int8", "topk")
STREAM = 0x636F6D70  # "comp": folded into server["rng"] before the round, unlike the attacks' noise
INDEX_BYTES = 4  # top-k: one int32 index per sent value
RANGE_BYTES = 8  # int8: lo and hi as float32 per quantised leaf


def _floating(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


def _compressed_leaf(x) -> bool:
  """Whether a leaf (array or ShapeDtypeStruct) is compressed: floating with more than one element."""
  return _floating(x.dtype) and math.prod(x.shape) > 1


def topk_count(size: int, fraction: float) -> int:
  """k = max(1, ceil(fraction * size)), at most ``size`` (the product rounded to 9 decimals first)."""
  return min(int(size), max(1, math.ceil(round(float(fraction) * int(size), 9))))


# ------------------------------------------------------------------------------------------- int8


def round_key(server: dict) -> jax.Array:
  """The round's compression key: fold_in(fold_in(server["rng"], STREAM), server["round"])."""
  key = jax.random.fold_in(jax.random.wrap_key_data(server["rng"]), STREAM)
  return jax.random.fold_in(key, server["round"])


def _uniform(key: jax.Array, shape) -> jax.Array:
  """The stochastic rounding's U ~ Uniform[0, 1) of one leaf."""
  return jax.random.uniform(key, shape, jnp.float32)


def encode_int8(u: jax.Array, key: jax.Array | None = None, *, noise: jax.Array | None = None):
  """A floating array -> (q uint8 of u's shape, lo, hi) by stochastic rounding on the 256-level grid of
  [min u, max u] (module docstring), with U drawn from ``key``, or given as ``noise`` (already drawn)."""
  if (key is None) == (noise is None):
    raise ValueError("encode_int8: pass exactly one of key (U is drawn from it) and noise (U already drawn)")
  x = u.astype(jnp.float32)
  lo, hi = jnp.min(x), jnp.max(x)
  scale = _step(lo, hi)
  safe = jnp.where(scale > 0, scale, 1.0)
  noise = _uniform(key, x.shape) if noise is None else noise
  # (x - lo) / step; from the halves where x - lo could pass float32's range
  # (written as products with the reciprocal: XLA's own rewrite of the division, so the levels stay bitwise those of
  # the division that was here before the overflow case)
  level = jnp.where(jnp.isfinite(hi - lo), (x - lo) * (1.0 / safe), (0.5 * x - 0.5 * lo) * (1.0 / (0.5 * safe)))
  q = jnp.clip(jnp.floor(level + noise), 0.0, 255.0)
  return q.astype(jnp.uint8), lo, hi


def _step(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """(hi - lo) / 255, also where hi - lo is past float32's range (an upload spanning -2e38..2e38): from the halves."""
  width = hi - lo
  return jnp.where(jnp.isfinite(width), width / 255.0, (0.5 * hi - 0.5 * lo) / 127.5)


def decode_int8(q: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """lo + q * (hi - lo) / 255 (float32); where hi - lo is past float32's range, the same point as
  (1 - q / 255) lo + (q / 255) hi, which does not overflow."""
  q = q.astype(jnp.float32)
  t = q / 255.0
  return jnp.where(jnp.isfinite(hi - lo), lo + q * ((hi - lo) / 255.0), (1.0 - t) * lo + t * hi)


def quantize_int8(u: jax.Array, key: jax.Array | None = None, *, noise: jax.Array | None = None) -> jax.Array:
  """What the server decodes from one leaf: the int8 round trip, or ``u`` itself when the leaf is sent
  exactly (not floating, at most one element, or hi == lo). ``key`` / ``noise``: as for :func:`encode_int8`."""
  u = jnp.asarray(u)
  if not _compressed_leaf(u):
    return u
  q, lo, hi = encode_int8(u, key, noise=noise)
  return jnp.where(hi > lo, decode_int8(q, lo, hi), u.astype(jnp.float32)).astype(u.dtype)


def int8_tree(tree, key: jax.Array):
  """:func:`quantize_int8` on every leaf, leaf l with fold_in(key, l) (``jax.tree.leaves`` order; the
  uniform draws of all leaves made together, :func:`fedkd.fl.leafrand.per_leaf`: the same values)."""
  leaves, treedef = jax.tree.flatten(tree)
  noise = leafrand.per_leaf(_uniform, key, {l: jnp.shape(u) for l, u in enumerate(leaves) if _compressed_leaf(u)})
  return jax.tree.unflatten(treedef, [quantize_int8(u, noise=noise.get(l)) for l, u in enumerate(leaves)])


# ------------------------------------------------------------------------------------------- top-k


def topk(v: jax.Array, fraction: float) -> jax.Array:
  """v on its k = :func:`topk_count` entries of largest magnitude, zeros elsewhere (v itself when it is
  sent exactly)."""
  v = jnp.asarray(v)
  if not _compressed_leaf(v):
    return v
  flat = v.reshape(-1)
  _, idx = jax.lax.top_k(jnp.abs(flat), topk_count(flat.shape[0], fraction))
  return jnp.zeros_like(flat).at[idx].set(flat[idx]).reshape(v.shape)


def topk_tree(tree, fraction: float, residual=None):
  """(sent, new residual): :func:`topk` of every leaf of tree + residual (``residual`` None: no error
  feedback, new residual None). Residual leaves of leaves sent exactly stay zero."""
  if residual is None:
    return jax.tree.map(lambda u: topk(u, fraction), tree), None
  v = jax.tree.map(lambda u, e: u + e.astype(u.dtype), tree, residual)
  sent = jax.tree.map(lambda a: topk(a, fraction), v)
  return sent, jax.tree.map(lambda a, s, e: (a - s).astype(e.dtype), v, sent, residual)


# --------------------------------------------------------------------------------------- accounting


def _shape_dtype(leaf):
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return tuple(leaf.shape), np.dtype(leaf.dtype)
  a = jnp.asarray(leaf)  # a Python number: JAX's default dtype (float32 / int32)
  return tuple(a.shape), np.dtype(a.dtype)


def upload_bytes(kind: str, upload_like, fraction: float | None = None) -> int:
  """Bytes one client sends per round for an upload shaped like ``upload_like`` (a pytree of arrays or
  ShapeDtypeStructs), ``kind`` one of ``none``, ``int8``, ``topk`` (``fraction`` required); the
  convention is the module docstring's."""
  if kind not in ("none",) + KINDS:
    raise ValueError(f"unknown compression {kind!r}; use one of none, {', '.join(KINDS)}")
  if kind == "topk" and fraction is None:
    raise ValueError("upload_bytes('topk', ...) needs the fraction")
  total = 0
  for leaf in jax.tree.leaves(upload_like):
    shape, dtype = _shape_dtype(leaf)
    size = math.prod(shape)
    if kind == "none" or not (_floating(dtype) and size > 1):
      total += size * dtype.itemsize
    elif kind == "int8":
      total += size + RANGE_BYTES
    else:
      total += topk_count(size, fraction) * (dtype.itemsize + INDEX_BYTES)
  return int(total)


def dense_bytes(upload_like) -> int:
  """Bytes of the uncompressed upload: ``upload_bytes("none", upload_like)``."""
  return upload_bytes("none", upload_like)


def relative_error(decoded, true) -> jax.Array:
  """||decoded - true|| / ||true|| over all floating leaves (the absolute error when true is 0)."""
  num, den = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  for d, t in zip(jax.tree.leaves(decoded), jax.tree.leaves(true)):
    if _floating(jnp.result_type(t)):
      diff = jnp.asarray(d, jnp.float32) - jnp.asarray(t, jnp.float32)
      num, den = num + jnp.sum(diff * diff), den + jnp.sum(jnp.square(jnp.asarray(t, jnp.float32)))
  return jnp.sqrt(num) / jnp.where(den > 0, jnp.sqrt(den), 1.0)


# ------------------------------------------------------------------------------------------ wrapper


def _model_part(upload, residual_def):
  """None when the upload itself has the residual's (params') tree structure, else the key of the one
  dict entry that has it; a ValueError otherwise."""
  if jax.tree.structure(upload) == residual_def:
    return None
  if isinstance(upload, dict):
    keys = [k for k, v in upload.items() if jax.tree.structure(v) == residual_def]
    if len(keys) == 1:
      rest = [x for k, v in upload.items() if k != keys[0] for x in jax.tree.leaves(v)]
      if all(math.prod(jnp.shape(x)) <= 1 for x in rest):
        return keys[0]
  raise ValueError(
    "top-k error feedback needs an upload shaped like the model params, or a dict with one such entry "
    f"and scalars (FedNova's); got {jax.tree.structure(upload)}"
  )


class Compressed:
  """An algorithm whose clients send compressed uploads (``fedkd.fl.algorithm`` interface).

  Wraps ``inner``: every client runs ``inner.client`` (with its part of the row), compresses the upload
  (``kind``: ``int8`` or ``topk`` with ``fraction``, error feedback on by default; see the module
  docstring) and hands the engine the decoded dense upload, its new composite row and the per-client
  metric ``compress_error`` (||decoded - upload|| / ||upload||) next to the inner metrics. ``int8``
  reads ``batch["client_id"]`` (the global id keys its randomness). Everything else (init, gather,
  aggregator, ...) is ``inner``'s."""

  def __init__(self, inner, kind: str, fraction: float = 0.01, error_feedback: bool = True):
    if kind not in KINDS:
      raise ValueError(f"unknown compression {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "topk" and not 0.0 < float(fraction) <= 1.0:
      raise ValueError(f"top-k needs 0 < fraction <= 1, got {fraction}")
    self.inner, self.kind, self.fraction = inner, kind, float(fraction)
    self.error_feedback = kind == "topk" and bool(error_feedback)
    self.name = f"{inner.name}+{kind}"

  def __getattr__(self, attr):  # aggregator, init, gather, ...: the inner algorithm's
    if attr == "inner":  # not set yet (copy / unpickling): no recursion
      raise AttributeError(attr)
    return getattr(self.inner, attr)

  # rows ------------------------------------------------------------------------------------------------

  def init_row(self, params):
    row = {}
    inner_row = self.inner.init_row(params)
    if inner_row is not None:
      row["inner"] = inner_row
    if self.error_feedback:
      row["residual"] = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return row or None

  def _inner_row(self, row):
    return None if row is None else row.get("inner")

  # client / server -------------------------------------------------------------------------------------

  def _compress(self, server, row, batch, upload):
    """(decoded upload, new residual or None)."""
    if self.kind == "int8":
      if "client_id" not in batch:
        raise ValueError("int8 compression needs batch['client_id'] (the clients' global ids key the rounding)")
      key = jax.random.fold_in(round_key(server), jnp.asarray(batch["client_id"], jnp.int32).reshape(()))
      return int8_tree(upload, key), None
    if not self.error_feedback:
      return topk_tree(upload, self.fraction)[0], None
    residual = row["residual"]
    part = _model_part(upload, jax.tree.structure(residual))
    if part is None:
      return topk_tree(upload, self.fraction, residual)
    sent, new_residual = topk_tree(upload[part], self.fraction, residual)
    return dict(upload, **{part: sent}), new_residual

  def client(self, ctx, server, row, batch, gathered):
    out = self.inner.client(ctx, server, self._inner_row(row), batch, gathered)
    decoded, residual = self._compress(server, row, batch, out.upload)
    new_row = {}
    if row is not None and "inner" in row:
      new_row["inner"] = out.row
    if residual is not None:
      new_row["residual"] = residual
    sums = out.sums
    if getattr(self.inner, "weighting", None) == "uniform" and isinstance(sums, dict) and "delta" in sums:
      sums = dict(sums, delta=decoded)  # SCAFFOLD's uniform mean sums the uploads: the received ones
    metrics = dict(out.metrics or {}, compress_error=relative_error(decoded, out.upload))
    return out._replace(upload=decoded, row=new_row or None, sums=sums, metrics=metrics)

  def server(self, server, aggregate, sums, rows):
    new_server, inner_rows = self.inner.server(server, aggregate, sums, self._inner_row(rows))
    if rows is None:
      return new_server, None
    return new_server, (dict(rows, inner=inner_rows) if "inner" in rows else rows)

  def personal(self, params, row):
    """The inner algorithm's personal params (with its part of the row), or None."""
    personal = getattr(self.inner, "personal", None)
    return None if personal is None else personal(params, self._inner_row(row))

  # accounting ------------------------------------------------------------------------------------------

  def bytes_per_client(self, params_like, upload_like=None) -> int:
    """Bytes one client sends per round with this compression (:func:`upload_bytes`). The upload is
    taken to be shaped like ``params_like`` (a model delta) unless ``upload_like`` is given (FedNova:
    ``{"d": params_like, "tau": ShapeDtypeStruct((), float32)}``)."""
    return upload_bytes(self.kind, params_like if upload_like is None else upload_like, self.fraction)
