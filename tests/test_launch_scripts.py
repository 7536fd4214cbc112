"""launch/tpu_vm.sh and launch/slurm.sbatch as a user runs them, against fake ``gcloud`` / ``srun``
programs on PATH: a signal to the script's own process, flags that would break the workers' shell
commands, a machine without gcloud, the hint printed for a kept VM, the CPUs of each SLURM task."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import fake_cloud
import procs
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")
SLURM = os.path.join(ROOT, "launch", "slurm.sbatch")


def _tpu_args(tmp_path, *flags) -> list[str]:
  src = tmp_path / "src"
  src.mkdir(exist_ok=True)
  (src / "x.py").write_text("")
  return ["--name=fk", "--zone=z", f"--src={src}", *flags, "--", "python", "-m", "fedkd.main", "--workdir=runs/a"]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # a zombie has ended
    return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize(
  "block, sig, code, deleted",
  [
    ("PATH=", signal.SIGTERM, 143, False),  # the command runs: the VM holds its files, kept
    ("PATH=", signal.SIGINT, 130, False),
    ("pip install", signal.SIGTERM, 143, True),  # installing: the VM this script created goes
  ],
)
def test_tpu_vm_signal_to_the_script_alone_acts_at_once(tmp_path, block, sig, code, deleted):
  """``kill PID`` of the script (a scheduler, a wrapper, a user in another terminal; not the terminal's
  Ctrl-C, which reaches every process of the group): was deferred until the running gcloud call ended,
  the whole training run, and the command went on. Now the script stops the call (and gcloud's ssh) and
  exits 128 + the signal within seconds."""
  env = fake_cloud.env(tmp_path, FAKE_BLOCK=block)
  with procs.group() as popen:
    p = popen(["bash", TPU_VM, *_tpu_args(tmp_path)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)
    child_file = tmp_path / "calls.log.child"
    deadline = time.monotonic() + procs.timeout(60)
    while not (child_file.exists() and child_file.read_text()):
      assert p.poll() is None, f"exit {p.returncode} before the call to interrupt: {p.stderr.read()}"
      assert time.monotonic() < deadline, "the gcloud call to interrupt never came"
      time.sleep(0.05)
    grandchild = int(child_file.read_text())
    os.kill(p.pid, sig)  # the script's process only
    start = time.monotonic()
    _, err = procs.communicate_all([p], timeout=60)[0]
    took = time.monotonic() - start
  assert p.returncode == code, err
  assert took < 20, f"the script took {took:.0f} s to act on the signal (the blocked call runs 60 s)"
  assert not _alive(grandchild), "gcloud's child (its ssh) still runs"
  deletes = [c for c in fake_cloud.calls(tmp_path) if " delete " in c]
  assert deletes == (["gcloud compute tpus tpu-vm delete fk --zone=z --quiet"] if deleted else []), deletes
  if not deleted:
    assert "keeping TPU VM fk" in err, err


@pytest.mark.parametrize(
  "flag, needle",
  [
    ("--name=FK", "--name=FK is not a TPU VM name"),  # was: describe, create (refused by gcloud), delete
    ("--name=fk_2", "--name=fk_2 is not a TPU VM name"),
    ("--name=fk-", "--name=fk- is not a TPU VM name"),
    ("--remote_dir=my runs", "--remote_dir='my runs'"),  # was: 'mkdir -p my runs' on the workers, exit 0
    ("--remote_dir=", "--remote_dir=''"),  # was: 'mkdir -p  && tar ... -C  && ...' on the workers
    ("--fetch=runs/a b", "--fetch='runs/a b'"),  # was: scp of fedkd/runs/a b
    ("--fetch=runs;rm", "--fetch='runs;rm'"),
  ],
)
def test_tpu_vm_refuses_what_breaks_the_workers_commands(tmp_path, flag, needle):
  args = _tpu_args(tmp_path)
  if flag.startswith("--name="):
    args = [flag, *args[1:]]
  else:
    args.insert(3, flag)
  r = procs.run(["bash", TPU_VM, *args], cwd=tmp_path, env=fake_cloud.env(tmp_path), timeout=60)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("fedkd: error: " + needle), r.stderr
  assert len([ln for ln in r.stderr.splitlines() if ln.startswith("fedkd: error:")]) == 1, r.stderr
  assert fake_cloud.calls(tmp_path) == []


def test_tpu_vm_accepts_ordinary_paths(tmp_path):
  """The checks above leave alone what users write: nested paths, ~, dots, an empty --fetch (nothing
  fetched)."""
  args = _tpu_args(tmp_path, "--remote_dir=~/work/fedkd-1.2", "--fetch=runs/sweep_v2.1")
  r = procs.run(["bash", TPU_VM, "--dry_run", *args], cwd=tmp_path, env=fake_cloud.env(tmp_path), timeout=60)
  assert r.returncode == 0, r.stderr
  assert "fk:\\~/work/fedkd-1.2/runs/sweep_v2.1 runs " in r.stdout, r.stdout
  r = procs.run(["bash", TPU_VM, "--dry_run", *_tpu_args(tmp_path, "--fetch=")], cwd=tmp_path, timeout=60)
  assert r.returncode == 0, r.stderr
  assert "scp --recurse" not in r.stdout, r.stdout


def test_tpu_vm_without_gcloud_is_one_line(tmp_path):
  """No gcloud on PATH (not installed yet): was 'gcloud: command not found' twice (create, then delete)
  and exit 127."""
  bin_dir = tmp_path / "only-tools"
  bin_dir.mkdir()
  for tool in ("bash", "dirname", "tar", "rm", "mkdir", "cat"):
    os.symlink(shutil.which(tool), bin_dir / tool)
  env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
  r = procs.run([shutil.which("bash"), TPU_VM, *_tpu_args(tmp_path)], cwd=tmp_path, env=env, timeout=60)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [
    "fedkd: error: gcloud (the Google Cloud CLI) is not on PATH; install it "
    "(https://cloud.google.com/sdk/docs/install), or pass --dry_run to print the commands"
  ], r.stderr
  r = procs.run([shutil.which("bash"), TPU_VM, "--dry_run", *_tpu_args(tmp_path)], cwd=tmp_path, env=env, timeout=60)
  assert r.returncode == 0 and "+ gcloud compute tpus tpu-vm create fk" in r.stdout, r.stderr


def test_tpu_vm_keep_prints_a_delete_command_that_works(tmp_path):
  """--keep: the printed delete command named neither --project nor, with --queued, the queued resource
  (deleting the node leaves the queued resource); and when a VM of that name already existed (refused,
  nothing created) it still said 'keeping TPU VM' with a delete command for someone else's VM."""
  env = fake_cloud.env(tmp_path)
  r = procs.run(
    ["bash", TPU_VM, *_tpu_args(tmp_path, "--keep", "--queued", "--project=my-proj")], cwd=tmp_path, env=env, timeout=60
  )
  assert r.returncode == 0, r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
    "keeping TPU VM fk (delete: gcloud compute tpus queued-resources delete fk-qr --zone=z --project=my-proj "
    "--force --quiet)"
  ), r.stderr
  r = procs.run(
    ["bash", TPU_VM, *_tpu_args(tmp_path, "--keep")], cwd=tmp_path, env={**env, "FAKE_EXISTS": "1"}, timeout=60
  )
  assert r.returncode == 2, r.stderr
  assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
    "fedkd: error: a TPU VM named fk already exists in zone z; pass --reuse to run on it, or choose another --name"
  ], r.stderr


