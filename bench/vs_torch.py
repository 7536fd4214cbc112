"""fedkd's federated round against the anchor script's PyTorch client loop, alternated on one machine.

  python bench/vs_torch.py --anchor ../shared/bench/anchor_bench.py [--torch-python PY] [--pairs 5]
      [--size 64 --clients 8 --steps 2 --batch 4 --width 32] [-- EXTRA python -m bench FLAGS]

Runs, ``--pairs`` times in turn, (a) the anchor's ``torch_seq`` row (PyTorch, clients trained one after
another, f32; ``--torch-python`` is a Python with torch installed, default this one) and (b) ``python -m
bench --no-centralized`` on the same workload (the anchor's UNet: widths ``width`` ... 8 x ``width`` and
a 16 x ``width`` bottleneck, i.e. ``--depth 4``), each as its own process and ``--rounds`` timed rounds.
The bench flags are parsed by bench's parser before anything runs (an unknown one, or a value of the wrong
type, is one line); what bench checks only once it runs (a dtype name) stops it after the first PyTorch row.
fedkd's clients train as the anchor's do (``--optimizer sgd --lr 0.01 --loss ce``: plain SGD on the
cross-entropy); bench flags after ``--`` override that, e.g. ``-- --optimizer adam --loss dice_ce`` for
the main job's Adam on 0.5 cross-entropy + 0.5 soft Dice (about 15 % more work per step).
Alternating the two, instead of one after the other, keeps a shared machine's drift out of the ratio.
fedkd's processes share a persistent compilation cache (``--cache``), which holds the round's executable;
on a 2-core CPU a later process still reported 15-47 s of ``compile_s`` (tracing + lowering + loading,
not timed) against 52-63 s in the first. Prints one JSON line per measurement and a ``vs_torch``
line with the medians and ``ratio`` = fedkd images/s / PyTorch images/s per fedkd row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import ArgumentParser, fail  # noqa: E402


def _rows(cmd: list[str], env: dict | None = None, flag: str = "--torch-python") -> list[dict]:
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
  except OSError as e:  # the interpreter itself is missing or not executable
    fail("vs_torch", f"{flag}={cmd[0]} cannot be run ({e.strerror or e}); give the path of a Python interpreter")
  if out.returncode != 0 and "No module named 'torch'" in out.stderr:
    fail(
      "vs_torch",
      f"torch is not installed in {cmd[0]} (the anchor's Python); install it there (pip install torch) or pass "
      "--torch-python=PATH of a Python that has it",
    )
  said = [line for line in out.stderr.splitlines() if line.strip()]
  if out.returncode == 2 and flag == "python" and said:  # bench refused a flag given after --: its one line
    fail("vs_torch", f"python -m bench: {said[-1].split('error: ', 1)[-1]}")
  if out.returncode != 0:
    sys.exit(f"vs_torch: {' '.join(cmd)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _check_bench_flags(args: list[str]) -> None:
  """``python -m bench``'s parser over ``args``: an unknown flag or a value of the wrong type is one line here,
  before any measurement (else after the first PyTorch one)."""
  from bench.__main__ import _parser

  p = _parser()
  p.exit_on_error = False
  try:
    ns, rest = p.parse_known_args(args)
  except argparse.ArgumentError as e:
    fail("vs_torch", f"python -m bench: {e}")
  if rest and not ns.measure:
    fail("vs_torch", f"python -m bench: unrecognized arguments: {' '.join(rest)} (python -m bench --help lists them)")


def main(argv=None) -> None:
  p = ArgumentParser(
    prog="vs_torch", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
  )
  p.add_argument("--anchor", required=True, help="path of the anchor script (anchor_bench.py)")
  p.add_argument("--torch-python", default=sys.executable, help="a Python interpreter with torch installed")
  p.add_argument("--pairs", type=int, default=5, help="alternations of the two measurements")
  p.add_argument("--rounds", type=int, default=2, help="timed rounds per measurement")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--clients", type=int, default=8)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "fedkd-vs-torch-cache"))
  argv = sys.argv[1:] if argv is None else list(argv)
  cut = argv.index("--") if "--" in argv else len(argv)
  a, extra = p.parse_args(argv[:cut]), argv[cut + 1 :]  # an unknown flag before -- is an error, not bench's
  if not os.path.isfile(a.anchor):
    fail("vs_torch", f"no anchor script at {a.anchor}; pass --anchor PATH/anchor_bench.py")
  for k in ("pairs", "rounds", "size", "clients", "steps", "batch", "width"):
    if getattr(a, k) <= 0:
      fail("vs_torch", f"--{k}={getattr(a, k)} must be positive")
  shape = ["--size", str(a.size), "--clients", str(a.clients), "--steps", str(a.steps), "--batch", str(a.batch)]
  shape += ["--width", str(a.width)]
  torch_cmd = [a.torch_python, os.path.abspath(a.anchor), *shape, "--which", "torch", "--dtypes", "f32"]
  torch_cmd += ["--rounds", str(a.rounds)]
  fed_cmd = [sys.executable, "-m", "bench", *shape, "--depth", "4", "--rounds", str(a.rounds), "--no-centralized"]
  fed_cmd += ["--optimizer", "sgd", "--lr", "0.01", "--loss", "ce", *extra]  # the anchor's; extra overrides
  _check_bench_flags(fed_cmd[3:])
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=a.cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  torch_ips, fed_ips, workload = [], {}, {}
  for i in range(a.pairs):
    for row in _rows(torch_cmd):
      if row.get("name") == "torch_seq":
        print(json.dumps(dict(row, pair=i)), flush=True)
        torch_ips.append(row["images_per_s"])
    for row in _rows(fed_cmd, env, flag="python"):
      if row.get("name") == "fed_round" and "images_per_s" in row:
        print(json.dumps(dict(row, pair=i)), flush=True)
        flight = f"(k={row['in_flight']})" if "in_flight" in row else ""
        key = f"{row['layout']}{flight}+{row['lowering']}@{row['devices']}dev"
        fed_ips.setdefault(key, []).append(row["images_per_s"])
        workload = {k: row.get(k) for k in ("optimizer", "lr", "loss")}
  if not torch_ips or not fed_ips:
    sys.exit("vs_torch: a measurement printed no row (see the commands above)")
  t = statistics.median(torch_ips)
  fed = {k: statistics.median(v) for k, v in fed_ips.items()}
  print(
    json.dumps(
      dict(
        name="vs_torch",
        pairs=a.pairs,
        torch_images_per_s=t,
        fedkd_images_per_s=fed,
        ratio={k: round(v / t, 3) for k, v in fed.items()},
        fedkd_workload=workload,
        torch_command=" ".join(torch_cmd[1:]),
        fedkd_command=" ".join(["python"] + fed_cmd[1:]),
      )
    ),
    flush=True,
  )


if __name__ == "__main__":
  main()
