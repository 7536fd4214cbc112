"""Multi-process (multi-host) start-up with JAX's own runtime, guarded so one process needs nothing.

``maybe_initialize`` calls ``jax.distributed.initialize`` when (a) a coordinator address is given
(``--coordinator_address``/``--num_processes``/``--process_id``, e.g. several CPU processes on one
machine), or (b) the environment says this is one of several processes (``fedkd.launchenv``:
``FEDKD_MULTIHOST=1``, which launch/tpu_vm.sh sets on a slice of several workers; ``TPU_WORKER_HOSTNAMES``
with more than one host; ``SLURM_NTASKS`` > 1), where JAX finds the coordinator itself. Otherwise it does
nothing.

Bad flags (an address without a port, a process id out of range, ``--num_processes`` without an
address, a coordinator port already taken) and a malformed ``JAX_COORDINATOR_ADDRESS`` /
``JAX_COORDINATOR_PORT`` in a launcher's environment are a :class:`DistributedError` before JAX starts: one
line, exit 2. A process that cannot join the others (unreachable coordinator, a missing process) waits
at most ``FEDKD_DISTRIBUTED_TIMEOUT`` seconds (default 300), then prints one line and exits 2 instead of
JAX's fatal error with a C++ stack trace. After joining, processes whose ``--num_processes`` differs
from process 0's (the count JAX uses) stop with one line naming the mismatch, when that many processes
joined; when process 0 expects more than were started, they wait out the timeout instead. Processes
with different numbers of devices (e.g. different ``--cpu_devices``) stop with one line too, and so do (from
``fedkd.main``) processes started with different configs (:func:`check_same_config`, naming the keys) or given
a workdir that not all of them see (:func:`check_same_workdir`); a process that stops with an error of its own
is named by the others after the timeout (:func:`exchange`). Not caught:
a process id given twice, or one at or above process 0's count, makes JAX's service end the processes
already joined with its own fatal error (exit 134).

Devices: under SLURM with as many tasks as nodes (launch/slurm.sbatch: one task per node), every
process drives all GPUs of its node; JAX's SLURM detection alone would give each process only GPU
``SLURM_LOCALID`` (its one-process-per-GPU default, kept when a node runs several tasks).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import socket
import sys
import threading
import time

import jax

from fedkd.errors import reason
from fedkd.launchenv import DistributedError, several_processes, tpu_worker_hosts

TIMEOUT_ENV = "FEDKD_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
MAX_TIMEOUT_S = 2**31 - 1 - 60  # JAX takes whole seconds as a C int, and gets 60 s more than the watchdog


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
  if cpu_devices is not None and (isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int) or cpu_devices < 1):
    raise ValueError(f"--cpu_devices={cpu_devices} must be an integer >= 1 (or leave it out: one CPU device)")
  if coordinator_address is not None or num_processes is not None or process_id is not None:
    _check_flags(coordinator_address, num_processes, process_id)
    coordinator_address = coordinator_address.strip()  # JAX cannot connect to ' host:port'
    timeout_s = _timeout_s()
    if process_id == 0:
      _check_port_free(coordinator_address)
  if host_memory is not None:
    from fedkd import hostmem

    hostmem.apply(host_memory)
  if cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  if coordinator_address:
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk via gloo
    where = f"process {process_id} of {num_processes} (coordinator {coordinator_address})"
    with _all_local_gpus(_slurm_one_task_per_node()):
      _initialize_within(
        timeout_s,
        where,
        "start every process with the same --coordinator_address (process 0's host:port, reachable from every "
        f"process) and --num_processes={num_processes}, each with its own --process_id from 0 to {num_processes - 1}",
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
      )
    _check_process_count(num_processes)
    _check_devices_per_process()
    return True
  source = several_processes()
  if source:
    timeout_s = _timeout_s()
    fix = (
      "run every process through the launcher (srun inside a SLURM allocation; every worker of a TPU slice), "
      "or unset the variable for a single-process run"
    )
    _check_coordinator_env()
    if len(tpu_worker_hosts()) <= 1:  # SLURM (or FEDKD_MULTIHOST): task 0 serves the coordinator here
      _check_slurm_port_free()
    try:
      with _all_local_gpus(_slurm_one_task_per_node()):
        _initialize_within(timeout_s, f"this process ({source})", fix)
    except (ValueError, TypeError, RuntimeError) as e:  # JAX could not find the coordinator, count or id
      raise DistributedError(
        f"{source}, so this is one process of several, but JAX cannot start the multi-process runtime from "
        f"this environment ({reason(e, 300)}); {fix}"
      ) from None
    _check_devices_per_process()
    return True
  return False


def is_primary() -> bool:
  return jax.process_index() == 0


def _timeout_s() -> float:
  raw = os.environ.get(TIMEOUT_ENV, "").strip()
  if not raw:
    return DEFAULT_TIMEOUT_S
  try:
    value = float(raw)
  except ValueError:
    value = float("nan")
  if not (value > 0 and value != float("inf")):
    raise DistributedError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds, e.g. {TIMEOUT_ENV}=600")
  return min(value, MAX_TIMEOUT_S)  # a longer wait than JAX can take (68 years) is as good as forever


def _check_flags(address: str | None, num_processes: int | None, process_id: int | None) -> None:
  if address is None or not address.strip():
    given = [f for f, v in (("--num_processes", num_processes), ("--process_id", process_id)) if v is not None]
    what = " and ".join(given) if given else "--coordinator_address"
    verb = "is empty; it needs" if not given else "needs" if len(given) == 1 else "need"
    raise DistributedError(
      f"{what} {verb} --coordinator_address=HOST:PORT (process 0's address) too; pass all three of "
      "--coordinator_address, --num_processes and --process_id, or none"
    )
  if num_processes is None or process_id is None:
    raise DistributedError(
      "--coordinator_address needs --num_processes and --process_id too, e.g. "
      "--coordinator_address=localhost:12355 --num_processes=2 --process_id=0 (and =1 for the second process)"
    )
  _split_address(address)
  if num_processes < 1:
    raise DistributedError(f"--num_processes={num_processes} must be >= 1")
  if not 0 <= process_id < num_processes:
    raise DistributedError(
      f"--process_id={process_id} is out of range for --num_processes={num_processes}; "
      f"give each process its own id from 0 to {num_processes - 1}"
    )


def _split_address(
  address: str,
  named: str = "--coordinator_address",
  fix: str = "give process 0's address, e.g. --coordinator_address=localhost:12355",
) -> tuple[str, int]:
  host, sep, port = address.strip().rpartition(":")
  bracketed = host.startswith("[") and host.endswith("]")
  host = host[1:-1] if bracketed else host  # [ipv6]:port
  if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise DistributedError(f"{named}={address!r} is not HOST:PORT with a port from 1 to 65535; {fix}")
  if ":" in host and not bracketed:  # gRPC cannot tell ::1:12355's port from the address: a wait, then a timeout
    raise DistributedError(
      f"{named}={address!r}: an IPv6 address goes in brackets before the port, e.g. {named}=[{host}]:{port}"
    )
  return host, int(port)


def _check_coordinator_env() -> None:
  """``JAX_COORDINATOR_ADDRESS`` (else ``JAX_COORDINATOR_PORT``), which JAX reads when the launcher's
  environment gives the processes: one line for a malformed value (JAX: an IndexError for an address
  without a port, a wait of the whole timeout or 'Failed to start RPC server' for a bad port), and
  surrounding blanks removed (JAX cannot use ' 29500')."""
  env = os.environ
  address = env.get("JAX_COORDINATOR_ADDRESS", "")
  if address:  # JAX ignores an empty one
    _split_address(
      address,
      "JAX_COORDINATOR_ADDRESS",
      "export process 0's HOST:PORT, e.g. JAX_COORDINATOR_ADDRESS=node01:29500, or unset it (the launcher's "
      "environment names the coordinator)",
    )
    env["JAX_COORDINATOR_ADDRESS"] = address.strip()
    return  # JAX then ignores JAX_COORDINATOR_PORT
  port = env.get("JAX_COORDINATOR_PORT", "")
  if port:
    if not port.strip().isdigit() or not 1 <= int(port.strip()) <= 65535:
      raise DistributedError(
        f"JAX_COORDINATOR_PORT={port!r} is not a port from 1 to 65535; export a free port to every process, "
        "e.g. JAX_COORDINATOR_PORT=29500, or unset it (JAX then picks one)"
      )
    env["JAX_COORDINATOR_PORT"] = port.strip()


def _check_port_free(
  address: str, named: str | None = None, fix: str = "pick a free port (the same one for every process)"
) -> None:
  """Process 0 serves the coordinator on the address's port (on every interface, as JAX binds it). A
  taken port makes JAX's server crash (a segmentation fault), so it is refused here, naming it
  (``named``: how the user gave the port; default the --coordinator_address flag)."""
  bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or address
  try:
    _, port = _split_address(bind)
  except DistributedError:
    return  # an unusual bind address: JAX reports it
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
    try:
      s = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # no IPv6 here
      continue
    try:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
      s.bind((host, port))
    except OSError as e:
      if e.errno in (errno.EADDRINUSE, errno.EACCES):
        why = "is in use by another program" if e.errno == errno.EADDRINUSE else "cannot be opened by this user"
        raise DistributedError(
          f"port {port} of {named or f'--coordinator_address={address}'} {why}; process 0 serves the "
          f"coordinator there: {fix}"
        ) from None
    finally:
      s.close()


def _check_slurm_port_free() -> None:
  """Task 0 of a SLURM job step serves the coordinator on the port JAX picks: that of
  ``JAX_COORDINATOR_ADDRESS``, else ``JAX_COORDINATOR_PORT``, else one derived from the job id (61440 + id
  mod 4096, so two jobs can pick the same)."""
  env = os.environ
  needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
  if any(k not in env for k in needed) or env["SLURM_PROCID"].strip() != "0":
    return  # not JAX's SLURM detection, or not the coordinator's task: JAX reports what it finds
  if env.get("JAX_COORDINATOR_ADDRESS"):  # task 0 serves it on this address's port
    address = env["JAX_COORDINATOR_ADDRESS"]
    _check_port_free(
      address,
      f"JAX_COORDINATOR_ADDRESS={address}",
      "export JAX_COORDINATOR_ADDRESS with a free port to every task (e.g. in the sbatch script, before srun)",
    )
    return
  job = env["SLURM_JOB_ID"].strip()
  port = env.get("JAX_COORDINATOR_PORT", "").strip()
  named = f"JAX_COORDINATOR_PORT={port}"
  if not port:
    if not job.isdigit():
      return
    port, named = str(int(job) % 2**12 + 65535 - 2**12 + 1), f"SLURM job {job}'s coordinator (JAX's choice)"
  _check_port_free(
    f"localhost:{port}",
    named,
    "export JAX_COORDINATOR_PORT=PORT with a free port to every task (e.g. in the sbatch script, before srun)",
  )


def _slurm_one_task_per_node() -> bool:
  """A SLURM job step with as many tasks as nodes (each node runs one process), unless
  ``JAX_LOCAL_DEVICE_IDS`` names this process's devices."""
  env = os.environ
  nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
  tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
  return (
    "SLURM_JOB_ID" in env
    and "JAX_LOCAL_DEVICE_IDS" not in env
    and nodes is not None
    and tasks is not None
    and nodes.strip() == tasks.strip()
  )


