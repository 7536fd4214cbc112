"""Multi-process runs as a user starts them: SLURM's environment (fake job steps on localhost) and the
launch scripts against fake ``gcloud`` / ``srun`` programs, interrupted the way a user interrupts them."""

from __future__ import annotations

import os
import pty
import re
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

# ---------------------------------------------------------------- SLURM: which GPUs each process drives

PROBE = textwrap.dedent("""\
  import jax
  from fedkd import distributed
  assert distributed.maybe_initialize(cpu_devices=1)
  print(jax.process_index(), jax.process_count(), jax.config.read("jax_cuda_visible_devices"),
        jax.config.read("jax_rocm_visible_devices"))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize(
  "nodes, expected",
  [
    (2, ["all", "all"]),  # launch/slurm.sbatch: one task per node drives every GPU of its node
    (1, ["0", "1"]),  # two tasks on one node: one GPU each, by SLURM_LOCALID (JAX's default)
  ],
)
def test_slurm_task_sees_the_gpus_of_its_node(nodes, expected):
  """Two tasks of a SLURM job step (the environment srun gives them; the coordinator on localhost). With
  one task per node, JAX's SLURM detection alone restricted each process to GPU SLURM_LOCALID=0: one GPU
  of the node's 8 in launch/slurm.sbatch."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES" and not k.startswith("SLURM_")}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  env.update(
    JAX_PLATFORMS="cpu",
    JAX_COORDINATOR_PORT=str(_free_port()),
    FEDKD_DISTRIBUTED_TIMEOUT="60",
    SLURM_JOB_ID="4242",
    SLURM_STEP_NODELIST="localhost",
    SLURM_NTASKS="2",
    SLURM_STEP_NUM_TASKS="2",
    SLURM_STEP_NUM_NODES=str(nodes),
  )
  with procs.group() as popen:
    ps = [
      popen(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i if nodes == 1 else 0)},
      )
      for i in range(2)
    ]
    outs = procs.communicate_all(ps, timeout=120)
  for i, (p, (out, err)) in enumerate(zip(ps, outs)):
    assert p.returncode == 0, err[-2000:]
    assert out.split() == [str(i), "2", expected[i], expected[i]], (out, err[-2000:])


# ---------------------------------------------------------------- launch scripts with fake gcloud / srun


