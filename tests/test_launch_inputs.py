"""Bad input to the multi-process flags and the launch scripts, through the real entry points.

fedkd.main's --coordinator_address / --num_processes / --process_id (and SLURM's environment): each bad
combination ends with one line naming the flag and the fix, exit 2, no traceback, no workdir; a process
that cannot join the others stops after FEDKD_DISTRIBUTED_TIMEOUT seconds with one line instead of
waiting 5 minutes for JAX's fatal C++ error. launch/tpu_vm.sh and launch/slurm.sbatch run against fake
``gcloud`` / ``srun`` programs on PATH that record what they were asked to do.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import fake_cloud
import procs
import pytest

from fedkd import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = "--config=configs/quickstart.py"
# A run of seconds, should a refused case run after all (the old behaviour of some cases: a whole run)
TINY = [f"--config.{k}={v}" for k, v in {**sweep.TINY, "num_rounds": 1, "eval.max_sites": 1}.items()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _one_error(r, needles) -> None:
  assert not r.timed_out, r.stderr[-2000:]
  assert not r.traceback, r.stderr[-3000:]
  assert r.code == 2, f"exit {r.code}\n{r.stderr[-2000:]}"
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fedkd: error:")]
  assert len(errors) == 1, r.stderr[-2000:]
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])


FLAG_CASES = {
  # JAX: IndexError traceback (no ':' to split off a port)
  "address_without_port": (["--coordinator_address=localhost", "--num_processes=1", "--process_id=0"], ["HOST:PORT"]),
  # JAX: 'Failed to start RPC server' traceback
  "port_not_a_number": (
    ["--coordinator_address=localhost:abc", "--num_processes=1", "--process_id=0"],
    ["'localhost:abc'"],
  ),
  "port_out_of_range": (["--coordinator_address=localhost:99999", "--num_processes=1", "--process_id=0"], ["65535"]),
  # was: ignored, a single-process run
  "num_processes_without_address": (["--num_processes=2", "--process_id=0"], ["--coordinator_address"]),
  "blank_address": (["--coordinator_address= ", "--num_processes=2", "--process_id=0"], ["--coordinator_address"]),
  "address_without_count": (["--coordinator_address=localhost:1234"], ["--num_processes", "--process_id"]),
  "process_id_out_of_range": (
    ["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"],
    ["--process_id=2", "from 0 to 1"],
  ),
  "negative_process_id": (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=-1"], ["-1"]),
  "zero_processes": (["--coordinator_address=localhost:1234", "--num_processes=0", "--process_id=0"], [">= 1"]),
}


@pytest.mark.parametrize("name", list(FLAG_CASES))
def test_bad_multiprocess_flags(cli, tmp_path, name):
  args, needles = FLAG_CASES[name]
  r = cli.run("fedkd.main", [QS, f"--workdir={tmp_path / 'w'}", *TINY, *args], timeout=120)
  _one_error(r, needles)
  assert not (tmp_path / "w").exists()


def test_coordinator_port_in_use(cli, tmp_path):
  """Process 0 serves the coordinator on its port: a taken port made JAX's server crash (SIGSEGV)."""
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 0))
    s.listen()
    port = s.getsockname()[1]
    args = [f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=0"]
    r = cli.run("fedkd.main", [QS, f"--workdir={tmp_path / 'w'}", *TINY, *args], timeout=120)
  _one_error(r, [f"port {port}", "in use"])
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
  "env, needles",
  [
    ({"SLURM_NTASKS": "2"}, ["SLURM_NTASKS=2", "srun"]),  # was: 'coordinator_address should be defined.'
    ({"SLURM_NTASKS": "two"}, ["SLURM_NTASKS='two'"]),  # was: "invalid literal for int() with base 10"
    ({"FEDKD_DISTRIBUTED_TIMEOUT": "soon"}, ["FEDKD_DISTRIBUTED_TIMEOUT='soon'"]),
    ({"FEDKD_MULTIHOST": "1"}, ["FEDKD_MULTIHOST=1, so this is one process of several", "unset the variable"]),
    ({"FEDKD_MULTIHOST": "yes"}, ["FEDKD_MULTIHOST='yes' must be 1"]),
  ],
)
def test_bad_multiprocess_environment(cli, tmp_path, env, needles):
  for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "FEDKD_MULTIHOST"):
    assert k not in os.environ or k in env, f"the test environment sets {k}"
  args = (
    ["--coordinator_address=localhost:1234", "--num_processes=1", "--process_id=0"]
    if "FEDKD_DISTRIBUTED_TIMEOUT" in env
    else []
  )
  r = cli.run("fedkd.main", [QS, f"--workdir={tmp_path / 'w'}", *TINY, *args], env=env, timeout=120)
  _one_error(r, needles)
  assert not (tmp_path / "w").exists()


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _main(workdir, *extra) -> list[str]:
  return [sys.executable, "-m", "fedkd.main", QS, f"--workdir={workdir}", "--cpu_devices=1", *TINY, *extra]


