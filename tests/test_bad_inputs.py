"""Bad input through the real command lines: every case ends with its exit code, no traceback, and one
message that names the problem (a value, file or flag) and the fix. Runs each case as a fork of one
server process (tests/cli_server.py) that imported the entry points once."""

from __future__ import annotations

import fcntl
import json
import os
import re
import textwrap

import pytest


QS = "--config=configs/quickstart.py"
EFM = "--config=configs/fedefm.py:tiny"
# A run of seconds: 2 rounds of a 4-channel one-level UNet on 32 px, 2 clients: the quickstart's tiny
# sweep config (fedkd.sweep.TINY), whose programs other tests' runs compile too (persistent cache).
TINY = [
  "--config.image_size=32",
  "--config.model.depth=1",
  "--config.model.width=4",
  "--config.model.groups=2",
  "--config.num_clients=2",
  "--config.clients_per_round=2",
  "--config.num_rounds=2",
  "--config.local_steps=1",
  "--config.batch_size=2",
  "--config.eval.examples_per_site=2",
  "--config.eval.every=1",
  "--config.checkpoint.every=1",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("inputs")
  (d / "a_file").write_text("not a folder")
  (d / "raises.py").write_text("def get_config(arg=None):\n  raise RuntimeError('boom in the config')\n")
  (d / "no_get_config.py").write_text("X = 1\n")
  (d / "syntax.py").write_text("def get_config(arg=None)\n  return 1\n")
  (d / "returns_dict.py").write_text("def get_config(arg=None):\n  return {'task': 'fedavg'}\n")
  (d / "lacks_group.py").write_text(
    textwrap.dedent("""
      import ml_collections
      def get_config(arg=None):
        return ml_collections.ConfigDict({'task': 'fedavg', 'seed': 0})
      """)
  )
  topo = {
    "missing": None,
    "malformed": "0 1\nzero two\n",
    "negative_id": "0 1\n-1 2\n",
    "negative_weight": "0 1 1.0\n1 2 -0.5\n2 3 1\n3 0 1\n",
    "nan_weight": "0 1 nan\n1 2 1\n2 3 1\n3 0 1\n",
    "ragged.json": "[[0, 1, 0], [1, 0]]",
    "nonsquare.json": "[[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]",
    "isolated": "0 1\n1 2\n2 0\n",
    "nonnumeric.json": '[["a", 1], [1, 0]]',
  }
  for name, text in topo.items():
    if text is not None:
      (d / f"topo_{name}").write_text(text)
  (d / "topo_dir").mkdir()
  return d


# (name, module, args, expected exit code, substrings the message must contain)
def cases(f, w="w"):
  w = str(f / w)  # a workdir that a refused run must not create
  main = "fedkd.main"
  c = [
    # flags and config files
    ("unknown flag", main, [QS, f"--workdir={w}", "--bogus"], 2, ["bogus"]),
    ("no --config", main, [f"--workdir={w}"], 2, ["--config is required"]),
    ("no --workdir", main, [QS], 2, ["--workdir is required"]),
    ("config not found", main, ["--config=configs/nope.py", f"--workdir={w}"], 2, ["nope.py", "not found"]),
    ("config is a folder", main, ["--config=configs", f"--workdir={w}"], 2, ["folder"]),
    ("unknown variant quickstart", main, [QS + ":whatever", f"--workdir={w}"], 2, ["whatever"]),
    ("unknown variant fedefm", main, ["--config=configs/fedefm.py:nonsense", f"--workdir={w}"], 2, ["nonsense"]),
    ("config raises", main, [f"--config={f}/raises.py", f"--workdir={w}"], 2, ["boom in the config", "line 2"]),
    ("config lacks get_config", main, [f"--config={f}/no_get_config.py", f"--workdir={w}"], 2, ["get_config"]),
    ("config syntax error", main, [f"--config={f}/syntax.py", f"--workdir={w}"], 2, ["SyntaxError", "line 1"]),
    ("config returns dict", main, [f"--config={f}/returns_dict.py", f"--workdir={w}"], 2, ["ConfigDict"]),
    ("config lacks a group", main, [f"--config={f}/lacks_group.py", f"--workdir={w}"], 2, ["missing", "base_config"]),
    ("unknown config key", main, [QS, f"--workdir={w}", "--config.num_clientz=3"], 2, ["num_clientz", "num_clients"]),
    # a hint from the config's own task schema (FedEFM keys for a FedEFM config)
    ("fedefm key typo", main, [EFM, f"--workdir={w}", "--config.fedefm.zzzz=1"], 2, ["task 'fedefm'", "matcha_budget"]),
    (
      "key of the other task",
      main,
      [QS, f"--workdir={w}", "--config.fedefm.beta=0.3"],
      2,
      ["of task 'fedefm'", "'fedavg'"],
    ),
    ("key under a value", main, [QS, f"--workdir={w}", "--config.seed.x=1"], 2, ["config.seed", "value"]),
    ("int key given float", main, [QS, f"--workdir={w}", "--config.num_rounds=1.5"], 2, ["num_rounds"]),
    ("positional argument", main, [QS, f"--workdir={w}", "extra"], 2, ["extra"]),
    # values
    (
      "lr nan",
      main,
      [QS, f"--workdir={w}", "--config.client_optimizer.learning_rate=nan"],
      2,
      ["client_optimizer.learning_rate", "finite"],
    ),
    (
      "lr inf",
      main,
      [QS, f"--workdir={w}", "--config.server_optimizer.learning_rate=inf"],
      2,
      ["server_optimizer.learning_rate", "finite"],
    ),
    ("lr negative", main, [QS, f"--workdir={w}", "--config.client_optimizer.learning_rate=-1"], 2, ["learning_rate"]),
    ("ce_weight nan", main, [QS, f"--workdir={w}", "--config.loss.ce_weight=nan"], 2, ["loss.ce_weight"]),
    ("quantity_skew nan", main, [QS, f"--workdir={w}", "--config.quantity_skew=nan"], 2, ["quantity_skew"]),
    ("dirichlet_alpha inf", main, [QS, f"--workdir={w}", "--config.data.dirichlet_alpha=inf"], 2, ["dirichlet_alpha"]),
    ("workers negative", main, [QS, f"--workdir={w}", "--config.data.workers=-1"], 2, ["data.workers", ">= 0"]),
    ("seed beyond int64", main, [QS, f"--workdir={w}", f"--config.seed={2**70}"], 2, ["config.seed"]),
    ("seed beyond 32 bits", main, [QS, f"--workdir={w}", f"--config.seed={2**32}"], 2, ["config.seed", "32"]),
    ("seed negative", main, [QS, f"--workdir={w}", "--config.seed=-1"], 2, ["config.seed"]),
    ("num_clients huge", main, [QS, f"--workdir={w}", "--config.num_clients=1000000000000"], 2, ["num_clients"]),
    ("per_round > clients", main, [QS, f"--workdir={w}", "--config.clients_per_round=9"], 2, ["clients_per_round"]),
    (
      "host_memory unknown",
      main,
      [QS, f"--workdir={w}", "--config.engine.host_memory=kept"],
      2,
      ["host_memory", "'keep'"],
    ),
    ("fedefm host_memory unknown", main, [EFM, f"--workdir={w}", "--config.engine.host_memory=no"], 2, ["host_memory"]),
    (
      "cldice_iters negative",
      main,
      [QS, f"--workdir={w}", "--config.loss.name=cldice", "--config.loss.cldice_iters=-2"],
      2,
      ["cldice_iters"],
    ),
    (
      "unseen_site synthetic",
      main,
      [QS, f"--workdir={w}", "--config.data.unseen_site=foo"],
      2,
      ["unseen_site", "tfds"],
    ),
    ("image too small", main, [QS, f"--workdir={w}", "--config.image_size=16"], 2, ["image_size"]),
    ("image not divisible", main, [QS, f"--workdir={w}", "--config.image_size=60"], 2, ["image_size"]),
    ("model unknown", main, [QS, f"--workdir={w}", "--config.model.name=resnet"], 2, ["model.name"]),
    ("task unknown", main, [QS, f"--workdir={w}", "--config.task=bogus"], 2, ["config.task"]),
    ("algorithm unknown", main, [QS, f"--workdir={w}", "--config.algorithm.name=fedfoo"], 2, ["algorithm.name"]),
    (
      "parallelism unknown",
      main,
      [QS, f"--workdir={w}", "--config.engine.client_parallelism=x"],
      2,
      ["client_parallelism"],
    ),
    ("dtype unknown", main, [QS, f"--workdir={w}", "--config.engine.compute_dtype=float16"], 2, ["compute_dtype"]),
    ("data source unknown", main, [QS, f"--workdir={w}", "--config.data.source=bogus"], 2, ["data.source"]),
    (
      "tfds dataset missing",
      main,
      [QS, f"--workdir={w}", "--config.data.source=tfds:nothing_here", f"--config.data.tfds_data_dir={f}"],
      2,
      ["nothing_here"],
    ),
    ("mesh devices", main, [QS, f"--workdir={w}", "--config.mesh.client_devices=99"], 2, ["client_devices"]),
    ("num_rounds zero", main, [QS, f"--workdir={w}", "--config.num_rounds=0"], 2, ["num_rounds"]),
    ("groups do not divide", main, [QS, f"--workdir={w}", "--config.model.groups=3"], 2, ["groups"]),
    ("scaffold with adam", main, [QS, f"--workdir={w}", "--config.algorithm.name=scaffold"], 2, ["scaffold", "sgd"]),
    (
      "momentum 1",
      main,
      [QS, f"--workdir={w}", "--config.client_optimizer.name=sgd", "--config.client_optimizer.momentum=1.0"],
      2,
      ["momentum"],
    ),
    (
      "skip flag not bool",
      main,
      [QS, f"--workdir={w}", "--config.engine.skip_nonfinite_clients=maybe"],
      2,
      ["skip_nonfinite_clients"],
    ),
    ("cpu_devices zero", main, [QS, f"--workdir={w}", "--cpu_devices=0"], 2, ["cpu_devices"]),
    ("coordinator alone", main, [QS, f"--workdir={w}", "--coordinator_address=localhost:1"], 2, ["--num_processes"]),
    # workdirs
    ("workdir is a file", main, [QS, f"--workdir={f}/a_file"], 2, ["a_file", "file"]),
    ("workdir parent is a file", main, [QS, f"--workdir={f}/a_file/run"], 2, ["a_file"]),
    ("workdir under /proc", main, [QS, "--workdir=/proc/fedkd_run"], 2, ["/proc/fedkd_run"]),
    ("workdir under /sys", main, [QS, "--workdir=/sys/fedkd_run"], 2, ["/sys/fedkd_run"]),
    ("gs workdir without gcsfs", main, [QS, "--workdir=gs://fedkd-test-bucket/run"], 2, ["gs://", "gcsfs"]),
    # FedEFM: every setting checked before the first run trains
    ("fedefm weight_mode", main, [EFM, f"--workdir={w}", "--config.fedefm.weight_mode=bogus"], 2, ["weight_mode"]),
    ("fedefm temperature 0", main, [EFM, f"--workdir={w}", "--config.fedefm.temperature=0"], 2, ["temperature"]),
    (
      "fedefm lr nan",
      main,
      [EFM, f"--workdir={w}", "--config.pretrain.learning_rate=nan"],
      2,
      ["pretrain.learning_rate"],
    ),
    ("fedefm unknown method", main, [EFM, f"--workdir={w}", "--config.experiment.methods=fedavg,bogus"], 2, ["bogus"]),
  ]
  for name in (
    "missing",
    "dir",
    "malformed",
    "negative_id",
    "negative_weight",
    "nan_weight",
    "ragged.json",
    "nonsquare.json",
    "isolated",
    "nonnumeric.json",
  ):
    c.append(
      (
        f"topology {name}",
        main,
        [EFM, f"--workdir={w}", "--config.fedefm.mixing=dfl", f"--config.fedefm.topology=file:{f}/topo_{name}"],
        2,
        [f"topo_{name}"],
      )
    )
  ev, pv = "fedkd.eval", "fedkd.data.preview"
  c += [
    ("eval no workdir", ev, [], 2, ["--workdir is required"]),
    ("eval workdir missing", ev, [f"--workdir={f}/nowhere"], 2, ["nowhere"]),
    ("eval workdir is a file", ev, [f"--workdir={f}/a_file"], 2, ["a_file"]),
    ("eval no checkpoints", ev, [f"--workdir={f}"], 2, ["checkpoints"]),
    ("eval examples 0", ev, [f"--workdir={f}", "--examples=0"], 2, ["--examples"]),
    ("eval spacing negative", ev, [f"--workdir={f}", "--spacing_mm=-1"], 2, ["--spacing_mm"]),
    ("eval round negative", ev, [f"--workdir={f}", "--round=-3"], 2, ["--round"]),
    ("eval unknown flag", ev, [f"--workdir={f}", "--bogus=1"], 2, ["bogus"]),
    ("eval under /proc", ev, ["--workdir=/proc/fedkd_run"], 2, ["/proc/fedkd_run"]),
    ("preview out without extension", pv, [QS, f"--out={f}/picture"], 2, ["--out", ".png"]),
    ("preview out is a folder", pv, [QS, f"--out={f}"], 2, ["--out"]),
    ("preview frames 0", pv, [QS, f"--out={f}/p.png", "--frames=0"], 2, ["--frames"]),
    ("preview bad config", pv, [QS, "--config.image_size=7"], 2, ["image_size"]),
    ("preview no config", pv, [], 2, ["--config is required"]),
    (
      "build data_dir is a file",
      "fedkd.data.tfds.build",
      ["--dataset=synthetic_endovascular", f"--data_dir={f}/a_file"],
      2,
      ["a_file"],
    ),
    ("build unknown dataset", "fedkd.data.tfds.build", ["--dataset=bogus", f"--data_dir={f}/d"], 2, ["bogus"]),
    (
      "build manual_dir missing",
      "fedkd.data.tfds.build",
      ["--dataset=xray_folder", f"--data_dir={f}/d"],
      2,
      ["manual_dir"],
    ),
    (
      "build manual_dir absent",
      "fedkd.data.tfds.build",
      ["--dataset=xray_folder", f"--data_dir={f}/d", f"--manual_dir={f}/nowhere"],
      2,
      ["nowhere"],
    ),
  ]
  return c


CASE_NAMES = [c[0] for c in cases(__import__("pathlib").Path("/x"))]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(cli, files, name):
  wname = "w-" + "".join(ch if ch.isalnum() else "_" for ch in name)
  _, module, args, code, needles = next(c for c in cases(files, wname) if c[0] == name)
  r = cli.run(module, args, timeout=240)
  assert not r.timed_out, f"{name}: timed out\n{r.stderr[-2000:]}"
  assert not r.traceback, f"{name}: traceback\n{r.stderr[-3000:]}"
  assert r.code == code, f"{name}: exit {r.code}\n{r.stderr[-2000:]}"
  errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
  assert len(errors) == 1, f"{name}: expected one error line\n{r.stderr[-2000:]}"
  for needle in needles:
    assert needle.lower() in errors[0].lower(), f"{name}: {needle!r} not in {errors[0]!r}"
  assert not (files / wname).exists(), f"{name}: created the workdir of a refused run"


def test_no_local_folder_for_gs_workdir(cli, tmp_path):
  r = cli.run("fedkd.main", [QS, "--workdir=gs://fedkd-test-bucket/run"], cwd=str(tmp_path))
  assert r.code == 2 and not r.traceback
  assert not (tmp_path / "gs:").exists()  # was: a local folder named 'gs:'


def test_a_sweep_output_folder_as_workdir_is_refused_and_left_as_it_was(cli, tmp_path):
  """fedkd.main wrote config.json, metrics.jsonl, checkpoints/ (and with a FedEFM config results.md) into
  a launch.sweep --out; the sweep then refused its own folder as a run's workdir."""
  out = tmp_path / "sweep"
  out.mkdir()
  (out / "sweep.json").write_text('{"config": "configs/quickstart.py", "runs": []}')
  r = cli.run("fedkd.main", [QS, f"--workdir={out}", *TINY])
  errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
  assert r.code == 2 and not r.traceback and len(errors) == 1, r.stderr[-2000:]
  assert "launch.sweep output folder" in errors[0] and "own --workdir" in errors[0]
  assert sorted(os.listdir(out)) == ["sweep.json"]


def test_workdirs_that_would_mix_runs_are_refused_and_left_as_they_were(cli, tmp_path):
  """The parent of --seeds replicas given without --seeds (a new run would start from scratch among them), a
  single run's folder given --seeds (the replicas would go inside that run), and a workdir inside another run's
  checkpoints/ (whose old steps that run removes, the inner run with them): one line each, nothing added."""
  parent = tmp_path / "replicas"
  for name in ("seed-0", "seed-1"):
    (parent / name / "checkpoints").mkdir(parents=True)
  run = tmp_path / "one"
  (run / "checkpoints" / "2").mkdir(parents=True)
  (run / "config.json").write_text('{"task": "fedavg", "seed": 0, "num_rounds": 2}')
  before = _tree(tmp_path)
  cases = [
    ([f"--workdir={parent}"], "holds no run of its own but runs in its subfolders (seed-0, seed-1)"),
    ([f"--workdir={run}", "--seeds=0,1"], "holds a run of its own"),
    ([f"--workdir={run / 'checkpoints' / '2' / 'inner'}"], "the checkpoints/ folder of the run in"),
  ]
  for args, needle in cases:
    r = cli.run("fedkd.main", [QS, *args, *TINY])
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert r.code == 2 and not r.traceback and len(errors) == 1, r.stderr[-2000:]
    assert needle in errors[0], errors[0]
    assert _tree(tmp_path) == before, args


def _tree(root):
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_refused_run_leaves_no_lock_file_it_made(cli, tmp_path):
  """A workdir without a .lock (copied, or written before locks) refused at its resume check, and a folder whose
  config.json fedkd did not write: the refusal adds nothing, the lock file it took included. A workdir that
  had its (emptied) lock file keeps it."""
  work = tmp_path / "run"
  r = cli.run("fedkd.main", [QS, f"--workdir={work}", *TINY, "--config.num_rounds=1"])
  assert r.code == 0, r.stderr[-2000:]
  (work / ".lock").unlink()
  before = _tree(work)
  r = cli.run("fedkd.main", [QS, f"--workdir={work}", *TINY, "--config.client_optimizer.learning_rate=0.5"])
  assert r.code == 2 and "client_optimizer.learning_rate" in r.stderr and not r.traceback, r.stderr[-2000:]
  assert _tree(work) == before
  (work / ".lock").write_text("")
  r = cli.run("fedkd.main", [QS, f"--workdir={work}", *TINY, "--config.client_optimizer.learning_rate=0.5"])
  assert r.code == 2 and _tree(work) == sorted([*before, ".lock"])
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "config.json").write_text('{"a": 1}')
  r = cli.run("fedkd.main", [QS, f"--workdir={foreign}", *TINY])
  assert r.code == 2 and "not a config fedkd wrote" in r.stderr, r.stderr[-2000:]
  assert _tree(foreign) == ["config.json"]