def _tpu_interrupted(tmp_path, *flags, block="PATH=", sig=signal.SIGINT, answer=None):
  """launch/tpu_vm.sh on a fake gcloud, sent ``sig`` (to its process group, as a terminal sends Ctrl-C)
  while the gcloud call containing ``block`` runs; ``answer``: stdin is a terminal and this is typed
  after the signal. Returns (exit code, stderr, the gcloud calls)."""
  tmp_path.mkdir(parents=True, exist_ok=True)
  log = tmp_path / "calls.log"
  src = tmp_path / "src"
  src.mkdir()
  (src / "x.py").write_text("")
  env = fake_cloud.env(tmp_path, FAKE_BLOCK=block)
  args = ["--name=fk", "--zone=z", f"--src={src}", *flags, "--", "python", "-m", "fedkd.main", "--workdir=runs/a"]
  master = slave = None
  if answer is not None:
    master, slave = pty.openpty()
  with procs.group() as popen:
    p = popen(
      ["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), *args],
      cwd=tmp_path,
      env=env,
      stdin=slave if slave is not None else subprocess.DEVNULL,
    )
    deadline = time.monotonic() + procs.timeout(60)
    while not os.path.exists(f"{log}.blocked"):
      assert p.poll() is None, f"exit {p.returncode} before the command: {p.stderr.read()}"
      assert time.monotonic() < deadline, "the gcloud call to interrupt never came"
      time.sleep(0.05)
    os.killpg(p.pid, sig)
    if answer is not None:
      os.write(master, answer.encode() + b"\n")
    _, err = procs.communicate_all([p], timeout=60)[0]
  for fd in (master, slave):
    if fd is not None:
      os.close(fd)
  return p.returncode, err, log.read_text().splitlines()


def _deleted(calls) -> list[str]:
  return [c for c in calls if " delete " in c]


def test_tpu_vm_ctrl_c_during_the_command_keeps_the_vm(tmp_path):
  """Ctrl-C while the command runs (no terminal to ask on): was the VM deleted with the run's
  checkpoints and metrics on it, nothing fetched. Now kept, with how to fetch and delete."""
  code, err, calls = _tpu_interrupted(tmp_path)
  assert code == 130, err
  assert _deleted(calls) == [], calls
  assert "keeping TPU VM fk" in err, err
  assert "gcloud compute tpus tpu-vm delete fk --zone=z --quiet" in err, err
  assert "gcloud compute tpus tpu-vm scp --recurse fk:fedkd/runs . --zone=z --worker=0" in err, err


def test_tpu_vm_sigterm_during_the_command_keeps_the_vm(tmp_path):
  code, err, calls = _tpu_interrupted(tmp_path, sig=signal.SIGTERM)
  assert code == 143, err  # 128 + SIGTERM (was 130, as for Ctrl-C)
  assert _deleted(calls) == [], calls


@pytest.mark.parametrize("answer, deleted", [("y", True), ("n", False), ("", False)])
def test_tpu_vm_ctrl_c_asks_before_deleting(tmp_path, answer, deleted):
  code, err, calls = _tpu_interrupted(tmp_path, answer=answer)
  assert code == 130, err
  assert "Delete TPU VM fk now? [y/N]" in err, err
  assert _deleted(calls) == (["gcloud compute tpus tpu-vm delete fk --zone=z --quiet"] if deleted else []), calls


def test_tpu_vm_on_interrupt_flag(tmp_path):
  code, err, calls = _tpu_interrupted(tmp_path / "delete", "--on_interrupt=delete")
  assert code == 130, err
  assert _deleted(calls) == ["gcloud compute tpus tpu-vm delete fk --zone=z --quiet"], calls
  # a queued resource: kept too, and the printed delete command is the queued resource's
  code, err, calls = _tpu_interrupted(tmp_path / "keep", "--on_interrupt=keep", "--queued", answer="y")
  assert code == 130, err
  assert _deleted(calls) == [] and "Delete TPU VM" not in err, (calls, err)
  assert "gcloud compute tpus queued-resources delete fk-qr --zone=z --force --quiet" in err, err


def test_tpu_vm_interrupt_before_the_command_deletes_the_new_vm(tmp_path):
  """Ctrl-C while installing: the VM holds nothing of the user's yet; the VM this script created goes."""
  code, err, calls = _tpu_interrupted(tmp_path, block="pip install")
  assert code == 130, err
  assert _deleted(calls) == ["gcloud compute tpus tpu-vm delete fk --zone=z --quiet"], calls


def test_tpu_vm_bad_on_interrupt_value(tmp_path):
  r = procs.run(
    ["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), "--name=a", "--zone=z", "--on_interrupt=later", "--", "true"],
    cwd=tmp_path,
    timeout=60,
  )
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == ["fedkd: error: --on_interrupt=later is not ask, keep or delete"], r.stderr


def test_slurm_job_output_names_the_workdir_to_resume(tmp_path):
  """The default WORKDIR (runs/slurm-<job id>) is new for each job: re-submitting as the docs say started
  over unless the job said which WORKDIR to pass."""
  log = tmp_path / "calls.log"
  env = fake_cloud.env(tmp_path, SLURM_JOB_ID="31", SLURM_SUBMIT_DIR=str(tmp_path))
  r = procs.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], cwd=tmp_path, env=env, timeout=60)
  assert r.returncode == 0, r.stderr
  assert "re-submit with WORKDIR=runs/slurm-31" in r.stdout, r.stdout
  assert log.read_text().split()[-1] == "--workdir=runs/slurm-31"


# ---------------------------------------------------------------- fedkd.main's multi-process flags


