"""The federated round benchmark, printed as JSON lines (one object per measurement). From the repository root:

  python -m bench                                         # CPU-sized defaults, the 'auto' layout + lowering
  python -m bench --workload A                            # issue 6's workloads A / B / C (GPU-sized)
  python -m bench --workload B --pairs vmap:gemm,chunked:gemm,chunked:xla:1 --dtype bfloat16
  python -m bench --layouts vmap,chunked --lowerings xla,gemm,wgrad   # every layout x lowering given
  python -m bench --scale 64,128,256,512,1024 --size 128 --pairs chunked:gemm   # clients sweep
  python -m bench --measure --config=configs/quickstart.py [--config.KEY=VALUE ...]   # see below

Workloads: A = 256x256, 16 clients x 4 local steps x batch 8, UNet width 32 (depth 4);
B = 128x128, 128 clients x 2 steps x batch 4, UNet width 32; C = TransUNet (ViT encoder, hidden 256,
6 layers, patch 16) at 256x256, 16 clients x 4 steps x batch 8. Flags given after --workload override it.

Rows, side by side in one process (ratios only compare rows of the same run):
  synth        on-device synthetic X-ray generation, images/s;
  centralized  one model trained on batch = clients * batch for the same number of steps, data parallel
               on the round's devices: the throughput ceiling for the same FLOPs without federated
               overhead (per dtype);
  fed_round    one federated round (every client's local steps + FedAvg + server step) per client
               layout, conv lowering and dtype (fedkd.fl.engine): images/s, ``ratio`` = fed images/s / centralized images/s,
               ``compile_s`` (lower + compile), ``temp_mb`` (XLA's buffer plan for the compiled round:
               temporaries; arguments and outputs are listed apart), ``peak_mb`` (the device's
               peak bytes in use in this process up to the row's first run, where the backend reports
               it; cumulative: every program is compiled and run once before all are timed);
  scale        with --scale: seconds per round for each client count (same per-client work), and
               seconds per client, to check that round time grows linearly in clients.

--compile-only lowers and compiles every program the same flags would time, prints one ``compiled``
row per program (compile_s, buffer plan) and times nothing. With JAX's persistent compilation cache
(``JAX_COMPILATION_CACHE_DIR``) several such processes can compile side by side, so that the timing
run afterwards loads its executables instead of compiling them (bench/gpu.sh does this: on an H200
XLA:GPU took 10-86 s per program compiled alone).

--measure --config=FILE [--config.KEY=VALUE ...] times the engine's client layout x conv lowering
candidates on that (fedavg-task) config's model, algorithm and round shapes on this machine (bench/measure.py;
CPU: unroll+matmul, unroll+xla, vmap+gemm, vmap+xla; GPU/TPU: vmap+wgrad, vmap+gemm, chunked+gemm, vmap+xla,
chunked(1)+xla and, up to 16 clients per device, unroll+xla): one ``measure`` row per candidate (seconds
per round, or the error that ruled it out), then a ``measure_best`` row with the flags that select the
fastest. With --coordinator_address / --num_processes / --process_id (or on a TPU pod / under SLURM)
every process times the candidates and process 0's choice holds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import re
import shlex
import signal
import sys
import time

# clients' optimizer (an engine.make_optimizer name) -> its default learning rate
OPTIMIZERS = {"adam": 1e-3, "sgd": 0.01}
WORKLOADS = {
  "A": dict(size=256, clients=16, steps=4, batch=8, width=32, depth=4, model="unet"),
  "B": dict(size=128, clients=128, steps=2, batch=4, width=32, depth=4, model="unet"),
  "C": dict(size=256, clients=16, steps=4, batch=8, width=32, depth=4, model="transunet"),
}
# The TransUNet of workload C (and of --model transunet).
TRANSUNET = dict(
  patch_size=16, stem_width=32, hidden=256, num_layers=6, num_heads=8, mlp_dim=1024, decoder_width=64, skips=True
)


def fail(msg: str, code: int = 2):
  from bench import fail as bench_fail

  bench_fail("bench", msg, code)


def _minor_page_faults() -> int:
  try:
    import resource
  except ImportError:  # not on Unix
    return 0
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time(fn, reps: int) -> tuple[float, int]:
  """(seconds per call, this process's minor page faults per call) over ``reps`` calls after a warm-up call,
  each clocked until its result is ready. The faults show host memory touched for the first time: on CPU, glibc
  maps XLA's temporary buffer afresh at every execution (docs/engine.md, CPU)."""
  import jax

  jax.block_until_ready(fn())  # compile + warm up
  (one,) = _time_alternating([fn], reps)
  if one["error"] is not None:
    raise one["error"]
  return one["sec"], one["faults"]


def _time_alternating(calls: list, reps: int, stopped=lambda: False) -> list[dict]:
  """:func:`_time` of each of ``calls``, timed in alternation: ``reps`` turns that call each program once (every
  turn starting one program later), each call clocked until its result is ready (the programs have had their
  warm-up call). A drift of the machine during the run (clock, other load) then falls on every program alike
  instead of on the rows timed last, so the ratios between rows hold. Per program: ``sec`` and ``faults`` per call,
  ``calls`` (the calls timed: fewer than ``reps`` when ``stopped()`` turned true, which is asked after every call)
  and ``error`` (the exception a call raised, e.g. out of memory: that program is timed no further; else None)."""
  import jax

  out = [dict(sec=0.0, faults=0, calls=0, error=None) for _ in calls]
  for turn in range(reps):
    for k in range(len(calls)):
      i = (turn + k) % len(calls)
      if out[i]["error"] is not None:
        continue
      f, t = _minor_page_faults(), time.perf_counter()
      try:
        jax.block_until_ready(calls[i]())
      except Exception as e:  # noqa: BLE001 - reported in the program's row; the others go on
        out[i]["error"] = e
        continue
      out[i]["sec"] += time.perf_counter() - t
      out[i]["faults"] += _minor_page_faults() - f
      out[i]["calls"] += 1
      if stopped():
        break
    if stopped():
      break
  for o in out:
    if o["calls"]:
      o["sec"], o["faults"] = o["sec"] / o["calls"], o["faults"] // o["calls"]
  return out


@contextlib.contextmanager
def _stop_on_sigterm():
  """A SIGTERM (``timeout``'s, as bench/gpu.sh runs each step) sets the yielded flag instead of ending the process,
  so that the rows timed so far are still printed."""
  flag = [False]
  previous = signal.signal(signal.SIGTERM, lambda *_: flag.__setitem__(0, True))
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


# Dense bf16 peak of one device in TFLOP/s, by jax.devices()[0].device_kind. Source: NVIDIA's datasheets, the
# dense figure (not the 2:4-sparse one): H100 SXM5 989.4 (1,979 with sparsity); H200 SXM 989.4 (the same compute).
PEAK_BF16_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H200": 989.4}


def program_flops(exe, lowered=None, devices: int = 1) -> tuple[float | None, str]:
  """(FLOPs of one call of the compiled ``exe`` on one device, by XLA's cost analysis of that program, and
  where they come from), or (None, why not). A program partitioned over devices (SPMD) is analysed per device.
  XLA counts one trip through a while loop's body (a ``lax.scan`` / ``lax.map`` left rolled), so a program
  with a loop around matmuls or convolutions gets None. On one GPU the count is the program's before
  optimisation (``lowered``): XLA:GPU's count of the compiled program leaves out the convolutions it hands
  to cuDNN (custom calls), 82 GFLOP against about 9 TFLOP for the A ceiling's step."""
  import jax

  gpu = jax.default_backend() == "gpu"
  try:
    cost = lowered.cost_analysis() if gpu and lowered is not None and devices == 1 else exe.cost_analysis()
  except Exception as e:  # noqa: BLE001 - cost analysis is best effort (not every backend implements it)
    return None, f"XLA's cost analysis is not available here ({type(e).__name__})"
  if isinstance(cost, (list, tuple)):  # jax before 0.4.3x: a list with one dict per program
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  if flops is None or not math.isfinite(flops) or flops <= 0:
    return None, f"XLA's cost analysis gives no FLOP count for this program ({flops})"
  loops = _loops_with_flops(exe.as_text())
  if loops:
    return None, (
      f"the compiled program has {loops} while loop(s) (lax.scan / lax.map) around matmuls or convolutions, whose "
      "bodies XLA's cost analysis counts once; --unroll true unrolls the local steps (the chunked layout's loop "
      "over chunks stays)"
    )
  if gpu and lowered is not None and devices == 1:
    return flops, "XLA cost analysis of the program before optimisation (the compiled one's omits cuDNN convs)"
  if gpu:
    return flops, "XLA:GPU cost analysis of the compiled program, which leaves out cuDNN convolutions (too low)"
  return flops, "XLA cost analysis of the compiled program (one device's, times devices)"


def _loops_with_flops(hlo: str) -> int:
  """The while loops of an HLO module's text that run more than once (no ``known_trip_count`` of 1) around a
  matmul or convolution (a dot / convolution, or a cuBLAS / cuDNN custom call, in the body or anything it
  calls). A loop of elementwise work (e.g. a scatter XLA expands into a loop) is not counted."""
  from bench.hlo_report import computations

  comps = computations(hlo)

  def heavy(name: str, seen: set) -> bool:
    if name in seen:
      return False
    seen.add(name)
    body = comps.get(name, "")
    if re.search(r" (dot|convolution)\(|__cublas|__cudnn", body):
      return True
    return any(heavy(c, seen) for c in re.findall(r"%([\w.\-]+)", body) if c in comps)

  n = 0
  for line in hlo.splitlines():
    if re.search(r"\swhile\(", line) and '"known_trip_count":{"n":"1"}' not in line:
      body = re.search(r"body=%?([\w.\-]+)", line)
      n += body is None or heavy(body.group(1), set())
  return n


def utilisation(flops: float | None, flops_source: str, sec: float, devices: int, device_kind: str) -> dict:
  """The model FLOP utilisation fields of a row: ``flops_per_call`` (all ``devices``), ``tflops_per_s`` (achieved,
  at ``sec`` per call), ``peak_tflops`` (one device's dense bf16 peak, from ``PEAK_BF16_TFLOPS``) and
  ``mfu`` = flops_per_call / sec / (devices * peak); None where a number is unknown, and why in
  ``flops_source`` / ``peak_source``."""
  peak = PEAK_BF16_TFLOPS.get(device_kind)
  if peak is None:
    peak_source = f"no dense bf16 peak listed for device {device_kind!r} (bench/__main__.py PEAK_BF16_TFLOPS)"
  else:
    peak_source = f"NVIDIA datasheet, dense bf16 (not sparse), per device: {device_kind}"
  total = None if flops is None else flops * devices
  achieved = None if total is None else total / sec / 1e12
  return dict(
    flops_per_call=None if total is None else int(total),
    flops_source=flops_source,
    tflops_per_s=None if achieved is None else float(f"{achieved:.4g}"),
    peak_tflops=peak,
    peak_source=peak_source,
    mfu=None if achieved is None or peak is None else float(f"{achieved / (devices * peak):.4g}"),
  )


def _check_finite(loss) -> None:
  """A diverged program's time is not a result: raises FloatingPointError when the timed calls' loss is not
  finite."""
  value = float(loss)
  if not math.isfinite(value):
    raise FloatingPointError(
      f"the training loss is {value} after the timed calls: a diverged program's time is not a result; "
      "give a smaller --lr (or --dtype float32)"
    )


def _peak_mb():
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**20, 1)


