#!/usr/bin/env bash
# Run a fedkd command on a Cloud TPU VM (single host or pod slice): create the VM (directly or as a
# queued resource), copy this checkout to every worker, install, run the command on all workers,
# fetch the results from worker 0, and delete the VM on exit (unless --keep). Ctrl-C (or SIGTERM) while
# the command runs or its results are fetched asks before deleting the VM (it holds the run's files);
# --on_interrupt=keep|delete decides without asking.
#
#   launch/tpu_vm.sh --name=fedkd-v4 --zone=us-central2-b --accelerator_type=v4-8 -- \
#       python -m fedkd.main --config=configs/fedavg_unet.py --workdir=runs/tpu
#   launch/tpu_vm.sh --name=fedkd-v5 --zone=us-west4-a --accelerator_type=v5litepod-8 \
#       --version=v2-alpha-tpuv5-lite --queued --spot --fetch=runs/sweep -- \
#       python -m launch.sweep --config=configs/fedavg_unet.py --out=runs/sweep
#   launch/tpu_vm.sh --dry_run --name=x --zone=z -- python -m fedkd.main ...   # print, run nothing
#
# On a multi-host slice every worker runs the same command with FEDKD_MULTIHOST=1 (a slice of several
# workers, as gcloud describes it), so fedkd.main calls jax.distributed.initialize(), which finds the workers
# from the VM's metadata server (fedkd/distributed.py). Only process 0 writes metrics;
# checkpoints are written by all workers into the same --workdir, so for pods point --workdir at a shared
# location (a gs:// bucket or a mounted filestore): a path each worker sees as a folder of its own is refused.
# launch.sweep runs on a single-host VM (v4-8, v5litepod-8): on a slice of several workers it is refused.
set -euo pipefail

usage() {
  cat <<EOF
usage: $0 --name=NAME --zone=ZONE [options] -- COMMAND [ARGS...]

  --name=NAME               TPU VM name (required): a lowercase letter, then lowercase letters, digits
                            or hyphens
  --zone=ZONE               zone, e.g. us-central2-b (required)
  --accelerator_type=TYPE   e.g. v4-8, v5litepod-8, v5p-16 (default: v4-8)
  --version=RUNTIME         TPU software version (default: tpu-ubuntu2204-base)
  --project=PROJECT         gcloud project (default: gcloud's configured project)
  --spot                    spot capacity (cheaper, can be preempted: the VM and its disk go; re-running
                            resumes only from a --workdir every VM sees, e.g. gs://BUCKET/run)
  --queued                  create through a queued resource (waits for capacity)
  --keep                    do not delete the VM at the end
  --reuse                   use an existing VM with this name (skip create)
  --on_interrupt=WHAT       Ctrl-C / SIGTERM once the command has started: ask (default: delete the VM
                            only if you answer y; without a terminal the VM is kept), keep, or delete
                            (before the command starts, an interrupt deletes the VM this script created)
  --src=DIR                 code to copy (default: the repository of this script)
  --remote_dir=DIR          where the code goes on the workers (default: fedkd); paths here and in
                            --fetch: letters, digits and . _ / ~ + -
  --fetch=PATH              path (relative to --remote_dir) copied back from worker 0 into
                            ./PATH's parent at the end (default: runs)
  --pip=SPEC                JAX package to install (default: jax[tpu])
  --dry_run                 print the commands instead of running them
  -h, --help                this help
  COMMAND                   what every worker runs inside --remote_dir
EOF
}

die() { echo "fedkd: error: $*" >&2; exit 2; }

name="" zone="" accel="v4-8" version="tpu-ubuntu2204-base" project="" spot=0 queued=0 keep=0 reuse=0
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" remote_dir="fedkd" fetch="runs" pip_spec="jax[tpu]"
dry_run=0 on_interrupt="ask"
cmd=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accel="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --keep) keep=1 ;;
    --reuse) reuse=1 ;;
    --on_interrupt=*) on_interrupt="${1#*=}" ;;
    --src=*) src="${1#*=}" ;;
    --remote_dir=*) remote_dir="${1#*=}" ;;
    --fetch=*) fetch="${1#*=}" ;;
    --pip=*) pip_spec="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; cmd=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1' (flags are --key=value; the command goes after --)" ;;
  esac
  shift
done
[ -n "$name" ] || { usage >&2; die "--name is required"; }
[ -n "$zone" ] || { usage >&2; die "--zone is required"; }
[ ${#cmd[@]} -gt 0 ] || { usage >&2; die "no command given; put it after --, e.g. -- python -m fedkd.main ..."; }
[ -d "$src" ] || die "--src=$src is not a directory"
case "$on_interrupt" in
  ask|keep|delete) ;;
  *) die "--on_interrupt=$on_interrupt is not ask, keep or delete" ;;
