#!/usr/bin/env bash
# Run an experiment on every worker of a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu_vm.sh NAME ZONE CONFIG WORKDIR [--config.overrides ...]
#
# NAME/ZONE name an existing TPU VM; CONFIG is a configs/ file (with :variant);
# WORKDIR should be a gs:// bucket or a disk every worker sees, so checkpoints survive
# preemption. Rerunning the same command resumes from the last checkpoint; a preempted
# run exits with status 42 after writing one.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
name=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)

# Ship the working tree (not .git, runs or caches) to every worker.
tar -C "$repo" --exclude=.git --exclude=runs --exclude=cache --exclude=.jax_cache \
  -czf /tmp/leapalign_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/leapalign_jax.tgz "$name":/tmp/ --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e
  mkdir -p ~/leapalign_jax && tar -C ~/leapalign_jax -xzf /tmp/leapalign_jax.tgz
  cd ~/leapalign_jax
  pip install -q 'jax[tpu]' -r requirements.txt
  python -m leapalign_jax.main --config $config --workdir $workdir $*
"
