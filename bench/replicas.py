"""N seeds as replicas of one compiled program (``fedkd.main --seeds``) vs N runs one after another, each
side in its own fresh Python process. JSON lines.

Both sides run the same config and seeds end to end through their task code (``fedkd.tasks.replicas.run``
and ``fedkd.tasks.fedavg.run``; evaluation, logs and checkpoints included) with JAX's persistent
compilation cache off. Each side runs in a new process of this interpreter (``--order`` says which
first), so neither reuses the other's compiled programs: each pays its own one-time compiles of the
evaluation, data and init programs (the sequential side once, in its first run: its later runs reuse them
in memory). Reported per side: wall seconds of the whole job (timed inside its process, from the task's
start; interpreter start and imports are in ``*_process_s``), the compile-inclusive first round (as its
round line prints it), the median steady round: the time from one round line to the next, rounds 2 to
N - 1 (the last one also evaluates and saves), and the XLA compiles it ran (count and seconds). The
sequential side compiles every run's round again (one process per run, as ``launch.sweep`` starts them,
would read it from the sweep's compilation cache instead: ``sequential_steady_s`` x rounds + one compile
is that case).

  python bench/replicas.py --config configs/quickstart.py --seeds 0,1,2 --rounds 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
SIDES = ("replicas", "sequential")
ORDERS = {"replicas-first": SIDES, "sequential-first": SIDES[::-1]}


def _config(path: str, arg: str | None, rounds: int, seed: int):
  spec = importlib.util.spec_from_file_location("bench_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.num_rounds = rounds
  c.eval.every = rounds
  c.checkpoint.every = rounds
  c.seed = seed
  return c


def _timed(fn) -> tuple[float, list[float]]:
  """(wall seconds, per-round seconds) of ``fn(log)``: the first round's seconds as its round line prints
  them (compilation included: whole seconds), then each steady round's, clocked here from one round line
  to the next (the lines print hundredths of a second: too coarse for a round of a few milliseconds),
  rounds 2 to N - 1; the last round's line also waits for its evaluation and checkpoint."""
  from fedkd.logs import parse_round_line

  first: list[float] = []
  stamps: list[float] = []

  def log(line: str):
    parsed = parse_round_line(line)
    if parsed:
      stamps.append(time.perf_counter())
      if not first:
        first.append(parsed[2])

  t = time.perf_counter()
  fn(log)
  wall = time.perf_counter() - t
  steady = [b - a for a, b in zip(stamps[:-1], stamps[1:])][:-1]
  return wall, first + steady


def _configs(a, seeds: list[int]) -> list:
  """The runs' configs, refused (one line, exit 2) where they cannot be the replicas this bench times.
  Reads the configs only: no JAX backend is started."""
  from bench import fail
  from fedkd.errors import USER_ERRORS
  from fedkd.tasks import replicas

  path, _, arg = a.config.partition(":")
  if not os.path.isfile(path):
    fail("replicas", f"--config={a.config}: no config file at {path}")
  try:
    replicas.replica_layout(a.layout)
    configs = [_config(path, arg or None, a.rounds, s) for s in seeds]
  except (ValueError, *USER_ERRORS) as e:
    fail("replicas", str(e))
  if configs[0].get("task", "fedavg") == "fedefm":
    fail(
      "replicas",
      f"--config={a.config} is a FedEFM config (config.task='fedefm'); this bench times FedAvg-type runs: "
      "time a FedEFM grid with bench/fedefm_grid.py",
    )
  reason = replicas.why_not(configs)
  if reason is not None:
    fail("replicas", f"--config={a.config}: these runs cannot be replicas of one program: {reason}")
  return configs


def _side(a, seeds: list[int]) -> None:
  """One side, in this (fresh) process: one JSON line on stdout."""
  from bench import fail

  configs = _configs(a, seeds)
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  import jax
  from jax import monitoring

  jax.config.update("jax_enable_compilation_cache", False)
  from fedkd.errors import USER_ERRORS
  from fedkd.tasks import fedavg, replicas

  compiles: list[float] = []

  def on_event(event: str, secs: float, **_):
    if event == _COMPILE_EVENT:
      compiles.append(secs)

  out = {
    "side": a.side,
    "pid": os.getpid(),
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
  }
  monitoring.register_event_duration_secs_listener(on_event)
  try:  # a config the replica program refuses (fedkd.tasks.replicas names why)
    if a.side == "replicas":
      wall, secs = _timed(
        lambda log: replicas.run(configs, [f"{a.workdir}/r{s}" for s in seeds], log=log, layout=a.layout)
      )
      out.update(
        wall_s=wall,
        first_round_s=[secs[0]],
        steady_round_s=secs[1:],
        compiles=[len(compiles)],
        compile_s=[sum(compiles)],
      )
    else:
      out.update(wall_s=0.0, first_round_s=[], steady_round_s=[], compiles=[], compile_s=[])
      for s, cfg in zip(seeds, configs):
        n = len(compiles)
        w, secs = _timed(lambda log, cfg=cfg, s=s: fedavg.run(cfg, f"{a.workdir}/s{s}", log=log))
        out["wall_s"] += w
        out["first_round_s"].append(secs[0])
        out["steady_round_s"] += secs[1:]
        out["compiles"].append(len(compiles) - n)
        out["compile_s"].append(sum(compiles[n:]))
  except USER_ERRORS as e:
    fail("replicas", str(e))
  finally:
    monitoring.unregister_event_duration_listener(on_event)
  print(json.dumps(out), flush=True)


