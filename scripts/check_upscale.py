"""Score what `fmboost upscale` writes, as a user runs it, against bicubic: the README's headline check.

    python scripts/check_upscale.py --data data/faces_test1024 --upsampler runs/faces_pm/upsampler \
        --hr-size 256 --lr-size 64 -o runs/check_upscale

For every image: the eval-sr pair (`fmboost.eval.pairs`, 8-bit), its low-res PNG, then the `fmboost upscale`
command on that PNG with the folder's saved settings and seed i (as eval-sr seeds image i), run as a separate
process; the written PNG and eval-sr's bicubic row are scored against the high-res image (PSNR on RGB in
[0, 1], LPIPS).
Prints the means and their ratios and writes `check.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from fmboost.eval.baselines import pixel_upsample
from fmboost.eval.pairs import count_images, iter_pairs, load_image
from fmboost.eval.super_resolution import save_png, to_unit
from fmboost.models import metrics as M
from fmboost.pipelines.cli_options import add_output_option


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--upsampler", required=True)
    parser.add_argument("--hr-size", type=int, default=256)
    parser.add_argument("--lr-size", type=int, default=64)
    add_output_option(parser, "folder for the low-res PNGs, the upscaled PNGs and check.json", old=("--out",),
                      required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    lpips = M.load_lpips()
    scores = {"upscale": {"psnr": [], "lpips": []}, "bicubic": {"psnr": [], "lpips": []}}
    total = count_images([args.data])
    for index, pair in enumerate(iter_pairs([args.data], args.hr_size, args.lr_size, seed=args.seed)):
        low_res, written = out / f"{pair.name}_lr.png", out / f"{pair.name}_x.png"
        save_png(to_unit(pair.lr), low_res)
        subprocess.run([sys.executable, "-m", "fmboost.pipelines.cli", "upscale", str(low_res), "-o", str(written),
                        "--upsampler", args.upsampler, "--seed", str(args.seed + index)], check=True,
                       stdout=subprocess.DEVNULL)
        target = to_unit(pair.hr[None])
        bicubic = to_unit(pixel_upsample(pair.lr[None], args.hr_size // args.lr_size))  # eval-sr's bicubic row
        for name, image in (("upscale", to_unit(load_image(written)[None])), ("bicubic", bicubic)):
            scores[name]["psnr"].append(M.psnr(image, target).item())
            scores[name]["lpips"].append(M.lpips(image, target, lpips).item())
        print(f"{index + 1}/{total} {pair.name}: upscale {scores['upscale']['psnr'][-1]:.2f} dB, "
              f"bicubic {scores['bicubic']['psnr'][-1]:.2f} dB", flush=True)
    means = {name: {k: float(np.mean(v)) for k, v in rows.items()} for name, rows in scores.items()}
    summary = {"images": total, "means": means,
               "psnr_minus_bicubic_db": means["upscale"]["psnr"] - means["bicubic"]["psnr"],
               "lpips_over_bicubic": means["upscale"]["lpips"] / means["bicubic"]["lpips"], "per_image": scores}
    (out / "check.json").write_text(json.dumps(summary, indent=1))
    print(f"{total} images: fmboost upscale {means['upscale']['psnr']:.2f} dB / LPIPS {means['upscale']['lpips']:.4f}; "
          f"bicubic {means['bicubic']['psnr']:.2f} dB / {means['bicubic']['lpips']:.4f}; "
          f"PSNR − bicubic {summary['psnr_minus_bicubic_db']:+.2f} dB, LPIPS × {summary['lpips_over_bicubic']:.3f}")


if __name__ == "__main__":
    main()
