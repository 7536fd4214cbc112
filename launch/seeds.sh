#!/usr/bin/env bash
# Run one config over several seeds, one workdir each; re-running resumes unfinished seeds.
#   launch/seeds.sh configs/fedavg_unet.py:runlocal runs/fedavg 0 1 2 [-- --config.num_rounds=50]
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 CONFIG OUT_DIR SEED [SEED ...] [-- extra fedkd.main flags]" >&2
  exit 2
fi
config=$1; out=$2; shift 2
seeds=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do seeds+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
for s in "${seeds[@]}"; do
  echo "== seed $s -> $out/seed$s"
  python -m fedkd.main --config="$config" --workdir="$out/seed$s" --config.seed="$s" "$@"
done