def test_second_process_refused_and_stale_lock_taken_over(cli, tmp_path):
  work = tmp_path / "run"
  work.mkdir()
  fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live holder
  os.write(fd, json.dumps({"pid": os.getpid(), "host": "this-host", "started": 0, "command": "fedkd.main"}).encode())
  try:
    r = cli.run("fedkd.main", [QS, f"--workdir={work}", *TINY])
    assert r.code == 2 and not r.traceback, r.stderr[-2000:]
    assert f"pid {os.getpid()}" in r.stderr and "in use" in r.stderr
    assert not (work / "checkpoints").exists()
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
  # the holder is gone (lock released, its record left behind as after a kill -9): taken over
  r = cli.run("fedkd.main", [QS, f"--workdir={work}", *TINY])
  assert r.code == 0, r.stderr[-3000:]
  assert "took over the lock" in r.stderr + r.stdout


def test_help_lists_flags_and_config_keys(cli):
  for module, args in (
    ("fedkd.main", ["--help"]),
    ("fedkd.main", ["-h"]),
    ("fedkd.eval", ["--help"]),
    ("fedkd.data.preview", ["-h"]),
  ):
    r = cli.run(module, args)
    assert r.code == 0 and not r.traceback, (module, args, r.stderr[-1000:])
    assert "--workdir" in r.stdout or "--config" in r.stdout, (module, r.stdout[:500])
  # each lists the shared flags it reads, and refuses those it would ignore
  for module, reads, ignores in (
    ("fedkd.main", ("--config", "--workdir"), ("--out", "--frames")),
    ("fedkd.eval", ("--workdir", "--out", "--frames"), ("--config",)),
    ("fedkd.data.preview", ("--config", "--out", "--frames"), ("--workdir",)),
  ):
    r = cli.run(module, ["--help"])
    shown = [line.split(":")[0].strip() for line in r.stdout.splitlines() if line.startswith("  --")]
    assert all(f in shown for f in reads) and not any(f in shown for f in ignores), (module, shown)
    for f in ignores:
      r = cli.run(module, [QS, f"{f}=x"])
      assert r.code == 2 and not r.traceback and f"{f} is not a flag of this program" in r.stderr, r.stderr
  r = cli.run("fedkd.main", ["--helpfull"])
  assert r.code == 0 and not r.traceback, r.stderr[-1000:]
  from fedkd.config import base_config, fedefm_base_config

  for schema in (base_config(), fedefm_base_config()):
    for key, value in schema.items():
      if not hasattr(value, "items"):
        assert f"--config.{key}=" in r.stdout, key
    for key in ("client_optimizer.learning_rate", "engine.skip_nonfinite_clients", "fedefm.weight_mode"):
      assert f"--config.{key}=" in r.stdout, key
  # one meaning per key line: every key of the fedavg schema carries a description line
  lines = r.stdout.splitlines()
  keyed = [i for i, ln in enumerate(lines) if ln.startswith("  --config.")]
  undocumented = [lines[i] for i in keyed if i + 1 >= len(lines) or not lines[i + 1].startswith("      ")]
  assert not undocumented, undocumented[:5]


