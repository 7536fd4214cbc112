"""The federated round as ONE jitted program.

Client data arrive stacked on a leading client axis ([C, local_steps, B, H, W, 1] images,
[C, local_steps, B, H, W] labels, [C] weights) and split over the 'clients' mesh axis. Inside
``jax.shard_map`` each device runs its clients' local training (``client_update``: ``lax.scan`` over
local steps with a fresh client optax optimizer), vectorised with ``vmap`` (or emitted once per client
with ``client_parallelism='unroll'``); the weighted sum of client deltas is ``psum``-reduced over the
axis, and the server optimizer (optax) steps on the negated weighted-mean delta. Plain FedAvg is server
SGD with learning rate 1: new params = params + sum_i w_i delta_i / sum_i w_i.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from fedkd.sharding import CLIENTS

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
# Name the models give to activations that remat keeps (see client_update).
REMAT_NAME = "fedkd_block"


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  lr = float(opt_cfg.learning_rate)
  if opt_cfg.name == "sgd":
    return optax.sgd(lr, momentum=float(opt_cfg.momentum) or None)
  if opt_cfg.name == "adam":
    return optax.adam(lr)
  if opt_cfg.name == "adamw":
    return optax.adamw(lr)
  raise ValueError(f"unknown optimizer {opt_cfg.name!r}")


def client_update(apply: ApplyFn, loss_fn: LossFn, tx: optax.GradientTransformation, params: Params,
                  xs: jax.Array, ys: jax.Array, *, unroll: bool | int = 1, compute_dtype=None,
                  remat: bool = False, correction: Params | None = None):
  """Local training of one client from the server ``params`` over ``xs.shape[0]`` steps.

  ``compute_dtype`` (e.g. ``jnp.bfloat16``): the forward/backward pass runs on params and images cast
  to it while the optimizer state, the parameters it updates (master weights) and the returned delta
  stay in the params' dtype (f32); logits are cast back to f32 before the loss. ``remat``: recompute
  the forward pass in the backward pass, keeping only values the model marked with
  ``jax.ad_checkpoint.checkpoint_name(x, REMAT_NAME)`` (block outputs) — activation memory of one
  block instead of the whole network. ``correction``: a params-shaped pytree added to every gradient
  (SCAFFOLD's c - c_i).

  Returns (delta = local params - server params, mean loss over the local steps).
  """

  def loss_of(q, x, y):
    if compute_dtype is not None:
      q = jax.tree.map(lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, q)
      x = x.astype(compute_dtype)
    return loss_fn(apply(q, x).astype(jnp.float32), y)

  if remat:
    loss_of = jax.checkpoint(loss_of, policy=jax.checkpoint_policies.save_only_these_names(REMAT_NAME))

  def step(carry, batch):
    p, opt_state = carry
    x, y = batch
    loss, grads = jax.value_and_grad(loss_of)(p, x, y)
    if correction is not None:
      grads = jax.tree.map(jnp.add, grads, correction)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  (local, _), losses = jax.lax.scan(step, (params, tx.init(params)), (xs, ys), unroll=unroll)
  return jax.tree.map(jnp.subtract, local, params), jnp.mean(losses)


def init_server_state(params: Params, server_tx: optax.GradientTransformation, rng: jax.Array) -> dict:
  """Server state pytree; holds a copy of ``params`` (the round function donates its state)."""
  params = jax.tree.map(jnp.array, params)
  return {"params": params, "opt_state": server_tx.init(params), "round": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(rng)}


def resolve_engine_options(engine_cfg, platform: str | None = None) -> tuple[str, bool]:
  """Maps 'auto' settings to concrete ones for the backend (CPU: unrolled; accelerators: vmap + scan)."""
  platform = platform or jax.default_backend()
  par = engine_cfg.client_parallelism
  if par == "auto":
    par = "unroll" if platform == "cpu" else "vmap"
  unroll = engine_cfg.unroll_local_steps
  if unroll == "auto":
    unroll = platform == "cpu"
  return par, bool(unroll)


def make_round_fn(apply: ApplyFn, loss_fn: LossFn, client_tx: optax.GradientTransformation,
                  server_tx: optax.GradientTransformation, mesh, *, client_parallelism: str = "vmap",
                  unroll_local_steps: bool = False, client_chunk: int = 8):
  """Returns ``round_fn(state, xs, ys, weights) -> (state, metrics)``, jitted, state donated.

  ``client_parallelism`` (per device shard): ``vmap`` (all clients batched), ``unroll`` (each
  client's ops emitted separately), ``chunked`` (``lax.scan`` over chunks of ``client_chunk`` clients,
  vmapped inside, accumulating the weighted delta sum so per-client deltas of only one chunk are ever
  alive: memory for many clients per device), ``map`` (the same with chunks of one client).
  ``metrics``: ``loss`` (weighted mean over clients) and ``client_loss`` [C].
  """
  update = functools.partial(client_update, apply, loss_fn, client_tx,
                             unroll=True if unroll_local_steps else 1)

  def shard_body(params, xs, ys, w):
    # Server params enter replicated; every client trains its own copy, so mark them varying.
    params = jax.tree.map(lambda p: jax.lax.pcast(p, CLIENTS, to="varying"), params)
    if client_parallelism == "vmap":
      deltas, losses = jax.vmap(update, in_axes=(None, 0, 0))(params, xs, ys)
    elif client_parallelism == "unroll":
      outs = [update(params, xs[i], ys[i]) for i in range(xs.shape[0])]
      deltas = jax.tree.map(lambda *d: jnp.stack(d), *[o[0] for o in outs])
      losses = jnp.stack([o[1] for o in outs])
    elif client_parallelism in ("chunked", "map"):
      c = xs.shape[0]
      k = 1 if client_parallelism == "map" else max(d for d in range(1, min(client_chunk, c) + 1) if c % d == 0)
      chunks = jax.tree.map(lambda a: a.reshape((c // k, k) + a.shape[1:]), (xs, ys, w))

      def one_chunk(acc, chunk):
        x, y, wc = chunk
        d, l = jax.vmap(update, in_axes=(None, 0, 0))(params, x, y)
        return jax.tree.map(lambda a, di: a + jnp.tensordot(wc, di, axes=1), acc, d), l

      zero = jax.tree.map(jnp.zeros_like, params)
      wsum, losses = jax.lax.scan(one_chunk, zero, chunks)
      losses = losses.reshape(c)
    else:
      raise ValueError(f"unknown client_parallelism {client_parallelism!r}")
    if client_parallelism not in ("chunked", "map"):
      wsum = jax.tree.map(lambda d: jnp.tensordot(w, d, axes=1), deltas)
    wsum = jax.lax.psum(wsum, CLIENTS)
    total = jax.lax.psum(jnp.sum(w), CLIENTS)
    mean_delta = jax.tree.map(lambda s: s / total, wsum)
    mean_loss = jax.lax.psum(jnp.sum(w * losses), CLIENTS) / total
    return mean_delta, mean_loss, losses

  sharded = jax.shard_map(shard_body, mesh=mesh,
                          in_specs=(P(), P(CLIENTS), P(CLIENTS), P(CLIENTS)),
                          out_specs=(P(), P(), P(CLIENTS)))

  def round_fn(state, xs, ys, weights):
    params = state["params"]
    mean_delta, mean_loss, client_losses = sharded(params, xs, ys, weights.astype(jnp.float32))
    pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
    updates, opt_state = server_tx.update(pseudo_grad, state["opt_state"], params)
    new_state = dict(state, params=optax.apply_updates(params, updates), opt_state=opt_state,
                     round=state["round"] + 1)
    return new_state, {"loss": mean_loss, "client_loss": client_losses}

  return jax.jit(round_fn, donate_argnums=0)
