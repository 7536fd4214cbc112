"""Runs fedkd's command-line entry points many times from one Python process (for tests).

The server imports the entry points once, then serves one case per line of stdin (JSON: module or a
script's .py path, args, cwd, env, timeout): it forks, and the child runs exactly what ``python -m <module>
args`` (``python <script> args``) runs (the ``__main__`` code path), with stdout/stderr going to files; the
parent answers
one JSON line (exit code, stdout, stderr). The server itself never starts a JAX backend, so every
case begins from a clean process state. Uncaught exceptions print their traceback and exit 1, as
``python -m`` does.
"""

import importlib
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback

MODULES = ("fedkd.main", "fedkd.eval", "fedkd.data.preview", "fedkd.data.tfds.build")
# What fedkd.main imports only once it runs a task (orbax, flax, ...: about a second a case); no JAX
# backend starts on import.
PRELOAD = ("fedkd.tasks.fedavg", "fedkd.tasks.fedefm")


def _entry(module: str):
  if module.endswith(".py"):  # a script, as ``python path/to/script.py`` runs it: its folder first on sys.path
    path = os.path.abspath(module)
    sys.path.insert(0, os.path.dirname(path))
    return lambda: runpy.run_path(path, run_name="__main__")
  mod = importlib.import_module(module)
  if module == "fedkd.data.tfds.build":  # its __main__ block: sys.exit(main())
    return lambda: sys.exit(mod.main())
  return getattr(mod, "run", None) or mod.main  # what each module's __main__ block calls


def _child(case, out_path, err_path):
  os.setsid()  # its own process group: a timeout kills whatever the case started too
  os.chdir(case.get("cwd") or os.getcwd())
  for k, v in (case.get("env") or {}).items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  os.dup2(out, 1)
  os.dup2(err, 2)
  sys.stdin = open(os.devnull)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  code = 0
  try:
    sys.argv = [case["module"], *case["args"]]
    _entry(case["module"])()
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if e.code is not None and not isinstance(e.code, int):
      print(e.code, file=sys.stderr)
  except BaseException:  # noqa: BLE001 - as python -m: print the traceback, exit 1
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main():
  for name in MODULES + PRELOAD:  # heavy imports once, before any fork
    importlib.import_module(name)
  print(json.dumps({"ready": True}), flush=True)
  for line in sys.stdin:
    case = json.loads(line)
    tmp = tempfile.mkdtemp(prefix="fedkd-cli-")
    out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
      _child(case, out_path, err_path)
    deadline = t0 + case.get("timeout", 300)
    status, timed_out = None, False
    while True:
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        break
      if time.time() > deadline:
        try:
          os.killpg(pid, signal.SIGKILL)  # the case and everything it started
        except ProcessLookupError:  # killed before its setsid(): no group yet
          os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        timed_out, status = True, None
        break
      time.sleep(0.02)
    code = None if status is None else (os.waitstatus_to_exitcode(status))
    res = {
      "code": code,
      "timed_out": timed_out,
      "seconds": round(time.time() - t0, 2),
      "stdout": open(out_path, errors="replace").read(),
      "stderr": open(err_path, errors="replace").read(),
    }
    for p in (out_path, err_path):
      os.remove(p)
    os.rmdir(tmp)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
  main()
