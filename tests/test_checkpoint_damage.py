"""Checkpoints on a disk that fills up inside TensorStore's array write, and a checkpoint step copied in part:
a full disk is one WorkdirError line and keeps the saved rounds; a step that lost an item it was saved with is
damaged (the resume falls back to the previous round), not another experiment's."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import types

import jax.numpy as jnp
import numpy as np
import pytest

import fedkd.checkpoint as ck_lib
from fedkd import workdir as wd
from fedkd.checkpoint import CheckpointError, Checkpointer


def _tensorstore_error(directory: str, code: int, text: str) -> ValueError:
  """The error TensorStore raises when a system call of its file driver fails, as it read on a full tmpfs
  (``code`` 28, ``text`` 'No space left on device'): a ValueError, not an OSError."""
  ocdbt = f"{directory}/2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/"
  return ValueError(
    f'RESOURCE_EXHAUSTED: Error writing "params.w/0.0" in OCDBT database at local file "{ocdbt}": Failed writing: '
    f'"{ocdbt}d/846230f8b2c4288ec0e3fdb4a79bea89": Failed to write 220 bytes to file 4: {text} '
    f"[os_error_code='{code}']"
  )


@pytest.mark.parametrize(
  ("code", "name", "advice"),
  [
    (errno.ENOSPC, "No space left on device", "free some space"),
    (errno.EROFS, "Read-only file system", "use a writable --workdir"),
    (errno.EFBIG, "File too large", "raise the limit"),  # `ulimit -f` (RLIMIT_FSIZE): was a traceback, exit 1
  ],
)
def test_a_tensorstore_full_disk_or_read_only_error_is_an_environment_error(code, name, advice):
  e = _tensorstore_error("/data/run/checkpoints", code, name)
  try:  # wrapped as orbax wraps it in its background commit
    raise RuntimeError("Save Finalize thread (save_finalize) failed.") from e
  except RuntimeError as wrapped:
    err = wd.environment_oserror(wrapped)
  assert isinstance(err, OSError) and err.errno == code and err.strerror == name
  assert err.filename == "/data/run/checkpoints"  # the folder holding orbax's temporary one
  line = wd.describe_os_error(err, err.filename)
  assert line.startswith("no space left in /data/run/checkpoints" if code == errno.ENOSPC else "cannot write to ")
  assert advice in line and "\n" not in line
  other = _tensorstore_error("/data", errno.ENOENT, "No such file or directory")  # not the environment's fault
  assert wd.environment_oserror(other) is None
  assert wd.environment_oserror(ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 62.7GiB")) is None


def test_a_full_disk_in_the_array_write_is_one_line_and_keeps_the_saved_round(tmp_path, caplog, monkeypatch):
  """ENOSPC inside TensorStore's write of round 2's arrays (orbax's background commit): WorkdirError 'no space
  left in <checkpoints>', no error record with a traceback, round 1 restores bitwise; a completion delivered to
  the failed write's closed event loop afterwards is dropped, an unrelated unraisable error still reported."""
  from orbax.checkpoint._src.serialization import serialization

  ckdir = str(tmp_path / "checkpoints")
  monkeypatch.setattr(ck_lib, "_orphaned_reads_possible", False)
  monkeypatch.setattr(ck_lib, "_saving", False)
  ck = Checkpointer(ckdir, max_to_keep=3)
  state1 = {"params": {"w": jnp.arange(12.0).reshape(3, 4)}, "round": jnp.int32(1)}
  ck.save(1, state1, {"seed": 0})
  ck.wait()
  real = serialization.async_serialize_from_host

  async def full_disk(*args, **kwargs):
    raise _tensorstore_error(ckdir, errno.ENOSPC, "No space left on device")

  caplog.set_level(logging.INFO)
  monkeypatch.setattr(serialization, "async_serialize_from_host", full_disk)
  with pytest.raises(wd.WorkdirError) as e:
    ck.save(2, {"params": {"w": state1["params"]["w"] + 1}, "round": jnp.int32(2)}, {"seed": 0})
    ck.close()
  monkeypatch.setattr(serialization, "async_serialize_from_host", real)
  assert str(e.value).startswith(f"no space left in {ckdir}; ") and "\n" not in str(e.value)
  tracebacks = [r for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR]
  assert not tracebacks, [r.getMessage()[:200] for r in tracebacks]

  reported = []
  monkeypatch.setattr(ck_lib, "_previous_unraisable", reported.append)
  for exc in (RuntimeError("Event loop is closed"), RuntimeError("unrelated failure")):
    ck_lib._unraisable(types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None, object=None))
  assert [str(u.exc_value) for u in reported] == ["unrelated failure"]

  again = Checkpointer(ckdir)
  assert again.all_rounds() == [1]
  restored, cfg = again.restore(1, state1)
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(12.0).reshape(3, 4))
  assert cfg == {"seed": 0}
  again.close()


