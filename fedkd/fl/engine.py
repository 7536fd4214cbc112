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

import contextlib
import functools
import time
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from fedkd.sharding import CLIENTS

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
# Client strategies make_round_fn builds (config also accepts 'auto' and 'measure').
STRATEGIES = ("vmap", "gconv", "bgemm", "hybrid", "unroll", "chunked", "map")
# The vmapped strategies and the conv formulation each traces under (fedkd.models.conv.gemm_convs
# mode; None = XLA's convs); 'chunked' runs one of them (``chunk_strategy``) inside each chunk.
VMAP_CONV_MODES = {"vmap": None, "gconv": "matmul", "bgemm": "gemm", "hybrid": "wgrad"}
# 'measure' on accelerators also times 'unroll' up to this many clients per device (its program, and
# its compile time, grow with every client).
UNROLL_MAX_CLIENTS = 16


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  lr = float(opt_cfg.learning_rate)
  if opt_cfg.name == "sgd":
    return optax.sgd(lr, momentum=float(opt_cfg.momentum) or None)
  if opt_cfg.name == "adam":
    return optax.adam(lr)
  if opt_cfg.name == "adamw":
    return optax.adamw(lr)
  raise ValueError(f"unknown optimizer {opt_cfg.name!r}")


def client_update(
  apply: ApplyFn,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  params: Params,
  xs: jax.Array,
  ys: jax.Array,
  *,
  unroll: bool | int = 1,
  compute_dtype=None,
  remat: bool = False,
  correction: Params | None = None,
):
  """Local training of one client from the server ``params`` over ``xs.shape[0]`` steps.

  ``compute_dtype`` (e.g. ``jnp.bfloat16``): the forward/backward pass runs on params and images cast
  to it while the optimizer state, the parameters it updates (master weights) and the returned delta
  stay in the params' dtype (f32); logits are cast back to f32 before the loss. ``remat``: trace the
  model under ``fedkd.models.remat.remat_blocks()``, so each model block keeps only its input and is
  recomputed in the backward pass (models without remat blocks are unaffected). ``correction``: a
  params-shaped pytree added to every gradient (SCAFFOLD's c - c_i).

  Returns (delta = local params - server params, mean loss over the local steps).
  """

  from fedkd.models.remat import remat_blocks  # models import nothing from the engine; keep it so

  def loss_of(q, x, y):
    if compute_dtype is not None:
      q = jax.tree.map(lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, q)
      x = x.astype(compute_dtype)
    with remat_blocks(remat):
      logits = apply(q, x)
    return loss_fn(logits.astype(jnp.float32), y)

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


def init_server_state(
  params: Params, server_tx: optax.GradientTransformation, rng: jax.Array, algorithm: str = "fedavg"
) -> dict:
  """Server state pytree; holds a copy of ``params`` (the round function donates its state).
  SCAFFOLD adds the server control variate ``control`` (zeros, params-shaped)."""
  params = jax.tree.map(jnp.array, params)
  state = {
    "params": params,
    "opt_state": server_tx.init(params),
    "round": jnp.zeros((), jnp.int32),
    "rng": jax.random.key_data(rng),
  }
  if algorithm == "scaffold":
    state["control"] = jax.tree.map(jnp.zeros_like, params)
  return state


def init_client_state(params: Params, num_rows: int, algorithm: str = "fedavg"):
  """Per-client state of ``num_rows`` clients (SCAFFOLD: control variates c_i = 0), or None."""
  if algorithm != "scaffold":
    return None
  return jax.tree.map(lambda p: jnp.zeros((num_rows,) + p.shape, p.dtype), params)


# 'auto' on GPU/TPU: the fastest strategy measured on an H200 per model (README, "GPU" table) while a
# device holds at most SMALL_SHARD_CLIENTS clients; beyond that 'chunked' (bounded memory: 1,024
# clients at 128 px in a 5.7 GiB buffer plan).
SMALL_SHARD_CLIENTS = 16
AUTO_SMALL_SHARD = {"unet": "hybrid", "transunet": "bgemm"}


