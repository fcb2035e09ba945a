"""A picture grid of real low-resolution photos that have no ground truth: bicubic, a restorer, and upsampler folders.

    python scripts/grid_real_inputs.py OUT.png INPUT [INPUT ...] --upsampler NAME=DIR [--upsampler ...]
        [--baseline NAME=FILE] [--max-side 256] [--seed 0]

Each upsampler renders at its saved settings through `Upsampler.upscale` (what `fmboost upscale` writes); the
restorer rows are the weights file alone (default: Real-ESRGAN x4plus from the shared assets). Inputs larger than
--max-side on either side are centre-cropped to it, so a CPU renders the grid in minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from fmboost.eval.plots import comparison_grid
from fmboost.models import Upsampler
from fmboost.models.realesrgan import realesrgan_restorer
from fmboost.models.restorer import Restorer


def load_input(path: Path, max_side: int) -> torch.Tensor:
    """An image file (grey, RGBA and 16-bit included) → (1, 3, h, w) in [-1, 1], centre-cropped to max_side."""
    image = PIL.Image.open(path)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    height, width = array.shape[:2]
    top, left = max(0, (height - max_side) // 2), max(0, (width - max_side) // 2)
    array = array[top:top + max_side, left:left + max_side]
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--upsampler", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--baseline", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    restorers = {name: Restorer.load(file) for name, file in (b.split("=", 1) for b in args.baseline)} or \
        {"Real-ESRGAN": realesrgan_restorer()}
    upsamplers = {name: Upsampler.from_pretrained(folder) for name, folder in (u.split("=", 1) for u in args.upsampler)}
    grid: dict[str, list[torch.Tensor]] = {}
    for path in args.inputs:
        lr = load_input(Path(path), args.max_side)
        scale = next(iter(upsamplers.values())).scale
        images = {"low-res": lr,
                  "bicubic": torch.nn.functional.interpolate(lr, scale_factor=scale, mode="bicubic").clamp(-1, 1)}
        images.update({name: restorer(lr) for name, restorer in restorers.items()})
        for name, upsampler in upsamplers.items():
            images[name] = upsampler.upscale(lr, torch.Generator().manual_seed(args.seed)).image
        for name, image in images.items():
            grid.setdefault(name, []).append(((image[0] + 1) / 2).clamp(0, 1))
        print(f"{path}: {tuple(lr.shape[-2:])} → ×{scale}")
    comparison_grid(grid, list(grid), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
