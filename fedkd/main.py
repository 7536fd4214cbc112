"""fedkd command line: ``python -m fedkd.main --config=configs/quickstart.py --workdir=runs/qs``.

Config values are overridden with ``--config.KEY=VALUE`` (e.g. ``--config.num_clients=64``);
``--helpfull`` lists every key with its default. A bad config, checkpoint, dataset, workdir or flag ends
with one line on stderr naming the problem and a fix (exit 2). Re-running with the same --workdir
resumes from its newest intact checkpoint. SIGTERM (preemption) or Ctrl-C stops at the end of the
current round after saving it (exit 0 / 130). A second process on the same workdir is refused.
"""

from __future__ import annotations

import contextlib
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
_REPLICA_CONFIG = flags.DEFINE_multi_string(
  "replica_config",
  [],
  "KEY=V1,V2,...: one value per replica of a learning rate, FedProx's mu or a DP setting "
  "(client_optimizer.learning_rate, server_optimizer.learning_rate, algorithm.prox_mu, dp.noise_multiplier, "
  "dp.clip_norm), zipped with --seeds (a single value serves every "
  "replica); e.g. --seeds=0 --replica_config=client_optimizer.learning_rate=0.01,0.03,0.1 is a 3-point "
  "grid in one program. Workdirs: --workdir/<the keys that vary, as key-value joined by __> (e.g. "
  "client_optimizer.learning_rate-0.01, or client_optimizer.learning_rate-0.01__seed-1 when seeds vary too; or "
  "--replica_workdirs). FedEFM "
  "(config.task=fedefm): fedefm.beta, fedefm.temperature, pretrain.learning_rate, "
  "pretrain.expert_learning_rate or pretrain.weight_decay; the experiments run one after another in one "
  "process and share each method's compiled pretraining round.",
)
_REPLICA_WORKDIRS = flags.DEFINE_string(
  "replica_workdirs", None, "With --seeds / --replica_config: comma list of workdirs, one per replica."
)

TASKS = ("fedavg", "fedefm")


def main(argv: list[str]) -> None:
  del argv
  from fedkd.config import ConfigError
  from fedkd.preemption import StopSignals

  config = cli.CONFIG.value
  if not cli.WORKDIR.value and not _REPLICA_WORKDIRS.value:  # replicas may name their workdirs instead
    cli.fail("--workdir is required, e.g. --workdir=runs/quickstart")
  if config.get("task") not in TASKS:
    raise ConfigError(f"config.task={config.get('task')!r} is not a known task; use one of {', '.join(TASKS)}")
  from fedkd.config import host_memory

  try:  # before any JAX computation: process-wide
    distributed.maybe_initialize(
      _COORD.value, _NPROC.value, _PID.value, _CPU_DEVICES.value, host_memory=host_memory(config)
    )
  except ValueError as e:
    cli.fail(str(e))
  import jax

  # first: a process whose config differs (even one its checks would refuse) is named, not waited for
  distributed.check_same_config(config.to_json_best_effort(sort_keys=True))
  if config.task == "fedavg":  # every setting checked before anything is written
    from fedkd.config import validate

    validate(config, jax.device_count(), jax.process_count())
  else:
    if jax.process_count() > 1:  # its silos, results and files are one process's
      cli.fail(
        f"a FedEFM experiment runs in one process (this is one of {jax.process_count()}): start it without "
        "--coordinator_address / --num_processes / --process_id (or a multi-process launcher); its silos use "
        "the devices of that process"
      )
    from fedkd.tasks.fedefm import validate as validate_fedefm

    validate_fedefm(config)
  if _SEEDS.value is not None or _REPLICA_CONFIG.value or _REPLICA_WORKDIRS.value is not None:
    _run_replicas(config)
    return
  primary = jax.process_index() == 0
  # one run per workdir; the processes of a run share it (the primary holds the lock)
  with _claimed([cli.WORKDIR.value], config.task, lock=primary) as (workdir,), StopSignals() as stop:
    if jax.process_count() > 1:
      distributed.check_same_workdir(workdir)
    if config.task == "fedavg":
      from fedkd.tasks import fedavg

      fedavg.run(config, workdir, stop=stop)
    else:
      from fedkd.tasks import fedefm

      fedefm.run(config, workdir, stop=stop)
  sys.stdout.flush()


