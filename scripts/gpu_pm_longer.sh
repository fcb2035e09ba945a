#!/usr/bin/env bash
# The faces study's flows trained longer on one GPU: posterior-mean flows at σ_s 0.1 and 0.25 from a given,
# frozen regression upsampler R, beside the two controls trained as long from scratch — a regression and the
# paper's CFM — all four side by side (w48 models are bound by kernel launches, so one GPU runs four at once at
# little cost to each), then scored at 1024² (PSNR / LPIPS, the per-band dial, back-projection; no FID).
#
#   FMBOOST_SHARED=/path/to/shared R=runs/f2_reg_w48/upsampler TRAIN=data/faces2_train \
#       TEST=data/faces_test1024 OUT=results STEPS=3000 DEADLINE_S=330 bash scripts/gpu_pm_longer.sh
#
# Each run stops at STEPS or DEADLINE_S seconds, whichever comes first; a run stopped by the deadline is
# exported from its last checkpoint (every CKPT_STEPS), and its log says at which step.
set -uo pipefail
R=${R:?R must name the regression upsampler folder the flows start from}
TRAIN=${TRAIN:-data/faces2_train}
TEST=${TEST:-data/faces_test1024}
OUT=${OUT:-runs/gpu_pm_longer}
RUNS=${RUNS:-runs/gpu_longer}
STEPS=${STEPS:-3000}
DEADLINE_S=${DEADLINE_S:-330}
BATCH=${BATCH:-32}
CROPS=${CROPS:-32}
CKPT_STEPS=${CKPT_STEPS:-500}
mkdir -p "$OUT" "$RUNS"
F="--config configs/faces_taef2_32to128.yaml --train-data-dir $TRAIN --num-validation-images 2 --crops-per-image $CROPS
   --train-batch-size $BATCH --learning-rate 1e-3 --upsample_steps 2 --block-out-channels [48,96,192]
   --latent-cache-dir $RUNS/cache --validation-steps 100000 --checkpointing-steps $CKPT_STEPS --report-to none"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/study.log"; }

fmboost train $F --objective regression --max-train-steps 1 -o "$RUNS/cache_build" >"$RUNS/cache_build.log" 2>&1 \
  || { log "cache build failed"; tail -c 3000 "$RUNS/cache_build.log"; exit 7; }
log "latent cache built"

train() {  # NAME ARGS...: one run, exported from its last checkpoint if the deadline stopped it
  local name=$1; shift
  timeout -s KILL "$DEADLINE_S" fmboost train $F --max-train-steps "$STEPS" -o "$RUNS/$name" "$@" \
    >"$RUNS/$name.log" 2>&1
  if [ ! -f "$RUNS/$name/upsampler/boost_config.json" ]; then
    local last  # the step of the checkpoint that --resume-from-checkpoint latest loads
    last=$(python3 -c 'import sys; from fmboost.train.checkpoint import read_trainer_state, resolve_checkpoint as r
path = r(sys.argv[1], "latest"); print(read_trainer_state(path).global_step if path else "")' "$RUNS/$name")
    [ -n "$last" ] || { log "$name: no checkpoint"; return 1; }
    log "$name: stopped by the deadline; exporting step $last"
    fmboost train $F --max-train-steps "$last" --resume-from-checkpoint latest -o "$RUNS/$name" "$@" \
      >>"$RUNS/$name.log" 2>&1
  fi
  log "$name: $(grep -o 'saved the .*' "$RUNS/$name.log" | tail -1)"
}
PM="--source posterior_mean --posterior-mean-model $R"
train reg --objective regression &
train cfm &
train pm_s0.1 $PM --posterior-mean-sigma 0.1 &
train pm_s0.25 $PM --posterior-mean-sigma 0.25 &
wait
log "training done"

E="--data $TEST --baselines bicubic --no-fid --hr-size 1024 --lr-size 256 --sampler euler:linear:2 --back-project 2"
fmboost eval-sr $E --regression "$R" --upsampler pm0.1="$RUNS/pm_s0.1/upsampler" \
  --upsampler pm0.25="$RUNS/pm_s0.25/upsampler" --detail 0,0.5,0.75,1 -o "$OUT/eval_pm" >"$RUNS/eval_pm.log" 2>&1
fmboost eval-sr $E --regression "$RUNS/reg/upsampler" --upsampler paper="$RUNS/cfm/upsampler" -o "$OUT/eval_controls" \
  >"$RUNS/eval_controls.log" 2>&1
log "evaluation done"
