"""Checkpoints: the only module that touches orbax.

A checkpoint holds the server state (params, server optimizer state, round, rng; SCAFFOLD: the server
control variate), the config as JSON, the data pipeline state as JSON and, for stateful algorithms,
the per-client state (items ``clients``: ``{"ids", "rows"}`` numpy arrays of the clients ever sampled,
and ``clients_meta``: JSON with their count). Checkpoints of stateless runs (and those written before
client state existed) have no client items. Saves are atomic (orbax writes to a temporary folder and
renames), so an interrupted save never looks like a finished one.
"""

from __future__ import annotations

from fedkd import preemption
from fedkd.errors import UserError, reason

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from typing import Any, TypeVar
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

T = TypeVar("T")


# A restore from a damaged checkpoint fails at its first failed read, while orbax's sibling reads of
# the same step are still in flight on TensorStore threads. Restore reports the failure in one line
# (and :meth:`Checkpointer.restore_latest` falls back to an older step); the orphaned reads then
# report themselves, whenever they finish or are garbage-collected, as asyncio "exception was never
# retrieved" log records, as unraisable ``RuntimeError: Event loop is closed`` tracebacks (a completion
# delivered to the restore's closed event loop) and as "coroutine ... was never awaited" warnings.
# Those reports are dropped -- only after a restore has started in this process, and only when they
# come from orbax / TensorStore or from a closed asyncio loop; everything else passes through. A save that
# fails in orbax's background commit (a full disk) orphans its sibling writes the same way, and reports in
# that thread before the caller learns of the failure: the same reports are dropped while a save is in flight
# (``_saving``: from its start until a wait finds it finished, or for good after it failed).
_orphaned_reads_possible = False
_saving = False


def _dropping() -> bool:
  return _orphaned_reads_possible or _saving


def _from_checkpoint_library(exc: BaseException | None) -> bool:
  """Whether ``exc`` is an orphaned read's report: raised in orbax / TensorStore code, or a completion
  delivered to a closed event loop."""
  if exc is None:
    return False
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  tb = exc.__traceback__
  while tb is not None:
    name = tb.tb_frame.f_code.co_filename
    if f"{os.sep}orbax{os.sep}" in name or f"{os.sep}tensorstore{os.sep}" in name:
      return True
    tb = tb.tb_next
  text = str(exc)  # TensorStore's errors set from C++ carry no Python frame
  return "while reading array index" in text or "tensorstore_spec" in text or "in OCDBT database at" in text


