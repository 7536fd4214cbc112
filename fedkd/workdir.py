"""Run directories: local paths and ``gs://`` alike (``etils.epath``), a writability check up front,
atomic small-file writes, and the lock that keeps a second process off a workdir.

Every entry point that writes into a workdir goes through :func:`prepare` (expands ``~``, refuses
files, read-only folders and unusable filesystems with one line) and holds :class:`Lock` while it
runs. The lock is an ``fcntl.flock`` on ``<workdir>/.lock`` for local folders: the kernel releases it
when the holder dies, so a lock left by a killed process is detected and taken over. Remote folders
(``gs://``) and filesystems where flock fails (e.g. Lustre mounted ``noflock``) cannot be
flocked; there the lock file names its holder (host, pid) and is taken over when that holder is this host
and the pid is gone.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
from typing import Any

from etils import epath

from fedkd.errors import UserError, reason

LOCK_NAME = ".lock"


class WorkdirError(UserError, OSError):
  """A workdir that cannot be used; the message names it and the fix."""


def is_remote(path: Any) -> bool:
  return "://" in os.fspath(path)


def expand(path: str) -> str:
  """``~`` and ``~user`` expanded (bash leaves ``--flag=~/x`` alone); remote paths unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.expanduser(path)


def as_path(path: Any) -> epath.Path:
  return epath.Path(expand(os.fspath(path)))


def describe_os_error(e: OSError, where: Any, flag: str = "--workdir") -> str:
  """One line for an OSError while writing under ``where`` (full disk, read-only, permissions)."""
  if e.errno == errno.ENOSPC:
    return f"no space left in {where}; free some space (or use another {flag}) and re-run to resume"
  if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
    return f"cannot write to {where} ({os.strerror(e.errno)}); use a writable {flag}"
  if e.errno == errno.EFBIG:  # RLIMIT_FSIZE (ulimit -f; a batch scheduler's file-size limit), or the filesystem's
    return (
      f"cannot write to {where} (File too large: over this process's file-size limit, `ulimit -f`, or the "
      f"filesystem's); raise the limit (or use another {flag}) and re-run to resume"
    )
  return f"cannot write to {where} ({type(e).__name__}: {e}); use another {flag}"


ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
# flock on a filesystem that has no file locks
NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


# TensorStore (orbax's array writer) reports a failed system call as a ValueError whose message ends with
# ``[os_error_code='28']`` (ENOSPC) and names the file in quotes, not as an OSError. The folder named is the
# one above orbax's temporary folders (``<checkpoints>/<round>.orbax-checkpoint-tmp/...``).
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='?(\d+)'?\]")
_QUOTED_PATH = re.compile(r'"((?:/|[a-z][a-z0-9+.-]*://)[^"]*)"')
_ORBAX_TMP = re.compile(r"/[^/]*\.orbax-checkpoint-tmp[^/]*(/.*)?$")


