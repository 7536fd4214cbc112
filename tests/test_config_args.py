"""Config-file arguments (``--config=FILE:ARG`` for get_config, ``--sweep=ARG`` for get_sweep): every config
file reads them with fedkd.config.parse_arg, so an on/off flag never takes a value (``runlocal=0`` is not
silently 'on'), a key that needs a value never goes bare (``clients`` is not silently 1), and every refusal
names the argument, the file the user gave and the accepted forms; ``--config=`` of a non-.py file says what
a config is."""

from __future__ import annotations

import runpy

import pytest

from fedkd.config import FLAG, SEEDS, ConfigError, parse_arg, real_number, whole_number
from fedkd.sweep import TINY


def _config(name: str) -> dict:
  return runpy.run_path(f"configs/{name}.py")


SPEC = {"runlocal": FLAG, "clients": whole_number(1), "skew": real_number(0.0), "seeds": SEEDS}


def test_parse_arg_reads_flags_and_values():
  assert parse_arg(None, SPEC, "configs/x.py") == {}
  assert parse_arg("", SPEC, "configs/x.py") == {}
  assert parse_arg(" runlocal , clients=64,skew=0.5 ", SPEC, "configs/x.py") == {
    "runlocal": True,
    "clients": 64,
    "skew": 0.5,
  }
  assert parse_arg("seeds=3", SPEC, "/anywhere/configs/x.py") == {"seeds": 3}


@pytest.mark.parametrize(
  "arg, needles",
  [
    (
      "runlocal=0",
      ["'runlocal=0'", "configs/x.py", "takes no value", "accepted: runlocal, clients=N, skew=X, seeds=N"],
    ),
    ("runlocal=true", ["'runlocal=true'", "takes no value"]),
    ("runlocal=", ["'runlocal='", "takes no value"]),
    ("clients", ["bad clients=", "configs/x.py:clients", "write clients=N"]),
    ("clients=", ["bad clients=", "write clients=N"]),
    ("clients=0", ["bad clients=", "'0'", "whole number >= 1"]),
    ("clients=2.5", ["bad clients=", "'2.5'"]),
    ("skew", ["bad skew=", "write skew=X"]),
    ("skew=-1", ["bad skew=", "'-1'", ">= 0"]),
    ("skew=nan", ["bad skew=", "'nan'", "finite"]),
    ("seeds=0", ["bad seeds=", "give a number of seeds 1..1000"]),
    ("seeds=1000000000", ["bad seeds=", "give a number of seeds 1..1000"]),
    ("clients=2,clients=3", ["'clients' is given twice", "configs/x.py:clients=2,clients=3"]),
    ("runlocal,runlocal", ["'runlocal' is given twice"]),
    ("bogus", ["unknown config argument(s) ['bogus']", "configs/x.py:bogus", "accepted: runlocal, clients=N"]),
    ("bogus=1,runlocal", ["unknown config argument(s) ['bogus']"]),
  ],
)
def test_parse_arg_refusals_name_argument_file_and_forms(arg, needles):
  with pytest.raises(ConfigError) as e:
    parse_arg(arg, SPEC, "/some/where/configs/x.py")
  for needle in needles:
    assert needle in str(e.value), (needle, str(e.value))
  assert "\n" not in str(e.value)


def test_parse_arg_sweep_kind_and_no_arguments():
  with pytest.raises(ConfigError, match=r"unknown sweep argument\(s\) \['x'\] in --sweep=x of configs/y.py"):
    parse_arg("x", SPEC, "configs/y.py", "sweep")
  with pytest.raises(ConfigError, match=r"configs/y.py takes no config argument; drop ':x'"):
    parse_arg("x", {}, "configs/y.py")


