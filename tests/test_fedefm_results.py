"""What a FedEFM workdir's results_raw.jsonl may hold, read back by the experiment (re-running the command) and by
python -m fedkd.tasks.fedefm_contrast: a score that is null, a string or an integer too large for a float, and
two records of one run, are refused in one line naming the file, line and key; a refused command changes no
file; a cut-short last line is dropped by both, a complete JSON line that is no record is an error; pooled
workdirs without config.json are named; experiment.foundations_from follows a workdir that reused its own
foundations and says which foundations it lacks."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil

import numpy as np
import pytest
from scipy import stats

from fedkd.config import ConfigError
from fedkd.tasks import fedefm as task

_spec = importlib.util.spec_from_file_location(
  "fedefm_cfg_results", os.path.join(os.path.dirname(__file__), "..", "configs", "fedefm.py")
)
cfgmod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfgmod)

MODULE = "fedkd.tasks.fedefm_contrast"
# one setting's student scores, as finetune writes them (full budget, n4 = the tiny config's scarce size, probe)
SCORES = ("dice/catheter", "iou/catheter", "dice/guidewire", "iou/guidewire", "dice/mean")


def tiny(**overrides):
  c = cfgmod.get_config("tiny")
  c.experiment.methods, c.experiment.kd_methods, c.experiment.seeds = "scratch,fedavg", "", "0,1"
  for key, value in overrides.items():
    group, _, name = key.rpartition(".")
    (c[group] if group else c)[name] = value
  return c


def record(method: str, seed: int, value: float = 0.25, kd: bool = False) -> dict:
  """A finished run's record as the experiment writes it at the tiny config (downstream.scarce_examples='4',
  downstream.probe=True), built by hand."""
  r = {"unseen_percent": 100.0, "method": method, "teacher_kd": kd, "seed": seed}
  for prefix in ["", "n4/"] + ["probe/"] * (not kd):
    r.update({prefix + k: value + 0.01 * seed for k in SCORES})
  r.update(
    foundation=None if method == "scratch" else 0.3 + 0.01 * seed,
    seconds=1.5,
    cost=None if method == "scratch" else {"gflops_per_silo_round": 0.006, "mb_per_silo_round": 0.04},
    emd={"w_spread": None, "error_max": None},
    foundation_curve=[] if method == "scratch" else [{"round": 2, "foundation": 0.3}],
    w_history=[],
    pretrain_final={},
  )
  return r


def workdir(path, c, records: list[dict], tail: str = "") -> tuple[str, bytes]:
  """A workdir holding ``c``'s config.json and ``records`` (one line each, then ``tail``); returns the
  results file and its bytes."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(c.to_json(indent=2))
  raw = os.path.join(path, "results_raw.jsonl")
  text = "".join(json.dumps(r) + "\n" for r in records) + tail
  with open(raw, "w") as f:
    f.write(text)
  return raw, text.encode()


def finished(path, c=None, tail: str = "", **changes):
  """The tiny plan (scratch and fedavg, seeds 0 and 1) finished: four records (lines 1-4: scratch 0, fedavg 0,
  scratch 1, fedavg 1), the last changed by ``changes``."""
  c = c or tiny()
  recs = [record(m, s) for s in (0, 1) for m in ("scratch", "fedavg")]
  recs[3].update(changes)
  return workdir(path, c, recs, tail)


def _files(path) -> dict:
  return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def _refused(c, path, match: str) -> str:
  """task.run refuses ``path`` in one line matching ``match`` and changes no file in it."""
  before = _files(path)
  lines = []
  with pytest.raises(ConfigError, match=match) as e:
    task.run(c, str(path), log=lines.append)
  assert "\n" not in str(e.value), str(e.value)
  assert _files(path) == before, "a refused command changed the workdir"
  assert not lines, lines  # nothing said before the refusal (no note about a line it then kept)
  return str(e.value)


# ------------------------------------------------------------------ the experiment reading its own results


