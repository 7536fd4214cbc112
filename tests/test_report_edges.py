"""fedkd.report at its edges: paired differences against scipy and the closed forms of their degenerate
cases, Holm's input, contrast cells of differences below the printed decimals, and table writes that fail
(the old file stays, no temporary is left, a folder in the way is one user error)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fedkd import report
from fedkd.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- paired_difference


@pytest.mark.parametrize(
  "a, b",
  [
    ([0.5, NAN, 0.6], [0.4, 0.3, 0.2]),  # a seed's score NaN
    ([0.5, 0.6], [0.1, INF]),  # an infinite score
    ([1e308, 1e308], [-1e308, -1e308]),  # finite scores whose difference overflows
  ],
)
def test_paired_difference_refuses_nan_and_inf(a, b):
  """The contrast of scores holding NaN / Inf was all NaN, and its cell read '+nan (n/a: 3 seed)', as if
  one seed were the cause."""
  with pytest.raises(ValueError, match="not a result"):
    report.paired_difference(a, b)


def test_every_difference_equal_gives_its_closed_form():
  """d_i = 0.1 exactly for every seed (scipy's ttest_rel gives NaN here): the docstring's interval [0.1, 0.1]
  and p = 0; numpy's mean of [0.1] * 3 is 0.10000000000000002 and its std 1.7e-17, which gave p = 9.6e-33
  and an interval around a mean that is not any seed's difference."""
  res = report.paired_difference([0.1, 0.1, 0.1], [0.0, 0.0, 0.0])
  assert res == {"n": 3, "mean": 0.1, "std": 0.0, "ci_low": 0.1, "ci_high": 0.1, "p": 0.0}
  d = 0.7 - 0.6  # 0.09999999999999998 in every seed
  assert report.paired_difference([0.7] * 5, [0.6] * 5) == {
    "n": 5,
    "mean": d,
    "std": 0.0,
    "ci_low": d,
    "ci_high": d,
    "p": 0.0,
  }
  assert report.paired_difference([0.3, 0.4], [0.3, 0.4])["p"] == 1.0
  # differences equal up to the last bit of a - b: 0.8 - 0.7 = 0.10000000000000009, 0.9 - 0.8 =
  # 0.09999999999999998 (p = 1.4e-31 and an interval of width 1e-16 before)
  res = report.paired_difference([0.8, 0.7, 0.9], [0.7, 0.6, 0.8])
  assert res["std"] == 0.0 and res["p"] == 0.0 and res["ci_low"] == res["ci_high"] == res["mean"]
  assert res["mean"] in (0.8 - 0.7, 0.7 - 0.6, 0.9 - 0.8)
  # ... and around zero: no difference, p = 1 (not a "significant" 1e-17)
  zero = report.paired_difference([0.8 - 0.7, 0.1], [0.1, 0.8 - 0.7])
  assert zero["mean"] == 0.0 and zero["p"] == 1.0
  # a real spread of one part in 1e12 is still a t-test, as scipy's
  from scipy import stats

  a, b = [0.5, 0.5 + 1e-12, 0.5 + 3e-12], [0.4, 0.4, 0.4]
  assert report.paired_difference(a, b)["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-6)
  one = report.paired_difference([0.1], [0.0])
  assert one["n"] == 1 and one["mean"] == 0.1 and all(math.isnan(one[k]) for k in ("std", "ci_low", "ci_high", "p"))


def test_paired_difference_matches_scipy_for_many_seeds_and_other_levels():
  from scipy import stats

  rng = np.random.default_rng(7)
  for n in (2, 3, 1000, 100_000):
    a = rng.normal(0.6, 0.05, n)
    b = a - rng.normal(0.001, 0.03, n)
    ref = stats.ttest_rel(a, b)
    for level in (0.5, 0.9, 0.99):
      res = report.paired_difference(a, b, confidence=level)
      ci = ref.confidence_interval(level)
      np.testing.assert_allclose([res["ci_low"], res["ci_high"]], [ci.low, ci.high], rtol=1e-9, atol=1e-15)
      np.testing.assert_allclose(res["p"], ref.pvalue, rtol=1e-7)


# ---------------------------------------------------------------- holm


def test_holm_refuses_values_that_are_not_p_values():
  """A negative 'p' came out as an adjusted 0.0 (significant), a p above 1 as 1.0."""
  for bad in ([0.2, -0.1], [1.5, 0.01], [0.01, INF]):
    with pytest.raises(ValueError, match="not a p-value"):
      report.holm(bad)
  with pytest.raises(ValueError, match="1-D"):
    report.holm([[0.1, 0.2]])


def test_holm_ties_and_clipping_by_hand():
  # sorted 0.01, 0.01, 0.04, 0.5 times 4, 3, 2, 1 -> 0.04, 0.03, 0.08, 0.5; running max -> 0.04, 0.04, 0.08, 0.5
  assert report.holm([0.04, 0.01, 0.5, 0.01]) == pytest.approx([0.08, 0.04, 0.5, 0.04], rel=1e-12)
  assert report.holm([0.6, 0.7]) == [1.0, 1.0]  # 2 * 0.6 > 1
  assert report.holm([0.3, 0.4]) == pytest.approx([0.6, 0.6], rel=1e-12)  # 0.4 alone would be below 0.6
  assert report.holm([]) == []
  assert report.holm([0.0, 1.0]) == [0.0, 1.0]


# ---------------------------------------------------------------- format_contrast


def test_a_difference_below_the_printed_decimals_keeps_its_digits():
  """Differences of order 1e-5 (e.g. a small-valued key in fedkd.tasks.fedefm_contrast) printed as
  '+0.000 [-0.000, +0.000] p=0.0742', and a significant one as '+0.000 [+0.000, +0.000] ..., significant'."""
  from scipy import stats

  a, b = [1e-5, 2e-5, 3e-5], [0.0, 0.0, 0.0]
  ci = stats.ttest_rel(a, b).confidence_interval(0.95)
  cell = report.format_contrast(report.paired_difference(a, b))
  assert cell.startswith(f"+2e-05 [{ci.low:+.3g}, {ci.high:+.3g}] p=0.0742"), cell
  a = [1e-5, 1.1e-5, 1.2e-5, 1.05e-5]
  cell = report.format_contrast(report.paired_difference(a, [0.0] * 4))
  low, high = (float(x) for x in cell.split("[")[1].split("]")[0].split(", "))
  assert 0 < low < high < 2e-5 and cell.endswith(", significant"), cell
  # a difference that rounds to 0 beside an interval that does not keeps the fixed decimals of the tables
  cell = report.format_contrast({"n": 5, "mean": -1e-5, "ci_low": -0.042, "ci_high": 0.042, "p": 0.99})
  assert cell == "-0.000 [-0.042, +0.042] p=0.99, n.s."
  assert report.format_contrast(report.paired_difference([0.0], [0.0])) == "+0.000 (n/a: 1 seed)"


def test_a_p_value_just_above_alpha_is_not_printed_as_alpha():
  """A Holm-adjusted (or raw) p of 0.0500001 beside "n.s." printed as 0.05; it keeps the digits that put it
  above alpha, and a p at alpha or clearly away from it keeps 3 significant digits."""
  res = {"n": 5, "mean": 0.01, "ci_low": 0.001, "ci_high": 0.02}
  cell = report.format_contrast({**res, "p": 0.0123456}, p_adjusted=0.0500001)
  assert cell == "+0.010 [+0.001, +0.020] p=0.0123 (Holm 0.0500001), n.s.", cell
  assert report.format_contrast({**res, "p": 0.0500004}).endswith("p=0.0500004, n.s.")
  assert report.format_contrast({**res, "p": 0.05}).endswith("p=0.05, significant")
  assert report.format_contrast({**res, "p": 0.0512}, alpha=0.0512).endswith("p=0.0512, significant")
  assert report.format_contrast({**res, "p": 0.051234}, p_adjusted=0.2).endswith("p=0.0512 (Holm 0.2), n.s.")
  assert report.format_p(0.04999999) == "0.05" and report.format_p(0.5) == "0.5"  # 0.05 is on its side


# ---------------------------------------------------------------- writes that fail


def test_a_failed_table_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  """A value strict JSON cannot hold (Inf) in eval.json, a CSV cell whose text raises: the error comes
  through, the earlier eval.json / table stays as it was, and no half-written temporary is left beside
  them (one was: eval.json.tmp, t.csv.tmp)."""
  results = {"a": {"catheter": {"dice": 0.5}}}
  report.write_eval_tables(results, str(tmp_path), 3)
  before = (tmp_path / "eval.json").read_text()
  with pytest.raises(ValueError):
    report.write_eval_tables({"a": {"catheter": {"dice": INF}}}, str(tmp_path), 4)
  assert sorted(os.listdir(tmp_path)) == ["eval.csv", "eval.json"]
  assert (tmp_path / "eval.json").read_text() == before and json.loads(before)["round"] == 3

  class Cell:
    def __str__(self):
      raise RuntimeError("a cell that cannot be written")

  report.write_csv(str(tmp_path / "t.csv"), ["x"], [[1]])
  with pytest.raises(RuntimeError):
    report.write_csv(str(tmp_path / "t.csv"), ["x"], [[2]] * 1000 + [[Cell()]])
  assert (tmp_path / "t.csv").read_bytes() == b"x\r\n1\r\n"
  assert sorted(os.listdir(tmp_path)) == ["eval.csv", "eval.json", "t.csv"]


def test_a_folder_where_a_table_goes_is_a_user_error_and_replaces_nothing(tmp_path):
  """A folder named results.md beside results.csv: an IsADirectoryError traceback after results.csv had
  already been replaced (a new CSV beside an old Markdown table) and with results.md.tmp left."""
  (tmp_path / "results.md").mkdir()
  (tmp_path / "results.csv").write_text("old\n")
  with pytest.raises(UserError, match=r"results\.md is a folder"):
    report.mean_std_tables(
      str(tmp_path / "results.md"), str(tmp_path / "results.csv"), ["m"], [(["x"], {"d": [0.5, 0.6]})], ["d"]
    )
  assert (tmp_path / "results.csv").read_text() == "old\n"
  assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.md"]


def test_a_folder_in_the_way_ends_a_program_with_one_line(tmp_path):
  """Through fedkd's entry-point error path (fedkd.cli.run_app, as fedkd.eval and the FedEFM experiment
  use it): exit 2, one line naming the folder, no traceback."""
  (tmp_path / "eval.json").mkdir()
  code = (
    "import sys\nfrom fedkd import cli, report\n"
    "def main(argv):\n  report.write_eval_tables({'a': {'c': {'dice': 0.5}}}, sys.argv[1], 1)\n"
    "cli.run_app(main, ['prog'], uses_config=False, shared=())\n"
  )
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run(
    [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert len(lines) == 1 and f"{tmp_path / 'eval.json'} is a folder" in lines[0], r.stderr
  assert sorted(os.listdir(tmp_path)) == ["eval.json"]
