"""Run a sweep defined next to a config, then aggregate it into one table and a few plots.

  python -m launch.sweep --config=configs/quickstart.py --out=runs/sweep_qs --parallel=2
  python -m launch.sweep --config=configs/quickstart.py --sweep=tiny --out=/tmp/qs_tiny --extra=--cpu_devices=2
  python -m launch.sweep --config=configs/fedavg_unet.py:runlocal --seeds=0,1,2 --out=runs/fedavg
  python -m launch.sweep --config=configs/quickstart.py --sweep=lr_grid --out=runs/lr   # 3 lr x 2 seeds, one program
  python -m launch.sweep --out=runs/sweep_qs --aggregate_only

``--config=FILE[:ARG]`` names a config file with ``get_config(arg)`` and ``get_sweep(arg)``; ARG goes
to get_config (and on to fedkd.main), ``--sweep=ARG`` to get_sweep. ``--seeds=0,1,2`` alone runs the
config once per seed (OUT/seed-<s>; no get_sweep needed); with ``--sweep`` it replaces the seeds of
that sweep (every other override crossed with these seeds). Every run is validated before the
first one starts. Each run is ``python -m fedkd.main --config=FILE[:ARG] --workdir=OUT/<run>
--config.KEY=VALUE ... EXTRA...`` in a subprocess (stdout/stderr appended to OUT/<run>/stdout.log and
stderr.log). Re-running the same command skips finished runs (latest checkpoint round == num_rounds, or the
last round dp.target_epsilon allows, and metrics.jsonl has that round; OUT/<run>/DONE is written after a
successful exit) and resumes
unfinished ones from their latest checkpoint (fedkd.main does that by itself); a run folder whose DONE or
checkpoint comes from another config than the sweep now gives that run (beyond what fedkd.main lets
change on resume: fedkd.tasks.fedavg.RESUMABLE_CHANGES) stops the sweep before anything runs. A failed
run does not stop the others; failures are listed at the end and the exit code is 1. Replicas (the default;
``--no-replicas`` turns them off): runs that differ only in their seed, learning rates, FedProx mu or DP
noise / clip (whatever their method label) share ONE process and one compiled program
(``fedkd.main --seeds / --replica_config``, fedkd.tasks.replicas; logs in the first run's folder) where
the config allows it; the sweep says why when it does not and runs them one process each. A group is
split into near-equal programs when fewer units than --parallel would leave a process slot idle.

Outputs in OUT (drawn and tabulated by fedkd.report): sweep.json (the definition), results.md /
results.csv (last evaluation of every finished run, mean +- sample std (ddof=1; n/a for one seed) over
seeds per group = every override except seed; runs without DONE are left out, counted and named; a
metric that is NaN or missing in some finished run of a group is not averaged: its cell says so and the caption
names the run), runs.csv (one row per run, finished or not), curves.png (Dice vs round per
group, mean over seeds with a +-std band), curves_sites.png (the same per training site), vs_<key>.png for
each numeric key swept within a method, and, when the runs log them, vs_bytes_up.png (Dice vs cumulative
bytes sent up, one point per group) and vs_epsilon.png (Dice vs the DP epsilon spent). Bad input ends with
one line ``fedkd: error: ...`` on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from fedkd.cli import fail, line_buffered
from fedkd.errors import USER_ERRORS, first_names
from fedkd.launchenv import DistributedError, several_processes
from fedkd.workdir import as_path, read_json_object, write_atomic

SWEEP_FILE = "sweep.json"
DONE_FILE = "DONE"
CURVE_METRICS = ("dice/catheter", "dice/guidewire", "unseen/dice/catheter", "unseen/dice/guidewire")
_METRIC_RE = re.compile(r"^(dice|iou)/[^/]+$|^unseen/dice/[^/]+$|^comm/bytes_up_total$|^dp/epsilon$")


class InputError(ValueError):
  """Bad command-line input; printed as one ``fedkd: error:`` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line instead of usage + message
    fail(f"{message} (see python -m launch.sweep --help)")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog="python -m launch.sweep",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--config", help="config file with get_sweep(), optionally :ARG for get_config")
  p.add_argument("--sweep", default=None, help="argument for the config's get_sweep(arg)")
  p.add_argument(
    "--seeds",
    default=None,
    help="comma list of seeds, e.g. 0,1,2: alone, one run of the config per seed (get_sweep not needed); "
    "with --sweep, these seeds replace the sweep's",
  )
  p.add_argument("--out", required=True, help="sweep directory: one workdir per run, results")
  p.add_argument("--parallel", type=int, default=1, help="runs at the same time (default 1)")
  p.add_argument(
    "--extra",
    action="append",
    default=[],
    help="a flag for every fedkd.main run, e.g. --extra=--config.num_rounds=4 (repeatable)",
  )
  p.add_argument(
    "--aggregate_only", action="store_true", help="only rebuild results.md/csv and plots from the runs in --out"
  )
  p.add_argument(
    "--compilation_cache",
    default=None,
    help="JAX persistent compilation cache shared by the runs (default OUT/jax_cache; "
    "'' = off; an existing JAX_COMPILATION_CACHE_DIR wins). Seeds of one method "
    "then compile once.",
  )
  p.add_argument(
    "--replicas",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="run the runs that differ only in their seed, learning rates, FedProx mu or DP noise/clip (whatever "
    "their method label) as replicas of ONE compiled program (fedkd.main --seeds / --replica_config; "
    "fedkd.tasks.replicas) where the config allows it (a group split into near-equal programs to keep "
    "--parallel processes busy), the rest one process per run (the default); --no-replicas: one process per run",
  )
  p.add_argument("--metric", default="dice/catheter", help="metric for vs_<key>.png (default dice/catheter)")
  return p


# ---------------------------------------------------------------- definition


def _one_line(e: BaseException) -> str:
  from fedkd.errors import reason

  text = str(e).strip().splitlines()
  if isinstance(e, ValueError) and text:  # ConfigError / SweepError: already a sentence
    return text[0]
  return reason(e, 10**6)


def load_config_module(spec: str, need_sweep: bool = True):
  from fedkd.config import find_config_file

  path = find_config_file(spec.split(":", 1)[0])
  if path is None:
    from fedkd.cli import colon_in_path_problem

    raise InputError(
      colon_in_path_problem(spec)
      or f"config file {spec.split(':', 1)[0]!r} not found; pass e.g. --config=configs/quickstart.py"
    )
  if os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.insert(0, os.getcwd())
  mod_spec = importlib.util.spec_from_file_location(
    "fedkd_sweep_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0]), path
  )
  module = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 -- any error in user code is bad input
    raise InputError(f"cannot load {path}: {_one_line(e)}")
  for fn in ("get_config", "get_sweep") if need_sweep else ("get_config",):
    _require(module, fn)
  return module


def _require(module, fn: str) -> None:
  if not callable(getattr(module, fn, None)):
    raise InputError(
      f"{module.__file__} has no {fn}(arg) function; a sweep config defines get_sweep(arg=None) "
      "returning a list of override dicts (see configs/quickstart.py)"
    )


def parse_seeds(text: str) -> list[int]:
  """``"0,1,2"`` -> [0, 1, 2]: distinct integers >= 0, in the order given; InputError otherwise."""
  parts = [p.strip() for p in str(text).split(",") if p.strip()]
  try:
    seeds = [int(p) for p in parts]
  except ValueError:
    raise InputError(f"--seeds={text!r} must be a comma list of integers, e.g. --seeds=0,1,2") from None
  if not seeds:
    raise InputError("--seeds is empty; give a comma list of integers, e.g. --seeds=0,1,2")
  if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise InputError(f"--seeds={text!r}: seeds must be distinct integers >= 0")
  return seeds


