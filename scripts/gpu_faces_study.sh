#!/usr/bin/env bash
# The faces study on one GPU, inside a fixed time budget: regression R, the paper's CFM and posterior-mean
# flows from R at four σ_s (256 → 1024, TAEF2 latents, w48), a 64 → 256 CFM, then their evaluation
# (PSNR / LPIPS, the fidelity dial, back-projection) and the schedule study at 64 → 256 and 256 → 1024.
#
#   FMBOOST_SHARED=/path/to/shared TRAIN=data/faces2_train TEST=data/faces_test1024 OUT=results \
#       BUDGET_S=420 bash scripts/gpu_faces_study.sh
#
# A short probe run measures the training speed first and sets the step count so that the two trainings
# on the critical path (R, then the flows that start from it) fit in BUDGET_S seconds.
set -uo pipefail
TRAIN=${TRAIN:-data/faces2_train}
TEST=${TEST:-data/faces_test1024}
OUT=${OUT:-runs/gpu_faces}
RUNS=${RUNS:-runs/gpu}
BUDGET_S=${BUDGET_S:-420}
BATCH=${BATCH:-32}
CROPS=${CROPS:-32}
PROBE=${PROBE:-200}
MAX_IMAGES=${MAX_IMAGES:-1000}
mkdir -p "$OUT" "$RUNS"
F="--config configs/faces_taef2_32to128.yaml --train-data-dir $TRAIN --num-validation-images 2 --crops-per-image $CROPS
   --train-batch-size $BATCH --learning-rate 1e-3 --upsample_steps 2 --block-out-channels [48,96,192]
   --latent-cache-dir $RUNS/cache_1024 --validation-steps 100000 --checkpointing-steps 100000 --report-to none"
S="--config configs/faces_taef2_8to32.yaml --train-data-dir $TRAIN --num-validation-images 2 --train-batch-size $BATCH
   --learning-rate 1e-3 --latent-cache-dir $RUNS/cache_256 --validation-steps 100000 --checkpointing-steps 100000
   --report-to none"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/study.log"; }

# 1. Probe: builds the 1024 cache and times PROBE steps after it.
t0=$(date +%s)
fmboost train $F --objective regression --max-train-steps 50 -o $RUNS/probe50 >"$RUNS/probe50.log" 2>&1
t1=$(date +%s)
fmboost train $F --objective regression --max-train-steps $PROBE -o $RUNS/probe >"$RUNS/probe.log" 2>&1
t2=$(date +%s)
[ -f "$RUNS/probe/upsampler/boost_config.json" ] || { log "probe failed"; tail -c 3000 "$RUNS/probe.log"; exit 7; }
# seconds per step from the progress bar's elapsed time (start-up excluded), else from the wall clock
sec_per_step=$(python3 - "$RUNS/probe.log" "$PROBE" "$((t2 - t1))" <<'PY'
import re, sys
text, steps, wall = open(sys.argv[1]).read(), int(sys.argv[2]), float(sys.argv[3])
done = re.findall(rf"{steps}/{steps} \[(?:(\d+):)?(\d+):(\d+)<", text)
h, m, s = done[-1] if done else ("", "", "")
print(max((int(h or 0) * 3600 + int(m) * 60 + int(s)) / steps if done else wall / steps, 1e-3))
PY
)
STEPS=${STEPS:-$(python3 -c "print(int(min(8000, max(500, ($BUDGET_S / 2 - 25) / ($sec_per_step * 1.6))) // 100 * 100))")}
log "cache + 50 steps $((t1 - t0)) s; $PROBE more steps $((t2 - t1)) s incl. start-up; $sec_per_step s/step -> STEPS=$STEPS"

# 2. R, the paper's CFM and the 64 → 256 CFM side by side.
fmboost train $F --objective regression --max-train-steps $STEPS -o $RUNS/reg >"$RUNS/reg.log" 2>&1 &
p_reg=$!
fmboost train $F --max-train-steps $STEPS -o $RUNS/cfm >"$RUNS/cfm.log" 2>&1 &
fmboost train $S --max-train-steps $STEPS -o $RUNS/cfm256 >"$RUNS/cfm256.log" 2>&1 &
wait $p_reg || { log "regression failed"; tail -c 3000 "$RUNS/reg.log"; exit 8; }
log "regression done"

# 3. Posterior-mean flows from R at four σ_s.
for s in 0.05 0.1 0.25 0.5; do
  fmboost train $F --max-train-steps $STEPS --source posterior_mean --posterior-mean-model $RUNS/reg/upsampler \
      --posterior-mean-sigma $s -o $RUNS/pm_s$s >"$RUNS/pm_s$s.log" 2>&1 &
done
wait
log "training done"

# 4. Evaluation (no FID: its Inception weights are not assumed here) and the schedule studies. The dial's
#    other form (`end_time`: integrate to τ = detail, then remove the known source noise) on copies of two flows.
for s in 0.1 0.25; do
  rm -rf $RUNS/pm_s${s}_end && cp -r $RUNS/pm_s$s/upsampler $RUNS/pm_s${s}_end
  sed -i 's/"dial": "blend"/"dial": "end_time"/' $RUNS/pm_s${s}_end/boost_config.json
done
E="--data $TEST --max-images $MAX_IMAGES --baselines bicubic --no-fid"
fmboost eval-sr $E --regression $RUNS/reg/upsampler --upsampler paper=$RUNS/cfm/upsampler \
    --upsampler pm0.05=$RUNS/pm_s0.05/upsampler --upsampler pm0.1=$RUNS/pm_s0.1/upsampler \
    --upsampler pm0.25=$RUNS/pm_s0.25/upsampler --upsampler pm0.5=$RUNS/pm_s0.5/upsampler \
    --upsampler pm0.1_end=$RUNS/pm_s0.1_end --upsampler pm0.25_end=$RUNS/pm_s0.25_end \
    --hr-size 1024 --lr-size 256 --sampler euler:linear:2 --detail 0.5,0.75,1 --back-project 2 \
    -o $OUT/eval_1024 >"$RUNS/eval_1024.log" 2>&1 &
fmboost eval-sr $E --upsampler $RUNS/cfm/upsampler --hr-size 256 --lr-size 64 --no-resize --study schedules \
    --study-nfe 2,4,8,16 -o $OUT/study_1024 >"$RUNS/study_1024.log" 2>&1 &
fmboost eval-sr $E --upsampler $RUNS/cfm256/upsampler --hr-size 256 --lr-size 64 --study schedules \
    --study-nfe 2,4,8,16 -o $OUT/study_256 >"$RUNS/study_256.log" 2>&1 &
wait
log "evaluation done"
for f in $RUNS/*.log; do tail -c 1500 "$f" | tr '\r' '\n' | tail -4 > "$OUT/$(basename "$f").tail"; done
