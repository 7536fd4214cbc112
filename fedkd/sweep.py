"""Sweeps: lists of config overrides, built with small helpers and checked before any run starts.

A sweep is a plain ``list`` of ``dict``; each dict is one run's overrides, keyed by dotted config keys
(``"seed"``, ``"server_optimizer.momentum"``). Two keys are reserved labels, not config keys:

* ``"method"`` -- the name of the method a run belongs to (``"fedavg"``, ``"fedavgm"``). Result tables
  and plots group runs by everything except ``seed``; the method label names the group, and config keys
  that only change together with the method (e.g. the server momentum of "fedavgm") are not repeated
  in run names or table columns.
* ``"name"`` -- an optional explicit run name stem; the seed is still appended.

Build sweeps with :func:`product` (cartesian), :func:`zipped` (element-wise), :func:`concat` or ``+``::

  methods = [{"method": "fedavg", "server_optimizer.momentum": 0.0},
             {"method": "fedavgm", "server_optimizer.momentum": 0.9}]
  product(seed=[0, 1])               # [{'seed': 0}, {'seed': 1}]
  product(methods, seed=[0, 1])      # 4 runs: every method with every seed
  zipped(**{"client_optimizer.learning_rate": [1e-3, 3e-3], "local_steps": [4, 2]}) + methods

Config files define ``get_sweep(arg=None)`` next to ``get_config`` (see ``configs/quickstart.py``);
``python -m launch.sweep`` runs them.
"""

from __future__ import annotations

from fedkd.errors import UserError

import copy
import difflib
import hashlib
import itertools
import json
import re
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

import ml_collections

from fedkd.config import ConfigError, validate

METHOD = "method"
NAME = "name"
RESERVED = (METHOD, NAME)
# Used as num_devices for validation: device counts are only known where the run happens.
_ANY_DEVICES = 1 << 20

# Settings for a smoke test that takes seconds per run on CPU (mostly compilation): 2 rounds of a
# 4-channel one-level UNet on 32px frames, 2 clients, every round evaluated and checkpointed.
TINY = {
  "num_rounds": 2,
  "image_size": 32,
  "model.width": 4,
  "model.depth": 1,
  "model.groups": 2,
  "num_clients": 2,
  "clients_per_round": 2,
  "local_steps": 1,
  "batch_size": 2,
  "eval.examples_per_site": 2,
  "eval.every": 1,
  "checkpoint.every": 1,
}


class SweepError(UserError, ValueError):
  """A sweep that cannot run; the message names the run and key and says how to fix it."""


def _as_sweep(x: Any, what: str) -> list[dict]:
  if isinstance(x, Mapping):
    return [dict(x)]
  if not isinstance(x, (list, tuple)) or not all(isinstance(o, Mapping) for o in x):
    raise SweepError(f"{what} must be a list of override dicts, got {type(x).__name__}")
  return [dict(o) for o in x]


def _merge(parts: Iterable[Mapping]) -> dict:
  out: dict = {}
  for p in parts:
    for k, v in p.items():
      if k in out and out[k] != v:
        raise SweepError(
          f"key {k!r} is set twice with different values ({out[k]!r} and {v!r}) when "
          "combining sweeps; sweep each key in one place only"
        )
      out[k] = v
  return out


def product(*sweeps: Sequence[Mapping], **axes: Sequence[Any]) -> list[dict]:
  """Cartesian product: every combination, the first argument varying slowest (like itertools.product).

  Positional arguments are sweeps (lists of override dicts, e.g. a list of methods); keyword
  arguments are axes ``key=[values]``. Dotted keys go through ``**{"model.width": [8, 16]}``.
  """
  factors = [_as_sweep(s, f"product() argument {i}") for i, s in enumerate(sweeps)]
  for key, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
      raise SweepError(f"product({key}=...) needs a list of values, got {values!r}")
    factors.append([{key: v} for v in values])
  return [_merge(combo) for combo in itertools.product(*factors)]


def zipped(*sweeps: Sequence[Mapping], **axes: Sequence[Any]) -> list[dict]:
  """Element-wise: the i-th run takes the i-th entry of every argument; all must have equal length."""
  factors = [_as_sweep(s, f"zipped() argument {i}") for i, s in enumerate(sweeps)]
  for key, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
      raise SweepError(f"zipped({key}=...) needs a list of values, got {values!r}")
    factors.append([{key: v} for v in values])
  lengths = {len(f) for f in factors}
  if len(lengths) > 1:
    names = [f"#{i}" for i in range(len(sweeps))] + list(axes)
    raise SweepError("zipped() needs equal lengths, got " + ", ".join(f"{n}: {len(f)}" for n, f in zip(names, factors)))
  return [_merge(combo) for combo in zip(*factors)]


def concat(*sweeps: Sequence[Mapping]) -> list[dict]:
  """The runs of every sweep, in order (the same as ``a + b`` on lists)."""
  return [o for i, s in enumerate(sweeps) for o in _as_sweep(s, f"concat() argument {i}")]


# ---------------------------------------------------------------- names


