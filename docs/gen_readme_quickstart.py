"""Regenerates the README's quickstart output block from a fresh run of the README's main command.

  python docs/gen_readme_quickstart.py                     # runs the quickstart (~5 min on 2 CPU cores)
  python docs/gen_readme_quickstart.py --from_log=run.log  # rewrites the block from a saved stdout

The run goes to a fresh temporary workdir (removed afterwards). The block between the
``<!-- quickstart:begin -->`` and ``<!-- quickstart:end -->`` markers of README.md is replaced by the run's
header, first and last round lines, the held-out table, the outputs line and the speed line, followed by
the CPU it ran on. Run it after any change that moves the quickstart's numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"
COMMAND = ["-m", "fedkd.main", "--config=configs/quickstart.py"]


def cpu_name() -> str:
  """The CPU model, its widest vector instructions (XLA compiles for the CPU it runs on: a model name such as
  'AMD EPYC' covers generations with and without AVX-512) and the cores this process may use, e.g.
  'AMD EPYC, AVX2, 2 cores'."""
  name, flags = "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for ln in f:
        if ln.startswith("model name") and not name:
          name = ln.split(":", 1)[1].strip()
        elif ln.startswith("flags") and not flags:
          flags = set(ln.split(":", 1)[1].split())
  except OSError:
    pass
  vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return ", ".join(filter(None, [name or platform.processor() or platform.machine(), vector, f"{cores} cores"]))


def versions() -> str:
  """The package versions the quickstart's numbers depend on, as the block names them."""
  from importlib.metadata import version

  return f"jax {version('jax')}, flax {version('flax')}, optax {version('optax')}"


def block(lines: list[str], workdir: str, cpu: str, packages: str) -> str:
  """The README block (markdown) from the run's stdout ``lines``; ``packages``: :func:`versions`."""
  lines = [ln.rstrip("\n") for ln in lines]

  def first(pattern: str) -> int:
    for i, ln in enumerate(lines):
      if re.match(pattern, ln):
        return i
    raise ValueError(f"the run's output has no line matching {pattern!r}; did the quickstart finish?")

  header, untrained = first(r"fedkd fedavg: "), first(r"round 0 \(untrained\)")
  rounds = [i for i, ln in enumerate(lines) if re.match(r"round\s+\d+/\d+ ", ln)]
  if not rounds:
    raise ValueError("the run's output has no round lines")
  table = first(r"held-out Dice / IoU after round")
  table_end = next(i for i in range(table, len(lines)) if lines[i].startswith("mean (train sites)"))
  outputs, speed = first(r"outputs in "), first(r"training speed: ")
  short = lines[outputs].replace(workdir, ".../runs/quickstart")
  short = re.sub(r"\(TensorBoard[^)]*\)", "(TensorBoard: ...)", short)
  short = re.sub(r"checkpoints/ \([^)]*\)", "checkpoints/ (...)", short)
  shown = [lines[header], lines[untrained], lines[rounds[0]], "...", lines[rounds[-1]], ""]
  shown += lines[table : table_end + 1] + ["", short, lines[speed]]
  mean = lines[table_end].split()
  return "\n".join(
    [
      BEGIN,
      "```",
      *shown,
      "```",
      "",
      f"Measured on this CPU ({cpu}) by `python docs/gen_readme_quickstart.py`, which reruns the command above",
      f"and rewrites this block ({packages}). The same CPU, seed and package versions give the same table;",
      "another CPU (XLA compiles for the CPU it runs on) or release differs in the second or third decimal.",
      f"Mean Dice over the training sites: catheter {mean[3]}, guidewire {mean[4]}.",
      END,
    ]
  )


def replace(readme_text: str, new_block: str) -> str:
  if readme_text.count(BEGIN) != 1 or readme_text.count(END) != 1:
    raise ValueError(f"README.md needs exactly one {BEGIN} ... {END} pair")
  head, rest = readme_text.split(BEGIN)
  _, tail = rest.split(END)
  return head + new_block + tail


def run_quickstart(workdir: str) -> list[str]:
  """Runs the quickstart, echoing its output as it comes; returns its stdout lines."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
    [sys.executable, *COMMAND, f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
  )
  lines = []
  for ln in proc.stdout:
    sys.stdout.write(ln)
    lines.append(ln)
  if proc.wait() != 0:
    raise SystemExit(f"gen_readme_quickstart: the quickstart exited with {proc.returncode}; README.md unchanged")
  return lines


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--from_log", help="a saved stdout of the quickstart (its workdir as --workdir) instead of a run")
  p.add_argument("--workdir", default=None, help="with --from_log: the workdir that run used")
  a = p.parse_args(argv)
  if a.from_log:
    with open(a.from_log) as f:
      lines = f.readlines()
    workdir = a.workdir or ""
  else:
    tmp = tempfile.mkdtemp(prefix="fedkd-quickstart-")
    workdir = os.path.join(tmp, "quickstart")
    try:
      lines = run_quickstart(workdir)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  with open(README) as f:
    text = f.read()
  new = replace(text, block(lines, workdir, cpu_name(), versions()))
  with open(README + ".tmp", "w") as f:
    f.write(new)
  os.replace(README + ".tmp", README)
  print(f"rewrote the quickstart block of {README}")


if __name__ == "__main__":
  main()
