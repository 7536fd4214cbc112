"""The federated-algorithm interface every method is written against.

The engine (``fedkd.fl.engine.make_round_fn``) owns everything that is the same for every method:
the clients axis of the mesh and the one ``shard_map``, how a device's clients run (``vmap``, a
``lax.scan`` over chunks, or unrolled), how convolutions are lowered, the aggregation
(``fedkd.fl.aggregate``), NaN bookkeeping and donation. An :class:`Algorithm` supplies only what
makes the method itself:

``init(params, rng)``
    the server state (a dict; ``params``, ``round`` and ``rng`` by convention, plus e.g. the server
    optimizer state or SCAFFOLD's control variate ``c``);
``init_row(params)``
    one client's persistent state (a pytree, e.g. SCAFFOLD's ``c_i``), or None for stateless clients.
    Rows live between rounds in a :mod:`fedkd.fl.client_state` store (host or device) or, when every
    client takes part in every round (FedEFM's silos), directly in the round function's carry;
``gather(batch)``
    per-client data that EVERY client of the round needs (FedEFM: the first batches of each silo,
    on which the overseas experts are trained), or None. The engine ``all_gather``-s it;
``client(ctx, server, row, batch, gathered)``
    one client's local work -> :class:`ClientOutput`: what it sends up (``upload``, e.g. its delta),
    its new row, plain sums (``sums``: summed, unweighted, over every client of the round), its mean
    local loss and per-client metrics;
``server(server, aggregate, sums, rows)``
    the server update from the aggregate of the uploads (a weighted mean, or one gossip-mixed model
    per client) -> (new server state, new rows);
``personal(params, row)``
    the params to evaluate the client's own site with, given the server's params and the client's row
    (FedBN: the server model with the client's norm layers; Ditto: the personal model), or None when the
    algorithm has no personal model (the default).

``aggregator`` names the aggregation (:data:`fedkd.fl.aggregate.AGGREGATORS`). One round function
serves every algorithm: ``round_fn(state, rows, batch, weights, mixing) -> (state, rows, metrics)``.

:func:`local_sgd` is the shared local loop (``lax.scan`` over the local steps, a fresh client optax
optimizer, optional gradient correction), so an algorithm states its local *objective* and nothing
else.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any


class ClientOutput(NamedTuple):
  """One client's result (a pytree, so the engine can vmap / scan / stack it)."""

  upload: Any  # aggregated over the clients (weighted)
  loss: jax.Array  # mean local loss (scalar)
  row: Any = None  # the client's new persistent state (None for stateless algorithms)
  sums: Any = None  # summed over every client of the round, unweighted (e.g. SCAFFOLD's c_i changes)
  metrics: Any = None  # dict of per-client values (e.g. FedEFM's expert weights)


@dataclasses.dataclass(frozen=True)
class ClientContext:
  """What the engine gives every client: the model, the segmentation loss, the client optimizer and the
  numerics of local training."""

  apply: Callable  # (params, x) -> logits
  loss_fn: Callable  # (logits f32, labels) -> scalar
  tx: optax.GradientTransformation  # the client optimizer (fresh state every round)
  apply_wf: Callable | None = None  # (params, x) -> (logits, features [B, h, w, C]); for feature losses
  unroll: bool = False  # unroll the local steps' scan (XLA:CPU's fastest)
  compute_dtype: Any = None  # e.g. jnp.bfloat16: forward/backward in it, master weights f32
  remat: bool = False  # recompute each model block in the backward pass

  def cast(self, q, x):
    """Params and images in the compute dtype (identity when it is None)."""
    if self.compute_dtype is None:
      return q, x
    dt = self.compute_dtype
    q = jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, q)
    return q, x.astype(dt)

  def forward(self, q, x, features: bool = False):
    """Logits (f32) of params ``q`` on images ``x``, or (logits, features) with ``features``."""
    from fedkd.models.remat import remat_blocks  # models import nothing from the FL core; keep it so

    q, x = self.cast(q, x)
    with remat_blocks(self.remat):
      if features:
        logits, feats = self.apply_wf(q, x)
        return logits.astype(jnp.float32), feats
      return self.apply(q, x).astype(jnp.float32)

  def seg_loss(self, q, x, y):
    return self.loss_fn(self.forward(q, x), y)


