"""Shared command-line plumbing: the ``--config`` flag and one-line errors for bad flags/configs.

Entry points (fedkd.main, fedkd.data.preview, ...) define their own extra flags, then call
:func:`parse` and read :data:`CONFIG`. Any bad flag, config file or config value ends the process
with ``fedkd: error: ...`` on stderr and exit code 2, without a traceback.
"""
from __future__ import annotations

import difflib
import os
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags

from fedkd.config import ConfigError, base_config, schemas

CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                         lock_config=True)
# Flags shared by several entry points (defined once, so the modules can be imported together).
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: metrics, config and checkpoints; re-use it to resume.")
OUT = flags.DEFINE_string("out", None, "Output path (fedkd.eval: folder, default <workdir>/eval; "
                          "fedkd.data.preview: PNG file, default preview.png).")
FRAMES = flags.DEFINE_integer("frames", 4, "Frames per site in pictures.")


def fail(msg: str) -> None:
  print(f"fedkd: error: {msg}", file=sys.stderr)
  sys.exit(2)


def _check_override_key(key: str) -> None:
  for schema in schemas():  # valid if any task's schema has it
    node = schema
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        break
      node = node[part]
    else:
      return
  node, done = base_config(), []
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      fail(f"--config.{key}: config.{'.'.join(done)} is a value, not a group of keys")
    if part not in node:
      options = list(node.keys())
      close = difflib.get_close_matches(part, options, n=1)
      where = "config." + ".".join(done) if done else "config"
      hint = f"did you mean --config.{'.'.join(done + close)}?" if close else \
          f"keys of {where}: {', '.join(sorted(options))}"
      fail(f"unknown config key --config.{key}; {hint}")
    node, done = node[part], done + [part]


def parse(argv: list[str] | None = None) -> list[str]:
  """Parses absl flags; returns the positional arguments left over (argv[0] first)."""
  argv = list(sys.argv if argv is None else argv)
  for a in argv[1:]:
    if a.startswith("--config="):
      path = a.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        fail(f"config file {path!r} not found; pass e.g. --config=configs/quickstart.py")
    elif a.startswith("--config."):
      _check_override_key(a[len("--config."):].split("=", 1)[0])
  try:
    rest = flags.FLAGS(argv)
  except ConfigError as e:
    fail(str(e))
  except flags.Error as e:
    cause = e.__cause__ or e.__context__
    if isinstance(cause, ConfigError):
      fail(str(cause))
    fail(f"{str(e).splitlines()[0]} (config keys are listed in fedkd/config.py)")
  except (ValueError, KeyError, AttributeError, TypeError, OSError, SyntaxError, ImportError) as e:
    fail(f"cannot load the config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}")
  if len(rest) > 1:
    fail(f"unexpected arguments {' '.join(rest[1:])}; pass options as --flag=value")
  if CONFIG.value is None:
    fail("--config is required, e.g. --config=configs/quickstart.py")
  return rest
