#!/usr/bin/env bash
# Is single-GPU training from the sharded latent cache data-starved? Training from the cache with 0 / 4 / 8
# DataLoader workers, each beside the synthetic-input upper bound (one batch kept on the GPU). The faces config at
# 256 → 1024 px (TAEF2 latents, 32² target crops, PSU) with the reference CFMUNet (the paper's 306 M shape), bf16,
# batch 32. (Boosted vs direct generation, eager and fast path, is `fmboost bench pipeline --end-to-end`, run with
# this script by scripts/gpu_issue32.sh.)
#
#   FMBOOST_SHARED=/path/to/shared TRAIN=data/faces2_train OUT=results bash scripts/bench_train_gpu.sh
#   SMOKE=1 OUT=/tmp/smoke bash scripts/bench_train_gpu.sh     # CPU, the embedded demo config, tiny: checks the script
#
# Writes OUT/bench_train_w{0,4,8}.json (SMOKE: w0 and w2).
set -euo pipefail
TRAIN=${TRAIN:-data/faces2_train}
OUT=${OUT:-runs/bench_gpu}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  STEPS=${STEPS:-1}
  WORKERS=${WORKERS:-"0 2"}
  T="--max-train-samples 4 --crops-per-image 1 --latent-stats-images 2 --train-batch-size 2 --num-validation-images 1"
else
  STEPS=${STEPS:-50}
  WORKERS=${WORKERS:-"0 4 8"}
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  T="--config configs/faces_taef2_32to128.yaml --train-data-dir $TRAIN --train-batch-size 32 --mixed-precision bf16
     --model-preset reference --num-validation-images 2"
fi
for workers in $WORKERS; do
  fmboost bench train $T --cache-dir "$OUT/cache" --dataloader-num-workers "$workers" --steps "$STEPS" \
    -o "$OUT/bench_train_w$workers.json"
done
