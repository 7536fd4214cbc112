"""fedkd command line: ``python -m fedkd.main --config=configs/quickstart.py --workdir=runs/qs``.

Config values are overridden with ``--config.KEY=VALUE`` (e.g. ``--config.num_clients=64``);
``--helpfull`` lists every key with its default. A bad config, checkpoint, dataset, workdir or flag ends
with one line on stderr naming the problem and a fix (exit 2). Re-running with the same --workdir
resumes from its newest intact checkpoint. SIGTERM (preemption) or Ctrl-C stops at the end of the
current round after saving it (exit 0 / 130). A second process on the same workdir is refused.
"""

from __future__ import annotations

import sys

from absl import flags

from fedkd import cli, distributed

_COORD = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 for a multi-process run (with --num_processes, --process_id)."
)
_NPROC = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Simulate this many CPU devices (CPU runs only).")
_SEEDS = flags.DEFINE_string(
  "seeds",
  None,
  "Comma list of seeds, e.g. 0,1,2: the config once per seed as replicas of ONE compiled program "
  "(fedkd.tasks.replicas), each into --workdir/seed-<s> (or --replica_workdirs).",
)
_REPLICA_WORKDIRS = flags.DEFINE_string(
  "replica_workdirs", None, "With --seeds: comma list of workdirs, one per seed (default --workdir/seed-<s>)."
)

TASKS = ("fedavg", "fedefm")


def main(argv: list[str]) -> None:
  del argv
  from fedkd.config import ConfigError
  from fedkd.preemption import StopSignals
  from fedkd.errors import USER_ERRORS
  from fedkd.workdir import Lock, as_path, is_remote, prepare, remove_if_empty

  config = cli.CONFIG.value
  if not cli.WORKDIR.value:
    cli.fail("--workdir is required, e.g. --workdir=runs/quickstart")
  if config.get("task") not in TASKS:
    raise ConfigError(f"config.task={config.get('task')!r} is not a known task; use one of {', '.join(TASKS)}")
  if _CPU_DEVICES.value is not None and _CPU_DEVICES.value < 1:
    cli.fail(f"--cpu_devices={_CPU_DEVICES.value} must be >= 1")
  try:
    distributed.maybe_initialize(_COORD.value, _NPROC.value, _PID.value, _CPU_DEVICES.value)
  except ValueError as e:
    cli.fail(str(e))
  import jax

  if config.task == "fedavg":  # every setting checked before anything is written
    from fedkd.config import validate

    validate(config, jax.device_count())
  else:
    from fedkd.tasks.fedefm import validate as validate_fedefm

    validate_fedefm(config)
  if _SEEDS.value is not None or _REPLICA_WORKDIRS.value is not None:
    _run_replicas(config)
    return
  existed = as_path(cli.WORKDIR.value).exists() if not is_remote(cli.WORKDIR.value) else True
  workdir = prepare(cli.WORKDIR.value)
  primary = jax.process_index() == 0
  lock = Lock(workdir) if primary else None  # one run per workdir; the processes of a run share it
  if lock is not None:
    lock.acquire()
  try:
    with StopSignals() as stop:
      if config.task == "fedavg":
        from fedkd.tasks import fedavg

        fedavg.run(config, workdir, stop=stop)
      else:
        from fedkd.tasks import fedefm

        fedefm.run(config, workdir, stop=stop)
  except USER_ERRORS:
    if lock is not None:
      lock.release()
      lock = None
    if not existed and primary:  # a run refused before it wrote anything leaves no folder behind
      remove_if_empty(workdir)
    raise
  finally:
    if lock is not None:
      lock.release()
  sys.stdout.flush()


def _run_replicas(config) -> None:
  """--seeds: the config once per seed, as replicas of one program (fedkd.tasks.replicas)."""
  import os

  from fedkd.preemption import StopSignals
  from fedkd.tasks import replicas
  from fedkd.workdir import Lock, prepare

  if _SEEDS.value is None:
    cli.fail("--replica_workdirs needs --seeds (one workdir per seed)")
  try:
    seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
  except ValueError:
    cli.fail(f"--seeds={_SEEDS.value!r} must be a comma list of integers, e.g. --seeds=0,1,2")
  workdirs = (
    [w for w in _REPLICA_WORKDIRS.value.split(",") if w]
    if _REPLICA_WORKDIRS.value
    else [os.path.join(cli.WORKDIR.value, f"seed-{s}") for s in seeds]
  )
  if len(workdirs) != len(seeds):
    cli.fail(f"--replica_workdirs names {len(workdirs)} workdirs for {len(seeds)} seeds; give one per seed")
  configs = []
  for s in seeds:
    c = config.copy_and_resolve_references()
    c.seed = s
    configs.append(c)
  reason = replicas.why_not(configs)
  if reason is not None:
    cli.fail(
      f"--seeds={_SEEDS.value}: these runs cannot be replicas of one program: {reason}; use launch.sweep --seeds"
    )
  locks = [Lock(prepare(w)) for w in workdirs]
  taken = []
  try:
    for lock in locks:
      lock.acquire()
      taken.append(lock)
    with StopSignals() as stop:
      replicas.run(configs, workdirs, stop=stop)
  finally:
    for lock in taken:
      lock.release()
  sys.stdout.flush()


def run(argv: list[str] | None = None) -> None:
  cli.run_app(main, argv, usage=__doc__)


if __name__ == "__main__":
  run()
