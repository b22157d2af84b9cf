#!/usr/bin/env bash
# Run one mmjax command on every worker of a Cloud TPU VM slice, from creation to deletion.
#
#   bash launch/tpu/run.sh --name mmjax-v5p --zone us-east5-a --type v5p-64 [--spot] [--queued] \
#       -- train --config=configs/fourm/4m.py:B --workdir=gs://BUCKET/runs/4m_b
#
# Steps (each printed, and only printed with --dry-run):
#   1. create the slice: a TPU VM (`tpu-vm create`) or, with --queued, a queued resource that waits
#      for capacity (`queued-resources create`, then polled until ACTIVE);
#   2. put the project on every worker: this checkout as a tarball (default) or, with
#      --git URL[@REF], a `git clone` on each worker;
#   3. install it into a venv on every worker with jax[tpu] (and gcsfs for gs:// paths);
#   4. run `mmjax ARGS` on all workers at once (each joins the slice through the TPU metadata:
#      mmjax/distributed.py); worker 0's output is streamed here; the others write theirs to
#      <workdir>/logs/ and to /tmp/mmjax_run.log on their VM, fetched into --logs on failure;
#   5. delete the slice (also on failure or Ctrl-C), unless --keep.
# Re-running with --keep and the same --name reuses the slice (create is skipped if it exists).
# Multi-slice (DCN) training is a later step: it needs `--num-slices` queued resources and a
# hybrid mesh (jax.experimental.mesh_utils.create_hybrid_device_mesh).
set -euo pipefail

usage() {
  sed -n '2,4p' "$0" >&2
  echo "flags: --name NAME --zone ZONE [--type v5p-8] [--version RUNTIME] [--project P] [--spot]" \
       "[--queued] [--git URL[@REF]] [--keep] [--logs DIR] [--dry-run] -- MMJAX_ARGS..." >&2
  exit 2
}

name=""; zone=""; type="v5p-8"; version="v2-alpha-tpuv5"; project=""; spot=0; queued=0
git_source=""; keep=0; logs="tpu_logs"; dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --git) git_source="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --logs) logs="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "run.sh: unknown flag $1" >&2; usage ;;
  esac
done
[ -n "$name" ] && [ -n "$zone" ] && [ $# -gt 0 ] || usage

cd "$(dirname "$0")/../.."
common=(--zone "$zone")
[ -n "$project" ] && common+=(--project "$project")
remote_dir="mmjax"
remote_log="/tmp/mmjax_run.log"

# Prints a command, then runs it unless --dry-run.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ "$dry_run" = 1 ] || "$@"
}

ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command "$1"; }

# 1. The slice.
if [ "$dry_run" = 0 ] && gcloud compute tpus tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1
then
  echo "run.sh: TPU $name exists; reusing it"
elif [ "$queued" = 1 ]; then
  create=(gcloud compute tpus queued-resources create "$name" --node-id "$name" "${common[@]}"
          --accelerator-type "$type" --runtime-version "$version")
  [ "$spot" = 1 ] && create+=(--spot)
  run "${create[@]}"
  echo "run.sh: waiting for the queued resource $name to become ACTIVE"
  if [ "$dry_run" = 0 ]; then
    until [ "$(gcloud compute tpus queued-resources describe "$name" "${common[@]}" \
               --format='value(state.state)')" = ACTIVE ]; do sleep 30; done
  fi
else
  create=(gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$type"
          --version "$version")
  [ "$spot" = 1 ] && create+=(--spot)
  run "${create[@]}"
fi

cleanup() {
  status=$?
  if [ "$keep" = 0 ]; then
    if [ "$queued" = 1 ]; then
      run gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
    fi
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 2. The project on every worker.
if [ -n "$git_source" ]; then
  url="${git_source%@*}"; ref="main"
  [ "$url" != "$git_source" ] && ref="${git_source##*@}"
  ssh_all "rm -rf $remote_dir && git clone --quiet $(printf %q "$url") $remote_dir && git -C $remote_dir checkout --quiet $(printf %q "$ref")"
else
  tarball="/tmp/mmjax_src_$name.tgz"
  run tar czf "$tarball" --exclude=.venv --exclude=runs --exclude=.git .
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:/tmp/mmjax_src.tgz" "${common[@]}" --worker=all
  ssh_all "rm -rf $remote_dir && mkdir -p $remote_dir && tar xzf /tmp/mmjax_src.tgz -C $remote_dir"
fi

# 3. Install (jax[tpu] brings libtpu; the gcs extra lets epath, Orbax and TFDS reach gs://).
ssh_all "cd $remote_dir && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install --quiet -e '.[gcs]' 'jax[tpu]'"

# 4. Run on all workers; stream worker 0's log while it runs.
command="cd $remote_dir && .venv/bin/mmjax$(printf ' %q' "$@") > $remote_log 2>&1"
if [ "$dry_run" = 1 ]; then
  ssh_all "$command"
  run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=0 --command "tail -n +1 -F $remote_log"
  exit 0
fi
printf '+ (all workers) %s\n' "$command"
gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command "$command" &
all_workers=$!
gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=0 \
  --command "tail -n +1 -F $remote_log" &
stream=$!
status=0
wait "$all_workers" || status=$?
sleep 2  # the last lines of worker 0
kill "$stream" 2>/dev/null || true
wait "$stream" 2>/dev/null || true

if [ "$status" != 0 ]; then
  echo "run.sh: the command failed on some worker (exit $status); fetching every worker's log" \
       "into $logs/" >&2
  mkdir -p "$logs"
  workers=$(gcloud compute tpus tpu-vm describe "$name" "${common[@]}" \
              --format='value(networkEndpoints[].ipAddress)' | tr ';,' '\n\n' | grep -c .)
  for ((i = 0; i < workers; i++)); do
    gcloud compute tpus tpu-vm scp "$name:$remote_log" "$logs/worker_$i.log" "${common[@]}" \
      --worker="$i" || echo "run.sh: could not fetch the log of worker $i" >&2
  done
  exit "$status"
fi
