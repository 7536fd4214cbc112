"""Paired contrasts between runs of two FedEFM workdirs (e.g. a setting changed in a second workdir, such as
``fedefm.detach_weights``), by seed, with the same statistics as ``endpoints.md``:

  python -m fedkd.tasks.fedefm_contrast --a=runs/fedefm_grad:fedefm --b=runs/fedefm_seg:fedefm \
      --keys=foundation,n8/dice/mean

Each of ``--a`` / ``--b`` is ``WORKDIR:METHOD`` (``METHOD +KD`` for a teacher-KD fine-tune) read from
``WORKDIR/results_raw.jsonl`` at ``--unseen_percent`` (default 100); the seeds both hold are paired. Prints
one Markdown row per key: a - b, 95% t-interval, paired t-test p, Holm over the keys given.

A side may pool several workdirs that ran the same config on different seeds (comma list; a seed held by
two of them, or configs that differ in more than ``config.experiment``, is an error), e.g. seeds 0-4 and a
replication on seeds 5-9:

  python -m fedkd.tasks.fedefm_contrast --a=runs/fedefm_seg:fedefm,runs/fedefm_rep:fedefm \
      --b=runs/fedefm_seg:fedavg,runs/fedefm_rep:fedavg
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags

from fedkd import report
from fedkd.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("a", None, "WORKDIR:METHOD of the first runs (a comma list pools workdirs of other seeds)")
flags.DEFINE_string("b", None, "WORKDIR:METHOD of the runs subtracted (a comma list pools workdirs of other seeds)")
flags.DEFINE_string("keys", "foundation", "comma list of result keys (results_raw.jsonl), e.g. foundation,dice/mean")
flags.DEFINE_float("unseen_percent", 100.0, "the unseen-label % of the runs compared")


def _workdir(spec: str) -> str:
  """The WORKDIR of a ``WORKDIR:METHOD`` spec (a ConfigError naming the form when either part is missing)."""
  workdir, sep, method = spec.rpartition(":")
  if not sep or not workdir or not method:
    raise ConfigError(f"{spec!r}: give WORKDIR:METHOD, e.g. runs/fedefm_seg:fedefm")
  return os.path.expanduser(workdir)


def read_runs(spec: str, percent: float) -> dict[int, dict]:
  """{seed: record} of ``WORKDIR:METHOD`` (``METHOD +KD``: its teacher-KD rows)."""
  method = spec.rpartition(":")[2]
  kd = method.endswith(" +KD")
  method = method.removesuffix(" +KD")
  path = os.path.join(_workdir(spec), "results_raw.jsonl")
  try:
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable ({type(e).__name__}: {str(e)[:120]}); give a FedEFM workdir") from None
  out = {
    r["seed"]: r
    for r in rows
    if r.get("method") == method and r.get("teacher_kd") == kd and r.get("unseen_percent") == percent
  }
  if not out:
    raise ConfigError(f"{path} holds no finished {spec.rpartition(':')[2]!r} run at {percent:g}% unseen")
  return out


def read_side(spec: str, percent: float) -> dict[int, dict]:
  """{seed: record} of a comma list of ``WORKDIR:METHOD`` specs, pooled: their seeds must differ, and
  their workdirs' configs (``config.json``, where every one has it) may differ only in
  ``config.experiment`` (seeds, method lists)."""
  specs = [x.strip() for x in spec.split(",") if x.strip()]
  if not specs:
    raise ConfigError(f"{spec!r}: give WORKDIR:METHOD, e.g. runs/fedefm_seg:fedefm")
  out: dict[int, dict] = {}
  where: dict[int, str] = {}
  for one in specs:
    for seed, record in read_runs(one, percent).items():
      if seed in out:
        raise ConfigError(f"seed {seed} is in both {where[seed]} and {one}; pool workdirs that ran different seeds")
      out[seed], where[seed] = record, one
  configs = [os.path.join(_workdir(x), "config.json") for x in specs]
  if len(specs) > 1 and all(os.path.exists(c) for c in configs):
    from fedkd.tasks.fedefm import config_difference

    with open(configs[0], encoding="utf-8") as f:
      first = json.load(f)
    for path, one in zip(configs[1:], specs[1:]):
      with open(path, encoding="utf-8") as f:
        key = config_difference(first, json.load(f))  # the results part: config.experiment is left out
      if key is not None:
        raise ConfigError(
          f"{specs[0]} and {one} ran different configs (config.{key} differs); pool only runs of one config"
        )
  return out


def contrast_rows(a: dict[int, dict], b: dict[int, dict], keys: list[str]) -> list[str]:
  """Markdown rows ``| key | n | difference [95% CI] p (Holm) |`` over the seeds both hold."""
  seeds = sorted(set(a) & set(b))
  results = []
  for k in keys:
    pairs = [(a[s][k], b[s][k]) for s in seeds if a[s].get(k) is not None and b[s].get(k) is not None]
    if not pairs:
      raise ConfigError(f"no seed has {k!r} in both run sets; keys of a record: {', '.join(sorted(a[seeds[0]]))}")
    results.append(report.paired_difference([x for x, _ in pairs], [y for _, y in pairs]))
  adjusted = report.holm([r["p"] for r in results]) if len(results) > 1 else [None] * len(results)
  lines = ["| key | n | difference [95% CI] p |", "|---|---:|---|"]
  for k, r, pa in zip(keys, results, adjusted):
    pa = None if pa is None or math.isnan(pa) else pa
    lines.append(f"| {k} | {r['n']} | {report.format_contrast(r, pa)} |")
  return lines


def main(argv) -> int:
  del argv
  try:
    if not FLAGS.a or not FLAGS.b:
      raise ConfigError("give --a=WORKDIR:METHOD and --b=WORKDIR:METHOD")
    a, b = read_side(FLAGS.a, FLAGS.unseen_percent), read_side(FLAGS.b, FLAGS.unseen_percent)
    if not set(a) & set(b):
      raise ConfigError(f"{FLAGS.a} (seeds {sorted(a)}) and {FLAGS.b} (seeds {sorted(b)}) share no seed")
    keys = [k.strip() for k in FLAGS.keys.split(",") if k.strip()]
    print(f"{FLAGS.a} - {FLAGS.b}, paired by seed; 95% t-interval; Holm over the {len(keys)} keys\n")
    print("\n".join(contrast_rows(a, b, keys)))
  except ConfigError as e:
    print(f"fedkd: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)
