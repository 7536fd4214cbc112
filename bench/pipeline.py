"""Does the host data pipeline keep up with the rounds? JSON lines, all rows from one process.

  python bench/pipeline.py --data_dir /tmp/fedkd_pipeline_tfds            # builds the dataset once
  python bench/pipeline.py --data_dir DIR --size 128 --clients 16 --steps 4 --batch 8 --workers 0,4,12

The dataset: ``tfds:synthetic_endovascular`` (snapshots of the on-device generator, so both sources show
the same kind of images) for the five training hospitals and the unseen one, ``--train`` images each at
``--size`` px, built into ``--data_dir`` when missing. The model and schedule are the quickstart's
(``configs/quickstart.py``) at the given sizes.

Rows:
  pipeline  ``round_batches`` alone, no training, prefetch off, per ``--workers``: images/s (decode +
            augmentation, the host work a round needs);
  train     the same FedAvg run fed by on-device synthetic data and by the TFDS pipeline (per
            ``--workers``, prefetching the next round while a round trains): images/s over the rounds
            after the first two (compilation) without the last (evaluation), the median seconds per round
            the round waited for its batches (``input_wait_s``, the same rounds), and
            ``ratio_to_synthetic`` (TFDS images/s over synthetic images/s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def site_configs(data_dir: str, size: int, train: int, test: int) -> tuple[list[str], str]:
  """(training site configs, unseen site config) of the dataset, built where missing."""
  from fedkd.data import sites
  from fedkd.data.tfds import api

  train_sites, unseen = sites.make_sites(5)
  names = []
  for s in list(train_sites) + [unseen]:
    name = f"{s.name}-{size}px-{train}-{test}-seed0"
    if name not in api.prepared_configs("synthetic_endovascular", data_dir):
      print(f"building {name} in {data_dir}", file=sys.stderr, flush=True)
      with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress: stdout stays JSON lines
        api.build("synthetic_endovascular", data_dir, site=s.name, image_size=size, num_train=train, num_test=test)
    names.append(name)
  return names[:-1], names[-1]


def make_config(a, source: str, workers: int, prefetch: bool, configs: list[str], unseen: str):
  from configs.quickstart import get_config

  c = get_config()
  c.image_size, c.num_clients, c.clients_per_round = a.size, a.clients, a.clients
  c.local_steps, c.batch_size, c.num_rounds = a.steps, a.batch, a.rounds
  c.eval.every = c.checkpoint.every = a.rounds  # one evaluation and one checkpoint, at the end
  c.eval.examples_per_site, c.eval.max_sites = 4, 1
  if source != "synthetic":
    c.data.source = "tfds:synthetic_endovascular"
    c.data.tfds_data_dir = a.data_dir
    c.data.tfds_configs = ",".join(configs + [unseen])
    c.data.unseen_site = unseen
    c.data.partition = "iid"
    c.quantity_skew = 0.0
  c.data.workers, c.data.prefetch = workers, prefetch
  return c


def pipeline_row(a, workers: int, configs, unseen) -> dict:
  from fedkd.data import pipeline

  data = pipeline.make_client_data(make_config(a, "tfds", workers, False, configs, unseen))
  rng = np.random.default_rng(0)
  try:
    data.round_batches(0, np.arange(a.clients))  # opens every client's dataset (and starts the workers)
    t = time.perf_counter()
    for r in range(1, a.rounds + 1):
      data.round_batches(r, rng.permutation(a.clients))
    sec = (time.perf_counter() - t) / a.rounds
  finally:
    data.close()
  return {"name": "pipeline", "workers": workers, "images_per_s": round(a.clients * a.steps * a.batch / sec, 1)}


def train_row(a, source: str, workers: int, configs, unseen) -> dict:
  from fedkd.data import pipeline
  from fedkd.logs import parse_round_line
  from fedkd.tasks import fedavg

  waits, stamps = [], []

  def timed(c):
    data = pipeline.make_client_data(c)
    inner = data.round_batches

    def round_batches(*args, **kw):
      t = time.perf_counter()
      out = inner(*args, **kw)
      waits.append(time.perf_counter() - t)
      return out

    data.round_batches = round_batches
    return data

  def log(line: str) -> None:
    if parse_round_line(line):  # not "round 0 (untrained)", whose evaluation precedes round 1
      stamps.append(time.perf_counter())

  old = fedavg.make_client_data
  fedavg.make_client_data = timed
  try:
    with tempfile.TemporaryDirectory() as work:
      fedavg.run(make_config(a, source, workers, True, configs, unseen), work, log=log)
  finally:
    fedavg.make_client_data = old
  # rounds 3 .. N - 1: the first two compile, the last one also evaluates. np.diff(stamps)[k] is round k + 2's
  # time (from round k + 1's line to its own); waits[k] is round k + 1's
  if len(stamps) != a.rounds or len(waits) != a.rounds:
    raise RuntimeError(f"{len(stamps)} round lines and {len(waits)} batch requests in a run of {a.rounds} rounds")
  per_round = np.diff(stamps)[1:-1]
  sec = float(np.median(per_round))
  row = {"name": "train", "source": source, "sec_per_round": round(sec, 5)}
  row["images_per_s"] = round(a.clients * a.steps * a.batch / sec, 1)
  row["input_wait_s"] = round(float(np.median(waits[2:-1])), 5)
  if source != "synthetic":
    row["workers"] = workers
  return row


def main(argv=None) -> None:
  from bench import ArgumentParser, fail

  ap = ArgumentParser(prog="pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data_dir", required=True, help="prepared TFDS datasets (built here when missing)")
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--train", type=int, default=64, help="training images per hospital in the dataset")
  ap.add_argument("--clients", type=int, default=8)
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--rounds", type=int, default=12)
  ap.add_argument("--workers", default="0,2", help="comma list of worker-process counts")
  a = ap.parse_args(argv)
  for k in ("size", "train", "clients", "steps", "batch"):
    if getattr(a, k) <= 0:
      fail("pipeline", f"--{k}={getattr(a, k)} must be positive")
  if a.rounds < 4:  # the training rows time the rounds after the first two (compilation), without the last
    fail("pipeline", f"--rounds={a.rounds}: give 4 or more (the first two rounds and the last are not timed)")
  if not all(w.strip().isdigit() for w in a.workers.split(",")):
    fail("pipeline", f"--workers={a.workers} is not a comma list of whole numbers >= 0 (e.g. 0,2)")
  import jax

  from fedkd.errors import USER_ERRORS

  try:
    run(a, jax)
  except USER_ERRORS as e:
    fail("pipeline", str(e))


def run(a, jax) -> None:
  configs, unseen = site_configs(a.data_dir, a.size, a.train, 8)
  common = {
    "bench": "pipeline",
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "cpus": os.cpu_count(),
    "size": a.size,
    "clients": a.clients,
    "steps": a.steps,
    "batch": a.batch,
  }
  workers = [int(w) for w in a.workers.split(",")]
  for w in workers:
    print(json.dumps({**common, **pipeline_row(a, w, configs, unseen)}), flush=True)
  synthetic = train_row(a, "synthetic", 0, configs, unseen)
  print(json.dumps({**common, **synthetic}), flush=True)
  for w in workers:
    row = train_row(a, "tfds", w, configs, unseen)
    row["ratio_to_synthetic"] = round(row["images_per_s"] / synthetic["images_per_s"], 4)
    print(json.dumps({**common, **row}), flush=True)


if __name__ == "__main__":
  main()
