"""MOON, model-contrastive federated learning (Li, He & Song, CVPR 2021).

The local objective adds mu * l_con to the segmentation loss, where for the pooled, L2-normalised
representation z of the model being trained, z_glob of the model received this round and z_prev of
the client's own model after its previous local training,

    l_con = -log( exp(z.z_glob / tau) / (exp(z.z_glob / tau) + exp(z.z_prev / tau)) )

(cosine similarities, averaged over the batch). The server is FedAvg's. The client's row holds its
previous local model; a client never sampled before uses the received model as its previous one.
:func:`contrastive` is shared with FedEFM's MOON baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedkd.fl.algorithm import ClientOutput, delta, local_sgd, local_steps
from fedkd.fl.algorithms.fedavg import FedAvg


def pooled(feats: jax.Array) -> jax.Array:
  """[B, h, w, C] -> L2-normalised [B, C] (the representation MOON contrasts)."""
  z = jnp.mean(feats.astype(jnp.float32), axis=(1, 2))
  return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True), 1e-12))


def contrastive(z: jax.Array, z_glob: jax.Array, z_prev: jax.Array, tau: float) -> jax.Array:
  """Batch-mean l_con for normalised representations [B, C] (z_glob, z_prev: no gradient)."""
  pos = jnp.sum(z * jax.lax.stop_gradient(z_glob), -1) / tau
  neg = jnp.sum(z * jax.lax.stop_gradient(z_prev), -1) / tau
  return jnp.mean(jnp.logaddexp(pos, neg) - pos)


class Moon(FedAvg):
  name = "moon"

  def __init__(self, server_tx, mu: float, tau: float):
    super().__init__(server_tx)
    self.mu, self.tau = float(mu), float(tau)

  def init_row(self, params):
    return {"prev": jax.tree.map(jnp.zeros_like, params), "seen": jnp.zeros((), jnp.float32)}

  def client(self, ctx, server, row, batch, gathered):
    glob = server["params"]
    prev = jax.tree.map(lambda p, g: jnp.where(row["seen"] > 0, p, g), row["prev"], glob)

    def loss_of(q, x, y):
      logits, feats = ctx.forward(q, x, features=True)
      seg = ctx.loss_fn(logits, y)
      con = contrastive(
        pooled(feats), pooled(ctx.forward(glob, x, True)[1]), pooled(ctx.forward(prev, x, True)[1]), self.tau
      )
      return seg + self.mu * con, {"seg": seg, "moon": con}

    steps, _ = local_steps(batch, batch["x"])
    local, loss, aux = local_sgd(
      loss_of, ctx.tx, glob, batch["x"], batch["y"], unroll=ctx.unroll, has_aux=True, steps=steps
    )
    new_row = {"prev": local, "seen": jnp.ones_like(row["seen"])}
    return ClientOutput(
      upload=delta(local, glob), loss=loss, row=new_row, metrics={k: jnp.mean(v) for k, v in aux.items()}
    )
