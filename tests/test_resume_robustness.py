"""Resume after the ways real runs end early, each checked against an uninterrupted run's bytes.

Command-line runs (``fedkd.main`` / ``fedkd.eval``, each its own process, forked from a server that
imported them once, so the test has a pid to signal): SIGKILL at seeded random moments (compiling,
mid-round, during a checkpoint write), SIGTERM, Ctrl-C, then damaged newest checkpoints (an array file,
the config item) and a cut last line of metrics.jsonl, in one workdir; every checkpoint damaged.
In-process runs (``fedkd.tasks.fedavg.run``): a full disk while a checkpoint is written (injected:
raised by the save call, and inside orbax's background write), a NaN round after a resume, a resume
with another model. The reference for all of them is one uninterrupted command-line run: every run
has this process's 8 simulated CPU devices and a 1-device mesh, so all compile the same programs and
share one persistent compilation cache (one compile for the whole module).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fedkd.checkpoint import Checkpointer, ResumeRefused
from fedkd.data import pipeline
from fedkd.errors import DivergedError
from fedkd.evaluate import load_run
from fedkd.tasks import fedavg
from fedkd.workdir import WorkdirError

from _fork_server import Proc, Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = "--config=configs/quickstart.py"
ROUNDS = 10
# Sub-second rounds of a 4-channel UNet on 32 px, 2 clients (the data programs of the quickstart's tiny
# sweep, fedkd.sweep.TINY; two UNet levels keep the checkpoint's arrays in the data files that
# _damage_arrays cuts); every round evaluated and checkpointed, the three newest checkpoints kept; one
# device on the clients axis (the same programs in every run).
TINY = [
  "--config.image_size=32",
  "--config.model.depth=2",
  "--config.model.width=4",
  "--config.model.groups=2",
  "--config.num_clients=2",
  "--config.clients_per_round=2",
  "--config.local_steps=1",
  "--config.batch_size=2",
  "--config.eval.examples_per_site=2",
  "--config.eval.every=1",
  "--config.checkpoint.every=1",
  "--config.checkpoint.max_to_keep=3",
  "--config.mesh.client_devices=1",
]
ROUND_LINE = re.compile(r"^round\s+(\d+)/(\d+) ")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """One persistent compilation cache for this module's runs, every program in it (also sub-second
  ones): in this process (later in-process runs load what the first compiled) and in every subprocess
  (JAX_COMPILATION_CACHE_DIR). The suite's cache (tests/conftest.py), where other modules' runs of the
  same tiny config left their programs; a fresh folder without one. Restored after."""
  from jax.experimental.compilation_cache import compilation_cache

  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("xla_cache"))
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()  # decide afresh, also when an earlier module compiled without a cache
  yield cache
  for k, v in old.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def _quiet(_):
  pass


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _rounds_in(metrics_path) -> list[int]:
  return [json.loads(ln)["round"] for ln in open(metrics_path).read().splitlines()]


def _steps(ckdir) -> list[str]:
  """Names in a checkpoints folder: committed rounds and any temporary folder of an unfinished save."""
  return (
    sorted(os.listdir(ckdir), key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    if os.path.isdir(ckdir)
    else []
  )


def _bytes(*path) -> bytes:
  return open(os.path.join(*path), "rb").read()


def _digest(folder) -> dict[str, str]:
  out = {}
  for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
    if os.path.isfile(path):
      out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def _truncate(path, keep: float = 0.5) -> None:
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * keep))


def _damage_arrays(step_dir) -> None:
  """Cuts the largest array data file of the saved state in half (a disk error, a partial copy)."""
  files = [
    p
    for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
    if os.path.isfile(p) and os.path.basename(os.path.dirname(p)) == "d"
  ]
  assert files, os.listdir(os.path.join(step_dir, "state"))
  _truncate(max(files, key=os.path.getsize))


def _damage_config(step_dir) -> None:
  """Cuts the JSON file of the checkpoint's config item in half."""
  path = os.path.join(step_dir, "config", "metadata")
  assert json.load(open(path))["num_rounds"]  # the file this test expects orbax to write
  _truncate(path)