def test_a_finished_handmade_workdir_is_accepted(tmp_path):
  """The control of the tests below: the four hand-built records are what the tiny plan writes, so re-running
  the command writes the tables from them (results.md: 2 seeds, the hand-computed means) and trains nothing."""
  raw, text = finished(tmp_path / "fe")
  lines = []
  rows = task.run(tiny(), str(tmp_path / "fe"), log=lines.append)
  assert len(rows) == 4 and "4 runs (4 already done)" in lines[0], lines
  table = open(tmp_path / "fe" / "results.md").read()
  # fedavg dice/mean over seeds 0 and 1: 0.25 and 0.26 -> 0.255 (3 digits), std 0.00707
  assert "| 100 | fedavg | no | 2 | 0.305 ± 0.007 | 0.255 ± 0.007 |" in table, table
  assert open(raw, "rb").read() == text


def test_a_cost_xla_gave_no_flops_for_is_a_blank_cell_not_a_refusal(tmp_path):
  """client_flops is NaN where XLA's cost analysis has no 'flops' (some backends): such records (NaN before,
  null now) were refused at every re-run by the new record check."""
  c = tiny()
  recs = [record(m, s) for s in (0, 1) for m in ("scratch", "fedavg")]
  recs[1]["cost"] = {"gflops_per_silo_round": float("nan"), "mb_per_silo_round": 0.04}
  recs[3]["cost"] = {"gflops_per_silo_round": None, "mb_per_silo_round": 0.04}
  workdir(tmp_path / "fe", c, recs)
  assert len(task.run(c, str(tmp_path / "fe"), log=lambda _: None)) == 4
  endpoints = open(tmp_path / "fe" / "endpoints.md").read()
  (row,) = [line for line in endpoints.splitlines() if line.startswith("| fedavg | 2 |")]
  assert [cell.strip() for cell in row.split("|")[5:7]] == ["", "0.04"], row


@pytest.mark.parametrize(
  "key,value",
  [
    ("foundation", None),  # the reviewer's case: results.md said 3 seeds over a 2-seed mean
    ("foundation", "0.31"),  # results.md said 'missing', endpoints.md converted it
    ("n4/dice/mean", None),
    ("probe/dice/mean", "x"),
    ("seconds", "1.5"),
    ("iou/catheter", [0.1]),
  ],
)
def test_a_score_that_is_not_a_number_is_refused_naming_file_line_and_key(tmp_path, key, value):
  raw, _ = finished(tmp_path / "fe", **{key: value})
  msg = _refused(tiny(), tmp_path / "fe", r"the record of fedavg seed 1 holds .* not a result")
  assert f"{raw}: " in msg and f" for {key}, " in msg and "line 4" in msg and "delete" in msg, msg
  assert not os.path.exists(tmp_path / "fe" / "results.md")


def test_a_key_the_run_writes_but_its_record_lacks_is_refused(tmp_path):
  """The scarce-data and probe scores are part of every plain run at this config: a record without them made
  the tables' columns over fewer seeds than they said."""
  recs = [record(m, s) for s in (0, 1) for m in ("scratch", "fedavg")]
  del recs[1]["n4/dice/mean"], recs[1]["probe/iou/guidewire"]
  workdir(tmp_path / "fe", tiny(), recs)
  msg = _refused(tiny(), tmp_path / "fe", r"the record of fedavg seed 0 lacks n4/dice/mean, probe/iou/guidewire")
  assert "line 2" in msg, msg


def test_an_integer_too_large_for_a_float_is_refused_in_one_line(tmp_path):
  """10**401 is a JSON number that is no result: it gave 'OverflowError: int too large to convert to float'."""
  _, text = finished(tmp_path / "fe", **{"dice/mean": 10**401})
  assert b"1" + b"0" * 401 in text
  msg = _refused(tiny(), tmp_path / "fe", r"the record of fedavg seed 1 holds 1000.* for dice/mean, not a result")
  assert len(msg) < 400, msg  # the number is shortened


