"""SCAFFOLD (Karimireddy et al. 2020), option II control variates.

Client i keeps c_i (its row; zeros at first). Local gradients get the correction c - c_i; after K
local steps (``batch["steps"]`` when given) with learning rate lr, c_i+ = c_i - c + (x - y_i) / (K lr).
With S the round's clients and N = num_clients, the server updates (the paper's Algorithm 1)

    x <- x + eta_g (1/|S|) sum_{i in S} (y_i - x),      c <- c + (1/N) sum_{i in S} (c_i+ - c_i)

(``weighting='uniform'``, the default; eta_g and any server optimizer via ``server_tx``).
``weighting='data_size'`` is the earlier behaviour: the deltas are averaged weighted by the clients'
dataset sizes (FedAvg's weighted mean), the control update stays (1/N) sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedkd.fl.algorithm import ClientOutput, delta, local_sgd, local_steps
from fedkd.fl.algorithms.fedavg import FedAvg, server_step

WEIGHTINGS = ("uniform", "data_size")


class Scaffold(FedAvg):
  name = "scaffold"

  def __init__(self, server_tx, client_lr: float, num_clients: int, weighting: str = "uniform"):
    super().__init__(server_tx)
    if weighting not in WEIGHTINGS:
      raise ValueError(f"unknown SCAFFOLD weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
    self.client_lr, self.num_clients, self.weighting = float(client_lr), int(num_clients), weighting

  def init(self, params, rng):
    state = super().init(params, rng)
    state["control"] = jax.tree.map(jnp.zeros_like, state["params"])
    return state

  def init_row(self, params):
    return jax.tree.map(jnp.zeros_like, params)

  def client(self, ctx, server, c_i, batch, gathered):
    start, c = server["params"], server["control"]
    steps, k = local_steps(batch, batch["x"])
    local, loss, _ = local_sgd(
      ctx.seg_loss,
      ctx.tx,
      start,
      batch["x"],
      batch["y"],
      unroll=ctx.unroll,
      correction=jax.tree.map(jnp.subtract, c, c_i),
      steps=steps,
    )
    d = delta(local, start)
    if steps is None:  # k a Python number: the recorded (pre-redesign) numerics
      k = batch["x"].shape[0]
    else:
      k = jnp.maximum(k, 1.0)
    new_c = jax.tree.map(lambda ci, cc, di: ci - cc - di / (k * self.client_lr), c_i, c, d)
    sums = {"dc": jax.tree.map(jnp.subtract, new_c, c_i)}
    if self.weighting == "uniform":  # (1/|S|) sum of deltas: unweighted sums (skipped clients count 0)
      sums["delta"], sums["count"] = d, jnp.ones((), jnp.float32)
    return ClientOutput(upload=d, loss=loss, row=new_c, sums=sums)

  def server(self, server, aggregate, sums, rows):
    if self.weighting == "uniform":
      count = jnp.maximum(sums["count"], 1.0)
      aggregate = jax.tree.map(lambda s: s / count, sums["delta"])
    new = server_step(self.server_tx, server, aggregate)
    new["control"] = jax.tree.map(lambda cc, s: cc + s / self.num_clients, server["control"], sums["dc"])
    return new, rows