@contextlib.contextmanager
def _claimed(workdirs: list[str], task: str, lock: bool = True, parent: str | None = None):
  """The workdirs prepared and locked (``lock``) for the body, each refused if it holds another task's
  run. ``parent``: the folder of replica workdirs (refused where it holds a run itself). A user error in the
  body releases them and removes those this call created if they are still empty (a refused run leaves no
  folder behind)."""
  from fedkd.errors import USER_ERRORS
  from fedkd.workdir import (
    LOCK_NAME,
    Lock,
    as_path,
    check_not_a_sweep,
    check_replica_parent,
    check_run_folder,
    check_task,
    is_remote,
    prepare,
    remove_if_empty,
  )

  existed = [is_remote(w) or as_path(w).exists() for w in workdirs]
  parents = {as_path(w).parent for w, was in zip(workdirs, existed) if not was}  # replicas: --workdir itself
  parents = {p for p in parents if not p.exists()}
  paths = [prepare(w) for w in workdirs]
  # a refused run removes the local lock files it made (a gs:// lock file names its holder: released by removal)
  had_lock = [is_remote(p) or (p / LOCK_NAME).exists() for p in paths]
  taken = []
  try:
    if parent is not None and (is_remote(parent) or as_path(parent).exists()):
      check_replica_parent(as_path(parent))
    for p in paths:  # before the lock, which would leave its file there
      check_not_a_sweep(p)
      check_run_folder(p)
    if lock:
      for p in paths:
        held = Lock(p)
        held.acquire()
        taken.append(held)
    for p in paths:
      check_task(p, task)
    yield paths
  except USER_ERRORS:
    for held, had in zip(taken, had_lock):
      held.release(remove=not had)
    taken = []
    for p, was in zip(paths, existed):  # (every process: one that is not the primary made its own on a local disk)
      if not was:
        remove_if_empty(p)
    for p in parents:
      remove_if_empty(p)
    raise
  finally:
    for held in taken:
      held.release()


