"""Multi-process (multi-host) start-up with JAX's own runtime, guarded so one process needs nothing.

``maybe_initialize`` calls ``jax.distributed.initialize`` when (a) a coordinator address is given
(``--coordinator_address``/``--num_processes``/``--process_id``, e.g. several CPU processes on one
machine), or (b) the launcher says this is one of several processes: Cloud TPU VM pods
(``TPU_WORKER_HOSTNAMES`` with more than one host) or SLURM (``SLURM_NTASKS`` > 1), where JAX finds
the coordinator itself. Otherwise it does nothing.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  cpu_devices: int | None = None,
  host_memory: str | None = None,
) -> bool:
  """Returns True when this run is multi-process. Must run before any JAX computation. ``host_memory``
  (engine.host_memory), when given, is applied first (:func:`fedkd.hostmem.apply`: process-wide, before
  JAX's backend starts)."""
  if host_memory is not None:
    from fedkd import hostmem

    hostmem.apply(host_memory)
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id too")
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk via gloo
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
    return True
  return False


def is_primary() -> bool:
  return jax.process_index() == 0
