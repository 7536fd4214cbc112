"""Fake ``gcloud`` and ``srun`` programs for the launch-script tests, put first on PATH.

Each call is recorded in ``$FAKE_LOG``, one line per call (``gcloud ARGS`` / ``srun ARGS``); srun also
writes its arguments one per line to ``$FAKE_LOG.args``. By default gcloud answers as a project without
a TPU VM of the test's name, whose new VM has one worker. Switches, in the environment of the script under
test:

- ``FAKE_EXISTS=1``: a VM of that name exists (describe succeeds, create fails);
- ``FAKE_DESCRIBE_ERROR=MSG``: describe fails for another reason than NOT_FOUND;
- ``FAKE_ENDPOINTS=A;B;...``: the VM's workers' addresses;
- ``FAKE_RUN_RC=N``: the command run over ssh exits N;
- ``FAKE_BLOCK=TEXT``: the call containing TEXT blocks for 60 s as a long one does: a Python process (as
  gcloud is) waiting on its own child (as gcloud waits on ssh). The child's pid goes to ``$FAKE_LOG.child``,
  then ``$FAKE_LOG.blocked`` is made; both die of the signals that reach them.
"""

from __future__ import annotations

import os
import stat
import sys
import textwrap

GCLOUD = textwrap.dedent("""\
  #!/bin/bash
  echo "gcloud $*" >> "$FAKE_LOG"
  case "$*" in
    *"tpu-vm describe"*"--format"*) echo "${FAKE_ENDPOINTS:-10.0.0.2}" ;;
    *"tpu-vm describe"*)
      [ -n "${FAKE_DESCRIBE_ERROR:-}" ] && { echo "ERROR: $FAKE_DESCRIBE_ERROR" >&2; exit 1; }
      [ -n "${FAKE_EXISTS:-}" ] && exit 0; echo "ERROR: NOT_FOUND: Resource was not found" >&2; exit 1 ;;
    *"queued-resources describe"*"--format"*) echo ACTIVE ;;
    *"queued-resources describe"*) echo "ERROR: NOT_FOUND: Resource was not found" >&2; exit 1 ;;
    *"${FAKE_BLOCK:-no call blocks}"*) exec "$FAKE_PYTHON" -c '
  import os, signal, subprocess, sys
  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, signal.SIG_DFL)
  p = subprocess.Popen(["sleep", "60"])
  log = os.environ["FAKE_LOG"]
  with open(log + ".child", "w") as f:
    f.write(str(p.pid))
  open(log + ".blocked", "w").close()
  sys.exit(p.wait())' ;;
    *"tpu-vm create"*) [ -n "${FAKE_EXISTS:-}" ] && { echo "ERROR: already exists" >&2; exit 1; } ;;
    *"tpu-vm ssh"*"PATH="*) exit "${FAKE_RUN_RC:-0}" ;;
  esac
  exit 0
""")
SRUN = '#!/bin/bash\necho "srun $*" >> "$FAKE_LOG"\nprintf "%s\\n" "$@" > "$FAKE_LOG.args"\n'
_DROPPED = ("VENV", "WORKDIR", "CONFIG")  # the launch scripts read these; a test sets them itself


def programs(folder, **texts: str) -> str:
  """Writes each ``name=text`` as an executable in ``folder`` (made if missing); returns the folder."""
  os.makedirs(folder, exist_ok=True)
  for name, text in texts.items():
    path = os.path.join(folder, name)
    with open(path, "w") as f:
      f.write(text)
    os.chmod(path, stat.S_IRWXU)
  return str(folder)


def env(tmp_path, **extra: str) -> dict:
  """This process's environment without the scripts' own variables and SLURM's, with the fakes first on
  PATH and their log at ``tmp_path/calls.log``; ``extra`` is set last."""
  base = {k: v for k, v in os.environ.items() if k not in _DROPPED and not k.startswith("SLURM_")}
  path = programs(os.path.join(tmp_path, "bin"), gcloud=GCLOUD, srun=SRUN) + os.pathsep + base["PATH"]
  return {**base, "PATH": path, "FAKE_LOG": os.path.join(tmp_path, "calls.log"), "FAKE_PYTHON": sys.executable, **extra}


def calls(tmp_path) -> list[str]:
  """The calls recorded so far, one line each."""
  log = os.path.join(tmp_path, "calls.log")
  if not os.path.exists(log):
    return []
  with open(log) as f:
    return f.read().splitlines()