def resolve_engine_options(
  engine_cfg, platform: str | None = None, model: str | None = None, clients_per_shard: int | None = None
) -> tuple[str, bool]:
  """Maps 'auto' settings to concrete ones for the backend and model.

  CPU: 'unroll' with unrolled local steps (measured fastest on XLA:CPU). GPU/TPU: local steps in a
  ``lax.scan``; with at most ``SMALL_SHARD_CLIENTS`` clients per device (``clients_per_shard``;
  None = unknown, treated as many) the model's fastest strategy measured on an H200
  (``AUTO_SMALL_SHARD``: UNet 'hybrid' 0.53x, TransUNet 'bgemm' 0.51x of the centralized ceiling),
  otherwise, or for other models, 'chunked' (memory-bounded). 'measure' is not the default there
  because XLA:GPU took 10-86 s to compile each candidate at 128-256 px."""
  platform = platform or jax.default_backend()
  par = engine_cfg.client_parallelism
  if par == "auto":
    if platform == "cpu":
      par = "unroll"
    elif clients_per_shard is not None and clients_per_shard <= SMALL_SHARD_CLIENTS:
      par = AUTO_SMALL_SHARD.get(model, "chunked")
    else:
      par = "chunked"
  unroll = engine_cfg.unroll_local_steps
  if unroll == "auto":
    unroll = platform == "cpu"
  return par, bool(unroll)


def chunk_size(clients: int, chunk: int) -> int:
  """Largest divisor of ``clients`` that is at most ``chunk``."""
  return max(d for d in range(1, min(chunk, clients) + 1) if clients % d == 0)


