"""A FedEFM KD-weight grid as one process (``fedkd.main --replica_config=fedefm.beta=...``: the experiments
one after another, sharing each method's compiled pretraining round) vs one ``fedkd.main`` process per
grid point. JSON lines: one per side, then the ratio.

Both sides run the same commands' work end to end (pretraining, fine-tuning, tables) as subprocesses,
with JAX's persistent compilation cache off (``JAX_COMPILATION_CACHE_DIR`` unset), so the separate
processes each compile their rounds, as separate runs started by hand do.

  python bench/fedefm_grid.py --config configs/fedefm.py:runlocal --betas 0.3,0.5,0.7 --rounds 10
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], env: dict) -> float:
  t0 = time.perf_counter()
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if p.returncode == 2:  # fedkd.main refused a flag or config value: its one line, as this tool's
    sys.path.insert(0, ROOT)
    from bench import fail

    fail("fedefm_grid", (p.stderr.strip().splitlines() or ["exit 2"])[-1].removeprefix("fedkd: error: "))
  if p.returncode != 0:
    sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
  return time.perf_counter() - t0


def main() -> None:
  sys.path.insert(0, ROOT)
  from bench import ArgumentParser, fail

  ap = ArgumentParser(prog="fedefm_grid", description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/fedefm.py:runlocal")
  ap.add_argument("--betas", default="0.3,0.5,0.7", help="comma list of config.fedefm.beta values")
  ap.add_argument("--rounds", type=int, default=10, help="config.pretrain.num_rounds")
  ap.add_argument("--methods", default="fedefm", help="config.experiment.methods")
  ap.add_argument("--steps", type=int, default=30, help="config.downstream.steps (and scarce_steps)")
  args = ap.parse_args()
  betas = [b for b in args.betas.split(",") if b.strip()]
  if not betas:
    fail("fedefm_grid", f"--betas={args.betas!r} names no value; give a comma list, e.g. --betas 0.3,0.5,0.7")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  common = [
    f"--config.pretrain.num_rounds={args.rounds}",
    f"--config.experiment.methods={args.methods}",
    "--config.experiment.kd_methods=",
    "--config.experiment.seeds=0",
    f"--config.downstream.steps={args.steps}",
    f"--config.downstream.scarce_steps={args.steps}",
  ]
  base = [sys.executable, "-m", "fedkd.main", f"--config={args.config}"]
  with tempfile.TemporaryDirectory() as tmp:
    sep = sum(_run(base + [f"--workdir={tmp}/sep_{b}", f"--config.fedefm.beta={b}", *common], env) for b in betas)
    row = {"side": "separate_processes", "experiments": len(betas), "seconds": round(sep, 1)}
    print(json.dumps(row), flush=True)
    one = _run(base + [f"--workdir={tmp}/grid", f"--replica_config=fedefm.beta={','.join(betas)}", *common], env)
    print(json.dumps({"side": "one_process", "experiments": len(betas), "seconds": round(one, 1)}), flush=True)
  print(
    json.dumps(
      {
        "bench": "fedefm_grid",
        "config": args.config,
        "rounds": args.rounds,
        "methods": args.methods,
        "betas": betas,
        "speedup": round(sep / one, 3),
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  main()
