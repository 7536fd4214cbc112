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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedkd.sharding import CLIENTS


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


AGGREGATORS = {"mean": Mean, "gossip": Gossip}