@contextlib.contextmanager
def _all_local_gpus(keep: bool):
  """With ``keep``, the GPUs visible to this process after the body are those before it: JAX's cluster
  detection restricts them to ``SLURM_LOCALID`` (one process per GPU) during ``initialize``."""
  names = ("jax_cuda_visible_devices", "jax_rocm_visible_devices")
  before = {n: jax.config.read(n) for n in names} if keep else {}
  try:
    yield
  finally:
    for n, v in before.items():
      jax.config.update(n, v)


def _initialize_within(timeout_s: float, where: str, fix: str, **kwargs) -> None:
  """``jax.distributed.initialize(**kwargs)``, or one line and exit 2 after ``timeout_s`` seconds.

  JAX waits for every process to register and then ends the process with a fatal C++ error and a
  stack trace; its wait releases the GIL, so a watchdog thread can end the process first."""
  done = threading.Event()

  def watchdog() -> None:
    if not done.wait(timeout_s):
      print(
        f"fedkd: error: {where} could not join the other processes within {timeout_s:g} s (the coordinator is "
        f"unreachable, or a process is missing or has the same --process_id as another); {fix}; "
        f"{TIMEOUT_ENV}=SECONDS sets how long to wait",
        file=sys.stderr,
        flush=True,
      )
      os._exit(2)

  threading.Thread(target=watchdog, name="fedkd-distributed-watchdog", daemon=True).start()
  try:
    jax.distributed.initialize(initialization_timeout=int(timeout_s) + 60, **kwargs)
  finally:
    done.set()


