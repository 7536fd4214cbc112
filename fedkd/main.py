"""fedkd command line: ``python -m fedkd.main --config=configs/quickstart.py --workdir=runs/qs``.

Config values are overridden with ``--config.KEY=VALUE`` (e.g. ``--config.num_clients=64``). A bad
config, checkpoint or flag ends with one line on stderr naming the problem and a fix (exit code 2).
"""
from __future__ import annotations

import difflib
import os
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags

from fedkd.checkpoint import CheckpointError
from fedkd.config import ConfigError, base_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics, config and checkpoints go; re-use it to resume.")


def _fail(msg: str) -> None:
  print(f"fedkd: error: {msg}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])}; pass options as --flag=value")
  config = _CONFIG.value
  if config is None:
    _fail("--config is required, e.g. --config=configs/quickstart.py")
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=runs/quickstart")
  try:
    if config.task == "fedavg":
      from fedkd.tasks import fedavg
      fedavg.run(config, _WORKDIR.value)
    else:
      raise ConfigError(f"config.task={config.task!r} is not a known task; use 'fedavg'")
  except (ConfigError, CheckpointError) as e:
    _fail(str(e))


def _check_override_key(key: str) -> None:
  node, done = base_config(), []
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      _fail(f"--config.{key}: config.{'.'.join(done)} is a value, not a group of keys")
    if part not in node:
      options = list(node.keys())
      close = difflib.get_close_matches(part, options, n=1)
      where = "config." + ".".join(done) if done else "config"
      hint = f"did you mean --config.{'.'.join(done + close)}?" if close else \
          f"keys of {where}: {', '.join(sorted(options))}"
      _fail(f"unknown config key --config.{key}; {hint}")
    node, done = node[part], done + [part]


def run(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  for a in argv[1:]:
    if a.startswith("--config="):
      path = a.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        _fail(f"config file {path!r} not found; pass e.g. --config=configs/quickstart.py")
    elif a.startswith("--config."):
      _check_override_key(a[len("--config."):].split("=", 1)[0])
  # Flag errors (unknown config keys, wrong types, a broken config file) become one clear line.
  try:
    rest = flags.FLAGS(argv)
  except ConfigError as e:
    _fail(str(e))
  except flags.Error as e:
    cause = e.__cause__ or e.__context__
    if isinstance(cause, ConfigError):
      _fail(str(cause))
    _fail(f"{str(e).splitlines()[0]} (config keys are listed in fedkd/config.py)")
  except (ValueError, KeyError, AttributeError, TypeError, OSError, SyntaxError, ImportError) as e:
    _fail(f"cannot load the config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}")
  main(rest)


if __name__ == "__main__":
  run()