def plain(sweep: Sequence[Mapping[str, Any]]) -> list[dict]:
  """A copy with numpy scalars turned into Python values (for command lines and JSON)."""

  def one(v):
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) and getattr(v, "ndim", 1) == 0 else v

  return [{k: one(v) for k, v in o.items()} for o in sweep]


def format_value(v: Any) -> str:
  """A value as it goes on the command line (``--config.k=<this>``) and into run names."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, float):
    return repr(v)
  return str(v)


def _canon(v: Any) -> str:
  return json.dumps(v, sort_keys=True, default=str)


def _safe(s: str) -> str:
  s = re.sub(r"[^A-Za-z0-9._=+-]+", "_", s).strip("_")
  if s.startswith((".", "-")):
    s = "r" + s
  return s


def run_name(overrides: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
  """A stable, filesystem-safe run name: ``<method>__<key>-<value>...__seed-<seed>``.

  ``keys`` limits the config keys shown (default: all of them); ``seed`` is always last. Names
  longer than 100 characters end with a hash of the full overrides instead. Pure function of the
  arguments (no Python ``hash()``), so names are equal across processes and machines.
  """
  shown = [k for k in overrides if k not in RESERVED] if keys is None else list(keys)
  shown = sorted(k for k in set(shown) if k in overrides and k not in RESERVED and k != "seed")
  parts = []
  if overrides.get(NAME):
    parts.append(_safe(str(overrides[NAME])))
  elif overrides.get(METHOD):
    parts.append(_safe(str(overrides[METHOD])))
  parts += [_safe(f"{k}-{format_value(overrides[k])}") for k in shown]
  if "seed" in overrides:
    parts.append(_safe(f"seed-{format_value(overrides['seed'])}"))
  name = "__".join(p for p in parts if p) or "base"
  if len(name) > 100:
    digest = hashlib.sha1(_canon(dict(overrides)).encode()).hexdigest()[:10]
    name = f"{name[:88].rstrip('_')}__{digest}"
  return name


def varying_keys(sweep: Sequence[Mapping[str, Any]]) -> list[str]:
  """Config keys (not ``seed``) that take more than one value among runs with the same method label.

  Keys that only change together with the method (e.g. server momentum for "fedavgm") are
  described by the label and left out; with no labels, every key that varies across the sweep.
  """
  keys: list[str] = []
  for o in sweep:
    keys += [k for k in o if k not in RESERVED and k != "seed" and k not in keys]
  out = []
  for k in keys:
    seen: dict[Any, set] = {}
    for o in sweep:
      seen.setdefault(o.get(METHOD), set()).add(_canon(o.get(k, "<unset>")))
    if any(len(v) > 1 for v in seen.values()):
      out.append(k)
  return out


def run_names(sweep: Sequence[Mapping[str, Any]]) -> list[str]:
  """Short unique names for the runs of a sweep: the method label, :func:`varying_keys` and seed.

  Names depend only on the sweep definition. If short names collide (e.g. after making them
  filesystem-safe), full names with every key are used.
  """
  keys = varying_keys(sweep)
  names = [run_name(o, keys) for o in sweep]
  if len(set(names)) < len(names):
    names = [run_name(o) for o in sweep]
  if len(set(names)) < len(names):
    names = [f"{run_name(o)}__{hashlib.sha1(_canon(dict(o)).encode()).hexdigest()[:10]}" for o in sweep]
  return names


def group_label(overrides: Mapping[str, Any], keys: Sequence[str]) -> str:
  """The table row / plot legend label of a run's group: method and the varying non-seed keys."""
  parts = [str(overrides[METHOD])] if overrides.get(METHOD) else []
  parts += [f"{k}={format_value(overrides[k])}" for k in keys if k in overrides and k != "seed"]
  return " ".join(parts) or "base"


# ---------------------------------------------------------------- validation


def _flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += _flat_keys(v, f"{prefix}{k}.")
    else:
      out.append(f"{prefix}{k}")
  return out