def with_seeds(sweep: list[dict], seeds: list[int]) -> list[dict]:
  """Every distinct run of ``sweep`` without its seed, crossed with ``seeds`` (seeds vary slowest)."""
  from fedkd import sweep as S

  rest: list[dict] = []
  for o in sweep:
    o = {k: v for k, v in o.items() if k != "seed"}
    if o not in rest:
      rest.append(o)
  return S.product(S.product(seed=seeds), rest)


# absl's own flags every fedkd.main accepts without defining them
ABSL_SPECIAL_FLAGS = ("flagfile", "undefok", "help", "helpshort", "helpfull", "helpxml", "only_check_args")


def _check_main_flags(extra: list[str]) -> None:
  """Refuses an ``--extra`` flag (not ``--config.*``, checked with the configs) that fedkd.main does not define:
  every run would fail on it, after the sweep folder was made; so is a value that does not parse as the flag's
  type (``--cpu_devices=abc``). fedkd.main is imported to read its flags (and
  JAX with it) only when there is such a flag."""
  if not extra:
    return
  import difflib

  from absl import flags

  import fedkd.main  # defines its flags
  from fedkd import cli

  refused = set(cli.SHARED) - set(fedkd.main.SHARED)  # defined for other entry points
  known = {n for n in flags.FLAGS if not n.startswith("config.") and n not in refused} | set(ABSL_SPECIAL_FLAGS)
  for a in extra:
    name = a[2:].split("=", 1)[0]
    flag = flags.FLAGS[name] if name in known and name in flags.FLAGS else None
    if flag is not None and "=" in a and flag.flag_type() in ("int", "float", "bool"):  # its checks run in the run
      try:
        copy.deepcopy(flag).parse(a.split("=", 1)[1])
      except (flags.Error, ValueError) as e:
        raise InputError(f"--extra={a}: {' '.join(str(e).split())}") from None
    if name in known or (name.startswith("no") and name[2:] in known and "=" not in a):
      continue
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"did you mean --{close[0]}? " if close else ""
    own = sorted(n for n in known if (flags.FLAGS.find_module_defining_flag(n) or "").startswith("fedkd"))
    raise InputError(f"--extra={a}: fedkd.main has no flag --{name}; {hint}its flags: --{', --'.join(own)}")


def build(config_spec: str, sweep_arg: str | None, extra: list[str], seeds: list[int] | None = None) -> dict:
  """The validated sweep definition (what sweep.json holds); raises InputError/SweepError.

  ``seeds``: without ``sweep_arg``, the sweep is one run per seed (the config needs no get_sweep);
  with it, they replace the seeds of the config's sweep (:func:`with_seeds`)."""
  from fedkd import sweep as S

  seeds_only = seeds is not None and sweep_arg is None
  module = load_config_module(config_spec, need_sweep=False)  # get_sweep: checked once the task is known
  config_arg = config_spec.split(":", 1)[1] if ":" in config_spec else None
  try:
    base = module.get_config(config_arg)
  except Exception as e:  # noqa: BLE001 -- user code; report it in one line
    raise InputError(f"get_config({config_arg!r}) failed: {_one_line(e)}")
  task = base.get("task", "fedavg") if hasattr(base, "get") else "fedavg"
  if task == "fedefm":  # its own workdir layout (results_raw.jsonl, no per-run checkpoints / metrics.jsonl)
    raise InputError(
      f"--config={config_spec} is a FedEFM experiment (config.task='fedefm'), which launch.sweep does not run: "
      "it runs its seeds and methods in one process, python -m fedkd.main --config=... --workdir=... "
      "--config.experiment.seeds=0,1,2, and a KD-weight or learning-rate grid with "
      "--replica_config=fedefm.beta=0.3,0.5,0.7 (docs/fedefm.md)"
    )
  if seeds_only:
    sweep = [{}]
  else:
    _require(module, "get_sweep")
    try:
      sweep = module.get_sweep(sweep_arg)
    except Exception as e:  # noqa: BLE001
      raise InputError(f"get_sweep({sweep_arg!r}) failed: {_one_line(e)}")
  if isinstance(sweep, (list, tuple)) and all(isinstance(o, dict) for o in sweep):
    sweep = S.plain(sweep)
    if seeds is not None:
      sweep = with_seeds(sweep, seeds)
  for a in extra:
    if not a.startswith("--"):
      raise InputError(f"--extra={a!r} must be a flag of fedkd.main, e.g. --extra=--config.num_rounds=4")
    if a.split("=", 1)[0] in ("--workdir", "--config"):
      raise InputError(f"--extra={a}: the sweep sets {a.split('=', 1)[0]} itself")
    if a.split("=", 1)[0] in ("--seeds", "--replica_config", "--replica_workdirs"):
      # each run would train its replicas into sub-folders of its workdir, and the sweep find nothing there
      raise InputError(
        f"--extra={a}: the sweep gives every run its own workdir and runs replicas itself; sweep seeds with "
        "launch.sweep's own --seeds=0,1,2 and other values in get_sweep (replicas of one program are the default)"
      )
  _check_main_flags([a for a in extra if not a.startswith("--config.")])
  fixed = S.parse_config_flags(extra, base)
  configs = S.validate_sweep(sweep, base, fixed)
  names = S.run_names(sweep)
  runs = []
  for i, (n, o, c) in enumerate(zip(names, sweep, configs)):
    run = {"name": n, "overrides": dict(o), "num_rounds": int(c.num_rounds)}
    last = planned_rounds(c)
    if last == 0:  # fedkd.main would refuse the run
      raise InputError(
        f"run {i} ({n}): config.dp.target_epsilon={c.dp.target_epsilon:g} allows no round (one round spends more "
        "at this noise_multiplier, clients and delta); raise dp.target_epsilon or dp.noise_multiplier"
      )
    if last < run["num_rounds"]:  # the run stops there, finished (fedkd.main exits 0)
      run["last_round"] = last
    runs.append(run)
  return {
    "config": config_spec,
    "sweep": sweep_arg,
    "seeds": seeds,
    "extra": list(extra),
    "varying_keys": S.varying_keys(sweep),
    "runs": runs,
  }


def _run_configs(defn: dict, runs: list[dict]) -> list:
  """The full (validated) config of each of ``runs``: the sweep's config, its extra flags, the run's
  overrides."""
  from fedkd import sweep as S

  module = load_config_module(defn["config"], need_sweep=False)
  base = module.get_config(defn["config"].split(":", 1)[1] if ":" in defn["config"] else None)
  return S.validate_sweep([r["overrides"] for r in runs], base, S.parse_config_flags(defn["extra"], base))