def make_round_fn(
  apply: ApplyFn,
  loss_fn: LossFn,
  client_tx: optax.GradientTransformation,
  server_tx: optax.GradientTransformation,
  mesh,
  *,
  client_parallelism: str = "vmap",
  unroll_local_steps: bool = False,
  client_chunk: int = 8,
  compute_dtype=None,
  remat: bool = False,
  algorithm: str = "fedavg",
  client_lr: float | None = None,
  num_clients: int | None = None,
  chunk_strategy: str = "bgemm",
  skip_nonfinite: bool = False,
):
  """Returns the jitted round function (state donated).

  FedAvg: ``round_fn(state, xs, ys, weights) -> (state, metrics)``. SCAFFOLD:
  ``round_fn(state, xs, ys, weights, client_state) -> (state, metrics, client_state)`` where
  ``client_state`` holds the sampled clients' control variates c_i (leading client axis, donated).

  ``client_parallelism`` (per device shard):
    ``vmap``    all clients batched by ``jax.vmap`` (per-client conv kernels become grouped convs);
    ``gconv``   ``vmap`` with 1x1 and transposed (upsampling) convs as batched matmuls; the other
                convs, gradients included, stay XLA's grouped convolutions (``gemm_convs(mode="matmul")``);
    ``bgemm``   the same with every convolution computed as im2col patches x weights, i.e. batched
                matrix multiplies over clients (``fedkd.models.conv.gemm_convs``);
    ``hybrid``  ``vmap`` with XLA's (grouped) convolutions for the forward pass and input gradients
                and batched GEMMs for the kernel gradients (``gemm_convs(mode="wgrad")``);
    ``unroll``  each client's ops emitted separately (XLA:CPU's fastest for convolutions);
    ``chunked`` ``lax.scan`` over chunks of ``client_chunk`` clients, ``chunk_strategy`` (one of
                ``VMAP_CONV_MODES``, default bgemm) inside, accumulating the
                weighted delta sum: only one chunk's activations and deltas are alive (many clients
                per device);
    ``map``     ``lax.scan`` over single clients (plain convolutions).
  ``metrics``: ``loss`` (weighted mean over clients), ``client_loss`` [C], ``client_finite`` [C] (the
  client's delta and loss hold no NaN/Inf) and ``finite`` (the new server params hold no NaN/Inf).
  ``skip_nonfinite``: a client whose delta or loss is non-finite gets weight 0 in the aggregate (its
  SCAFFOLD c_i is kept); when no client is finite the server params do not move.

  SCAFFOLD (option II): local gradients get ``c - c_i``; c_i+ = c_i - c + (x - y_i) / (K * client_lr);
  the server adds ``sum_i (c_i+ - c_i) / num_clients`` to c. The server step on the weighted-mean
  delta is the same as FedAvg's.
  """
  from fedkd.models.conv import gemm_convs

  def _convs(mode: str | None):
    return gemm_convs(mode=mode) if mode else contextlib.nullcontext()

  scaffold = algorithm == "scaffold"
  if algorithm not in ("fedavg", "scaffold"):
    raise ValueError(f"unknown algorithm {algorithm!r}")
  if scaffold and (client_lr is None or num_clients is None):
    raise ValueError("SCAFFOLD needs client_lr and num_clients")
  if client_parallelism not in STRATEGIES:
    raise ValueError(f"unknown client_parallelism {client_parallelism!r}")
  if chunk_strategy not in VMAP_CONV_MODES:
    raise ValueError(f"unknown chunk_strategy {chunk_strategy!r}; use one of {', '.join(VMAP_CONV_MODES)}")
  update = functools.partial(
    client_update,
    apply,
    loss_fn,
    client_tx,
    unroll=True if unroll_local_steps else 1,
    compute_dtype=compute_dtype,
    remat=remat,
  )

  def one_client(params, control, x, y, c_i):
    """-> (delta, loss, new c_i or None)."""
    if not scaffold:
      return (*update(params, x, y), None)
    delta, loss = update(params, x, y, correction=jax.tree.map(jnp.subtract, control, c_i))
    k = x.shape[0]
    new_c = jax.tree.map(lambda ci, c, d: ci - c - d / (k * client_lr), c_i, control, delta)
    return delta, loss, new_c

  def finite_rows(d, l):
    """[C] bool: client i's delta (every leaf) and loss are finite."""
    ok = jnp.isfinite(l)
    for leaf in jax.tree.leaves(d):
      ok = ok & jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
    return ok

  def combine(d, l, nc, w, c):
    """Stacked client outputs -> (weighted delta sum, losses, new c, sum of c changes, finite, weights)."""
    ok = finite_rows(d, l)
    if skip_nonfinite:  # zero the rows first: 0 * NaN would still be NaN
      w = jnp.where(ok, w, 0.0)
      d = jax.tree.map(lambda a: jnp.where(ok.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0), d)
      if nc is not None:
        nc = jax.tree.map(lambda a, b: jnp.where(ok.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), nc, c)
    wsum = jax.tree.map(lambda di: jnp.tensordot(w, di, axes=1), d)
    dcsum = None if nc is None else jax.tree.map(lambda a, b: jnp.sum(a - b, axis=0), nc, c)
    return wsum, l, nc, dcsum, ok, w

  def group(params, control, x, y, w, c):
    """Clients of one group, vmapped -> combine(...)."""
    d, l, nc = jax.vmap(one_client, in_axes=(None, None, 0, 0, 0))(params, control, x, y, c)
    return combine(d, l, nc, w, c)

  def shard_body(params, control, xs, ys, w, c):
    # Server params enter replicated; every client trains its own copy, so mark them varying.
    params, control = jax.tree.map(lambda p: jax.lax.pcast(p, CLIENTS, to="varying"), (params, control))
    n = xs.shape[0]
    if client_parallelism == "unroll":
      outs = [
        one_client(params, control, xs[i], ys[i], None if c is None else jax.tree.map(lambda a: a[i], c))
        for i in range(n)
      ]
      stack = lambda *a: jnp.stack(a)  # noqa: E731
      d = jax.tree.map(stack, *[o[0] for o in outs])
      nc = None if c is None else jax.tree.map(stack, *[o[2] for o in outs])
      wsum, losses, nc, dcsum, ok, w = combine(d, jnp.stack([o[1] for o in outs]), nc, w, c)
    elif client_parallelism in VMAP_CONV_MODES:
      with _convs(VMAP_CONV_MODES[client_parallelism]):
        wsum, losses, nc, dcsum, ok, w = group(params, control, xs, ys, w, c)
    else:  # chunked / map: lax.scan over chunks, accumulating the sums
      k = 1 if client_parallelism == "map" else chunk_size(n, client_chunk)
      chunks = jax.tree.map(lambda a: a.reshape((n // k, k) + a.shape[1:]), (xs, ys, w, c))

      def one_chunk(acc, chunk):
        with _convs(VMAP_CONV_MODES[chunk_strategy] if client_parallelism == "chunked" and k > 1 else None):
          ws, l, ncc, dc, okc, wc = group(params, control, *chunk)
        acc = jax.tree.map(jnp.add, acc, (ws, dc))
        return acc, (l, ncc, okc, wc)

      zero = jax.tree.map(jnp.zeros_like, (params, None if c is None else control))
      (wsum, dcsum), (losses, nc, ok, w) = jax.lax.scan(one_chunk, zero, chunks)
      losses, ok, w = losses.reshape(n), ok.reshape(n), w.reshape(n)
      nc = jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), nc)
    wsum = jax.lax.psum(wsum, CLIENTS)
    total = jax.lax.psum(jnp.sum(w), CLIENTS)
    if skip_nonfinite:  # nobody finite: total 0, no move (the host stops the run on that)
      total = jnp.where(total > 0, total, 1.0)
      losses_in = jnp.where(ok, losses, 0.0)
    else:
      losses_in = losses
    mean_delta = jax.tree.map(lambda s: s / total, wsum)
    mean_loss = jax.lax.psum(jnp.sum(w * losses_in), CLIENTS) / total
    dcsum = None if dcsum is None else jax.lax.psum(dcsum, CLIENTS)
    return mean_delta, mean_loss, losses, nc, dcsum, ok

  client_spec = P(CLIENTS) if scaffold else P()  # P() for the empty (None) pytrees of FedAvg
  sharded = jax.shard_map(
    shard_body,
    mesh=mesh,
    in_specs=(P(), P(), P(CLIENTS), P(CLIENTS), P(CLIENTS), client_spec),
    out_specs=(P(), P(), P(CLIENTS), client_spec, P(), P(CLIENTS)),
  )

  def server_step(state, mean_delta, dcsum):
    params = state["params"]
    pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
    updates, opt_state = server_tx.update(pseudo_grad, state["opt_state"], params)
    new_state = dict(state, params=optax.apply_updates(params, updates), opt_state=opt_state, round=state["round"] + 1)
    if scaffold:
      new_state["control"] = jax.tree.map(lambda cc, d: cc + d / num_clients, state["control"], dcsum)
    return new_state

  def metrics(new_state, mean_loss, losses, ok):
    finite = jnp.isfinite(mean_loss)
    for leaf in jax.tree.leaves(new_state["params"]):
      finite = finite & jnp.all(jnp.isfinite(leaf))
    return {"loss": mean_loss, "client_loss": losses, "client_finite": ok, "finite": finite}

  if scaffold:

    def round_fn(state, xs, ys, weights, client_state):
      mean_delta, mean_loss, losses, new_c, dcsum, ok = sharded(
        state["params"], state["control"], xs, ys, weights.astype(jnp.float32), client_state
      )
      new_state = server_step(state, mean_delta, dcsum)
      return new_state, metrics(new_state, mean_loss, losses, ok), new_c

    return jax.jit(round_fn, donate_argnums=(0, 4))

  def round_fn(state, xs, ys, weights):
    mean_delta, mean_loss, losses, _, _, ok = sharded(state["params"], None, xs, ys, weights.astype(jnp.float32), None)
    new_state = server_step(state, mean_delta, None)
    return new_state, metrics(new_state, mean_loss, losses, ok)

  return jax.jit(round_fn, donate_argnums=0)


def measure_candidates(platform: str, clients_per_shard: int, client_chunk: int) -> list[str]:
  """Strategies worth timing on ``platform`` for a shard of ``clients_per_shard`` clients."""
  if platform == "cpu":
    return ["unroll", "bgemm", "vmap"]
  out = ["hybrid", "bgemm", "vmap", "map"]
  if 1 < chunk_size(clients_per_shard, client_chunk) < clients_per_shard:
    out.insert(2, "chunked")
  if clients_per_shard <= UNROLL_MAX_CLIENTS:  # plain (cuDNN) convs, no im2col; program grows per client
    out.append("unroll")
  return out


def measure_strategy(
  build: Callable[[str], Callable],
  candidates: list[str],
  state,
  args: tuple,
  reps: int = 2,
  log: Callable[[str], None] = print,
) -> tuple[str, Callable, list[dict]]:
  """Builds ``build(strategy)`` for each candidate and times ``reps`` rounds on copies of ``state``
  (the real state is untouched, so training numbers do not depend on the measurement). Returns the
  fastest strategy, its round function (already compiled for these shapes) and one record per
  candidate: seconds per round and the first call's seconds (compilation + one round), or the error
  that ruled it out (e.g. running out of device memory)."""
  results, fns = [], {}
  for par in candidates:
    try:
      fn = build(par)
      times = []
      for _ in range(reps + 1):  # the first call compiles
        fresh = jax.block_until_ready(jax.tree.map(jnp.copy, (state, args)))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(fresh[0], *fresh[1]))
        times.append(time.perf_counter() - t0)
      rec = {"strategy": par, "sec_per_round": min(times[1:]), "first_call_s": times[0]}
      fns[par] = fn
    except Exception as e:  # noqa: BLE001 - an out-of-memory or unsupported candidate is skipped
      rec = {"strategy": par, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    results.append(rec)
    log(
      "  engine measure: "
      + (
        f"{par:8s} {rec['sec_per_round']:.4f} s/round (first call, incl. compile, {rec['first_call_s']:.1f} s)"
        if "error" not in rec
        else f"{par:8s} failed: {rec['error']}"
      )
    )
  ok = [r for r in results if "error" not in r]
  if not ok:
    raise RuntimeError(
      "no client strategy could run this round: " + "; ".join(f"{r['strategy']}: {r['error']}" for r in results)
    )
  best = min(ok, key=lambda r: r["sec_per_round"])["strategy"]
  if jax.process_count() > 1:  # every process must run the same program: process 0's timing decides
    from jax.experimental import multihost_utils

    best = candidates[int(multihost_utils.broadcast_one_to_all(jnp.int32(candidates.index(best))))]
    if best not in fns:
      raise RuntimeError(
        f"process 0 chose client strategy {best!r}, which failed on process "
        f"{jax.process_index()}; set engine.client_parallelism explicitly"
      )
  return best, fns[best], results
