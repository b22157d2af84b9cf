#!/usr/bin/env bash
# Run an mmjax command on every worker of a Cloud TPU VM slice.
#
#   bash launch/tpu/run.sh NAME ZONE -- train --config=configs/fourm/4m.py:B --workdir=gs://bucket/run
#
# Copies this checkout to every worker, installs mmjax with jax[tpu] into a venv there, and runs the
# command on all workers at once. JAX finds the other workers itself (mmjax.distributed), so the
# same command line runs everywhere. Needs the gcloud CLI, authenticated, on this machine.
set -euo pipefail
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 TPU_NAME ZONE -- MMJAX_COMMAND [ARGS...]" >&2
  exit 2
fi
name="$1"; zone="$2"; shift 3
remote_dir="mmjax"
tar czf /tmp/mmjax_src.tgz --exclude=.venv --exclude=runs --exclude=.git .
gcloud compute tpus tpu-vm scp /tmp/mmjax_src.tgz "$name:/tmp/" --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e
  mkdir -p $remote_dir && tar xzf /tmp/mmjax_src.tgz -C $remote_dir && cd $remote_dir
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet -e . 'jax[tpu]'
  .venv/bin/mmjax $(printf '%q ' "$@")
"