# --------------------------------------------------------------------------------------------
# Command-line runs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(xla_cache):
  """The fork server (tests/_fork_server.py; one per module): env with this module's compilation cache and
  device count."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
  env.update(
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=xla_cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_NUM_CPU_DEVICES=str(jax.device_count()),
  )
  s = Server(env)
  yield s
  s.close()


def _main(server, work, log_dir, *extra) -> Proc:
  return Proc(server, "fedkd.main", [QS, f"--workdir={work}", *TINY, f"--config.num_rounds={ROUNDS}", *extra], log_dir)


def _messages(text: str) -> list[str]:
  """Lines without absl's log lines (orbax logs every save at INFO)."""
  return [ln for ln in text.splitlines() if ln.strip() and not re.match(r"^[IWEF]\d{4} ", ln)]


def _no_traceback(p: Proc):
  assert "Traceback" not in p.stderr + p.stdout, (p.stderr + p.stdout)[-4000:]


def _resumed_from(p: Proc) -> int | None:
  m = re.search(r"^resuming from round (\d+) ", p.stdout, re.M)
  return int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
  """The uninterrupted command-line run of ROUNDS rounds: (workdir, median seconds per round)."""
  work = str(tmp_path_factory.mktemp("cli") / "reference")
  p = _main(server, work, work + "-logs")
  assert p.finish() == 0, p.stderr[-3000:]
  _no_traceback(p)
  t = [ts for ts, ln in p.lines if ROUND_LINE.match(ln)]
  assert len(t) == ROUNDS and _rounds_in(os.path.join(work, "metrics.jsonl")) == list(range(ROUNDS + 1))
  return work, float(statistics.median(np.diff(t[1:])))


def _assert_same_as_reference(work, ref):
  """metrics.jsonl byte for byte (every evaluation once, round 0 once) and every parameter bitwise."""
  got, want = _bytes(work, "metrics.jsonl"), _bytes(ref, "metrics.jsonl")
  assert got == want, [_rounds_in(os.path.join(w, "metrics.jsonl")) for w in (work, ref)]
  assert _rounds_in(os.path.join(work, "metrics.jsonl")).count(0) == 1
  _, _, params, r = load_run(work, None)
  _, _, ref_params, ref_r = load_run(ref, None)
  assert r == ref_r == ROUNDS
  assert _leaves_equal(params, ref_params)


def _warnings(text: str) -> list[str]:
  return [ln for ln in text.splitlines() if ln.startswith("warning: the checkpoint for round")]


def _check_fallback_warnings(text: str, newest: int) -> None:
  """One line per damaged step: the underlying error (``Type: message``) and the round fallen back to."""
  w = _warnings(text)
  assert len(w) == 2, text[-3000:]
  for line, r in zip(w, (newest, newest - 1)):
    assert re.fullmatch(
      rf"warning: the checkpoint for round {r} is damaged \(\w+: .+\); falling back to round "
      rf"{r - 1}",
      line,
    ), w


