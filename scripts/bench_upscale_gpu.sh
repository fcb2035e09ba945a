#!/usr/bin/env bash
# CUDA peak memory and time of `upscale` to a 4096-px output: untiled vs 2048- and 1024-px tiles.
#
#   bash scripts/bench_upscale_gpu.sh [UPSAMPLER_DIR] [OUT_DIR]
#   SMOKE=1 bash scripts/bench_upscale_gpu.sh "" /tmp/smoke    # CPU, a 256-px output: checks the script
#
# Without UPSAMPLER_DIR it measures a randomly initialised upsampler of the photo models' shape (memory
# does not depend on the weights): TAEF2 latents with the `base` CFMUNet (62 M) when the TAEF2 weights are
# found ($FMBOOST_SHARED), else pixel space with the `small` preset. Each row runs in its own process;
# an out-of-memory row is recorded as such. Writes OUT_DIR/bench_upscale_4096.json (default: .).
set -euo pipefail
DIR=${1:-}
OUT=${2:-.}
mkdir -p "$OUT"
if [ -z "$DIR" ]; then
  DIR=$(mktemp -d)/upsampler
  python - "$DIR" <<'PY'
import sys

from fmboost.models import CFMUNet, CouplingFlowMatcher, SamplerConfig, Upsampler, load_first_stage
from fmboost.models.assets import shared_path

taef2 = shared_path("weights/taef2") is not None
stage = load_first_stage("taef2" if taef2 else "identity")
model = CFMUNet.from_preset("base" if taef2 else "small", latent_channels=stage.latent_channels,
                            attention_levels=(False, False, False, True) if taef2 else (False, False, False),
                            padding_mode="replicate")
Upsampler(model.eval(), stage, CouplingFlowMatcher(), scale=4, sampler=SamplerConfig(num_steps=4)).save_pretrained(sys.argv[1])
print(f"random {'TAEF2 + base' if taef2 else 'pixel-space small'} upsampler in {sys.argv[1]}")
PY
fi
if [ "${SMOKE:-0}" = 1 ]; then
  fmboost bench upscale --upsampler "$DIR" --output-size 256 --tile-sizes 0,128 --tile-overlap 32 --device cpu \
    -o "$OUT/bench_upscale_256.json"
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  fmboost bench upscale --upsampler "$DIR" --output-size 4096 --tile-sizes 0,2048,1024 --device cuda \
    -o "$OUT/bench_upscale_4096.json"
fi