def test_reports_are_dropped_only_while_a_save_is_in_flight(tmp_path, monkeypatch):
  """The drop of orphaned writes' reports (above) once stayed on for the rest of the process after the first
  save: every later 'coroutine ... was never awaited' warning and 'Event loop is closed' error of any code
  was hidden. A save that finished (a wait found it done) leaves them reported again."""
  monkeypatch.setattr(ck_lib, "_orphaned_reads_possible", False)
  monkeypatch.setattr(ck_lib, "_saving", False, raising=False)
  shown, reported = [], []
  monkeypatch.setattr(ck_lib, "_previous_showwarning", lambda message, *a, **k: shown.append(str(message)))
  monkeypatch.setattr(ck_lib, "_previous_unraisable", lambda u: reported.append(str(u.exc_value)))

  def report(tag):
    ck_lib._showwarning(RuntimeWarning(f"coroutine '{tag}' was never awaited"), RuntimeWarning, "x.py", 1)
    exc = RuntimeError("Event loop is closed")
    ck_lib._unraisable(types.SimpleNamespace(exc_type=RuntimeError, exc_value=exc, exc_traceback=None, object=None))

  ck = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2)
  ck.save(1, {"w": jnp.zeros(3)}, {"seed": 0})
  report("during")  # the save may still be writing: dropped
  ck.wait()
  report("after")
  ck.close()
  assert shown == ["coroutine 'after' was never awaited"] and reported == ["Event loop is closed"]


def test_a_step_that_lost_its_client_state_record_is_damaged_and_falls_back(tmp_path):
  """A step copied in part (its clients_meta folder missing, though its step metadata records the item) is a
  damaged step: restore_latest falls back to the previous round with a warning. A step saved without client
  state (a stateless run) still reads as having none."""
  ckdir = str(tmp_path / "checkpoints")
  ck = Checkpointer(ckdir, max_to_keep=5)
  state = {"params": jnp.arange(3.0)}
  rows = {r: {"ids": np.array([1, 3]), "rows": {"c": np.full((2, 3), float(r), np.float32)}} for r in (1, 2)}
  for r in (1, 2):
    ck.save(r, state, {"seed": 0}, client_state=rows[r])
  ck.save(3, state, {"seed": 0})  # no client state
  ck.close()
  shutil.rmtree(os.path.join(ckdir, "2", "clients_meta"))

  ck = Checkpointer(ckdir, max_to_keep=5)
  assert ck.saved_client_rows(3) is None and ck.saved_client_rows(1) == 2
  with pytest.raises(CheckpointError, match=r"round 2 .* is unreadable \(its clients_meta item is missing\)"):
    ck.saved_client_rows(2)

  def load(r):  # what a stateful run needs of a round
    n = ck.saved_client_rows(r)
    if n is None:
      raise ck_lib.ResumeRefused(f"round {r} holds no per-client state")
    like = {"ids": np.zeros(n, np.int64), "rows": {"c": np.zeros((n, 3), np.float32)}}
    return ck.restore_client_state(r, like)

  ck.save(4, state, {"seed": 0}, client_state=rows[2])  # newest intact: read first
  ck.wait()
  log = []
  r, got = ck.restore_latest(load, log.append)
  assert r == 4 and not log
  np.testing.assert_array_equal(got["rows"]["c"], np.full((2, 3), 2.0, np.float32))
  ck.close()
  shutil.rmtree(os.path.join(ckdir, "4"))
  shutil.rmtree(os.path.join(ckdir, "3"))
  ck = Checkpointer(ckdir, max_to_keep=5)
  r, got = ck.restore_latest(load, log.append)
  assert r == 1, log
  assert log == [
    "warning: the checkpoint for round 2 is damaged (its clients_meta item is missing); falling back to round 1"
  ]
  np.testing.assert_array_equal(got["ids"], [1, 3])
  np.testing.assert_array_equal(got["rows"]["c"], np.full((2, 3), 1.0, np.float32))
  ck.close()


