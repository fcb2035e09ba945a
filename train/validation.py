"""Validation during training: sample the fixed validation patches, score them, save a PNG grid.

Grid rows are validation patches, columns: low-res ↑bilinear | CFM | ground truth.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fmboost.models import Upsampler
from fmboost.models.degradations import to_uint8
from fmboost.models.metrics import psnr, ssim
from PIL import Image, ImageDraw


@dataclass
class ValidationResult:
    step: int
    psnr: float
    ssim: float
    nfe: int
    grid: str


@torch.no_grad()
def upsample_images(upsampler: Upsampler, lr: torch.Tensor, seed: int = 0, batch_size: int = 8
                    ) -> tuple[torch.Tensor, int]:
    """Low-res images (N, 3, h, w) in [-1, 1] → high-res images (N, 3, s·h, s·w) in [-1, 1] drawn with the
    upsampler's own sampler (`Upsampler.upscale`: context at the borders), and the NFE per image (R's pass
    included for posterior-mean flows)."""
    generator = torch.Generator(device=lr.device).manual_seed(seed)  # same noise every validation
    outputs, nfe = [], 0
    for start in range(0, lr.shape[0], batch_size):
        result = upsampler.upscale(lr[start:start + batch_size], generator)
        outputs.append(result.image.float())
        nfe = result.nfe
    return torch.cat(outputs), nfe


def save_grid(columns: list[torch.Tensor], labels: list[str], path: str | Path) -> None:
    """Columns of (N, 3, H, W) images in [-1, 1] → one PNG under a header naming each column;
    row n = [columns[0][n], columns[1][n], ...]."""
    if len(labels) != len(columns):
        raise ValueError(f"got {len(labels)} labels for {len(columns)} columns")
    rows = [np.concatenate([to_uint8(c[n:n + 1])[0] for c in columns], axis=1) for n in range(columns[0].shape[0])]
    body = Image.fromarray(np.concatenate(rows, axis=0))
    width = columns[0].shape[-1]
    grid = Image.new("RGB", (body.width, body.height + 14), "white")
    grid.paste(body, (0, 14))
    draw = ImageDraw.Draw(grid)
    for i, label in enumerate(labels):
        draw.text((i * width + 2, 1), label, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def validate(upsampler: Upsampler, pairs: dict, step: int, output_dir: str | Path, seed: int = 0) -> ValidationResult:
    """Score `pairs` ({"hr", "lr"} in [-1, 1], hr = scale × lr) with PSNR / SSIM (RGB, [0, 1]) using the
    upsampler's sampler; write the grid and a JSON line."""
    device = upsampler.first_stage.latent_mean.device
    hr, lr = pairs["hr"].to(device), pairs["lr"].to(device)
    was_training = upsampler.model.training
    upsampler.model.eval()
    cfm, nfe = upsample_images(upsampler, lr, seed)
    upsampler.model.train(was_training)
    bilinear = F.interpolate(lr, size=hr.shape[-2:], mode="bilinear", align_corners=False).clamp(-1, 1)
    pred, target = (cfm + 1) / 2, (hr + 1) / 2
    grid = Path(output_dir) / "validation" / f"step_{step:07d}.png"
    save_grid([bilinear, cfm, hr], ["bilinear", "CFM", "truth"], grid)
    result = ValidationResult(step, psnr(pred, target).mean().item(),
                              ssim(pred, target).mean().item() if min(hr.shape[-2:]) >= 11 else float("nan"),
                              nfe, str(grid))
    with open(Path(output_dir) / "validation" / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(asdict(result)) + "\n")
    return result
