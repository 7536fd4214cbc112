#!/usr/bin/env bash
# Issue 6's GPU measurements in ONE call: fedkd.bench workloads A / B / C (the centralized ceiling and
# the main client strategies, bf16 compute), the 1,024-client round, the PyTorch anchor, remat's memory.
#
#   bash launch/gpu_bench.sh [path/to/anchor_bench.py] [budget_s]
#
# Writes JSON lines to ${OUT:-runs/gpu_bench}/bench.jsonl (and the raw log beside it). Each step runs
# under `timeout` so one slow step cannot eat the whole budget; a step that times out is logged and
# skipped (rows it finished are kept). Wheels for packages the GPU image lacks (ml-collections) are installed from .whl/
# when that folder exists (see launch/README.md, "GPU benchmark").
set -u
ANCHOR=${1:-}
BUDGET=${2:-540}
OUT_DIR=${OUT:-runs/gpu_bench}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/bench.log"
JSONL="$OUT_DIR/bench.jsonl"
: >"$JSONL"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
START=$(date +%s)
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true) | tee -a "$LOG"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"

step() {  # step <seconds> <command...>: run if the budget allows, keep JSON lines
  local limit=$1; shift
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then echo "SKIP (budget) $*" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $* (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>>"$LOG" | tee -a "$LOG" | grep '^{' >>"$JSONL"
  [ "${PIPESTATUS[0]}" = 124 ] && echo "TIMEOUT $*" | tee -a "$LOG"
}

B="python3 -m fedkd.bench --rounds 3 --dtype bfloat16 ${BENCH_EXTRA:-}"
# Priority order: a step that would not fit the budget is skipped, so the most important come first.
# XLA:GPU took 27-70 s to compile each program here (H200, jax 0.11.2: autotuning), so each step
# keeps to the centralized ceiling plus two or three strategies; rows are printed as they finish.
step 170 $B --workload A --parallelism chunked,unroll,bgemm --chunk 4
step 150 $B --workload B --parallelism chunked,bgemm --chunk 16
step 140 $B --workload C --parallelism vmap,chunked --chunk 4
step 60 $B --scale 1024 --size 128 --steps 2 --batch 4 --width 32 --depth 4 --parallelism chunked --chunk 16 --rounds 2
if [ -n "$ANCHOR" ] && [ -f "$ANCHOR" ]; then
  step 60 python3 "$ANCHOR" --size 256 --clients 16 --steps 4 --batch 8 --rounds 2 --which torch --dtypes bf16
  step 45 python3 "$ANCHOR" --size 128 --clients 128 --steps 2 --batch 4 --rounds 2 --which torch --dtypes bf16
fi
step 60 $B --workload A --parallelism chunked --chunk 4 --remat --no-centralized
echo "done in $(( $(date +%s) - START )) s; $(wc -l <"$JSONL") JSON lines in $JSONL" | tee -a "$LOG"
