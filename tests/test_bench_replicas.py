"""bench/replicas.py runs each side (the replica program, the runs one after another) in its own fresh
process, so neither reuses the other's compiled programs, in the order asked; its row is recomputed here
by hand from what the sides report. The sides are a stand-in interpreter that records its process and
prints known measurements (a real side compiles for minutes); a FedEFM config is one line."""

import json
import os
import stat
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ is a top-level folder of the checkout, not an installed package
  sys.path.insert(0, ROOT)

from bench import replicas as bench_replicas  # noqa: E402

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")

# what each side's process reports (fields of its JSON line): seconds a real side could measure
SIDES = {
  "replicas": {
    "wall_s": 30.0,
    "first_round_s": [12.0],
    "steady_round_s": [0.9, 1.1, 1.0],
    "compiles": [70],
    "compile_s": [20.0],
  },
  "sequential": {
    "wall_s": 45.0,
    "first_round_s": [10.0, 4.0],
    "steady_round_s": [0.5, 0.4, 0.45, 0.6],
    "compiles": [74, 2],
    "compile_s": [15.0, 4.0],
  },
}

_FAKE = """#!{python}
import json, os, sys
args = dict(a.split("=", 1) for a in sys.argv[2:])
side = args["--side"]
with open({log!r}, "a") as f:
  f.write(json.dumps({{"side": side, "pid": os.getpid(), "script": sys.argv[1], "args": args,
                       "cache": os.environ.get("JAX_COMPILATION_CACHE_DIR")}}) + "\\n")
mode = {mode!r}
if mode == "user_error":
  print("W external/xla: some warning", file=sys.stderr)
  print("replicas: error: config.image_size=16 is too small for the synthetic X-rays; use >= 32", file=sys.stderr)
  sys.exit(2)
if mode == "crash":
  raise RuntimeError("a bug in the side")
print("a line the task printed")
row = dict(side=side, pid=os.getpid(), backend="cpu", device="cpu", jax="0.0", **{sides!r}[side])
print(json.dumps(row))
"""


def _fake_python(tmp_path, mode="ok"):
  """A stand-in for this interpreter: records each process it is started as, then prints SIDES[side]."""
  log = tmp_path / "sides.jsonl"
  fake = tmp_path / "python"
  fake.write_text(_FAKE.format(python=sys.executable, log=str(log), mode=mode, sides=SIDES))
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  return str(fake), log


def _main(monkeypatch, python, *args):
  monkeypatch.setattr(sys, "executable", python)
  monkeypatch.setattr(sys, "argv", ["bench/replicas.py", *args])
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/nonexistent/cache")
  bench_replicas.main()


@pytest.mark.parametrize(
  "args, order, layout",
  [
    ((), ["replicas", "sequential"], "loop"),  # the default order; auto = loop (docs/engine.md)
    (("--order=sequential-first", "--layout=vmap"), ["sequential", "replicas"], "vmap"),
  ],
)
def test_each_side_runs_in_its_own_fresh_process_and_the_row_is_recomputed_by_hand(
  monkeypatch, capsys, tmp_path, args, order, layout
):
  python, log = _fake_python(tmp_path)
  _main(monkeypatch, python, f"--config={QUICKSTART}", "--seeds=0,1", "--rounds=4", *args)
  started = [json.loads(line) for line in log.read_text().splitlines()]
  assert [s["side"] for s in started] == order
  pids = {s["pid"] for s in started}
  assert len(pids) == 2 and os.getpid() not in pids  # two processes, neither this one
  for s in started:
    assert os.path.samefile(s["script"], os.path.join(ROOT, "bench", "replicas.py"))
    assert s["args"]["--config"] == QUICKSTART and s["args"]["--seeds"] == "0,1" and s["args"]["--rounds"] == "4"
    assert s["cache"] is None  # the persistent compilation cache stays off in the sides
  assert len({s["args"]["--workdir"] for s in started}) == 2
  assert not os.path.exists(os.path.dirname(started[0]["args"]["--workdir"]))  # the runs' folder is removed
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1
  row = json.loads(out[0])
  imgs = 4 * 4 * 8  # quickstart: 4 clients x 4 local steps x batch 8
  # medians by hand: replicas (0.9, 1.0, 1.1) -> 1.0; sequential (0.4, 0.45, 0.5, 0.6) -> 0.475
  want = {
    "seeds": 2,
    "rounds": 4,
    "images_per_replica_round": imgs,
    "layout": layout,
    "order": "-".join([order[0], "first"]),
    "isolation": "process",
    "replicas_wall_s": 30.0,
    "replicas_first_round_s": 12.0,
    "replicas_steady_round_s": 1.0,
    "replicas_compiles": 70,
    "replicas_compile_s": 20.0,
    "sequential_wall_s": 45.0,
    "sequential_first_round_s": 7.0,
    "sequential_steady_round_s": 0.475,
    "sequential_compiles": [74, 2],
    "sequential_compile_s": 19.0,
    "steady_speedup": 0.95,  # 2 x 0.475 / 1.0
    "wall_speedup": 1.5,  # 45 / 30
    "replicas_images_per_s": 256.0,  # 2 x 128 / 1.0
    "sequential_images_per_s": 269.5,  # 128 / 0.475 = 269.47
  }
  assert {k: row[k] for k in want} == want
  assert 0 < row["replicas_process_s"] < 60 and 0 < row["sequential_process_s"] < 60


@pytest.mark.parametrize("mode", ["user_error", "crash"])
def test_a_side_that_fails_stops_the_bench(monkeypatch, capsys, tmp_path, mode):
  """A side's user error is this tool's one line (exit 2; the side's warnings are not repeated); a side's
  bug shows its traceback and exits non-zero. The other side is not started."""
  python, log = _fake_python(tmp_path, mode)
  with pytest.raises(SystemExit) as e:
    _main(monkeypatch, python, f"--config={QUICKSTART}", "--seeds=0,1", "--rounds=3")
  err = capsys.readouterr()
  assert not err.out.strip()
  assert len(log.read_text().splitlines()) == 1
  if mode == "user_error":
    assert e.value.code == 2
    assert err.err.strip().splitlines() == [
      "replicas: error: config.image_size=16 is too small for the synthetic X-rays; use >= 32"
    ]
  else:
    assert e.value.code not in (0, 2)
    assert "Traceback" in err.err and "RuntimeError: a bug in the side" in err.err


def test_a_fedefm_config_is_one_line_before_any_side_starts(monkeypatch, capsys, tmp_path):
  python, log = _fake_python(tmp_path)
  with pytest.raises(SystemExit) as e:
    _main(monkeypatch, python, f"--config={os.path.join(ROOT, 'configs', 'fedefm.py')}:tiny", "--seeds=0,1")
  lines = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(lines) == 1, lines
  assert lines[0].startswith("replicas: error: ") and "bench/fedefm_grid.py" in lines[0]
  assert not log.exists()


def test_a_real_side_refusing_the_config_is_one_line(monkeypatch, capsys, tmp_path):
  """A real side process (this interpreter): the replica program refuses 16 px images after its backend
  starts; the bench prints that one line and exits 2 without starting the sequential side."""
  cfg = tmp_path / "small.py"
  cfg.write_text(
    "from configs.quickstart import build\n\n\ndef get_config(arg=None):\n  c = build()\n  c.image_size = 16\n  return c\n"
  )
  with pytest.raises(SystemExit) as e:
    _main(monkeypatch, sys.executable, f"--config={cfg}", "--seeds=0,1", "--rounds=3")
  lines = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(lines) == 1, lines
  assert lines[0].startswith("replicas: error: config.image_size=16 is too small"), lines
