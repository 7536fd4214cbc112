"""The federated round as ONE jitted program, for every algorithm.

Client data arrive stacked on a leading client axis (``batch["x"]`` [C, local_steps, B, H, W, 1],
``batch["y"]`` [C, local_steps, B, H, W], plus whatever per-client inputs the algorithm reads) with
weights [C], split over the 'clients' mesh axis. Inside the one ``jax.shard_map`` of the codebase each
device runs its clients' local work (``algorithm.client``), reduces their uploads with the algorithm's
aggregator (:mod:`fedkd.fl.aggregate`: a ``psum`` weighted mean, or gossip with a mixing matrix) and
applies the algorithm's server step. Two orthogonal knobs set how a device computes its clients:

``layout`` (how a device's clients run)
    ``vmap``     all of them batched by ``jax.vmap`` (per-client conv kernels become grouped convs);
    ``chunked``  a ``lax.scan`` over chunks of ``client_chunk`` clients, vmapped inside; a linear
                 aggregator (the mean) is accumulated chunk by chunk, so only one chunk's activations
                 and uploads are alive (many clients per device); ``client_chunk=1`` runs them one by one;
    ``unroll``   each client's ops emitted separately (XLA:CPU's fastest; the program grows per client).
``lowering`` (how convolutions are computed; :func:`fedkd.models.conv.gemm_convs`)
    ``xla``      XLA's convolutions (vmapped: grouped convolutions);
    ``gemm``     im2col patches x weights for the forward pass and both gradients: batched GEMMs;
    ``wgrad``    XLA's convolutions forward and for the input gradient, GEMMs for the kernel gradient;
    ``matmul``   XLA's convolutions, except the convs that are matmuls (1x1 kernels, UNet's 2x2 stride-2
                 transposed convs: einsum + pixel shuffle), whose XLA:CPU kernel gradient is a slow
                 base-dilated convolution, and those with at most 16 output positions per image
                 (im2col GEMMs; the CPU default).

``resolve`` maps ``auto`` to the measured choice per backend and model (docs/engine.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from fedkd import hostmem
from fedkd.fl.aggregate import AGGREGATORS
from fedkd.fl.algorithm import Algorithm, ClientContext, ClientOutput
from fedkd.sharding import CLIENTS

LAYOUTS = ("vmap", "chunked", "unroll")
LOWERINGS = ("xla", "gemm", "wgrad", "matmul")
# 'auto' on GPU/TPU: the fastest (layout, lowering) measured on an H200 per model while a device holds
# at most SMALL_SHARD_CLIENTS clients (docs/engine.md, "GPU": UNet vmap+wgrad 0.53x, TransUNet vmap+gemm
# 0.51x of the centralized ceiling); beyond that chunked + gemm (bounded memory: 1,024 clients at 128 px
# in a 5.7 GiB buffer plan).
SMALL_SHARD_CLIENTS = 16
# clients_in_flight 'auto' on CPU is cores per device, times this where freed host memory is kept
# (fedkd.hostmem): then a larger temporary buffer costs no page faults, and on a 2-core VM 8 clients in
# lockstep (XLA's schedule) ran faster than 2, 4 or 6 in flight (docs/engine.md)
KEPT_MEMORY_IN_FLIGHT = 4
AUTO_SMALL_SHARD = {"unet": "wgrad", "transunet": "gemm"}
# engine.client_parallelism names of the previous release -> (layout, lowering, client_chunk or None).
LEGACY_PARALLELISM = {
  "vmap": ("vmap", "xla", None),
  "bgemm": ("vmap", "gemm", None),
  "hybrid": ("vmap", "wgrad", None),
  "unroll": ("unroll", "xla", None),
  "chunked": ("chunked", None, None),  # lowering from the old engine.chunk_strategy
  "map": ("chunked", "xla", 1),
}
LEGACY_CHUNK_STRATEGY = {"vmap": "xla", "bgemm": "gemm", "hybrid": "wgrad"}


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  layout: str = "vmap"
  lowering: str = "xla"
  client_chunk: int = 8
  unroll_local_steps: bool = False
  # unroll with a linear aggregate: client i starts only once the running sum holds clients 0..i-k, so
  # at most k clients' temporaries are alive (0 = XLA's own schedule, which runs all of them in lockstep)
  clients_in_flight: int = 0


ADAMW_WEIGHT_DECAY = 1e-4  # optax.adamw's default, what adamw applied before its config key existed


def make_optimizer(opt_cfg, learning_rate=None) -> optax.GradientTransformation:
  """The optax optimizer of a ``client_optimizer`` / ``server_optimizer`` config. A config with ``b1``,
  ``b2``, ``eps`` (the server's) passes them to adam / adamw; without them optax's defaults apply.
  adamw's decoupled weight decay is the config's ``weight_decay`` (a config without the key, written before
  it existed: optax's default 1e-4, which it got then).
  ``yogi`` / ``adagrad`` (server only): Reddi et al. 2021's Algorithm 2 (:mod:`fedkd.fl.fedopt`).
  ``learning_rate``: instead of the config's, e.g. a traced scalar (replicas that differ in it share one
  program); the optimizer state has the same structure and the updates the same values either way."""
  from fedkd.fl import fedopt

  lr = float(opt_cfg.learning_rate) if learning_rate is None else learning_rate
  adaptive = {k: float(opt_cfg[k]) for k in ("b1", "b2", "eps") if k in opt_cfg}
  if opt_cfg.name == "sgd":
    return optax.sgd(lr, momentum=float(opt_cfg.momentum) or None)
  if opt_cfg.name == "adam":
    return optax.adam(lr, **adaptive)
  if opt_cfg.name == "adamw":
    return optax.adamw(lr, weight_decay=float(opt_cfg.get("weight_decay", ADAMW_WEIGHT_DECAY)), **adaptive)
  if opt_cfg.name in fedopt.KINDS:
    return fedopt.fedopt(
      opt_cfg.name, lr, float(opt_cfg.b1), float(opt_cfg.b2), float(opt_cfg.eps), float(opt_cfg.initial_accumulator)
    )
  raise ValueError(f"unknown optimizer {opt_cfg.name!r}")


def legacy_options(engine_cfg, log: Callable[[str], None] | None = None) -> tuple[str, str, int]:
  """(client_layout, conv_lowering, client_chunk) of an engine config, mapping the deprecated
  ``client_parallelism`` / ``chunk_strategy`` keys (with one deprecation line) when a config sets them.
  A deprecated key beside a ``client_layout`` / ``conv_lowering`` (not 'auto') that means something else,
  or a ``chunk_strategy`` with a ``client_parallelism`` other than 'chunked', is a ConfigError."""
  from fedkd.config import ConfigError  # a leaf module (imports nothing from fedkd)

  layout, lowering, chunk = engine_cfg.client_layout, engine_cfg.conv_lowering, engine_cfg.client_chunk
  old = engine_cfg.get("client_parallelism", "") or ""
  strategy = engine_cfg.get("chunk_strategy", "") or ""
  if not old and not strategy:
    return layout, lowering, chunk
  if old and strategy and old != "chunked":
    raise ConfigError(
      f"config.engine.chunk_strategy={strategy!r} applies to client_parallelism='chunked' only, not {old!r}; "
      "remove --config.engine.chunk_strategy"
    )
  meant_layout, meant_lowering, ch = LEGACY_PARALLELISM[old] if old else (None, None, None)
  meant_lowering = meant_lowering or LEGACY_CHUNK_STRATEGY[strategy or "bgemm"]
  key = "client_parallelism" if old else "chunk_strategy"
  for name, given, meant in (("client_layout", layout, meant_layout), ("conv_lowering", lowering, meant_lowering)):
    if meant is not None and given not in ("auto", meant):
      raise ConfigError(
        f"config.engine.{key}={old or strategy!r} (deprecated) means {name}={meant!r}, but config.engine.{name}="
        f"{given!r}; remove --config.engine.{key} and keep --config.engine.{name}={given}"
      )
  if old:
    layout, lowering, chunk = meant_layout, meant_lowering, ch or chunk
    if log is not None:
      log(
        f"note: config.engine.client_parallelism={old!r} is deprecated (removed in the next release); it means "
        f"--config.engine.client_layout={layout} --config.engine.conv_lowering={lowering}"
        + (f" --config.engine.client_chunk={chunk}" if ch else "")
      )
  else:
    lowering = meant_lowering
    if log is not None:
      log(f"note: config.engine.chunk_strategy is deprecated; use --config.engine.conv_lowering={lowering}")
  return layout, lowering, chunk


def resolve(
  layout: str,
  lowering: str,
  unroll_local_steps,
  *,
  platform: str | None = None,
  model: str | None = None,
  clients_per_shard: int | None = None,
  client_chunk: int = 8,
  clients_in_flight="auto",
) -> EngineOptions:
  """Concrete engine options for the backend and model ('auto' -> the measured choice).

  CPU: ``unroll`` + ``matmul`` with unrolled local steps (measured fastest on XLA:CPU; another CPU layout
  keeps ``xla``). GPU/TPU: local
  steps in a ``lax.scan``; with at most ``SMALL_SHARD_CLIENTS`` clients per device (None = unknown,
  treated as many) ``vmap`` with the model's fastest lowering measured on an H200
  (``AUTO_SMALL_SHARD``), otherwise, or for other models, ``chunked`` + ``gemm`` (memory-bounded).
  ``clients_in_flight`` acts on ``unroll`` only (0 for other layouts); 'auto': on CPU the host cores per
  device (at least 1), times ``KEPT_MEMORY_IN_FLIGHT`` where freed host memory is kept and reaches the
  round (``fedkd.hostmem.in_effect``: one CPU device), else 0."""
  platform = platform or jax.default_backend()
  small = clients_per_shard is not None and clients_per_shard <= SMALL_SHARD_CLIENTS
  if layout == "auto":
    layout = "unroll" if platform == "cpu" else ("vmap" if small and model in AUTO_SMALL_SHARD else "chunked")
  if lowering == "auto":
    if platform == "cpu":
      lowering = "matmul" if layout == "unroll" else "xla"
    elif layout == "unroll":
      lowering = "xla"
    elif layout == "vmap" and model in AUTO_SMALL_SHARD:
      lowering = AUTO_SMALL_SHARD[model]
    else:
      lowering = "gemm"
  if layout not in LAYOUTS:
    raise ValueError(f"unknown client layout {layout!r}; use one of {', '.join(LAYOUTS)} or auto")
  if lowering not in LOWERINGS:
    raise ValueError(f"unknown conv lowering {lowering!r}; use one of {', '.join(LOWERINGS)} or auto")
  unroll = platform == "cpu" if unroll_local_steps == "auto" else bool(unroll_local_steps)
  if layout != "unroll":  # the other layouts have no client order to bound
    clients_in_flight = 0
  elif clients_in_flight == "auto" and platform != "cpu":
    clients_in_flight = 0
  elif clients_in_flight == "auto":
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    kept = KEPT_MEMORY_IN_FLIGHT if hostmem.in_effect() else 1
    clients_in_flight = max(1, cores // jax.local_device_count("cpu")) * kept
  return EngineOptions(layout, lowering, int(client_chunk), unroll, int(clients_in_flight))


def chunk_size(clients: int, chunk: int) -> int:
  """Largest divisor of ``clients`` that is at most ``chunk``."""
  return max(d for d in range(1, min(chunk, clients) + 1) if clients % d == 0)


def _aggregator(algorithm: Algorithm):
  """The aggregator object of ``algorithm``: a name of fedkd.fl.aggregate.AGGREGATORS, or an object (one
  with parameters)."""
  agg = algorithm.aggregator
  return AGGREGATORS[agg] if isinstance(agg, str) else agg


def effective_options(options: EngineOptions, algorithm: Algorithm) -> EngineOptions:
  """``options`` as :func:`make_round_fn` runs them for ``algorithm``: ``clients_in_flight`` orders the
  running sum of a linear aggregate, so under another aggregator (median, trimmed mean, Krum) it is 0 (the
  unrolled clients run on XLA's own schedule). For logs: ``describe(effective_options(...))``."""
  if options.clients_in_flight and not _aggregator(algorithm).linear:
    return dataclasses.replace(options, clients_in_flight=0)
  return options


def _lowered(lowering: str):
  from fedkd.models.conv import gemm_convs  # models import nothing from the FL core

  return contextlib.nullcontext() if lowering == "xla" else gemm_convs(mode=lowering)


def _finite_rows(upload, loss) -> jax.Array:
  """[n] bool: client i's upload (every leaf; any tree with a leading client axis) and loss are finite."""
  ok = jnp.isfinite(loss)
  for leaf in jax.tree.leaves(upload):
    ok = ok & jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
  return ok


def _where_rows(ok, new, old):
  return jax.tree.map(lambda a, b: jnp.where(ok.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def _all_finite(*trees) -> jax.Array:
  finite = jnp.array(True)
  for leaf in jax.tree.leaves(trees):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      finite = finite & jnp.all(jnp.isfinite(leaf))
  return finite


def make_round_fn(
  algorithm: Algorithm,
  ctx: ClientContext,
  mesh,
  options: EngineOptions = EngineOptions(),
  *,
  skip_nonfinite: bool = False,
  rebuild: Callable[[dict], tuple[Algorithm, ClientContext]] | None = None,
):
  """Returns the jitted ``round_fn(state, rows, batch, weights, mixing, hparams) -> (state, rows,
  metrics)`` (``state`` and ``rows`` donated).

  ``state``: the server state (``algorithm.init``, replicated); ``rows``: the round's clients' rows
  (``algorithm.init_row`` stacked on a leading client axis, split over the mesh) or None; ``batch``: dict
  of per-client arrays with a leading client axis (``x``, ``y`` and the algorithm's inputs); ``weights``
  [C]; ``mixing``: the gossip matrix W [C, C] (replicated) or None; ``hparams``: None, or a dict of
  scalars (replicated) from which ``rebuild(hparams) -> (algorithm, ctx)`` makes this round's algorithm
  and client context (hyperparameters as traced inputs: replicas of one program that differ in a
  learning rate, :mod:`fedkd.tasks.replicas`; the aggregator stays ``algorithm``'s).

  ``metrics``: ``loss`` (weighted mean over clients), ``client_loss`` [C], ``client_finite`` [C] (the
  client's upload and loss hold no NaN/Inf), ``finite`` (the new state and rows hold no NaN/Inf) and the
  algorithm's per-client metrics [C, ...]. ``skip_nonfinite``: a client whose upload or loss is
  non-finite gets weight 0 and keeps its old row (linear aggregators; the robust ones, median, trimmed mean
  and Krum, always treat such a client so: their statistic leaves it out, and so do the loss and the rows).
  ``batch["reported"]`` [C] bool
  (optional; client dropout): a client that did not report computes (static shapes) but gets weight 0, zero
  sums, keeps its old row, is left out of the mean loss and counts as finite. In either case, when no client
  counts the server state stays as it was (no server-optimizer step on a zero aggregate: momentum and Adam
  moments do not move the model) except its round counter, which advances; so it does when fewer clients count
  than the aggregator's ``min_counting`` (Krum's f + 3; the trimmed mean's fewest that trim anything), whose
  statistic would then not be robust. ``metrics["aggregated"]``: whether the server took the round's aggregate.
  """
  agg = _aggregator(algorithm)
  options = effective_options(options, algorithm)
  if skip_nonfinite and not agg.linear:
    raise ValueError(f"skip_nonfinite needs a linear aggregator; {algorithm.name} uses {agg.name}")
  skip_nonfinite = skip_nonfinite or not (agg.linear or agg.per_client)  # a robust statistic drops them anyway
  min_counting = getattr(agg, "min_counting", 1)
  if options.layout not in LAYOUTS or options.lowering not in LOWERINGS:
    raise ValueError(f"unknown engine options {options}; resolve them with fedkd.fl.engine.resolve")

  def settle(out: ClientOutput, w, rows, reported):
    """One group of clients' stacked outputs -> (aggregate part, sums part, per-client outputs).
    ``reported`` [n] bool or None (everyone reported)."""
    # a non-finite new row (a personal model, norm layers the upload leaves out) fails the client too
    ok = _finite_rows((out.upload, out.row), out.loss)
    upload, sums, new_rows = out.upload, out.sums, out.row
    keep = ok if skip_nonfinite else None
    if reported is not None:  # a client that did not report counts nowhere and keeps its row
      ok = ok | ~reported  # ... and its upload cannot make the round diverge
      keep = reported if keep is None else keep & reported
    if keep is not None:  # zero the rows first: 0 * NaN would still be NaN
      w = jnp.where(keep, w, 0.0)
      upload = _where_rows(keep, upload, jax.tree.map(jnp.zeros_like, upload))
      sums = None if sums is None else _where_rows(keep, sums, jax.tree.map(jnp.zeros_like, sums))
      new_rows = None if new_rows is None else _where_rows(keep, new_rows, rows)
    part = agg.partial(upload, w) if agg.linear else upload
    sums = None if sums is None else jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)
    return part, sums, (out.loss, ok, w, new_rows, out.metrics)

  def shard_body(state, rows, batch, weights, mixing, hparams):
    if hparams is not None and rebuild is None:
      raise ValueError("round_fn got hparams, but make_round_fn no rebuild to apply them")
    alg, cx = (algorithm, ctx) if hparams is None else rebuild(hparams)
    cx = dataclasses.replace(cx, unroll=options.unroll_local_steps)
    # The server state enters replicated; every client works on its own copy, so mark it varying.
    server = jax.tree.map(lambda a: jax.lax.pcast(a, CLIENTS, to="varying"), state)
    gathered = alg.gather(batch)
    if gathered is not None:
      gathered = jax.tree.map(lambda a: jax.lax.all_gather(a, CLIENTS, tiled=True), gathered)
    client = lambda row, b: alg.client(cx, server, row, b, gathered)  # noqa: E731
    n = weights.shape[0]

    def one_client(r, b):  # unroll: a group of one client, its outputs given back their leading axis
      return jax.tree.map(lambda a: a[None], client(*jax.tree.map(lambda a: a[0], (r, b))))

    def group(r, b, w, run=jax.vmap(client)):
      """Settles the clients on the leading axis of (rows, batch, weights)."""
      return settle(run(r, b), w, r, b.get("reported"))

    with _lowered(options.lowering):
      if options.layout == "unroll" and 0 < options.clients_in_flight < n:
        part, sums, per = _unrolled_in_order(group, one_client, (rows, batch, weights), n, options.clients_in_flight)
      elif options.layout == "unroll":
        # Each client is settled on its own and a linear aggregate adds their parts: stacking every
        # upload into [n, ...] first costs a copy of all of them per round.
        pieces = [group(*jax.tree.map(lambda a: a[i : i + 1], (rows, batch, weights)), one_client) for i in range(n)]
        parts, sums, per = zip(*pieces)
        part, sums, per = _add(*parts) if agg.linear else _concat(*parts), _add(*sums), _concat(*per)
      elif options.layout == "vmap":
        part, sums, per = group(rows, batch, weights)
      else:  # chunked: lax.scan over chunks of k clients
        k = chunk_size(n, options.client_chunk)
        chunks = jax.tree.map(lambda a: a.reshape((n // k, k) + a.shape[1:]), (rows, batch, weights))

        def one_chunk(acc, chunk):
          part, sums, per = group(*chunk)
          if agg.linear:
            return jax.tree.map(jnp.add, acc, (part, sums)), per
          return (None, jax.tree.map(jnp.add, acc[1], sums)), (per, part)

        part_shape, sums_shape, _ = jax.eval_shape(group, *jax.tree.map(lambda a: a[0], chunks))
        zero = jax.tree.map(  # varying like what is added to it
          lambda s: jax.lax.pcast(jnp.zeros(s.shape, s.dtype), CLIENTS, to="varying"),
          (part_shape if agg.linear else None, sums_shape),
        )
        (part, sums), ys = jax.lax.scan(one_chunk, zero, chunks)
        if agg.linear:
          per = ys
        else:
          per, part = ys
          part = jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), part)
        per = jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), per)
    losses, ok, w, new_rows, client_metrics = per
    total = jax.lax.psum(jnp.sum(w), CLIENTS)
    anyone = total > 0
    aggregated = anyone  # whether the server takes the round's aggregate
    if min_counting > 1:  # a robust statistic (skip_nonfinite is on: w > 0 is exactly the counting clients)
      aggregated = anyone & (jax.lax.psum(jnp.sum((w > 0).astype(jnp.int32)), CLIENTS) >= min_counting)
    if skip_nonfinite or "reported" in batch:  # nobody counts: total 0, a zero aggregate
      total = jnp.where(anyone, total, 1.0)
      losses_in = jnp.where(w > 0, losses, 0.0)
    else:
      losses_in = losses
    # linear: the parts' psum / total; otherwise the device's stacked uploads with their weights w
    aggregate = agg.finish(part, total, mixing) if agg.linear else agg.finish(part, total, mixing, w)
    sums = None if sums is None else jax.tree.map(lambda s: jax.lax.psum(s, CLIENTS), sums)
    mean_loss = jax.lax.psum(jnp.sum(w * losses_in), CLIENTS) / total
    new_state, new_rows = alg.server(state, aggregate, sums, new_rows)
    if skip_nonfinite or "reported" in batch:  # nobody counted: the server keeps its state (no momentum step)
      kept = dict(state, round=new_state["round"])  # the round still advances (round-keyed streams)
      new_state = jax.tree.map(lambda new, old: jnp.where(aggregated, new, old), new_state, kept)
    else:  # every client counts with its weight: the server always steps
      aggregated = jnp.asarray(True)
    return new_state, new_rows, mean_loss, losses, ok, client_metrics, aggregated

  sharded = jax.shard_map(
    shard_body,
    mesh=mesh,
    in_specs=(P(), P(CLIENTS), P(CLIENTS), P(CLIENTS), P(), P()),
    out_specs=(P(), P(CLIENTS), P(), P(CLIENTS), P(CLIENTS), P(CLIENTS), P()),
  )

  def round_fn(state, rows, batch, weights, mixing=None, hparams=None):
    new_state, new_rows, mean_loss, losses, ok, client_metrics, aggregated = sharded(
      state,
      rows,
      batch,
      weights.astype(jnp.float32),
      None if mixing is None else mixing.astype(jnp.float32),
      hparams,
    )
    metrics = {
      "loss": mean_loss,
      "client_loss": losses,
      "client_finite": ok,
      "finite": jnp.isfinite(mean_loss) & _all_finite(new_state, new_rows),
      "aggregated": aggregated,
      **(client_metrics or {}),
    }
    return new_state, new_rows, metrics

  return jax.jit(round_fn, donate_argnums=(0, 1))


def _add(*trees):
  """Leafwise sum of trees, left to right."""
  return jax.tree.map(lambda *a: sum(a[1:], a[0]), *trees)


def _concat(*trees):
  return jax.tree.map(lambda *a: jnp.concatenate(a), *trees)


def _unrolled_in_order(group, one_client, inputs, n: int, k: int):
  """The ``unroll`` layout with a linear aggregate and at most ``k`` clients in flight.

  Left alone, XLA:CPU schedules the unrolled clients in lockstep, so every client's activations are
  alive at once, and it fuses the sum of the parts into one loop at the end, so every client's last
  parameters stay alive too: the temporary buffer grows with the clients (1,065 MiB for 8 width-32 UNet
  clients), and XLA:CPU allocates it afresh, page by page, at every execution (docs/engine.md, CPU).
  Here the parts are added in client order (the same left-to-right sum as the unordered path), each
  partial sum inside a ``lax.cond`` with identical branches, which XLA does not fuse across, and client
  i's batch takes a data dependency on the partial sum through client i-k. Returns (part, sums, per)
  like the unordered path."""
  acc, totals, per = None, [], []
  for i in range(n):
    r, b, w = jax.tree.map(lambda a: a[i : i + 1], inputs)
    if i >= k:
      b = _after(b, totals[i - k])
    part, sums, p = group(r, b, w, one_client)
    per.append(p)
    acc = (part, sums) if acc is None else jax.lax.cond(w[0] > 0, _add, _add, acc, (part, sums))
    totals.append(acc)
  return acc[0], acc[1], _concat(*per)


def _after(batch, tree):
  """``batch`` with a data dependency on ``tree`` and unchanged values: -0.0 (x + -0.0 == x for every x,
  signed zeros and NaN included), made from one entry of ``tree``, is added to its floating leaves."""
  first = jax.tree.leaves(tree)[0].ravel()[0]
  neg_zero = -(jnp.abs(jnp.where(jnp.isfinite(first), first, 0.0)) * 0.0)
  return jax.tree.map(
    lambda a: a + neg_zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
    batch,
  )


def describe(options: EngineOptions, clients_per_shard: int | None = None) -> str:
  """One phrase for logs: how the clients run (``clients_per_shard``, where given: a device's clients,
  so that a bound at or above it reads 'all in flight' and ``chunked`` names the chunk it runs,
  :func:`chunk_size`). ``options``: :func:`effective_options` where the algorithm is known."""
  chunk = ""
  if options.layout == "chunked":
    k = options.client_chunk if clients_per_shard is None else chunk_size(clients_per_shard, options.client_chunk)
    chunk = f" (chunks of {k}"
    if k < min(options.client_chunk, clients_per_shard or k):
      chunk += (
        f": the largest divisor of {clients_per_shard} clients per device up to client_chunk={options.client_chunk}"
      )
    chunk += ")"
  steps = ", steps unrolled" if options.unroll_local_steps else ""
  k, flight = options.clients_in_flight, ""
  if options.layout == "unroll" and k:
    flight = " (all in flight)" if clients_per_shard is not None and k >= clients_per_shard else f" ({k} in flight)"
  kept = ", host memory kept" if hostmem.in_effect() else ""
  return f"clients run as {options.layout}{flight}{chunk} with {options.lowering} convs{steps}{kept}"
