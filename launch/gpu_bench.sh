#!/usr/bin/env bash
# Issue 6's GPU measurements in ONE call: fedkd.bench workloads A / B / C (the centralized ceiling and
# the client strategies, bf16 compute), the 1,024-client round, one conv layer per pass, the PyTorch
# anchor, remat's memory. The order follows the README's next steps (gconv, chunked with hybrid
# inside); the rows measured on 2026-11-27 are in the README's GPU table.
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

B="python3 -m fedkd.bench --rounds 3 --dtype bfloat16"
X=${BENCH_EXTRA:-}  # appended to every fedkd.bench command (overrides the sizes; e.g. a CPU smoke test)
# XLA:GPU took 27-70 s to compile each program on an H200 (jax 0.11.2, autotuning), one at a time.
# Phase 1 compiles every program of phase 2 side by side (--compile-only, PAR processes at a time)
# into JAX's persistent compilation cache (with XLA's per-fusion autotuning results); phase 2 then
# times the rows one process at a time, loading the executables. Nothing is timed while anything
# else runs on the GPU. A program phase 1 did not finish is compiled in phase 2 (rows then come later).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/fedkd_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
A="--workload A --chunk 4"
C="--workload C --chunk 4"
S="--size 128 --steps 2 --batch 4 --width 32 --depth 4 --parallelism chunked --chunk 16"
K=${CONV_ARGS:-"--clients 16 --batch 8 --size 256 --cin 32 --cout 32 --dtype bfloat16 --reps 20"}  # one A-sized conv layer
PRECOMPILE=(  # phase 1's queue, most important first (what the README's next steps ask for, then the rest)
  "$A --parallelism none" "$A --parallelism gconv --no-centralized" "$A --parallelism hybrid --no-centralized"
  "--workload B --parallelism none" "--workload B --parallelism chunked --chunk 16 --chunk-strategy hybrid --no-centralized"
  "--workload B --parallelism chunked --chunk 16 --chunk-strategy gconv --no-centralized"
  "$C --parallelism none" "$C --parallelism gconv --no-centralized" "$C --parallelism bgemm --no-centralized"
  "$A --parallelism vmap --no-centralized" "$S --scale 1024" "$S --scale 128" "$S --scale 512" "CONV"
  "$A --parallelism chunked --no-centralized" "$A --parallelism bgemm --no-centralized"
  "$C --parallelism hybrid --no-centralized" "$C --parallelism chunked --no-centralized"
  "$A --parallelism chunked --remat --no-centralized"
)
PHASE1=${PHASE1:-200}
PAR=${PAR:-4}
P1_END=$(( $(date +%s) + PHASE1 ))
echo "== phase 1: ${#PRECOMPILE[@]} programs, $PAR at a time, until +${PHASE1}s" | tee -a "$LOG"
for args in "${PRECOMPILE[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$PAR" ]; do sleep 1; done
  left=$((P1_END - $(date +%s)))
  [ "$left" -lt 15 ] && { echo "SKIP (phase 1 time) $args" | tee -a "$LOG"; continue; }
  cmd="$B $args $X"
  [ "$args" = CONV ] && cmd="python3 -m fedkd.bench_conv $K"
  # shellcheck disable=SC2086
  (timeout "$left" $cmd --compile-only 2>>"$LOG.phase1" | tee -a "$LOG" | grep '^{' >>"$JSONL"
   [ "${PIPESTATUS[0]}" = 124 ] && echo "TIMEOUT (phase 1) $args" | tee -a "$LOG") &
done
wait
echo "== phase 1 done at +$(( $(date +%s) - START ))s" | tee -a "$LOG"

# Phase 2, in priority order: a step that would not fit the budget is skipped.
step 200 $B $A --parallelism gconv,hybrid,vmap $X
step 200 $B --workload B --parallelism chunked --chunk 16 --chunk-strategy hybrid $X
step 120 $B --workload B --parallelism chunked --chunk 16 --chunk-strategy gconv --no-centralized $X
step 150 $B $C --parallelism gconv,bgemm,hybrid $X
step 90 $B $S --scale 128,512,1024 --rounds 2 $X
step 90 python3 -m fedkd.bench_conv $K
step 120 $B $A --parallelism chunked,bgemm $X
step 120 $B $C --parallelism chunked $X
if [ -n "$ANCHOR" ] && [ -f "$ANCHOR" ]; then
  step 60 python3 "$ANCHOR" --size 256 --clients 16 --steps 4 --batch 8 --rounds 2 --which torch --dtypes bf16
  step 45 python3 "$ANCHOR" --size 128 --clients 128 --steps 2 --batch 4 --rounds 2 --which torch --dtypes bf16
fi
step 45 $B $A --parallelism chunked --remat --no-centralized $X
# Does XLA:GPU fuse the im2col patches into its GEMMs? (HLO after optimization, no cache: dumps need a compile)
step 45 bash -c "rm -rf /tmp/xdump; XLA_FLAGS=--xla_dump_to=/tmp/xdump JAX_ENABLE_COMPILATION_CACHE=false \
  python3 -m fedkd.bench_conv $K --formulations centralized,vmap,hybrid,bgemm --passes fwd,all --reps 2 >/dev/null \
  && python3 launch/hlo_gemm_report.py /tmp/xdump && cp /tmp/xdump/*jit_bgemm_all*after_optimizations.txt /tmp/xdump/*jit_hybrid_all*after_optimizations.txt '$OUT_DIR'/"
echo "done in $(( $(date +%s) - START )) s; $(wc -l <"$JSONL") JSON lines in $JSONL" | tee -a "$LOG"
