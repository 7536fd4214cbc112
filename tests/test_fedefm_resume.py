"""The FedEFM experiment end to end on configs/fedefm.py:tiny: tables, re-runs, in-run checkpoints
(stop / kill / damaged checkpoint -> resume bitwise equal to an uninterrupted run), a cut results file,
a garbled config.json and the NaN guard.

Every test here compares against ``reference``: one uninterrupted run of the same experiment (fedavg,
fedefm and fedefm + teacher KD; 3 pretraining rounds, checkpoint every 2). The experiments of this
module share their compiled programs (fedkd.tasks.fedefm caches them by config), so only the first run
compiles.
"""

import importlib.util
import json
import os
import shutil

import pytest

from fedkd.config import ConfigError
from fedkd.errors import DivergedError
from fedkd.preemption import Stopped
from fedkd.tasks import fedefm as task
from fedkd.tasks import replicas
from test_docs import assert_outputs_documented

_spec = importlib.util.spec_from_file_location(
  "fedefm_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "fedefm.py")
)
cfgmod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfgmod)

FEDAVG, FEDEFM = "u100_fedavg_seed0", "u100_fedefm_seed0"


def tiny():
  c = cfgmod.get_config("tiny")
  c.experiment.methods = "fedavg,fedefm"
  c.experiment.kd_methods = "fedefm"
  c.pretrain.num_rounds = 3
  c.checkpoint.every = 2
  c.log_every = 1
  return c


