"""Times the engine's client layout x conv lowering candidates on one round's shapes; keeps the fastest.

``python -m bench --measure --config=<config file> [--config.KEY=VALUE ...]`` builds the config's model,
algorithm and round shapes (random data of the configured sizes), times each candidate of
:func:`candidates` on this machine and prints one JSON line per candidate and a last line naming the
fastest with the ``--config.engine.client_layout=... --config.engine.conv_lowering=...`` flags to put in
the run's config. A candidate that fails (e.g. out of device memory) is reported with its error and
skipped. In a multi-process run every process times the candidates and process 0's choice holds for all.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fedkd.fl import engine
from fedkd.fl.engine import EngineOptions

# On accelerators 'unroll' is timed only up to this many clients per device (its program, and its compile
# time, grow with every client).
UNROLL_MAX_CLIENTS = 16


def candidates(
  platform: str, clients_per_shard: int, client_chunk: int, unroll_local_steps: bool = False, clients_in_flight: int = 0
):
  """The (layout, lowering) options worth timing on ``platform`` for ``clients_per_shard`` clients per
  device, as :class:`fedkd.fl.engine.EngineOptions`. CPU: unroll + matmul, unroll + xla, vmap + gemm, vmap + xla. GPU/TPU:
  vmap + wgrad, vmap + gemm, chunked + gemm (when ``client_chunk`` splits the shard into several chunks
  of more than one client), vmap + xla, chunked(1) + xla and, up to ``UNROLL_MAX_CLIENTS`` clients per
  device, unroll + xla. ``clients_in_flight``: the unroll candidates'."""

  def opt(layout, lowering, chunk=client_chunk):  # resolve gives the layouts other than unroll 0 in flight
    return engine.resolve(
      layout, lowering, unroll_local_steps, platform=platform, client_chunk=chunk, clients_in_flight=clients_in_flight
    )

  if platform == "cpu":
    return [opt("unroll", "matmul"), opt("unroll", "xla"), opt("vmap", "gemm"), opt("vmap", "xla")]
  out = [opt("vmap", "wgrad"), opt("vmap", "gemm")]
  if 1 < engine.chunk_size(clients_per_shard, client_chunk) < clients_per_shard:
    out.append(opt("chunked", "gemm"))
  out += [opt("vmap", "xla"), opt("chunked", "xla", 1)]
  if clients_per_shard <= UNROLL_MAX_CLIENTS:  # plain (cuDNN) convs, no im2col; the program grows per client
    out.append(opt("unroll", "xla"))
  return out


def label(opts: EngineOptions) -> str:
  """``vmap+wgrad``, ``chunked(4)+gemm``, ..."""
  chunk = f"({opts.client_chunk})" if opts.layout == "chunked" else ""
  return f"{opts.layout}{chunk}+{opts.lowering}"


def flags(opts: EngineOptions) -> str:
  """The config overrides that select ``opts``."""
  out = f"--config.engine.client_layout={opts.layout} --config.engine.conv_lowering={opts.lowering}"
  return out + (f" --config.engine.client_chunk={opts.client_chunk}" if opts.layout == "chunked" else "")


def _error(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def measure(
  build: Callable[[EngineOptions], Callable],
  options: list[EngineOptions],
  args: tuple,
  reps: int = 2,
  emit: Callable[[dict], None] = lambda rec: None,
) -> tuple[EngineOptions, Callable, list[dict]]:
  """Builds ``build(opts)`` for each of ``options``, calls each once (compilation + one round), then times the
  candidates in alternation: ``reps`` turns that call every candidate once (each turn starting one candidate
  later), each on fresh copies of ``args`` (the round function donates its state, and the caller's arrays stay
  untouched, so training numbers do not depend on the measurement). A drift of the machine during the
  measurement then falls on every candidate alike. Returns the fastest options, their round function (compiled
  for these shapes) and one record per candidate, each also passed to ``emit`` once all are timed:
  ``sec_per_round`` (the fastest of its ``reps`` timed calls) and ``first_call_s`` (compilation + one round), or
  ``error``, the failure that ruled the candidate out (e.g. out of device memory, or a round whose
  ``metrics["loss"]``, the last output, is not finite).

  Multi-process: every process must run the same program, so process 0's choice is broadcast; a choice
  that failed on another process raises there."""
  results, fns, times = [], {}, {}

  def call(fn) -> float:
    fresh = jax.block_until_ready(jax.tree.map(jnp.copy, args))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*fresh))
    sec = time.perf_counter() - t0
    metrics = out[-1] if isinstance(out, tuple) and out and isinstance(out[-1], dict) else {}
    if "loss" in metrics and not bool(jnp.isfinite(metrics["loss"]).all()):
      raise FloatingPointError(f"the round's loss is {metrics['loss']}: a diverged candidate is not timed")
    return sec

  for i, opts in enumerate(options):
    rec = {"candidate": label(opts), "layout": opts.layout, "lowering": opts.lowering}
    if opts.layout == "chunked":
      rec["client_chunk"] = opts.client_chunk
    try:
      fn = build(opts)
      rec["first_call_s"] = round(call(fn), 3)  # compiles
      fns[opts], times[i] = fn, []
    except Exception as e:  # noqa: BLE001 - an out-of-memory or unsupported candidate is skipped
      rec["error"] = _error(e)
    results.append(rec)
  for turn in range(reps):
    timed = list(times)
    for k in range(len(timed)):
      i = timed[(turn + k) % len(timed)]
      if i not in times:  # failed earlier in this turn
        continue
      try:
        times[i].append(call(fns[options[i]]))
      except Exception as e:  # noqa: BLE001 - e.g. a round that diverges only after its first call
        results[i]["error"] = _error(e)
        del times[i], fns[options[i]]
  for i, rec in enumerate(results):
    if i in times:
      rec["sec_per_round"] = round(min(times[i]), 5)
    emit(rec)
  ok = [(min(times[i]), i) for i in times]  # the unrounded times decide
  if not ok:
    raise RuntimeError(
      "no client layout x conv lowering could run this round: "
      + "; ".join(f"{r['candidate']}: {r['error']}" for r in results)
    )
  best = min(ok)[1]
  if jax.process_count() > 1:  # process 0's timing decides
    from jax.experimental import multihost_utils

    best = int(multihost_utils.broadcast_one_to_all(jnp.int32(best)))
    if options[best] not in fns:
      raise RuntimeError(
        f"process 0 chose {label(options[best])}, which failed on process {jax.process_index()}: "
        f"{results[best]['error']}; set config.engine.client_layout / conv_lowering explicitly"
      )
  return options[best], fns[options[best]], results