@pytest.mark.parametrize("meta", [{"num_rows": "abc"}, {}, {"num_rows": -1}, {"num_rows": 2.0}, {"num_rows": True}])
def test_a_step_whose_client_state_record_was_edited_is_damaged_and_falls_back(tmp_path, meta):
  """A clients_meta record that is not a count of rows (edited by hand, or damaged) raised ValueError / KeyError
  with a traceback; it is a damaged step, so restore_latest falls back to the previous round."""
  import json

  ckdir = str(tmp_path / "checkpoints")
  ck = Checkpointer(ckdir, max_to_keep=5)
  state = {"params": jnp.arange(3.0)}
  for r in (1, 2):
    ck.save(r, state, {"seed": 0}, client_state={"ids": np.array([1, 3]), "rows": {"c": np.full((2, 3), r * 1.0)}})
  ck.close()
  with open(os.path.join(ckdir, "2", "clients_meta", "metadata"), "w") as f:
    json.dump(meta, f)
  ck = Checkpointer(ckdir, max_to_keep=5)
  with pytest.raises(CheckpointError, match=r"round 2 .* is unreadable \(its clients_meta record has num_rows="):
    ck.saved_client_rows(2)
  log = []
  r, n = ck.restore_latest(ck.saved_client_rows, log.append)
  assert (r, n) == (1, 2) and len(log) == 1 and "falling back to round 1" in log[0], log
  ck.close()


def test_a_step_folder_under_another_rounds_number_is_damaged_and_falls_back(tmp_path):
  """A step folder copied or renamed to another number (checkpoints/1 copied to checkpoints/3) was resumed as
  round 3 with round 1's state, silently (fedkd.eval reported round 3 for it too): the state's own round must be
  the folder's."""
  ckdir = str(tmp_path / "checkpoints")
  ck = Checkpointer(ckdir, max_to_keep=5)
  states = {r: {"params": jnp.full((3,), float(r)), "round": jnp.int32(r)} for r in (1, 2)}
  for r, state in states.items():
    ck.save(r, state, {"seed": 0})
  ck.close()
  shutil.copytree(os.path.join(ckdir, "1"), os.path.join(ckdir, "3"))
  ck = Checkpointer(ckdir, max_to_keep=5)
  like = {"params": jnp.zeros(3), "round": jnp.int32(0)}
  with pytest.raises(CheckpointError, match=r"round 3 .* is unreadable \(its state is that of round 1\)"):
    ck.restore(3, like)
  log = []
  r, (got, _) = ck.restore_latest(lambda r: ck.restore(r, like), log.append)
  assert r == 2 and log == [
    "warning: the checkpoint for round 3 is damaged (its state is that of round 1); falling back to round 2"
  ], log
  np.testing.assert_array_equal(got["params"], [2.0, 2.0, 2.0])
  # saving round 3 again sets the unreadable step aside, into checkpoints/unreadable: a file there was a
  # FileExistsError traceback
  with open(os.path.join(ckdir, "unreadable"), "w") as f:
    f.write("mine")
  with pytest.raises(wd.WorkdirError, match=r"unreadable is a file, but fedkd moves unreadable checkpoints"):
    ck.save(3, {"params": jnp.full((3,), 3.0), "round": jnp.int32(3)}, {"seed": 0})
  assert open(os.path.join(ckdir, "unreadable")).read() == "mine" and os.path.isdir(os.path.join(ckdir, "3"))
  os.remove(os.path.join(ckdir, "unreadable"))
  ck.save(3, {"params": jnp.full((3,), 3.0), "round": jnp.int32(3)}, {"seed": 0})
  ck.close()
  (aside,) = os.listdir(os.path.join(ckdir, "unreadable"))
  assert aside.startswith("3-"), aside
  ck = Checkpointer(ckdir, max_to_keep=5)
  np.testing.assert_array_equal(ck.restore(3, like)[0]["params"], [3.0, 3.0, 3.0])
  ck.close()