def records(work):
  """results_raw.jsonl without the wall-clock field: every number bitwise."""
  with open(os.path.join(work, "results_raw.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def steps(work, key):
  d = os.path.join(work, "checkpoints", key)
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else None


class FakeStop:
  """Asks to stop at its ``at``-th check (like a SIGTERM arriving then); ``kill``: raises instead,
  saving nothing (a second Ctrl-C / a killed process)."""

  def __init__(self, at: int, kill: bool = False):
    self.at, self.kill, self.calls, self.reason = at, kill, 0, None

  def requested(self, step: int) -> bool:
    self.calls += 1
    assert step == self.calls  # step ids only grow
    if self.calls == self.at:
      if self.kill:
        raise KeyboardInterrupt
      self.reason = "preempted"
    return self.reason is not None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  work = str(tmp_path_factory.mktemp("reference") / "fe")
  lines = []
  rows = task.run(tiny(), work, log=lines.append)
  return work, rows, lines


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
  """A workdir (checkpoint.every = 1) killed after fedefm's round 3 before saving it: fedavg finished, fedefm's
  rounds 1 and 2 checkpointed. Killed once per module; every test works on its own copy."""
  work = str(tmp_path_factory.mktemp("killed") / "fe")
  c = tiny()
  c.checkpoint.every = 1
  with pytest.raises(KeyboardInterrupt):  # fedavg: 3 rounds + end of run; fedefm rounds 1, 2, 3
    task.run(c, work, log=lambda _: None, stop=FakeStop(7, kill=True))
  assert steps(work, FEDEFM) == [1, 2] and steps(work, FEDAVG) is None
  return work


def test_experiment_end_to_end_tiny_and_skips_finished_runs(reference):
  """Tables written, progress lines, checkpoints removed once used, a re-run skips every run."""
  work, rows, lines = reference
  assert [(r["method"], r["teacher_kd"]) for r in rows] == [("fedavg", False), ("fedefm", False), ("fedefm", True)]
  for r in rows:
    for k in ("dice/catheter", "dice/guidewire", "iou/catheter", "iou/guidewire"):
      assert 0.0 <= r[k] <= 1.0
  assert set(rows[1]["pretrain_final"]) == {"loss", "kd", "w"}  # round 3 distilled (warm-up: round 1)
  md = open(os.path.join(work, "results.md")).read()
  assert "| 100 | fedefm | yes | 1 |" in md and "± n/a" in md  # one seed: the sample std is undefined
  csv = open(os.path.join(work, "results.csv")).read().splitlines()
  assert len(csv) == 4 and csv[0].startswith("unseen_percent,method,teacher_kd,seeds")
  progress = [l for l in lines if "pretraining round" in l]
  assert len(progress) == 6 and "run 2/3 (100% unseen, fedefm, seed 0): pretraining round 3/3  loss " in progress[5]
  assert "rounds/s  eta 0:00" in progress[2] and "s (first round: may include compilation)" in progress[0]
  # fedefm's round 2 is its first distilling one (warm-up: round 1): a new program, not counted in the pace
  assert "s (first round: may include compilation)" in progress[4], progress[4]
  # an EMD solve above the convergence tolerance (results_raw.jsonl's emd.error_max) is said at the end
  noted = [l for l in lines if "EMD solves did not converge" in l]
  assert len(noted) == int(rows[1]["emd"]["error_max"] > 1e-3), (rows[1]["emd"], noted)
  assert not os.path.exists(os.path.join(work, "checkpoints"))  # every foundation is in foundations/
  assert sorted(os.listdir(os.path.join(work, "foundations"))) == [FEDAVG + ".npz", FEDEFM + ".npz"]
  for r in rows:  # the full budget, the scarce-data curve (4 images), the probe (plain fine-tunes only)
    keys = ["dice/mean", "n4/dice/mean"] + ([] if r["teacher_kd"] else ["probe/dice/mean"])
    assert all(0.0 <= r[k] <= 1.0 for k in keys) and ("probe/dice/mean" in r) != r["teacher_kd"]
  assert set(rows[2]["kd_scale"]) == {"full", "n4"} and set(rows[2]["kd_scale"].values()) <= {0.1, 1.0}
  assert_outputs_documented(work, "configs/fedefm.py")
  assert json.load(open(os.path.join(work, "config.json")))["pretrain"]["num_rounds"] == 3
  again_lines = []
  again = task.run(tiny(), work, log=again_lines.append)
  assert again == rows and "3 runs (3 already done)" in again_lines[0]
  assert not any(l.startswith("[") for l in again_lines)  # nothing re-ran


def test_stopped_experiment_resumes_bitwise(reference, tmp_path, monkeypatch):
  """Stops in pretraining, between runs, in the warm-up round, in fine-tuning and in the teacher-KD
  fine-tune of a finished foundation; each re-run continues; the results equal the uninterrupted run
  bitwise."""
  monkeypatch.setattr(task, "FT_CHUNK", 2)  # a stop check inside the 3 fine-tuning steps
  ref_work, _, _ = reference
  work = str(tmp_path / "fe")

  def leg(at, round_, *words):
    lines = []
    with pytest.raises(Stopped) as e:
      task.run(tiny(), work, log=lines.append, stop=FakeStop(at))
    assert e.value.round == round_ and e.value.reason == "preempted" and e.value.exit_code == 0
    for w in words:
      assert w in str(e.value), str(e.value)
    return lines

  leg(1, 1, "preempted at run 1/3 (100% unseen, fedavg, seed 0), pretraining round 1")
  assert steps(work, FEDAVG) == [1]  # saved at the stop, though checkpoint.every = 2
  # rounds 2, 3, step 2 of the 8-image fine-tune, step 2 of the probe, the end of run 1
  lines = leg(5, 1, "the end of run 1")
  assert any("fedavg, seed 0): resuming pretraining after round 1/3" in l for l in lines)
  assert steps(work, FEDAVG) is None  # the finished foundation is in foundations/
  assert os.path.exists(os.path.join(work, "foundations", FEDAVG + ".npz"))
  leg(1, 1, "run 2/3 (100% unseen, fedefm, seed 0), pretraining round 1")  # the warm-up round
  assert steps(work, FEDEFM) == [1]
  leg(3, 2, "run 2/3 (100% unseen, fedefm, seed 0), fine-tuning (8 images)")  # rounds 2 (distilled), 3, step 2
  assert steps(work, FEDEFM) is None and os.path.exists(os.path.join(work, "foundations", FEDEFM + ".npz"))
  # run 2 again (fine-tune, probe, end of run), then step 2 of the +KD fine-tune at the first KD scale
  lines = leg(4, 2, "run 3/3 (100% unseen, fedefm +KD, seed 0), KD fine-tuning (8 images)")
  assert not any("pretraining round" in l for l in lines)  # the foundation is read back, not retrained
  task.run(tiny(), work, log=lambda _: None)
  assert records(work) == records(ref_work)
  assert not os.path.exists(os.path.join(work, "checkpoints"))


def test_killed_run_falls_back_over_a_damaged_checkpoint_and_resumes_bitwise(reference, killed, tmp_path, capsys):
  """Killed after fedefm's round 3 before saving it (``killed``); the newest checkpoint left (round 2) is then
  damaged, so the re-run resumes from round 1; checkpoint.every changes no number."""
  ref_work, _, _ = reference
  work = str(tmp_path / "fe")
  shutil.copytree(killed, work)
  c = tiny()
  c.checkpoint.every = 1
  assert steps(work, FEDEFM) == [1, 2] and steps(work, FEDAVG) is None
  data = os.path.join(work, "checkpoints", FEDEFM, "2", "state")
  for root, _, files in os.walk(data):
    for f in files:
      if f != "commit_success.txt":
        open(os.path.join(root, f), "wb").close()  # cut to 0 bytes
  lines = []
  task.run(c, work, log=lines.append)
  assert any("warning: the checkpoint for round 2 is damaged" in l and "falling back to round 1" in l for l in lines), (
    lines
  )
  assert any("fedefm, seed 0): resuming pretraining after round 1/3" in l for l in lines)
  assert records(work) == records(ref_work)
  # the damaged step, set aside when round 2 was saved again, outlives the checkpoint folder the saved
  # foundation supersedes: still its cut (0-byte) files, where the note says
  assert not os.path.exists(os.path.join(work, "checkpoints", FEDEFM))
  kept = os.path.join(work, "checkpoints", "unreadable", FEDEFM)
  (aside,) = os.listdir(kept)
  assert aside.startswith("2-"), aside
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(kept, aside, "state")) for f in fs]
  cut = {f: os.path.getsize(f) for f in files if os.path.basename(f) != "commit_success.txt"}
  assert cut and not any(cut.values()), cut
  err = capsys.readouterr().err
  ckdir = os.path.join(work, "checkpoints", FEDEFM)
  assert f"note: moved the unreadable checkpoint for round 2 in {ckdir} to {os.path.join(kept, aside)} " in err, err
  # the finished experiment runs again (every result reused), the set-aside steps are neither a run in
  # progress nor deleted
  again = []
  task.run(c, work, log=again.append)
  assert records(work) == records(ref_work) and os.listdir(kept) == [aside]
  assert any("(3 already done)" in l for l in again), again