esac
# gcloud's TPU node names (the queued resource is NAME-qr): lowercase letters, digits and hyphens
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name=$name is not a TPU VM name: a lowercase letter, then lowercase letters, digits or hyphens, not ending in a hyphen"
# the two paths go unquoted into the workers' shell commands and into scp's NAME:PATH
[[ "$remote_dir" =~ ^[A-Za-z0-9._/~+-]+$ ]] \
  || die "--remote_dir='$remote_dir' must be a path of letters, digits and . _ / ~ + - (no spaces or quotes)"
[[ "$fetch" =~ ^[A-Za-z0-9._/~+-]*$ ]] \
  || die "--fetch='$fetch' must be a path of letters, digits and . _ / ~ + - (no spaces or quotes)"
[ "$dry_run" = 1 ] || command -v gcloud >/dev/null \
  || die "gcloud (the Google Cloud CLI) is not on PATH; install it (https://cloud.google.com/sdk/docs/install), or pass --dry_run to print the commands"

common=(--zone="$zone")
[ -n "$project" ] && common+=(--project="$project")
qr_name="${name}-qr"

# Runs (or, with --dry_run, prints) one command, shell-quoted so it can be pasted. The command runs as a
# background job the script waits for, so a signal to the script alone (kill PID, not only Ctrl-C at the
# terminal, which reaches every process) acts at once: the trap passes it on to the command.
child=""
run() {
  if [ "$dry_run" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
    return 0
  fi
  local rc=0
  (trap - INT TERM; exec "$@") <&0 &  # a background job of a script ignores Ctrl-C unless reset
  child=$!
  wait "$child" || rc=$?
  child=""
  return "$rc"
}

on_signal() {  # $1: the signal, $2: the exit code
  interrupted=1
  if [ -n "$child" ]; then  # the command and its own children (gcloud's ssh)
    if command -v pkill >/dev/null; then pkill "-$1" -P "$child" 2>/dev/null || true; fi
    kill -s "$1" "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
    child=""
  fi
  exit "$2"
}

# The command that deletes the VM (or its queued resource), shell-quoted to paste.
delete_cmd() {
  if [ "$queued" = 1 ] && [ "$reuse" = 0 ]; then
    printf '%q ' gcloud compute tpus queued-resources delete "$qr_name" "${common[@]}" --force; printf '%s' --quiet
  else
    printf '%q ' gcloud compute tpus tpu-vm delete "$name" "${common[@]}"; printf '%s' --quiet
  fi
}

# After an interrupt (Ctrl-C, SIGTERM) once the command started, the VM holds what the command wrote
# (checkpoints, metrics) and perhaps the command, still running: kept (true) unless the user says delete.
kept_after_interrupt() {
  echo "interrupted: TPU VM $name holds what the command wrote ($remote_dir/$fetch); it is billed until deleted" >&2
  [ -n "$fetch" ] && echo "  fetch the results: gcloud compute tpus tpu-vm scp --recurse" \
    "$name:$remote_dir/$fetch $(dirname "$fetch") ${common[*]} --worker=0" >&2
  echo "  delete the VM:     $(delete_cmd)" >&2
  local answer=""
  if [ "$on_interrupt" = ask ] && [ -t 0 ]; then
    trap - INT  # Ctrl-C at the question: stop here, the VM kept
    printf 'Delete TPU VM %s now? [y/N] ' "$name" >&2
    read -r answer || answer=""
  fi
  case "$on_interrupt:$answer" in
    delete:*|ask:y|ask:Y|ask:yes) return 1 ;;
  esac
  echo "keeping TPU VM $name" >&2
}

# Whether the describe command "$@" (after $1, what it describes) finds nothing: gcloud's NOT_FOUND. Any other
# failure (no account, no network) is not "absent": creating could then fail on an existing VM of this name,
# and the cleanup would delete it.
absent() {
  local what=$1 err
  shift
  if err=$("$@" 2>&1 >/dev/null); then
    return 1
  fi
  case "$err" in
    *NOT_FOUND* | *"not found"*) return 0 ;;
  esac
  die "cannot tell whether a $what named ${name} exists (gcloud: ${err%%$'\n'*}); fix gcloud (gcloud auth login, gcloud config set project, the network) and re-run"
}