def test_kill_sigterm_ctrl_c_damage_then_resume_equal_the_uninterrupted_run(reference, server, tmp_path):
  """One workdir, interrupted every way in turn, then run to the end; the end result is the
  uninterrupted run's metrics.jsonl and parameters, bit for bit.

  1. SIGKILL in round 1 (compiling; round 0's evaluation written, no checkpoint yet).
  2. SIGKILL at a seeded random moment after this run's 1st or 2nd finished round (mid-round or while
     its checkpoint is written; a stale lock and maybe a temporary checkpoint folder are left).
  3. SIGTERM after a finished round: exit 0, 'preempted at round N', checkpoint N saved; SIGHUP (the terminal
     closed) the same, exit 129, 'stopped by SIGHUP (a closed terminal) at round N'.
  4. Ctrl-C (SIGINT) after the 2nd finished round: exit 130, 'interrupted at round N', checkpoint N.
  5. The newest checkpoint's array file and the next one's config JSON cut in half, and a cut last
     line appended to metrics.jsonl (an older writer killed mid-line): fedkd.eval falls back two steps
     (exit 0); the last run falls back the same way, drops the cut line with a note, recomputes.
  Each run resumes where the previous one left off (SIGKILL: no older checkpoint lost)."""
  ref, round_s = reference
  rng = random.Random(1234)
  work, logs = str(tmp_path / "w"), str(tmp_path / "logs")
  ckdir = os.path.join(work, "checkpoints")
  # (signal, finished rounds of this process to wait for (0: round 0's evaluation), then sleep this many rounds)
  plan = [
    (signal.SIGKILL, 0, rng.uniform(0, 1.5)),
    (signal.SIGKILL, rng.choice([1, 2]), rng.uniform(0, 1.2)),
    (signal.SIGTERM, 1, 0.0),
    (signal.SIGHUP, 1, 0.0),  # the terminal closed
    (signal.SIGINT, 2, 0.0),
  ]
  resume_at, at_least, lock_left = None, None, False  # what the previous interruption left
  report = []
  for sig, n, delay in plan + [(None, 0, 0.0)]:
    if sig is None:  # 5. damage, then fedkd.eval and the last run
      newest = resume_at
      assert _steps(ckdir) == [str(newest - 2), str(newest - 1), str(newest)], _steps(ckdir)
      _damage_arrays(os.path.join(ckdir, str(newest)))
      _damage_config(os.path.join(ckdir, str(newest - 1)))
      with open(os.path.join(work, "metrics.jsonl"), "a") as f:
        f.write('{"round": 9, "dice')
      ev = Proc(
        server, "fedkd.eval", [f"--workdir={work}", "--examples=2", "--frames=0", f"--out={tmp_path / 'eval'}"], logs
      )
      assert ev.finish() == 0, ev.stderr[-3000:]
      _no_traceback(ev)
      _check_fallback_warnings(ev.stderr, newest)
      assert f"evaluating {work} at round {newest - 2}:" in ev.stdout
      assert json.load(open(tmp_path / "eval" / "eval.json"))["round"] == newest - 2
      resume_at = newest - 2
    p = _main(server, work, logs)
    k = 0
    if sig is not None:
      if n == 0:
        seen = [p.wait_for(lambda ln: ln.startswith("round 0 (untrained)"))]
      else:
        seen = [p.wait_for(lambda ln: bool(ROUND_LINE.match(ln))) for _ in range(n)]
      assert None not in seen, (p.stdout, _messages(p.stderr))
      k = int(ROUND_LINE.match(seen[-1]).group(1)) if n else 0
      time.sleep(delay * round_s)
      p.signal(sig)
    rc = p.finish()
    _no_traceback(p)
    start = _resumed_from(p)
    printed = [int(m.group(1)) for m in (ROUND_LINE.match(ln) for ln in p.stdout.splitlines()) if m]
    if resume_at is not None:
      assert start == resume_at, (start, resume_at, p.stdout[:2000])
    if at_least is not None:
      assert start is not None and start >= at_least, (start, at_least)
    assert ("note: took over the lock of" in p.stderr) == lock_left, _messages(p.stderr)
    assert ("round 0 (untrained)" in p.stdout) == (start is None)
    if sig == signal.SIGKILL:
      assert rc == -signal.SIGKILL
      last = max(printed, default=0)
      # at round r's line, round r-2's checkpoint is committed (each save first waits for the previous)
      resume_at, at_least, lock_left = None, (last - 2 if last >= 3 else None), True
      report.append(f"kill -9 {delay:.2f} rounds after round {k} (last printed {last}): left {_steps(ckdir)}")
    elif sig is not None:
      code, word = {
        signal.SIGTERM: (0, "preempted"),
        signal.SIGHUP: (129, "stopped by SIGHUP (a closed terminal)"),
        signal.SIGINT: (130, "interrupted"),
      }[sig]
      assert k < ROUNDS - 1 and rc == code, (k, rc, _messages(p.stderr))
      stop = [m for m in _messages(p.stderr) if m.startswith("fedkd: ")]
      assert (
        len(stop) == 1
        and stop[0].startswith(f"fedkd: {word} at round ")
        and stop[0].endswith("(checkpoint saved); re-run the same command to resume")
      ), _messages(p.stderr)
      assert (
        f"{signal.Signals(sig).name}: saving this round's checkpoint, then stopping"
        if sig != signal.SIGINT
        else "Ctrl-C: stopping after this round (its checkpoint is saved)"
      ) in p.stderr, _messages(p.stderr)
      # the round that was finishing when the signal landed: k, or later if the test read line k late
      saved = int(stop[0].split(" at round ")[1].split()[0])
      assert k <= saved == max(printed) < ROUNDS and str(saved) in _steps(ckdir), (k, saved, printed, _steps(ckdir))
      resume_at, at_least, lock_left = saved, None, False
      report.append(f"{signal.Signals(sig).name} after round {k}: stopped at {saved}, left {_steps(ckdir)}")
    else:
      assert rc == 0 and max(printed) == ROUNDS, (rc, _messages(p.stderr)[-20:])
      _check_fallback_warnings(p.stdout, resume_at + 2)
      assert f"note: dropped a cut last line of {work}/metrics.jsonl (a write interrupted by a kill)" in p.stdout
  print("\n".join(report))
  _assert_same_as_reference(work, ref)
  # no temporary folder of a killed save left; the two damaged steps the last run fell back over are set aside
  assert _steps(ckdir) == _steps(os.path.join(ref, "checkpoints")) + ["unreadable"]
  aside = sorted(os.listdir(os.path.join(ckdir, "unreadable")))
  assert [n.split("-")[0] for n in aside] == sorted([str(newest - 1), str(newest)]), aside