@pytest.mark.parametrize(
  "damage",
  [
    {"transfers": "x"},  # a reviewer's edit: TypeError in the round loop, with a traceback
    {"curve": [{"round": 1}]},  # no score: KeyError at the round's progress line
    {"w": None},
  ],
)
def test_checkpoint_metrics_no_run_writes_fall_back_like_a_damaged_step(reference, killed, tmp_path, damage):
  """A step whose pretraining summary (the JSON metrics pretrain carries on from) holds what no run writes is a
  damaged step, as docs/reliability.md says: the resume falls back to the round before and ends bitwise equal."""
  ref_work, _, _ = reference
  work = str(tmp_path / "fe")
  shutil.copytree(killed, work)  # killed after fedefm's round 3, before saving it
  c = tiny()
  c.checkpoint.every = 1
  assert steps(work, FEDEFM) == [1, 2]
  meta = os.path.join(work, "checkpoints", FEDEFM, "2", "data", "metadata")
  saved = json.load(open(meta))
  assert set(damage) <= set(saved["metrics"]), saved["metrics"]
  saved["metrics"].update(damage)
  json.dump(saved, open(meta, "w"))
  lines = []
  task.run(c, work, log=lines.append)
  warned = [l for l in lines if "warning: the checkpoint for round 2 is damaged" in l]
  assert warned and "falling back to round 1" in warned[0] and repr(next(iter(damage))) in warned[0], lines
  assert records(work) == records(ref_work)


def test_cut_results_line_is_dropped_and_garbled_files_are_config_errors(reference, tmp_path):
  ref_work, _, _ = reference
  work = str(tmp_path / "fe")
  shutil.copytree(ref_work, work)
  raw = os.path.join(work, "results_raw.jsonl")
  text = open(raw).read()
  open(raw, "w").write(text[:-40])  # the fedefm +KD record cut short by a kill
  lines = []
  rows = task.run(tiny(), work, log=lines.append)
  assert any("dropped its last line (3), which was cut short" in l for l in lines)
  assert "3 runs (2 already done)" in lines[1]
  assert records(work) == records(ref_work)  # redone: the same numbers
  assert len(rows) == 3 and open(raw).read().count("\n") == 3

  lines_ = open(raw).read().splitlines()
  open(raw, "w").write("\n".join([lines_[0][:30]] + lines_[1:]) + "\n")  # a garbled first line
  with pytest.raises(ConfigError, match=r"results_raw.jsonl: line 1 is unreadable .*delete that line"):
    task.run(tiny(), work, log=lambda _: None)

  shutil.rmtree(work)
  shutil.copytree(ref_work, work)
  cfg = os.path.join(work, "config.json")
  open(cfg, "w").write(open(cfg).read()[:50])
  with pytest.raises(ConfigError, match=r"config.json is unreadable .*use a new --workdir") as e:
    task.run(tiny(), work, log=lambda _: None)
  assert cfg in str(e.value) and "\n" not in str(e.value)
  assert records(work) == records(ref_work)  # nothing touched


