"""Keys a run does not read are checked for type only: a value out of their range is noted, not refused.

Before, ``config.attack.fraction=0`` with ``attack.name='none'`` (a user's way of saying "no attackers") was
refused as "must be a number in (0, 1)", although the note for the same key says it has no effect. The
reference for "no effect" is the run without those values: both runs must log the same numbers."""

from __future__ import annotations

import json

import pytest

from fedkd import config as fc
from fedkd import sweep
from fedkd.config import ConfigError

QS = "--config=configs/quickstart.py"
TINY = [f"--config.{k}={v}" for k, v in {**sweep.TINY, "eval.max_sites": 1}.items()]
# each value is refused where its key is read (the second column's setting)
UNREAD = {
  "attack.fraction": ("0", {"attack.name": "scale"}),
  "attack.noise_std": ("-1", {"attack.name": "gaussian"}),
  "dp.delta": ("0", {"dp.enabled": True}),
  "dp.clip_norm": ("0", {"dp.enabled": True}),
  "compress.fraction": ("0", {"compress.name": "topk"}),
  "aggregator.trim_beta": ("0.7", {"aggregator.name": "trimmed_mean"}),
  "aggregator.krum_f": ("-1", {"aggregator.name": "krum"}),
  "loss.cldice_iters": ("0", {"loss.name": "cldice"}),
  "loss.tversky_gamma": ("0", {"loss.name": "focal_tversky"}),
  "eval.pick": ("'middle'", {"data.source": "tfds:synthetic_endovascular"}),
}


def _records(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def _numbers(workdir) -> tuple[list, list]:
  """The losses of rounds.jsonl and every metric of metrics.jsonl: what the run computed, not its timing."""
  losses = [r["loss"] for r in _records(workdir / "rounds.jsonl")]
  metrics = [
    {k: v for k, v in r.items() if k.startswith(("dice/", "iou/", "site/"))}
    for r in _records(workdir / "metrics.jsonl")
  ]
  return losses, metrics


def test_out_of_range_values_of_unread_keys_are_noted_and_change_nothing(cli, tmp_path):
  base = cli.run("fedkd.main", [QS, f"--workdir={tmp_path / 'base'}", *TINY], timeout=600)
  assert base.code == 0, base.stderr[-3000:]
  given = [f"--config.{k}={v}" for k, (v, _) in UNREAD.items()]
  r = cli.run("fedkd.main", [QS, f"--workdir={tmp_path / 'unread'}", *TINY, *given], timeout=600)
  assert r.code == 0 and not r.traceback, r.stderr[-3000:]
  notes = "\n".join(ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("note: "))
  for key in UNREAD:
    assert f"config.{key}=" in notes, (key, notes)
  losses, metrics = _numbers(tmp_path / "unread")
  assert len(losses) == 2 and all(metrics), metrics
  assert (losses, metrics) == _numbers(tmp_path / "base")


@pytest.mark.parametrize("key", list(UNREAD))
def test_the_same_values_are_refused_where_the_key_is_read(key):
  value, setting = UNREAD[key]
  c = fc.base_config()
  for k, v in {key: json.loads(value.replace("'", '"')), **setting}.items():
    group, name = k.split(".")
    c[group][name] = v
  if "aggregator.name" in setting:
    c.clients_per_round = c.num_clients = 8
  with pytest.raises(ConfigError, match=f"config.{key}="):
    fc.validate(c, 1)


def test_fedefm_keys_of_methods_not_run_are_noted_not_refused():
  """FedEFM: the distillation keys without a distilling method, the teacher-KD keys without a KD fine-tune
  (``downstream.kd_scales=''`` was refused as "must be a comma list" with experiment.kd_methods empty)."""
  c = fc.fedefm_base_config()
  c.experiment.methods, c.experiment.kd_methods = "scratch,fedavg", ""
  c.fedefm.emd_epsilon, c.fedefm.expert_steps, c.fedefm.beta = 0.0, 0, 2.0
  c.downstream.kd_scales, c.downstream.kd_temperature, c.downstream.kd_confidence = "", 0.0, 3.0
  fc.validate_fedefm(c, 1)
  notes = "\n".join(fc.unused_notes(c))
  for key in ("fedefm.emd_epsilon", "fedefm.expert_steps", "fedefm.beta", "downstream.kd_scales"):
    assert f"config.{key}=" in notes, (key, notes)
  assert "no method of config.experiment.kd_methods is run" in notes, notes
  c.experiment.kd_methods = "fedavg"  # a teacher-KD fine-tune reads them
  with pytest.raises(ConfigError, match="config.downstream.kd_temperature=0.0"):
    fc.validate_fedefm(c, 1)
  c.downstream.kd_temperature, c.downstream.kd_confidence = 2.0, 0.5
  with pytest.raises(ConfigError, match="config.downstream.kd_scales=''"):
    fc.validate_fedefm(c, 1)
  c.experiment.kd_methods = ""
  c.experiment.methods = "scratch,fedefm"  # a distilling method reads them
  with pytest.raises(ConfigError, match="config.fedefm.expert_steps=0"):
    fc.validate_fedefm(c, 1)
  c.pretrain.objective, c.experiment.methods, c.experiment.kd_methods = "source", "scratch,fedavg", "fedavg"
  (note,) = [n for n in fc.unused_notes(c) if "downstream" in n]
  assert "config.downstream.kd_scales=''" in note and "while config.pretrain.objective='source'" in note, note
  fc.validate_fedefm(c, 1)


def test_fedefm_topology_is_not_loaded_when_no_method_reads_it():
  """``topology='gaia_ring'`` (11 silos) with 4 silos and only methods that neither gossip nor distil: the run
  noted that the topology has no effect, then refused it for its node count. It is now noted only; a method that
  reads it (gossip, experts from neighbours, fedavg_matched sizing its steps by them) still has it checked; MATCHA
  mixes over matchings of the complete graph whatever the topology."""
  from fedkd.tasks import fedefm as task

  c = fc.fedefm_base_config()
  c.experiment.methods, c.experiment.kd_methods, c.experiment.ablation_percents = "scratch,fedavg,moon,matcha", "", ""
  c.fedefm.topology, c.fedefm.matched_steps_factor, c.fedefm.mixing = "gaia_ring", 2, "dfl"
  notes = "\n".join(fc.unused_notes(c))
  assert "config.fedefm.topology='gaia_ring' has no effect while no experiment method gossips or takes experts" in notes
  assert "config.fedefm.mixing=" in notes, notes
  task.validate(c)
  for methods in ("scratch,ring", "scratch,fedefm", "scratch,fedavg_matched"):
    c.experiment.methods, c.fedefm.matched_steps_factor = methods, 0
    assert "fedefm.topology" not in fc.unused_keys(c)
    with pytest.raises(ConfigError, match=r"topology='gaia_ring' has 11 nodes but config.pretrain.num_silos=6"):
      task.validate(c)
