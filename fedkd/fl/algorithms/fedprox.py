"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Client i minimises its local objective plus a proximal term that keeps it near the model it received,

    h_i(w) = F_i(w) + (mu / 2) ||w - w_global||^2,

with the shared local loop (any client optimizer; an optional ``batch["steps"]`` gives each client its
own number of local steps, the paper's variable local work). The server is FedAvg's (weighted-mean
delta through the server optimizer). ``mu = 0`` is FedAvg.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedkd.fl.algorithm import ClientOutput, delta, local_sgd, local_steps
from fedkd.fl.algorithms.fedavg import FedAvg


def proximal(q, anchor) -> jax.Array:
  """||q - anchor||^2 over every leaf (f32)."""
  return sum(
    jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(anchor))
  )


class FedProx(FedAvg):
  name = "fedprox"

  def __init__(self, server_tx, mu: float):
    super().__init__(server_tx)
    self.mu = mu  # a float, or a traced scalar (replicas that differ in it)

  def client(self, ctx, server, row, batch, gathered):
    glob = server["params"]

    def loss_of(q, x, y):
      return ctx.seg_loss(q, x, y) + 0.5 * self.mu * proximal(q, glob)

    steps, _ = local_steps(batch, batch["x"])
    local, loss, _ = local_sgd(loss_of, ctx.tx, glob, batch["x"], batch["y"], unroll=ctx.unroll, steps=steps)
    return ClientOutput(upload=delta(local, glob), loss=loss)