def local_sgd(
  loss_of: Callable,
  tx: optax.GradientTransformation,
  params: Params,
  xs: jax.Array,
  ys: jax.Array,
  *,
  unroll: bool = False,
  correction: Params | None = None,
  has_aux: bool = False,
  steps: jax.Array | None = None,
  step_scale: jax.Array | None = None,
):
  """Trains ``params`` over the ``xs.shape[0]`` local steps (``lax.scan``) with a fresh ``tx``.

  ``loss_of(q, x, y)`` -> loss (or (loss, aux) with ``has_aux``); ``correction``: a params-shaped
  pytree added to every gradient (SCAFFOLD's c - c_i). ``steps``: this client's number of local steps
  (an int scalar, at most ``xs.shape[0]``; heterogeneous local work), or None for all of them: the
  steps beyond it are masked (``jnp.where`` keeps the params, their loss is not counted; the optimizer
  state, local to this loop, is not used after them), so the program's shape stays static.
  ``step_scale``: a float scalar multiplying every optimizer update (this client's learning rate times
  it; push-sum's 1 / w_i, see :func:`fedkd.fl.topology.push_sum_round`), or None. Returns (local params,
  mean loss over the steps taken, aux stacked over all the steps or None)."""

  def step(carry, batch):
    p, opt_state = carry
    if steps is None:
      x, y = batch
    else:
      i, x, y = batch
    if has_aux:
      (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(p, x, y)
    else:
      (loss, grads), aux = jax.value_and_grad(loss_of)(p, x, y), None
    if correction is not None:
      grads = jax.tree.map(jnp.add, grads, correction)
    updates, new_state = tx.update(grads, opt_state, p)
    if step_scale is not None:
      updates = jax.tree.map(lambda u: (u * step_scale).astype(u.dtype), updates)
    new_p = optax.apply_updates(p, updates)
    if steps is not None:  # a masked step leaves the params as they were
      # The masked steps are the last ones (i >= steps) and the optimizer state is dropped after the
      # loop, so it need not be masked; masking it would also make a fresh replicated leaf (Adam's step
      # count) vary per client, which the engine's shard_map refuses as a scan carry.
      new_p = jax.tree.map(lambda a, b: jnp.where(i < steps, a, b), new_p, p)
    return (new_p, new_state), (loss, aux)

  scanned = (xs, ys) if steps is None else (jnp.arange(xs.shape[0]), xs, ys)
  (local, _), (losses, aux) = jax.lax.scan(step, (params, tx.init(params)), scanned, unroll=True if unroll else 1)
  if steps is None:
    return local, jnp.mean(losses), aux
  on = jnp.arange(xs.shape[0]) < steps
  return local, jnp.sum(jnp.where(on, losses, 0.0)) / jnp.maximum(jnp.sum(on), 1), aux


def local_steps(batch: dict, xs: jax.Array):
  """(steps for :func:`local_sgd`, tau): a client's own step count ``batch["steps"]`` when the batch
  has one (heterogeneous local work), else (None, every step ``xs.shape[0]``)."""
  steps = batch.get("steps")
  if steps is None:
    return None, jnp.float32(xs.shape[0])
  return steps, jnp.asarray(steps, jnp.float32)


def delta(local: Params, start: Params) -> Params:
  return jax.tree.map(jnp.subtract, local, start)


class Algorithm(abc.ABC):
  """Base class: FedAvg's defaults (stateless clients, weighted-mean aggregation, no gathered data).
  Subclasses override what their method changes; see the module docstring."""

  name = "algorithm"
  aggregator = "mean"

  def init(self, params: Params, rng: jax.Array) -> dict:
    params = jax.tree.map(jnp.array, params)  # a copy: the round function donates its state
    return {"params": params, "round": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(rng)}

  def init_row(self, params: Params):
    return None

  def gather(self, batch: dict):
    return None

  @abc.abstractmethod
  def client(self, ctx: ClientContext, server: dict, row, batch: dict, gathered) -> ClientOutput:
    """One client's local work (see the module docstring)."""

  @abc.abstractmethod
  def server(self, server: dict, aggregate, sums, rows):
    """The server update from the aggregate -> (new server state, new rows)."""

  def personal(self, params: Params, row):
    """The params to evaluate this client's own site with, given the server's params and the client's
    row; None when the algorithm has no personal model."""
    return None


def init_rows(algorithm: Algorithm, params: Params, num_rows: int):
  """``num_rows`` copies of ``algorithm.init_row(params)`` on a leading axis, or None."""
  row = algorithm.init_row(params)
  if row is None:
    return None
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_rows,) + jnp.shape(a)).copy(), row)
