"""The coupling: x0 and the conditioning built from a low-resolution latent.

Given a low-res latent (B, C, h, w) and a target latent size (H, W):
  cond = up-sampled clean latent (B, C, H, W), concatenated to x_t as the UNet's conditioning;
  x0   = cond noise-augmented by the forward diffusion q(x_t | x_0) at a fixed step, so the flow
         starts from a point the network cannot simply copy and has room to add detail.

Up-sampling modes:
  "psu" (default) — pixel-space up-sampling: decode (or take) the low-res image, resize it bicubically
         in pixel space, encode it. Latent-space interpolation is a poor source (in TAEF2 at 4×, latent
         bilinear has normalised MSE 1.39 to the target, worse than zeros; PSU 0.59), partly because
         stride-2 encoders shift latent pixel centres, which pixel-space resizing handles correctly.
  "bilinear" / "bicubic" / "nearest" — interpolate the latent directly (cheap: no decode/encode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .autoencoders import FirstStage

UPSAMPLE_MODES = ("psu", "bilinear", "bicubic", "nearest")


@dataclass
class CouplingBatch:
    """x0: source (B, C, H, W); cond: clean up-sampled latent (B, C, H, W); x1: target or None."""

    x0: torch.Tensor
    cond: torch.Tensor
    x1: torch.Tensor | None = None


def cosine_alpha_bar(step: int, num_train_timesteps: int = 1000, offset: float = 0.0) -> float:
    """ᾱ_t = cos²(π/2 · (t/T + s)/(1 + s)) / cos²(π/2 · s/(1 + s)) (Nichol & Dhariwal 2021, Eq. 17).

    With s = 0 (the default here) step 400 of 1000 gives ᾱ = 0.6545, the reference coupling's noise
    level; s = 0.008 gives 0.6475.
    """
    if not 0 <= step <= num_train_timesteps:
        raise ValueError(f"noising_step must be in [0, {num_train_timesteps}], got {step}")
    f = lambda t: math.cos(math.pi / 2 * (t / num_train_timesteps + offset) / (1 + offset)) ** 2
    return f(step) / f(0)


def noise_augment(z: torch.Tensor, alpha_bar: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0): √ᾱ · z + √(1 − ᾱ) · ε, ε ~ N(0, I); shapes (B, C, H, W)."""
    if not 0.0 < alpha_bar <= 1.0:
        raise ValueError(f"alpha_bar must be in (0, 1], got {alpha_bar}")
    if alpha_bar == 1.0:
        return z
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return math.sqrt(alpha_bar) * z + math.sqrt(1.0 - alpha_bar) * noise


def upsample_latent(lr_latent: torch.Tensor | None, size: tuple[int, int], mode: str = "psu",
                    first_stage: FirstStage | None = None, lr_image: torch.Tensor | None = None) -> torch.Tensor:
    """Clean up-sampled latent (B, C, H, W) from lr_latent (B, C, h, w) and/or lr_image (B, 3, h·f, w·f).

    PSU needs the first stage; it uses `lr_image` (in [-1, 1]) when given — the training data has
    it, and it avoids a lossy decode — and decodes `lr_latent` otherwise. The latent modes use
    `lr_latent`, encoding `lr_image` with the first stage when only the image is given.
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode must be one of {list(UPSAMPLE_MODES)}, got {mode!r}")
    H, W = size
    if mode != "psu":
        if lr_latent is None and lr_image is not None and first_stage is not None:
            lr_latent = first_stage.encode(lr_image)
        if lr_latent is None or lr_latent.ndim != 4:
            raise ValueError(f"lr_latent must be (B, C, h, w) for mode {mode!r} (or pass lr_image and first_stage)")
        if H % lr_latent.shape[-2] or W % lr_latent.shape[-1]:
            raise ValueError(f"target size {size} must be a multiple of the low-res size {tuple(lr_latent.shape[-2:])}")
        align = dict(align_corners=False) if mode != "nearest" else {}
        return F.interpolate(lr_latent, size=(H, W), mode=mode, **align)
    if first_stage is None:
        raise ValueError("upsample mode 'psu' needs first_stage to decode/encode in pixel space")
    if lr_image is None:
        if lr_latent is None:
            raise ValueError("psu needs lr_latent or lr_image")
        lr_image = first_stage.decode(lr_latent)
    f = first_stage.downsample_factor
    if (H * f) % lr_image.shape[-2] or (W * f) % lr_image.shape[-1]:
        raise ValueError(f"target size {size} (×{f} px) must be a multiple of the low-res image size "
                         f"{tuple(lr_image.shape[-2:])}")
    hr_image = F.interpolate(lr_image.float(), size=(H * f, W * f), mode="bicubic", align_corners=False)
    return first_stage.encode(hr_image.clamp(-1, 1))