def test_foundations_are_reused_by_a_downstream_only_rerun(reference, tmp_path):
  """experiment.foundations_from: another workdir's finished foundations, reused when only downstream.*
  / student.* differ (no pretraining; the same foundation scores); another pretraining config is refused."""
  ref_work, ref_rows, _ = reference
  c = tiny()
  c.experiment.foundations_from = ref_work
  # downstream keys outside the fine-tuning programs' keys (kd_confidence, say, would compile them again)
  c.downstream.kd_scales, c.downstream.probe = "1", False
  lines = []
  rows = task.run(c, str(tmp_path / "down"), log=lines.append)
  assert not any("pretraining round" in l for l in lines)
  assert sum("foundation reused from " + os.path.join(ref_work, "foundations") in l for l in lines) == 2
  assert [r["foundation"] for r in rows] == [r["foundation"] for r in ref_rows]
  assert [r["dice/mean"] for r in rows[:2]] == [r["dice/mean"] for r in ref_rows[:2]]  # same downstream there
  assert not any("probe/dice/mean" in r for r in rows)
  header = next(ln for ln in open(tmp_path / "down" / "results.md") if ln.startswith("| unseen %"))
  assert "probe" not in header and "dice/mean" in header  # no empty probe column
  c.pretrain.num_rounds = 2
  with pytest.raises(ConfigError, match=r"foundations_from=.*another config \(config.pretrain.num_rounds differs;"):
    task.run(c, str(tmp_path / "other"), log=lambda _: None)
  assert not os.path.exists(tmp_path / "other" / "config.json")
  bad = str(tmp_path / "bad.npz")
  open(bad, "wb").write(open(os.path.join(ref_work, "foundations", FEDAVG + ".npz"), "rb").read()[:100])
  like = task.Experiment(tiny(), str(tmp_path / "x"), log=lambda _: None)
  like.build_models()
  with pytest.raises(ConfigError, match=r"bad.npz is unreadable or of another model .*delete it"):
    task.load_foundation(bad, like.init_foundation(0))


def test_stopped_run_refuses_another_config(reference, tmp_path):
  """A workdir holding only a checkpoint (no results yet) still refuses a config that changes results;
  config.experiment, config.checkpoint and config.log_every may change."""
  work = str(tmp_path / "fe")
  with pytest.raises(Stopped):
    task.run(tiny(), work, log=lambda _: None, stop=FakeStop(1))
  other = tiny()
  other.fedefm.beta = 0.25
  with pytest.raises(ConfigError, match=r"\(config.fedefm.beta differs\)"):
    task.run(other, work, log=lambda _: None)
  os.remove(os.path.join(work, "config.json"))  # the checkpoint itself carries the config
  with pytest.raises(ConfigError, match=r"checkpoint for round 1 in .*\(config.fedefm.beta differs\)"):
    task.run(other, work, log=lambda _: None)
  assert not os.path.exists(os.path.join(work, "config.json"))  # refused before writing anything
  same = tiny()
  same.checkpoint.every, same.log_every, same.experiment.methods = 1, 2, "fedavg"
  rows = task.run(same, work, log=lambda _: None)
  assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == records(reference[0])[:1]


def test_pretraining_nan_is_a_diverged_error_before_any_bad_checkpoint(tmp_path):
  c = tiny()
  c.experiment.methods, c.experiment.kd_methods = "fedavg", ""
  c.checkpoint.every = 1
  c.pretrain.learning_rate = 1e20
  work = str(tmp_path / "fe")
  with pytest.raises(DivergedError) as e:
    task.run(c, work, log=lambda _: None)
  msg = str(e.value)
  assert "\n" not in msg
  for part in (
    "run 1/1 (100% unseen, fedavg, seed 0): pretraining diverged at round 2",
    "loss of silos 0, 1, 2, 3 of 4 is NaN/Inf",
    "the last checkpoint kept is round 1",
    "config.pretrain.learning_rate=1e+20 is too high",
  ):
    assert part in msg, msg
  assert steps(work, FEDAVG) == [1]  # round 1 was good; nothing of round 2 or later
  assert not os.path.exists(os.path.join(work, "results_raw.jsonl"))
  # FedEFM diverging through its experts' step names the experts' rate, not the silos'
  c = tiny()
  c.experiment.methods, c.experiment.kd_methods = "fedefm", ""
  c.pretrain.expert_learning_rate = 1e20
  with pytest.raises(DivergedError, match=r"config.pretrain.expert_learning_rate=1e\+20 is too high") as e:
    task.run(c, str(tmp_path / "fe2"), log=lambda _: None)
  assert "--config.pretrain.expert_learning_rate=1e+19" in str(e.value)


