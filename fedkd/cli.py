"""Shared command-line plumbing: the ``--config`` flag and one-line errors for bad flags/configs.

Entry points (fedkd.main, fedkd.data.preview, ...) define their own extra flags, then call
:func:`parse` and read :data:`CONFIG`. Any bad flag, config file or config value ends the process
with ``fedkd: error: ...`` on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
import threading
import time
import traceback
from typing import Any
from collections.abc import Callable

from absl import flags
import ml_collections
from ml_collections import config_flags

from fedkd.config import ConfigError, base_config, find_config_file, schemas, value_at
from fedkd.errors import reason

_FLAGFILE = re.compile(r"--?flagfile(=|$)")  # an argument that names a flag file (absl's --flagfile / -flagfile)


STOP_VERBS = {"interrupted": "interrupted", "hung up": "stopped by SIGHUP (a closed terminal)"}  # Stopped.reason


def _define_config_flag():
  """``--config``. ml_collections reads ``--flagfile=`` files of ``sys.argv`` as the flag is defined; one it
  cannot open is reported by :func:`parse` as one line, not as a traceback while this module imports."""

  def define():
    return config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True
    )

  try:
    return define()
  except flags.CantOpenFlagFileError:
    saved = sys.argv
    sys.argv = [a for a in saved if not _FLAGFILE.match(a)]
    try:
      return define()
    finally:
      sys.argv = saved


CONFIG = _define_config_flag()
# Flags shared by several entry points (defined once, so the modules can be imported together).
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: metrics, config and checkpoints; re-use it to resume.")
OUT = flags.DEFINE_string(
  "out",
  None,
  "Output path (fedkd.eval: folder, default <workdir>/eval; fedkd.data.preview: PNG file, default runs/preview.png).",
)
FRAMES = flags.DEFINE_integer("frames", 4, "Frames per site in pictures.")
SHARED = ("workdir", "out", "frames")  # an entry point names those it reads; the others are refused
OVERRIDDEN: set[str] = set()  # the dotted keys given as --config.KEY on the command line (set by parse)


# every character str.splitlines() breaks a line at, as its Python escape
LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


PROG = "fedkd"  # the program a user error names (``python -m bench --measure`` parses fedkd's flags as "bench")


def fail(msg: str, code: int = 2) -> None:
  """The one way a user error ends a process: one line on stderr, exit ``code`` (2), no traceback. A line
  break inside ``msg`` (a path or value the user gave that holds one) is written as its escape."""
  msg = str(msg).translate(LINE_BREAKS)
  print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
  sys.exit(code)


def line_buffered() -> None:
  """Progress shows up as it happens also when stdout/stderr are a pipe or a file (``| tee``, nohup,
  SLURM, sweep logs), where Python would otherwise buffer whole blocks until the process ends."""
  for stream in (sys.stdout, sys.stderr):
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
      try:
        reconfigure(line_buffering=True)
      except (ValueError, OSError):  # a stream that cannot be reconfigured (closed, replaced)
        pass


TRAINING_INTERRUPTED = "interrupted; the latest saved checkpoint is kept; re-run the same command to resume"


def run_app(
  main: Callable[[list[str]], Any],
  argv: list[str] | None = None,
  *,
  uses_config: bool = True,
  usage: str = "",
  shared: tuple[str, ...] = SHARED,
  interrupted: str = TRAINING_INTERRUPTED,
) -> None:
  """Runs ``main(argv)`` through ``absl.app.run`` with fedkd's flag parser and error path.

  ``shared``: which of :data:`SHARED` (``--workdir``, ``--out``, ``--frames``) the program reads; help
  lists only those, and giving another is an error.
  ``--help``/``-h`` print ``usage`` and this program's flags, ``--helpfull`` every flag and (for
  entry points with ``--config``) every ``--config.*`` key with its default and meaning; exit 0.
  A :class:`UserError` (bad config, data, checkpoint, workdir) prints one line and exits 2; a run
  stopped by SIGTERM / Ctrl-C at a round boundary says how to resume (exit 0 / 130), Ctrl-C elsewhere
  prints ``interrupted`` (what this program keeps; exit 130); a full disk or
  a read-only filesystem is one line; output into a pipe whose reader exited (``| head``) stops quietly
  (exit 141, as SIGPIPE would); any other exception is a bug and keeps its traceback.
  """
  from absl import app

  from fedkd.errors import USER_ERRORS
  from fedkd.preemption import Stopped, ctrl_c_raises

  line_buffered()
  running = {"main": False}

  def parser(args):
    try:
      return parse(args, uses_config=uses_config, usage=usage, shared=shared)
    except KeyboardInterrupt:  # Ctrl-C while a config file loads: nothing has been written yet
      print("fedkd: interrupted while reading the flags and config; nothing was written", file=sys.stderr, flush=True)
      sys.exit(130)

  def wrapped(args):
    from absl import logging as absl_logging

    running["main"] = True

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs many INFO lines per checkpoint
    try:
      return main(args)
    except USER_ERRORS as e:
      fail(str(e))
    except MemoryError as e:  # numpy's "Unable to allocate 29 TiB ...": sizes this machine cannot hold
      what = str(e).splitlines()[0] if str(e) else type(e).__name__
      fail(
        f"out of host memory ({what}); the config asks for more than this machine holds: lower config.batch_size, "
        "image_size, examples_per_client, eval.examples_per_site or the model's size (what was saved is kept)"
      )
    except Stopped as e:
      verb = STOP_VERBS.get(e.reason, "preempted")
      saved = "checkpoint saved" if e.what == "round" else "what it had finished is saved"
      print(
        f"fedkd: {verb} at {e.what} {e.round} ({saved}); re-run the same command to resume", file=sys.stderr, flush=True
      )
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      print(f"fedkd: {interrupted}", file=sys.stderr, flush=True)
      sys.exit(130)
    except Exception as e:  # noqa: BLE001 - a full disk / read-only filesystem, often wrapped by a library
      from fedkd.workdir import describe_os_error, environment_oserror

      err = environment_oserror(e)
      if err is None:
        raise
      fail(describe_os_error(err, err.filename or "the workdir"))

  try:
    with ctrl_c_raises():  # a Ctrl-C raised inside JAX's gc callback would be dropped: sent again instead
      app.run(wrapped, argv=argv, flags_parser=parser)
  except SystemExit as e:
    code = e.code
    if isinstance(code, int) and code != 0:
      _exit_past_stuck_threads(code)
      if code == 130:
        _exit_after_ctrl_c()
    elif code is not None and not isinstance(code, int):  # a message: Python prints it, exit 1
      _exit_past_stuck_threads(1, lambda: print(code, file=sys.stderr))
    raise
  except BrokenPipeError:
    exit_if_output_closed(f"fedkd: output pipe closed; {interrupted}" if running["main"] else None)
    _exit_past_stuck_threads(1, traceback.print_exc)  # another pipe (a worker's, a socket): a bug
    raise
  except BaseException:  # a bug: its traceback (printed here only if Python cannot exit itself), exit 1
    _exit_past_stuck_threads(1, traceback.print_exc)
    raise


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a program that wrote into a closed pipe


def _pipe_closed(fd: int) -> bool:
  """Whether ``fd`` is a pipe or socket whose reading end is gone (poll reports an error or hang-up on it)."""
  import select

  try:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
  except (OSError, ValueError):
    return False


def exit_if_output_closed(note: str | None = None) -> None:
  """For an ``except BrokenPipeError:`` block of an entry point: when stdout or stderr lost its reader (``| head``
  took what it wanted), stop quietly as a program killed by SIGPIPE does (exit 141), with ``note`` on stderr
  if that is still open. Returns if neither did (another pipe broke: the caller re-raises)."""
  closed = [fd for fd in (1, 2) if _pipe_closed(fd)]
  if not closed:
    return
  devnull = os.open(os.devnull, os.O_WRONLY)
  for fd in closed:
    os.dup2(devnull, fd)  # else Python's flush at exit fails again and prints
  if note and 2 not in closed:
    try:
      print(note, file=sys.stderr, flush=True)
    except OSError:
      pass
  _exit_past_stuck_threads(SIGPIPE_EXIT)
  raise SystemExit(SIGPIPE_EXIT) from None


def _exit_after_ctrl_c() -> None:
  """Leaves with exit status 130 once a Ctrl-C has been handled (its message printed, files closed).

  Under load about one such exit in 16 ended as death by SIGINT (status -2 instead of 130) after the message
  was printed: a SIGINT still pending, or raised again by a native library's signal handler while
  Python's finalisation had put back the default action. From here SIGINT is ignored and the process
  runs its exit handlers (``atexit``: logging, temporary files, JAX's shutdown) and exits 130 itself."""
  import atexit
  import signal

  signal.signal(signal.SIGINT, signal.SIG_IGN)
  atexit._run_exitfuncs()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(130)


def _exit_past_stuck_threads(code: int, before_exit: Callable[[], Any] | None = None, grace_s: float = 10.0) -> None:
  """On an error exit: give other non-daemon threads ``grace_s`` seconds, then leave without them.

  Python's exit joins every non-daemon thread; after a failed asynchronous save orbax leaves threads
  that wait forever for a signal the failed save never sends, so the process printed its error and then
  hung. Checkpoints are written to a temporary folder and renamed when complete, so leaving an
  unfinished one behind loses nothing that was saved."""
  main = threading.main_thread()
  deadline = time.monotonic() + grace_s
  for t in threading.enumerate():
    if t is not main and not t.daemon:
      try:
        threading.Thread.join(t, max(0.0, deadline - time.monotonic()))  # orbax's own join raises on timeout
      except RuntimeError:  # not started
        pass
  stuck = [t.name for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]
  if stuck:
    if before_exit is not None:
      before_exit()  # what Python would print on its way out
    print(f"fedkd: {len(stuck)} background thread(s) did not finish; exiting without them", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _print_help(full: bool, usage: str, uses_config: bool, shared: tuple[str, ...] = SHARED) -> None:
  main_module = sys.argv[0] if sys.argv else ""
  print((usage or "").strip() + "\n")
  mods = flags.FLAGS.flags_by_module_dict()
  common = (["config"] if uses_config else []) + list(shared)
  own = [
    m for m in mods if m.endswith(("fedkd.main", "fedkd.eval", "fedkd.data.preview")) or m in (main_module, "__main__")
  ]
  # --helpfull: every module's flags too, but of this module's only those the program reads (it refuses the others)
  for m in own + (sorted(m for m in mods if m not in own and m != __name__) if full else []):
    print(flags.FLAGS.module_help(m))
  if common:
    print(f"\n{__name__}:")
    for name in common:
      f = flags.FLAGS[name]
      default = "" if f.default is None else f"\n    (default: {f.default!r})"
      print(f"  --{name}: {f.help}{default}")
  if not full:
    print("\n--helpfull lists every flag" + (" and every --config.* key with its default" if uses_config else ""))
  if full and uses_config:
    from fedkd.config import config_help

    print("\n" + config_help())


def _check_override_key(key: str, config: ml_collections.ConfigDict | None) -> None:
  """A ``--config.KEY`` override must name a key of the loaded config (its task's schema); the hint
  lists that task's keys (a FedEFM key is answered with FedEFM's keys, not FedAvg's)."""
  node, done = config if config is not None else base_config(), []
  task = node.get("task", "fedavg") if isinstance(node, ml_collections.ConfigDict) else "fedavg"
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      fail(f"--config.{key}: config.{'.'.join(done)} is a value, not a group of keys")
    if part not in node:
      options = list(node.keys())
      close = difflib.get_close_matches(part, options, n=1)
      where = "config." + ".".join(done) if done else "config"
      elsewhere = [s.task for s in schemas() if s.task != task and _has_key(s, key)]
      if elsewhere:
        hint = f"it is a key of task {elsewhere[0]!r}; this config's task is {task!r}"
      elif close:
        hint = f"did you mean --config.{'.'.join(done + close)}?"
      else:
        hint = f"keys of {where} (task {task!r}): {', '.join(sorted(options))}"
      fail(f"unknown config key --config.{key}; {hint}")
    node, done = node[part], done + [part]


def _has_key(node, key: str) -> bool:
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def parse(
  argv: list[str] | None = None, *, uses_config: bool = True, usage: str = "", shared: tuple[str, ...] = SHARED
) -> list[str]:
  """Parses absl flags; returns the positional arguments left over (argv[0] first). A flag of
  :data:`SHARED` not in ``shared`` (or ``--config`` when not ``uses_config``) is refused: the program
  would ignore it."""
  argv = list(sys.argv if argv is None else argv)
  if any(_FLAGFILE.match(a) for a in argv[1:]):  # its flags are checked like the others
    try:
      argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    except flags.Error as e:
      what = str(e).strip().removeprefix("ERROR::").strip().splitlines()[0]
      fail(f"--flagfile: {what}; pass a readable file that holds one --flag=value per line")
  wants = [a for a in argv[1:] if a in ("-h", "--help", "-help", "--helpshort", "--helpfull", "-helpfull")]
  if wants:
    _print_help("full" in wants[0], usage, uses_config, shared)
    sys.exit(0)
  end = argv.index("--") if "--" in argv else len(argv)
  for i in range(1, end):  # absl reads -config.KEY / -noconfig.KEY as --config.KEY: check them alike
    if re.match(r"-(no)?config([.=]|$)", argv[i]):
      argv[i] = "-" + argv[i]
  if uses_config:  # absl reads '--config FILE' as --config=FILE: check it alike
    i = 1
    while i < end - 1:
      if argv[i] == "--config":
        argv[i : i + 2] = [f"--config={argv[i + 1]}"]
        end -= 1
      i += 1
  ignored = [n for n in SHARED if n not in shared] + ([] if uses_config else ["config"])
  for a in argv[1:end]:
    name = a.lstrip("-").split("=", 1)[0].split(".", 1)[0]
    if a.startswith("-") and name in ignored:
      fail(f"{a.split('=', 1)[0]} is not a flag of this program (it would be ignored); --help lists its flags")
  configs = [a for a in argv[1:end] if uses_config and a.startswith("--config=")]
  if len(configs) > 1:  # absl would keep the last (and fail on its overrides)
    fail(f"--config is given {len(configs)} times ({', '.join(configs)}); give one config file")
  if uses_config and not configs and any(re.match(r"--(no)?config\.", a) for a in argv[1:end]):
    names = [a.lstrip("-").split("=", 1)[0] for a in argv[1:end] if a.startswith("-")]
    typo = difflib.get_close_matches("config", [n for n in names if "." not in n], n=1, cutoff=0.6)
    hint = f" (is --{typo[0]} meant to be --config?)" if typo else ""
    fail(
      f"--config is required for --config.KEY overrides{hint}, e.g. --config=configs/quickstart.py "
      "--config.num_rounds=10"
    )
  loaded = None  # the config of --config= (its keys are the valid --config.* overrides)
  for i in range(1, end):
    if uses_config and argv[i].startswith("--config="):
      path, sep, arg = argv[i].split("=", 1)[1].partition(":")
      if sep and find_config_file(path) is None and (problem := colon_in_path_problem(argv[i].split("=", 1)[1])):
        fail(problem)
      path = resolve_config_path(path)
      argv[i] = f"--config={path}" + (f":{arg}" if sep else "")
      loaded = _preload_config(path, arg if sep else None)
  first = next((i for i in range(1, end) if uses_config and argv[i].startswith("--config=")), 1)
  early = [a for a in argv[1:first] if re.match(r"--(no)?config\.", a)]
  if early:  # ml_collections refuses them (it applies overrides to the config given before them)
    fail(f"{early[0]} comes before --config=FILE; give --config=FILE first, then its --config.KEY overrides")
  given = set()  # the keys overridden on the command line
  for i in range(1, end):
    m = re.match(r"--(no)?config\.([^=]*)(=(.*))?$", argv[i], flags=re.S) if uses_config else None
    if m:
      key, value = m.group(2), m.group(4)
      _check_override_key(key, loaded)
      if value is None and not m.group(1) and i + 1 < end and loaded is not None and not _is_bool(key, loaded):
        value = argv[i + 1]  # '--config.KEY VALUE': absl takes the next argument as the value
      if loaded is not None and value is not None:
        _check_override_value(key, value, loaded)
      given.add(key)
  OVERRIDDEN.clear()
  OVERRIDDEN.update(given)
  try:
    rest = flags.FLAGS(argv)
  except ConfigError as e:
    fail(str(e))
  except flags.Error as e:
    cause = e.__cause__ or e.__context__
    if isinstance(cause, ConfigError):
      fail(str(cause))
    hint = " (--helpfull lists every --config.* key)" if uses_config else " (--help lists the flags)"
    fail(f"{str(e).splitlines()[0]}{hint}")
  except (ValueError, KeyError, AttributeError, TypeError, OSError, SyntaxError, ImportError) as e:
    fail(f"cannot load the config: {reason(e)}")
  if len(rest) > 1:
    fail(f"unexpected arguments {' '.join(rest[1:])}; pass options as --flag=value")
  if uses_config and CONFIG.value is None:
    fail("--config is required, e.g. --config=configs/quickstart.py")
  if uses_config:
    from fedkd.config import unused_notes

    for line in unused_notes(CONFIG.value, given):  # set, but this combination never reads them
      print(line, flush=True)
  return rest


def _group_of(key: str, config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, str]:
  """The group that holds the dotted ``config.KEY``, and KEY's last part."""
  groups, _, last = key.rpartition(".")
  return (value_at(config, groups) if groups else config), last


def _is_bool(key: str, config: ml_collections.ConfigDict) -> bool:
  """Whether ``config.KEY`` is on/off (absl reads a bare ``--config.KEY`` as true, taking no value)."""
  node, last = _group_of(key, config)
  try:
    return node.get_type(last) is bool
  except (AttributeError, KeyError, TypeError):
    return isinstance(node[last], bool)


def colon_in_path_problem(value: str) -> str | None:
  """``--config=DIR:WITH:COLON/file.py``: the first ':' starts the config argument, so absl cannot read such a
  path; the message that says so (rather than 'DIR not found'), or None where no such file exists."""
  parts = value.split(":")
  for n in range(2, len(parts) + 1):
    candidate = ":".join(parts[:n])
    if find_config_file(candidate) is not None:
      return (
        f"--config={value}: the config file's path {candidate!r} holds ':', which starts the config argument "
        "(--config=FILE:ARG); copy or link the file to a path without ':'"
      )
  return None


def _check_override_value(key: str, value: str, config: ml_collections.ConfigDict) -> None:
  """A ``--config.KEY=VALUE`` whose text the key's type cannot take, or that would change the config's
  task, is one line with the form to write (absl's own message names neither)."""
  node, last = _group_of(key, config)
  current = node[last]
  if isinstance(current, ml_collections.ConfigDict):  # absl would replace the whole group with the given dict
    first = sorted(current.keys())[0] if current else "KEY"
    fail(
      f"--config.{key}={value}: config.{key} is a group of keys; override them one by one, e.g. "
      f"--config.{key}.{first}=... (--helpfull lists them)"
    )
  if key == "task" and value != current:
    example = "configs/fedefm.py" if value == "fedefm" else "configs/quickstart.py"
    fail(
      f"--config.task={value}: a config's task comes with its file's keys (this one is task {current!r}), "
      f"so an override cannot change it; pass a config file of the task you want, e.g. --config={example}"
    )
  try:
    kind = node.get_type(last)
  except (AttributeError, KeyError, TypeError):
    kind = None
  if current is None and kind in (None, type(None)):  # a plain None, not a typed placeholder: absl cannot parse it
    fail(
      f"--config.{key}={value}: config.{key} is None in this config file, so the command line cannot give it a "
      "value; set it in the file (or leave the schema's default there)"
    )
  if kind is None:
    return
  parsers = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser()}
  parser = next((parsers[t] for t in (bool, int, float) if kind is t), None)
  if parser is None:
    return
  try:
    parser.parse(value)
    return
  except (ValueError, TypeError):
    pass
  if kind is bool:
    fix = f"config.{key} is on/off: write --config.{key}=true or --config.{key}=false"
  elif kind is int:
    try:
      x = float(value)
    except ValueError:
      x = None
    if x is not None and math.isfinite(x) and x == int(x):
      fix = f"config.{key} takes a whole number: write --config.{key}={int(x)}"
    else:
      fix = f"config.{key} takes a whole number, e.g. --config.{key}={current!r} (its value in this config)"
  else:
    fix = f"config.{key} takes a number, e.g. --config.{key}={current!r} (its value in this config)"
  fail(f"--config.{key}={value}: {fix}")


def resolve_config_path(path: str) -> str:
  """A config file path as given, or else inside the installed ``fedkd.configs`` package."""
  found = find_config_file(path)
  if found is None:
    if os.path.isdir(os.path.expanduser(path)):
      fail(f"--config={path} is a folder; pass a config file, e.g. --config=configs/quickstart.py")
    fail(f"config file {path!r} not found; pass e.g. --config=configs/quickstart.py")
  return found


def _preload_config(path: str, arg: str | None) -> ml_collections.ConfigDict:
  """Runs the config file's ``get_config(arg)`` once before absl does, so that a bad variant, a config
  file that raises, or one that lacks ``get_config`` is one line here instead of a traceback inside
  the flag parser."""
  import importlib.util

  from fedkd.errors import USER_ERRORS

  if not path.endswith(".py"):
    fail(
      f"--config={path} is not a config file: a config is a Python file (.py) defining get_config(arg), "
      "e.g. --config=configs/quickstart.py"
    )
  try:
    spec = importlib.util.spec_from_file_location("_fedkd_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except USER_ERRORS as e:
    fail(str(e))
  except SystemExit as e:
    _exited(e, path)
  except Exception as e:  # noqa: BLE001 - the user's config file is broken
    fail(f"config file {path} cannot be loaded ({_where(e, path)}{reason(e, 300)}); fix the file")
  if not callable(getattr(module, "get_config", None)):
    fail(f"config file {path} has no get_config(arg) function; see configs/quickstart.py for the form")
  try:
    config = module.get_config(arg) if arg is not None else module.get_config()
  except USER_ERRORS as e:
    fail(str(e))
  except SystemExit as e:
    _exited(e, path)
  except TypeError as e:
    if arg is not None and "positional argument" in str(e):
      fail(f"config file {path} takes no argument, but --config={path}:{arg} passes {arg!r}; drop ':{arg}'")
    typed = re.search(r"Could not override field '(\w+)'.* cannot be casted to type <class '(\w+)'>", str(e))
    hint = f"; that key holds a {typed.group(2)} (a string: write the value in quotes)" if typed else ""
    if typed and typed.group(2) != "str":
      hint = f"; that key holds a {typed.group(2)}: give it one (docs/configs.md lists each key's type)"
    fail(f"config file {path}: get_config raised ({_where(e, path)}{reason(e, 300)}){hint}")
  except Exception as e:  # noqa: BLE001
    fail(
      f"config file {path}: get_config({arg!r}) raised ({_where(e, path)}{reason(e, 300)}); fix the file or the "
      "variant after ':'"
    )
  if isinstance(config, ml_collections.FrozenConfigDict):  # absl would fail to lock it (an AttributeError)
    fail(
      f"config file {path}: get_config returned a FrozenConfigDict, which --config.KEY overrides cannot change; "
      "return an ml_collections.ConfigDict (e.g. start from fedkd.config.base_config())"
    )
  if not isinstance(config, ml_collections.ConfigDict):
    fail(
      f"config file {path}: get_config returned a {type(config).__name__}, not an "
      "ml_collections.ConfigDict; start from fedkd.config.base_config()"
    )
  _check_file_types(config, path)
  return config


def _exited(e: SystemExit, path: str) -> None:
  """A config file that calls sys.exit / raises SystemExit while it loads: one line, not a silent exit 0 (or its
  bare message)."""
  fail(
    f"config file {path} exited while it was read ({_where(e, path)}SystemExit({e.code!r})); a config file defines "
    "get_config(arg) and returns the config: fix the file"
  )


def _check_file_types(config: ml_collections.ConfigDict, path: str) -> None:
  """A key the file sets to a value of another type than its default's ('false' on an on/off key, '5' where a
  number belongs) is one line naming the file; absl would also read a --config.KEY override as that type."""
  from fedkd.config import a_type, task_schema, type_problem

  schema = task_schema(config.get("task"))
  if schema is None:  # validation names a missing or unknown task
    return
  found = type_problem(config, schema, allow_none=True)  # None: the override check names it
  if found:
    key, value, takes, write = found
    fail(
      f"config file {path} sets {key}={value!r}, {a_type(value)}, but the key takes {takes}: set it to {write} in "
      f"the file (a --config.{key.removeprefix('config.')} override is read as the file's type)"
    )


def _where(e: BaseException, path: str) -> str:
  """'line N: ' of the deepest frame in the config file, if any."""
  import traceback

  line = None
  for frame in traceback.extract_tb(e.__traceback__):
    if os.path.abspath(frame.filename) == os.path.abspath(path):
      line = frame.lineno
  if isinstance(e, SyntaxError) and e.lineno:
    line = e.lineno
  return f"line {line}: " if line else ""