def test_unreachable_coordinator_stops_with_one_line(tmp_path):
  """Process 1 with nobody at the coordinator's address: one line after the timeout (JAX: 300 s, then a
  fatal error with a C++ stack trace)."""
  port = _free_port()
  args = [f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=1"]
  r = procs.run(_main(tmp_path / "w", *args), cwd=ROOT, env=_env(FEDKD_DISTRIBUTED_TIMEOUT="3"), timeout=60)
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fedkd: error:")]
  assert len(errors) == 1 and "process 1 of 2" in errors[0] and "within 3 s" in errors[0], r.stderr[-2000:]
  assert "Check failure stack trace" not in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "w").exists()


def test_processes_with_different_counts_all_stop(tmp_path):
  """--num_processes=2 on process 0 and 3 on process 1: the coordinator (process 0) counts 2, both join
  and JAX says nothing; each process names the mismatch and exits 2 before anything is written."""
  port = _free_port()
  env = _env(FEDKD_DISTRIBUTED_TIMEOUT="60")
  with procs.group() as popen:
    ps = [
      popen(
        _main(tmp_path / "w", f"--coordinator_address=localhost:{port}", f"--num_processes={n}", f"--process_id={i}"),
        cwd=ROOT,
        env=env,
      )
      for i, n in ((0, 2), (1, 3))
    ]
    outs = procs.communicate_all(ps, timeout=120)
  for p, (_, err) in zip(ps, outs):
    assert p.returncode == 2, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("fedkd: error:")]
    assert len(errors) == 1 and "process 1 has --num_processes=3" in errors[0], err[-2000:]
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- launch scripts with fake gcloud / srun


def _script(tmp_path, script, args, **env):
  r = subprocess.run(
    ["bash", script, *args],
    capture_output=True,
    text=True,
    env=fake_cloud.env(tmp_path, **env),
    cwd=tmp_path,
    timeout=60,
  )
  return r, fake_cloud.calls(tmp_path)


def _tpu(tmp_path, **env):
  src = tmp_path / "src"  # a small --src: the script tars it
  src.mkdir(exist_ok=True)
  (src / "x.py").write_text("")
  args = ["--name=fk", "--zone=z", f"--src={src}", "--", "python", "-m", "fedkd.main", QS, "--workdir=runs/a"]
  return _script(tmp_path, os.path.join(ROOT, "launch", "tpu_vm.sh"), args, **env)


def test_tpu_vm_never_deletes_a_vm_it_did_not_create(tmp_path):
  """A VM of that name exists (another run's, or one kept with --keep): was created-failed-deleted."""
  r, calls = _tpu(tmp_path, FAKE_EXISTS="1")
  assert r.returncode == 2, r.stderr
  assert "already exists" in r.stderr and "--reuse" in r.stderr
  assert not [c for c in calls if " delete " in c], calls
  assert not [c for c in calls if " create " in c], calls


def test_tpu_vm_that_cannot_tell_whether_the_vm_exists_creates_and_deletes_nothing(tmp_path):
  """describe failing for another reason than NOT_FOUND (no account, no network) was read as "no such VM":
  create then failed on the existing VM of that name, and the cleanup deleted it."""
  err = "(gcloud.compute.tpus.tpu-vm.describe) You do not currently have an active account selected."
  r, calls = _tpu(tmp_path, FAKE_EXISTS="1", FAKE_DESCRIBE_ERROR=err)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and "cannot tell whether a TPU VM named fk exists" in lines[0] and "active account" in lines[0]
  assert not [c for c in calls if " delete " in c or " create " in c], calls