def test_divergence_stops_before_saving(cli, tmp_path):
  """A learning rate of 1e8 trains to NaN: one line naming the round and the cause, exit 2, and no
  checkpoint or metrics record of the bad state; the good checkpoint before it is intact."""
  work = tmp_path / "run"
  r = cli.run(
    "fedkd.main",
    [QS, f"--workdir={work}-nan", *TINY, "--config.num_rounds=3", "--config.client_optimizer.learning_rate=1e8"],
  )
  assert r.code == 2 and not r.traceback, r.stderr[-3000:]
  err = [ln for ln in r.stderr.splitlines() if "error:" in ln]
  # in a round whose update is NaN, or by a round whose finite but huge parameters give NaN outputs
  found = re.search(r"training diverged (?:in|by) round (\d+): ", err[0]) if len(err) == 1 else None
  assert found and "learning_rate=1e+08" in err[0], err
  ckdir = tmp_path / "run-nan" / "checkpoints"
  saved = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) if ckdir.exists() else []
  bad_round = int(found.group(1))
  assert all(s < bad_round for s in saved), (saved, bad_round)
  recs = [json.loads(ln) for ln in (tmp_path / "run-nan" / "metrics.jsonl").read_text().splitlines()]
  assert all(rec["round"] < bad_round for rec in recs)
  # with skip_nonfinite_clients the huge-lr clients are dropped; all of them diverge, so it still stops
  r = cli.run(
    "fedkd.main",
    [
      QS,
      f"--workdir={work}-skip",
      *TINY,
      "--config.client_optimizer.learning_rate=1e8",
      "--config.engine.skip_nonfinite_clients=True",
    ],
  )
  assert r.code == 2 and "diverged" in r.stderr and not r.traceback, r.stderr[-2000:]
