"""N seeds as replicas of one compiled program (``fedkd.main --seeds``) vs N runs one after another, in
one process. JSON lines.

Both sides run the same config and seeds end to end through their task code (``fedkd.tasks.replicas.run``
and ``fedkd.tasks.fedavg.run``; evaluation, logs and checkpoints included) with JAX's persistent
compilation cache off. Reported per side: wall seconds of the whole job, the compile-inclusive first
round (as its round line prints it), and the median steady round: the time from one round line to the
next, rounds 2 to N - 1 (the last one also evaluates and saves). The sequential side compiles every run's round again (one process
per run, as ``launch.sweep`` starts them, would read it from the sweep's compilation cache instead:
``sequential_steady_s`` x rounds + one compile is that case).

  python bench/replicas.py --config configs/quickstart.py --seeds 0,1,2 --rounds 4
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_ROUND = re.compile(r"^round\s+(\d+)/\d+ .*?\s(\d+\.\d+)(ms|s)\s")  # fedkd.logs.duration: ms below 0.1 s


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
  first: list[float] = []
  stamps: list[float] = []

  def log(line: str):
    m = _ROUND.match(line)
    if m:
      stamps.append(time.perf_counter())
      if not first:
        first.append(float(m.group(2)) / (1e3 if m.group(3) == "ms" else 1.0))

  t = time.perf_counter()
  fn(log)
  wall = time.perf_counter() - t
  steady = [b - a for a, b in zip(stamps[:-1], stamps[1:])][:-1]
  return wall, first + steady


def main() -> None:
  from bench import ArgumentParser, fail

  p = ArgumentParser(prog="replicas", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.py"), help="FILE[:ARG]")
  p.add_argument("--seeds", default="0,1,2", help="comma list of two or more distinct seeds")
  p.add_argument(
    "--rounds", type=int, default=4, help="rounds per run (>= 3: the first one compiles, the last one evaluates)"
  )
  p.add_argument("--layout", default="auto", help="the replica axis: auto | loop | unroll | vmap")
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
  path, _, arg = a.config.partition(":")
  if not os.path.isfile(path):
    fail("replicas", f"--config={a.config}: no config file at {path}")
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  import jax

  jax.config.update("jax_enable_compilation_cache", False)
  from fedkd.errors import USER_ERRORS
  from fedkd.tasks import fedavg, replicas

  try:
    replicas.replica_layout(a.layout)
    configs = [_config(path, arg or None, a.rounds, s) for s in seeds]
  except (ValueError, *USER_ERRORS) as e:
    fail("replicas", str(e))
  work = tempfile.mkdtemp(prefix="fedkd-bench-replicas-")
  c = configs[0]
  imgs = c.clients_per_round * c.local_steps * c.batch_size
  common = {
    "config": a.config,
    "seeds": len(seeds),
    "rounds": a.rounds,
    "images_per_replica_round": imgs,
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
  }
  try:  # a config the replica program refuses (fedkd.tasks.replicas names why)
    wall_r, rounds_r = _timed(
      lambda log: replicas.run(configs, [f"{work}/r{s}" for s in seeds], log=log, layout=a.layout)
    )
  except USER_ERRORS as e:
    fail("replicas", str(e))
  seq_wall, seq_first, seq_steady = 0.0, [], []
  for s, cfg in zip(seeds, configs):
    w, secs = _timed(lambda log, cfg=cfg, s=s: fedavg.run(cfg, f"{work}/s{s}", log=log))
    seq_wall += w
    seq_first.append(secs[0])
    seq_steady += secs[1:]
  steady_r = statistics.median(rounds_r[1:])
  steady_s = statistics.median(seq_steady)
  row = {
    "name": "replicas_vs_sequential",
    **common,
    "layout": a.layout,
    "replicas_wall_s": round(wall_r, 2),
    "replicas_first_round_s": round(rounds_r[0], 2),
    "replicas_steady_round_s": round(steady_r, 4),
    "sequential_wall_s": round(seq_wall, 2),
    "sequential_first_round_s": round(statistics.mean(seq_first), 2),
    "sequential_steady_round_s": round(steady_s, 4),
    # > 1: the replica program is faster
    "steady_speedup": round(len(seeds) * steady_s / steady_r, 3),
    "wall_speedup": round(seq_wall / wall_r, 3),
    "replicas_images_per_s": round(len(seeds) * imgs / steady_r, 1),
    "sequential_images_per_s": round(imgs / steady_s, 1),
  }
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
