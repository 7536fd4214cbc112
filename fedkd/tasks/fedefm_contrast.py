r"""Paired contrasts between runs of two FedEFM workdirs (e.g. a setting changed in a second workdir, such as
``fedefm.detach_weights``), by seed, with the same statistics as ``endpoints.md``:

  python -m fedkd.tasks.fedefm_contrast --a=runs/fedefm_grad:fedefm --b=runs/fedefm_seg:fedefm \
      --keys=foundation,n8/dice/mean

Each of ``--a`` / ``--b`` is ``WORKDIR:METHOD`` (``METHOD +KD`` for a teacher-KD fine-tune) read from
``WORKDIR/results_raw.jsonl`` at ``--unseen_percent`` (default 100); the seeds both hold are paired. Prints
one Markdown row per key: a - b, 95% t-interval, paired t-test p, Holm over the keys given. ``--keys`` are
the records' numeric results (e.g. foundation, dice/mean, n8/dice/mean, seconds), each named once; a record
holding NaN, Inf, a number too large for a float, or null where its side's other seeds hold a number, is an
error, not a result; so are two records of one seed. A last line cut short (the experiment was stopped while
writing it) is left out with a note.

A side may pool several workdirs that ran the same config on different seeds (comma list; a seed held by
two of them, or configs that differ in more than ``config.experiment``, is an error; a workdir without
``config.json`` cannot be compared and is pooled with a note naming it), e.g. seeds 0-4 and a replication on
seeds 5-9:

  python -m fedkd.tasks.fedefm_contrast --a=runs/fedefm_seg:fedefm,runs/fedefm_rep:fedefm \
      --b=runs/fedefm_seg:fedavg,runs/fedefm_rep:fedavg
"""

from __future__ import annotations

import math
import os
import sys

from absl import flags

from fedkd import report
from fedkd.config import ConfigError
from fedkd.errors import reason
from fedkd.logs import BadJsonLine, json_lines
from fedkd.workdir import read_json_object

FLAGS = flags.FLAGS
flags.DEFINE_string("a", None, "WORKDIR:METHOD of the first runs (a comma list pools workdirs of other seeds)")
flags.DEFINE_string("b", None, "WORKDIR:METHOD of the runs subtracted (a comma list pools workdirs of other seeds)")
flags.DEFINE_string(
  "keys", "foundation", "comma list of numeric result keys (results_raw.jsonl), e.g. foundation,dice/mean"
)
flags.DEFINE_float("unseen_percent", 100.0, "the unseen-label % of the runs compared")


def _workdir(spec: str) -> str:
  """The WORKDIR of a ``WORKDIR:METHOD`` spec (a ConfigError naming the form when either part is missing)."""
  workdir, sep, method = spec.rpartition(":")
  if not sep or not workdir or not method:
    raise ConfigError(f"{spec!r}: give WORKDIR:METHOD, e.g. runs/fedefm_seg:fedefm")
  return os.path.expanduser(workdir)


_NOTED: set[str] = set()


def _note(text: str) -> None:
  """A one-line note on stderr (stdout holds only the table), once per run of the command: a workdir on both
  sides of the contrast is read twice."""
  if text not in _NOTED:
    _NOTED.add(text)
    print(f"note: {text}", file=sys.stderr, flush=True)


def read_runs(spec: str, percent: float) -> dict[int, dict]:
  """{seed: record} of ``WORKDIR:METHOD`` (``METHOD +KD``: its teacher-KD rows). A last line that is not JSON
  (a write cut short when the experiment was stopped, :func:`fedkd.logs.json_lines`; the experiment redoes that
  run) is skipped with a note; any other line that is not a JSON object, a record without a whole-number
  seed, or two records of one seed is a ConfigError naming the line(s)."""
  method = spec.rpartition(":")[2]
  kd = method.endswith(" +KD")
  method = method.removesuffix(" +KD")
  path = os.path.join(_workdir(spec), "results_raw.jsonl")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable ({reason(e, 120)}); give a FedEFM workdir") from None
  try:
    lines, cut = json_lines(text)
  except BadJsonLine as e:
    raise ConfigError(
      f"{path}:{e.number} is not JSON ({str(e.error)[:120]}); give a FedEFM workdir's results"
    ) from None
  if cut is not None:
    _note(
      f"{path}: left out its last line ({cut}), which was cut short (the experiment was stopped while "
      "writing it; re-running the experiment redoes that run)"
    )
  out: dict[int, dict] = {}
  line_of: dict[int, int] = {}
  for number, _, row in lines:
    if not isinstance(row, dict):
      raise ConfigError(
        f"{path}:{number} is a JSON {type(row).__name__}, not a result record (an object); "
        "give a FedEFM workdir's results"
      )
    if row.get("method") == method and row.get("teacher_kd") == kd and row.get("unseen_percent") == percent:
      seed = row.get("seed")
      if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(
          f"{path}:{number}: the record's 'seed' is {report.shown_value(seed)}, not a whole number; give a FedEFM workdir's "
          "results (delete that line and re-run the experiment to redo the run)"
        )
      if seed in out:
        raise ConfigError(
          f"{path}: lines {line_of[seed]} and {number} are both the record of {spec.rpartition(':')[2]!r} seed "
          f"{seed} at {percent:g}% unseen (one run, two results); delete the line that should not count"
        )
      out[seed], line_of[seed] = row, number
  if not out:
    raise ConfigError(f"{path} holds no finished {spec.rpartition(':')[2]!r} run at {percent:g}% unseen")
  return out


