"""fedkd.eval the way users meet it: replica parents, a run still training, interrupted evaluations."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from fedkd import evaluate
from fedkd.checkpoint import Checkpointer
from fedkd.tasks import fedavg
from test_training import tiny_config


def _one_error_line(r):
  assert r.code == 2 and not r.traceback, r.stderr[-2000:]
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("fedkd: error:"), r.stderr[-2000:]
  return lines[0]


def test_eval_of_a_replica_parent_or_a_checkpoints_folder_names_the_folder_to_pass(cli, tmp_path):
  """--seeds writes one run per subfolder (seed-0, seed-1): pointing fedkd.eval at the parent said 'train
  first'; it must name the runs there. Pointing it at a run's checkpoints/ folder names the run directory."""
  parent = tmp_path / "reps"
  for name in ("seed-0", "seed-1"):
    (parent / name / "checkpoints" / "2").mkdir(parents=True)
  line = _one_error_line(cli.run("fedkd.eval", [f"--workdir={parent}"]))
  assert "seed-0" in line and "seed-1" in line and f"--workdir={parent / 'seed-0'}" in line, line
  assert "train first" not in line
  line = _one_error_line(cli.run("fedkd.eval", [f"--workdir={parent / 'seed-1' / 'checkpoints'}"]))
  assert f"--workdir={parent / 'seed-1'}" in line and "train first" not in line, line


def _trained_on(run4, tmp_path):
  """A copy of ``run4`` trained on to round 8 (its checkpoints: rounds 6 and 8)."""
  ahead = tmp_path / "ahead"
  shutil.copytree(run4, ahead)
  cfg = tiny_config(num_rounds=8)
  cfg.eval.max_sites = 0
  fedavg.run(cfg, str(ahead), log=lambda _: None)
  return ahead


def _rotate_during_first_read(monkeypatch, ckdir, rounds_before, ahead):
  """The first checkpoint read finds a trainer saving newer rounds (6 and 8, those of ``ahead``) and
  deleting every older one, as a run still training with checkpoint.every=1 does between two reads."""
  restore = Checkpointer.restore
  calls = []

  def racing(self, round_, like):
    if not calls:
      for new in (6, 8):
        shutil.copytree(ahead / "checkpoints" / str(new), ckdir / str(new))
      for old in rounds_before:
        shutil.rmtree(ckdir / str(old))
    calls.append(round_)
    return restore(self, round_, like)

  monkeypatch.setattr(Checkpointer, "restore", racing)
  return calls


def test_eval_of_a_run_still_training_reads_its_newest_round(run4, tmp_path, monkeypatch, capsys):
  """Rounds deleted by a running trainer while eval read them were reported as damaged ('move the folder away
  to start the run over': advice that destroys the live run's checkpoints); eval must read the newest round."""
  work = tmp_path / "run"
  shutil.copytree(run4, work)
  ahead = _trained_on(run4, tmp_path)
  _, _, want, _ = evaluate.load_run(str(ahead), 8)
  calls = _rotate_during_first_read(monkeypatch, work / "checkpoints", (2, 4), ahead)
  _, _, params, r = evaluate.load_run(str(work), None)
  assert calls[0] == 4 and r == 8
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert "damaged" not in capsys.readouterr().err


def test_eval_of_a_round_deleted_while_read_says_so(run4, tmp_path, monkeypatch):
  work = tmp_path / "run"
  shutil.copytree(run4, work)
  _rotate_during_first_read(monkeypatch, work / "checkpoints", (2, 4), _trained_on(run4, tmp_path))
  with pytest.raises(evaluate.EvalError) as e:
    evaluate.load_run(str(work), 4)
  msg = str(e.value)
  assert "deleted while it was read" in msg and "(6, 8)" in msg and "move" not in msg, msg


@pytest.mark.parametrize("where", ["computing", "drawing"])
def test_interrupted_evaluation_keeps_the_earlier_files(run4, tmp_path, monkeypatch, where):
  """Ctrl-C during the robustness curves left eval.json / predictions.png of the new round beside the
  robustness files of the earlier evaluation; so did Ctrl-C while robustness.png was drawn, after the other four
  files were replaced (reviewer: a 1.3-2.2 s window of a 75 s evaluation). Every file must stay the earlier
  evaluation's, and no staging folder is left."""
  from fedkd import report

  out = str(tmp_path / "eval")
  done = evaluate.evaluate_run(str(run4), round_=4, examples=1, frames=1, out=out, log=lambda _: None)
  assert done["round"] == 4
  before = {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}
  assert set(before) == {"eval.json", "eval.csv", "predictions.png", "robustness.json", "robustness.png"}
  assert json.loads(before["eval.json"])["images_per_site"] == {site: 1 for site in done["results"]}

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  if where == "computing":
    monkeypatch.setattr(evaluate.Evaluator, "robustness", interrupted)
  else:
    monkeypatch.setattr(report, "robustness_plot", interrupted)
  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate_run(str(run4), round_=2, examples=1, frames=1, out=out, log=lambda _: None)
  after = {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}
  assert after == before
  assert json.loads(after["eval.json"])["round"] == 4


