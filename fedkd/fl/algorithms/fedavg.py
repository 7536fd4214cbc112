"""FedAvg (McMahan et al. 2017) with a server optimizer (FedOpt, Reddi et al. 2021).

Every client starts from the server model, trains ``local_steps`` steps and uploads its delta; the
server treats the negated weighted-mean delta as a gradient for its optax optimizer. Server SGD with
learning rate 1 is plain FedAvg (new = old + mean delta); SGD with momentum is FedAvgM, Adam FedAdam.
An optional ``batch["steps"]`` (one int per client) gives each client its own number of local steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedkd.fl.algorithm import Algorithm, ClientOutput, delta, local_sgd, local_steps


def server_step(server_tx: optax.GradientTransformation, server: dict, mean_delta) -> dict:
  """The server optimizer's step on the pseudo-gradient -mean_delta; the round counter advances."""
  params = server["params"]
  updates, opt_state = server_tx.update(jax.tree.map(jnp.negative, mean_delta), server["opt_state"], params)
  return dict(server, params=optax.apply_updates(params, updates), opt_state=opt_state, round=server["round"] + 1)


class FedAvg(Algorithm):
  name = "fedavg"

  def __init__(self, server_tx: optax.GradientTransformation):
    self.server_tx = server_tx

  def init(self, params, rng):
    state = super().init(params, rng)
    return {"params": state["params"], "opt_state": self.server_tx.init(state["params"]), **state}

  def client(self, ctx, server, row, batch, gathered):
    start = server["params"]
    steps, _ = local_steps(batch, batch["x"])
    local, loss, _ = local_sgd(ctx.seg_loss, ctx.tx, start, batch["x"], batch["y"], unroll=ctx.unroll, steps=steps)
    return ClientOutput(upload=delta(local, start), loss=loss)

  def server(self, server, aggregate, sums, rows):
    return server_step(self.server_tx, server, aggregate), rows