def _saved_config(path: str) -> dict:
  """A pooled workdir's config.json (a ConfigError naming the file when it is unreadable or not an object)."""
  try:
    return read_json_object(path)
  except (OSError, ValueError) as e:
    raise ConfigError(
      f"{path} is unreadable ({reason(e, 120)}), so its runs cannot be checked to be of the same config as "
      "the others pooled; restore the file, or contrast that workdir alone"
    ) from None


def read_side(spec: str, percent: float) -> tuple[dict[int, dict], dict[int, str]]:
  """{seed: record} of a comma list of ``WORKDIR:METHOD`` specs, pooled: their seeds must differ, and
  their workdirs' configs (``config.json``, where every one has it) may differ only in
  ``config.experiment`` (seeds, method lists); and {seed: workdir} of the seeds from a pooled workdir without
  config.json, whose config is unchecked."""
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
  if len(specs) > 1:
    configs = [(x, os.path.join(_workdir(x), "config.json")) for x in specs]
    have = [(x, c) for x, c in configs if os.path.lexists(c)]
    lacking = [_workdir(x) for x, c in configs if not os.path.lexists(c)]
    unchecked = {seed: _workdir(one) for seed, one in where.items() if _workdir(one) in lacking}
    if lacking:
      _note(
        f"pooled without config.json, so not checked to have run the config of the others: {', '.join(lacking)} "
        "(restore its config.json to have it checked)"
      )
    if len(have) > 1:
      from fedkd.tasks.fedefm import config_difference

      first = _saved_config(have[0][1])
      for one, path in have[1:]:
        # the results part (config.experiment is left out), in either order
        diff = config_difference(first, _saved_config(path), pooled=True)
        if diff is not None:
          raise ConfigError(f"{have[0][0]} and {one} ran different configs ({diff}); pool only runs of one config")
    return out, unchecked
  return out, {}


PAIRING_KEYS = ("seed", "unseen_percent")  # which runs are paired, not results


def numeric_keys(*sides: dict[int, dict]) -> list[str]:
  """The keys that are a number (or null) in every record of every side and a number in at least one
  record of each side: the results a contrast can take (not labels, lists or nested records)."""
  records = [r for side in sides for r in side.values()]
  keys = {k for r in records for k in r if k not in PAIRING_KEYS}
  return sorted(
    k
    for k in keys
    if all(r.get(k) is None or report.is_number(r[k]) for r in records)
    and all(any(report.is_number(r.get(k)) for r in side.values()) for side in sides)
  )


def parse_keys(text: str, a: dict[int, dict], b: dict[int, dict]) -> list[str]:
  """The ``--keys`` comma list, checked against the numeric keys of the records (ConfigError otherwise):
  not empty, each key once (Holm counts each as one test), each numeric."""
  keys = [k.strip() for k in text.split(",") if k.strip()]
  numeric = numeric_keys(a, b)
  offered = f"numeric keys of these records: {', '.join(numeric) or '(none)'}"
  if not keys:
    raise ConfigError(f"--keys={text!r} names no key; give a comma list of {offered}")
  twice = sorted({k for k in keys if keys.count(k) > 1})
  if twice:
    raise ConfigError(
      f"--keys={text!r} names {', '.join(twice)} more than once; give each key once (Holm counts each as one test)"
    )
  bad = [k for k in keys if k not in numeric]
  for k in bad:  # a number in some records, something else in one: name that record
    for side, runs in (("--a", a), ("--b", b)):
      odd = [(s, r[k]) for s, r in sorted(runs.items()) if r.get(k) is not None and not report.is_number(r[k])]
      if odd and any(report.is_number(r.get(k)) for r in runs.values()):
        raise ConfigError(
          f"{side}: the record of seed {odd[0][0]} holds {report.shown_value(odd[0][1])} for {k!r}, not a number; redo that "
          "run (delete its line in results_raw.jsonl and re-run the experiment) or leave the key out"
        )
  if bad:
    raise ConfigError(f"--keys: {', '.join(map(repr, bad))} is not a numeric result of both run sets; {offered}")
  return keys