def test_a_very_long_distributed_timeout_is_a_long_wait(cli, tmp_path):
  """FEDKD_DISTRIBUTED_TIMEOUT=1e10 ("wait as long as it takes"): was a TypeError traceback from JAX,
  whose initialization timeout is a C int of seconds. A one-process run with a coordinator trains."""
  from fedkd import sweep

  tiny = [f"--config.{k}={v}" for k, v in {**sweep.TINY, "num_rounds": 1, "eval.max_sites": 1}.items()]
  args = [f"--coordinator_address=localhost:{_free_port()}", "--num_processes=1", "--process_id=0"]
  r = cli.run(
    "fedkd.main",
    ["--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}", *tiny, *args],
    env={"FEDKD_DISTRIBUTED_TIMEOUT": "1e10"},
    timeout=300,
  )
  assert not r.timed_out and not r.traceback, r.stderr[-2000:]
  assert r.code == 0, r.stderr[-2000:]
  assert [ln for ln in r.stdout.splitlines() if ln.startswith("round    1/1 ")], r.stdout[-2000:]


def _two_fedkd_processes(args_of, timeout: float, wait_s: str = "60"):
  """``python -m fedkd.main`` as processes 0 and 1 of a 2-process run on CPU with a coordinator (``args_of(i)``:
  process i's other flags; ``wait_s``: FEDKD_DISTRIBUTED_TIMEOUT): [(Popen, (stdout, stderr))] per process."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  env.update(JAX_PLATFORMS="cpu", FEDKD_DISTRIBUTED_TIMEOUT=wait_s)
  port = _free_port()
  with procs.group() as popen:
    ps = [
      popen(
        [
          *[sys.executable, "-m", "fedkd.main", *args_of(i)],
          *[f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
        ],
        cwd=ROOT,
        env=env,
      )
      for i in range(2)
    ]
    return list(zip(ps, procs.communicate_all(ps, timeout=timeout)))


def test_processes_with_different_device_counts_stop_with_one_line(tmp_path):
  """--cpu_devices=2 on process 0 and 1 on process 1 (on GPU hosts: nodes with different GPU counts):
  was a ValueError traceback from orbax ('cannot reshape array of size 3 into shape (2,2)') on both,
  after the workdir was made."""
  outs = _two_fedkd_processes(
    lambda i: [
      *["--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}"],
      *["--config.num_clients=6", "--config.clients_per_round=6", f"--cpu_devices={2 - i}"],
    ],
    timeout=120,
  )
  for p, (_, err) in outs:
    assert p.returncode == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("fedkd: error:")]
    assert len(errors) == 1 and "process 0 has 2, process 1 has 1" in errors[0], err[-2000:]
    assert "--cpu_devices" in errors[0], errors
  assert not (tmp_path / "w").exists()


def test_a_process_that_stops_before_the_others_is_named_by_them(tmp_path):
  """The workdir is locked by another run: process 0 (which takes the lock) stops with its one line, and process 1,
  waiting for process 0 at the workdir check, said nothing and ended in a KeyError traceback. It now names the
  process it waited for, in one line, after FEDKD_DISTRIBUTED_TIMEOUT."""
  from fedkd.workdir import Lock

  (tmp_path / "w").mkdir()
  held = Lock(tmp_path / "w")
  held.acquire()  # this test's process holds the workdir
  try:
    args = ["--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}", "--config.num_rounds=1", "--cpu_devices=2"]
    outs = _two_fedkd_processes(lambda i: args, timeout=180, wait_s="30")
  finally:
    held.release()
  for (p, (_, err)), message in zip(outs, ("is in use by", r"process\(es\) \[0\] did not reach the comparison of")):
    errors = [ln for ln in err.splitlines() if ln.startswith("fedkd: error:")]
    assert p.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert len(errors) == 1 and re.search(message, errors[0]), err[-2000:]
  assert sorted(os.listdir(tmp_path / "w")) == [".lock"]


def test_what_two_processes_cannot_share_is_one_line_on_both_before_anything_is_written(tmp_path):
  """Each was a traceback, a hang or a silent mix: processes started with different seeds trained (exit 0) on
  values each fed into arrays the round takes as equal; a workdir each process sees as a folder of its own (a
  local disk per host) hung at the first save, past SIGTERM; 3 clients a round on 2 processes x 2 devices left
  process 1 without a device (a ValueError traceback, then orbax's barrier); FedEFM on 2 processes wrote each
  result twice, then hung. Now both processes stop with one line naming the fix, exit 2, and leave no workdir."""
  quick = ["--config=configs/quickstart.py", "--config.num_rounds=1"]
  cases = [
    (lambda i: [*quick, f"--config.seed={i}"], r"different configs \(config\.seed: 0 on process 0, 1 on process 1\)"),
    (lambda i: [*quick, f"--workdir={tmp_path / f'w{i}'}"], r"process\(es\) \[1\] do not see the workdir \S*w0 that"),
    (
      lambda i: [*quick, "--config.num_clients=3", "--config.clients_per_round=3"],
      r"clients_per_round=3 cannot be split",
    ),
    (lambda i: ["--config=configs/fedefm.py:tiny"], r"a FedEFM experiment runs in one process \(this is one of 2\)"),
    # a config process 1's own checks refuse: named as a difference (process 0 waited, then trained and crashed)
    (lambda i: [*quick, *(["--config.local_steps=0"] if i else [])], r"config\.local_steps: 4 on process 0, 0 on"),
  ]
  for k, (each, message) in enumerate(cases):
    outs = _two_fedkd_processes(lambda i: [f"--workdir={tmp_path / 'w'}", "--cpu_devices=2", *each(i)], timeout=120)
    for p, (_, err) in outs:
      errors = [ln for ln in err.splitlines() if ln.startswith("fedkd: error:")]
      assert p.returncode == 2 and "Traceback" not in err, (k, err[-2000:])
      assert len(errors) == 1 and re.search(message, errors[0]), (k, err[-2000:])
    assert not [n for n in ("w", "w0", "w1") if (tmp_path / n).exists()], k


@pytest.mark.parametrize("given", [True, False])
def test_slurm_coordinator_port_in_use(cli, tmp_path, given):
  """Task 0 of a SLURM step serves the coordinator on JAX_COORDINATOR_PORT, else on 61440 + job id mod
  4096 (two jobs on one node can pick the same port). Taken: was 'JAX cannot start the multi-process
  runtime from this environment (... Failed to start RPC server); run every process through the
  launcher', the user already had."""
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if given:
      s.bind(("", 0))
    else:  # a port JAX derives from some job id
      for port in range(61440 + os.getpid() % 4096, 61440 + 4096):
        try:
          s.bind(("", port))
          break
        except OSError:
          continue
    s.listen()
    port = s.getsockname()[1]
    env = {
      "SLURM_JOB_ID": str(port - 61440 + 4096 * 7) if not given else "123",
      "SLURM_STEP_NODELIST": "localhost",
      "SLURM_NTASKS": "2",
      "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0",
      "JAX_COORDINATOR_PORT": str(port) if given else None,
      "FEDKD_DISTRIBUTED_TIMEOUT": "30",
    }
    r = cli.run("fedkd.main", ["--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}"], env=env, timeout=120)
  assert not r.timed_out and not r.traceback, r.stderr[-2000:]
  assert r.code == 2, r.stderr[-2000:]
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fedkd: error:")]
  assert len(errors) == 1 and f"port {port} " in errors[0] and "in use" in errors[0], r.stderr[-2000:]
  assert "export JAX_COORDINATOR_PORT=" in errors[0], errors
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("pad", [" {}", "{} "])
def test_coordinator_address_with_spaces_joins(pad):
  """' localhost:PORT' (a quoted shell variable with a space) passed the address check, but JAX could
  not connect to it: the process waited out FEDKD_DISTRIBUTED_TIMEOUT, then blamed the coordinator."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  env.update(JAX_PLATFORMS="cpu", FEDKD_DISTRIBUTED_TIMEOUT="20")
  address = pad.format(f"localhost:{_free_port()}")
  code = (
    "import jax; from fedkd import distributed; "
    f"assert distributed.maybe_initialize({address!r}, 1, 0, cpu_devices=2); "
    "print(jax.process_count(), jax.device_count())"
  )
  r = procs.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["1", "2"], r.stdout
