"""The configuration surface as a user meets it: ``--config.KEY=VALUE`` overrides of every type are applied
exactly or refused in one line that names the key and the form to write; the task of a config cannot be
switched by an override; ``-config.KEY`` / ``--noconfig.KEY`` are checked like ``--config.KEY``; keys the
chosen options never read are named on a ``note:`` line; ``--helpfull`` lists only the flags the program
reads; docs/configs.md keeps every comment of a key. Most cases run ``fedkd.cli.parse`` in a small
subprocess (absl's flags are process-global), without JAX."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fedkd import config as fc
from fedkd.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
QS = "--config=configs/quickstart.py"
EFM = "--config=configs/fedefm.py:tiny"

# Parses argv as fedkd.main does (fedkd.cli.parse), then prints the resulting config as JSON on the last line.
PARSE = """
import sys
from fedkd import cli
cli.parse(["fedkd.main"] + sys.argv[1:], shared=("workdir",))
print("overridden:", ",".join(sorted(cli.OVERRIDDEN)), file=sys.stderr)
print(cli.CONFIG.value.to_json())
"""


def _parse(*args: str):
  """(exit code, stdout lines before the config, stderr, config dict or None)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run(
    [sys.executable, "-c", PARSE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
  )
  out = r.stdout
  i = out.find("{")
  config = json.loads(out[i:]) if r.returncode == 0 and i >= 0 else None
  return r.returncode, (out[:i] if i >= 0 else out).splitlines(), r.stderr, config


def _one_line_error(code, stderr, *needles):
  assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
  lines = stderr.strip().splitlines()
  lines = [ln for ln in lines if not ln.startswith("overridden:")]
  assert len(lines) == 1 and lines[0].startswith("fedkd: error: "), stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"_usage_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_overrides_of_every_type_are_applied_exactly():
  code, notes, err, c = _parse(
    QS,
    "--config.seed=4294967295",
    "--config.num_rounds=0x10",  # absl's integer syntax
    "--config.quantity_skew=-0.0",
    "--config.client_optimizer.learning_rate=3E-3",
    "--config.data.tfds_configs=a, b,c",
    "--config.data.tfds_data_dir=/tmp/a dir",
    "--config.engine.remat=True",
    "--config.engine.skip_nonfinite_clients=1",
    "--noconfig.data.prefetch",
    "-config.batch_size=4",
    "--config.local_steps",
    "3",
    "--config.eval.every=2",
    "--config.eval.every=7",  # given twice: the last value
  )
  assert code == 0, err
  assert c["seed"] == 4294967295 and c["num_rounds"] == 16 and c["batch_size"] == 4 and c["local_steps"] == 3
  assert c["quantity_skew"] == 0.0 and str(c["quantity_skew"]) == "-0.0"
  assert c["client_optimizer"]["learning_rate"] == 0.003
  assert c["data"]["tfds_configs"] == "a, b,c" and c["data"]["tfds_data_dir"] == "/tmp/a dir"
  assert c["engine"]["remat"] is True and c["engine"]["skip_nonfinite_clients"] is True
  assert c["data"]["prefetch"] is False and c["eval"]["every"] == 7
  # the keys given on the command line, for entry points that check them against their own flags
  given = "batch_size,client_optimizer.learning_rate,data.prefetch,data.tfds_configs,data.tfds_data_dir,"
  given += "engine.remat,engine.skip_nonfinite_clients,eval.every,local_steps,num_rounds,quantity_skew,seed"
  assert f"overridden: {given}" in err, err


@pytest.mark.parametrize(
  "arg, needles",
  [
    ("--config.num_rounds=8.0", ["--config.num_rounds=8.0", "whole number", "--config.num_rounds=8"]),
    ("--config.num_rounds=1e3", ["whole number", "--config.num_rounds=1000"]),
    ("--config.num_rounds=8.5", ["--config.num_rounds=8.5", "whole number", "--config.num_rounds=150"]),
    ("--config.num_rounds=inf", ["whole number"]),
    ("--config.num_rounds=", ["--config.num_rounds=:", "whole number"]),
    ("--config.data.augment=yes", ["--config.data.augment=yes", "--config.data.augment=true", "=false"]),
    ("--config.engine.remat=no", ["--config.engine.remat=no", "--config.engine.remat=false"]),
    ("--config.quantity_skew=lots", ["--config.quantity_skew=lots", "takes a number", "--config.quantity_skew=0.0"]),
    # task: the file's keys belong to one task
    ("--config.task=fedefm", ["--config.task=fedefm", "task 'fedavg'", "--config=configs/fedefm.py"]),
    ("--config.task=bogus", ["--config.task=bogus", "--config=configs/quickstart.py"]),
    # the single-dash and negated forms are overrides too: the key is checked
    ("-config.num_roundz=3", ["unknown config key --config.num_roundz", "did you mean --config.num_rounds?"]),
    ("--noconfig.data.augmnt", ["unknown config key --config.data.augmnt", "--config.data.augment?"]),
  ],
)
def test_bad_override_is_one_line_naming_key_and_form(arg, needles):
  code, _, err, _ = _parse(QS, arg)
  line = _one_line_error(code, err, *needles)
  assert "invalid literal" not in line and "Non-boolean" not in line and "AttributeError" not in line


def test_fedefm_overrides_typed_and_task_fixed():
  code, _, err, _ = _parse(EFM, "--config.pretrain.num_rounds=2.0")
  _one_line_error(code, err, "--config.pretrain.num_rounds=2")
  code, _, err, _ = _parse(EFM, "--config.task=fedavg")
  _one_line_error(code, err, "task 'fedefm'", "--config=configs/quickstart.py")
  code, _, err, c = _parse(EFM, "--config.task=fedefm", "--config.fedefm.emd_debias=false")
  assert code == 0 and c["task"] == "fedefm" and c["fedefm"]["emd_debias"] is False, err


def test_a_refused_override_creates_no_workdir(cli, tmp_path):
  work = tmp_path / "w"
  for arg in ("--config.num_rounds=2.0", "--config.task=fedefm", "-config.num_roundz=1"):
    r = cli.run("fedkd.main", [QS, f"--workdir={work}", arg], timeout=120)
    assert r.code == 2 and not r.traceback, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedkd: error: ") and arg.split("=")[0].lstrip("-") in lines[0]
    assert not work.exists()


def test_notes_name_keys_the_chosen_options_do_not_read():
  code, notes, err, _ = _parse(
    QS,
    "--config.algorithm.prox_mu=0.5",
    "--config.dp.noise_multiplier=2",
    "--config.dp.clip_norm=0.1",  # the default, but given: still named
    "--config.client_optimizer.momentum=0.9",
    "--config.data.partition=dirichlet",
    "--config.aggregator.name=median",
    "--config.aggregator.trim_beta=0.2",
  )
  assert code == 0, err
  text = "\n".join(notes)
  assert all(line.startswith("note: ") for line in notes), notes
  for needle in (
    "config.algorithm.prox_mu=0.5 has no effect while config.algorithm.name='fedavg'",
    "config.dp.clip_norm=0.1, config.dp.noise_multiplier=2.0 have no effect while config.dp.enabled=False",
    "config.client_optimizer.momentum=0.9 has no effect while config.client_optimizer.name='adam'",
    "config.data.partition='dirichlet' has no effect while config.data.source='synthetic'",
    "config.aggregator.trim_beta=0.2 has no effect while config.aggregator.name='median'",
  ):
    assert needle in text, (needle, text)
  # the same keys where their option is on: no note
  code, notes, err, _ = _parse(
    QS,
    "--config.algorithm.name=fedprox",
    "--config.algorithm.prox_mu=0.5",
    "--config.dp.enabled=true",
    "--config.dp.noise_multiplier=2",
    "--config.aggregator.name=trimmed_mean",
    "--config.aggregator.trim_beta=0.2",
  )
  assert code == 0 and notes == [], (notes, err)


def test_unused_keys_by_combination():
  c = fc.base_config()
  unused = fc.unused_keys(c)
  for key in ("algorithm.moon_mu", "algorithm.prox_mu", "dp.clip_norm", "attack.factor", "compress.fraction"):
    assert key in unused, key
  for key in ("num_rounds", "algorithm.dropout", "client_optimizer.learning_rate", "server_optimizer.momentum"):
    assert key not in unused, key
  c.server_optimizer.name = "adagrad"
  c.attack.name = "gaussian"
  c.loss.name = "focal_tversky"
  c.data.source = "tfds:x"
  unused = fc.unused_keys(c)
  assert {"server_optimizer.momentum", "server_optimizer.b2", "attack.factor", "loss.ce_weight"} <= set(unused)
  assert "data.synthetic_field_size" in unused and "data.dirichlet_alpha" in unused
  assert not {"server_optimizer.initial_accumulator", "attack.noise_std", "loss.tversky_alpha", "data.augment"} & set(
    unused
  )
  # the shipped configs set nothing they do not use
  for name, arg in (("quickstart", None), ("cross_device", None), ("privacy", None), ("zoo", None), ("robust", None)):
    assert fc.unused_notes(_load(name).get_config(arg)) == [], name
  efm = _load("fedefm").get_config("tiny")
  assert fc.unused_notes(efm) == []
  efm.fedefm.matcha_budget = 0.9
  assert fc.unused_notes(efm) == [
    "note: config.fedefm.matcha_budget=0.9 has no effect while no experiment method is 'matcha'"
  ]
  efm.experiment.methods += ",matcha"
  assert fc.unused_notes(efm) == []


def test_the_distillation_keys_are_noted_unused_when_no_method_distils():
  """fedefm.beta and the other silo-update options are read by fedefm, fedefm_dfl, fedefm_uniform and
  fedefm_e0 only (fedkd/distill/fedefm.py builds the KD term for them alone)."""
  efm = fc.fedefm_base_config()
  efm.experiment.methods = "scratch,fedavg,ring"
  efm.experiment.kd_methods = "fedavg"
  efm.fedefm.beta, efm.fedefm.temperature = 0.9, 3.0
  (note,) = fc.unused_notes(efm)
  assert note.startswith("note: config.fedefm.beta=0.9, config.fedefm.temperature=3.0 have no effect while ")
  assert "no experiment method distils" in note, note
  for method in ("fedefm", "fedefm_dfl", "fedefm_uniform", "fedefm_e0"):
    efm.experiment.methods = f"scratch,{method}"
    assert fc.unused_notes(efm) == [], method
  # every key in the list exists in the FedEFM schema and its own default
  schema = fc.fedefm_base_config()
  efm.experiment.methods = "fedavg"
  keys = [k for k in fc.unused_keys(efm) if "distils" in fc.unused_keys(efm)[k]]
  assert len(keys) == 11 and all(k.split(".")[1] in schema.fedefm for k in keys), keys
  # fedavg_matched measures FedEFM's round, its expert steps included, to size its local steps: 3 local steps
  # and 1 vs 3 expert steps give it 2 vs 4 times the steps (fedkd.tasks.fedefm.Experiment._matched_factor)
  efm.experiment.methods = "scratch,fedavg_matched"
  efm.fedefm.beta, efm.fedefm.temperature = 0.5, 2.0
  efm.fedefm.expert_steps = 3
  assert "fedefm.expert_steps" not in fc.unused_keys(efm) and fc.unused_notes(efm) == []
  efm.fedefm.matched_steps_factor = 2  # a given factor: nothing is measured
  assert fc.unused_notes(efm) == [
    "note: config.fedefm.expert_steps=3 has no effect while no experiment method distils from overseas experts "
    "(fedefm / fedefm_dfl / fedefm_uniform / fedefm_e0)"
  ]


@pytest.mark.parametrize(
  "name, arg, clients",
  [
    ("fedavg_unet", "per_round=40", 16),
    ("cross_device", "clients=8,per_round=16", 8),
    ("privacy", "clients=4,per_round=5", 4),
  ],
)
def test_per_round_above_clients_is_refused_after_the_overrides(name, arg, clients):
  """The check runs on the final config: --config.num_clients may make a file argument's per_round valid."""
  c = _load(name).get_config(arg)
  with pytest.raises(ConfigError) as e:
    fc.validate(c, 1)
  assert f"--config.clients_per_round={clients} (or less)" in str(e.value) and "per_round=" in str(e.value)
  assert "fedavg_unet" not in str(e.value)  # (it named configs/fedavg_unet.py, whatever the file)
  c.num_clients = 64  # as --config.num_clients=64 would set it after get_config
  fc.validate(c, 1)


def test_helpfull_lists_only_the_shared_flags_the_program_reads():
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  code = "import sys\nfrom fedkd import cli\nsys.argv = ['fedkd.main', '--helpfull']\ncli.parse(shared=('workdir',))"
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  flags_shown = [ln.split(":")[0].strip() for ln in r.stdout.splitlines() if ln.startswith("  --")]
  assert "--config" in flags_shown and "--workdir" in flags_shown, flags_shown
  assert "--out" not in flags_shown and "--frames" not in flags_shown, flags_shown
  assert "--verbosity" in " ".join(r.stdout.split()) and "--config.num_rounds=20" in r.stdout


def test_key_docs_keep_the_comment_above_a_key_with_its_own():
  fedavg = fc._key_docs(fc.base_config)
  assert fedavg["server_optimizer.name"].startswith("sgd | adam | adamw | yogi | adagrad")
  assert "FedYogi / FedAdagrad exactly as Reddi et al. 2021" in fedavg["server_optimizer.name"]
  efm = fc._key_docs(fc.fedefm_base_config)
  assert "auto | vmap | chunked | unroll" in efm["engine.client_layout"]
  assert "auto: on CPU vmap" in efm["engine.client_layout"]
  page = (ROOT / "docs" / "configs.md").read_text()
  assert "FedYogi / FedAdagrad exactly as Reddi et al. 2021" in page and "auto: on CPU vmap" in page


def test_config_files_that_absl_cannot_take_are_one_line(tmp_path, capsys):
  from fedkd import cli

  frozen = tmp_path / "frozen.py"
  frozen.write_text(
    "import ml_collections\nfrom fedkd.config import base_config\n"
    "def get_config(arg=None):\n  return ml_collections.FrozenConfigDict(base_config())\n"
  )
  with pytest.raises(SystemExit) as e:
    cli._preload_config(str(frozen), None)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("fedkd: error: ") and "FrozenConfigDict" in err and "ml_collections.ConfigDict" in err, err
  # a key a config file set to None: absl cannot type an override of it
  c = fc.base_config()
  c.eval.max_sites = None
  with pytest.raises(SystemExit) as e:
    cli._check_override_value("eval.max_sites", "3", c)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("fedkd: error: --config.eval.max_sites=3: ") and "None in this config file" in err, err
  # a typed placeholder (None until given) is what absl's config flags do accept: not refused
  from ml_collections import config_dict

  c.eval.max_sites = config_dict.placeholder(int)
  cli._check_override_value("eval.max_sites", "3", c)
  assert capsys.readouterr().err == ""


TYPED_WRONG = [  # (task's base config, dotted key, value the file sets, what the message says the key takes)
  ("base_config", "dp.enabled", "false", "on/off (a bool)"),  # a string 'false' would read as true: DP on
  ("base_config", "num_rounds", True, "a whole number (an int)"),
  ("base_config", "client_optimizer.learning_rate", "0.01", "a number"),
  ("base_config", "data.source", 5, "text (a str)"),
  ("fedefm_base_config", "teacher.skips", "false", "on/off (a bool)"),
]


@pytest.mark.parametrize("schema,key,value,takes", TYPED_WRONG, ids=[k for _, k, _, _ in TYPED_WRONG])
def test_a_config_file_value_of_another_type_is_one_line_naming_the_file(tmp_path, schema, key, value, takes):
  """A config built through a dict (which drops ml_collections' type checks) with a value of another type than
  the key's default: one line naming the file, the key and the type, also when an override of that key is given
  (absl reads it as the file's type, which made the message about the override instead)."""
  group, _, last = key.rpartition(".")
  where = "".join(f"[{part!r}]" for part in group.split(".")) if group else ""
  path = tmp_path / "typed.py"
  path.write_text(
    "import ml_collections\n"
    f"from fedkd.config import {schema}\n"
    "def get_config(arg=None):\n"
    f"  d = {schema}().to_dict()\n"
    f"  d{where}[{last!r}] = {value!r}\n"
    "  return ml_collections.ConfigDict(d)\n"
  )
  override = f"--config.{key}=1" if key == "num_rounds" else "--config.seed=3"
  code, _, err, _ = _parse(f"--config={path}", override)
  _one_line_error(code, err, f"config file {path} sets config.{key}={value!r}", f"the key takes {takes}")


@pytest.mark.parametrize("where", ["module", "get_config"])
def test_a_config_file_that_exits_is_one_line(tmp_path, where):
  """sys.exit(0) in a config file ended fedkd.main with exit 0 having done nothing, and SystemExit('msg') printed
  its bare text."""
  path = tmp_path / "exits.py"
  body = "import sys\n" + ("sys.exit(0)\n" if where == "module" else "def get_config(arg=None):\n  sys.exit(0)\n")
  path.write_text(body)
  code, _, err, _ = _parse(f"--config={path}")
  _one_line_error(code, err, f"config file {path} exited while it was read", "SystemExit(0)")


def test_validate_refuses_a_value_of_another_type_than_the_keys_default():
  import ml_collections

  d = fc.base_config().to_dict()
  d["dp"]["enabled"] = "false"
  with pytest.raises(ConfigError, match=r"config\.dp\.enabled='false' is a str, but the key takes on/off \(a bool\)"):
    fc.validate(ml_collections.ConfigDict(d), 1)
  d["dp"]["enabled"], d["eval"]["every"] = False, None
  with pytest.raises(ConfigError, match=r"config\.eval\.every=None is unset, but the key takes a whole number"):
    fc.validate(ml_collections.ConfigDict(d), 1)


def test_ctrl_c_while_a_config_loads_is_one_line(cli, tmp_path):
  slow = tmp_path / "interrupted.py"
  slow.write_text("def get_config(arg=None):\n  raise KeyboardInterrupt\n")
  r = cli.run("fedkd.main", [f"--config={slow}", f"--workdir={tmp_path / 'w'}"], timeout=120)
  assert r.code == 130 and not r.traceback, r.stderr[-2000:]
  assert r.stderr.strip() == "fedkd: interrupted while reading the flags and config; nothing was written", r.stderr
  assert not (tmp_path / "w").exists()


def test_sizes_beyond_host_memory_are_one_line():
  """numpy's MemoryError for sizes a config asks for (--config.batch_size=1000000000000 fails so while the
  round's client data is drawn) ends like a user error: one line naming the sizes to lower, exit 2."""
  code = (
    "import numpy as np\nfrom fedkd import cli\n"
    "def main(argv):\n  np.zeros((2**30, 2**20), np.float32)\n"
    "cli.run_app(main, ['prog'], uses_config=False, shared=())\n"
  )
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  line = _one_line_error(r.returncode, r.stderr, "out of host memory", "Unable to allocate", "config.batch_size")
  assert "4.00 PiB" in line, line


def test_a_quantity_skew_past_int32_sizes_is_refused_by_validate():
  """The lognormal client sizes of the seed (numpy, as docs/data.md defines them) past 2**31 examples are
  refused by validate, so launch.sweep refuses such a sweep before any run starts; a skew whose largest
  size fits passes."""
  import numpy as np

  c = fc.base_config()
  c.num_clients = 16
  for skew in (3.0, 30.0):
    c.quantity_skew = skew
    rng = np.random.default_rng(np.random.SeedSequence(c.seed, spawn_key=(1,)))  # fedkd.streams' client_sizes
    draw = np.round(c.examples_per_client * rng.lognormal(0.0, skew, c.num_clients))
    if draw.max() < 2**31:
      fc.validate(c, 8)
    else:
      with pytest.raises(ConfigError, match=rf"quantity_skew={skew} is too large"):
        fc.validate(c, 8)
  assert skew == 30.0 and draw.max() >= 2**31  # the last case is refused


def test_a_four_class_model_on_synthetic_data_sees_vessels_labelled():
  """model.num_classes=4 on synthetic data: the clients' masks hold the vessel label (3) besides catheter
  and guidewire (a 3-class model's hold 0-2 only), so dice/vessel measures something."""
  import numpy as np

  from fedkd.data import pipeline

  labels = {}
  for k in (3, 4):
    c = fc.base_config()
    c.num_clients, c.image_size, c.batch_size, c.local_steps = 2, 64, 4, 2
    c.model.num_classes = k
    _, y = pipeline.make_client_data(c).round_batches(1, np.arange(2))
    labels[k] = set(np.unique(np.asarray(y)).tolist())
  assert labels[3] <= {0, 1, 2} and labels[4] == {0, 1, 2, 3}, labels


def test_a_tiny_synthetic_field_and_fedefm_images_past_int32_are_refused():
  """data.synthetic_field_size between 1 and 31 px (devices wider than the field) or above 4096 px, and FedEFM
  silos holding 2**31 images or more (int32 example indices) are one ConfigError each; 0, 32, 4096 and 2**31 - 1
  images pass."""
  c = fc.base_config()
  # past any detector, devices are far thinner than an output pixel (at 10**8 px a run trained on masks of devices
  # nothing drew)
  small, large = "is too small", "is larger than any detector"
  for size, refused in ((0, None), (1, small), (31, small), (32, None), (4096, None), (4097, large), (10**8, large)):
    c.data.synthetic_field_size = size
    if refused is None:
      fc.validate(c, 8)
    else:
      with pytest.raises(ConfigError, match=rf"synthetic_field_size={size} {refused}"):
        fc.validate(c, 8)
  efm = _load("fedefm").get_config("tiny")
  efm.pretrain.num_silos = 2
  for per, ok in (((2**31 - 1) // 2, True), (2**30, False)):
    efm.pretrain.examples_per_silo = per
    if ok:
      fc.validate_fedefm(efm, 8)
    else:
      with pytest.raises(ConfigError, match="2\\*\\*31 images or more"):
        fc.validate_fedefm(efm, 8)


def test_fewer_examples_per_client_than_a_batch_is_refused_not_raised():
  """A synthetic client held max(examples_per_client, batch_size) examples, so examples_per_client=2 with
  batch 8 silently trained on 8; validate refuses it, and allows it where the data come from TFDS records."""
  c = fc.base_config()
  c.examples_per_client, c.batch_size = 2, 8
  with pytest.raises(ConfigError, match=r"examples_per_client=2 is smaller than config.batch_size=8"):
    fc.validate(c, 8)
  c.examples_per_client = 8
  fc.validate(c, 8)
  c.examples_per_client, c.data.source = 2, "tfds:my_hospitals"
  fc.validate(c, 8)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_ditto_pull_that_plain_sgd_cannot_follow_is_refused(momentum):
  """SGD (heavy ball) on Ditto's pull (lambda/2) v^2 alone, over a personal model that persists across rounds,
  grows without bound from lr x lambda = 2 (1 + momentum) on (numpy iteration of optax.sgd's update); validate
  refuses the settings above the bound and accepts those below it. FedProx restarts at the global model every
  round, so its mu is not refused (lr x mu = 2 with one local step: the pull's gradient is 0)."""

  def grows(lr, w, beta):
    x, m = 1.0, 0.0
    for _ in range(400):
      m = beta * m + w * x
      x = x - lr * m
    return abs(x) >= 1.0

  c = fc.base_config()
  c.algorithm.name, c.client_optimizer.name, c.client_optimizer.momentum = "ditto", "sgd", momentum
  c.client_optimizer.learning_rate = 0.05
  bound = 2 * (1 + momentum) / 0.05
  for w in (0.9 * bound, 0.99 * bound, 1.01 * bound, 1.5 * bound):
    c.algorithm.ditto_lambda = w
    if grows(0.05, w, momentum):
      with pytest.raises(
        ConfigError, match=r"config.algorithm.ditto_lambda=.* diverges: learning_rate x ditto_lambda = "
      ):
        fc.validate(c, 8)
    else:
      fc.validate(c, 8)
  c.client_optimizer.name = "adam"  # the bound is plain SGD's
  fc.validate(c, 8)
  c.algorithm.name, c.client_optimizer.name, c.local_steps, c.algorithm.prox_mu = "fedprox", "sgd", 1, 1.5 * bound
  fc.validate(c, 8)


def test_client_state_is_noted_as_unused_where_no_client_keeps_state():
  """algorithm.client_state places per-client rows: noted as unused exactly where the built algorithm has none
  (its init_row is None), for every algorithm, with and without top-k error feedback (a residual per client)."""
  import numpy as np
  import optax

  from fedkd.fl.compress import Compressed
  from fedkd.tasks import fedavg

  params = {"w": np.zeros(3, np.float32)}
  for name in fc.ALGORITHMS:
    for feedback in (False, True):
      c = fc.base_config()
      c.algorithm.name, c.algorithm.client_state = name, "host"
      if feedback:
        c.compress.name, c.compress.error_feedback = "topk", True
      alg = fedavg.make_algorithm(c, optax.sgd(1.0))
      if feedback:
        alg = Compressed(alg, "topk", 0.1, error_feedback=True)
      has_rows = alg.init_row(params) is not None if name != "fedbn" else True  # FedBN: the norm layers
      assert ("algorithm.client_state" in fc.unused_keys(c)) != has_rows, (name, feedback)


def test_loss_weights_that_leave_a_constant_loss_are_refused():
  """Focal Tversky with alpha = beta = 0 is TP / TP = 1 (loss 0, no gradient: nothing trains) and was accepted;
  clDice alone (ce and dice weights 0, cldice_weight > 0) is a loss and was refused."""
  c = fc.base_config()
  c.loss.name, c.loss.tversky_alpha, c.loss.tversky_beta = "focal_tversky", 0.0, 0.0
  with pytest.raises(ConfigError, match=r"tversky_alpha and config.loss.tversky_beta are both 0"):
    fc.validate(c, 8)
  c.loss.tversky_beta = 0.3
  fc.validate(c, 8)
  c = fc.base_config()
  c.loss.name, c.loss.ce_weight, c.loss.dice_weight, c.loss.cldice_weight = "cldice", 0.0, 0.0, 0.5
  fc.validate(c, 8)
  c.loss.cldice_weight = 0.0
  with pytest.raises(ConfigError, match=r"dice_weight and config.loss.cldice_weight are all 0"):
    fc.validate(c, 8)
  c.loss.name = "dice_ce"
  with pytest.raises(ConfigError, match=r"config.loss.ce_weight, config.loss.dice_weight are all 0"):
    fc.validate(c, 8)


def test_evaluating_every_one_of_thousands_of_synthetic_sites_must_be_asked_for():
  """eval.max_sites=0 (all) renders every training site's held-out set before the first round: above
  EVAL_ALL_SITES_MAX sites that is refused, naming the images, their size and the key to set."""
  c = fc.base_config()
  c.num_clients, c.clients_per_round, c.image_size, c.eval.examples_per_site = 20_000, 8, 64, 16
  with pytest.raises(ConfigError) as e:
    fc.validate(c, 8)
  images = (20_000 + 1) * 16  # every training site's and the unseen site's held-out examples
  msg = str(e.value)
  assert f"{images:,} held-out images ({images * 64 * 64 * 8 / 1e9:.1f} GB)" in msg, msg
  assert "--config.eval.max_sites" in msg and "--config.eval.max_sites=20000 for all" in msg
  for max_sites in (5, 20_000):  # set explicitly, either way: accepted
    c.eval.max_sites = max_sites
    fc.validate(c, 8)
  c.eval.max_sites, c.num_clients = 0, fc.EVAL_ALL_SITES_MAX  # at the limit: all sites, as before
  fc.validate(c, 8)