# (file, function, arg, substrings of the one-line ConfigError): the arguments the testers found read wrongly,
# and each file's unknown / malformed ones.
REFUSED = [
  ("fedavg_unet", "get_config", "runlocal=0", ["'runlocal=0'", "configs/fedavg_unet.py", "on/off flag", "runlocal"]),
  ("fedavg_unet", "get_config", "clients", ["clients=N", "configs/fedavg_unet.py:clients", "needs a value"]),
  ("fedavg_unet", "get_config", "skew", ["skew=X", "configs/fedavg_unet.py:skew", "needs a value"]),
  ("fedavg_unet", "get_config", "per_round", ["per_round=N", "needs a value"]),
  ("fedavg_unet", "get_config", "clients=x", ["bad clients=", "'x'"]),
  ("fedavg_unet", "get_config", "tiny", ["unknown config argument", "['tiny']", "configs/fedavg_unet.py"]),
  ("fedavg_unet", "get_sweep", "tiny=0", ["'tiny=0'", "on/off flag", "--sweep=tiny=0 of configs/fedavg_unet.py"]),
  ("fedavg_unet", "get_sweep", "fedavgm=no", ["'fedavgm=no'", "on/off flag"]),
  ("fedavg_unet", "get_sweep", "seeds", ["bad seeds=", "seeds=N", "needs a value"]),
  ("fedavg_unet", "get_sweep", "runlocal", ["unknown sweep argument", "accepted: seeds=N, fedavgm, tiny"]),
  ("cross_device", "get_config", "device=false", ["'device=false'", "configs/cross_device.py", "on/off flag"]),
  ("cross_device", "get_config", "clients", ["clients=N", "configs/cross_device.py", "needs a value"]),
  ("cross_device", "get_config", "rounds=ten", ["bad rounds=", "'ten'"]),
  ("privacy", "get_config", "per_round", ["per_round=N", "configs/privacy.py:per_round", "needs a value"]),
  ("privacy", "get_config", "device", ["unknown config argument", "['device']", "accepted: clients=N, per_round="]),
  ("privacy", "get_config", "bogus", ["unknown config argument", "configs/privacy.py:bogus"]),
  ("privacy", "get_sweep", "tiny=yes", ["'tiny=yes'", "on/off flag", "configs/privacy.py"]),
  ("privacy", "get_sweep", "seeds=0", ["bad seeds=", "give a number of seeds 1..1000"]),
  ("quickstart", "get_config", "x", ["configs/quickstart.py takes no config argument", "drop ':x'"]),
  ("quickstart", "get_sweep", "tiny=no", ["'tiny=no'", "on/off flag", "configs/quickstart.py"]),
  ("quickstart", "get_sweep", "lr_grid=1", ["'lr_grid=1'", "on/off flag"]),
  ("quickstart", "get_sweep", "seeds=-2", ["bad seeds=", "'-2'"]),
  ("robust", "get_config", "x", ["configs/robust.py takes no config argument", "configs/robust.py:x"]),
  ("robust", "get_sweep", "attack", ["bad attack=", "attack=scale|sign_flip|gaussian", "needs a value"]),
  ("robust", "get_sweep", "attack=nope", ["bad attack=", "'nope'", "scale, sign_flip, gaussian"]),
  ("robust", "get_sweep", "tiny=false", ["'tiny=false'", "on/off flag", "configs/robust.py"]),
  ("zoo", "get_config", "runlocal", ["configs/zoo.py takes no config argument", "configs/zoo.py:runlocal"]),
  ("zoo", "get_sweep", "only", ["bad only=", "only=a+b", "needs a value"]),
  ("zoo", "get_sweep", "only=fedbn+nope", ["bad only=", "'fedbn+nope'", "fedavg"]),
  ("zoo", "get_sweep", "tiny=1", ["'tiny=1'", "on/off flag", "configs/zoo.py"]),
  ("fedefm", "get_config", "tiny=0", ["'tiny=0'", "configs/fedefm.py", "on/off flag"]),
  ("fedefm", "get_config", "source=false", ["'source=false'", "on/off flag"]),
  ("fedefm", "get_config", "ablation=no", ["'ablation=no'", "on/off flag"]),
  ("fedefm", "get_config", "runlocal=1", ["'runlocal=1'", "on/off flag"]),
  ("fedefm", "get_config", "seeds", ["bad seeds=", "seeds=N", "configs/fedefm.py:seeds"]),
  ("fedefm", "get_config", "tiny,seeds=2,seeds=3", ["'seeds' is given twice"]),
]


@pytest.mark.parametrize("name, fn, arg, needles", REFUSED, ids=[f"{r[0]}.{r[1]}:{r[2]}" for r in REFUSED])
def test_every_config_file_refuses_misread_arguments(name, fn, arg, needles):
  with pytest.raises(ConfigError) as e:
    _config(name)[fn](arg)
  for needle in needles:
    assert needle in str(e.value), (needle, str(e.value))
  assert "\n" not in str(e.value)
  if name in ("robust", "zoo", "privacy"):  # built on quickstart / cross_device; the error names this file
    assert "quickstart.py" not in str(e.value) and "cross_device.py" not in str(e.value)