def test_every_checkpoint_damaged_is_one_error_line(reference, server, tmp_path):
  """No intact step left: a warning per fallback, then one error line (exit 2, no traceback); the
  checkpoints and metrics.jsonl are left as they were."""
  ref, _ = reference
  work = str(tmp_path / "w")
  shutil.copytree(ref, work)
  ckdir = os.path.join(work, "checkpoints")
  assert _steps(ckdir) == ["8", "9", "10"]
  _damage_arrays(os.path.join(ckdir, "10"))
  _damage_config(os.path.join(ckdir, "9"))
  _damage_arrays(os.path.join(ckdir, "8"))
  before = _digest(ckdir), _bytes(work, "metrics.jsonl")
  p = _main(server, work, str(tmp_path / "logs"))
  assert p.finish() == 2, p.stderr[-3000:]
  _no_traceback(p)
  assert len(_warnings(p.stdout)) == 2
  msgs = _messages(p.stderr)
  assert (
    len(msgs) == 1
    and msgs[0].startswith(f"fedkd: error: none of the checkpoints in {ckdir} (rounds 8, 9, 10) can be restored")
    and "round 10: " in msgs[0]
    and msgs[0].endswith("move the folder away to start the run over, or use the config they were written with")
  ), msgs
  assert (_digest(ckdir), _bytes(work, "metrics.jsonl")) == before


# --------------------------------------------------------------------------------------------
# In-process runs: full disk, NaN after a resume, another model
# --------------------------------------------------------------------------------------------


