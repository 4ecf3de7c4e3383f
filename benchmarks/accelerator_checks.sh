#!/usr/bin/env bash
# The accelerator checks, in one call on one GPU (or TPU chip), within a deadline:
#   1. LeapAlign's train step at FLUX.1-dev width (2+4 blocks, 512x512, T = 25, bf16) and the
#      rollout against diffusers' FluxTransformer2DModel on the same chip;
#   2. FLUX.1-dev's full depth (19+38 blocks) at 720x720 as rank-64 LoRA, batch 2: s/iter
#      and peak HBM of the real step, beside
#   3. task=plan of the same setting (and of batch 16) compiled by this chip's XLA, to hold
#      the plan's compiled and analytic memory against the measured peak;
#   4. ReFL's and AlignProp's steps on the model of 1, for the cost ratios.
#
#   OUT=benchmarks/results/accelerator DEADLINE_S=540 bash benchmarks/accelerator_checks.sh [GROUP...]
#   DRY=1 bash benchmarks/accelerator_checks.sh     # tiny models on CPU: checks the script
#
# GROUPs (default: all, in this order): methods (1 and 4, ~7 min on an H100 with compiles),
# lora (2), plans (3). A 15-minute GPU lease fits `methods`, or `lora`, in one call.
#
# The machine needs this repo's requirements; where its image lacks one (ml_collections on
# the H100 image of 2026-11), install its wheel first (pip download here, pip install there).
#
# Each check runs in its own process (its peak memory is its own), under what is left of
# DEADLINE_S; the full output goes to $OUT/checks.log, the key lines to stdout.
set -u
OUT=${OUT:-benchmarks/results/accelerator}
DEADLINE_S=${DEADLINE_S:-540}
DRY=${DRY:-}
mkdir -p "$OUT"
LOG="$OUT/checks.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
start_all=$SECONDS
tiny=${DRY:+--tiny}
GROUPS_WANTED="$*"

check() {  # check NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left), log it
  local name=$1 limit=$2 left
  shift 2
  left=$((DEADLINE_S - (SECONDS - start_all) - 5))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then echo "== $name: skipped (deadline)"; return; fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG.part" 2>&1
  local rc=$?
  cat "$LOG.part" >>"$LOG"
  grep -E '^[a-z_]+: |^\| |^Fits|^FLOPs|^Iteration|^\*\*' "$LOG.part" | grep -v '^| per device' || true
  ((rc == 0)) || tail -n 4 "$LOG.part"
  rm -f "$LOG.part"
  echo "-- $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$LOG"
}

# task=plan of FLUX.1-dev rank-64 LoRA on this one chip at 720x720 (add the batch size)
plan=(python3 -m leapalign_jax.main --config configs/flux_dev.py:lora --workdir /tmp/plan_wd
  --config.task=plan --config.plan.check_fit=false --config.plan.compile_units=1
  --config.plan.mesh="(1, 1, 1)")

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import jax, flax, optax, orbax.checkpoint as o, ml_collections as m; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'devices', jax.devices())"
} 2>&1 | tee -a "$LOG"

want() { [ -z "$GROUPS_WANTED" ] || [[ " $GROUPS_WANTED " == *" $1 "* ]]; }
if want methods; then
  check leapalign_2+4 180 python3 benchmarks/flux_accelerator.py $tiny
  check refl_2+4 120 python3 benchmarks/flux_accelerator.py --method refl --no-torch $tiny
  check alignprop_2+4 120 python3 benchmarks/flux_accelerator.py --method alignprop --no-torch $tiny
fi
if want lora; then  # unrolled, the 19+38-block step did not compile in 530 s on an H100
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 check lora_full_depth 540 \
    python3 benchmarks/flux_accelerator.py --depth 19 --single 38 --lora-rank 64 \
    --scan-blocks --resolution 720 --no-torch --runs 2 $tiny
fi
if want plans && [ -z "$DRY" ]; then  # each compiles 1+2 and 2+4 blocks: over 90 s on an H100
  check plan_lora_b2 240 "${plan[@]}" --config.train.batch_size=2
  check plan_lora_b16 240 "${plan[@]}" --config.train.batch_size=16
fi
echo "total: $((SECONDS - start_all)) s" | tee -a "$LOG"