def _run_replicas(config) -> None:
  """--seeds / --replica_config: the config once per replica, as one program (fedkd.tasks.replicas)."""
  import os

  from fedkd.preemption import StopSignals
  from fedkd.config import value_at
  from fedkd.sweep import SweepError, apply_overrides, parse_value, run_names
  from fedkd.tasks import replicas

  import jax

  if jax.process_count() > 1:  # before any workdir is made (fedkd.tasks.replicas refuses it too)
    cli.fail("replicas run in one process; start a multi-process run once per seed, without --seeds / --replica_*")
  fedefm = config.task == "fedefm"
  allowed = [k for k in replicas.replica_keys(config) if k != "seed"]  # the seed comes from --seeds
  lists = {}
  if _SEEDS.value is not None and fedefm:
    cli.fail(
      f"--seeds={_SEEDS.value}: a FedEFM experiment runs its seeds in one process already; "
      f"set --config.experiment.seeds={_SEEDS.value} instead"
    )
  if _SEEDS.value is not None and "seed" in cli.OVERRIDDEN:  # one of the two would be dropped without a word
    cli.fail(f"--seeds={_SEEDS.value} and --config.seed both set the seed; give the seeds with --seeds only")
  if _SEEDS.value is not None:
    try:
      lists["seed"] = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
    except ValueError:
      cli.fail(f"--seeds={_SEEDS.value!r} must be a comma list of integers, e.g. --seeds=0,1,2")
  for spec in _REPLICA_CONFIG.value:
    key, _, text = spec.partition("=")
    if key in cli.OVERRIDDEN:
      cli.fail(f"--replica_config={spec} and --config.{key} both set {key}; give its values with --replica_config only")
    if key in lists:  # a second flag for the key would silently replace the first one's values
      cli.fail(
        f"--replica_config={spec}: {key} is given twice; give all its values in one --replica_config={key}=V1,V2"
      )
    if key not in allowed:
      cli.fail(
        f"--replica_config={spec}: replicas of one {config.task} program may differ in {', '.join(allowed)}"
        + ("" if fedefm else " (and the seed, with --seeds)")
        + "; run other settings with launch.sweep"
      )
    try:
      lists[key] = [parse_value(v.strip(), value_at(config, key)) for v in text.split(",") if v.strip()]
    except (ValueError, SweepError) as e:
      cli.fail(f"--replica_config={spec}: {e}; write KEY=V1,V2,... with numbers")
  if not lists:
    cli.fail("--replica_workdirs needs --seeds or --replica_config (one workdir per replica)")
  n = max(len(v) for v in lists.values())
  bad = {k: len(v) for k, v in lists.items() if len(v) not in (1, n)}
  if bad or n == 0:
    cli.fail(
      "--seeds / --replica_config give "
      + ", ".join(f"{len(v)} value(s) of {k}" for k, v in lists.items())
      + "; give each one value per replica (or one value for all of them)"
    )
  overrides = [{k: (v[0] if len(v) == 1 else v[i]) for k, v in lists.items()} for i in range(n)]
  if n < 2:
    cli.fail(
      f"--seeds / --replica_config give one run ({overrides[0]}); give two or more values, or run it without "
      "them (--config.KEY=VALUE)"
    )
  for i, o in enumerate(overrides):
    if o in overrides[:i]:
      cli.fail(
        f"--seeds / --replica_config: replicas {overrides.index(o)} and {i} are the same run ({o}); give each "
        "replica different values"
      )
  if _REPLICA_WORKDIRS.value:
    workdirs = [w for w in _REPLICA_WORKDIRS.value.split(",") if w]
  else:
    shown = [{k: v for k, v in o.items() if len(lists[k]) > 1} for o in overrides]
    workdirs = [os.path.join(cli.WORKDIR.value, name) for name in run_names(shown)]
  if len(workdirs) != n:
    cli.fail(f"--replica_workdirs names {len(workdirs)} workdirs for {n} replicas; give one per replica")
  same = replicas.shared_workdir(workdirs)
  if same is not None:
    cli.fail(f"--replica_workdirs names {workdirs[same[1]]} twice; give each replica its own workdir")
  configs = [apply_overrides(config, o, where="--seeds / --replica_config") for o in overrides]
  reason = replicas.why_not(configs)
  if reason is not None:
    sweep = "" if "is never read" in reason else "; run them with launch.sweep"  # as processes they'd be equal too
    cli.fail(f"these runs cannot be replicas of one program: {reason}{sweep}")
  _check_each_replica(configs, [k for k in lists if k != "seed"])
  with _claimed(workdirs, config.task, parent=cli.WORKDIR.value), StopSignals() as stop:
    replicas.run(configs, workdirs, log=lambda line: print(line, flush=True), stop=stop)
  sys.stdout.flush()


def _check_each_replica(configs, varied: list[str]) -> None:
  """Every replica's config is checked before any workdir is made; a value that came from
  --replica_config is named as such (the checks' own hint says --config.KEY)."""
  import jax

  from fedkd.config import ConfigError, validate

  for c in configs:
    try:
      if c.task == "fedefm":
        from fedkd.tasks import fedefm

        fedefm.validate(c)
      else:
        validate(c, jax.device_count(), jax.process_count())
    except ConfigError as e:
      message = str(e)
      for key in varied:
        message = message.replace(f"--config.{key}", f"{key} in --replica_config")
      cli.fail(message)


SHARED = ("workdir",)  # of fedkd.cli's shared flags, those this program reads (it refuses --out and --frames)


def run(argv: list[str] | None = None) -> None:
  cli.run_app(main, argv, usage=__doc__, shared=SHARED)


if __name__ == "__main__":
  run()
