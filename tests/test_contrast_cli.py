"""python -m fedkd.tasks.fedefm_contrast as a command: only numeric result keys are offered and accepted,
each once; a bad flag, a bad --keys or a malformed results_raw.jsonl is one line on stderr and exit 2 with
nothing on stdout; --help / --helpfull exit 0; a good contrast matches scipy's paired t-test with Holm."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

MODULE = "fedkd.tasks.fedefm_contrast"
# what a FedEFM results_raw.jsonl record holds besides its numbers: labels, lists, nested records, nulls
NUMERIC = ["dice/mean", "foundation", "n8/dice/mean", "seconds"]
NOT_NUMERIC = ["method", "teacher_kd", "cost", "emd", "foundation_curve", "w_history", "pretrain_final"]


def _record(method: str, seed: int, rng) -> dict:
  return {
    "unseen_percent": 100.0,
    "method": method,
    "teacher_kd": False,
    "seed": seed,
    "dice/mean": float(rng.uniform()),
    "n8/dice/mean": float(rng.uniform()),
    "foundation": None if method == "scratch" else float(rng.uniform()),
    "seconds": int(rng.integers(5, 50)),
    "cost": None if method == "scratch" else {"gflops_per_silo_round": 0.02, "mb_per_silo_round": 0.08},
    "emd": {"w_spread": 0.01, "error_max": 0.01},
    "foundation_curve": [{"round": 2, "foundation": 0.3}],
    "w_history": [[[0.5, 0.5], [0.4, 0.6]]],
    "pretrain_final": {},
  }


@pytest.fixture
def workdir(tmp_path):
  rng = np.random.default_rng(11)
  rows = [_record(m, s, rng) for s in range(5) for m in ("scratch", "fedavg", "fedefm")]
  (tmp_path / "results_raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return tmp_path, {(r["method"], r["seed"]): r for r in rows}


def _one_error_line(r) -> str:
  assert r.code == 2 and not r.traceback, r.stderr[-2000:]
  assert r.stdout == "", r.stdout  # nothing printed before the error
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fedkd: error: "), r.stderr
  return lines[0]


@pytest.mark.parametrize("key", NOT_NUMERIC + ["bogus"])
def test_only_numeric_keys_are_accepted_and_offered(cli, workdir, key):
  w, _ = workdir
  line = _one_error_line(cli.run(MODULE, [f"--a={w}:fedefm", f"--b={w}:fedavg", f"--keys=foundation,{key}"]))
  assert f"'{key}' is not a numeric result" in line, line
  offered = line.split("numeric keys of these records: ")[1]
  assert offered.split(", ") == NUMERIC, line


def test_keys_listed_twice_or_none_are_refused(cli, workdir):
  w, _ = workdir
  base = [f"--a={w}:fedefm", f"--b={w}:fedavg"]
  line = _one_error_line(cli.run(MODULE, base + ["--keys=foundation,dice/mean,foundation"]))
  assert "foundation more than once" in line and "give each key once" in line, line
  for empty in ("--keys=", "--keys=,", "--keys= , "):
    line = _one_error_line(cli.run(MODULE, base + [empty]))
    assert "names no key" in line and ", ".join(NUMERIC) in line, line


def test_a_key_scratch_lacks_has_no_pairs(cli, workdir):
  w, _ = workdir
  line = _one_error_line(cli.run(MODULE, [f"--a={w}:fedefm", f"--b={w}:scratch", "--keys=foundation"]))
  assert "'foundation' is not a numeric result of both run sets" in line, line  # scratch's foundation is null


def test_malformed_results_lines_name_the_file_and_line(cli, tmp_path, workdir):
  w, _ = workdir
  good = (w / "results_raw.jsonl").read_text().splitlines()[0]
  for text, needle in (
    (f"{good}\n\n[1, 2]\n", "results_raw.jsonl:3 is a JSON list, not a result record"),
    (f"{good}\n\"text\"\n", "results_raw.jsonl:2 is a JSON str, not a result record"),
    (f"{good}\n{{broken\n", "results_raw.jsonl:2 is not JSON"),
  ):
    bad = tmp_path / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "results_raw.jsonl").write_text(text)
    line = _one_error_line(cli.run(MODULE, [f"--a={bad}:scratch", f"--b={w}:fedavg"]))
    assert str(bad) in line and needle in line, line
  no_seed = {k: v for k, v in json.loads(good).items() if k != "seed"}
  (bad / "results_raw.jsonl").write_text(json.dumps(no_seed) + "\n")
  line = _one_error_line(cli.run(MODULE, [f"--a={bad}:scratch", f"--b={w}:fedavg"]))
  assert "results_raw.jsonl:1" in line and "'seed'" in line, line


def test_flag_errors_are_one_line_and_help_exits_zero(cli, workdir):
  w, _ = workdir
  base = [f"--a={w}:fedefm", f"--b={w}:fedavg"]
  line = _one_error_line(cli.run(MODULE, base + ["--unseen_percent=abc"]))
  assert "--unseen_percent=abc" in line, line
  line = _one_error_line(cli.run(MODULE, base + ["--bogus"]))
  assert "bogus" in line, line
  line = _one_error_line(cli.run(MODULE, base + ["extra"]))
  assert "unexpected arguments extra" in line, line
  line = _one_error_line(cli.run(MODULE, base + ["--workdir=x"]))
  assert "--workdir is not a flag of this program" in line, line
  line = _one_error_line(cli.run(MODULE, base + ["--config=configs/fedefm.py"]))
  assert "--config is not a flag of this program" in line, line
  line = _one_error_line(cli.run(MODULE, [f"--a={w}:fedefm"]))
  assert "give --a=WORKDIR:METHOD and --b=WORKDIR:METHOD" in line, line
  for flag in ("--help", "--helpfull", "-h"):
    r = cli.run(MODULE, [flag])
    assert r.code == 0 and not r.traceback and "--keys" in r.stdout and "--unseen_percent" in r.stdout, r.stderr
    if flag != "--helpfull":  # the short help lists this tool's flags only, not fedkd.cli's shared ones
      shown = [line.split(":")[0].strip() for line in r.stdout.splitlines() if line.startswith("  --")]
      assert shown and not any(f"--{n}" in shown for n in ("workdir", "out", "frames", "config")), shown


def test_python_dash_m_flag_errors_and_help(workdir):
  """The same through ``python -m`` itself (absl names this module's flags by the script path there)."""
  w, _ = workdir
  cmd = [sys.executable, "-m", MODULE]
  r = subprocess.run(cmd + ["--helpfull"], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and "--keys" in r.stdout and "Traceback" not in r.stderr, r.stderr[-2000:]
  r = subprocess.run(cmd + [f"--a={w}:fedefm", f"--b={w}:fedavg", "--bogus"], capture_output=True, text=True)
  assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert "bogus" in r.stderr


def _holm(ps: list[float]) -> list[float]:
  """Holm-Bonferroni, written out: the k-th smallest of m p-values times (m - k), running maximum, cap 1."""
  order = sorted(range(len(ps)), key=lambda i: ps[i])
  out, running = [0.0] * len(ps), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
    out[i] = running
  return out


def test_two_numeric_keys_match_scipy_with_holm(cli, workdir):
  w, records = workdir
  r = cli.run(MODULE, [f"--a={w}:fedefm", f"--b={w}:fedavg", "--keys=foundation, seconds"])
  assert r.code == 0, r.stderr[-2000:]
  keys = ["foundation", "seconds"]
  ps, cells = [], []
  for k in keys:
    x = np.array([records["fedefm", s][k] for s in range(5)], float)
    y = np.array([records["fedavg", s][k] for s in range(5)], float)
    d = x - y
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    ps.append(stats.ttest_rel(x, y).pvalue)
    cells.append((d.mean(), d.mean() - half, d.mean() + half))
  assert "Holm over the 2 keys" in r.stdout
  for k, (mean, lo, hi), p, pa in zip(keys, cells, ps, _holm(ps)):
    verdict = "significant" if pa <= 0.05 else "n.s."
    row = f"| {k} | 5 | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] p={p:.3g} (Holm {pa:.3g}), {verdict} |"
    assert row in r.stdout, (row, r.stdout)
  assert r.stdout.count("| foundation |") == 1


def test_one_seed_has_no_p_and_is_not_counted_as_a_holm_test(cli, tmp_path):
  """One shared seed: no key has a p, yet the header said 'Holm over the 2 keys' (FedEFM's endpoints.md says
  'Holm over the 0 contrasts ...; N without a p' in the same situation)."""
  rng = np.random.default_rng(3)
  rows = [_record(m, 0, rng) for m in ("fedavg", "fedefm")]
  (tmp_path / "results_raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  r = cli.run(MODULE, [f"--a={tmp_path}:fedefm", f"--b={tmp_path}:fedavg", "--keys=foundation,seconds"])
  assert r.code == 0, r.stderr[-2000:]
  assert r.stdout.splitlines()[0].endswith("Holm over the 0 keys; 2 without a p (fewer than 2 seeds)"), r.stdout
