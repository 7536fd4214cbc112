"""fedkd.eval against training's own records and the folder it writes to."""

import json

import pytest

from fedkd.tasks import fedavg
from test_training import tiny_config


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
  """A finished tiny run (2 rounds) whose training scored 2 held-out images per site."""
  work = tmp_path_factory.mktemp("eval_run") / "run"
  cfg = tiny_config(num_rounds=2)
  assert cfg.eval.examples_per_site == 2
  fedavg.run(cfg, str(work), log=lambda _: None)
  return work


def _one_error_line(r):
  assert r.code == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("fedkd: error:"), r.stderr[-2000:]
  return lines[0]


def test_eval_scores_the_images_training_scored_by_default(cli, run2, tmp_path):
  """A run whose training scored config.eval.examples_per_site=2 images per site: fedkd.eval without
  --examples scored 32 instead, so its eval.json disagreed with the run's metrics.jsonl (unseen guidewire Dice
  0.099 against 0.138 on a 4-round run) without saying why. By default it must score what training scored."""
  out = tmp_path / "eval"
  r = cli.run("fedkd.eval", [f"--workdir={run2}", "--frames=0", f"--out={out}"])
  assert r.code == 0, r.stderr[-2000:]
  assert "x 2 held-out images" in r.stdout, r.stdout[:500]
  ev = json.load(open(out / "eval.json"))
  last = [json.loads(line) for line in open(run2 / "metrics.jsonl")][-1]
  assert ev["round"] == last["round"] == 2
  for site, res in ev["sites"].items():
    for cname in ("catheter", "guidewire"):
      assert res[cname]["dice"] == pytest.approx(last[f"site/{site}/dice/{cname}"], abs=1e-6), (site, cname)
      assert res[cname]["iou"] == pytest.approx(last[f"site/{site}/iou/{cname}"], abs=1e-6), (site, cname)


@pytest.mark.parametrize("in_the_way", ["predictions.png", "robustness.json", "robustness.png"])
def test_a_folder_where_eval_writes_a_file_is_refused_before_anything_is_written(cli, run2, tmp_path, in_the_way):
  """--out holding a folder named like one of the files fedkd.eval writes: the evaluation ran to its end, wrote
  the new eval.json and eval.csv beside the earlier robustness.json, then stopped with an IsADirectoryError
  traceback. It must be one line naming that folder, before anything is computed, with the earlier files kept."""
  out = tmp_path / "eval"
  (out / in_the_way).mkdir(parents=True)
  (out / "eval.json").write_text("earlier")
  line = _one_error_line(cli.run("fedkd.eval", [f"--workdir={run2}", "--examples=1", "--frames=1", f"--out={out}"]))
  assert str(out / in_the_way) in line and "folder" in line, line
  assert (out / "eval.json").read_text() == "earlier"
  assert sorted(p.name for p in out.iterdir()) == sorted(["eval.json", in_the_way])
  assert not list((out / in_the_way).iterdir())


def test_an_out_folder_is_not_created_for_a_run_that_cannot_be_evaluated(cli, tmp_path):
  """A workdir without checkpoints and a new --out: one line, and no --out folders left behind (the early
  --out check created them before the run was found to have nothing to evaluate)."""
  (tmp_path / "empty").mkdir()
  out = tmp_path / "new" / "a" / "b"
  r = cli.run("fedkd.eval", [f"--workdir={tmp_path / 'empty'}", f"--out={out}"])
  assert "checkpoints" in _one_error_line(r)
  assert not (tmp_path / "new").exists()
  (tmp_path / "file").write_text("x")
  r = cli.run("fedkd.eval", [f"--workdir={tmp_path / 'empty'}", f"--out={tmp_path / 'file' / 'sub'}"])
  assert "a parent of it is a file" in _one_error_line(r)
  r = cli.run("fedkd.eval", [f"--workdir={tmp_path / 'empty'}", f"--out={tmp_path / 'file'}"])
  assert "is a file, not a folder" in _one_error_line(r)