def test_an_eval_output_folder_is_not_a_workdir(run4, tmp_path, capsys):
  """--out was checked as a training workdir: a file named checkpoints (or a folder named metrics.jsonl) there,
  neither of which fedkd.eval writes, was refused with advice about --workdir. A --workdir that is an eval
  folder named the run to train, not the run it belongs to."""
  out = tmp_path / "out"
  out.mkdir()
  (out / "checkpoints").write_text("mine")
  (out / "metrics.jsonl").mkdir()
  done = evaluate.evaluate_run(str(run4), round_=4, examples=1, frames=0, out=str(out), log=lambda _: None)
  assert done["round"] == 4 and (out / "eval.json").exists() and (out / "checkpoints").read_text() == "mine"
  work = tmp_path / "run"
  shutil.copytree(run4, work)
  evaluate.evaluate_run(str(work), round_=4, examples=1, frames=0, log=lambda _: None)  # into run/eval
  with pytest.raises(evaluate.EvalError) as e:
    evaluate.evaluate_run(str(work / "eval"), log=lambda _: None)
  assert "holds an evaluation's outputs" in str(e.value) and f"--workdir={work}" in str(e.value), str(e.value)


def test_eval_of_a_run_on_prepared_data_from_another_folder(cli, tmp_path, monkeypatch):
  """A run that stored a relative config.data.tfds_data_dir (runs before they were made absolute), evaluated
  from another folder: the error told the user to 'set config.data.tfds_data_dir', which fedkd.eval has no way
  to do; --tfds_data_dir does it, and the scores are training's last evaluation."""
  from fedkd.data import tfds as fdata
  from test_eval_inputs import _folder

  _folder(tmp_path / "src")
  fdata.build("xray_folder", tmp_path / "data", manual_dir=tmp_path / "src", site="hosp")
  cfg = tiny_config(num_rounds=2, num_clients=1, clients_per_round=1, batch_size=1, quantity_skew=0.0)
  cfg.data.source = "tfds:xray_folder"
  cfg.data.tfds_data_dir = "data"  # relative to the folder training started from
  cfg.eval.max_sites = 0
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr("fedkd.data.pipeline._relative_local", lambda path: False)  # stored as given, as before
  fedavg.run(cfg, "run", log=lambda _: None)
  monkeypatch.undo()
  work = tmp_path / "run"
  assert json.load(open(work / "config.json"))["data"]["tfds_data_dir"] == "data"
  line = _one_error_line(cli.run("fedkd.eval", [f"--workdir={work}", "--frames=0"]))
  assert "--tfds_data_dir=" in line and "'data'" in line, line
  assert not (work / "eval" / "eval.json").exists()
  r = cli.run("fedkd.eval", [f"--workdir={work}", "--frames=0", f"--tfds_data_dir={tmp_path / 'data'}"])
  assert r.code == 0, r.stderr[-2000:]
  ev = json.load(open(work / "eval" / "eval.json"))
  last = [json.loads(line) for line in open(work / "metrics.jsonl")][-1]
  for cname in ("catheter", "guidewire"):
    assert ev["sites"]["hosp"][cname]["dice"] == pytest.approx(last[f"site/hosp/dice/{cname}"], abs=1e-6)
  line = _one_error_line(cli.run("fedkd.eval", [f"--workdir={work}", "--tfds_data_dir="]))
  assert "--tfds_data_dir is empty" in line


