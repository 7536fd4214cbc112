"""SCAFFOLD (Karimireddy et al. 2020), option II control variates.

Client i keeps c_i (its row; zeros at first). Local gradients get the correction c - c_i; after K
local steps with learning rate lr, c_i+ = c_i - c + (x - y_i) / (K lr). The server steps on the
weighted-mean delta as FedAvg does and adds sum_i (c_i+ - c_i) / num_clients to c.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedkd.fl.algorithm import ClientOutput, delta, local_sgd
from fedkd.fl.algorithms.fedavg import FedAvg, server_step


class Scaffold(FedAvg):
  name = "scaffold"

  def __init__(self, server_tx, client_lr: float, num_clients: int):
    super().__init__(server_tx)
    self.client_lr, self.num_clients = float(client_lr), int(num_clients)

  def init(self, params, rng):
    state = super().init(params, rng)
    state["control"] = jax.tree.map(jnp.zeros_like, state["params"])
    return state

  def init_row(self, params):
    return jax.tree.map(jnp.zeros_like, params)

  def client(self, ctx, server, c_i, batch, gathered):
    start, c = server["params"], server["control"]
    local, loss, _ = local_sgd(
      ctx.seg_loss,
      ctx.tx,
      start,
      batch["x"],
      batch["y"],
      unroll=ctx.unroll,
      correction=jax.tree.map(jnp.subtract, c, c_i),
    )
    d = delta(local, start)
    k = batch["x"].shape[0]
    new_c = jax.tree.map(lambda ci, cc, di: ci - cc - di / (k * self.client_lr), c_i, c, d)
    return ClientOutput(upload=d, loss=loss, row=new_c, sums=jax.tree.map(jnp.subtract, new_c, c_i))

  def server(self, server, aggregate, sums, rows):
    new = server_step(self.server_tx, server, aggregate)
    new["control"] = jax.tree.map(lambda cc, s: cc + s / self.num_clients, server["control"], sums)
    return new, rows
