"""fedkd.eval on inputs beyond the synthetic quickstart: a prepared (TFDS) hospital folder."""

import json
import shutil
import os

import numpy as np
import pytest
from PIL import Image

from fedkd.data import pipeline, sites
from fedkd.data import tfds as fdata
from fedkd.tasks import fedavg
from test_training import tiny_config


def _folder(root, n_train=3, n_test=1, shape=(40, 48)):
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  stems = [f"f{i}" for i in range(n_train + n_test)]
  for s in stems:
    mask = np.zeros(shape, np.uint8)
    mask[10:16, 4:40] = 1
    mask[4:36, rng.integers(5, 40)] = 2
    img = np.where(mask > 0, 60, 170) + rng.normal(0, 10, shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{s}.png")
    Image.fromarray(mask).save(root / "masks" / f"{s}.png")
  (root / "splits.json").write_text(json.dumps({"train": stems[:n_train], "test": stems[n_train:]}))


def _copy(run, tmp_path):
  work = tmp_path / "run"
  shutil.copytree(run, work)
  return work


def test_eval_names_the_images_a_small_prepared_site_really_has(cli, tmp_path):
  """A site with one test image evaluated with --examples at the run's 32: the log used to claim
  '1 sites x 32 held-out images'; it must say 1, and the scores match training's last evaluation."""
  _folder(tmp_path / "src")
  data_dir = tmp_path / "tfds"
  fdata.build("xray_folder", data_dir, manual_dir=tmp_path / "src", site="hosp")
  cfg = tiny_config(num_rounds=2, num_clients=1, clients_per_round=1, batch_size=1, quantity_skew=0.0)
  cfg.data.source = "tfds:xray_folder"
  cfg.data.tfds_data_dir = str(data_dir)
  cfg.eval.max_sites = 0
  cfg.eval.examples_per_site = 32
  work = str(tmp_path / "run")
  fedavg.run(cfg, work, log=lambda _: None)
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--frames=1"])
  assert r.code == 0, r.stderr[-2000:]
  assert "1 sites x 1 held-out images" in r.stdout, r.stdout[:500]
  ev = json.load(open(os.path.join(work, "eval", "eval.json")))
  last = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))][-1]
  for cname in ("catheter", "guidewire"):
    assert abs(ev["sites"]["hosp"][cname]["dice"] - last[f"site/hosp/dice/{cname}"]) < 1e-6


def test_eval_of_a_damaged_round_names_the_other_rounds_and_writes_nothing(cli, run4, tmp_path):
  """--round=4 whose arrays are damaged: one line naming the other checkpoint (exit 2, no traceback), and
  an earlier evaluation's files are kept untouched."""
  work = _copy(run4, tmp_path)
  rounds = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert rounds == [2, 4]
  damaged = 0
  for f in (work / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":  # the array chunks
      f.write_bytes(b"\0" * 16)
      damaged += 1
  assert damaged
  (work / "eval").mkdir()
  (work / "eval" / "eval.json").write_text("earlier")
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--round=4", "--examples=1", "--frames=0"])
  assert r.code == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  lines = [line for line in r.stderr.splitlines() if line.startswith("fedkd: error:")]
  assert len(lines) == 1 and "round 4" in lines[0] and "another --round (2)" in lines[0], r.stderr[-2000:]
  # a reader's advice: not the trainer's (a new --workdir, the config it was written with, moving steps away)
  assert "cannot be evaluated: " in lines[0] and "fedkd.eval changed nothing" in lines[0], lines[0]
  assert not any(w in lines[0] for w in ("--workdir", "start the run over", "config the checkpoint")), lines[0]
  assert (work / "eval" / "eval.json").read_text() == "earlier"


@pytest.mark.parametrize("name", ["fedbn", "ditto"])
def test_eval_of_a_personalised_run_scores_the_personal_models_as_training_did(cli, tmp_path, name):
  """fedkd.eval restored the server model only and scored every site with it (for FedBN: normalisation layers no
  client trained), so its training sites differed from training's records. It now scores each training site with
  its client's personal model from the checkpoint's rows (a client never sampled: the global model), as training
  does: every site's Dice equals training's last record, on the same images; eval.json's "model" says which.
  --global_model gives the server model everywhere (the unseen site unchanged)."""
  work = str(tmp_path / "run")
  cfg = tiny_config(num_rounds=2, num_clients=4, clients_per_round=1)
  cfg.algorithm.name = name
  cfg.eval.max_sites, cfg.eval.examples_per_site = 4, 2
  fedavg.run(cfg, work, log=lambda _: None)
  last = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))][-1]
  rounds = [json.loads(line) for line in open(os.path.join(work, "rounds.jsonl"))]
  sampled = {c for r in rounds for c in r["clients"]}
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--frames=0"])
  assert r.code == 0, r.stderr[-2000:]
  assert f"note: a {name} run: each training site is scored with its client's personal model" in r.stdout, r.stdout
  ev = json.load(open(os.path.join(work, "eval", "eval.json")))
  names = list(ev["sites"])
  unseen = sites.UNSEEN_SITE.name
  assert ev["model"] == {s: "personal" if i in sampled and s != unseen else "global" for i, s in enumerate(names)}
  assert 0 < list(ev["model"].values()).count("personal") < 4
  for site in names:
    for cls in ("catheter", "guidewire"):
      assert abs(ev["sites"][site][cls]["dice"] - last[f"site/{site}/dice/{cls}"]) < 1e-6, (site, cls)
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--frames=0", "--global_model", f"--out={tmp_path / 'g'}"])
  assert r.code == 0 and "scored with the global (server) model on every site" in r.stdout, r.stderr[-2000:]
  glob = json.load(open(tmp_path / "g" / "eval.json"))
  assert set(glob["model"].values()) == {"global"}
  assert glob["sites"][unseen] == ev["sites"][unseen]
  personal = [s for s, m in ev["model"].items() if m == "personal"]
  assert any(glob["sites"][s] != ev["sites"][s] for s in personal), [
    (glob["sites"][s], ev["sites"][s]) for s in personal
  ]