class _OrphanedReadLogs(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (_dropping() and _from_checkpoint_library(exc))


logging.getLogger("asyncio").addFilter(_OrphanedReadLogs())


class _MissingMetadataNotes(logging.Filter):
  """orbax's 'Metadata file does not exist' warning, logged when a step folder lacks its metadata (a
  damaged or half-written checkpoint): fedkd reports such a checkpoint itself, in one line naming the round."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_MissingMetadataNotes())


class _EnvironmentErrorReports(logging.Filter):
  """orbax's error records (each with a traceback) of a save that failed on a full disk or a read-only
  filesystem: the error reaches the caller too, and fedkd reports it in one line (``no space left in ...``)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or not record.exc_info or f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    from fedkd.workdir import environment_oserror

    return environment_oserror(record.exc_info[1]) is None


logging.getLogger("absl").addFilter(_EnvironmentErrorReports())

_previous_unraisable = sys.unraisablehook


def _unraisable(unraisable) -> None:
  if _dropping() and _from_checkpoint_library(getattr(unraisable, "exc_value", None)):
    return
  _previous_unraisable(unraisable)


sys.unraisablehook = _unraisable

_previous_showwarning = warnings.showwarning


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
  if _dropping() and issubclass(category, RuntimeWarning) and "was never awaited" in str(message):
    return
  _previous_showwarning(message, category, filename, lineno, file, line)


warnings.showwarning = _showwarning


@contextlib.contextmanager
def _reading():
  """Marks an orbax read: after one that failed, its orphaned sibling reads' reports are dropped."""
  global _orphaned_reads_possible
  before = _orphaned_reads_possible
  _orphaned_reads_possible = True
  yield  # an exception leaves the mark set: the failed read's siblings may report later
  _orphaned_reads_possible = before


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be used with this run; the message says why and what to do.
  ``reason``: the underlying error in a few words (``Type: first line``), when there is one."""

  def __init__(self, message: str, reason: str | None = None):
    super().__init__(message)
    self.reason = reason


class ResumeRefused(CheckpointError):
  """The checkpoint is intact but belongs to another experiment (config differs): never fall back."""


UNREADABLE = "unreadable"  # <checkpoint directory>/unreadable/<round>-<UTC time>: steps a resume fell back over


def _round_held(state) -> int | None:
  """The round a restored state says it holds (its scalar ``round`` entry), or None where it has none."""
  value = state.get("round") if isinstance(state, dict) else None
  if value is None:
    return None
  shards = getattr(value, "addressable_shards", None)  # a jax.Array, replicated: this process's copy
  held = np.asarray(shards[0].data if shards else value)
  return int(held) if held.ndim == 0 else None


class Checkpointer:
  """``cleanup_tmp``: delete the ``<round>.orbax-checkpoint-tmp`` folders that a save cut short (a kill, a full
  disk) left behind. Only for the run that owns ``directory`` (it holds the workdir's lock): a reader such as
  ``fedkd.eval`` must not delete the folder a running training is writing. ``unreadable``: where steps a resume
  fell back over are set aside (default ``<directory>/unreadable``; outside ``directory`` where its owner deletes
  it once done with it)."""

  def __init__(self, directory: Any, max_to_keep: int = 2, cleanup_tmp: bool = False, unreadable: Any = None):
    directory = os.fspath(directory)
    self.directory = directory if "://" in directory else os.path.abspath(os.path.expanduser(directory))
    self.unreadable = os.fspath(unreadable) if unreadable is not None else os.path.join(self.directory, UNREADABLE)
    # Handlers named up front, so item metadata (which items a checkpoint has, the saved state's
    # keys) can be read before restoring anything.
    self._mngr = ocp.CheckpointManager(
      self.directory,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "clients": ocp.StandardCheckpointHandler(),
        "clients_meta": ocp.JsonCheckpointHandler(),
      },
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=cleanup_tmp),
    )

  def latest_round(self) -> int | None:
    return self._mngr.latest_step()

  def all_rounds(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(
    self, round_: int, state: Any, config: dict, data_state: dict | None = None, client_state: dict | None = None
  ) -> None:
    """Saves the server state, the config, the data pipeline's iterator state (JSON) and, when given,
    the per-client state (``client_state.state_dict()``: ``{"ids": int64 [n], "rows": pytree [n, ...]}``,
    host numpy arrays; in a multi-process run every process passes the same values)."""
    global _saving
    stale = [r for r in self.all_rounds() if r >= round_]
    if stale:  # left by restore_latest's fallback; orbax would skip (not replace) every save up to them
      self._set_aside_stale(stale, round_)
    items = dict(
      state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config), data=ocp.args.JsonSave(data_state or {})
    )
    if client_state is not None:
      n = int(len(client_state["ids"]))
      items["clients_meta"] = ocp.args.JsonSave({"num_rows": n})
      if n:  # orbax cannot write zero-size arrays; no rows = no array item
        items["clients"] = ocp.args.StandardSave(client_state)
    _saving = True  # a background write that fails orphans its siblings (see the top)
    with preemption.completing(), self._disk_errors():
      self._mngr.save(round_, args=ocp.args.Composite(**items))

  def drop_after(self, round_: int) -> list[int]:
    """Removes the steps after ``round_`` and returns their rounds: a replica set resumes from a round every
    replica holds when a stop fell between the replicas' saves of the next one, which is then trained again to the
    same numbers (``fedkd.tasks.replicas``; one process)."""
    from etils import epath

    newer = [r for r in self.all_rounds() if r > round_]
    with self._disk_errors():
      for r in newer:
        (epath.Path(self.directory) / str(r)).rmtree()
      self._mngr.reload()
    return newer

  def _set_aside_stale(self, rounds: list[int], round_: int) -> None:
    """Moves the steps ``rounds`` (at or after ``round_``, which is being saved) into ``self.unreadable``:
    steps a resume fell back over because they could not be read. orbax would otherwise skip every save up to the
    newest of them, leaving the unreadable step in place of the rounds this run trains again. They are moved, not
    deleted: a read can fail for a passing reason (a storage hiccup, memory while restoring), and the step may be
    intact. orbax lists only step-numbered folders, so it neither restores nor garbage-collects them."""
    from etils import epath

    aside = epath.Path(self.unreadable)
    with self._disk_errors():
      if jax.process_index() == 0:
        if aside.exists() and not aside.is_dir():
          from fedkd.workdir import WorkdirError

          raise WorkdirError(
            f"{aside} is a file, but fedkd moves unreadable checkpoints into a folder there; move the file away "
            "and re-run to resume"
          )
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        aside.mkdir(parents=True, exist_ok=True)
        for r in rounds:
          dest, k = aside / f"{r}-{stamp}", 0
          while dest.exists():
            k += 1
            dest = aside / f"{r}-{stamp}-{k}"
          (epath.Path(self.directory) / str(r)).rename(dest)
          print(
            f"note: moved the unreadable checkpoint for round {r} in {self.directory} to {dest} (this run resumed "
            f"from an earlier round and saves round {round_} now; delete it once you no longer need it)",
            file=sys.stderr,
            flush=True,
          )
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fedkd-checkpoint-set-aside")
      self._mngr.reload()

  def _disk_errors(self):
    """Turns a full disk / read-only filesystem during a (possibly async) save into one line; the
    previous checkpoint is untouched (orbax writes into a temporary folder and renames it at the end)."""
    import contextlib

    @contextlib.contextmanager
    def guard():
      try:
        yield
      except Exception as e:  # noqa: BLE001 - orbax wraps the OSError in several types
        from fedkd.workdir import WorkdirError, describe_os_error, environment_oserror

        err = environment_oserror(e)
        if err is None:
          raise
        raise WorkdirError(describe_os_error(err, self.directory)) from None

    return guard()

  def wait(self) -> None:
    global _saving
    with preemption.completing(), self._disk_errors():
      self._mngr.wait_until_finished()
    _saving = False  # finished without an error: no orphaned write can report (after an error it stays set)

  def _json_item(self, round_: int, item: str) -> dict:
    try:
      with _reading():
        value = self._mngr.restore(round_, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
      # valid JSON, but not what fedkd writes there
      why = None if isinstance(value, dict) else f"its {item} record is a JSON {type(value).__name__}, not an object"
    except Exception as e:
      why = reason(e)
    if why is not None:
      raise CheckpointError(
        f"checkpoint for round {round_} in {self.directory} is unreadable ({why}); move it away or use a new --workdir",
        why,
      ) from None
    return dict(value)

  def saved_config(self, round_: int) -> dict:
    """The config JSON stored with the checkpoint of ``round_`` (read without touching the arrays)."""
    return self._json_item(round_, "config")

  def saved_data_state(self, round_: int) -> dict:
    """The data pipeline state stored with the checkpoint of ``round_``."""
    return self._json_item(round_, "data")

  def _metadata(self, round_: int):
    try:
      with _reading():
        return self._mngr.item_metadata(round_)
    except Exception:  # noqa: BLE001 - unreadable metadata: let the restore itself report it
      return None

  def _saved_items(self, round_: int) -> set[str] | None:
    md = self._metadata(round_)
    return None if md is None else set(md.keys())  # the items this checkpoint has

  def _recorded_items(self, round_: int) -> set[str]:
    """The items the save of ``round_`` wrote, as its step metadata records them (empty when unreadable)."""
    try:
      return set(self._mngr.metadata(round_).item_handlers or ())
    except Exception:  # noqa: BLE001 - no or damaged step metadata: nothing recorded
      return set()

  def restore(self, round_: int, like: Any) -> tuple[Any, dict]:
    """Restores the state at ``round_`` into the structure, shapes and shardings of ``like``.

    Top-level keys of the saved state that ``like`` lacks are read and dropped (e.g. SCAFFOLD's
    server ``control`` when only the model is wanted, as in ``fedkd.eval``); keys ``like`` has and
    the checkpoint lacks are an error."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    extra = {}
    md = self._metadata(round_)
    saved = getattr(md["state"], "tree", None) if md is not None and md.get("state") is not None else None
    if isinstance(like, dict) and isinstance(saved, dict) and set(like) < set(saved):
      sharding = next(iter(jax.tree.leaves(abstract))).sharding
      extra = {
        k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved[k])
        for k in set(saved) - set(like)
      }
    state_arg = ocp.args.StandardRestore(dict(abstract, **extra) if extra else abstract)
    try:
      with _reading():
        out = self._mngr.restore(round_, args=ocp.args.Composite(state=state_arg, config=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for mismatched or damaged trees
      why = reason(e, 300)
      raise CheckpointError(
        f"checkpoint for round {round_} in {self.directory} cannot be restored into this run's "
        f"model ({why}); use a new --workdir or the config the checkpoint was written with",
        why,
      ) from None
    state = out["state"]
    if extra:
      state = {k: v for k, v in state.items() if k not in extra}
    held = _round_held(state)
    if held is not None and held != round_:  # e.g. a step folder copied under another number
      why = f"its state is that of round {held}"
      raise CheckpointError(
        f"checkpoint for round {round_} in {self.directory} is unreadable ({why}); move it away or use a new --workdir",
        why,
      )
    return state, dict(out["config"])

  def saved_client_rows(self, round_: int) -> int | None:
    """How many client rows the checkpoint of ``round_`` holds; None when it has no client state
    (a stateless run, or a checkpoint written before client state existed)."""
    items = self._saved_items(round_)
    if items is not None and "clients_meta" not in items:
      if "clients_meta" in self._recorded_items(round_):  # saved, then lost (a step copied in part): damaged
        why = "its clients_meta item is missing"
        raise CheckpointError(
          f"checkpoint for round {round_} in {self.directory} is unreadable ({why}); move it away or use a new "
          "--workdir",
          why,
        )
      return None
    n = self._json_item(round_, "clients_meta").get("num_rows")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:  # a fedkd-written step holds a count
      why = f"its clients_meta record has num_rows={json.dumps(n)[:40]}, not a count of client rows"
      raise CheckpointError(
        f"checkpoint for round {round_} in {self.directory} is unreadable ({why}); move it away or use a new --workdir",
        why,
      )
    return n

  def restore_client_state(self, round_: int, like: dict) -> dict:
    """The per-client state dict of ``round_`` as host numpy arrays, into ``like`` (a state dict of
    ``saved_client_rows(round_)`` rows, e.g. ``store.empty_state_dict(n)``)."""
    n = self.saved_client_rows(round_)
    if n is None:
      raise CheckpointError(
        f"checkpoint for round {round_} in {self.directory} holds no per-client state "
        "(it was written by a stateless algorithm such as fedavg); use a new --workdir "
        "or the config the checkpoint was written with"
      )
    if len(like["ids"]) != n:
      raise ValueError(f"restore target has {len(like['ids'])} rows, the checkpoint {n}")
    if n == 0:
      return like
    try:
      with _reading():
        out = self._mngr.restore(round_, args=ocp.args.Composite(clients=ocp.args.StandardRestore(like)))
    except Exception as e:  # noqa: BLE001
      why = reason(e, 300)
      raise CheckpointError(
        f"per-client state of the checkpoint for round {round_} in {self.directory} cannot be restored "
        f"into this run's model ({why}); use a new --workdir or the config the checkpoint was written "
        "with",
        why,
      ) from None
    return dict(out["clients"])

  def restore_latest(self, load: Callable[[int], T], log: Callable[[str], None] = print) -> tuple[int | None, T | None]:
    """``(round, load(round))`` for the newest round whose ``load`` succeeds; ``(None, None)`` when
    there is no checkpoint.

    ``load(r)`` restores everything the run needs from round ``r``; a :class:`CheckpointError` from
    it means that step is damaged (cut files, unreadable items): the next older step is tried with a
    one-line warning. :class:`ResumeRefused` (another experiment's checkpoint) is raised at once.
    When every step is damaged, the newest step's error is raised."""
    rounds = self.all_rounds()
    first_error = None
    for r in reversed(rounds):
      try:
        out = load(r)
      except ResumeRefused:
        raise
      except CheckpointError as e:
        first_error = first_error or e
        older = [x for x in rounds if x < r]
        if older:  # the underlying error, not the whole message (which ends with advice for the last step)
          log(
            f"warning: the checkpoint for round {r} is damaged ({(e.reason or str(e))[:200]}); "
            f"falling back to round {older[-1]}"
          )
        continue
      return r, out
    if first_error is not None:
      if len(rounds) == 1:
        raise CheckpointError(
          f"{first_error} -- no intact checkpoint is left in {self.directory}; move it away to start the run over",
          first_error.reason,
        ) from None
      listed = ", ".join(str(r) for r in rounds)
      raise CheckpointError(
        f"none of the checkpoints in {self.directory} (rounds {listed}) can be restored into this run: each is "
        f"damaged or from another config (round {rounds[-1]}: {(first_error.reason or str(first_error))[:200]}); "
        "move the folder away to start the run over, or use the config they were written with",
        first_error.reason,
      ) from None
    return None, None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mngr.close()


def config_json(config) -> dict:
  """A JSON-safe dict of a ConfigDict."""
  return json.loads(config.to_json())
