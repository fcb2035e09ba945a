"""Super-resolution methods compared by `fmboost eval-sr`, all with one signature.

    method(lr, generator) -> MethodOutput(image, nfe, latent)     lr (B, 3, h, w), image (B, 3, s·h, s·w), [-1, 1]

Pixel baselines interpolate the low-res image; latent baselines go through a first stage; the
first-stage ceiling decodes the autoencoder's own high-res latent (no up-sampler can beat it in
that latent space, so it needs hr); the regression baseline and CFM load trained `Upsampler`s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from fmboost.models import FirstStage, Upsampler
from fmboost.models.coupling import upsample_latent


@dataclass
class MethodOutput:
    """image: (B, 3, H, W) in [-1, 1]; nfe: network evaluations per image (0 for baselines);
    latent: the high-res latent the image was decoded from (CFM samples, for distances between samplers)."""

    image: torch.Tensor
    nfe: int = 0
    latent: torch.Tensor | None = None


Method = Callable[[torch.Tensor, torch.Tensor, torch.Generator], MethodOutput]
"""method(lr, hr, generator); only the first-stage ceiling may look at hr."""


def pixel_upsample(lr: torch.Tensor, scale: int, mode: str = "bicubic") -> torch.Tensor:
    """Bilinear / bicubic interpolation in pixel space: (B, 3, h, w) → (B, 3, s·h, s·w), clamped to [-1, 1]."""
    size = (lr.shape[-2] * scale, lr.shape[-1] * scale)
    return F.interpolate(lr, size=size, mode=mode, align_corners=False).clamp(-1, 1)


def latent_upsample(lr: torch.Tensor, scale: int, first_stage: FirstStage, mode: str = "bilinear") -> torch.Tensor:
    """decode(interpolate(encode(lr))): the latent-interpolation source, decoded without a model."""
    z = first_stage.encode(lr)
    z = F.interpolate(z, size=(z.shape[-2] * scale, z.shape[-1] * scale), mode=mode, align_corners=False)
    return first_stage.decode(z)


def psu_source(lr: torch.Tensor, scale: int, first_stage: FirstStage) -> torch.Tensor:
    """decode(encode(bicubic(lr))): the PSU coupling's clean source, decoded without a model."""
    f = first_stage.downsample_factor
    size = (lr.shape[-2] * scale // f, lr.shape[-1] * scale // f)
    return first_stage.decode(upsample_latent(None, size, "psu", first_stage, lr))


def first_stage_ceiling(hr: torch.Tensor, first_stage: FirstStage) -> torch.Tensor:
    """decode(encode(hr)): the best any up-sampler in this latent space can do."""
    return first_stage.decode(first_stage.encode(hr))


def load_regression(directory: str | Path) -> Upsampler:
    """An Upsampler trained with objective='regression' (the paper's one-pass baseline)."""
    upsampler = Upsampler.from_pretrained(directory)
    if upsampler.flow.objective != "regression":
        raise ValueError(f"--regression {directory} was trained with objective {upsampler.flow.objective!r}, "
                         "not 'regression'")
    return upsampler


def baseline_methods(scale: int, first_stage: FirstStage | None) -> dict[str, Method]:
    """Pixel bilinear / bicubic always; the latent baselines and the ceiling when a first stage is given."""
    methods: dict[str, Method] = {
        "bilinear": lambda lr, hr, g: MethodOutput(pixel_upsample(lr, scale, "bilinear")),
        "bicubic": lambda lr, hr, g: MethodOutput(pixel_upsample(lr, scale, "bicubic")),
    }
    if first_stage is not None:
        methods["latent bilinear"] = lambda lr, hr, g: MethodOutput(latent_upsample(lr, scale, first_stage))
        methods["PSU source"] = lambda lr, hr, g: MethodOutput(psu_source(lr, scale, first_stage))
        methods["first-stage ceiling"] = lambda lr, hr, g: MethodOutput(first_stage_ceiling(hr, first_stage))
    return methods


def upsampler_method(upsampler: Upsampler, **sampler_kwargs) -> Method:
    """An Upsampler (CFM or regression) as a method; sampler_kwargs override its saved sampler."""

    def method(lr: torch.Tensor, hr: torch.Tensor, generator: torch.Generator) -> MethodOutput:
        result = upsampler.upsample(lr_image=lr, generator=generator, **sampler_kwargs)
        return MethodOutput(upsampler.first_stage.decode(result.x1), result.nfe, result.x1)

    return method