@pytest.mark.parametrize("endpoints, multihost", [("10.0.0.2", False), ("10.0.0.2;10.0.0.3;10.0.0.4;10.0.0.5", True)])
def test_tpu_vm_runs_every_worker_of_a_slice_as_one_process_of_several(tmp_path, endpoints, multihost):
  """A Cloud TPU VM sets no variable that tells fedkd it is one worker of several (TPU_WORKER_HOSTNAMES is
  GKE's), so on a v4-32 fedkd.main skipped jax.distributed.initialize(): no cross-process checks, no preemption
  notice. The script counts the slice's workers (gcloud's networkEndpoints) and runs the command on a slice of
  several with FEDKD_MULTIHOST=1; a single-host VM runs it without (one process, sweeps' parallel runs too)."""
  env = fake_cloud.env(tmp_path, FAKE_ENDPOINTS=endpoints)
  r = procs.run(["bash", TPU_VM, *_tpu_args(tmp_path)], cwd=tmp_path, env=env, timeout=60)
  assert r.returncode == 0, r.stderr
  calls = fake_cloud.calls(tmp_path)
  assert "gcloud compute tpus tpu-vm describe fk --zone=z --format=value(networkEndpoints[].ipAddress)" in calls
  run = next(c for c in calls if "fedkd.main" in c)
  assert run.startswith("gcloud compute tpus tpu-vm ssh fk --zone=z --worker=all --command=cd fedkd && "), run
  assert ("FEDKD_MULTIHOST=1 PATH=" in run) == multihost, run
  assert ("has 4 workers" in r.stderr) == multihost, r.stderr


