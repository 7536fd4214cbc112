"""XLA compile time of per-leaf random draws in unrolled clients: leaf by leaf vs ``fedkd.fl.leafrand.per_leaf``.

  python bench/leafrand_compile.py [--clients 4] [--width 4] [--depth 1] [--reps 2]

One jitted program per method: ``--clients`` clients unrolled (as the CPU layout runs them), each drawing a
normal for every leaf of the UNet's parameters (``model.width`` / ``model.depth``), leaf l keyed
fold_in(fold_in(key, client), l) (the Gaussian attackers' noise; int8 rounding draws the same way). Leaf by
leaf, each draw is its own threefry computation (on CPU a rolled while loop); ``per_leaf`` makes one fold_in
and one draw per distinct leaf size. The methods alternate ``--reps`` times, each compile fresh (no
persistent cache). Prints one JSON line per compile and a summary line with the median seconds of each
and their ratio.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from fedkd.config import base_config
from fedkd.fl import leafrand
from fedkd.models import init_params


def main() -> None:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
  from bench import ArgumentParser, fail

  p = ArgumentParser(prog="leafrand_compile", description=__doc__.splitlines()[0])
  p.add_argument("--clients", type=int, default=4, help="clients unrolled in the program")
  p.add_argument("--width", type=int, default=4, help="the UNet's model.width")
  p.add_argument("--depth", type=int, default=1, help="the UNet's model.depth")
  p.add_argument("--reps", type=int, default=2, help="compiles of each method (alternated)")
  a = p.parse_args()
  for flag in ("clients", "width", "depth", "reps"):
    if getattr(a, flag) < 1:
      fail(p.prog, f"--{flag}={getattr(a, flag)}: give 1 or more")
  jax.config.update("jax_enable_compilation_cache", False)
  cfg = base_config().model
  cfg.width, cfg.depth = a.width, a.depth
  _, params = init_params(cfg, 0)
  shapes = {l: tuple(x.shape) for l, x in enumerate(jax.tree.leaves(params))}

  def draw(k, s):
    return jax.random.normal(k, s, jnp.float32)

  methods = {
    "leaf_by_leaf": lambda k: {l: draw(jax.random.fold_in(k, l), s) for l, s in shapes.items()},
    "per_leaf": lambda k: leafrand.per_leaf(draw, k, shapes),
  }
  times: dict[str, list[float]] = {m: [] for m in methods}
  for rep in range(a.reps):
    for name, noise in methods.items():

      def program(key, noise=noise):  # the clients unrolled, as the CPU layout emits them
        return [noise(jax.random.fold_in(key, i)) for i in range(a.clients)]

      lowered = jax.jit(program).lower(jax.random.key(rep))
      t = time.perf_counter()
      compiled = lowered.compile()
      seconds = time.perf_counter() - t
      loops = len(re.findall(r"\bwhile\(", compiled.as_text()))
      times[name].append(seconds)
      row = {"name": "leafrand_compile", "method": name, "rep": rep, "compile_s": round(seconds, 3)}
      print(json.dumps({**row, "while_loops": loops, "leaves": len(shapes), "clients": a.clients}), flush=True)
  med = {m: statistics.median(v) for m, v in times.items()}
  summary = {"name": "leafrand_compile_summary", "median_compile_s": {m: round(v, 3) for m, v in med.items()}}
  summary["ratio_leaf_by_leaf_over_per_leaf"] = round(med["leaf_by_leaf"] / med["per_leaf"], 2)
  summary["device"] = jax.devices()[0].device_kind
  summary["leaf_sizes"] = len({math.prod(s) for s in shapes.values()})
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