def test_two_records_of_one_run_are_refused_naming_both_lines(tmp_path):
  """A second record of fedavg seed 0 (line 5) silently replaced the first (line 2) in every table."""
  recs = [record(m, s) for s in (0, 1) for m in ("scratch", "fedavg")] + [record("fedavg", 0, value=0.9)]
  workdir(tmp_path / "fe", tiny(), recs)
  msg = _refused(tiny(), tmp_path / "fe", r"lines 2 and 5 are both the record of fedavg seed 0")
  assert "delete the line that should not count" in msg, msg


CUT = json.dumps(record("fedavg", 1))[:70]  # a write cut short by a kill: no newline, not complete JSON


def test_a_refused_command_does_not_repair_the_results_file_first(tmp_path):
  """A cut-short last line and a config that differs: the command refused, but had already rewritten
  results_raw.jsonl without that line (and said so)."""
  recs = [record(m, s) for s in (0, 1) for m in ("scratch", "fedavg")][:3]
  workdir(tmp_path / "fe", tiny(), recs, tail=CUT)
  _refused(tiny(**{"pretrain.num_rounds": 3}), tmp_path / "fe", r"holds results of another config")


def test_a_cut_short_last_line_is_dropped_once_the_workdir_is_checked(tmp_path):
  """The same workdir under its own config: the line is dropped with a note, the file ends in a newline, and the
  tables come from the four complete records (a cut-short copy of a finished run redoes nothing)."""
  raw, text = finished(tmp_path / "fe", tail=CUT)
  lines = []
  rows = task.run(tiny(), str(tmp_path / "fe"), log=lines.append)
  assert "dropped its last line (5), which was cut short" in lines[0], lines
  assert len(rows) == 4
  assert open(raw, "rb").read() == text[: -len(CUT)]


@pytest.mark.parametrize("tail", ["[1, 2]", '{"unseen_percent": 100.0, "method": "fedavg"}', "[1, 2]\n"])
def test_a_complete_json_last_line_that_is_no_record_is_an_error(tmp_path, tail):
  """Complete JSON is no write cut short: the last line was dropped (and the file rewritten) as if it were."""
  finished(tmp_path / "fe", tail=tail)
  msg = _refused(tiny(), tmp_path / "fe", r"results_raw.jsonl: line 5 is not a result record")
  assert "delete that line" in msg, msg


