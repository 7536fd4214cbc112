"""fedkd command line: ``python -m fedkd.main --config=configs/quickstart.py --workdir=runs/qs``.

Config values are overridden with ``--config.KEY=VALUE`` (e.g. ``--config.num_clients=64``). A bad
config, checkpoint, dataset or flag ends with one line on stderr naming the problem and a fix (exit 2).
"""
from __future__ import annotations

from absl import flags

from fedkd import cli, distributed
from fedkd.checkpoint import CheckpointError
from fedkd.config import ConfigError
from fedkd.data.partition import PartitionError
from fedkd.data.pipeline import DataError

_COORD = flags.DEFINE_string("coordinator_address", None,
                             "host:port of process 0 for a multi-process run (with --num_processes, --process_id).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Simulate this many CPU devices (CPU runs only).")


def run(argv: list[str] | None = None) -> None:
  cli.parse(argv)
  config = cli.CONFIG.value
  if not cli.WORKDIR.value:
    cli.fail("--workdir is required, e.g. --workdir=runs/quickstart")
  try:
    distributed.maybe_initialize(_COORD.value, _NPROC.value, _PID.value, _CPU_DEVICES.value)
  except ValueError as e:
    cli.fail(str(e))
  try:
    if config.task == "fedavg":
      from fedkd.tasks import fedavg
      fedavg.run(config, cli.WORKDIR.value)
    elif config.task == "fedefm":
      from fedkd.tasks import fedefm
      fedefm.run(config, cli.WORKDIR.value)
    else:
      raise ConfigError(f"config.task={config.task!r} is not a known task; use 'fedavg' or 'fedefm'")
  except (ConfigError, CheckpointError, DataError, PartitionError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  run()