def test_tpu_vm_fetches_results_of_a_failed_command(tmp_path):
  """A command that fails (a sweep with one failed run exits 1; a preempted spot VM) still gets its
  results copied back before the VM is deleted, and its exit code is the script's."""
  r, calls = _tpu(tmp_path, FAKE_RUN_RC="3")
  assert r.returncode == 3, r.stderr
  assert "failed on the TPU VM (exit code 3)" in r.stderr
  scp = [i for i, c in enumerate(calls) if "scp --recurse fk:fedkd/runs" in c]
  delete = [i for i, c in enumerate(calls) if "tpu-vm delete fk" in c]
  assert scp and delete and scp[0] < delete[0], calls


def test_tpu_vm_success_creates_runs_fetches_deletes(tmp_path):
  r, calls = _tpu(tmp_path)
  assert r.returncode == 0, r.stderr
  kinds = [next((k for k in ("describe", "create", "scp --recurse", "delete") if k in c), None) for c in calls]
  assert [k for k in kinds if k] == ["describe", "create", "describe", "scp --recurse", "delete"], calls
  ssh = [c for c in calls if "PATH=" in c]
  assert len(ssh) == 1 and ssh[0].endswith(f"python -m fedkd.main {QS} --workdir=runs/a "), ssh
  # the command says python; the install step gives a python3-only image one in ~/.local/bin (on that PATH)
  install = next(c for c in calls if "pip install" in c)
  shim = install.split("&& ", 2)[2]
  home = tmp_path / "home"
  bin_dir = tmp_path / "only-python3"
  bin_dir.mkdir()
  for tool in ("python3", "mkdir", "ln"):
    os.symlink(shutil.which(tool), bin_dir / tool)
  probe = f"{shim} && PATH=$HOME/.local/bin:$PATH python -c 'print(123)'"
  out = subprocess.run(["/bin/bash", "-c", probe], env={"HOME": str(home), "PATH": str(bin_dir)}, capture_output=True)
  assert out.stdout.strip() == b"123", (probe, out.stderr)


def _slurm(tmp_path, *args, **env):
  return _script(
    tmp_path, os.path.join(ROOT, "launch", "slurm.sbatch"), list(args), SLURM_SUBMIT_DIR=str(tmp_path), **env
  )


def test_slurm_missing_venv_is_refused(tmp_path):
  """VENV given but not there: was silently ignored (the job ran whatever python is on PATH)."""
  r, calls = _slurm(tmp_path, VENV=str(tmp_path / "no-venv"))
  assert r.returncode == 2 and "VENV=" in r.stderr and "bin/activate" in r.stderr, r.stderr
  assert calls == []


def test_slurm_bucket_workdir_makes_no_local_folder(tmp_path):
  r, calls = _slurm(tmp_path, "--config.num_rounds=5", WORKDIR="gs://bucket/run")
  assert r.returncode == 0, r.stderr
  assert not (tmp_path / "gs:").exists()  # was: mkdir -p gs://bucket/run
  assert calls == [
    "srun --ntasks-per-node=1 --kill-on-bad-exit=1 python -m fedkd.main --config=configs/fedavg_unet.py "
    "--workdir=gs://bucket/run --config.num_rounds=5"
  ]


def test_slurm_signals_before_the_time_limit():
  """SLURM's SIGTERM at the time limit leaves KillWait (30 s by default) to save; the script asks for
  SIGTERM early enough for fedkd.main to finish its round and checkpoint."""
  text = open(os.path.join(ROOT, "launch", "slurm.sbatch")).read()
  assert "#SBATCH --signal=TERM@" in text


def test_cross_device_fewer_clients_than_per_round():
  """configs/cross_device.py:clients=8 alone samples all 8 (was: refused, clients_per_round=32 > 8)."""
  import importlib.util

  from fedkd.config import validate

  spec = importlib.util.spec_from_file_location("cross_device_cfg", os.path.join(ROOT, "configs", "cross_device.py"))
  m = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(m)
  c = m.get_config("clients=8")
  assert (c.num_clients, c.clients_per_round) == (8, 8)
  validate(c, 1)
  assert m.get_config(None).clients_per_round == 32 and m.get_config("clients=100,per_round=5").clients_per_round == 5