# ------------------------------------------------------------------ experiment.foundations_from


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A finished tiny run of fedavg, seed 0 (one pretraining, one fine-tune): its workdir and record."""
  work = tmp_path_factory.mktemp("src") / "A"
  c = tiny(**{"experiment.methods": "fedavg", "experiment.seeds": "0", "downstream.probe": False})
  (row,) = task.run(c, str(work), log=lambda _: None)
  assert os.listdir(work / "foundations") == [task.foundation_key(100.0, "fedavg", 0) + ".npz"]
  return work, c, row


class _Started(Exception):
  pass


def _until_work(lines: list):
  """A log that keeps the lines and stops the run at its first line after the header and notes."""

  def log(line: str) -> None:
    lines.append(line)
    if not line.startswith(("fedkd fedefm:", "note:")):
      raise _Started(line)

  return log


def test_foundations_from_follows_a_workdir_that_reused_them(source, tmp_path):
  """B reused every foundation from A (no foundations/ of its own; its config.json records foundations_from=A).
  foundations_from=B was refused ('holds no foundations/ and config.json', though B has config.json); it now
  reuses A's foundation: no pretraining, A's foundation score."""
  a, c, row = source
  b = tmp_path / "B"
  cb = tiny(**{"experiment.methods": "fedavg", "experiment.seeds": "0", "downstream.probe": False})
  cb.experiment.foundations_from = str(a)
  workdir(b, cb, [dict(row, seconds=0.5)])
  cc = tiny(**{"experiment.methods": "fedavg", "experiment.seeds": "0", "downstream.probe": False})
  cc.experiment.foundations_from = str(b)
  lines = []
  (got,) = task.run(cc, str(tmp_path / "C"), log=lines.append)
  assert not any("pretraining round" in line for line in lines), lines
  assert any("foundation reused from " + str(a / "foundations") in line for line in lines), lines
  assert got["foundation"] == row["foundation"]
  assert not any(line.startswith("note:") for line in lines), lines


def test_foundations_from_names_what_it_lacks_before_anything_trains(source, tmp_path):
  """Seed 1's foundation is in no workdir: it was pretrained without a word although the docs said only the
  downstream part re-runs. The run now says at the start which planned foundations it pretrains itself."""
  a, _, _ = source
  c = tiny(**{"experiment.methods": "fedavg", "experiment.seeds": "0,1", "downstream.probe": False})
  c.experiment.foundations_from = str(a)
  lines = []
  with pytest.raises(_Started):
    task.run(c, str(tmp_path / "D"), log=_until_work(lines))
  notes = [line for line in lines if line.startswith("note:")]
  assert len(notes) == 1 and "lacks 1 of the foundations this plan uses, pretrained here" in notes[0], lines
  assert "fedavg at 100% unseen seed 1" in notes[0] and "seed 0" not in notes[0], notes


def test_foundations_from_a_workdir_whose_source_is_gone_says_so(source, tmp_path):
  """B's recorded source no longer exists: the message names B, the folder it reused from and the fix."""
  a, _, row = source
  gone = tmp_path / "gone"
  shutil.copytree(a, gone)
  cb = tiny(**{"experiment.methods": "fedavg", "experiment.seeds": "0", "downstream.probe": False})
  cb.experiment.foundations_from = str(gone)
  workdir(tmp_path / "B", cb, [row])
  shutil.rmtree(gone)
  cc = tiny(**{"experiment.methods": "fedavg", "experiment.seeds": "0", "downstream.probe": False})
  cc.experiment.foundations_from = str(tmp_path / "B")
  with pytest.raises(ConfigError) as e:
    task.Experiment(cc, str(tmp_path / "C"), log=lambda _: None).check_workdir()
  msg = str(e.value)
  assert f"{str(tmp_path / 'B')!r} reused its foundations from {str(gone)!r}" in msg and "is not a folder" in msg, msg
  assert "point config.experiment.foundations_from at the workdir whose foundations/ holds them" in msg, msg
  assert not os.path.exists(tmp_path / "C")


def test_a_gone_workdir_further_along_the_chain_is_noted_when_an_earlier_one_holds_the_foundations(source, tmp_path):
  """C -> B (B holds the foundations itself) -> A', which was moved away: C was refused, although B holds every
  foundation C needs. The walk stops at A' with a note; B's foundation is reused, nothing pretrained."""
  a, c, row = source
  b = tmp_path / "B"
  shutil.copytree(a, b)
  saved = json.loads((b / "config.json").read_text())
  saved["experiment"]["foundations_from"] = str(tmp_path / "moved")
  (b / "config.json").write_text(json.dumps(saved))
  cc = tiny(**{"experiment.methods": "fedavg", "experiment.seeds": "0", "downstream.probe": False})
  cc.experiment.foundations_from = str(b)
  lines = []
  (got,) = task.run(cc, str(tmp_path / "C"), log=lines.append)
  notes = [line for line in lines if line.startswith("note:")]
  assert notes == [
    f"note: config.experiment.foundations_from={str(b)!r}: {str(b)!r} reused its foundations from "
    f"{str(tmp_path / 'moved')!r} (its config.json says so), which is not a folder: its foundations are not looked in"
  ], lines
  assert not any("pretraining round" in line for line in lines), lines
  assert any("foundation reused from " + str(b / "foundations") in line for line in lines), lines
  assert got["foundation"] == row["foundation"]


def test_a_relative_foundations_from_is_followed_from_any_working_directory(source, tmp_path, monkeypatch):
  """B was run from tmp_path with foundations_from relative to it; its config.json recorded the relative path,
  which C, run from elsewhere, looked up from its own working directory: C was refused ('is not a folder').
  config.json now records the path absolute."""
  a, _, _ = source
  one = {"experiment.methods": "fedavg", "experiment.seeds": "0", "downstream.probe": False}
  monkeypatch.chdir(tmp_path)
  cb = tiny(**one)
  cb.experiment.foundations_from = os.path.relpath(a, tmp_path)
  with pytest.raises(_Started):
    task.run(cb, "B", log=_until_work([]))
  assert json.loads((tmp_path / "B" / "config.json").read_text())["experiment"]["foundations_from"] == str(a)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  cc = tiny(**one)
  cc.experiment.foundations_from = str(tmp_path / "B")
  lines = []
  with pytest.raises(_Started):
    task.run(cc, "C", log=_until_work(lines))
  assert not any(line.startswith("note:") for line in lines), lines  # A's foundation found, nothing lacking