def _compiled(fn, *args):
  """(compiled executable, lower+compile seconds, memory-plan dict in MiB, the lowered program)."""
  t = time.perf_counter()
  lowered = fn.lower(*args)
  exe = lowered.compile()
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
  return exe, round(compile_s, 2), mem, lowered


def _parser():
  from fedkd import hostmem

  p = argparse.ArgumentParser(
    prog="python -m bench",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  p.add_argument("--workload", choices=sorted(WORKLOADS), help="preset sizes (later flags override)")
  p.add_argument("--model", default=None, choices=["unet", "transunet"])
  p.add_argument("--size", type=int)
  p.add_argument("--clients", type=int)
  p.add_argument("--steps", type=int)
  p.add_argument("--batch", type=int)
  p.add_argument("--width", type=int)
  p.add_argument("--depth", type=int)
  p.add_argument("--rounds", type=int, default=3, help="timed repetitions after one warm-up (--measure: too)")
  p.add_argument(
    "--layouts",
    default="auto",
    help="comma list of client layouts (vmap, chunked, unroll), 'all', 'auto' (the engine's choice for the "
    "backend, model and clients per device) or 'none' (only the centralized rows); crossed with --lowerings",
  )
  p.add_argument(
    "--lowerings", default="auto", help="comma list of conv lowerings (xla, gemm, wgrad, matmul), 'all' or 'auto'"
  )
  p.add_argument(
    "--pairs",
    default="",
    help="comma list of LAYOUT:LOWERING[:CHUNK] (e.g. vmap:wgrad,chunked:xla:1; 'auto' allowed in either "
    "place) or former engine.client_parallelism names (vmap, bgemm, hybrid, unroll, chunked, map); "
    "replaces --layouts / --lowerings",
  )
  p.add_argument("--dtype", default="float32", help="comma list of float32,bfloat16 (compute dtype)")
  p.add_argument("--chunk", type=int, default=8, help="clients per chunk of the chunked layout")
  p.add_argument("--remat", action="store_true", help="recompute block activations in the backward pass")
  p.add_argument(
    "--optimizer",
    default="adam",
    choices=sorted(OPTIMIZERS),
    help="clients' optimizer (adam: the main job's default; sgd: the anchor script's)",
  )
  p.add_argument("--lr", type=float, help="clients' learning rate (default: 1e-3 for adam, 0.01 for sgd)")
  p.add_argument(
    "--loss",
    default="dice_ce",
    choices=["dice_ce", "ce"],
    help="clients' loss (dice_ce: 0.5 cross-entropy + 0.5 soft Dice, the main job's; ce: cross-entropy alone, "
    "the anchor script's)",
  )
  p.add_argument(
    "--unroll", default="auto", choices=["auto", "true", "false"], help="unroll the local-step scan (auto: on CPU)"
  )
  p.add_argument(
    "--in-flight",
    default="auto",
    help="comma list of engine.clients_in_flight values for the unroll layout (auto, 0 = XLA's own schedule, "
    "k >= 1), e.g. auto,0 for both side by side",
  )
  p.add_argument(
    "--host-memory",
    default="auto",
    choices=hostmem.MODES,
    help="engine.host_memory for this process (fedkd.hostmem; auto: keep where JAX runs on the CPU)",
  )
  p.add_argument("--devices", type=int, default=0, help="devices on the clients axis (0: gcd rule)")
  p.add_argument("--scale", default="", help="comma list of client counts: round time vs clients (first pair)")
  p.add_argument("--no-centralized", action="store_true", help="skip the centralized ceiling rows")
  p.add_argument(
    "--ceiling",
    choices=["fastest", "xla"],
    default="fastest",
    help="the centralized step under XLA's convs and each conv lowering the rows use, the fastest the ceiling "
    "(default); xla: XLA's convs only (one compile: bench/gpu.sh's time budget)",
  )
  p.add_argument(
    "--profile",
    metavar="DIR",
    help="after timing each centralized / fed_round row, trace --rounds more runs of it with jax.profiler "
    "into DIR/<row> and print a 'profile' row: device time per op category (bench/trace_table.py)",
  )
  p.add_argument(
    "--compile-only",
    action="store_true",
    help="compile every program (filling JAX_COMPILATION_CACHE_DIR, if set) and time nothing",
  )
  m = p.add_argument_group("--measure (the sizes, layout and dtype flags above do not apply; the config's do)")
  m.add_argument(
    "--measure",
    action="store_true",
    help="time the layout x lowering candidates on --config's round and name the fastest",
  )
  m.add_argument("--coordinator_address", help="host:port of process 0 of a multi-process --measure")
  m.add_argument("--num_processes", type=int, help="processes of a multi-process --measure")
  m.add_argument("--process_id", type=int, help="this process's index in a multi-process --measure")
  m.add_argument("--cpu_devices", type=int, help="simulate this many CPU devices (CPU only)")
  p.error = lambda message: fail(f"{message} (--help lists the flags)")  # one line "bench: error: ..."
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
      fail(f"--{k}={getattr(a, k)} must be positive")
  if a.model == "unet" and a.size % (2**a.depth):  # the TransUNet's patch size is checked below
    fail(f"--size={a.size} must be divisible by 2**depth={2**a.depth} (the UNet's --depth)")
  if a.model == "unet" and a.width > 8 and a.width % 8:  # GroupNorm: min(8, width) groups at every level
    fail(f"--width={a.width}: the UNet's GroupNorms use 8 groups; give a --width of at most 8 or a multiple of 8")
  patch = TRANSUNET["patch_size"]
  if a.model == "transunet" and (a.size % patch or a.size < 2 * patch):
    fail(f"--size={a.size}: the TransUNet's patches are {patch} px; give a multiple of {patch}, at least {2 * patch}")
  if a.lr is not None and not (math.isfinite(a.lr) and a.lr > 0):
    fail(f"--lr={a.lr} must be a positive number")
  if a.devices < 0:
    fail(f"--devices={a.devices} must be >= 0 (0: the gcd of --clients and the visible devices)")
  bad = [v for v in a.scale.split(",") if a.scale and not (v.strip().isdigit() and int(v) > 0)]
  if bad:
    fail(f"--scale={a.scale}: {bad[0]!r} is not a client count; give positive whole numbers, e.g. --scale=64,128")
  if a.scale and a.layouts == "none" and not a.pairs:
    fail("--scale needs a layout (--pairs or --layouts)")
  if a.profile:  # before anything is timed: a trace that cannot be written would turn each timed row into an error
    import os
    import tempfile

    try:
      os.makedirs(a.profile, exist_ok=True)
      tempfile.TemporaryFile(dir=a.profile).close()
    except OSError as e:
      fail(f"--profile={a.profile}: cannot write traces there ({e.strerror or e}); give a writable folder")
  return a


def _check_devices(a) -> argparse.Namespace:
  """--devices against the devices JAX sees (after fedkd.distributed set them up): at most that many, and
  a divisor of --clients (and of every --scale count) so each device holds whole clients."""
  import jax

  if not a.devices:
    return a
  visible = jax.device_count()
  if a.devices > visible:
    fail(
      f"--devices={a.devices} but only {visible} {jax.default_backend()} device(s) are visible; give "
      f"--devices <= {visible}, or 0 for the gcd of --clients and the visible devices"
    )
  counts = [("--clients", a.clients)] + [("--scale", int(v)) for v in a.scale.split(",") if v.strip().isdigit()]
  for flag, n in counts:
    if n % a.devices:
      fail(f"{flag}={n} is not divisible by --devices={a.devices}; give a --devices that divides it")
  return a


def engine_options(a, platform: str, clients_per_shard: int) -> list:
  """The distinct :class:`fedkd.fl.engine.EngineOptions` that --pairs (or --layouts x --lowerings) name."""
  from fedkd.config import parse_clients_in_flight
  from fedkd.fl import engine

  unroll = "auto" if a.unroll == "auto" else a.unroll == "true"

  flights = [parse_clients_in_flight(v) for v in a.in_flight.split(",")]
  if None in flights:
    fail(f"--in-flight: {a.in_flight!r} is not a list of 'auto' or whole numbers >= 0 (e.g. --in-flight auto,0)")

  def resolve(layout, lowering, chunk=a.chunk):
    try:
      return [
        engine.resolve(
          layout,
          lowering,
          unroll,
          platform=platform,
          model=a.model,
          clients_per_shard=clients_per_shard,
          client_chunk=chunk,
          clients_in_flight=k,
        )
        for k in flights
      ]
    except ValueError as e:
      fail(str(e))

  out = []
  if a.pairs:
    for item in a.pairs.split(","):
      if item in engine.LEGACY_PARALLELISM:
        layout, lowering, chunk = engine.LEGACY_PARALLELISM[item]
        out += resolve(layout, lowering or "gemm", chunk or a.chunk)
        continue
      parts = item.split(":")
      if len(parts) not in (2, 3) or (len(parts) == 3 and not (parts[2].isdigit() and int(parts[2]) > 0)):
        fail(f"--pairs: {item!r} is not LAYOUT:LOWERING[:CHUNK] (e.g. vmap:wgrad, chunked:xla:1)")
      out += resolve(parts[0], parts[1], int(parts[2]) if len(parts) == 3 else a.chunk)
  elif a.layouts != "none":
    layouts = engine.LAYOUTS if a.layouts == "all" else a.layouts.split(",")
    lowerings = engine.LOWERINGS if a.lowerings == "all" else a.lowerings.split(",")
    out = [o for layout in layouts for lowering in lowerings for o in resolve(layout, lowering)]
  return list(dict.fromkeys(out))


def _model(a):
  import ml_collections

  from fedkd.models import init_params

  if a.model == "unet":
    cfg = dict(name="unet", width=a.width, depth=a.depth, groups=min(8, a.width), num_classes=3)
  else:
    cfg = dict(name="transunet", num_classes=3, image_size=a.size, **TRANSUNET)
  return init_params(ml_collections.ConfigDict(cfg), 0)


def main(argv=None) -> None:
  from fedkd.cli import line_buffered

  line_buffered()
  parser = _parser()
  a, rest = parser.parse_known_args(argv)
  a.command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
  if rest and not a.measure:
    hint = (
      " (--config is for --measure)" if any(r.startswith("--config") for r in rest) else " (--help lists the flags)"
    )
    fail(f"unrecognized arguments: {' '.join(rest)}{hint}")
  if a.rounds <= 0:  # --measure too: its candidates are timed over --rounds calls
    fail(f"--rounds={a.rounds} must be positive")
  if a.measure:
    _check_measure_flags(a, parser)
  from fedkd import distributed

  try:  # before any JAX computation
    multi = distributed.maybe_initialize(
      a.coordinator_address, a.num_processes, a.process_id, a.cpu_devices, host_memory=a.host_memory
    )
  except ValueError as e:
    fail(str(e))
  if a.measure:
    return measure_main(rest, a)
  if multi:
    fail("only --measure runs multi-process; time the round benchmark in one process")
  return round_main(_check_devices(_resolve(a)))


# the flags --measure reads (the config gives the sizes, layout and dtype)
MEASURE_FLAGS = (
  "measure",
  "rounds",
  "host_memory",
  "coordinator_address",
  "num_processes",
  "process_id",
  "cpu_devices",
)


def _check_measure_flags(a, parser) -> None:
  """Refuses a round-benchmark flag given with --measure: it would be ignored (the config's keys apply)."""
  for action in parser._actions:
    if action.dest in MEASURE_FLAGS or not action.option_strings or action.dest == "help":
      continue
    if getattr(a, action.dest) != action.default:
      fail(
        f"{action.option_strings[0]} does not apply to --measure, which times the round of --config with the "
        "config's sizes, model and dtype; drop it, or set the config's key (e.g. --config.image_size=128)"
      )


def measure_main(config_args: list[str], a) -> None:
  """``--measure``: the config from ``--config=FILE --config.KEY=VALUE ...`` (fedkd's config flags)."""
  import jax

  from bench import measure
  from fedkd import cli
  from fedkd.errors import USER_ERRORS

  cli.PROG = "bench"  # fedkd's flag parser's errors, as this tool's
  cli.parse(["python -m bench --measure", *config_args], shared=())
  primary = jax.process_index() == 0
  context = dict(backend=jax.default_backend(), device=str(jax.devices()[0].device_kind))
  context.update(rounds=a.rounds, command=a.command)
  emit = (lambda d: print(json.dumps({**d, **context}), flush=True)) if primary else (lambda d: None)  # noqa: E731
  try:
    best, results = measure.measure_config(cli.CONFIG.value, a.rounds, emit)
  except USER_ERRORS as e:
    fail(str(e))
  except RuntimeError as e:  # nothing could run
    fail(str(e), code=1)
  sec = next(r["sec_per_round"] for r in results if r["candidate"] == measure.label(best) and "error" not in r)
  rec = dict(
    name="measure_best",
    candidate=measure.label(best),
    layout=best.layout,
    lowering=best.lowering,
    sec_per_round=sec,
    flags=measure.flags(best),
  )
  if best.layout == "chunked":
    rec["client_chunk"] = best.client_chunk
  emit(rec)
  if primary:
    print(f"bench: fastest here: {rec['candidate']} ({sec:.4f} s/round); run with {rec['flags']}", file=sys.stderr)
  else:
    print(f"bench: process {jax.process_index()} runs {rec['candidate']} (process 0's choice)", file=sys.stderr)


def round_main(a) -> None:
  import jax
  import jax.numpy as jnp
  import ml_collections
  import optax

  from fedkd import hostmem
  from fedkd.config import COMPUTE_DTYPES
  from fedkd.data import sites as sites_lib
  from fedkd.data import synth
  from fedkd.fl import engine
  from fedkd.fl.algorithm import ClientContext, local_sgd
  from fedkd.fl.algorithms import FedAvg
  from fedkd.losses import cross_entropy, make_segmentation_loss
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from fedkd.sharding import CLIENTS, client_mesh, replicated, shard_clients

  backend = jax.default_backend()
  lr = OPTIMIZERS[a.optimizer] if a.lr is None else a.lr
  n_dev = a.devices or math.gcd(a.clients, jax.device_count())
  opts_list = engine_options(a, backend, a.clients // n_dev)
  unroll = engine.resolve(
    "auto", "auto", "auto" if a.unroll == "auto" else a.unroll == "true", platform=backend
  ).unroll_local_steps
  dtypes = a.dtype.split(",")
  for bad in [d for d in dtypes if d not in COMPUTE_DTYPES]:
    fail(f"unknown dtype {bad!r}; use {','.join(COMPUTE_DTYPES)}")
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
    optimizer=a.optimizer,
    lr=lr,
    loss=a.loss,
    host_memory_kept=hostmem.kept(),
    workload=a.workload,
    rounds=a.rounds,  # timed calls per row, after one warm-up call
    jax=jax.__version__,
    command=a.command,
  )
  emit = lambda d: print(json.dumps({**d, **common}), flush=True)  # noqa: E731

  apply, params = _model(a)
  if a.loss == "ce":
    loss_fn = cross_entropy
  else:
    loss_fn = make_segmentation_loss(ml_collections.ConfigDict(dict(ce_weight=0.5, dice_weight=0.5)))
  opt_cfg = ml_collections.ConfigDict(dict(name=a.optimizer, learning_rate=lr, momentum=0.0))
  tx, server_tx = engine.make_optimizer(opt_cfg), optax.sgd(1.0)
  alg = FedAvg(server_tx)
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
    sec, _ = _time(lambda: gen(a.clients), a.rounds)
    emit(dict(name="synth", sec_per_call=round(sec, 5), images_per_s=round(images / sec, 1)))
  xs, ys = gen(a.clients)

  def profile(row: str, run, hlo_text: str) -> None:
    """Traces ``a.rounds`` calls of ``run`` into ``a.profile/row`` and prints its op-category table."""
    import os

    from bench import trace_table

    out = os.path.join(a.profile, row)
    jax.block_until_ready(run())
    with jax.profiler.trace(out, create_perfetto_trace=True):
      for _ in range(a.rounds):
        res = run()
      jax.block_until_ready(res)
    table = trace_table.summarize(out, hlo_text)
    if backend != "cpu" and not table["events"].startswith("device"):  # no device timeline: host threads only
      table["warning"] = f"the {backend} trace holds no device timeline (no CUPTI data?): these are host events"
    emit(dict(name="profile", row=row, rounds=a.rounds, **table))

  def compiled_row(row, compile_s, mem, cost):
    flops, source = cost
    flops = None if flops is None else int(flops * row["devices"])
    emit(
      dict(row, name="compiled", row=row["name"], compile_s=compile_s, **mem, flops_per_call=flops, flops_source=source)
    )

  def mfu(cost, sec, devices):
    return utilisation(*cost, sec, devices, common["device"])

  def context(dtype):
    return ClientContext(apply, loss_fn, tx, compute_dtype=jnp.dtype(dtype), remat=a.remat)

  def prepare_round(opts, mesh, dtype, data):
    """(one timed call, its last loss [a list], compile seconds, memory plan, cost, executable); call None with
    --compile-only."""
    fn = engine.make_round_fn(alg, context(dtype), mesh, opts)
    x, y, w = data
    batch = {"x": x, "y": y}
    state = jax.device_put(alg.init(params, jax.random.key(0)), replicated(mesh))
    exe, compile_s, mem, lowered = _compiled(fn, state, None, batch, w)
    cost = program_flops(exe, lowered, n_dev)
    if a.compile_only:
      return None, None, compile_s, mem, cost, exe
    box = [state, None]

    def one():
      box[0], _, m = exe(box[0], None, batch, w)
      box[1] = m["loss"]
      return box[1]

    return one, box, compile_s, mem, cost, exe

  def round_profile_name(opts, dtype):
    d = describe(opts)
    return (
      f"fed_round_{d['layout']}_{d['lowering']}{'_' + str(d['chunk']) if d['chunk'] else ''}"
      f"{'_k' + str(d['in_flight']) if 'in_flight' in d else ''}_{dtype}"
    )

  def describe(opts, clients_per_device=None):
    """The row's layout fields; ``chunk`` is the chunk the round runs (the largest divisor of a device's clients
    up to --chunk: engine.chunk_size), not the one asked for."""
    per_device = clients_per_device or max(1, a.clients // n_dev)
    return dict(
      layout=opts.layout,
      lowering=opts.lowering,
      chunk=engine.chunk_size(per_device, opts.client_chunk) if opts.layout == "chunked" else None,
      **({"in_flight": opts.clients_in_flight} if opts.layout == "unroll" else {}),
    )

  if a.scale:
    if not opts_list:
      fail("--scale needs a layout (--pairs or --layouts)")
    dtype = dtypes[0]
    for n in [int(v) for v in a.scale.split(",")]:
      n_round = a.devices or math.gcd(n, jax.device_count())
      opts = engine_options(a, backend, max(1, n // n_round))[0]  # 'auto' as the engine picks it for n clients
      mesh = client_mesh(n_round)
      row = dict(name="scale", **describe(opts, max(1, n // n_round)), dtype=dtype, round_clients=n, devices=n_round)
      try:
        data = shard_clients((*gen(n), jnp.ones((n,), jnp.float32)), mesh)
        one, box, compile_s, mem, cost, exe = prepare_round(opts, mesh, dtype, data)
        if a.compile_only:
          compiled_row(row, compile_s, mem, cost)
          continue
        sec_f, faults = _time(one, a.rounds)
        _check_finite(box[1])
      except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it; larger counts would fail too
        emit(dict(row, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"))
        return
      mem = dict(mem, page_faults_per_round=faults)
      if a.profile:
        profile(f"scale_{n}_" + round_profile_name(opts, dtype), one, exe.as_text())
      emit(
        dict(
          row,
          sec_per_round=round(sec_f, 5),
          sec_per_client=round(sec_f / n, 6),
          images_per_s=round(n * a.steps * a.batch / sec_f, 1),
          compile_s=compile_s,
          **mem,
          peak_mb=_peak_mb(),
          **mfu(cost, sec_f, n_round),
        )
      )
      del data
    return

  # every program is compiled first, then all are timed in alternation (_time_alternating), so that the ratios
  # to the ceiling do not depend on which row ran while the machine was faster
  timed = []  # (row, call, loss box or None, compile seconds, memory plan, cost, profile name, hlo source)
  if not a.no_centralized:
    cx = jnp.swapaxes(xs, 0, 1).reshape(a.steps, images // a.steps, a.size, a.size, 1)
    cy = jnp.swapaxes(ys, 0, 1).reshape(a.steps, images // a.steps, a.size, a.size)
    # on the federated round's devices (data parallel: each holds whole clients' images, as in the round)
    cmesh = client_mesh(n_dev)
    cx, cy = (jax.device_put(v, NamedSharding(cmesh, P(None, CLIENTS))) for v in (cx, cy))
    cparams = jax.device_put(params, NamedSharding(cmesh, P()))
    # the ceiling is the fastest centralized step: XLA's own convs and each conv lowering a federated row uses
    # (on CPU the GEMM lowerings speed the centralized step up too; a ratio against XLA's convs alone flattered)
    lowerings = list(dict.fromkeys(["xla", *(o.lowering for o in opts_list if a.ceiling == "fastest")]))
    for dtype in dtypes:
      ctx = context(dtype)
      for lowering in lowerings:
        row = dict(name="centralized", dtype=dtype, devices=n_dev, lowering=lowering)
        # one model trained on every client's images at once: the local loop of every client, batched
        central = jax.jit(lambda p, x, y, ctx=ctx: local_sgd(ctx.seg_loss, tx, p, x, y, unroll=unroll)[:2])
        with engine._lowered(lowering):  # the convs are lowered when the program is traced
          exe, compile_s, mem, lowered = _compiled(central, cparams, cx, cy)
        cost = program_flops(exe, lowered, n_dev)
        if a.compile_only:
          compiled_row(row, compile_s, mem, cost)
          continue
        try:  # the same parameters every call: one call tells whether the step diverges
          _check_finite(exe(cparams, cx, cy)[1])
        except FloatingPointError as e:
          emit(dict(row, error=f"FloatingPointError: {e}"))
          continue
        name = f"centralized_{dtype}" + ("" if lowering == "xla" else f"_{lowering}")
        mem = dict(mem, peak_mb=_peak_mb())
        timed.append((row, functools.partial(exe, cparams, cx, cy), None, compile_s, mem, cost, name, exe))

  mesh = client_mesh(n_dev)
  data = shard_clients((xs, ys, jnp.ones((a.clients,), jnp.float32)), mesh)
  for dtype in dtypes:
    for opts in opts_list:
      row = dict(name="fed_round", **describe(opts), dtype=dtype, devices=n_dev)
      try:
        one, box, compile_s, mem, cost, exe = prepare_round(opts, mesh, dtype, data)
        if not a.compile_only:
          jax.block_until_ready(one())  # the first run: out of device memory shows here, before the timing
      except Exception as e:  # noqa: BLE001 - e.g. out of device memory: report it and go on
        emit(dict(row, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"))
        continue
      if a.compile_only:
        compiled_row(row, compile_s, mem, cost)
        continue
      mem = dict(mem, peak_mb=_peak_mb())
      timed.append((row, one, box, compile_s, mem, cost, round_profile_name(opts, dtype), exe))
  if not timed:
    return

  print(f"bench: timing {len(timed)} programs in alternation, {a.rounds} turns", file=sys.stderr, flush=True)
  with _stop_on_sigterm() as stop:  # the programs have run once (the centralized finite check, the rounds' first run)
    times = _time_alternating([t[1] for t in timed], a.rounds, stopped=lambda: stop[0])
  ceiling = {}
  out = []
  for (row, call, box, compile_s, mem, cost, name, exe), t in zip(timed, times):
    if t["error"] is not None or not t["calls"]:
      e = t["error"]
      why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}" if e else "stopped before its first call"
      out.append((dict(row, error=why), None))
      continue
    if box is not None:
      try:
        _check_finite(box[1])
      except FloatingPointError as e:
        out.append((dict(row, error=f"FloatingPointError: {e}"), None))
        continue
    elif row["dtype"] not in ceiling or t["sec"] < ceiling[row["dtype"]][0]:
      ceiling[row["dtype"]] = (t["sec"], row["lowering"])
    calls = {} if t["calls"] == a.rounds else {"timed_calls": t["calls"]}  # stopped by a SIGTERM: fewer calls
    fields = dict(sec_per_round=round(t["sec"], 5), images_per_s=round(images / t["sec"], 1), compile_s=compile_s)
    fields.update(mem, page_faults_per_round=t["faults"], **mfu(cost, t["sec"], n_dev))
    out.append((dict(row, **calls, **fields), t["sec"]))
  for row, sec in out:
    if row["name"] == "fed_round" and sec is not None and row["dtype"] in ceiling:
      row["ratio"] = round(ceiling[row["dtype"]][0] / sec, 4)
      row["ceiling_lowering"] = ceiling[row["dtype"]][1]
    emit(row)
  if stop[0]:
    sys.exit(143)  # as the SIGTERM would have, once the rows are out
  if a.profile:  # after the rows: a step that runs out of time while tracing has printed its times
    for _, call, _, _, _, _, name, exe in timed:
      profile(name, call, exe.as_text())


if __name__ == "__main__":
  main()