def test_ctrl_c_during_an_evaluation_says_what_is_kept(run4, tmp_path):
  """Ctrl-C while fedkd.eval computes: exit 130 and one line about the evaluation (it said 'interrupted before
  the round finished ... re-run the same command to resume', training's message), earlier files kept."""
  import signal
  import subprocess
  import sys

  import procs

  out = tmp_path / "eval"
  out.mkdir()
  (out / "eval.json").write_text("earlier")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "fedkd.eval", f"--workdir={run4}", "--examples=16", "--frames=1", f"--out={out}"]
  with procs.group() as popen:
    p = popen(cmd, env=env, stderr=subprocess.STDOUT)
    lines = []
    for line in p.stdout:  # the evaluation has started once it names the round
      lines.append(line)
      if line.startswith("evaluating "):
        break
    assert lines and lines[-1].startswith("evaluating "), "".join(lines)[-2000:]
    p.send_signal(signal.SIGINT)
    rest = p.stdout.read()
    rc = p.wait(timeout=procs.timeout(120))
  assert rc == 130, rest[-2000:]
  messages = [line for line in rest.splitlines() if line.startswith("fedkd")]
  assert len(messages) == 1 and "evaluation interrupted" in messages[0] and "resume" not in messages[0], rest
  assert "Traceback" not in rest
  assert (out / "eval.json").read_text() == "earlier" and sorted(os.listdir(out)) == ["eval.json"]


def test_eval_scores_the_sites_training_scored(tmp_path):
  """config.eval.max_sites limits the training sites evaluated (configs/cross_device.py: 5 of 10,000); fedkd.eval
  evaluated every client's site (10,001 held-out sets). It must score the sites training scored, with
  training's numbers."""
  work = str(tmp_path / "run")
  cfg = tiny_config(num_rounds=2, num_clients=4, clients_per_round=2)
  cfg.eval.max_sites = 1
  fedavg.run(cfg, work, log=lambda _: None)
  logged = []
  done = evaluate.evaluate_run(work, examples=2, frames=0, log=logged.append)
  last = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))][-1]
  trained_sites = {k.split("/")[1] for k in last if k.startswith("site/")}
  assert len(trained_sites) == 2 and set(done["results"]) == trained_sites
  for site, res in done["results"].items():
    for cname in ("catheter", "guidewire"):
      assert res[cname]["dice"] == pytest.approx(last[f"site/{site}/dice/{cname}"], abs=1e-6)
  assert any("the first 1 of the 4 training sites" in m for m in logged), logged


def test_eval_before_a_running_run_saved_a_checkpoint_names_it(cli, tmp_path):
  """A run started a moment ago holds the workdir's lock and has no checkpoint yet: 'train first' was wrong
  advice; the message names the process that is training. A lock left by a dead process keeps 'train first'."""
  import socket
  import subprocess
  import sys

  work = tmp_path / "run"
  work.mkdir()
  holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": 0, "command": "fedkd/main.py --config=x"}
  (work / ".lock").write_text(json.dumps(holder))
  line = _one_error_line(cli.run("fedkd.eval", [f"--workdir={work}"]))
  assert f"pid {os.getpid()}" in line and "is training there" in line and "train first" not in line, line
  (work / "checkpoints").mkdir()
  line = _one_error_line(cli.run("fedkd.eval", [f"--workdir={work}"]))
  assert "no finished checkpoint" in line and "is training there" in line, line
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  (work / ".lock").write_text(json.dumps(dict(holder, pid=int(gone.stdout))))
  line = _one_error_line(cli.run("fedkd.eval", [f"--workdir={work}"]))
  assert "is training there" not in line and "train (or resume)" in line, line


def test_eval_beside_a_file_named_eval_in_the_workdir(run4, tmp_path):
  """A file <workdir>/eval (the default output folder's name): evaluating to --out elsewhere was refused ('eval is
  a file, but fedkd keeps a folder there; ... use another --workdir'), though nothing is written there. It now
  evaluates to --out, leaving the file as it was; without --out the one error names the file and --out."""
  work = tmp_path / "run"
  shutil.copytree(run4, work)
  (work / "eval").write_text("my notes\n")
  out = tmp_path / "elsewhere"
  done = evaluate.evaluate_run(str(work), round_=4, examples=1, frames=0, out=str(out), log=lambda _: None)
  assert done["round"] == 4 and json.loads((out / "eval.json").read_text())["round"] == 4
  assert (work / "eval").read_text() == "my notes\n"
  with pytest.raises(
    evaluate.EvalError, match=r"/run/eval is a file, where fedkd.eval writes its outputs by default.*--out="
  ):
    evaluate.evaluate_run(str(work), round_=4, examples=1, frames=0, log=lambda _: None)
  assert (work / "eval").read_text() == "my notes\n"
