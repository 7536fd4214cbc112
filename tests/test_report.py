"""fedkd.report: the one mean ± std convention (sample std, ddof=1; n/a / nan for one seed) against
numpy and the statistics module, the tables built on it, and the eval tables."""

import csv
import json
import math
import statistics

import numpy as np
import pytest

from fedkd import report


def test_mean_std_is_the_sample_std():
  rng = np.random.default_rng(0)
  for n in (2, 3, 7):
    vals = [float(v) for v in rng.uniform(size=n)]
    mean, std = report.mean_std(vals)
    assert mean == pytest.approx(statistics.fmean(vals), rel=1e-12)
    assert std == pytest.approx(statistics.stdev(vals), rel=1e-12)  # n - 1 in the denominator
    assert std == pytest.approx(np.std(vals, ddof=1), rel=1e-12) and std != pytest.approx(np.std(vals), rel=1e-6)
  mean, std = report.mean_std([0.25])
  assert mean == 0.25 and math.isnan(std)
  # [seeds, rounds] -> per round
  a = rng.uniform(size=(3, 5))
  mean, std = report.mean_std(a, axis=0)
  np.testing.assert_allclose(mean, a.mean(0), rtol=1e-12)
  np.testing.assert_allclose(std, [statistics.stdev(a[:, j]) for j in range(5)], rtol=1e-12)
  assert np.isnan(report.mean_std(a[:1], axis=0)[1]).all()
  with pytest.raises(ValueError):
    report.mean_std([])


def test_format_mean_std():
  assert report.format_mean_std(0.80701, 0.01234) == "0.8070 ± 0.0123"
  assert report.format_mean_std(0.80701, 0.01234, digits=3) == "0.807 ± 0.012"
  assert report.format_mean_std(0.5, float("nan")) == "0.5000 ± n/a"


def test_mean_std_tables_numbers_and_caption(tmp_path):
  rng = np.random.default_rng(1)
  three = {"dice/a": list(rng.uniform(size=3)), "iou/a": list(rng.uniform(size=3))}
  one = {"dice/a": [0.5]}  # a single seed, and a metric the group lacks
  md_path, csv_path = str(tmp_path / "t.md"), str(tmp_path / "t.csv")
  lines = report.mean_std_tables(
    md_path,
    csv_path,
    ["method", "seeds"],
    [(["x", 3], three), (["y", 1], one)],
    ["dice/a", "iou/a"],
    title="# T",
    caption="Cap.",
    headers=["Method", "n"],
  )
  assert open(md_path).read() == "\n".join(lines) + "\n"
  with open(csv_path) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["method", "seeds", "dice/a_mean", "dice/a_std", "iou/a_mean", "iou/a_std"]
  for m in three:
    np.testing.assert_allclose(float(rows[0][f"{m}_mean"]), np.mean(three[m]), rtol=1e-12)
    np.testing.assert_allclose(float(rows[0][f"{m}_std"]), np.std(three[m], ddof=1), rtol=1e-12)
  assert float(rows[1]["dice/a_mean"]) == 0.5 and math.isnan(float(rows[1]["dice/a_std"]))
  assert rows[1]["iou/a_mean"] == rows[1]["iou/a_std"] == ""
  md = open(md_path).read()
  assert md.startswith("# T\n\nCap. Each cell: mean ± sample std (ddof=1)") and "n/a" in md.splitlines()[2]
  dice_a = f"{np.mean(three['dice/a']):.4f} ± {np.std(three['dice/a'], ddof=1):.4f}"
  assert f"| x | 3 | {dice_a} |" in md
  assert "| y | 1 | 0.5000 ± n/a |  |" in md and "| Method | n | dice/a | iou/a |" in md
  with pytest.raises(ValueError, match="cells"):
    report.mean_std_tables(md_path, csv_path, ["method"], [(["x", 1], one)], ["dice/a"])
  lines = report.mean_std_tables(
    md_path, csv_path, ["m"], [(["x"], {"comm/bytes_up": [27504.0, 27506.0]})], ["comm/bytes_up"]
  )
  assert "| x | 27505 ± 1 |" in lines, lines  # byte counts without decimals


def test_eval_tables_and_site_table(tmp_path):
  results = {"a": {"catheter": {k: 0.1 * i for i, k in enumerate(report.EVAL_METRICS)}}}
  results["a"]["catheter"]["hd95_nan_images"] = 2
  report.write_eval_tables(results, str(tmp_path), 7, spacing_mm=0.3, unseen="b")
  assert json.load(open(tmp_path / "eval.json")) == {"round": 7, "spacing_mm": 0.3, "unseen": "b", "sites": results}
  with open(tmp_path / "eval.csv") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["site", "class", "metric", "value"] and len(rows) == 1 + len(report.EVAL_METRICS) + 1
  assert ["a", "catheter", "hd95_nan_images", "2"] in rows
  # a metric no image defines (NaN) is null in eval.json: strict JSON that any parser reads
  results["a"]["catheter"]["assd"] = float("nan")
  report.write_eval_tables(results, str(tmp_path), 8)
  text = (tmp_path / "eval.json").read_text()
  assert "NaN" not in text
  assert json.loads(text)["sites"]["a"]["catheter"]["assd"] is None
  assert json.loads(text)["sites"]["a"]["catheter"]["hd95"] == results["a"]["catheter"]["hd95"]
  with open(tmp_path / "eval.csv") as f:
    assert ["a", "catheter", "assd", "nan"] in list(csv.reader(f))
  per_site = {
    "s0": {"dice/c": 0.5, "iou/c": 0.25},
    "s1": {"dice/c": 0.7, "iou/c": 0.45},
    "u": {"dice/c": 0.1, "iou/c": 0},
  }
  text = report.site_table(per_site, "u").splitlines()
  assert len({len(line) for line in text}) == 1  # columns aligned, also the mean row's longer label
  assert text[3].startswith("u (unseen)") and text[-1].split()[-2:] == ["0.6000", "0.3500"]  # train-site means