def environment_oserror(e: BaseException | None) -> OSError | None:
  """The full-disk / read-only-filesystem OSError in ``e``'s cause chain (libraries wrap them; TensorStore's
  errors become an OSError with that errno and the file it names)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
      return e
    if not isinstance(e, OSError):
      text = str(e)
      code = _TENSORSTORE_ERRNO.search(text)
      if code and int(code.group(1)) in ENVIRONMENT_ERRNOS:
        paths = [_ORBAX_TMP.sub("", p, count=1) or "/" for p in _QUOTED_PATH.findall(text)]
        n = int(code.group(1))
        return OSError(n, os.strerror(n), paths[-1]) if paths else OSError(n, os.strerror(n))
    e = e.__cause__ or e.__context__
  return None


def prepare(workdir: str, *, create: bool = True, flag: str = "--workdir", skip: tuple[str, ...] = ()) -> epath.Path:
  """The workdir as a path, created (``create``) and proven writable; a :class:`WorkdirError` else.
  ``flag``: how messages name the path (``--out`` for an output folder). ``skip``: entries of
  :data:`WORKDIR_FILES` / :data:`WORKDIR_FOLDERS` the caller neither reads nor writes (their kind is not checked)."""
  if not workdir or not workdir.strip():
    raise WorkdirError(f"{flag}={workdir!r} is empty; pass a folder, e.g. {flag}=runs/quickstart")
  path = as_path(workdir)
  try:
    if path.exists() and not path.is_dir():
      raise WorkdirError(f"{flag}={workdir} is a file, not a folder; pass a folder path")
    _check_entries(path, f"{flag}={workdir}", skip)
    if not create:
      if not path.is_dir():
        raise WorkdirError(f"{flag}={workdir} does not exist; pass the --workdir of a training run")
      return path
    path.mkdir(parents=True, exist_ok=True)
    if not is_remote(path):
      probe = path / f".write-test-{os.getpid()}"
      try:
        probe.write_text("ok")
      finally:
        if probe.exists():  # also after a write that failed (a full disk leaves the empty file)
          probe.unlink()
  except ImportError as e:  # gs:// without its filesystem package
    raise WorkdirError(f"{flag}={workdir}: {e} (pip install gcsfs) to use a cloud workdir") from None
  except OSError as e:
    if isinstance(e, WorkdirError):
      raise
    if e.errno == errno.ENOTDIR or isinstance(e, NotADirectoryError):
      raise WorkdirError(f"{flag}={workdir}: a parent of it is a file; pass a folder path") from None
    raise WorkdirError(describe_os_error(e, workdir, flag)) from None
  return path


# What fedkd writes in a workdir, by kind: the same name as the other kind (a folder called
# metrics.jsonl, a file called checkpoints) would fail mid-run, or leave orbax's save threads waiting.
WORKDIR_FILES = ("config.json", "metrics.jsonl", "rounds.jsonl", "results_raw.jsonl", "environment.json", LOCK_NAME)
WORKDIR_FOLDERS = ("checkpoints", "tb", "eval", "foundations")


def _check_entries(path: epath.Path, named: str, skip: tuple[str, ...] = ()) -> None:
  if not path.is_dir():
    return
  for name in WORKDIR_FILES:
    if name not in skip and (path / name).is_dir():
      raise WorkdirError(
        f"{named}: {name} is a folder, but fedkd writes a file there; move it away or use another --workdir"
      )
  for name in WORKDIR_FOLDERS:
    p = path / name
    if name not in skip and p.exists() and not p.is_dir():
      raise WorkdirError(
        f"{named}: {name} is a file, but fedkd keeps a folder there; move it away or use another --workdir"
      )


def read_json_object(path: Any) -> dict:
  """The JSON object in the file ``path``; OSError if unreadable, ValueError if not JSON or not an object."""
  with open(os.fspath(path), encoding="utf-8") as f:
    out = json.load(f)
  if not isinstance(out, dict):
    raise ValueError("not a JSON object")
  return out


def saved_task(path: epath.Path) -> str | None:
  """``config.task`` of the run in the workdir ``path`` (its config.json; 'fedavg' when the key predates
  tasks), None without a config.json; a :class:`WorkdirError` when fedkd did not write that file."""
  cfg = path / "config.json"
  if not cfg.exists():
    return None
  try:
    saved = json.loads(cfg.read_text())  # epath: also gs:// workdirs
  except (OSError, ValueError) as e:
    raise WorkdirError(
      f"{cfg} is unreadable ({reason(e, 80)}), and a run would replace it; use another "
      "--workdir (or move the file away)"
    ) from None
  if (
    not isinstance(saved, dict)
    or not {"task", "seed", "num_rounds"} & set(saved)
    or not isinstance(saved.get("task", "fedavg"), str)
  ):
    raise WorkdirError(
      f"{cfg} is not a config fedkd wrote, and a run would replace it; use another --workdir (or move the file away)"
    )
  return saved.get("task", "fedavg")


def check_not_a_sweep(path: epath.Path) -> None:
  """Refuses a ``launch.sweep`` output folder as a run's workdir: its runs live in subfolders, and a run's
  files in the folder itself would make the sweep refuse the folder afterwards."""
  if (path / "sweep.json").exists():  # launch.sweep.SWEEP_FILE
    raise WorkdirError(
      f"--workdir={path} is a launch.sweep output folder (sweep.json is there); give the run its own --workdir "
      "(e.g. a new subfolder)"
    )


def _holds_a_run(path: epath.Path) -> bool:
  return (path / "config.json").is_file() or (path / "checkpoints").is_dir()


def runs_below(path: epath.Path) -> list[str]:
  """The names of ``path``'s subfolders that hold a run (a sweep's --out, the parent of replicas), sorted."""
  return sorted(p.name for p in path.iterdir() if p.is_dir() and _holds_a_run(p))


def name_runs(runs: list[str]) -> str:
  """'a, b, c' for up to six run folders, else the first six and how many in all."""
  return ", ".join(runs[:6]) + (f", ... ({len(runs)} in all)" if len(runs) > 6 else "")


def check_run_folder(path: epath.Path) -> None:
  """Refuses a run's workdir that holds no run of its own but runs in its subfolders (the parent of
  ``--seeds`` / ``--replica_config`` replicas, a folder of runs: a new run there would mix its files with
  theirs, and forgetting ``--seeds`` on a resume would start one from scratch), and one inside the
  checkpoints/, tb/, eval/ or foundations/ folder of another run, which that run rewrites (orbax removes
  old steps)."""
  if is_remote(path):  # local folders only
    return
  if not _holds_a_run(path) and path.is_dir():
    runs = runs_below(path)
    if runs:
      raise WorkdirError(
        f"--workdir={path} holds no run of its own but runs in its subfolders ({name_runs(runs)}), as fedkd.main --seeds / "
        "--replica_config write them; to resume those, re-run the command that made them (the same --seeds / "
        "--replica_config); for a new run, pass a new --workdir"
      )
  here = epath.Path(os.path.realpath(os.fspath(path)))
  for folder in (here, *here.parents):
    owner = folder.parent
    if folder.name in WORKDIR_FOLDERS and owner != folder and (owner / "config.json").is_file():
      raise WorkdirError(
        f"--workdir={path} lies inside {folder}, the {folder.name}/ folder of the run in {owner}, which that run "
        "rewrites (orbax removes old checkpoint steps); pass a folder outside it"
      )


def check_replica_parent(path: epath.Path) -> None:
  """Refuses, as the folder of ``--seeds`` / ``--replica_config`` replicas, a workdir that holds a run of its
  own: the replicas' subfolders would sit inside that run's folder."""
  if not is_remote(path) and _holds_a_run(path):
    raise WorkdirError(
      f"--workdir={path} holds a run of its own (its config.json or checkpoints/); replicas each get a subfolder "
      "of a folder that holds no run: pass a new --workdir"
    )


def task_from_files(path: epath.Path) -> tuple[str, str] | None:
  """``(task, the file that tells)`` of a workdir without its config.json (deleted, or not copied along), from
  what each task alone writes: FedEFM's ``results_raw.jsonl`` / ``foundations/``, a FedAvg-family run's
  ``metrics.jsonl`` / ``rounds.jsonl`` / ``checkpoints/<round>/`` (FedEFM's lie in ``checkpoints/<run>/``)."""
  for name in ("results_raw.jsonl", "foundations"):
    if (path / name).exists():
      return "fedefm", name
  for name in ("metrics.jsonl", "rounds.jsonl"):
    if (path / name).exists():
      return "fedavg", name
  ckdir = path / "checkpoints"
  steps = [p.name for p in ckdir.iterdir() if p.is_dir()] if ckdir.is_dir() else []
  if any(re.fullmatch(r"u[\d.]+_\w+_seed\d+", name) for name in steps):  # FedEFM's u<percent>_<method>_seed<seed>/
    return "fedefm", "checkpoints/u<percent>_<method>_seed<seed>/"
  if any(name.isdigit() for name in steps):
    return "fedavg", "checkpoints/<round>/"
  return None


def check_task(path: epath.Path, task: str) -> None:
  """Refuses a workdir whose ``config.json`` fedkd did not write, or wrote for another task (a FedAvg run
  would otherwise overwrite a FedEFM experiment's config and leave its results unreadable); without a
  config.json, one whose files are another task's (:func:`task_from_files`)."""
  was = saved_task(path)
  if was is not None and was != task:
    raise WorkdirError(
      f"--workdir={path} holds a {was!r} run (config.task={was!r} in its config.json), not a {task!r} one; "
      f"use another --workdir for the {task!r} run"
    )
  found = task_from_files(path) if was is None else None
  if found is not None and found[0] != task:
    raise WorkdirError(
      f"--workdir={path} holds the files of a {found[0]!r} run ({found[1]}; its config.json is missing), not of a "
      f"{task!r} one; use another --workdir for the {task!r} run"
    )


def _same_file(fd: int, path: epath.Path) -> bool:
  """The open file ``fd`` is still the one at ``path`` (not unlinked or replaced since it was opened)."""
  try:
    a, b = os.fstat(fd), os.stat(os.fspath(path))
  except OSError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove_if_empty(path: epath.Path) -> None:
  """Removes ``path`` when it holds nothing but an unheld lock file: a run that was refused before it wrote
  anything leaves no folder behind. A lock another process holds (a run started at the same moment, which
  created the folder and is still setting up) is left alone with its folder."""
  try:
    names = [p.name for p in path.iterdir()]
    if not set(names) <= {LOCK_NAME}:
      return
    lock = path / LOCK_NAME
    if LOCK_NAME in names and is_remote(lock):
      if _read_lock(lock):  # a holder named in it: another process's lock (this one's is deleted on release)
        return
      lock.unlink()
    elif LOCK_NAME in names:
      import fcntl

      fd = os.open(os.fspath(lock), os.O_RDONLY)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the folder is gone: no one takes it meanwhile
      except OSError as e:
        if e.errno not in NO_FLOCK_ERRNOS or _read_lock(lock):  # held, or (without flock) naming a holder
          os.close(fd)
          return
      try:
        lock.unlink()
        path.rmdir()
      finally:
        os.close(fd)
      return
    path.rmdir()
  except OSError:
    pass


def write_atomic(path: epath.Path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename: readers see the old or the
  new content, never a cut one."""
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  try:
    tmp.write_text(text)
    if is_remote(path):
      tmp.replace(path)  # object stores: a copy over the old object, then the source is deleted
    else:
      os.replace(os.fspath(tmp), os.fspath(path))
  except BaseException:
    try:
      tmp.unlink()
    except OSError:
      pass
    raise


def pid_alive(pid: int) -> bool:
  """Whether a process ``pid`` runs on this host (another user's counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read_lock(path) -> dict:
  """The holder record of a lock file ({} when absent, empty or unreadable)."""
  try:
    held = json.loads(epath.Path(path).read_text() or "{}")
  except (OSError, ValueError):
    return {}
  return held if isinstance(held, dict) else {}


def _alive_here(held: dict) -> bool:
  """Whether a lock's holder is a running process on this host."""
  pid = held.get("pid")
  return held.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and pid_alive(pid)


def running_holder(workdir) -> str | None:
  """Who holds ``workdir``'s lock (pid, host, start, command) when that is a running process on this host,
  else None: a run training there now."""
  held = _read_lock(epath.Path(workdir) / LOCK_NAME)
  return _holder_text(held) if _alive_here(held) else None


def _command_line(limit: int = 400) -> str:
  """This process's command line as a holder's lock names it: whole up to ``limit`` characters (the first
  three words named only the module and the --config, not the workdir or the overrides)."""
  text = " ".join(sys.argv)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _holder_text(info: dict) -> str:
  started = info.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {when}: {info.get('command', '?')})"


class Lock:
  """Exclusive use of a workdir by one process (``with Lock(path): ...``)."""

  def __init__(self, workdir: epath.Path, log=None):
    self.path = epath.Path(workdir) / LOCK_NAME
    self.log = log or (lambda m: print(m, file=sys.stderr))
    self._fd = None
    self._by_record = False  # the lock is the holder named in the file (gs://, filesystems without flock)
    self.info = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": time.time(),
      "command": _command_line(),
    }

  def _read_holder(self) -> dict:
    return _read_lock(self.path)

  def acquire(self) -> None:
    if is_remote(self.path):
      self._by_record = True
      self._acquire_record()
      return
    import fcntl

    for attempt in range(5):
      if attempt:  # a run refused at the same moment removed the (empty) folder with the lock file we opened
        self.path.parent.mkdir(parents=True, exist_ok=True)
      try:
        fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise self._unusable(e) from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise self._in_use() from None
        if e.errno not in NO_FLOCK_ERRNOS:
          raise
        # a filesystem where flock fails (e.g. Lustre mounted noflock): the lock file
        # names its holder, as on object stores
        self.log(f"note: {self.path.parent} does not support file locks; its lock file names this run instead")
        self._by_record = True
        self._acquire_record()
        return
      if _same_file(fd, self.path):  # else we locked a file that was unlinked meanwhile: nobody else sees it
        break
      os.close(fd)
    else:
      raise WorkdirError(f"{self.path} keeps being replaced while this run locks it; is another process removing it?")
    previous = self._read_holder()
    if previous.get("pid") and previous.get("pid") != os.getpid():
      gone = "which does not hold it (a copied workdir?)" if _alive_here(previous) else "which is no longer running"
      self.log(f"note: took over the lock of {self.path.parent} left by {_holder_text(previous)}, {gone}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(self.info).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def _in_use(self) -> WorkdirError:
    return WorkdirError(
      f"{self.path.parent} is in use by {_holder_text(self._read_holder())}; wait "
      "for it to finish, stop it, or use another --workdir"
    )

  def _unusable(self, e: OSError) -> WorkdirError:
    """The lock file cannot be opened for writing: a folder of that name, or another user's lock file in a
    shared folder (then, when that user's run holds it, the holder is named)."""
    if e.errno in (errno.EACCES, errno.EPERM):
      import fcntl

      try:
        fd = os.open(os.fspath(self.path), os.O_RDONLY)
      except OSError:
        fd = None
      if fd is not None:
        try:
          fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
          return self._in_use()
        finally:
          os.close(fd)
      return WorkdirError(
        f"cannot write the lock file {self.path} ({os.strerror(e.errno)}): the workdir belongs to another "
        "user's run; use a --workdir of your own"
      )
    return WorkdirError(f"cannot use {self.path} as the workdir's lock file ({reason(e, 80)}); move it away")

  def _acquire_record(self) -> None:
    held = self._read_holder() if self.path.exists() else {}
    if held.get("pid"):  # an empty lock file (released by a flock holder, or copied) names no holder
      if not (held.get("host") == self.info["host"] and not _alive_here(held)):
        raise WorkdirError(
          f"{self.path.parent} is in use by {_holder_text(held)} (the lock file names its holder); "
          f"if that process is gone, delete {self.path} and re-run, or use another --workdir"
        )
      self.log(
        f"note: took over the lock of {self.path.parent} left by {_holder_text(held)}, which is no longer running"
      )
    self.path.write_text(json.dumps(self.info))

  def release(self, remove: bool = False) -> None:
    """Gives the lock up; its file stays (emptied) unless ``remove`` (a refused run that created it): unlinked
    while still locked, so a process that opened it meanwhile finds it replaced (``_same_file``) and retries."""
    if self._fd is not None:
      import fcntl

      try:
        if remove:
          self.path.unlink()
        else:
          os.ftruncate(self._fd, 0)
      except OSError:
        pass
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    elif self._by_record:
      try:
        held = self._read_holder()
        if held.get("pid") == os.getpid() and held.get("host") == self.info["host"]:
          self.path.unlink()
      except OSError:
        pass

  def __enter__(self) -> Lock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
