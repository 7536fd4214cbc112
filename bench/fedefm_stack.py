"""FedEFM round throughput, and would stacking seeds on the silo axis speed up the experiment? JSON lines,
one process.

For each method, the experiment's own pretraining round (``fedkd.tasks.fedefm.Experiment.pretrain``) is
timed with ``--silos`` silos and with ``--replicas`` x that many on the silo axis (the shape a
seeds x silos program would have: the same per-silo work, ``--replicas`` times the rows), and the
stacked round is compared with ``--replicas`` sequential rounds of the small one. Compilation and the
round whose program changes (FedEFM's first distilling round) are left out: the median of the rounds
after them. ``images_per_s``: silos x local steps x batch per second of one round (the FedEFM round also
trains the overseas experts and solves the EMDs on those images); a last ``fedefm_vs_fedavg`` row gives
the ratio of the two methods' images/s when both were measured.

  python bench/fedefm_stack.py --methods fedefm,fedavg --replicas 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_ROUND = re.compile(r": pretraining round \d+/\d+ ")  # fedkd.tasks.fedefm's line at the end of each round


def seconds_per_round(method: str, silos: int, rounds: int, variant: str) -> tuple[float, int]:
  """(median seconds per round, images per round)."""
  from configs.fedefm import get_config
  from fedkd.tasks import fedefm as task

  c = get_config(variant)
  c.pretrain.num_silos = silos
  c.pretrain.num_rounds = rounds
  c.log_every = 1
  c.eval.foundation_every = rounds + 1  # no foundation scoring inside the timed rounds (the last round scores)
  stamps: list[float] = []

  def log(line: str) -> None:  # the round lines only (a note after the last round would shift the rounds)
    if _ROUND.search(line):
      stamps.append(time.perf_counter())

  exp = task.Experiment(c, tempfile.mkdtemp(), log=log)
  exp.pretrain(method, 100.0, 0)
  if len(stamps) != rounds:
    raise RuntimeError(f"{len(stamps)} pretraining round lines in a run of {rounds} rounds")
  per_round = np.diff(stamps)  # round r's log line to round r + 1's
  skip = c.fedefm.warmup_rounds + 1  # compile + the warm-up program, then the distilling program's compile
  images = silos * c.pretrain.local_steps * c.pretrain.batch_size
  timed = per_round[skip:-1]  # the last round also scores the foundation
  if not len(timed):  # main() refuses such --rounds; a NaN row would not be JSON
    raise ValueError(f"rounds={rounds} leaves no round to time; give rounds >= {skip + 3}")
  return float(np.median(timed)), images


def main(argv=None) -> None:
  from bench import ArgumentParser, fail

  ap = ArgumentParser(prog="fedefm_stack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--methods", default="fedefm,fedavg")
  ap.add_argument("--silos", type=int, default=6)
  ap.add_argument("--replicas", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=8)
  ap.add_argument("--config", default="runlocal", help="configs/fedefm.py variant")
  a = ap.parse_args(argv)
  from fedkd.config import FEDEFM_METHODS
  from fedkd.errors import USER_ERRORS

  for k in ("silos", "replicas", "rounds"):
    if getattr(a, k) <= 0:
      fail("fedefm_stack", f"--{k}={getattr(a, k)} must be positive")
  for m in a.methods.split(","):
    if m not in FEDEFM_METHODS or m == "scratch":
      fail("fedefm_stack", f"--methods: unknown method {m!r}; use some of {', '.join(FEDEFM_METHODS[1:])}")
  from configs.fedefm import get_config

  try:
    need = get_config(a.config).fedefm.warmup_rounds + 4
  except USER_ERRORS as e:
    fail("fedefm_stack", str(e))
  if a.rounds < need:
    fail(
      "fedefm_stack",
      f"--rounds={a.rounds} leaves no round to time (compilation, the warm-up round(s), the distilling program's "
      f"compile and the last, scoring round are left out); give --rounds >= {need}",
    )
  import jax

  rate = {}
  for method in a.methods.split(","):
    try:
      one, images = seconds_per_round(method, a.silos, a.rounds, a.config)
      stacked, _ = seconds_per_round(method, a.silos * a.replicas, a.rounds, a.config)
    except USER_ERRORS as e:
      fail("fedefm_stack", str(e))
    rate[method] = images / one
    row = {
      "bench": "fedefm_stack",
      "device": jax.devices()[0].device_kind,
      "backend": jax.default_backend(),
      "method": method,
      "silos": a.silos,
      "replicas": a.replicas,
      "config": a.config,
      "sec_per_round_one": round(one, 4),
      "images_per_s": round(images / one, 1),
      "sec_per_round_stacked": round(stacked, 4),
      "speedup_stacked_vs_sequential": round(a.replicas * one / stacked, 3),
    }
    print(json.dumps(row), flush=True)
  if "fedefm" in rate and "fedavg" in rate:
    print(json.dumps({"bench": "fedefm_vs_fedavg", "images_per_s_ratio": round(rate["fedefm"] / rate["fedavg"], 4)}))


if __name__ == "__main__":
  main()
