#!/usr/bin/env bash
# Thin wrapper around the Cloud TPU VM launcher: `launch/tpu_vm.sh SUBCOMMAND ...` is
# `python -m launch.tpu SUBCOMMAND ...` from any directory (see launch/README.md).
#
#   launch/tpu_vm.sh create --name NAME --zone ZONE --accelerator-type v5p-16 --spot
#   launch/tpu_vm.sh run --name NAME --zone ZONE --config configs/toy_leapalign.py \
#       --workdir gs://BUCKET/run --spot [--config.KEY=VALUE ...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m launch.tpu "$@"