def check_key(key: Any, config: ml_collections.ConfigDict, where: str = "sweep") -> None:
  """Raises SweepError for a key that is not a config value, with a did-you-mean suggestion."""
  if not isinstance(key, str) or not key:
    raise SweepError(f"{where}: override keys must be non-empty strings, got {key!r}")
  flat = _flat_keys(config)
  if key in flat:
    return
  node, done = config, []
  for part in key.split("."):
    if isinstance(node, ml_collections.ConfigDict) and part in node:
      node, done = node[part], done + [part]
    else:
      break
  if isinstance(node, ml_collections.ConfigDict) and done == key.split("."):
    raise SweepError(
      f"{where}: config.{key} is a group of keys, not a value; sweep one of "
      f"{', '.join(f'{key}.{k}' for k in sorted(node.keys()))}"
    )
  close = difflib.get_close_matches(key, flat + list(RESERVED), n=1, cutoff=0.6)
  if not close:  # match the last part alone, e.g. 'momentun' -> 'server_optimizer.momentum'
    tails = {k.rsplit(".", 1)[-1]: k for k in flat}
    near = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.6)
    close = [tails[near[0]]] if near else []
  hint = f"did you mean {close[0]!r}?" if close else "config keys are listed in fedkd/config.py"
  raise SweepError(f"{where}: unknown config key {key!r}; {hint} (reserved labels: {', '.join(RESERVED)})")


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str = "sweep"
) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the overrides set (type-checked like ``--config.KEY=VALUE``)."""
  c = copy.deepcopy(config)
  c.unlock()
  for key, value in overrides.items():
    if key in RESERVED:
      if not isinstance(value, str) or not value:
        raise SweepError(f"{where}: the {key!r} label must be a non-empty string, got {value!r}")
      continue
    check_key(key, config, where)
    if value is None or isinstance(value, (dict, list, tuple, set, Mapping)):
      raise SweepError(f"{where}: {key}={value!r} is not a single value; use a number, string or bool")
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(old, bool) != isinstance(value, bool) and old is not None:
      raise SweepError(
        f"{where}: {key}={value!r} has type {type(value).__name__} but config.{key} is {type(old).__name__} ({old!r})"
      )
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise SweepError(
        f"{where}: {key}={value!r} does not fit config.{key}={old!r} ({type(old).__name__}): {str(e).splitlines()[0]}"
      ) from None
  return c


def parse_value(text: str, like: Any) -> Any:
  """A command-line string as the type of the config value it overrides."""
  if isinstance(like, bool):
    low = text.strip().lower()
    if low in ("true", "t", "1", "yes"):
      return True
    if low in ("false", "f", "0", "no"):
      return False
    raise ValueError(f"{text!r} is not a bool")
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  return text


def parse_config_flags(args: Sequence[str], config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``['--config.num_rounds=4', '--cpu_devices=2']`` -> ``{'num_rounds': 4}`` (other flags ignored)."""
  out = {}
  for a in args:
    if not a.startswith("--config."):
      continue
    if "=" not in a:
      raise SweepError(f"{a}: write config overrides as --config.KEY=VALUE")
    key, text = a[len("--config.") :].split("=", 1)
    check_key(key, config, where=a)
    like = config
    for p in key.split("."):
      like = like[p]
    try:
      out[key] = parse_value(text, like)
    except ValueError as e:
      raise SweepError(f"{a}: {e}; config.{key} is {type(like).__name__}") from None
  return out


def validate_sweep(
  sweep: Any, base_config: ml_collections.ConfigDict, extra: Mapping[str, Any] | None = None
) -> list[ml_collections.ConfigDict]:
  """Checks every run of ``sweep`` against ``base_config``; returns each run's full config.

  Raises :class:`SweepError` (one line: run, key, fix) for an empty sweep, an unknown key (with a
  did-you-mean), a wrongly typed value, a config that :func:`fedkd.config.validate` refuses,
  duplicate runs (also overrides that give the same config and method, e.g. ``{}`` and ``{"seed": 0}``), or a key set both by the sweep and by ``extra`` (fixed overrides for all runs).
  """
  if not isinstance(sweep, (list, tuple)):
    raise SweepError(f"get_sweep() must return a list of override dicts, got {type(sweep).__name__}")
  if not sweep:
    raise SweepError("the sweep is empty; get_sweep() must return at least one override dict")
  extra = dict(extra or {})
  seen: dict[str, int] = {}
  same: dict[str, int] = {}  # method label + full config -> first run: overrides that differ only in form
  configs = []
  named = all(isinstance(o, Mapping) and all(isinstance(k, str) for k in o) for o in sweep)
  names = run_names(sweep) if named else None  # the workdir names launch.sweep gives the runs
  for i, o in enumerate(sweep):
    if not isinstance(o, Mapping):
      raise SweepError(f"run {i} of the sweep is {o!r}, not a dict of overrides")
    where = f"run {i} ({names[i] if names else o!r})"
    both = sorted(set(o) & set(extra))
    if both:
      raise SweepError(
        f"{where}: config.{both[0]} is swept and also set by --extra; drop the --extra flag (or take the key "
        "out of get_sweep)"
      )
    c = apply_overrides(base_config, {**o, **extra}, where)
    try:
      validate(c, _ANY_DEVICES)
    except ConfigError as e:
      raise SweepError(f"{where}: {e}") from None
    canon = _canon(dict(o))
    if canon in seen:
      raise SweepError(f"{where} repeats run {seen[canon]}; every run of a sweep must differ")
    seen[canon] = i
    # {} and {"seed": 0} (the default), or 1 and 1.0 for a float key, are the same run: it would train twice
    # and count twice as seeds of one group (or split one setting into two table rows)
    full = _canon([o.get(METHOD), c.to_dict()])
    if full in same:
      j = same[full]
      raise SweepError(
        f"{where} repeats run {j}{f' ({names[j]})' if names else ''}: its overrides {dict(o)!r} give the same "
        f"config as {dict(sweep[j])!r}; every run of a sweep must differ, drop one of them"
      )
    same[full] = i
    configs.append(c)
  return configs