def test_a_damaged_source_foundation_is_refused_before_anything_trains(source, tmp_path):
  """A foundation file cut short in the source workdir was found when the run reading it started (after every
  run before it in the plan); the check now reads every foundation the plan reads before the first run."""
  a, _, _ = source
  a2 = tmp_path / "A2"
  shutil.copytree(a, a2)
  (npz,) = (a2 / "foundations").iterdir()
  npz.write_bytes(npz.read_bytes()[:200])
  c = tiny(**{"experiment.methods": "scratch,fedavg", "experiment.seeds": "0", "downstream.probe": False})
  c.experiment.foundations_from = str(a2)
  with pytest.raises(ConfigError, match=re.escape(str(npz)) + " is unreadable or of another model"):
    task.Experiment(c, str(tmp_path / "C"), log=lambda _: None).check_workdir()
  assert not os.path.exists(tmp_path / "C")


# ------------------------------------------------------------------ the contrast command


def _runs(path, rows: list[dict], tail: str = "", config: dict | None = None) -> str:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "results_raw.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows) + tail)
  if config is not None:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config, f)
  return str(path)


def _pair(seeds, rng) -> list[dict]:
  return [dict(record(m, s), foundation=float(rng.uniform())) for s in seeds for m in ("fedefm", "fedavg")]


def _one_error_line(r) -> str:
  assert r.code == 2 and not r.traceback, r.stderr[-2000:]
  assert r.stdout == "", r.stdout
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fedkd: error: "), r.stderr
  return lines[0]


# fedefm_contrast defines absl flags (--a, --b, --keys, ...) when imported: through the CLI, not imported into
# this pytest process, whose other test files read the flags fedkd.main has
def test_contrast_refuses_two_records_of_one_seed(cli, tmp_path):
  rows = _pair(range(3), np.random.default_rng(0))
  w = _runs(tmp_path / "w", rows + [rows[2]])  # fedefm seed 1 again, line 7
  line = _one_error_line(cli.run(MODULE, [f"--a={w}:fedefm", f"--b={w}:fedavg", "--keys=foundation"]))
  assert "lines 3 and 7 are both the record of 'fedefm' seed 1" in line, line


@pytest.mark.parametrize("seed", [2.5, "2", True])
def test_contrast_refuses_a_seed_that_is_not_a_whole_number(cli, tmp_path, seed):
  rows = _pair(range(3), np.random.default_rng(1))
  rows[4]["seed"] = seed  # fedefm, line 5
  w = _runs(tmp_path / "w", rows)
  line = _one_error_line(cli.run(MODULE, [f"--a={w}:fedefm", f"--b={w}:fedavg", "--keys=foundation"]))
  assert re.search(r"results_raw.jsonl:5: the record's 'seed' is .* not a whole number", line), line


def test_contrast_of_a_huge_integer_or_a_lost_result_is_one_line(cli, tmp_path):
  """10**401 for a key gave OverflowError's traceback; a null foundation in one fedefm record silently
  left that seed out (n=2 of 3)."""
  rows = _pair(range(3), np.random.default_rng(2))
  rows[2]["foundation"] = 10**401
  w = _runs(tmp_path / "huge", rows)
  line = _one_error_line(cli.run(MODULE, [f"--a={w}:fedefm", f"--b={w}:fedavg"]))
  assert "--a: the record of seed 1 holds 1000" in line and "'foundation', not a result" in line, line
  rows[2]["foundation"] = None
  w = _runs(tmp_path / "null", rows)
  line = _one_error_line(cli.run(MODULE, [f"--a={w}:fedefm", f"--b={w}:fedavg"]))
  assert "--a: the record of seed 1 holds null for 'foundation', not a result" in line, line