def replica_command(defn: dict, runs: list[dict], out: str, configs: list | None = None) -> list[str]:
  """One fedkd.main process for ``runs`` (equal but for fedkd.tasks.replicas.REPLICA_KEYS) as replicas
  of one program: the keys whose values differ as --seeds / --replica_config lists (each run's value,
  also where its overrides leave the key at the config's), the other overrides as --config flags.
  ``configs``: the runs' full configs when the caller has them (else built here)."""
  from fedkd.config import value_at
  from fedkd.sweep import RESERVED, format_value
  from fedkd.tasks import replicas

  configs = _run_configs(defn, runs) if configs is None else configs
  differ = replicas.varying(configs)
  first = runs[0]["overrides"]
  flags = [f"--config.{k}={format_value(v)}" for k, v in first.items() if k not in RESERVED and k not in differ]
  for k in differ:
    values = ",".join(format_value(value_at(c, k)) for c in configs)
    flags.append(f"--seeds={values}" if k == "seed" else f"--replica_config={k}={values}")
  return [
    sys.executable,
    "-m",
    "fedkd.main",
    f"--config={defn['config']}",
    f"--workdir={out}",
    "--replica_workdirs=" + ",".join(os.path.join(out, r["name"]) for r in runs),
    *flags,
    *defn["extra"],
  ]


def replica_groups(
  defn: dict, todo: list[tuple[int, dict]], out: str, parallel: int = 1
) -> list[list[tuple[int, dict]]]:
  """``todo`` split into units: groups of runs that may run as replicas of one program (equal overrides
  but fedkd.tasks.replicas.REPLICA_KEYS: seed, learning rates, FedProx's mu, DP noise / clip, and the
  ``method`` label; why_not None; one group per checkpoint round their workdirs hold), the rest alone. Prints why such
  a group stays one process per run. Groups are split into near-equal parts while fewer units than
  ``parallel`` would leave a process slot idle."""
  return [members for members, _ in _units(defn, todo, out, parallel)]


def _units(
  defn: dict, todo: list[tuple[int, dict]], out: str, parallel: int = 1
) -> list[tuple[list[tuple[int, dict]], list | None]]:
  """:func:`replica_groups`' units, each with its runs' configs (a group of replicas) or None (one run)."""
  from fedkd.sweep import RESERVED
  from fedkd.tasks import replicas

  groups: dict[str, list[tuple[int, dict]]] = {}
  for i, run in todo:
    shape = {k: v for k, v in run["overrides"].items() if k not in replicas.REPLICA_KEYS and k not in RESERVED}
    groups.setdefault(json.dumps(shape, sort_keys=True, default=str), []).append((i, run))
  units = []
  for members in groups.values():
    if len(members) < 2:
      units.append((members, None))
      continue
    runs = [run for _, run in members]
    multi = [a for a in defn["extra"] if a.split("=", 1)[0] in ("--num_processes", "--coordinator_address")]
    comma = "," in os.path.abspath(out)  # --replica_workdirs is a comma list: a folder name with ',' splits in two
    configs = None if multi or comma else _run_configs(defn, runs)
    if multi:
      reason = f"multi-process runs ({multi[0]})"
    elif comma:
      reason = f"the sweep folder {out!r} holds ',', which separates --replica_workdirs"
    else:
      reason = replicas.why_not(configs)
    if reason is not None:
      _say(f"{', '.join(r['name'] for r in runs)}: one process per run ({reason})")
      units.extend(([m], None) for m in members)
      continue
    # a group resumes from one round: runs whose workdirs hold different rounds (a group split over
    # --parallel programs and interrupted) form one group per round
    by_round: dict = {}
    for k, r in enumerate(runs):
      by_round.setdefault(latest_checkpoint(os.path.join(out, r["name"])), []).append(k)
    if len(by_round) > 1:
      rounds = ", ".join(
        f"{len(ks)} at {'no checkpoint' if at is None else f'round {at}'}" for at, ks in by_round.items()
      )
      _say(f"{', '.join(r['name'] for r in runs)}: one program per checkpoint round ({rounds})")
    for ks in by_round.values():
      units.append(([members[k] for k in ks], [configs[k] for k in ks] if len(ks) > 1 else None))
  units.sort(key=lambda u: u[0][0][0])  # in the sweep's order
  return _fill_slots(units, parallel)


def _fill_slots(
  units: list[tuple[list[tuple[int, dict]], list | None]], parallel: int
) -> list[tuple[list[tuple[int, dict]], list | None]]:
  """``units`` with replica groups split into contiguous, near-equal parts (each part a group again, or a
  single run) until there are ``parallel`` units or every part is one run: a sweep that is
  one group of 8 runs under --parallel=2 runs as 2 programs of 4, not 1 of 8 with a slot idle."""
  pieces = [1] * len(units)
  while sum(pieces) < parallel:
    j = max(range(len(units)), key=lambda j: len(units[j][0]) / pieces[j], default=None)
    if j is None or len(units[j][0]) <= pieces[j]:  # every part is one run
      break
    pieces[j] += 1
  result = []
  for (members, configs), k in zip(units, pieces):
    if k == 1:
      result.append((members, configs))
      continue
    size, extra = divmod(len(members), k)
    start = 0
    for p in range(k):
      stop = start + size + (p < extra)
      part = members[start:stop]
      result.append((part, configs[start:stop] if len(part) > 1 else None))
      start = stop
    _say(
      f"{', '.join(r['name'] for _, r in members)}: {len(members)} replicas as {k} programs "
      f"(sizes {', '.join(str(len(u[0])) for u in result[-k:])}) to keep --parallel={parallel} processes busy"
    )
  return result


def unit_command(defn: dict, runs: list[dict], out: str, configs: list | None = None) -> list[str]:
  """The fedkd.main command of one run, or of a group of replicas (``configs``: theirs, if known)."""
  return run_command(defn, runs[0], out) if len(runs) == 1 else replica_command(defn, runs, out, configs)


def run_command(defn: dict, run: dict, out: str) -> list[str]:
  from fedkd.sweep import RESERVED, format_value

  flags = [f"--config.{k}={format_value(v)}" for k, v in run["overrides"].items() if k not in RESERVED]
  return [
    sys.executable,
    "-m",
    "fedkd.main",
    f"--config={defn['config']}",
    f"--workdir={os.path.join(out, run['name'])}",
    *flags,
    *defn["extra"],
  ]


# ---------------------------------------------------------------- run state