def test_std_bands_and_error_bars_stay_in_0_1_for_dice(tmp_path, monkeypatch):
  """A Dice band of mean ± sample std is clipped to [0, 1] (the std of scores near 0 or 1 would reach
  outside); an unbounded metric (hd95) keeps its band; every panel carries the legend."""
  import matplotlib.axes

  bands, bars, legends = [], [], []
  monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", lambda self, x, lo, hi, **kw: bands.append((lo, hi)))
  real_errorbar, real_legend = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.legend
  monkeypatch.setattr(
    matplotlib.axes.Axes,
    "errorbar",
    lambda self, x, y, yerr=None, **kw: bars.append((y, yerr)) or real_errorbar(self, x, y, **kw),
  )
  monkeypatch.setattr(
    matplotlib.axes.Axes, "legend", lambda self, *a, **kw: legends.append(self) or real_legend(self, *a, **kw)
  )
  dice = [[0.02, 0.9], [0.2, 0.99], [0.05, 0.98]]  # per seed: rounds 1 and 2
  runs = [[{"round": r + 1, "dice/catheter": d[r], "hd95/catheter": 50.0 * d[r]} for r in range(2)] for d in dice]
  assert report.curves_plot([("fedavg", runs)], ["dice/catheter", "hd95/catheter"], str(tmp_path / "c.png"))
  vals = np.array(dice)
  mean, std = vals.mean(0), vals.std(0, ddof=1)
  (lo, hi), (hlo, hhi) = bands
  np.testing.assert_allclose(lo, np.clip(mean - std, 0, 1))
  np.testing.assert_allclose(hi, np.clip(mean + std, 0, 1))
  assert mean[0] - std[0] < 0 and lo[0] == 0.0 and mean[1] + std[1] > 1 and hi[1] == 1.0
  np.testing.assert_allclose(hlo, 50 * (mean - std))  # not a [0, 1] score: unclipped
  assert len(legends) == 2
  report.errorbar_plot(
    {"fedavg": [(0.5, vals[:, 0]), (1.0, vals[:, 1])]}, "mu", "dice/catheter", str(tmp_path / "e.png")
  )
  y, (below, above) = bars[0]
  np.testing.assert_allclose(np.asarray(y) - np.asarray(below), np.clip(mean - std, 0, 1))
  np.testing.assert_allclose(np.asarray(y) + np.asarray(above), np.clip(mean + std, 0, 1))


# ---------------------------------------------------------------- paired statistics


def test_paired_difference_equals_scipys_paired_t_test_and_interval():
  from scipy import stats

  rng = np.random.default_rng(3)
  for n in (2, 5, 9):
    a = rng.normal(0.6, 0.05, n)
    b = a - rng.normal(0.02, 0.03, n)
    res = report.paired_difference(a, b)
    ref = stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert res["n"] == n
    np.testing.assert_allclose(res["mean"], np.mean(a - b), rtol=1e-12)
    np.testing.assert_allclose(res["std"], np.std(a - b, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(res["p"], ref.pvalue, rtol=1e-9)
    np.testing.assert_allclose([res["ci_low"], res["ci_high"]], [ci.low, ci.high], rtol=1e-9)
    ci90 = ref.confidence_interval(0.9)
    res90 = report.paired_difference(a, b, confidence=0.9)
    np.testing.assert_allclose([res90["ci_low"], res90["ci_high"]], [ci90.low, ci90.high], rtol=1e-9)


def test_paired_difference_edge_cases():
  one = report.paired_difference([0.5], [0.4])
  assert one["mean"] == pytest.approx(0.1) and all(math.isnan(one[k]) for k in ("std", "ci_low", "p"))
  same = report.paired_difference([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])  # every difference exactly 0.5
  assert same["std"] == 0.0 and same["p"] == 0.0 and same["ci_low"] == same["ci_high"] == 0.5
  assert report.paired_difference([0.5, 0.6], [0.5, 0.6])["p"] == 1.0
  with pytest.raises(ValueError, match="equally long"):
    report.paired_difference([0.1, 0.2], [0.1])
  assert "n/a" in report.format_contrast(one)


def _holm_brute(p):
  """Holm's step-down procedure written from its definition: the smallest alpha at which each hypothesis
  is rejected (reject H_(1..k) while p_(j) <= alpha / (m - j + 1) for every j <= k)."""
  m = len(p)
  order = sorted(range(m), key=lambda i: p[i])
  out = [0.0] * m
  for k, i in enumerate(order):
    out[i] = min(1.0, max((m - j) * p[order[j]] for j in range(k + 1)))
  return out


def test_holm_against_its_definition():
  rng = np.random.default_rng(0)
  for m in (1, 2, 5, 30):
    p = list(rng.uniform(0, 0.2, m))
    np.testing.assert_allclose(report.holm(p), _holm_brute(p), rtol=1e-12)
  assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  got = report.holm([0.01, float("nan"), 0.02])
  assert math.isnan(got[1]) and got[0] == pytest.approx(0.02) and got[2] == pytest.approx(0.02)
  cell = report.format_contrast(report.paired_difference([0.7, 0.71, 0.69], [0.6, 0.62, 0.61]), 0.03)
  assert cell.startswith("+0.090 [") and "(Holm 0.03), significant" in cell