def test_contrast_leaves_out_a_cut_short_last_line_with_a_note(cli, tmp_path):
  """A workdir stopped while writing a record: the experiment redoes that run, the contrast refused the
  workdir ('is not JSON'); it now contrasts the complete records (against scipy) and says what it left out."""
  rng = np.random.default_rng(3)
  rows = _pair(range(4), rng)
  w = _runs(tmp_path / "w", rows, tail=json.dumps(record("fedefm", 4))[:60])
  r = cli.run(MODULE, [f"--a={w}:fedefm", f"--b={w}:fedavg"])
  assert r.code == 0 and not r.traceback, r.stderr
  assert r.stderr.count("left out its last line (9), which was cut short") == 1, r.stderr  # the workdir is read twice
  x = [rows[2 * s]["foundation"] for s in range(4)]
  y = [rows[2 * s + 1]["foundation"] for s in range(4)]
  d = np.subtract(x, y)
  half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
  p = stats.ttest_rel(x, y).pvalue
  assert f"| foundation | 4 | {d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}] p={p:.3g}" in r.stdout
  v = _runs(tmp_path / "v", rows, tail="{broken\n")
  line = _one_error_line(cli.run(MODULE, [f"--a={v}:fedefm", "--b=x:y"]))
  assert "results_raw.jsonl:9 is not JSON" in line, line  # a complete line (newline after it) is no cut write


def test_contrast_pooling_a_workdir_without_config_json_is_noted_and_the_others_compared(cli, tmp_path):
  """Pooling skipped the config check altogether when any workdir lacked config.json; now the workdirs that
  have one are compared, and those without are named."""
  rng = np.random.default_rng(4)
  cfg = {"task": "fedefm", "image_size": 32, "experiment": {"seeds": "0,1"}}
  w0 = _runs(tmp_path / "w0", _pair((0, 1), rng), config=cfg)
  w1 = _runs(tmp_path / "w1", _pair((2, 3), rng))  # no config.json
  w2 = _runs(tmp_path / "w2", _pair((4, 5), rng), config=dict(cfg, image_size=64))
  side = "{0}:{{m}},{1}:{{m}}"
  r = cli.run(
    MODULE, [f"--a={side.format(w0, w1).format(m='fedefm')}", f"--b={side.format(w0, w1).format(m='fedavg')}"]
  )
  assert r.code == 0 and "| foundation | 4 |" in r.stdout, r.stderr
  notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
  assert len(notes) == 1 and all(w1 in n and "config.json" in n and w0 not in n for n in notes), r.stderr
  # w1 ran a config without the scarce-data curve: its records have no n4/*. That was reported as lost results
  # of w1's runs ('redo that run'); w1 has no config.json, so it may equally be another config
  rows1 = [{k: v for k, v in r.items() if not k.startswith("n4/")} for r in _pair((2, 3), rng)]
  v1 = _runs(tmp_path / "v1", rows1)
  side = f"{w0}:{{m}},{v1}:{{m}}"
  r = cli.run(MODULE, [f"--a={side.format(m='fedefm')}", f"--b={side.format(m='fedavg')}", "--keys=n4/dice/mean"])
  assert r.code == 2 and not r.traceback and r.stdout == "", r.stderr
  (line,) = [x for x in r.stderr.splitlines() if x.startswith("fedkd: error: ")]
  assert "the record of seed 2 has no 'n4/dice/mean'" in line, line
  assert f"or {v1}, pooled without config.json, ran another config" in line, line
  three = f"{w0}:{{m}},{w1}:{{m}},{w2}:{{m}}"
  r = cli.run(MODULE, [f"--a={three.format(m='fedefm')}", f"--b={three.format(m='fedavg')}"])
  assert r.code == 2 and not r.traceback and r.stdout == "", r.stderr
  assert "ran different configs (config.image_size differs)" in r.stderr.strip().splitlines()[-1], r.stderr
