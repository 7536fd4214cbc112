"""Benchmarks, printed as JSON lines (one object per measurement).

  python -m fedkd.bench                                   # CPU-sized defaults
  python -m fedkd.bench --workload A                      # issue 6's workloads A / B / C (GPU-sized)
  python -m fedkd.bench --workload B --parallelism bgemm,chunked,map --dtype bfloat16
  python -m fedkd.bench --scale 64,128,256,512,1024 --size 128 --parallelism chunked   # clients sweep

Workloads: A = 256x256, 16 clients x 4 local steps x batch 8, UNet width 32 (depth 4);
B = 128x128, 128 clients x 2 steps x batch 4, UNet width 32; C = TransUNet (ViT encoder, hidden 256,
6 layers, patch 16) at 256x256, 16 clients x 4 steps x batch 8. Flags given after --workload override it.

Rows, side by side in one process (ratios only compare rows of the same run):
  synth        on-device synthetic X-ray generation, images/s;
  centralized  one model trained on batch = clients * batch for the same number of steps: the
               throughput ceiling for the same FLOPs without federated overhead (per dtype);
  fed_round    one federated round (every client's local steps + FedAvg + server step) per client
               strategy and dtype: images/s, ``ratio`` = fed images/s / centralized images/s,
               ``compile_s`` (lower + compile), ``temp_mb`` (XLA's buffer plan for the compiled round:
               temporaries; arguments and outputs are listed apart), ``peak_mb`` (the device's
               peak bytes in use so far in this process, where the backend reports it; cumulative);
  scale        with --scale: seconds per round for each client count (same per-client work), and
               seconds per client, to check that round time grows linearly in clients.

--compile-only lowers and compiles every program the same flags would time, prints one ``compiled``
row per program (compile_s, buffer plan) and times nothing. With JAX's persistent compilation cache
(``JAX_COMPILATION_CACHE_DIR``) several such processes can compile side by side, so that the timing
run afterwards loads its executables instead of compiling them (launch/gpu_bench.sh does this: on
an H200 XLA:GPU took 10-86 s per program compiled alone).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fedkd.config import COMPUTE_DTYPES
from fedkd.data import sites as sites_lib
from fedkd.data import synth
from fedkd.fl import engine
from fedkd.fl.engine import STRATEGIES
from fedkd.losses import make_segmentation_loss
from fedkd.models import init_params
from fedkd.sharding import client_mesh, replicated, shard_clients

WORKLOADS = {
  "A": dict(size=256, clients=16, steps=4, batch=8, width=32, depth=4, model="unet"),
  "B": dict(size=128, clients=128, steps=2, batch=4, width=32, depth=4, model="unet"),
  "C": dict(size=256, clients=16, steps=4, batch=8, width=32, depth=4, model="transunet"),
}
# The TransUNet of workload C (and of --model transunet).
TRANSUNET = dict(
  patch_size=16, stem_width=32, hidden=256, num_layers=6, num_heads=8, mlp_dim=1024, decoder_width=64, skips=True
)


def _time(fn, reps: int) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  t = time.perf_counter()
  for _ in range(reps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps


def _peak_mb():
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**20, 1)


def _compiled(fn, *args):
  """(compiled executable, lower+compile seconds, memory-plan dict in MiB)."""
  t = time.perf_counter()
  exe = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t
  mem = {}
  try:
    ma = exe.memory_analysis()
    mem = dict(
      temp_mb=round(ma.temp_size_in_bytes / 2**20, 1),
      args_mb=round(ma.argument_size_in_bytes / 2**20, 1),
      out_mb=round(ma.output_size_in_bytes / 2**20, 1),
    )
  except Exception:  # noqa: BLE001 - not every backend reports a buffer plan
    pass
  return exe, round(compile_s, 2), mem


def _parser():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workload", choices=sorted(WORKLOADS), help="preset sizes (later flags override)")
  p.add_argument("--model", default=None, choices=["unet", "transunet"])
  p.add_argument("--size", type=int)
  p.add_argument("--clients", type=int)
  p.add_argument("--steps", type=int)
  p.add_argument("--batch", type=int)
  p.add_argument("--width", type=int)
  p.add_argument("--depth", type=int)
  p.add_argument("--rounds", type=int, default=3, help="timed repetitions after one warm-up")
  p.add_argument(
    "--parallelism",
    default="auto",
    help=f"comma list of {','.join(STRATEGIES)}, 'all' or 'auto' (the engine's default for the "
    "backend, model and clients per device: CPU unroll; GPU/TPU hybrid (UNet) or bgemm "
    "(TransUNet) up to 16 clients per device, else chunked); 'none': only the centralized rows",
  )
  p.add_argument("--dtype", default="float32", help="comma list of float32,bfloat16 (compute dtype)")
  p.add_argument("--chunk", type=int, default=8, help="clients per chunk for --parallelism chunked")
  p.add_argument(
    "--chunk-strategy",
    default="bgemm",
    choices=list(engine.VMAP_CONV_MODES),
    help="the vmapped strategy inside each chunk of --parallelism chunked",
  )
  p.add_argument("--remat", action="store_true", help="recompute block activations in the backward pass")
  p.add_argument(
    "--unroll", default="auto", choices=["auto", "true", "false"], help="unroll the local-step scan (auto: on CPU)"
  )
  p.add_argument("--devices", type=int, default=0, help="devices on the clients axis (0: gcd rule)")
  p.add_argument("--scale", default="", help="comma list of client counts: round time vs clients")
  p.add_argument("--no-centralized", action="store_true", help="skip the centralized ceiling rows")
  p.add_argument(
    "--compile-only",
    action="store_true",
    help="compile every program (filling JAX_COMPILATION_CACHE_DIR, if set) and time nothing",
  )
  return p


def _resolve(a) -> argparse.Namespace:
  base = dict(size=64, clients=8, steps=2, batch=4, width=8, depth=3, model="unet")
  base.update(WORKLOADS.get(a.workload, {}))
  for k in base:
    if getattr(a, k) is not None:
      base[k] = getattr(a, k)
  for k, v in base.items():
    setattr(a, k, v)
  for k in ("size", "clients", "steps", "batch", "width", "depth", "rounds", "chunk"):
    if getattr(a, k) <= 0:
      raise SystemExit(f"fedkd.bench: error: --{k}={getattr(a, k)} must be positive")
  if a.size % (2**a.depth):
    raise SystemExit(f"fedkd.bench: error: --size={a.size} must be divisible by 2**depth={2**a.depth}")
  return a


def _model(a):
  if a.model == "unet":
    cfg = dict(name="unet", width=a.width, depth=a.depth, groups=min(8, a.width), num_classes=3)
  else:
    cfg = dict(name="transunet", num_classes=3, image_size=a.size, **TRANSUNET)
  return init_params(ml_collections.ConfigDict(cfg), 0)


def main(argv=None) -> None:
  a = _resolve(_parser().parse_args(argv))
  backend = jax.default_backend()
  n_dev = a.devices or math.gcd(a.clients, jax.device_count())
  auto_par, auto_unroll = engine.resolve_engine_options(
    ml_collections.ConfigDict(dict(client_parallelism="auto", unroll_local_steps="auto")),
    backend,
    model=a.model,
    clients_per_shard=a.clients // n_dev,
  )
  unroll = auto_unroll if a.unroll == "auto" else a.unroll == "true"
  pars = list(STRATEGIES) if a.parallelism == "all" else [] if a.parallelism == "none" else a.parallelism.split(",")
  pars = [auto_par if p == "auto" else p for p in pars]
  dtypes = a.dtype.split(",")
  for bad in [p for p in pars if p not in STRATEGIES] + [d for d in dtypes if d not in COMPUTE_DTYPES]:
    raise SystemExit(f"fedkd.bench: error: unknown strategy or dtype {bad!r}")
  common = dict(
    backend=backend,
    device=str(jax.devices()[0].device_kind),
    model=a.model,
    size=a.size,
    clients=a.clients,
    steps=a.steps,
    batch=a.batch,
    width=a.width,
    depth=a.depth,
    unroll=unroll,
    remat=a.remat,
    workload=a.workload,
    jax=jax.__version__,
  )
  emit = lambda d: print(json.dumps({**d, **common}), flush=True)  # noqa: E731

  apply, params = _model(a)
  loss_fn = make_segmentation_loss(ml_collections.ConfigDict(dict(ce_weight=0.5, dice_weight=0.5)))
  tx, server_tx = optax.adam(1e-3), optax.sgd(1.0)
  profiles, unseen = sites_lib.make_sites(min(a.clients, 64))
  table = sites_lib.site_table(list(profiles) + [unseen])
  counter = iter(range(10**9))

  def gen(clients):
    start = next(counter) * a.steps * a.batch
    ids = jnp.arange(clients, dtype=jnp.int32) % len(profiles)
    idx = start + jnp.arange(a.steps * a.batch, dtype=jnp.int32)[None].repeat(clients, 0)
    x, y = synth.generate(0, table, ids, idx, a.size)
    return (
      x.reshape(clients, a.steps, a.batch, a.size, a.size, 1),
      y.reshape(clients, a.steps, a.batch, a.size, a.size),
    )

  images = a.clients * a.steps * a.batch
  if not a.compile_only:
    sec = _time(lambda: gen(a.clients), a.rounds)
    emit(dict(name="synth", sec_per_call=round(sec, 5), images_per_s=round(images / sec, 1)))
  xs, ys = gen(a.clients)

  def compiled_row(row, compile_s, mem):
    emit(dict(row, name="compiled", row=row["name"], compile_s=compile_s, **mem))

  def round_fn(par, mesh, dtype):
    return engine.make_round_fn(
      apply,
      loss_fn,
      tx,
      server_tx,
      mesh,
      client_parallelism=par,
      unroll_local_steps=unroll,
      client_chunk=a.chunk,
      chunk_strategy=a.chunk_strategy,
      compute_dtype=jnp.dtype(dtype),
      remat=a.remat,
    )

  def time_round(fn, mesh, data):
    state = jax.device_put(engine.init_server_state(params, server_tx, jax.random.key(0)), replicated(mesh))
    exe, compile_s, mem = _compiled(fn, state, *data)
    if a.compile_only:
      return None, compile_s, mem
    box = [state]

    def one():
      box[0], m = exe(box[0], *data)
      return m["loss"]

    return _time(one, a.rounds), compile_s, mem

  if a.scale:
    par, dtype = pars[0], dtypes[0]
    for n in [int(v) for v in a.scale.split(",")]:
      mesh = client_mesh(a.devices or math.gcd(n, jax.device_count()))
      row = dict(
        name="scale", parallelism=par, dtype=dtype, round_clients=n, chunk=a.chunk, chunk_strategy=a.chunk_strategy
      )
      try:
        data = shard_clients((*gen(n), jnp.ones((n,), jnp.float32)), mesh)
        sec_f, compile_s, mem = time_round(round_fn(par, mesh, dtype), mesh, data)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it; larger counts would fail too
        emit(dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
        return
      if a.compile_only:
        compiled_row(row, compile_s, mem)
        continue
      emit(
        dict(
          row,
          sec_per_round=round(sec_f, 5),
          sec_per_client=round(sec_f / n, 6),
          images_per_s=round(n * a.steps * a.batch / sec_f, 1),
          compile_s=compile_s,
          **mem,
          peak_mb=_peak_mb(),
        )
      )
      del data
    return

  ceiling = {}
  if not a.no_centralized:
    cx = jnp.swapaxes(xs, 0, 1).reshape(a.steps, images // a.steps, a.size, a.size, 1)
    cy = jnp.swapaxes(ys, 0, 1).reshape(a.steps, images // a.steps, a.size, a.size)
    for dtype in dtypes:
      central = jax.jit(
        functools.partial(
          engine.client_update,
          apply,
          loss_fn,
          tx,
          unroll=True if unroll else 1,
          compute_dtype=jnp.dtype(dtype),
          remat=a.remat,
        )
      )
      exe, compile_s, mem = _compiled(central, params, cx, cy)
      if a.compile_only:
        compiled_row(dict(name="centralized", dtype=dtype), compile_s, mem)
        continue
      sec_c = _time(lambda: exe(params, cx, cy), a.rounds)
      ceiling[dtype] = sec_c
      emit(
        dict(
          name="centralized",
          dtype=dtype,
          sec_per_round=round(sec_c, 5),
          images_per_s=round(images / sec_c, 1),
          compile_s=compile_s,
          **mem,
          peak_mb=_peak_mb(),
        )
      )

  mesh = client_mesh(n_dev)
  data = shard_clients((xs, ys, jnp.ones((a.clients,), jnp.float32)), mesh)
  for dtype in dtypes:
    for par in pars:
      row = dict(
        name="fed_round",
        parallelism=par,
        dtype=dtype,
        devices=n_dev,
        chunk=a.chunk if par == "chunked" else None,
        chunk_strategy=a.chunk_strategy if par == "chunked" else None,
      )
      try:
        sec_f, compile_s, mem = time_round(round_fn(par, mesh, dtype), mesh, data)
      except Exception as e:  # noqa: BLE001 - e.g. out of device memory: report it and go on
        emit(dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
        continue
      if a.compile_only:
        compiled_row(row, compile_s, mem)
        continue
      row.update(
        sec_per_round=round(sec_f, 5),
        images_per_s=round(images / sec_f, 1),
        compile_s=compile_s,
        **mem,
        peak_mb=_peak_mb(),
      )
      if dtype in ceiling:
        row["ratio"] = round(ceiling[dtype] / sec_f, 4)
      emit(row)


if __name__ == "__main__":
  main()