def test_global_model_on_a_run_without_personal_models_is_refused(cli, run4, tmp_path):
  work = _copy(run4, tmp_path)
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--frames=0", "--global_model"])
  assert r.code == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "holds no personal models" in r.stderr and "leave the flag out" in r.stderr, r.stderr


def test_eval_past_a_damaged_config_json_and_a_checkpoint_config_that_is_not_an_object(cli, run4, tmp_path):
  """A damaged config.json does not stop fedkd.eval (it evaluates with the config stored in the checkpoint);
  a checkpoint whose stored config is valid JSON but not an object is one line naming it (was a TypeError
  traceback), and eval falls back to the intact earlier round."""
  work = _copy(run4, tmp_path)
  (work / "config.json").write_text("{not json")
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--examples=1", "--frames=0"])
  assert r.code == 0, r.stderr[-2000:]
  assert json.load(open(work / "eval" / "eval.json"))["round"] == 4
  (work / "checkpoints" / "4" / "config" / "metadata").write_text("[1, 2]")  # orbax's JSON item file
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--round=4", "--examples=1", "--frames=0"])
  assert r.code == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "round 4" in r.stderr and "a JSON list, not an object" in r.stderr, r.stderr[-2000:]
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--examples=1", "--frames=0"])  # the latest intact round
  assert r.code == 0, r.stderr[-2000:]
  assert json.load(open(work / "eval" / "eval.json"))["round"] == 2


def test_a_half_written_newest_checkpoint_is_one_warning_line_without_orbax_notes(cli, run4, tmp_path):
  """The newest step lost its metadata and its arrays (a save killed midway, or a trainer deleting it):
  fedkd.eval falls back to the round before with fedkd's one warning line, and orbax's own 'Metadata file
  does not exist' notes do not appear around it."""
  work = _copy(run4, tmp_path)
  newest = work / "checkpoints" / "4"
  (newest / "_CHECKPOINT_METADATA").unlink()
  shutil.rmtree(newest / "state")
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--examples=1", "--frames=0"])
  assert r.code == 0, r.stderr[-2000:]
  assert "Metadata file does not exist" not in r.stderr, r.stderr[-2000:]
  (warning,) = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
  assert "round 4 is damaged" in warning and "falling back to round 2" in warning, warning
  assert "at round 2" in r.stdout


def test_eval_of_a_run_on_a_site_that_training_now_refuses(cli, tmp_path):
  """A training site without a test split: older code trained on it (and scored the other sites); training now
  refuses it, and fedkd.eval refused it too, though it does not train. Eval opens the data to evaluate only and
  scores the site with a test split, as training did."""
  data_dir = tmp_path / "tfds"
  for site in ("hosp", "wardb"):
    _folder(tmp_path / site)
    fdata.build("xray_folder", data_dir, manual_dir=tmp_path / site, site=site)
  cfg = tiny_config(num_rounds=1, num_clients=2, clients_per_round=2, batch_size=1, quantity_skew=0.0)
  cfg.data.source, cfg.data.tfds_data_dir = "tfds:xray_folder", str(data_dir)
  cfg.eval.max_sites = 0
  work = str(tmp_path / "run")
  fedavg.run(cfg, work, log=lambda _: None)
  # wardb rebuilt with all of its frames as training frames (no splits.json), as older code accepted it
  os.remove(tmp_path / "wardb" / "splits.json")
  fdata.build("xray_folder", data_dir, manual_dir=tmp_path / "wardb", site="wardb", overwrite=True)
  with pytest.raises(pipeline.DataError, match=r"training site\(s\) \['wardb'\] have no test split"):
    pipeline.make_client_data(cfg)
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--frames=1"])
  assert r.code == 0, r.stderr[-2000:]
  assert "1 sites x 1 held-out images" in r.stdout, r.stdout[:500]
  assert "note: training site(s) ['wardb'] have no test split in the dataset now: no row for them" in r.stdout
  ev = json.load(open(os.path.join(work, "eval", "eval.json")))
  last = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))][-1]
  assert sorted(ev["sites"]) == ["hosp"]
  assert abs(ev["sites"]["hosp"]["catheter"]["dice"] - last["site/hosp/dice/catheter"]) < 1e-6


def test_the_personal_models_of_a_run_from_before_a_key_existed_are_read():
  """A Ditto run stored before algorithm.scaffold_weighting (and, older still, the compress group) existed:
  building its algorithm to read the personal models raised AttributeError (a traceback). The stored config
  is completed with the value such a run ran with, else today's default."""
  import ml_collections

  from fedkd import evaluate
  from fedkd.config import base_config
  from fedkd.fl import engine

  c = base_config()
  c.algorithm.name = "ditto"
  d = c.to_dict()
  del d["algorithm"]["scaffold_weighting"], d["compress"]
  full = evaluate._completed(ml_collections.ConfigDict(d))
  assert full.algorithm.scaffold_weighting == c.algorithm.scaffold_weighting and full.compress.name == "none"
  assert full.algorithm.ditto_lambda == c.algorithm.ditto_lambda
  alg = fedavg.build_algorithm(full, engine.make_optimizer(full.server_optimizer))
  assert alg.name == "ditto"
  d["algorithm"]["name"] = "scaffold"  # ADDED_KEYS: a SCAFFOLD run from then weighted by data size
  assert evaluate._completed(ml_collections.ConfigDict(d)).algorithm.scaffold_weighting == "data_size"