created=0  # set just before this script creates the VM: only a VM it created is deleted
started=0  # set when the command starts on the workers: from then on the VM holds its output
interrupted=0
cleanup() {
  local rc=$?
  [ -n "${tarball:-}" ] && [ "$dry_run" = 0 ] && rm -f "$tarball"
  if [ "$created" = 0 ] && [ "$reuse" = 0 ]; then
    :  # no VM of this script's (e.g. one of this name already existed): nothing to keep or delete
  elif [ "$keep" = 1 ] || [ "$reuse" = 1 ]; then
    echo "keeping TPU VM $name (delete: $(delete_cmd))" >&2
  elif [ "$interrupted" = 1 ] && [ "$started" = 1 ] && kept_after_interrupt; then
    :
  elif [ "$queued" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$qr_name" "${common[@]}" --force --quiet || true
  else
    run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet || true
  fi
  exit "$rc"
}

trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

# 1. create
if [ "$reuse" = 0 ]; then
  spot_flag=(); [ "$spot" = 1 ] && spot_flag=(--spot)
  # an existing VM (or queued resource) of this name is not ours to delete when creating it fails
  if [ "$dry_run" = 0 ]; then
    if ! absent "TPU VM" gcloud compute tpus tpu-vm describe "$name" "${common[@]}"; then
      die "a TPU VM named $name already exists in zone $zone; pass --reuse to run on it, or choose another --name"
    fi
    if [ "$queued" = 1 ] && ! absent "queued resource" gcloud compute tpus queued-resources describe "$qr_name" "${common[@]}"; then
      die "a queued resource named $qr_name already exists in zone $zone; delete it, or choose another --name"
    fi
  fi
  created=1
  if [ "$queued" = 1 ]; then
    run gcloud compute tpus queued-resources create "$qr_name" --node-id="$name" "${common[@]}" \
      --accelerator-type="$accel" --runtime-version="$version" ${spot_flag[@]+"${spot_flag[@]}"}
    if [ "$dry_run" = 1 ]; then
      run gcloud compute tpus queued-resources describe "$qr_name" "${common[@]}" --format='value(state.state)'
    else
      echo "waiting for queued resource $qr_name to become ACTIVE ..." >&2
      while :; do
        state=$(gcloud compute tpus queued-resources describe "$qr_name" "${common[@]}" --format='value(state.state)')
        case "$state" in
          ACTIVE) break ;;
          FAILED|SUSPENDED) die "queued resource $qr_name is $state" ;;
        esac
        run sleep 30  # as a job: a signal ends the wait at once
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$accel" \
      --version="$version" ${spot_flag[@]+"${spot_flag[@]}"}
  fi
fi

# 2. copy the code (a tarball of the working tree without venvs, runs and git history)
tarball="${TMPDIR:-/tmp}/fedkd-src-$$.tgz"
run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ \
  -C "$src" .
run gcloud compute tpus tpu-vm scp "$tarball" "$name:fedkd-src.tgz" "${common[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all \
  --command="mkdir -p $remote_dir && tar -xzf fedkd-src.tgz -C $remote_dir && rm fedkd-src.tgz"

# 3. install (one pip call, so the TPU JAX build is chosen within fedkd's JAX version range); Ubuntu
# images have python3 only: a `python` in ~/.local/bin (on PATH in step 4) lets the command say python
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all \
  --command="cd $remote_dir && python3 -m pip install -q -U -e . $(printf %q "$pip_spec") && { command -v python >/dev/null \
|| { mkdir -p \$HOME/.local/bin && ln -sf \"\$(command -v python3)\" \$HOME/.local/bin/python; }; }"

# 4. run the command on every worker; on a slice of several workers with FEDKD_MULTIHOST=1, so fedkd calls
# jax.distributed.initialize() (a Cloud TPU VM sets no variable that says so; JAX reads the VM's metadata)
endpoints=(describe "$name" "${common[@]}" --format='value(networkEndpoints[].ipAddress)')
multihost=""
if [ "$dry_run" = 1 ]; then
  run gcloud compute tpus tpu-vm "${endpoints[@]}"
  echo "# (with more than one address above, the command below runs as FEDKD_MULTIHOST=1 PATH=...)" >&2
else
  ips=$(gcloud compute tpus tpu-vm "${endpoints[@]}") \
    || die "cannot count the workers of TPU VM $name (gcloud compute tpus tpu-vm describe failed: see above)"
  workers=$(tr ';, \t' '\n\n\n\n' <<<"$ips" | grep -c . || true)
  if [ "$workers" -gt 1 ]; then
    multihost="FEDKD_MULTIHOST=1 "
    echo "TPU VM $name has $workers workers: one process each, joined by jax.distributed (FEDKD_MULTIHOST=1)" >&2
  fi
fi
remote_cmd=$(printf '%q ' "${cmd[@]}")
cmd_rc=0  # a failed (or preempted) command still gets its results fetched before the VM is deleted
started=1
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all \
  --command="cd $remote_dir && ${multihost}PATH=\$HOME/.local/bin:\$PATH $remote_cmd" || cmd_rc=$?

# 5. fetch results from worker 0
fetched=1
if [ -n "$fetch" ]; then
  dest="$(dirname "$fetch")"
  [ "$dry_run" = 1 ] || mkdir -p "$dest"
  run gcloud compute tpus tpu-vm scp --recurse "$name:$remote_dir/$fetch" "$dest" "${common[@]}" --worker=0 || fetched=0
fi
if [ "$cmd_rc" != 0 ]; then
  [ "$fetched" = 1 ] && [ -n "$fetch" ] && echo "what the command wrote under $fetch is in ./$fetch" >&2
  echo "fedkd: error: the command failed on the TPU VM (exit code $cmd_rc); its output is above" >&2
  exit "$cmd_rc"
fi
[ "$fetched" = 1 ] || die "could not copy $remote_dir/$fetch back from worker 0 (is --fetch a path the command writes?)"
echo "done; results in ./$fetch" >&2
