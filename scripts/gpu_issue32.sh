#!/usr/bin/env bash
# Every open GPU measurement, one script, one GPU (planned for ≤ 10 min of GPU time; each part prints its time):
#   1. `fmboost bench pipeline --end-to-end`: the real BoostPipeline call vs the real direct StableDiffusionPipeline
#      call with the same base parts — eager and fast path (torch.compile), CFG-25 and LCM-4, 1024² and 2048²;
#      random weights at SD1.5 sizes (the real compute), the reference CFMUNet with 4 Euler NFE, fp16, batch 1;
#      medians of 3 calls, CUDA peak memory, the fast path's compile time and its image difference from eager.
#   2. scripts/bench_upscale_gpu.sh: CUDA peak memory of tiled vs untiled upscaling to 4096².
#   3. scripts/bench_train_gpu.sh: is training from the latent cache data-starved (0 / 4 / 8 loader workers)?
#
#   OUT=runs/gpu_issue32 bash scripts/gpu_issue32.sh          # on the GPU; JSON into $OUT
#   SMOKE=1 OUT=/tmp/smoke bash scripts/gpu_issue32.sh        # the same script on a CPU at tiny sizes (about
#                                                             # 5 min on 2 busy cores)
#
# PIXELS, RECIPES, REPEATS change part 1 (e.g. PIXELS=1024 to halve it); TRAIN and FMBOOST_SHARED are read by part 3
# (the faces training images; TAEF2 weights). Writes OUT/info.txt, OUT/bench_end_to_end.json,
# OUT/bench_upscale_*.json, OUT/bench_train_w*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_issue32}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  E2E="--size tiny --upsampler-preset tiny --pixels ${PIXELS:-64} --recipes ${RECIPES:-cfg:2,lcm:1}
       --repeats ${REPEATS:-1} --device cpu"
else
  E2E="--size real --pixels ${PIXELS:-1024,2048} --recipes ${RECIPES:-cfg:25,lcm:4} --repeats ${REPEATS:-3}
       --device cuda --dtype float16"
fi
fmboost info | tee "$OUT/info.txt"
start=$SECONDS
fmboost bench pipeline --end-to-end $E2E -o "$OUT/bench_end_to_end.json"
echo "end-to-end benchmark: $((SECONDS - start)) s"
start=$SECONDS
bash scripts/bench_upscale_gpu.sh "" "$OUT"
echo "upscale memory benchmark: $((SECONDS - start)) s"
start=$SECONDS
OUT="$OUT" bash scripts/bench_train_gpu.sh
echo "training benchmark: $((SECONDS - start)) s"