def latest_checkpoint(workdir: str) -> int | None:
  """The newest finished orbax step (digit-named folder; in-progress saves have other names)."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return None
  steps = [int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n))]
  return max(steps) if steps else None


def read_metrics(workdir: str) -> list[dict]:
  """The evaluation records of a run's metrics.jsonl, read as fedkd.main reads it on resume
  (:func:`fedkd.logs.json_lines`: a last line cut by a kill is skipped); InputError for any other line that is not
  JSON, or JSON but not a record of a round."""
  from fedkd.logs import BadJsonLine, json_lines

  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  fix = "repair or delete that line, or that run's folder"
  with open(path, "rb") as f:
    text = f.read().decode("utf-8", errors="replace")
  try:
    lines, _ = json_lines(text)
  except BadJsonLine as e:
    raise InputError(f"{path}:{e.number} is not JSON; {fix}") from None
  out = []
  for i, _, rec in lines:
    rnd = rec.get("round") if isinstance(rec, dict) else None
    if not isinstance(rnd, int) or isinstance(rnd, bool):
      raise InputError(f"{path}:{i} is not an evaluation record (a JSON object with an integer round); {fix}")
    out.append(rec)
  return out


def planned_rounds(config) -> int:
  """The last round a fedkd.main run of ``config`` trains: ``num_rounds``, or the last one its privacy budget
  allows (``dp.target_epsilon``: the run stops there and exits 0; fedkd.tasks.fedavg); 0 if it allows none."""
  if not (config.dp.enabled and config.dp.target_epsilon):
    return int(config.num_rounds)
  from fedkd.tasks.fedavg import _Privacy

  return _Privacy(config).max_rounds(int(config.num_rounds))


def last_round(run: dict) -> int:
  """The round at which ``run`` (a run of sweep.json) is finished: its ``last_round`` where a privacy budget
  stops it before ``num_rounds``, else ``num_rounds``."""
  return run.get("last_round", run["num_rounds"])


def is_finished(workdir: str, run: dict) -> bool:
  """Whether the workdir holds ``run`` (a run of sweep.json) trained to the end: its latest checkpoint at
  :func:`last_round` (``num_rounds``, or fewer where a privacy budget stops the run), and metrics.jsonl has
  that round."""
  last = last_round(run)
  return latest_checkpoint(workdir) == last and any(r.get("round") == last for r in read_metrics(workdir))


def is_done(workdir: str, run: dict) -> bool:
  """Whether the sweep saw ``run`` finish its ``num_rounds`` rounds (or stop at its privacy budget, its
  :func:`last_round`): its DONE file (written after a successful exit, removed when the run starts again)
  names them."""
  try:
    with open(os.path.join(workdir, DONE_FILE)) as f:
      done = json.load(f)
  except (OSError, ValueError):
    return False
  if not isinstance(done, dict) or done.get("num_rounds") != run["num_rounds"]:
    return False
  return done.get("last_round", run["num_rounds"]) == last_round(run)


# What a finished run's tabulated metrics were measured with: a resume may change them (later
# evaluations use the new values), but a finished run would be tabulated under values it was not scored with.
SCORED_WITH = ("eval.examples_per_site", "eval.max_sites", "eval.pick")


def config_difference(saved: dict, current: dict, finished: bool = False) -> list[tuple[str, Any, Any]]:
  """``[(key, saved value, current value)]`` for the dotted keys in which a run's config.json and the
  config the sweep gives it now differ, by fedkd.main's rule for resuming a run
  (fedkd.tasks.fedavg._check_resumable): keys in fedavg.RESUMABLE_CHANGES (num_rounds, eval, checkpoint,
  engine, ...) may differ, and so may a key the saved config lacks (added to the schema later) that is
  at the value that keeps its old behaviour (fedavg.resume_differences). A ``finished`` run also differs in
  :data:`SCORED_WITH` (absent in the saved config: what its run ran with, :data:`fedkd.config.ADDED_KEYS`, else
  the default). A missing value is ``None``."""
  from fedkd.config import INERT_UNLESS, base_config, flat_dict, ran_as
  from fedkd.tasks import fedavg

  a, b = flat_dict(saved), flat_dict(current)
  keys = fedavg.resume_differences(saved, current)
  if finished:
    defaults = flat_dict(base_config().to_dict())
    was = defaults | ran_as(a, b) | a  # a key the run's config lacks: what it ran with (ADDED_KEYS), else the default

    def scored_with(k):  # eval.pick picks TFDS test records: a synthetic run is scored the same either way
      return k not in INERT_UNLESS or INERT_UNLESS[k](a) or INERT_UNLESS[k](b)

    scored = [k for k in SCORED_WITH if scored_with(k)]
    keys = sorted(set(keys) | {k for k in scored if was.get(k) != b.get(k, defaults.get(k))})
  return [(k, a.get(k), b.get(k)) for k in keys]


def check_reuse(defn: dict, out: str) -> None:
  """Raises InputError, before anything runs or is written, when a workdir in ``out`` holds work of
  another experiment than the run of ``defn`` with its name: a finished run (DONE) or a checkpoint
  whose config.json differs from the config the sweep now computes for the run (beyond what fedkd.main
  lets change on resume, :func:`config_difference`), or a checkpoint beyond the run's num_rounds. A
  finished run would otherwise be skipped and tabulated under settings it did not run with; an
  unfinished one would fail when fedkd.main refuses to resume it."""
  from fedkd import checkpoint as ckpt_lib

  held = []
  for run in defn["runs"]:
    wd = os.path.join(out, run["name"])
    last = latest_checkpoint(wd)
    done = os.path.exists(os.path.join(wd, DONE_FILE))
    if last is not None or done:  # a workdir without either starts afresh (config.json rewritten)
      held.append((run, wd, last, done))
  if not held:
    return
  configs = _run_configs(defn, [run for run, *_ in held])
  for (run, wd, last, done), config in zip(held, configs):
    # launch.sweep validates every run as a config.task=fedavg run (fedkd.config.validate), so the
    # fedavg rule applies; a task with another workdir layout (FedEFM) is not checked here.
    if config.get("task", "fedavg") != "fedavg":
      continue
    where = f"--out={out}: run {run['name']}"
    fix = f"use a new --out, or delete {wd} to run it again with this config"
    if last is not None and last > run["num_rounds"]:
      raise InputError(
        f"{where} already holds round {last}, beyond config.num_rounds={run['num_rounds']} of this sweep; "
        f"raise it to {last} or more (e.g. --extra=--config.num_rounds={last}), or {fix}"
      )
    if last is not None and last > last_round(run):  # trained beyond the privacy budget it is tabulated under
      raise InputError(
        f"{where} already holds round {last}, beyond round {last_round(run)}, the last that its "
        f"config.dp.target_epsilon in this sweep allows; raise dp.target_epsilon, or {fix}"
      )
    path = os.path.join(wd, "config.json")
    if not os.path.exists(path) and not done:
      continue  # fedkd.main checks the checkpoint's own copy of its config when it resumes
    try:
      saved = read_json_object(path)
    except (OSError, ValueError) as e:
      raise InputError(
        f"{where} is {'finished' if done else 'checkpointed'} but its config.json cannot be read "
        f"({_one_line(e)}), so which config it ran with is unknown; {fix}"
      ) from None
    # a run the sweep will skip (DONE at its num_rounds) is tabulated as it was scored
    finished = is_done(wd, run)
    diff = config_difference(saved, ckpt_lib.config_json(config), finished=finished)
    if diff:
      k, was, now = diff[0]
      what = "finished" if done else f"checkpointed at round {last}"
      raise InputError(
        f"{where} is {what} with config.{k}={was!r}, but this sweep gives it {now!r} ({len(diff)} key(s) "
        f"differ: {first_names([d[0] for d in diff], 8)}); its "
        f"results belong to another experiment: {fix}"
      )


LAST_LINE_CHARS = 600  # of a failed run's last stderr line, in the sweep's report


def _last_line(path: str, offset: int) -> str:
  try:
    with open(path, errors="replace") as f:
      f.seek(offset)
      lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
  except OSError:
    return ""
  if not lines:
    return ""
  # fedkd's one-line errors name the cause and the fix; keep them whole up to a screen's worth
  return lines[-1] if len(lines[-1]) <= LAST_LINE_CHARS else lines[-1][:LAST_LINE_CHARS] + " [...]"


def _say(msg: str) -> None:
  print(f"[sweep] {msg}", flush=True)


def run_all(defn: dict, out: str, parallel: int, env: dict, replicas: bool = False) -> list[tuple[str, int, str, str]]:
  """Runs the unfinished runs, ``parallel`` processes at a time (``replicas``: runs equal but for their
  seed / learning rates / mu share one process, :func:`replica_groups`); returns [(name, exit code, last
  stderr line)]."""
  runs, total = defn["runs"], len(defn["runs"])
  todo = []
  for i, run in enumerate(runs, 1):
    wd = os.path.join(out, run["name"])
    if is_finished(wd, run):
      if not os.path.exists(os.path.join(wd, DONE_FILE)):
        _write_done(wd, run, None, 0.0)
      _say(f"{i}/{total} {run['name']}: skipped (finished: {_rounds(wd, run)})")
    else:
      todo.append((i, run))
  units = _units(defn, todo, out, parallel) if replicas else [([t], None) for t in todo]
  failures: list[tuple[str, int, str, str]] = []  # (run, exit code, last stderr line, the stderr log)
  active: dict[int, tuple] = {}  # pid -> (popen, members, command, t0, stderr offset, log files, stderr path)

  def start(members, configs):
    for _, run in members:
      wd = os.path.join(out, run["name"])
      os.makedirs(wd, exist_ok=True)
      done = os.path.join(wd, DONE_FILE)
      if os.path.exists(done):
        os.remove(done)  # stale: the run is not finished (e.g. num_rounds was raised)
    wd = os.path.join(out, members[0][1]["name"])  # a group logs into its first run's folder
    out_f = open(os.path.join(wd, "stdout.log"), "a")
    err_path = os.path.join(wd, "stderr.log")
    err_f = open(err_path, "a")
    offset = err_f.tell()
    cmd = unit_command(defn, [r for _, r in members], out, configs)
    out_f.write(f"\n$ {' '.join(cmd)}\n")
    out_f.flush()
    with _interrupts_held():  # an interrupt now stops this process too (run_all's except)
      p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env, stdin=subprocess.DEVNULL)
      active[p.pid] = (p, members, cmd, time.time(), offset, (out_f, err_f), err_path)
    for i, run in members:
      last = latest_checkpoint(os.path.join(out, run["name"]))
      how = f"resuming from round {last} of {run['num_rounds']}" if last else "new"
      if len(members) > 1:
        how += f", one of {len(members)} replicas in one program"
      _say(f"{i}/{total} {run['name']}: started ({how}); log {os.path.join(wd, 'stdout.log')}")

  def finish(pid):
    p, members, cmd, t0, offset, files, err_path = active.pop(pid)
    for f in files:
      f.close()
    dt = time.time() - t0
    for i, run in members:
      wd = os.path.join(out, run["name"])
      # a replica that finished counts, also when another of its group (one process) failed
      if (p.returncode == 0 or len(members) > 1) and is_finished(wd, run):
        _write_done(wd, run, cmd, dt)
        _say(f"{i}/{total} {run['name']}: finished in {dt:.1f}s ({_rounds(wd, run)})")
        continue
      rc = p.returncode
      last = _last_line(err_path, offset)
      if rc == 0:  # exit 0 without a final checkpoint: count as a failure, keep going
        last = f"exited 0 but the latest checkpoint is round {latest_checkpoint(wd)}, not {last_round(run)}"
        rc = 1
      failures.append((run["name"], rc, last, err_path))  # a group's log: its first run's folder
      _say(f"{i}/{total} {run['name']}: FAILED with exit code {rc} after {dt:.1f}s: {last or '(no stderr)'}")

  try:
    queue = list(units)
    while queue or active:
      while queue and len(active) < max(1, parallel):
        start(*queue.pop(0))
      time.sleep(0.2)
      for pid in [pid for pid, a in active.items() if a[0].poll() is not None]:
        finish(pid)
  except KeyboardInterrupt:
    running = [a[0] for a in active.values()]
    for p in running:
      p.terminate()  # fedkd.main saves the round it is in and exits
    try:
      for p in running:
        try:
          p.wait(timeout=30)
        except subprocess.TimeoutExpired:
          p.kill()
    except KeyboardInterrupt:  # a second Ctrl-C: stop now (the runs resume from their last checkpoint)
      for p in running:
        if p.poll() is None:
          p.kill()
          p.wait()
    stopped = sum(len(a[1]) for a in active.values())  # a group of replicas is one process of several runs
    _say(f"interrupted; {stopped} run(s) stopped. Re-run the same command to resume them.")
    raise
  return failures


def _rounds(wd: str, run: dict) -> str:
  """``round 2/2``, or ``round 12/50 (dp.target_epsilon's budget)`` for a run its privacy budget stopped."""
  at = latest_checkpoint(wd)
  return f"round {at}/{run['num_rounds']}" + (" (dp.target_epsilon's budget)" if at != run["num_rounds"] else "")


def _write_done(wd: str, run: dict, cmd: list[str] | None, seconds: float) -> None:
  done = {
    "name": run["name"],
    "num_rounds": run["num_rounds"],
    "last_round": latest_checkpoint(wd),
    "command": cmd,
    "seconds": round(seconds, 2),
    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
  write_atomic(as_path(os.path.join(wd, DONE_FILE)), json.dumps(done) + "\n")


# ---------------------------------------------------------------- aggregation


def _metric_keys(records: list[dict]) -> list[str]:
  keys: list[str] = []
  for r in records:
    keys += [k for k in r if _METRIC_RE.match(k) and k not in keys]
  order = {"dice": 0, "iou": 1, "unseen": 2, "comm": 3, "dp": 4}
  return sorted(keys, key=lambda k: (order[k.split("/")[0]], keys.index(k)))


def _group_key(overrides: dict) -> str:
  """The runs of one group share this: every override but ``seed``, numbers by value (an int and a float
  key's value written 1 in one run and 1.0 in another are one setting; fedkd.config stores both as 1.0)."""

  def value(v):
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

  return json.dumps({k: value(v) for k, v in overrides.items() if k != "seed"}, sort_keys=True, default=str)


def _setting_keys(defn: dict) -> list[str]:
  """Each run's group: its method label and name stem with its full config less the seed, so a run that writes
  a default explicitly (``quantity_skew=0.0``) is in the group of those that leave it out; by the overrides as
  written (:func:`_group_key`) where the configs cannot be built (--aggregate_only after the config file
  changed)."""
  from fedkd.sweep import METHOD

  try:
    configs = _run_configs(defn, defn["runs"])
  except Exception:  # noqa: BLE001 - the names and overrides still group the runs
    return [_group_key(r["overrides"]) for r in defn["runs"]]
  keys = []
  for run, c in zip(defn["runs"], configs):
    full = c.to_dict()
    full.pop("seed", None)
    keys.append(
      json.dumps([run["overrides"].get(METHOD), run["overrides"].get("name"), full], sort_keys=True, default=str)
    )
  return keys


def collect(defn: dict, out: str, failures: list[tuple[str, int, str]] | None = None) -> list[dict]:
  """Groups of runs (every setting except seed, :func:`_setting_keys`): ``runs``, the finished runs
  (:func:`is_done`) with metrics, each with its records and its last one; ``members``, every run of the group
  in sweep order with ``finished`` and, for the others, ``why`` they are left out of results.md/csv and the
  plots (``failures``: run_all's, to name the runs that failed in this invocation)."""
  from fedkd.sweep import group_label

  failed = {name: rc for name, rc, *_ in failures or []}
  keys = defn["varying_keys"]
  groups: dict[str, dict] = {}
  for run, gkey in zip(defn["runs"], _setting_keys(defn)):
    o = run["overrides"]
    g = groups.setdefault(gkey, {"label": group_label(o, keys), "overrides": o, "runs": [], "members": []})
    wd = os.path.join(out, run["name"])
    records = read_metrics(wd)
    last = max(records, key=lambda r: r["round"]) if records else None
    member = {"name": run["name"], "seed": o.get("seed"), "records": records, "last": last, "finished": False}
    if run["name"] in failed:
      member["why"] = "failed"
    elif not os.path.isdir(wd):
      member["why"] = "not started"
    elif not is_done(wd, run):
      member["why"] = "without DONE (failed, stopped or still running)"
    elif not records:
      member["why"] = "finished without metrics"
    else:
      member["finished"] = True
      g["runs"].append(member)
    g["members"].append(member)
  return list(groups.values())


def left_out(groups: list[dict]) -> str:
  """The runs :func:`collect` left out of the tables and plots, by reason, e.g. ``2 failed: a, b; 1 not
  started: c`` ('' if none)."""
  why: dict[str, list[str]] = {}
  for g in groups:
    for m in g["members"]:
      if not m["finished"]:
        why.setdefault(m["why"], []).append(m["name"])

  return "; ".join(f"{len(v)} {reason}: {first_names(v, 5)}" for reason, v in why.items())


def _unaveraged(group: dict, metrics: list[str]) -> list[tuple[dict, list[str]]]:
  """(run, its metrics) for the finished runs of ``group`` whose last evaluation lacks one of ``metrics`` that
  other runs of the group hold, or holds it as NaN or not a number: the group's mean is not taken (its table cell
  says so) and it is not drawn."""
  from fedkd.report import is_number

  keys = [k for k in metrics if any(k in r["last"] for r in group["runs"])]
  out = []
  for run in group["runs"]:
    bad = [k for k in keys if not is_number(run["last"].get(k)) or math.isnan(run["last"][k])]
    if bad:
      out.append((run, bad))
  return out


def not_results(groups: list[dict], metrics: list[str]) -> str:
  """The finished runs whose last evaluation lacks one of ``metrics`` that other runs of their group hold, or
  holds it as NaN or not a number, with those metrics, e.g. ``a__seed-1 (dice/catheter)`` ('' if none)."""
  named = [f"{run['name']} ({', '.join(bad)})" for g in groups for run, bad in _unaveraged(g, metrics)]
  return first_names(named, 5)


def _cell(last: dict | None, metric: str) -> str:
  """runs.csv's cell of ``metric`` in the record ``last``: the number; ``nan`` where it is missing or not a
  number; empty for a run without records."""
  from fedkd.report import is_number

  if not last:
    return ""
  return repr(last[metric]) if is_number(last.get(metric)) else "nan"


def write_tables(defn: dict, out: str, groups: list[dict]) -> tuple[str, str, str]:
  """results.md / results.csv (one row per group, mean ± std over the seeds of its finished runs:
  ``fedkd.report``'s convention; ``unfinished``: how many of its runs are left out) and runs.csv (one row
  per run, ``finished`` true/false)."""
  from fedkd import report
  from fedkd.sweep import format_value

  keys = defn["varying_keys"]
  metrics = _metric_keys([r["last"] for g in groups for r in g["runs"]])
  # runs.csv: also the last records of the runs left out (marked finished=false)
  run_metrics = _metric_keys([r["last"] for g in groups for r in g["members"] if r["last"]])
  has_method = any("method" in r["overrides"] for r in defn["runs"])
  columns = (["method"] if has_method else []) + keys + ["seeds", "unfinished", "round"]
  rows = []
  for g in groups:
    o = g["overrides"]
    fixed = ([o.get("method", "")] if has_method else []) + [o.get(k, "") for k in keys]
    rounds = sorted({r["last"]["round"] for r in g["runs"]})
    # a metric some of the group's runs lack or hold as NaN is marked in its cell (fedkd.report), not averaged
    values = {
      m: [r["last"].get(m) for r in g["runs"]] if any(m in r["last"] for r in g["runs"]) else [] for m in metrics
    }
    unfinished = len(g["members"]) - len(g["runs"])
    rows.append((fixed + [len(g["runs"]), unfinished, "/".join(map(str, rounds))], values))
  n_runs = sum(len(g["runs"]) for g in groups)
  what = f" (sweep {defn['sweep']})" if defn.get("sweep") else ""
  what += f" (seeds {','.join(map(str, defn['seeds']))})" if defn.get("seeds") else ""
  missing = left_out(groups)
  bad = not_results(groups, metrics)
  if bad:
    _say(f"not averaged (marked in the table): NaN or missing in the last evaluation of {bad}")
  md_path, csv_path = os.path.join(out, "results.md"), os.path.join(out, "results.csv")
  report.mean_std_tables(
    md_path,
    csv_path,
    columns,
    rows,
    metrics,
    title=f"# Sweep results: {defn['config']}{what}",
    caption=f"{n_runs} of {len(defn['runs'])} runs finished and are in the table (`seeds`); the last evaluation "
    "of each (`round`). "
    + (f"Left out, as they did not finish (`unfinished`): {missing}. " if missing else "")
    + (f"Not averaged: NaN or missing in the last evaluation of {bad}. " if bad else "")
    + "`dice/*`, `iou/*`: mean over training sites; `unseen/*`: the held-out site.",
  )
  runs_path = os.path.join(out, "runs.csv")
  report.write_csv(
    runs_path,
    ["run", "group", "seed", "finished", "round"] + run_metrics,
    [
      [r["name"], g["label"], r["seed"], format_value(r["finished"]), r["last"]["round"] if r["last"] else ""]
      + [_cell(r["last"], m) for m in run_metrics]
      for g in groups
      for r in g["members"]
    ],
  )
  return md_path, csv_path, runs_path


def write_plots(defn: dict, out: str, groups: list[dict], metric: str) -> list[str]:
  """curves.png (scores vs round per group) and vs_<key>.png for every numeric key swept within a
  method (``metric`` at the last evaluation vs the key), drawn by ``fedkd.report``."""
  from fedkd import report
  from fedkd.sweep import group_label

  written = []
  finished = [g for g in groups if g["runs"]]
  metrics = _metric_keys([r["last"] for g in finished for r in g["runs"]])
  groups = [g for g in finished if not _unaveraged(g, metrics)]  # the others are marked in the table, not drawn
  if not groups:
    report.remove_stale(out, is_plot, written)
    return written
  path = os.path.join(out, "curves.png")
  if report.curves_plot([(g["label"], [r["records"] for r in g["runs"]]) for g in groups], CURVE_METRICS, path):
    written.append(path)
  for key in defn["varying_keys"]:
    values = [g["overrides"].get(key) for g in finished]  # swept within a method, whichever groups are drawn
    if not all(report.is_number(v) for v in values) or len(set(values)) < 2:
      continue
    others = [k for k in defn["varying_keys"] if k != key]
    lines: dict[str, list] = {}
    for g in groups:
      vals = [r["last"][metric] for r in g["runs"] if metric in r["last"]]
      if vals:
        lines.setdefault(group_label(g["overrides"], others), []).append((g["overrides"][key], vals))
    if not lines:
      continue
    path = os.path.join(out, f"vs_{re.sub(r'[^A-Za-z0-9._-]', '_', key)}.png")
    report.errorbar_plot(lines, key, f"{metric} (last eval)", path)
    written.append(path)
  written += _site_and_cost_plots(out, groups, metric, defn["varying_keys"])
  report.remove_stale(out, is_plot, written)  # e.g. a vs_<key>.png of a key no longer swept
  return written


def _results(records: list[dict], key: str) -> list[float]:
  """``key`` of every one of ``records`` where each holds it as a number other than NaN, else []."""
  from fedkd import report

  vals = [r.get(key) for r in records]
  return vals if vals and not report.not_results(vals) else []


def is_plot(name: str) -> bool:
  """A picture :func:`write_plots` draws in a sweep directory (the runs' own files are in their folders)."""
  return name in ("curves.png", "curves_sites.png") or (name.startswith("vs_") and name.endswith(".png"))


# x axes logged by the runs themselves (fedkd.tasks.fedavg): (record key, file, axis label, one line for all)
COST_AXES = (
  ("comm/bytes_up_total", "vs_bytes_up.png", "bytes sent up by the clients, cumulative (log)", False),
  ("dp/epsilon", "vs_epsilon.png", "privacy spent: epsilon at dp.delta (log)", True),
)


def _dp_line(group: dict, keys: Sequence[str]) -> str:
  """The line of the privacy plot that ``group`` is a point of: its setting but the method label (the privacy
  sweep labels each noise level) and the ``dp.*`` keys, so that groups of other methods or settings are lines of
  their own; DP-FedAvg where nothing else is swept."""
  from fedkd.sweep import METHOD, group_label

  rest = {k: v for k, v in group["overrides"].items() if k != METHOD and not k.startswith("dp.")}
  label = group_label(rest, keys)
  return "DP-FedAvg" if label == "base" else label


def _site_and_cost_plots(out: str, groups: list[dict], metric: str, keys: Sequence[str]) -> list[str]:
  """curves_sites.png (``metric`` per site vs round, one panel per site) and, where the runs log them and
  they differ between groups, ``metric`` at the last evaluation vs the cumulative bytes sent up (one point
  per group) and vs the privacy spent (one line per setting apart from its DP keys, :func:`_dp_line`; runs with
  infinite epsilon, noise 0, are a dashed level)."""
  from fedkd import report

  written = []
  sites = []
  for g in groups:
    for r in g["runs"]:
      sites += [k for k in r["last"] if k.startswith("site/") and k.endswith("/" + metric) and k not in sites]
  path = os.path.join(out, "curves_sites.png")
  if sites and report.curves_plot([(g["label"], [r["records"] for r in g["runs"]]) for g in groups], sites, path):
    written.append(path)
  for xkey, name, xlabel, one_line in COST_AXES:
    lines: dict[str, list] = {}
    references: dict[str, list] = {}  # groups at an infinite x (DP without noise): a dashed level
    for g in groups:
      lasts = [r["last"] for r in g["runs"]]
      runs = lasts if _results(lasts, metric) and _results(lasts, xkey) else []  # NaN: marked in the table
      xs = [float(r[xkey]) for r in runs]
      if runs and all(math.isinf(x) for x in xs):
        references[f"{g['label']}: {xkey} inf"] = [r[metric] for r in runs]
      if not runs or not all(math.isfinite(x) and x > 0 for x in xs):
        continue
      lines.setdefault(_dp_line(g, keys) if one_line else g["label"], []).append(
        (sum(xs) / len(xs), [r[metric] for r in runs])
      )
    if len({x for pts in lines.values() for x, _ in pts}) < 2:
      continue
    path = os.path.join(out, name)
    report.errorbar_plot(lines, xlabel, f"{metric} (last eval)", path, logx=True, references=references)
    written.append(path)
  return written


def aggregate(
  defn: dict, out: str, metric: str = "dice/catheter", failures: list[tuple[str, int, str]] | None = None
) -> list[str]:
  """The tables and plots of the finished runs in ``out`` (:func:`collect`); says which runs are left out."""
  groups = collect(defn, out, failures)
  missing = left_out(groups)
  if missing:
    n = sum(len(g["members"]) - len(g["runs"]) for g in groups)
    _say(f"{n} of {len(defn['runs'])} run(s) left out of the tables and plots as they did not finish: {missing}")
  paths = list(write_tables(defn, out, groups))
  paths += write_plots(defn, out, groups, metric)
  return paths


# ---------------------------------------------------------------- main


def _read_definition(out: str) -> dict:
  """The sweep.json in the directory ``out`` (for --aggregate_only without --config); InputError if there
  is none."""
  path = os.path.join(out, SWEEP_FILE)
  if not os.path.exists(path):
    raise InputError(f"{path} not found; pass --config (and --sweep) or point --out at a sweep directory")
  try:
    defn = read_json_object(path)
    _check_definition(defn)
  except (OSError, ValueError) as e:
    raise InputError(
      f"{path} cannot be read ({_one_line(e)}); pass --config (and --sweep) to aggregate that sweep"
    ) from None
  return defn


def _check_definition(defn: dict) -> None:
  """ValueError naming what is wrong when ``defn`` is not what :func:`build` writes to sweep.json."""
  runs = defn.get("runs")
  if not isinstance(runs, list) or not runs:
    raise ValueError("not a sweep definition: no list of runs")
  if not isinstance(defn.get("config"), str):
    raise ValueError("not a sweep definition: no config file")
  if not isinstance(defn.get("varying_keys"), list) or not all(isinstance(k, str) for k in defn["varying_keys"]):
    raise ValueError("not a sweep definition: no list of varying_keys")
  if not isinstance(defn.get("extra", []), list) or not all(isinstance(a, str) for a in defn.get("extra", [])):
    raise ValueError("not a sweep definition: extra is not a list of flags")
  for i, r in enumerate(runs):
    ok = isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("overrides"), dict)
    if not ok or not re.fullmatch(r"[A-Za-z0-9._=+-]+", r["name"]) or r["name"] in (".", ".."):
      raise ValueError(f"run {i} is not a run of a sweep (a name and overrides)")
    if not isinstance(r.get("num_rounds"), int) or isinstance(r["num_rounds"], bool):
      raise ValueError(f"run {i} ({r['name']}) has no num_rounds")
    if "last_round" in r and (not isinstance(r["last_round"], int) or isinstance(r["last_round"], bool)):
      raise ValueError(f"run {i} ({r['name']}) has a last_round that is not a round")
  defn.setdefault("extra", [])


def _check_holds_runs(defn: dict, out: str) -> None:
  """--aggregate_only: InputError unless the directory ``out`` holds the folder of at least one run."""
  if not any(os.path.isdir(os.path.join(out, r["name"])) for r in defn["runs"]):
    raise InputError(
      f"--out={out} holds no runs of this sweep (no folder {defn['runs'][0]['name']} or any other of its "
      f"{len(defn['runs'])}); point --out at the directory the sweep ran in, or drop --aggregate_only to run it"
    )


def metric_choices(num_classes: int | None = None) -> list[str]:
  """What ``--metric`` may name: the per-class scores a run of a ``num_classes`` model logs
  (fedkd.evaluate.summarize); of the largest model when None."""
  from fedkd.data.labels import CLASS_NAMES
  from fedkd.evaluate import foreground_classes

  names = [name for _, name in foreground_classes(len(CLASS_NAMES) if num_classes is None else num_classes)]
  return [f"{where}{m}/{c}" for where in ("", "unseen/") for m in ("dice", "iou") for c in names]


def _check_metric_logged(defn: dict, metric: str) -> None:
  """InputError when no run of the sweep logs ``metric`` (e.g. dice/vessel of 3-class models): its plots
  would be silently missing."""
  try:
    configs = _run_configs(defn, defn["runs"])
  except Exception:  # noqa: BLE001 - --aggregate_only of a sweep whose config file changed: names checked above
    return
  logged = {m for c in configs for m in metric_choices(c.model.num_classes)}
  if metric not in logged:
    raise InputError(
      f"--metric={metric!r} is not logged by this sweep's runs (their models' classes); use one of "
      f"{', '.join(m for m in metric_choices() if m in logged)}"
    )


# What a fedkd.main workdir holds at its top (a sweep directory holds run folders, sweep.json and tables)
RUN_WORKDIR_FILES = ("config.json", "results_raw.jsonl", "metrics.jsonl", "checkpoints")


def _check_not_a_run_workdir(out: str) -> None:
  """InputError when the directory ``out`` is the workdir of a fedkd.main run (e.g. a FedEFM experiment,
  whose results.md / results.csv the sweep's tables would replace)."""
  held = [n for n in RUN_WORKDIR_FILES if os.path.exists(os.path.join(out, n))]
  if held:
    raise InputError(
      f"--out={out} is the workdir of a fedkd.main run ({held[0]} is there), not a sweep directory: the sweep's "
      "tables would replace its files; give the sweep a directory of its own"
    )


# What the sweep writes at the top of --out besides the run folders (plots: is_plot)
SWEEP_OUTPUTS = ("results.md", "results.csv", "runs.csv")


def _check_not_foreign(out: str) -> None:
  """InputError when the directory ``out`` is not a sweep directory (no sweep.json) but holds a file the
  sweep's tables or plots would replace or remove (e.g. a folder of figures and tables of one's own)."""
  if os.path.exists(os.path.join(out, SWEEP_FILE)):
    return
  held = sorted(
    n for n in os.listdir(out) if (n in SWEEP_OUTPUTS or is_plot(n)) and os.path.isfile(os.path.join(out, n))
  )
  if held:
    raise InputError(
      f"--out={out} is not a sweep directory (no {SWEEP_FILE}) but holds {held[0]}, which the sweep's tables and "
      "plots would replace or remove; give the sweep a directory of its own"
    )


# While a run's process starts and until the sweep holds its handle, Ctrl-C / SIGTERM (main's handlers) wait:
# raised in between, the sweep would stop without stopping that process, which would train on, orphaned.
_HOLD = {"on": False, "pending": False}


def _interrupt(signum, frame):  # SIGTERM stops the runs like Ctrl-C; they resume next time
  if _HOLD["on"]:
    _HOLD["pending"] = True
    return
  raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_held():
  """Ctrl-C / SIGTERM that arrive inside the block (with main's handlers) are raised at its end."""
  _HOLD.update(on=True, pending=False)
  try:
    yield
  finally:
    _HOLD["on"] = False
  if _HOLD["pending"]:
    _HOLD["pending"] = False
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
  line_buffered()
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  from fedkd.sweep import SweepError

  out = os.path.expanduser(args.out) if args.out else args.out
  if args.parallel < 1:
    fail(f"--parallel={args.parallel} must be >= 1")
  if not out or not out.strip():  # e.g. --out=$OUT with OUT unset
    fail(f"--out={args.out!r} is empty; pass the sweep's directory, e.g. --out=runs/my_sweep")
  try:
    several = None if args.aggregate_only else several_processes()
  except DistributedError as e:
    fail(str(e))
  if several:  # every process would run the whole sweep into --out, and each run would join them all
    fail(
      f"{several}, so this is one process of several, but launch.sweep runs each run as a process of its own on "
      "one host: start the sweep once, on one host (a single-host TPU VM; one SLURM task: sbatch --ntasks=1), or "
      "unset the variable"
    )
  try:
    if args.metric not in metric_choices():  # else its plots were silently not drawn, and old ones removed
      raise InputError(
        f"--metric={args.metric!r} is not a score the runs log; use one of {', '.join(metric_choices())}"
      )
    if os.path.exists(out) and not os.path.isdir(out):
      raise InputError(f"--out={out} is a file; pass a directory for the sweep")
    if args.aggregate_only and not os.path.isdir(out):
      raise InputError(
        f"--out={out} does not exist; point --out at the directory of a sweep that ran, or drop "
        "--aggregate_only to run the sweep there"
      )
    if args.config:
      seeds = None if args.seeds is None else parse_seeds(args.seeds)
      defn = build(args.config, args.sweep, args.extra, seeds)
    elif args.aggregate_only:
      defn = _read_definition(out)
    else:
      raise InputError("--config is required, e.g. --config=configs/quickstart.py")
    _check_metric_logged(defn, args.metric)
    if os.path.isdir(out):
      _check_not_a_run_workdir(out)
      _check_not_foreign(out)
    if args.aggregate_only:
      _check_holds_runs(defn, out)
    if args.config and os.path.isdir(out):
      check_reuse(defn, out)
  except (InputError, SweepError) as e:
    fail(str(e))

  failures = []
  if not args.aggregate_only:
    try:
      os.makedirs(out, exist_ok=True)
    except OSError as e:  # e.g. no permission, or a file on the way
      fail(f"--out={out} cannot be created ({e.strerror or e}); pass a directory you can write")
    path = os.path.join(out, SWEEP_FILE)
    if os.path.exists(path):
      try:
        old = read_json_object(path)
      except (OSError, ValueError):  # unreadable or damaged: replaced below, with the note
        old = None
      if old != defn:
        _say(f"note: {path} described another sweep; replacing it (runs with the same name are reused)")
    try:
      write_atomic(as_path(path), json.dumps(defn, indent=2) + "\n")
    except OSError as e:  # e.g. a folder named sweep.json, or a full disk
      fail(f"{path} cannot be written ({e.strerror or e}); move what is there away or free space, then run again")
    env = dict(os.environ)
    cache = os.path.join(out, "jax_cache") if args.compilation_cache is None else args.compilation_cache
    if cache and "JAX_COMPILATION_CACHE_DIR" not in env:
      # Runs of a sweep compile the same programs (seeds share all shapes): cache every one of them,
      # also the many sub-second ones that JAX would not cache by default.
      env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(cache)
      env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    _say(f"{len(defn['runs'])} run(s) in {out}, {args.parallel} at a time")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _interrupt)
    if handlers[signal.SIGINT] is signal.default_int_handler:  # (kept ignored where it is, e.g. nohup)
      signal.signal(signal.SIGINT, _interrupt)
    try:
      failures = run_all(defn, out, args.parallel, env, replicas=args.replicas)
    except KeyboardInterrupt:
      return 130
    except InputError as e:  # a run folder's metrics.jsonl that is not one, found before any run starts
      fail(str(e))
    finally:
      for sig, handler in handlers.items():
        if handler is not None:  # None: not set from Python
          signal.signal(sig, handler)

  try:
    paths = aggregate(defn, out, args.metric, failures)
  except (InputError, *USER_ERRORS) as e:  # e.g. a run's metrics.jsonl that is not one, a folder where a table goes
    fail(str(e))
  for p in paths:
    _say(f"wrote {p}")
  if failures:
    _say(f"{len(failures)} of {len(defn['runs'])} run(s) failed:")
    for name, rc, last, *log in failures:
      _say(
        f"  {name}: exit code {rc}: {last or '(no stderr)'} (log {log[0] if log else os.path.join(out, name, 'stderr.log')})"
      )
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
