#!/usr/bin/env bash
# Issue 6's GPU measurements in ONE call, from the repository root: `python -m bench` workloads A / B / C
# (the centralized ceiling and the client layouts x conv lowerings, bf16 compute), the 1,024-client
# round, one conv layer per pass (`python -m bench.conv`), the PyTorch anchor, remat's memory, the HLO
# report. The rows measured on 2026-11-27 are in docs/engine.md ("GPU: one NVIDIA H200").
#
#   bash bench/gpu.sh [path/to/anchor_bench.py] [budget_s]
#   PLAN=profile bash bench/gpu.sh [path/to/anchor_bench.py] [budget_s]
#
# PLAN=profile (issue 15's first device call): workloads A, C and B with `--profile`, so the timed rows
# are followed by a `profile` row each (device time per op category, bench/trace_table.py; the traces are written to
# /tmp/fedkd_prof_* and one small trace per workload is copied to $OUT, which comes back from the device machine
# only while it stays small), the anchor, the FedEFM seeds-stacking bench (bench/fedefm_stack.py), the replica bench
# (bench/replicas.py) and the HLO report.
#
# Writes JSON lines to ${OUT:-runs/gpu_bench}/bench.jsonl (and the raw log beside it). Each step runs
# under `timeout` so one slow step cannot eat the whole budget; a step that times out is logged and
# skipped (rows it finished are kept). Wheels for packages the GPU image lacks (ml-collections, tensorboardX) are
# installed from .whl/ when that folder exists (see bench/README.md, "GPU script"); the script stops at once (exit 2)
# when python3 cannot import JAX or those packages.
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
if ! python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG" \
  || [ "${PIPESTATUS[0]}" != 0 ]; then
  echo "python3 ($(command -v python3)) cannot start JAX (above); run from an environment with jax installed" | tee -a "$LOG"
  exit 2
fi
if ! python3 -c "import ml_collections, tensorboardX" 2>&1 | tee -a "$LOG" || [ "${PIPESTATUS[0]}" != 0 ]; then
  echo "python3 cannot import ml_collections / tensorboardX (above): carry their wheels in .whl/ (bench/README.md)" \
    | tee -a "$LOG"
  exit 2
fi
FAILED=0 TIMEDOUT=0 SKIPPED=0

step() {  # step <seconds> <command...>: run if the budget allows, keep JSON lines
  local limit=$1; shift
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then SKIPPED=$((SKIPPED + 1)); echo "SKIP (budget) $*" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $* (limit ${limit}s)" | tee -a "$LOG"
  # rows to bench.jsonl, and their first 200 characters to the terminal (what comes back if $OUT does not)
  timeout -k 10 "$limit" "$@" 2>>"$LOG" | tee -a "$LOG" | grep --line-buffered '^{' | tee -a "$JSONL" | cut -c1-200
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ]; then
    TIMEDOUT=$((TIMEDOUT + 1))
    echo "TIMEOUT $*" | tee -a "$LOG"
  elif [ "$rc" != 0 ]; then  # a failed step shows its last lines here (stderr goes to the log only)
    FAILED=$((FAILED + 1))
    echo "FAILED (exit $rc) $*; the last lines of $LOG:" | tee -a "$LOG"
    tail -n 5 "$LOG" | head -n 4
  fi
}

B="python3 -m bench --rounds 3 --dtype bfloat16 --ceiling xla"  # cuDNN's convs: one centralized compile a step
X=${BENCH_EXTRA:-}  # appended to every `python -m bench` command (overrides the sizes; e.g. a CPU smoke test)
# XLA:GPU took 10-86 s to compile each program alone on an H200 (jax 0.11.2, autotuning). Phase 1
# compiles every benchmark step below side by side (--compile-only, PAR processes at a time) into
# JAX's persistent compilation cache (with XLA's per-fusion autotuning results); phase 2 then runs
# the steps one process at a time, loading the executables. Nothing is timed while anything else
# runs on the GPU. A program phase 1 did not finish is compiled in phase 2 (rows then come later).
# More than a few compiles at once slow each other down and disturb autotuning (docs/engine.md).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/fedkd_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
A="--workload A --chunk 4"
C="--workload C --chunk 4"
S="--size 128 --steps 2 --batch 4 --width 32 --depth 4 --pairs chunked:gemm --chunk 16"
K=${CONV_ARGS:-"--clients 16 --batch 8 --size 256 --cin 32 --cout 32 --dtype bfloat16 --reps 20"}  # one A-sized conv layer
PLAN=${PLAN:-issue6}
if [ "$PLAN" = profile ]; then
  STEPS=(  # the ceiling, vmap and the best layout of each workload, each row profiled
    "170|$A --pairs vmap:wgrad,chunked:gemm --profile /tmp/fedkd_prof_A"
    "130|$C --pairs vmap:gemm,chunked:gemm --profile /tmp/fedkd_prof_C"
    "110|--workload B --pairs chunked:wgrad,chunked:gemm --chunk 16 --profile /tmp/fedkd_prof_B"
    # vmap + XLA's own grouped convs on A: its compile never finished within a step before, so it goes last
  )