def measure_config(config, reps: int = 2, emit: Callable[[dict], None] = lambda rec: None):
  """:func:`measure` on the round of a ``fedavg``-task config: its model, loss, optimizers, algorithm,
  numerics and round shapes (``clients_per_round`` x ``local_steps`` x ``batch_size`` images of
  ``image_size`` px, random values), on the mesh a run would use. Returns (best options, records)."""
  import numpy as np

  from fedkd.config import ConfigError, clients_in_flight, unroll_local_steps, validate
  from fedkd.fl.algorithm import init_rows
  from fedkd.models import init_model
  from fedkd.tasks import fedavg
  from fedkd.sharding import client_mesh, local_rows, replicate, shard_clients

  if config.get("task", "fedavg") != "fedavg":
    raise ConfigError(
      f"--measure times the rounds of fedavg-task configs; this config's task is {config.task!r} "
      "(its silo round takes the same engine knobs: time them on a fedavg config of the same model and shapes)"
    )
  n_dev = validate(config, jax.device_count())
  # the chunked candidates read engine.client_chunk whatever the config's own layout, which may leave it unread
  # (unchecked by validate)
  if isinstance(config.engine.client_chunk, bool) or not (
    isinstance(config.engine.client_chunk, int) and config.engine.client_chunk >= 1
  ):
    raise ConfigError(
      f"config.engine.client_chunk={config.engine.client_chunk!r} must be an integer >= 1: --measure times chunked "
      "candidates with it; set --config.engine.client_chunk"
    )
  mesh = client_mesh(n_dev)
  per_shard = config.clients_per_round // n_dev
  _, _, chunk = engine.legacy_options(config.engine)
  auto = engine.resolve(
    "unroll", "auto", unroll_local_steps(config.engine), clients_in_flight=clients_in_flight(config.engine)
  )
  options = candidates(jax.default_backend(), per_shard, chunk, auto.unroll_local_steps, auto.clients_in_flight)
  unroll = auto.unroll_local_steps

  apply, apply_wf, params = init_model(config.model, config.seed)
  alg = fedavg.make_algorithm(config, engine.make_optimizer(config.server_optimizer))
  ctx = fedavg.make_context(config, apply, apply_wf)
  rows = local_rows(mesh, config.clients_per_round)
  n, s, b, h = rows.stop - rows.start, config.local_steps, config.batch_size, config.image_size
  rng = np.random.default_rng([config.seed, rows.start])  # this process's clients only
  xs = rng.random((n, s, b, h, h, 1), np.float32)
  ys = rng.integers(0, config.model.num_classes, (n, s, b, h, h), np.int32)
  xs, ys, weights = shard_clients((xs, ys, np.ones((n,), np.float32)), mesh, rows)
  client_rows = init_rows(alg, params, n)
  client_rows = None if client_rows is None else shard_clients(jax.tree.map(np.asarray, client_rows), mesh, rows)
  state = replicate(jax.tree.map(np.asarray, alg.init(params, jax.random.key(config.seed))), mesh)

  def build(opts):
    return engine.make_round_fn(alg, ctx, mesh, opts, skip_nonfinite=config.engine.skip_nonfinite_clients)

  common = dict(
    backend=jax.default_backend(),
    device=str(jax.devices()[0].device_kind),
    devices=n_dev,
    processes=jax.process_count(),
    model=config.model.name,
    algorithm=config.algorithm.name,
    clients_per_round=config.clients_per_round,
    clients_per_device=per_shard,
    local_steps=s,
    batch_size=b,
    image_size=h,
    compute_dtype=config.engine.compute_dtype,
    remat=config.engine.remat,
    unroll_local_steps=unroll,
    clients_in_flight=auto.clients_in_flight,
    jax=jax.__version__,
  )
  args = (state, client_rows, {"x": xs, "y": ys}, weights)
  best, _, results = measure(build, options, args, reps, emit=lambda rec: emit({"name": "measure", **rec, **common}))
  return best, results
