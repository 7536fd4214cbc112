"""fedkd.bench_conv: every client-batched conv formulation agrees with XLA's vmapped convolution."""

import json

from fedkd import bench_conv

TINY = ["--clients", "3", "--batch", "2", "--size", "8", "--cin", "4", "--cout", "5", "--reps", "1"]


def _rows(capsys, argv):
  bench_conv.main(TINY + argv)
  return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_every_formulation_and_pass_matches_vmap(capsys):
  rows = _rows(capsys, [])
  assert {(r["formulation"], r["pass"]) for r in rows} == {
    (f, p) for f in bench_conv.FORMULATIONS for p in bench_conv.PASSES
  }
  for r in rows:
    assert r["ms"] > 0 and r["ratio"] > 0
    if r["formulation"] != "centralized":
      assert r["max_rel_err"] < 1e-5, r  # f32: the same sums in another order


def test_compile_only_times_nothing(capsys):
  rows = _rows(capsys, ["--compile-only", "--formulations", "vmap,hybrid", "--passes", "all"])
  assert [(r["name"], r["formulation"]) for r in rows] == [("compiled", "vmap"), ("compiled", "hybrid")]
  assert all("ms" not in r for r in rows)