def contrast_rows(
  a: dict[int, dict], b: dict[int, dict], keys: list[str], unchecked: tuple[dict, dict] = ({}, {})
) -> tuple[str, list[str]]:
  """(the Holm correction's words, markdown rows ``| key | n | difference [95% CI] p (Holm) |``) over the seeds
  both hold (a key of fewer than 2 seeds has no p and is not counted among the tests); ``keys`` are
  numeric keys of the records (:func:`parse_keys`); ``unchecked``: each side's seeds from a pooled workdir
  without config.json (:func:`read_side`), named as possibly of another config where a key is missing."""
  seeds = sorted(set(a) & set(b))
  results = []
  for k in keys:
    pairs = [(a[s][k], b[s][k]) for s in seeds if report.is_number(a[s].get(k)) and report.is_number(b[s].get(k))]
    for s in seeds:  # NaN / Inf is not a result: a contrast over it would print nan as a difference
      for side, rec, runs, loose in (("--a", a[s], a, unchecked[0]), ("--b", b[s], b, unchecked[1])):
        v = rec.get(k)
        # null where the side's other seeds hold a number: a lost result, which would silently shrink n
        if (report.is_number(v) and not report.is_finite_number(v)) or (
          v is None and any(report.is_finite_number(r.get(k)) for r in runs.values())
        ):
          held = f"holds {report.shown_value(v)} for {k!r}" if k in rec else f"has no {k!r} (its other seeds have)"
          other = (
            f"; or {loose[s]}, pooled without config.json, ran another config (one without that result): "
            "contrast it alone"
            if s in loose and k not in rec
            else ""
          )
          raise ConfigError(
            f"{side}: the record of seed {s} {held}, not a result; redo that run (delete its line in "
            f"results_raw.jsonl and re-run the experiment) or leave the key out{other}"
          )
    if not pairs:
      raise ConfigError(
        f"no seed has {k!r} in both run sets; numeric keys of these records: {', '.join(numeric_keys(a, b))}"
      )
    results.append(report.paired_difference([x for x, _ in pairs], [y for _, y in pairs]))
  adjusted, holm_words = report.holm_family([r["p"] for r in results], "keys")
  lines = ["| key | n | difference [95% CI] p |", "|---|---:|---|"]
  for k, r, pa in zip(keys, results, adjusted):
    pa = None if pa is None or math.isnan(pa) else pa
    lines.append(f"| {k} | {r['n']} | {report.format_contrast(r, pa)} |")
  return holm_words, lines


def main(argv) -> int:
  del argv
  if not FLAGS.a or not FLAGS.b:
    raise ConfigError("give --a=WORKDIR:METHOD and --b=WORKDIR:METHOD")
  (a, loose_a), (b, loose_b) = read_side(FLAGS.a, FLAGS.unseen_percent), read_side(FLAGS.b, FLAGS.unseen_percent)
  if not set(a) & set(b):
    raise ConfigError(f"{FLAGS.a} (seeds {sorted(a)}) and {FLAGS.b} (seeds {sorted(b)}) share no seed")
  keys = parse_keys(FLAGS.keys, a, b)
  holm_words, rows = contrast_rows(a, b, keys, (loose_a, loose_b))  # every error before anything is printed
  print(f"{FLAGS.a} - {FLAGS.b}, paired by seed; 95% t-interval; {holm_words}\n")
  print("\n".join(rows))
  return 0


def run(argv: list[str] | None = None) -> None:
  """The entry point: flag errors and bad inputs are one line (exit 2), ``--help`` exits 0 (fedkd.cli)."""
  from fedkd import cli

  cli.run_app(main, argv, uses_config=False, usage=__doc__, shared=(), interrupted="interrupted; nothing was written")


if __name__ == "__main__":
  run()