def test_kd_weight_grid_in_one_process_equals_single_runs_and_compiles_once(reference, tmp_path):
  """fedkd.tasks.replicas.run on FedEFM configs (fedkd.main --replica_config=fedefm.beta=...): the experiment at the
  reference's beta gives the reference's numbers bit for bit, another beta changes FedEFM's and not
  FedAvg's, and both ran the one compiled FedEFM round (beta is an input, not a constant). A diverging
  experiment stops alone, named in the error; the other finishes."""
  import numpy as np

  work, _, _ = reference
  configs = [tiny(), tiny()]
  for c in configs:
    c.experiment.kd_methods = ""  # the reference's rows without teacher KD
  configs[1].fedefm.beta = 0.2
  wds = [str(tmp_path / "b05"), str(tmp_path / "b02")]
  lines = []
  out = replicas.run(configs, wds, log=lines.append)  # hands FedEFM configs to fedefm.run_replicas
  assert len(out) == 2 and any("experiment 2/2 (fedefm.beta=0.2)" in ln for ln in lines), lines[:5]
  ref = [r for r in records(work) if not r["teacher_kd"]]
  assert records(wds[0]) == ref
  other = records(wds[1])
  pick = lambda rows, m: [r for r in rows if r["method"] == m]  # noqa: E731
  assert pick(other, "fedavg") == pick(ref, "fedavg") and pick(ref, "fedefm")
  assert [r["foundation"] for r in pick(other, "fedefm")] != [r["foundation"] for r in pick(ref, "fedefm")]
  exp = task.Experiment(configs[1], wds[1], log=lambda _: None)
  exp.build_models()
  assert exp._round_fn("fedefm", True)._cache_size() == 1  # one compile for beta 0.5 (reference) and 0.2

  bad = [tiny(), tiny()]
  bad[0].experiment.methods = bad[1].experiment.methods = "fedavg"
  bad[0].experiment.kd_methods = bad[1].experiment.kd_methods = ""
  bad[0].pretrain.learning_rate = 1e20
  bad[1].pretrain.learning_rate = 2e-3
  with pytest.raises(DivergedError) as e:
    task.run_replicas(bad, [str(tmp_path / "x"), str(tmp_path / "y")], log=lambda _: None)
  msg = str(e.value)
  assert msg.startswith("pretrain.learning_rate=1e+20: ") and "(finished: pretrain.learning_rate=0.002)" in msg, msg
  assert np.isfinite([r["foundation"] for r in records(str(tmp_path / "y"))]).all()


def test_finetuning_nan_is_a_diverged_error(tmp_path):
  c = tiny()
  c.experiment.methods, c.experiment.kd_methods = "scratch", ""
  c.downstream.learning_rate = 1e20
  with pytest.raises(DivergedError) as e:
    task.run(c, str(tmp_path / "fe"), log=lambda _: None)
  msg = str(e.value)
  assert "run 1/1 (100% unseen, scratch, seed 0): fine-tuning (8 images) diverged at step " in msg, msg
  assert "config.downstream.learning_rate=1e+20 is too high" in msg and "\n" not in msg
  assert not os.path.exists(str(tmp_path / "fe" / "results_raw.jsonl"))


@pytest.mark.parametrize("method", ["moon", "centralized"])  # ring / matcha: the runlocal experiment
def test_every_pretraining_baseline_runs_through_the_task(method, tmp_path):
  """Each baseline's pretraining through the experiment's own state set-up and round (MOON reads the
  carried 'prev' models: both state entries are donated, so they must be separate buffers, which a
  one-device mesh does not copy into), 2 rounds, the foundation finite and moved away from the
  initialisation."""
  import jax
  import numpy as np

  from fedkd.models import init_model

  c = tiny()
  c.pretrain.num_rounds = 2
  c.mesh.client_devices = 1  # all silos on one device, as on a 1-device machine: no resharding copies
  exp = task.Experiment(c, str(tmp_path / "fe"), log=lambda _: None)
  foundation, metrics = exp.pretrain(method, 100.0, 0)
  _, _, params0 = init_model(c.teacher, 0)
  leaves, init = jax.tree.leaves(foundation), jax.tree.leaves(params0)
  assert all(np.isfinite(a).all() for a in leaves) and np.isfinite(metrics["last"]["loss"]).all()
  assert max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(leaves, init)) > 0
