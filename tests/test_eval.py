"""fedkd.eval on a finished tiny run; perturbations and error colours against direct expectations."""

import json
import os

import numpy as np
import pytest

from fedkd import palette, report
from fedkd.evaluate import perturb
from fedkd.report import error_overlay
from fedkd.tasks import fedavg
from test_docs import assert_outputs_documented
from test_training import tiny_config


def test_eval_reproduces_training_metrics_and_writes_outputs(cli, tmp_path):
  work = str(tmp_path / "run")
  cfg = tiny_config(num_rounds=2)
  cfg.eval.max_sites = 0
  cfg.eval.examples_per_site = 2  # tiny_config's: the held-out set programs of the other tiny_config runs
  fedavg.run(cfg, work, log=lambda _: None)
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--examples=2", "--frames=2"])
  assert r.code == 0, r.stderr[-2000:]
  out = os.path.join(work, "eval")
  for f in ("eval.json", "eval.csv", "predictions.png", "robustness.png", "robustness.json"):
    assert os.path.getsize(os.path.join(out, f)) > 0, f
  assert_outputs_documented(out, "fedkd.eval")
  ev = json.load(open(os.path.join(out, "eval.json")))
  last = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))][-1]
  assert ev["round"] == last["round"] == 2
  # what the distances are in and which site no client trained on (from the run's config, not eval's code)
  assert ev["spacing_mm"] == 1.0
  assert ev["unseen"] in ev["sites"] and any(k.startswith(f"site/{ev['unseen']}/") for k in last)
  assert "unseen/dice/catheter" in last and last["unseen/dice/catheter"] == pytest.approx(
    ev["sites"][ev["unseen"]]["catheter"]["dice"], abs=1e-6
  )
  # the restored checkpoint scores exactly what the in-memory model scored at the end of training
  for site, res in ev["sites"].items():
    for cname in ("catheter", "guidewire"):
      assert res[cname]["dice"] == pytest.approx(last[f"site/{site}/dice/{cname}"], abs=1e-6)
  rob = json.load(open(os.path.join(out, "robustness.json")))
  assert set(rob) == {"noise", "blur", "contrast_loss", "downscale"}
  # severity 0 of every perturbation is the clean image: same mean Dice as the table
  clean = np.mean([res["catheter"]["dice"] for res in ev["sites"].values()])
  for kind in rob:
    assert rob[kind]["dice"]["catheter"][0] == pytest.approx(clean, abs=1e-6)
  # --frames=0: no picture, and the earlier one is not left beside the new tables; the message says so
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--examples=2", "--frames=0"])
  assert r.code == 0, r.stderr[-2000:]
  assert not os.path.exists(os.path.join(out, "predictions.png"))
  assert "predictions.png" not in r.stdout and "eval.json" in r.stdout


def test_eval_without_checkpoints_is_one_clear_line(cli, tmp_path):
  r = cli.run("fedkd.eval", [f"--workdir={tmp_path}"])
  assert r.code == 2
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "no checkpoints/ folder" in lines[0] and "Traceback" not in r.stderr


def test_eval_of_a_fedefm_workdir_says_where_its_results_are(cli, tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"task": "fedefm", "seed": 0}))
  (tmp_path / "results.md").write_text("table")
  r = cli.run("fedkd.eval", [f"--workdir={tmp_path}"])
  assert r.code == 2 and "Traceback" not in r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "'fedefm' experiment" in lines[0] and "results.md" in lines[0], lines
  assert (tmp_path / "results.md").read_text() == "table"


def test_perturbations():
  x = np.full((2, 16, 16, 1), 0.5, np.float32)
  noisy = perturb(x, "noise", 0.1, seed=0)
  assert abs(float((noisy - x).std()) - 0.1) < 0.01
  ramp = np.tile(np.linspace(0.2, 0.8, 16, dtype=np.float32)[None, None, :, None], (2, 16, 1, 1))
  flat = perturb(ramp, "contrast_loss", 1.0)
  np.testing.assert_allclose(flat, ramp.mean(), atol=1e-6)
  half = perturb(ramp, "contrast_loss", 0.5)
  np.testing.assert_allclose(half.max() - half.min(), 0.5 * (ramp.max() - ramp.min()), atol=1e-5)
  for kind, zero in (("noise", 0.0), ("blur", 0.0), ("contrast_loss", 0.0), ("downscale", 1.0)):
    np.testing.assert_array_equal(perturb(ramp, kind, zero), ramp)
  checker = np.indices((16, 16)).sum(0) % 2
  img = checker[None, ..., None].astype(np.float32)
  down = perturb(img, "downscale", 2.0)
  assert down.shape == img.shape and down.std() < 0.5 * img.std()
  blurred = perturb(img, "blur", 1.0)
  assert blurred.std() < 0.2 * img.std()


def test_error_overlay_colours():
  """Right pixels in their class colour (the preview's: catheter red, guidewire green), errors in colours
  no class uses (false positive yellow, miss magenta)."""
  target = np.array([[0, 1, 1], [0, 2, 0], [2, 0, 0]])
  pred = np.array([[1, 1, 0], [0, 1, 0], [2, 0, 0]])
  rgb = error_overlay(np.zeros((3, 3)), pred, target)
  assert tuple(rgb[0, 1]) == (235, 64, 52)  # right catheter: red
  assert tuple(rgb[2, 0]) == (60, 220, 60)  # right guidewire: green
  assert tuple(rgb[0, 0]) == (255, 215, 0)  # false positive: yellow
  assert tuple(rgb[0, 2]) == (230, 40, 230)  # missed: magenta
  assert tuple(rgb[1, 1]) == (230, 40, 230)  # wrong class = miss
  assert tuple(rgb[2, 2]) == (0, 0, 0)  # true negative keeps the (black) image
  colours = {tuple(c) for c in palette.CLASS_RGB.values()}
  assert len(colours) == 3 and not colours & {palette.FALSE_POSITIVE_RGB, palette.MISS_RGB}


def test_prediction_grid_has_a_legend_and_three_tiles_per_frame():
  """predictions.png: per frame image | ground truth | prediction, under a title and a legend strip
  whose squares are the palette colours of the classes present and of the two error marks."""
  size, frames = 16, 2
  images = np.zeros((frames, size, size, 1), np.float32)
  masks = np.zeros((frames, size, size), np.int32)
  masks[:, 2:5, 2:9] = 1  # catheter only: no guidewire entry in the legend
  pic = np.asarray(report.grid({"site_a": (images, masks)}, frames, 1, None, preds={"site_a": masks}))
  content = pic[pic.shape[0] - size :]  # the last row of tiles
  assert content.shape[1] >= 3 * frames * size
  tile = content[:, size : 2 * size]  # frame 0's ground truth
  np.testing.assert_array_equal(tile[3, 3], report.overlay(np.zeros((1, 1)), np.ones((1, 1)))[0, 0])
  head = pic[: pic.shape[0] - size - 14]  # title and legend above the site's label line
  colours = {tuple(c) for c in head.reshape(-1, 3)}
  assert palette.CLASS_RGB[1] in colours and palette.FALSE_POSITIVE_RGB in colours and palette.MISS_RGB in colours
  assert palette.CLASS_RGB[2] not in colours