def _check_devices_per_process() -> None:
  """Every process must drive as many devices as the others (checkpoints and the client mesh lay the
  devices out as processes x local devices); every process sees the whole device list."""
  per_process = collections.Counter(d.process_index for d in jax.devices())
  if len(set(per_process.values())) > 1:
    named = ", ".join(f"process {i} has {n}" for i, n in sorted(per_process.items()))
    raise DistributedError(
      f"the processes have different numbers of devices ({named}); give every process the same number "
      "(the same --cpu_devices; on GPU or TPU hosts, as many accelerators on each)"
    )


def exchange(label: str, value: str, what: str = "") -> dict[int, str]:
  """{process index: its ``value``} of every process, through the coordinator's key-value store (each process
  publishes ``value`` under ``label`` and reads the others'; a label is used once per run). One process, or a JAX
  without that client API: this process's value only. A process that has not published within
  ``FEDKD_DISTRIBUTED_TIMEOUT`` seconds (it stopped with an error of its own, or is stuck) is one line
  naming it and ``what`` was being compared."""
  own = {jax.process_index(): value}
  if jax.process_count() == 1:
    return own
  try:
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    set_value, get_value = client.key_value_set, client.blocking_key_value_get
  except (ImportError, AttributeError):  # a JAX without this client API: each process checks its own value only
    return own
  timeout_s = _timeout_s()
  out, missing = {}, []
  try:
    set_value(f"fedkd/{label}/{jax.process_index()}", value)
  except Exception as e:  # noqa: BLE001 - the coordinator is gone: process 0 stopped
    raise DistributedError(
      f"process 0 (the coordinator) stopped before {what or label} could be compared ({reason(e)})"
    )
  deadline = time.monotonic() + timeout_s  # one wait for all of them, not one per missing process
  for i in range(jax.process_count()):
    if i == jax.process_index():  # its own value (read last, after a missing process used up the wait, it was
      out[i] = value  # named as missing too)
      continue
    try:
      out[i] = get_value(f"fedkd/{label}/{i}", max(1, int((deadline - time.monotonic()) * 1000)))
    except Exception:  # noqa: BLE001 - a timeout, or the coordinator gone
      missing.append(i)
  if missing:
    raise DistributedError(
      f"process(es) {missing} did not reach the comparison of {what or label} within {timeout_s:g} s (each "
      f"stopped with an error of its own, or is stuck: see its output); {TIMEOUT_ENV}=SECONDS sets how long to wait"
    )
  return out