def test_config_arguments_still_select_their_variants():
  unet = _config("fedavg_unet")["get_config"]
  assert (unet().num_clients, unet().num_rounds, unet().quantity_skew) == (16, 200, 0.0)
  local = unet("runlocal")
  assert (local.num_clients, local.clients_per_round, local.num_rounds, local.image_size) == (4, 4, 20, 64)
  c = unet("clients=64,per_round=16,skew=0.5")
  assert (c.num_clients, c.clients_per_round, c.quantity_skew) == (64, 16, 0.5)
  assert unet("runlocal,clients=2").clients_per_round == 2  # per_round follows fewer clients

  cross = _config("cross_device")["get_config"]
  assert cross().algorithm.client_state == "host" and cross("device").algorithm.client_state == "device"
  c = cross("clients=100,per_round=8,rounds=3")
  assert (c.num_clients, c.clients_per_round, c.num_rounds) == (100, 8, 3)
  p = _config("privacy")["get_config"]("clients=100,per_round=8")
  assert (p.num_clients, p.clients_per_round, p.dp.enabled, p.algorithm.name) == (100, 8, True, "fedavg")

  qs = _config("quickstart")["get_config"]()
  assert (qs.num_clients, qs.num_rounds, qs.image_size) == (4, 150, 64)
  robust = _config("robust")["get_config"]()
  assert (robust.num_clients, robust.num_rounds, robust.attack.fraction) == (4, 50, 0.2)
  zoo = _config("zoo")["get_config"]("")
  assert (zoo.num_clients, zoo.num_rounds, zoo.eval.every) == (4, 50, 10)

  efm = _config("fedefm")["get_config"]
  assert efm().image_size == 64 and efm("tiny").image_size == 16
  assert efm("tiny,seeds=3").experiment.seeds == "0,1,2"
  assert efm("tiny,source,ablation").pretrain.objective == "source"
  assert efm("ablation").experiment.ablation_percents == "0,25,50,75"


def test_sweep_arguments_still_select_their_variants():
  qs = _config("quickstart")["get_sweep"]
  plain, tiny = qs(), qs("tiny")
  assert len(plain) == 4 and not any("num_rounds" in r for r in plain)  # 2 seeds x fedavg, fedavgm
  assert len(tiny) == 4 and all(r["num_rounds"] == TINY["num_rounds"] for r in tiny)
  assert sorted({r["seed"] for r in qs("seeds=3")}) == [0, 1, 2]
  assert len(qs("lr_grid")) == 6 and all("client_optimizer.learning_rate" in r for r in qs("lr_grid"))

  unet = _config("fedavg_unet")["get_sweep"]
  assert len(unet()) == 9 and len(unet("fedavgm")) == 18 and len(unet("seeds=1")) == 3
  robust = _config("robust")["get_sweep"]
  assert {r["attack.name"] for r in robust("attack=sign_flip") if r["method"] != "clean"} == {"sign_flip"}
  zoo = _config("zoo")["get_sweep"]("seeds=1,only=fedbn+scaffold")
  assert [r["method"] for r in zoo] == ["fedbn", "scaffold"]
  privacy = _config("privacy")["get_sweep"]
  assert len(privacy()) == 8 and len(privacy("seeds=1,tiny")) == 4


def test_cli_config_argument_errors_are_one_line_naming_the_given_file(cli, tmp_path):
  cases = [
    ("configs/fedavg_unet.py:runlocal=0", ["'runlocal=0'", "configs/fedavg_unet.py", "on/off flag"]),
    ("configs/fedavg_unet.py:clients", ["clients=N", "configs/fedavg_unet.py:clients"]),
    ("configs/robust.py:x", ["configs/robust.py takes no config argument", "configs/robust.py:x"]),
    ("README.md", ["--config=README.md is not a config file", ".py", "get_config"]),
  ]
  for config, needles in cases:
    r = cli.run("fedkd.main", [f"--config={config}", f"--workdir={tmp_path / 'w'}"], timeout=120)
    assert r.code == 2 and not r.traceback, (config, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedkd: error: "), (config, r.stderr)
    for needle in needles:
      assert needle in lines[0], (config, needle, lines[0])
    assert "NoneType" not in lines[0] and (config != "configs/robust.py:x" or "quickstart" not in lines[0])
    assert not (tmp_path / "w").exists()
