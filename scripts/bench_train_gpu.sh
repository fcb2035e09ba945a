#!/usr/bin/env bash
# The two GPU measurements of multi-GPU-scale training and fast generation, one script, one GPU:
#   1. single-GPU training from the sharded latent cache with 0 / 4 / 8 DataLoader workers, each beside the
#      synthetic-input upper bound (one batch kept on the GPU): is training from the cache data-starved?
#      The faces config at 256 → 1024 px (TAEF2 latents, 32² target crops, PSU) with the reference CFMUNet
#      (the paper's 306 M shape), bf16, batch 32.
#   2. boosted 1024² generation with an LCM-shaped base (4 steps, no guidance: one UNet call per step) and the
#      reference CFM (4 NFE), eager vs torch.compile, against direct SD-sized generation at 1024². The SD /
#      LCM-SD1.5 UNets share one architecture, so random weights at SD1.5 sizes time the real compute.
#
#   FMBOOST_SHARED=/path/to/shared TRAIN=data/faces2_train OUT=results bash scripts/bench_train_gpu.sh
#
# Writes OUT/bench_train_w{0,4,8}.json and OUT/bench_pipeline_lcm_compile.json.
set -euo pipefail
TRAIN=${TRAIN:-data/faces2_train}
OUT=${OUT:-runs/bench_gpu}
STEPS=${STEPS:-50}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T="--config configs/faces_taef2_32to128.yaml --train_data_dir $TRAIN --train_batch_size 32 --mixed_precision bf16
   --model_preset reference --num_validation_images 2"
for workers in 0 4 8; do
  fmboost bench train $T --cache_dir "$OUT/cache" --dataloader_num_workers $workers --steps "$STEPS" \
    -o "$OUT/bench_train_w$workers.json"
done
fmboost bench pipeline --size real --base-steps 4 --no-guidance --upsample-steps 4 --decode sdpa \
  --compile -o "$OUT/bench_pipeline_lcm_compile.json"
