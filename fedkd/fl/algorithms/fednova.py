"""FedNova, normalised averaging (Wang et al., "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020), for plain-SGD local steps.

Client i takes tau_i local SGD steps (``batch["steps"]``, one int per client; without it every client
takes all ``local_steps``) from the server model x to y_i and uploads its normalised update
d_i = (y_i - x) / tau_i (for plain SGD the paper's a_i is tau_i) together with tau_i. With
p_i = weight_i / sum_j weight_j (data sizes) the server forms

    tau_eff = sum_i p_i tau_i,      Delta = tau_eff * sum_i p_i d_i

and steps its optimizer on -Delta (server SGD with learning rate 1: x <- x + Delta, the paper's
update). With equal tau_i it is FedAvg; with unequal ones FedAvg over-weights the clients that took
more steps, FedNova does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedkd.fl.algorithm import ClientOutput, delta, local_sgd, local_steps
from fedkd.fl.algorithms.fedavg import FedAvg, server_step


class FedNova(FedAvg):
  name = "fednova"

  def client(self, ctx, server, row, batch, gathered):
    start = server["params"]
    steps, tau = local_steps(batch, batch["x"])
    local, loss, _ = local_sgd(ctx.seg_loss, ctx.tx, start, batch["x"], batch["y"], unroll=ctx.unroll, steps=steps)
    d = jax.tree.map(lambda a: a / jnp.maximum(tau, 1.0), delta(local, start))
    return ClientOutput(upload={"d": d, "tau": tau}, loss=loss)

  def server(self, server, aggregate, sums, rows):
    tau_eff = aggregate["tau"]  # sum_i p_i tau_i
    return server_step(self.server_tx, server, jax.tree.map(lambda a: tau_eff * a, aggregate["d"])), rows