def test_tpu_vm_pip_spec_with_an_environment_marker(tmp_path):
  """--pip takes a pip requirement; PEP 508 markers quote their values (jax[tpu]; python_version>='3.10').
  It was put in single quotes on the workers, whose shell dropped the marker's quotes (pip refuses
  'python_version>=3.10': "Expected a marker variable or quoted string")."""
  spec = "jax[tpu]; python_version>='3.10'"
  r = procs.run(
    ["bash", TPU_VM, f"--pip={spec}", *_tpu_args(tmp_path)], cwd=tmp_path, env=fake_cloud.env(tmp_path), timeout=60
  )
  assert r.returncode == 0, r.stderr
  install = next(c for c in fake_cloud.calls(tmp_path) if "pip install" in c)
  remote = install.split("--command=", 1)[1]
  # the worker's shell runs it: a python3 that prints its arguments shows what pip would get
  bin_dir = fake_cloud.programs(tmp_path / "worker" / "bin", python3='#!/bin/bash\nprintf "<%s>" "$@"; exit 1\n')
  work = tmp_path / "worker" / "fedkd"
  work.mkdir()
  out = subprocess.run(
    ["bash", "-c", remote], cwd=work.parent, env={"PATH": bin_dir + os.pathsep + "/usr/bin:/bin"}, capture_output=True
  )
  assert out.stdout.decode() == f"<-m><pip><install><-q><-U><-e><.><{spec}>", (remote, out.stderr)


@pytest.mark.parametrize("cpus", [None, "16"])
def test_slurm_tasks_get_the_jobs_cpus(tmp_path, cpus):
  """#SBATCH --cpus-per-task=16: srun (SLURM 22.05 and later) does not take it from the job
  (SLURM_CPUS_PER_TASK); each task ran on one core. It is passed on to srun."""
  env = fake_cloud.env(tmp_path, SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="9")
  if cpus:
    env["SLURM_CPUS_PER_TASK"] = cpus
  r = procs.run(["bash", SLURM, "--config.name=a b"], cwd=tmp_path, env=env, timeout=60)
  assert r.returncode == 0, r.stderr
  args = (tmp_path / "calls.log.args").read_text().splitlines()
  expected = ["--ntasks-per-node=1", *([f"--cpus-per-task={cpus}"] if cpus else []), "--kill-on-bad-exit=1"]
  assert args == [
    *expected,
    *["python", "-m", "fedkd.main", "--config=configs/fedavg_unet.py", "--workdir=runs/slurm-9", "--config.name=a b"],
  ], args


# ---------------------------------------------------------------- JAX's coordinator variables under a launcher

SLURM_TASK0 = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}


@pytest.mark.parametrize(
  "env, needle",
  [
    # was: IndexError traceback from jax.distributed ('list index out of range')
    ({"JAX_COORDINATOR_ADDRESS": "localhost"}, "JAX_COORDINATOR_ADDRESS='localhost' is not HOST:PORT"),
    # was: 'JAX cannot start the multi-process runtime ... run every process through the launcher'
    ({"JAX_COORDINATOR_PORT": "abc"}, "JAX_COORDINATOR_PORT='abc' is not a port from 1 to 65535"),
    # was: a wait of FEDKD_DISTRIBUTED_TIMEOUT (300 s), then 'could not join the other processes'
    ({"JAX_COORDINATOR_PORT": "70000"}, "JAX_COORDINATOR_PORT='70000' is not a port from 1 to 65535"),
  ],
)
def test_bad_coordinator_variables_are_one_line(cli, tmp_path, env, needle):
  full = {**SLURM_TASK0, "SLURM_LOCALID": "0", "FEDKD_DISTRIBUTED_TIMEOUT": "60", **env}
  r = cli.run("fedkd.main", ["--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}"], env=full, timeout=120)
  assert not r.timed_out and not r.traceback, r.stderr[-2000:]
  assert r.code == 2, r.stderr[-2000:]
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fedkd: error:")]
  assert len(errors) == 1 and errors[0].startswith("fedkd: error: " + needle), r.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_slurm_coordinator_address_port_in_use(cli, tmp_path):
  """Task 0 serves the coordinator on JAX_COORDINATOR_ADDRESS's port: taken, it was JAX's 'Failed to
  start RPC server' behind 'run every process through the launcher'."""
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 0))
    s.listen()
    port = s.getsockname()[1]
    env = {**SLURM_TASK0, "SLURM_LOCALID": "0", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}"}
    r = cli.run("fedkd.main", ["--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}"], env=env, timeout=120)
  assert not r.timed_out and not r.traceback, r.stderr[-2000:]
  assert r.code == 2, r.stderr[-2000:]
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fedkd: error:")]
  assert len(errors) == 1 and f"port {port} of JAX_COORDINATOR_ADDRESS=localhost:{port} is in use" in errors[0], errors
  assert not (tmp_path / "w").exists()