def check_same_config(config_json: str) -> None:
  """Every process must run the same config (each feeds its own values into arrays the round takes as equal on
  every process: a process started with another seed trained silently on a mix). One line naming the keys that
  differ from process 0's."""
  import json

  from fedkd.config import flat_dict

  claims = exchange("config", config_json, "the processes' configs")
  base = claims.get(0, config_json)
  other = {i: c for i, c in claims.items() if c != base}
  if not other:
    return
  i, c = min(other.items())
  a, b = flat_dict(json.loads(base)), flat_dict(json.loads(c))
  keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  named = ", ".join(f"config.{k}: {a.get(k)!r} on process 0, {b.get(k)!r} on process {i}" for k in keys[:3])
  raise DistributedError(
    f"the processes were started with different configs ({named}{' ...' if len(keys) > 3 else ''}); start "
    "every process with the same --config and --config.* flags"
  )


def check_same_workdir(workdir) -> None:
  """Every process must see the workdir process 0 holds (the checkpoints are written by all of them together: a
  process writing to a disk of its own waited at the first save for ever, and ignored SIGTERM). Process 0 leaves a
  token file there; each process reads it in its own view of the path; one line if any process sees another."""
  import json
  import secrets

  from etils import epath

  primary = jax.process_index() == 0
  path = epath.Path(workdir) / f".fedkd-processes-{secrets.token_hex(4)}"
  token = secrets.token_hex(16)
  if primary:
    path.write_text(token)
  try:
    what = "the workdir every process sees"
    held = json.loads(exchange("workdir_token", json.dumps([path.name, token, os.fspath(workdir)]), what)[0])
    mine = epath.Path(workdir) / held[0]
    seen = exchange("workdir_seen", "1" if mine.exists() and mine.read_text() == held[1] else "0", what)
  finally:
    if primary:
      path.unlink(missing_ok=True)
  blind = sorted(i for i, s in seen.items() if s != "1")
  if blind:
    here = "" if os.fspath(workdir) == held[2] else f" (this process was given {os.fspath(workdir)})"
    raise DistributedError(
      f"process(es) {blind} do not see the workdir {held[2]} that process 0 holds{here}: each sees a folder of its "
      "own there; give every process the same shared --workdir (a gs:// bucket, or a filesystem every host mounts)"
    )


def _check_process_count(num_processes: int) -> None:
  """Every process must have been started with the same process count. The coordinator's count wins
  when they differ (JAX does not check), so each process publishes its own and all of them compare."""
  count = jax.process_count()
  claims = exchange("num_processes", str(num_processes), "--num_processes")
  wrong = {i: c for i, c in claims.items() if c != str(count)}
  if wrong:
    named = ", ".join(f"process {i} has --num_processes={c}" for i, c in sorted(wrong.items()))
    raise DistributedError(
      f"{count} processes joined the coordinator, but {named}; start every process with the same "
      f"--num_processes (this one: --num_processes={num_processes})"
    )