else
STEPS=(  # "limit_s|python -m bench arguments" (CONV: the conv layer), most important first
  "200|$A --pairs vmap:wgrad,vmap:xla"
  "200|--workload B --pairs chunked:wgrad,chunked:gemm --chunk 16"
  "150|$C --pairs vmap:gemm,vmap:wgrad"
  "120|$A --pairs vmap:wgrad --unroll true"  # MFU: XLA's cost analysis counts a rolled loop's body once
  "90|$S --scale 128,512,1024 --rounds 2"
  "90|CONV"
  "120|$A --pairs chunked:gemm,vmap:gemm,unroll:xla,chunked:xla:1"
  "120|$C --pairs chunked:gemm"
  "45|$A --pairs chunked:gemm --remat --no-centralized"
)
fi
command_of() {  # the command of a step's arguments
  if [ "$1" = CONV ]; then echo "python3 -m bench.conv $K"; else echo "$B $1 $X"; fi
}

PHASE1=${PHASE1:-200}
PAR=${PAR:-4}
P1_END=$(( $(date +%s) + PHASE1 ))
echo "== phase 1: ${#STEPS[@]} steps compiled, $PAR at a time, until +${PHASE1}s" | tee -a "$LOG"
for s in "${STEPS[@]}"; do
  args=${s#*|}
  while [ "$(jobs -rp | wc -l)" -ge "$PAR" ]; do sleep 1; done
  left=$((P1_END - $(date +%s)))
  [ "$left" -lt 15 ] && { echo "SKIP (phase 1 time) $args" | tee -a "$LOG"; continue; }
  # shellcheck disable=SC2046
  (timeout -k 10 "$left" $(command_of "$args") --compile-only 2>>"$LOG.phase1" | tee -a "$LOG" \
     | grep --line-buffered '^{' >>"$JSONL"
   rc=${PIPESTATUS[0]}
   [ "$rc" = 124 ] && echo "TIMEOUT (phase 1) $args" | tee -a "$LOG"
   [ "$rc" != 0 ] && [ "$rc" != 124 ] && echo "FAILED (phase 1, exit $rc; see $LOG.phase1) $args" | tee -a "$LOG") &
done
wait
echo "== phase 1 done at +$(( $(date +%s) - START ))s" | tee -a "$LOG"

# Phase 2, in the same order: a step that would not fit the budget is skipped.
for s in "${STEPS[@]}"; do
  # shellcheck disable=SC2046
  step "${s%%|*}" $(command_of "${s#*|}")
done
if [ "$PLAN" = profile ]; then  # one small trace per workload back in $OUT (the rest stays on the machine)
  for w in A C B; do
    t=$(find "/tmp/fedkd_prof_$w" -name '*.trace.json.gz' -size -6M 2>/dev/null | head -n 1)
    [ -n "$t" ] && cp "$t" "$OUT_DIR/trace_$w.trace.json.gz"
  done
fi
if [ -n "$ANCHOR" ] && [ -f "$ANCHOR" ]; then
  step 60 python3 "$ANCHOR" --size 256 --clients 16 --steps 4 --batch 8 --rounds 2 --which torch --dtypes bf16
  step 45 python3 "$ANCHOR" --size 128 --clients 128 --steps 2 --batch 4 --rounds 2 --which torch --dtypes bf16
else
  why="${ANCHOR:-no path given}"; [ -n "$ANCHOR" ] && why="$ANCHOR not found"
  echo "SKIP the PyTorch anchor: $why (carry .anchor/, bench/README.md)" | tee -a "$LOG"
fi
if [ "$PLAN" = profile ]; then
  step 100 python3 bench/fedefm_stack.py --methods fedefm,fedavg --replicas 5 ${FEDEFM_STACK_ARGS:-}
  # seeds as replicas of one program (fedkd.main --seeds) vs one run after another: loop (the default) and vmap
  step 150 python3 bench/replicas.py --seeds 0,1,2 --rounds 4 ${REPLICAS_ARGS:-}
  step 180 python3 bench/replicas.py --seeds 0,1,2 --rounds 4 --layout vmap ${REPLICAS_ARGS:-}
  step 120 $(command_of "$A --pairs vmap:xla --no-centralized")
  # the host pipeline on the device machine's cores (needs grain + tensorflow-datasets: carried wheels)
  if python3 -c "import grain, tensorflow_datasets" 2>/dev/null; then
    step 150 python3 bench/pipeline.py --data_dir /tmp/fedkd_pipeline_tfds --size 128 --clients 16 --steps 4 \
      --batch 8 --workers 0,4,12 ${PIPELINE_ARGS:-}
  else
    echo "SKIP bench/pipeline.py: grain / tensorflow-datasets not importable" | tee -a "$LOG"
  fi
fi
# Does XLA:GPU fuse the im2col patches into its GEMMs? (HLO after optimization, no cache: dumps need a compile)
step 45 bash -c "rm -rf /tmp/xdump; XLA_FLAGS=--xla_dump_to=/tmp/xdump JAX_ENABLE_COMPILATION_CACHE=false \
  python3 -m bench.conv $K --formulations centralized,xla,wgrad,gemm --passes fwd,all --reps 2 >/dev/null \
  && python3 bench/hlo_report.py /tmp/xdump && cp /tmp/xdump/*jit_gemm_all*after_optimizations.txt /tmp/xdump/*jit_wgrad_all*after_optimizations.txt '$OUT_DIR'/"
echo "done in $(( $(date +%s) - START )) s; $(wc -l <"$JSONL") JSON lines in $JSONL; $FAILED step(s) failed," \
  "$TIMEDOUT timed out (their later rows are missing), $SKIPPED skipped for the budget" | tee -a "$LOG"
[ "$FAILED" = 0 ]