PROBE = textwrap.dedent("""\
  import jax
  from fedkd import distributed
  assert distributed.maybe_initialize(cpu_devices=1)
  print(jax.process_index(), jax.process_count())
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("var", ["JAX_COORDINATOR_PORT", "JAX_COORDINATOR_ADDRESS"])
def test_slurm_coordinator_variable_with_blanks_joins(var):
  """' 29500' (a value with a blank, as from a quoted shell variable): JAX could not use it, and the two
  tasks waited out FEDKD_DISTRIBUTED_TIMEOUT, then blamed the coordinator."""
  env = {
    k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES" and not k.startswith(("SLURM_", "JAX_COORD"))
  }
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  port = _free_port()
  value = f" {port} " if var == "JAX_COORDINATOR_PORT" else f" localhost:{port} "
  env.update(SLURM_TASK0, JAX_PLATFORMS="cpu", FEDKD_DISTRIBUTED_TIMEOUT="40", SLURM_STEP_NUM_NODES="1", **{var: value})
  with procs.group() as popen:
    ps = [
      popen([sys.executable, "-c", PROBE], cwd=ROOT, env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
      for i in range(2)
    ]
    outs = procs.communicate_all(ps, timeout=120)
  for i, (p, (out, err)) in enumerate(zip(ps, outs)):
    assert p.returncode == 0, err[-2000:]
    assert out.split() == [str(i), "2"], (out, err[-2000:])


def test_ipv6_coordinator_without_brackets_is_one_line(cli, tmp_path):
  """--coordinator_address=::1:PORT passed the HOST:PORT check; gRPC cannot read it, so the process
  waited out FEDKD_DISTRIBUTED_TIMEOUT (300 s by default), then blamed an unreachable coordinator."""
  port = _free_port()
  args = [f"--coordinator_address=::1:{port}", "--num_processes=1", "--process_id=0"]
  r = cli.run(
    "fedkd.main",
    ["--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}", *args],
    env={"FEDKD_DISTRIBUTED_TIMEOUT": "30"},
    timeout=120,
  )
  assert not r.timed_out and not r.traceback, r.stderr[-2000:]
  assert r.code == 2, r.stderr[-2000:]
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fedkd: error:")]
  assert errors == [
    f"fedkd: error: --coordinator_address='::1:{port}': an IPv6 address goes in brackets before the port, "
    f"e.g. --coordinator_address=[::1]:{port}"
  ], r.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_slurm_script_without_srun_is_one_line(tmp_path):
  """bash launch/slurm.sbatch outside SLURM (no srun): was 'srun: command not found', exit 127, and an
  empty runs/slurm-local left behind."""
  bin_dir = tmp_path / "only-tools"
  bin_dir.mkdir()
  for tool in ("bash", "mkdir", "paste"):
    os.symlink(shutil.which(tool), bin_dir / tool)
  env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
  r = procs.run([shutil.which("bash"), SLURM], cwd=tmp_path, env=env, timeout=60)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [
    "fedkd: error: srun not found: submit this script with sbatch on a SLURM cluster (sbatch launch/slurm.sbatch), "
    "or run python -m fedkd.main directly on one machine"
  ], r.stderr
  assert not (tmp_path / "runs").exists()
