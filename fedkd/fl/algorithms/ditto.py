"""Ditto (Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021), with FedAvg as the global solver.

Client i keeps a personal model v_i (its row; at first the initial model). With w the model it received
this round, a round is (the paper's Algorithm 1; both parts take the same K local steps, ``batch["steps"]``
when given, on the same batches, each with a fresh client optimizer)

    global    w_i = local SGD from w on F_i,                       upload d_i = w_i - w   (FedAvg's client),
    personal  v_i <- local SGD from v_i on F_i(v) + (lambda / 2) ||v - w||^2    (gradient + lambda (v - w)),
    server    w <- server_opt(w, -sum_i p_i d_i)     (FedAvg's ``server_step``, p_i the data-size weights).

Client i's site is evaluated with ``personal(w, v_i) = v_i``. ``lambda = 0`` is local-only training of
v_i; a large lambda pulls v_i to w. The reported loss is the global part's (mean over the steps taken);
the client metric ``personal_loss`` is F_i of the personal model over its steps (without the proximal
term). A client whose personal loss is non-finite reports a NaN loss, and the engine checks its new row (v)
as every client's: such a client (e.g. plain SGD with lr * lambda > 2, where the pull overshoots further each
step) counts as non-finite (named when the run stops; with ``skip_nonfinite`` left out of the round, its old
row kept), though its upload alone would look finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedkd.fl.algorithm import ClientOutput, delta, local_sgd, local_steps
from fedkd.fl.algorithms.fedavg import FedAvg
from fedkd.fl.algorithms.fedprox import proximal


class Ditto(FedAvg):
  name = "ditto"

  def __init__(self, server_tx, lam: float):
    super().__init__(server_tx)
    self.lam = float(lam)

  def init_row(self, params):
    return jax.tree.map(jnp.array, params)

  def client(self, ctx, server, row, batch, gathered):
    glob = server["params"]
    xs, ys = batch["x"], batch["y"]
    steps, _ = local_steps(batch, xs)
    local, loss, _ = local_sgd(ctx.seg_loss, ctx.tx, glob, xs, ys, unroll=ctx.unroll, steps=steps)

    def personal_of(v, x, y):
      seg = ctx.seg_loss(v, x, y)
      return seg + 0.5 * self.lam * proximal(v, glob), seg

    v, _, seg = local_sgd(personal_of, ctx.tx, row, xs, ys, unroll=ctx.unroll, has_aux=True, steps=steps)
    on = jnp.ones(xs.shape[0], bool) if steps is None else jnp.arange(xs.shape[0]) < steps
    personal_loss = jnp.sum(jnp.where(on, seg, 0.0)) / jnp.maximum(jnp.sum(on), 1)
    loss = jnp.where(jnp.isfinite(personal_loss), loss, jnp.nan)  # the engine checks the row (v) itself
    return ClientOutput(upload=delta(local, glob), loss=loss, row=v, metrics={"personal_loss": personal_loss})

  def personal(self, params, row):
    return row
