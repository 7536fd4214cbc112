"""What a launcher's environment says about the processes of a run, without importing JAX (``launch.sweep``
reads it too): :func:`several_processes` names the variable that makes this process one of several, which
``fedkd.distributed.maybe_initialize`` then joins through ``jax.distributed.initialize()``."""

from __future__ import annotations

import os

from fedkd.errors import UserError

MULTIHOST_ENV = "FEDKD_MULTIHOST"  # 1: one of several processes that jax.distributed.initialize() finds itself


class DistributedError(UserError, ValueError):
  """Bad multi-process flags or environment (a ValueError too, for callers that catch that)."""


def several_processes() -> str | None:
  """The variable, as a phrase (e.g. ``"SLURM_NTASKS=4"``), that says this process is one of several whose
  cluster JAX finds by itself, or None: ``FEDKD_MULTIHOST=1`` (set by launch/tpu_vm.sh on a slice of several
  workers: a Cloud TPU VM sets no variable of its own, JAX reads the VM's metadata server; also SLURM or Open
  MPI), ``TPU_WORKER_HOSTNAMES`` listing more than one host (TPUs on GKE), ``SLURM_NTASKS`` > 1. A malformed
  value is a :class:`DistributedError`."""
  multihost = os.environ.get(MULTIHOST_ENV, "").strip()
  if multihost not in ("", "0", "1"):
    raise DistributedError(
      f"{MULTIHOST_ENV}={multihost!r} must be 1 (every worker of a multi-host slice or cluster, where "
      "jax.distributed.initialize() finds the others) or 0; unset it for a single-process run"
    )
  raw_tasks = os.environ.get("SLURM_NTASKS", "1").strip() or "1"
  try:
    ntasks = int(raw_tasks)
  except ValueError:
    raise DistributedError(
      f"SLURM_NTASKS={raw_tasks!r} is not a whole number; unset it, or run under SLURM (sbatch / srun), which sets it"
    ) from None
  hosts = tpu_worker_hosts()
  if multihost == "1":
    return f"{MULTIHOST_ENV}=1"
  if len(hosts) > 1:
    return f"TPU_WORKER_HOSTNAMES lists {len(hosts)} hosts"
  if ntasks > 1:
    return f"SLURM_NTASKS={ntasks}"
  return None


def tpu_worker_hosts() -> list[str]:
  """The hosts ``TPU_WORKER_HOSTNAMES`` lists (TPUs on GKE; empty elsewhere)."""
  return [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