def qs_config(num_rounds: int = ROUNDS):
  """configs/quickstart.py with the TINY overrides, as the command line applies them."""
  spec = importlib.util.spec_from_file_location("_qs_config", os.path.join(ROOT, "configs", "quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for arg in TINY:
    key, value = arg[len("--config.") :].split("=")
    *groups, leaf = key.split(".")
    node = c
    for g in groups:
      node = node[g]
    node[leaf] = type(node[leaf])(value)
  c.num_rounds = num_rounds
  return c


@pytest.fixture(scope="module")
def two_rounds(reference, tmp_path_factory):
  """An in-process run of 2 rounds (checkpoints 1 and 2); its evaluations are the reference's."""
  ref, _ = reference
  work = str(tmp_path_factory.mktemp("inproc") / "two")
  out = fedavg.run(qs_config(2), work, log=_quiet)
  assert _steps(os.path.join(work, "checkpoints")) == ["1", "2"]
  lines = _bytes(ref, "metrics.jsonl").splitlines(keepends=True)
  assert _bytes(work, "metrics.jsonl") == b"".join(lines[:3])
  return work, out["state"]


def _save_fails(monkeypatch, step):
  """ENOSPC from CheckpointManager.save of ``step`` (before anything of it is written)."""
  real = ocp.CheckpointManager.save

  def save(self, s, *args, **kwargs):
    if s == step:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, s, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def _background_write_fails(monkeypatch, step):
  """ENOSPC from the config item's file write in orbax's asynchronous commit (a background thread) of
  ``step``: the save call returns, the error surfaces at the next save or at close."""
  real = ocp.JsonCheckpointHandler._save_fn

  async def _save_fn(self, x, directory):
    if any(part.startswith(f"{step}.orbax-checkpoint-tmp") for part in str(directory).split(os.sep)):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory / self._filename))
    return await real(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", _save_fn)


def test_full_disk_during_a_checkpoint_keeps_the_previous_ones(two_rounds, reference, tmp_path, monkeypatch):
  """ENOSPC while round 3's checkpoint is saved, then (re-run) in the background write of round 4's:
  each time one WorkdirError 'no space left in <checkpoints>', the earlier checkpoints restorable, no
  checkpoint of the failed round; the re-run with space ends equal to the uninterrupted run."""
  work = str(tmp_path / "w")
  shutil.copytree(two_rounds[0], work)
  ckdir = os.path.join(work, "checkpoints")
  for step, inject, kept in ((3, _save_fails, ["1", "2"]), (4, _background_write_fails, ["1", "2", "3"])):
    with monkeypatch.context() as m:
      inject(m, step)
      with pytest.raises(WorkdirError) as e:
        fedavg.run(qs_config(), work, log=_quiet)
    msg = str(e.value)
    assert msg.startswith(f"no space left in {ckdir}; ") and "\n" not in msg, msg
    assert [n for n in _steps(ckdir) if n.isdigit()] == kept, _steps(ckdir)
    for r in kept:
      assert load_run(work, int(r))[3] == int(r)
    assert max(_rounds_in(os.path.join(work, "metrics.jsonl"))) >= step
  # a save cut short for a round this run never saves again (a kill during round 12's save of a longer run)
  orphan = os.path.join(ckdir, "12.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(orphan, "state"))
  Checkpointer(ckdir).all_rounds()  # a reader (fedkd.eval) leaves it: it may be a running save's
  assert os.path.isdir(orphan)
  lines = []
  fedavg.run(qs_config(), work, log=lines.append)
  assert f"resuming from round 3 (checkpoint in {ckdir})" in lines, lines[:5]
  _assert_same_as_reference(work, reference[0])
  assert _steps(ckdir) == ["8", "9", "10"]  # the failed saves' and the orphan's temporary folders are gone


def test_nan_round_after_resume_keeps_the_good_checkpoints(two_rounds, tmp_path, monkeypatch):
  """The 2-round run resumed to 4 rounds where round 3's images are NaN: DivergedError naming round 3,
  checkpoints 1 and 2 untouched and restorable, no metrics record of round 3 or later."""
  src, state2 = two_rounds
  work = str(tmp_path / "w")
  shutil.copytree(src, work)
  ckdir = os.path.join(work, "checkpoints")
  before = _digest(ckdir)
  real = pipeline.SyntheticClients.round_batches

  def round_batches(self, round_, clients, rows=None):
    xs, ys = real(self, round_, clients, rows)
    return (jnp.full_like(xs, jnp.nan) if round_ == 3 else xs), ys

  monkeypatch.setattr(pipeline.SyntheticClients, "round_batches", round_batches)
  lines = []
  with pytest.raises(DivergedError, match=r"^training diverged in round 3: ") as e:
    fedavg.run(qs_config(4), work, log=lines.append)
  assert f"the last good checkpoint (round 2) in {ckdir} is kept" in str(e.value)
  assert f"resuming from round 2 (checkpoint in {ckdir})" in lines
  assert not any(ROUND_LINE.match(ln) for ln in lines)  # round 3 never reported as done
  assert _steps(ckdir) == ["1", "2"] and _digest(ckdir) == before
  for r in (1, 2):
    assert load_run(work, r)[3] == r
  assert _leaves_equal(load_run(work, 2)[2], state2["params"])
  assert _bytes(work, "metrics.jsonl") == _bytes(src, "metrics.jsonl")  # records of rounds 0-2 only


def test_resume_with_another_model_is_refused_without_falling_back(reference, tmp_path):
  """An intact checkpoint of another experiment: refused at once with one message (no 'damaged'
  warnings walking back over every step, no advice to move the checkpoints away); nothing changed."""
  work = str(tmp_path / "w")
  shutil.copytree(reference[0], work)
  before = _digest(os.path.join(work, "checkpoints")), _bytes(work, "metrics.jsonl")
  c = qs_config()
  c.model.width = 8
  lines = []
  with pytest.raises(ResumeRefused, match=r"was written with config\.model\.width=4 but this run has 8") as e:
    fedavg.run(c, work, log=lines.append)
  assert "no intact checkpoint" not in str(e.value)
  assert not any("damaged" in ln for ln in lines), lines
  assert (_digest(os.path.join(work, "checkpoints")), _bytes(work, "metrics.jsonl")) == before


@pytest.mark.parametrize("after_restore", [False, True])
def test_orphaned_read_filters_are_narrow(caplog, monkeypatch, after_restore):
  """The asyncio-log and unraisable filters of fedkd.checkpoint drop an orphaned read's report (an
  orbax read error, a completion delivered to a closed loop) only once a restore has started in this
  process, and pass every other report on."""
  import asyncio
  import logging
  import types

  import fedkd.checkpoint as ck

  monkeypatch.setattr(ck, "_orphaned_reads_possible", after_restore)
  seen = []
  monkeypatch.setattr(ck, "_previous_unraisable", seen.append)
  errors = [
    Exception("Encountered error while reading array index: (slice(0, 3, 1),)"),
    RuntimeError("Event loop is closed"),
    RuntimeError("something else broke"),
  ]
  loop = asyncio.new_event_loop()
  try:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
      for e in errors:
        loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": e})
        ck._unraisable(types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=None, object=None))
  finally:
    loop.close()
  logged = [str(r.exc_info[1]) for r in caplog.records if r.name == "asyncio" and r.exc_info]
  passed = [str(u.exc_value) for u in seen]
  expected = ["something else broke"] if after_restore else [str(e) for e in errors]
  assert logged == expected
  assert passed == expected


# --------------------------------------------------------------------------------------------
# Orphaned reads of a damaged checkpoint stay quiet
# --------------------------------------------------------------------------------------------

# Saves a 30-array state, cuts every data file in half and restores it N times. Each restore fails
# at its first failed read while orbax's sibling reads are still in flight; those report themselves
# later (asyncio "exception was never retrieved", unraisable "Event loop is closed" from TensorStore
# threads). ``quiet=0`` puts Python's default hooks back first: the control that shows the scenario
# really produces those reports. After the restores an unrelated object fails in ``__del__``: its
# report must still come through.
_ORPHANS = r"""
import glob, logging, os, sys, time
import jax, jax.numpy as jnp
from fedkd import checkpoint
quiet = sys.argv[2] == "1"
if not quiet:
  sys.unraisablehook = sys.__unraisablehook__
  logging.getLogger("asyncio").filters.clear()
d = sys.argv[1]
c = checkpoint.Checkpointer(d, max_to_keep=3)
state = {f"w{i}": jnp.arange(4000.0 * (i + 1)).reshape(-1, 8) for i in range(30)}
c.save(1, state, {"num_rounds": 1})
c.wait()
for f in glob.glob(os.path.join(d, "1", "state", "d", "*")):
  open(f, "r+b").truncate(os.path.getsize(f) // 2)
failed = 0
for k in range(8):
  try:
    c.restore(1, state)
  except checkpoint.CheckpointError:
    failed += 1
  time.sleep(0.01 * (k % 3))
class Unrelated:
  def __del__(self):
    raise RuntimeError("unrelated failure in __del__")
Unrelated()
time.sleep(0.5)
print("failed", failed)
"""


@pytest.mark.parametrize("quiet", [0, 1])
def test_damaged_restore_orphaned_reads(tmp_path, quiet):
  """A failed restore's in-flight sibling reads print nothing; other unraisable errors still do."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  noise = ("Event loop is closed", "never retrieved", "tensorstore_spec")
  # The control (quiet=0) needs an orphaned read still in flight when a restore fails, a race that a
  # loaded machine can lose: it gets up to three tries to show the reports at least once.
  for attempt in range(1 if quiet else 3):
    p = subprocess.run(
      [sys.executable, "-c", _ORPHANS, str(tmp_path / f"ck{attempt}"), str(quiet)],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "failed 8" in p.stdout
    err = "\n".join(_messages(p.stderr))
    assert "unrelated failure in __del__" in err
    if any(n in err for n in noise):
      break
  if quiet:
    assert not any(n in err for n in noise), err[-3000:]
    assert err.count("Traceback") == 1, err[-3000:]  # the unrelated one
  else:
    assert any(n in err for n in noise), err[-3000:]


def test_a_stop_asked_for_while_resuming_trains_no_round(two_rounds, tmp_path):
  """SIGTERM/Ctrl-C during the restore and set-up of a resumed run: it stops at the round it resumed
  from (saved already) instead of training one more round first, which a spot VM's notice may not outlast."""
  from fedkd.preemption import Stopped

  class Asked:
    reason = "preempted"

    def requested(self, step):
      return True

  work = str(tmp_path / "w")
  shutil.copytree(two_rounds[0], work)
  ckdir = os.path.join(work, "checkpoints")
  before = _digest(ckdir)
  with pytest.raises(Stopped) as e:
    fedavg.run(qs_config(4), work, log=_quiet, stop=Asked())
  assert (e.value.round, e.value.reason, e.value.exit_code) == (2, "preempted", 0)
  assert _digest(ckdir) == before and _rounds_in(os.path.join(work, "metrics.jsonl")) == [0, 1, 2]
