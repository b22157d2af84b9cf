#!/usr/bin/env bash
# Submit one mmjax command to a SLURM GPU cluster: N nodes x G GPUs, one task per node.
#
#   bash launch/gpu/submit.sh --nodes 4 --partition gpu --time 24:00:00 \
#       -- train --config=configs/fourm/4m.py:B --workdir=/shared/runs/4m_b
#
# Runs `sbatch [flags] launch/gpu/slurm.sbatch MMJAX_ARGS` (see that script for the XLA/NCCL
# settings and the resubmission on preemption); --dry-run prints the command instead.
set -euo pipefail

usage() {
  echo "usage: $0 [--nodes 1] [--gpus-per-node 8] [--time 24:00:00] [--partition P]" \
       "[--account A] [--job-name mmjax] [--output FILE] [--venv DIR] [--dry-run] -- MMJAX_ARGS..." >&2
  exit 2
}

nodes=1; gpus=8; time_limit="24:00:00"; partition=""; account=""; job_name="mmjax"; output=""
venv=""; dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --output) output="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "submit.sh: unknown flag $1" >&2; usage ;;
  esac
done
[ $# -gt 0 ] || usage
for value in "$nodes" "$gpus"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "submit.sh: --nodes/--gpus-per-node take integers" >&2; exit 2; }
done

flags=(--nodes="$nodes" --gpus-per-node="$gpus" --time="$time_limit" --job-name="$job_name")
[ -n "$partition" ] && flags+=(--partition="$partition")
[ -n "$account" ] && flags+=(--account="$account")
[ -n "$output" ] && flags+=(--output="$output")
for flag in "${flags[@]}"; do
  [[ "$flag" != *" "* ]] || { echo "submit.sh: no spaces in flag values: $flag" >&2; exit 2; }
done
# The batch script resubmits itself with the same flags after a preemption.
export MMJAX_SBATCH_FLAGS="${flags[*]}"
[ -n "$venv" ] && export MMJAX_VENV="$venv"

script="$(cd "$(dirname "$0")" && pwd)/slurm.sbatch"
printf '+'; printf ' %q' sbatch "${flags[@]}" "$script" "$@"; printf '\n'
[ "$dry_run" = 1 ] || exec sbatch "${flags[@]}" "$script" "$@"