def _run_side(side: str, a, workdir: str) -> tuple[dict, float]:
  """``side`` in a fresh process of this interpreter: (its JSON line, the process's wall seconds). Its
  user error (exit 2) is this tool's one line; any other failure shows its stderr (the traceback)."""
  from bench import fail

  cmd = [sys.executable, os.path.abspath(__file__), f"--config={a.config}", f"--seeds={a.seeds}"]
  cmd += [f"--rounds={a.rounds}", f"--layout={a.layout}", f"--side={side}", f"--workdir={workdir}"]
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  t = time.perf_counter()
  p = subprocess.run(cmd, env=env, capture_output=True, text=True)
  secs = time.perf_counter() - t
  if p.returncode == 2:
    line = (p.stderr.strip().splitlines() or ["exit 2"])[-1]
    fail("replicas", line.removeprefix("replicas: error: "))
  if p.returncode != 0:
    sys.stderr.write(p.stderr)
    sys.exit(f"replicas: the {side} side failed (exit {p.returncode}): {' '.join(cmd)}")
  rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith('{"side": ')]
  return rows[-1], secs


def main() -> None:
  from bench import ArgumentParser, fail

  p = ArgumentParser(prog="replicas", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.py"), help="FILE[:ARG]")
  p.add_argument("--seeds", default="0,1,2", help="comma list of two or more distinct seeds")
  p.add_argument(
    "--rounds", type=int, default=4, help="rounds per run (>= 3: the first one compiles, the last one evaluates)"
  )
  p.add_argument("--layout", default="auto", help="the replica axis: auto | loop | unroll | vmap")
  p.add_argument("--order", default="replicas-first", choices=list(ORDERS), help="which side's process runs first")
  p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side in this process (internal)
  p.add_argument("--workdir", help=argparse.SUPPRESS)
  a = p.parse_args()
  seeds = [int(s) for s in a.seeds.split(",") if s.strip().lstrip("-").isdigit()]
  if len(seeds) != len(a.seeds.split(",")) or len(set(seeds)) < 2 or len(set(seeds)) != len(seeds):
    fail("replicas", f"--seeds={a.seeds} is not a comma list of two or more distinct whole numbers (e.g. 0,1,2)")
  if a.rounds < 3:
    fail(
      "replicas",
      f"--rounds={a.rounds}: give 3 or more (the first round compiles and the last one evaluates; the rounds "
      "between are timed)",
    )
  if a.side is not None:
    if not a.workdir:
      fail("replicas", "--side needs --workdir (the folder of that side's runs)")
    _side(a, seeds)
    return
  from fedkd.tasks import replicas

  configs = _configs(a, seeds)  # refused here, before either side starts
  c = configs[0]
  imgs = c.clients_per_round * c.local_steps * c.batch_size
  got, process_s = {}, {}
  with tempfile.TemporaryDirectory(prefix="fedkd-bench-replicas-") as work:
    for side in ORDERS[a.order]:
      got[side], process_s[side] = _run_side(side, a, os.path.join(work, side))
  r, s = got["replicas"], got["sequential"]
  steady_r = statistics.median(r["steady_round_s"])
  steady_s = statistics.median(s["steady_round_s"])
  row = {
    "name": "replicas_vs_sequential",
    "config": a.config,
    "seeds": len(seeds),
    "rounds": a.rounds,
    "images_per_replica_round": imgs,
    "backend": r["backend"],
    "device": r["device"],
    "jax": r["jax"],
    "layout": replicas.replica_layout(a.layout),
    "order": a.order,
    "isolation": "process",
    "replicas_wall_s": round(r["wall_s"], 2),
    "replicas_first_round_s": round(r["first_round_s"][0], 2),
    "replicas_steady_round_s": round(steady_r, 4),
    "replicas_process_s": round(process_s["replicas"], 2),
    "replicas_compiles": r["compiles"][0],
    "replicas_compile_s": round(r["compile_s"][0], 2),
    "sequential_wall_s": round(s["wall_s"], 2),
    "sequential_first_round_s": round(statistics.mean(s["first_round_s"]), 2),
    "sequential_steady_round_s": round(steady_s, 4),
    "sequential_process_s": round(process_s["sequential"], 2),
    "sequential_compiles": s["compiles"],  # per run: the first run's include the one-time programs
    "sequential_compile_s": round(sum(s["compile_s"]), 2),
    # > 1: the replica program is faster
    "steady_speedup": round(len(seeds) * steady_s / steady_r, 3),
    "wall_speedup": round(s["wall_s"] / r["wall_s"], 3),
    "replicas_images_per_s": round(len(seeds) * imgs / steady_r, 1),
    "sequential_images_per_s": round(imgs / steady_s, 1),
  }
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
