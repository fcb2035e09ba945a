"""Super-resolution methods compared by `fmboost eval-sr`, all with one signature.

    method(lr, hr, generator) -> MethodOutput(image, nfe)   lr (B, 3, h, w), image (B, 3, s·h, s·w), [-1, 1]

Pixel baselines interpolate the low-res image; latent baselines go through a first stage; the
first-stage ceiling decodes the autoencoder's own high-res latent (no up-sampler can beat it in
that latent space, so it needs hr). Trained `Upsampler`s (CFM, regression) are methods through
`Upsampler.upscale`'s two halves, the one render path: evaluation chooses settings and never re-implements a
step. Settings that differ only after the decode (detail, back-projection) share one `Upsampler.draft` per
image through an `InputMemo`, so a sweep over the dial samples and decodes once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fmboost.models import FirstStage, IdentityAutoencoder, SamplerConfig, Upsampler, consistency
from fmboost.models.restorer import Restorer

#: Baseline keys for `baseline_methods(include=...)` → the method names they appear under in results
#: (Real-ESRGAN: one row per back-projection setting, 'Real-ESRGAN · BP2').
BASELINES = {"bilinear": "bilinear", "bicubic": "bicubic", "latent-bilinear": "latent bilinear",
             "psu-source": "PSU source", "ceiling": "first-stage ceiling", "realesrgan": "Real-ESRGAN"}
#: Baselines that need a latent space: meaningless (or a lossless row) for pixel-space upsamplers.
LATENT_BASELINES = ("latent-bilinear", "psu-source", "ceiling")


@dataclass
class MethodOutput:
    """image: (B, 3, H, W) in [-1, 1]; nfe: network evaluations per image (0 for baselines);
    shared_seconds: time of work this method reused from another (a draft), added to its s/img so each method
    is timed as if it ran alone."""

    image: torch.Tensor
    nfe: int = 0
    shared_seconds: float = 0.0


Method = Callable[[torch.Tensor, torch.Tensor, torch.Generator], MethodOutput]
"""method(lr, hr, generator); only the first-stage ceiling may look at hr."""


def default_baselines(first_stage: FirstStage | None, scale: int) -> list[str]:
    """The baselines that mean something for a folder in `first_stage`'s space at `scale`: pixel interpolation
    always, the latent ones only in a lossy latent space (a pixel-space upsampler's "ceiling" would be the truth
    itself), Real-ESRGAN (the peer upscaler, ×4 only) where its weights are found."""
    from fmboost.models.realesrgan import REALESRGAN_SCALE, default_realesrgan_path

    latent = first_stage is not None and not isinstance(first_stage, IdentityAutoencoder)
    peer = default_realesrgan_path()
    keys = [key for key in BASELINES if (latent or key not in LATENT_BASELINES) and key != "realesrgan"]
    return keys + (["realesrgan"] if scale == REALESRGAN_SCALE and peer is not None and peer.is_file() else [])


class InputMemo:
    """Work done once per low-res input and reused by several rows — an upsampler's draft (shared by the rows
    that differ only in detail and back-projection), Real-ESRGAN's output (shared by its back-projection rows) —
    keyed by what makes it; a new input clears it. Holds the input so its identity stays unique."""

    def __init__(self):
        self._lr: torch.Tensor | None = None
        self._store: dict[Hashable, tuple[Any, float]] = {}

    def get(self, key: Hashable, lr: torch.Tensor, make: Callable[[], Any]) -> tuple[Any, float]:
        """(make()'s value for this input, seconds it took when made by an earlier call — 0.0 if made now)."""
        if lr is not self._lr:
            self._lr, self._store = lr, {}
        if key in self._store:
            return self._store[key]
        start = time.perf_counter()
        value = make()
        self._store[key] = (value, time.perf_counter() - start)
        return value, 0.0


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
    return first_stage.decode(first_stage.encode(pixel_upsample(lr, scale)))


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


def baseline_methods(scale: int, first_stage: FirstStage | None, include: Sequence[str],
                     projections: Sequence[int] = (0, 2), device: str = "cpu") -> dict[str, Method]:
    """The `include` keys of BASELINES as methods; the latent ones need a first stage. Real-ESRGAN gets a row
    per back-projection step count in `projections` (the peer at its best: back-projection helps it as it helps
    our models) and raises `MetricUnavailable` when its weights are missing."""
    unknown = sorted(set(include) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    latent = [key for key in include if key in LATENT_BASELINES]
    if latent and first_stage is None:
        raise ValueError(f"baseline(s) {latent} need a latent space: give --upsampler or --first-stage")
    makers = {
        "bilinear": lambda lr, hr, g: MethodOutput(pixel_upsample(lr, scale, "bilinear")),
        "bicubic": lambda lr, hr, g: MethodOutput(pixel_upsample(lr, scale, "bicubic")),
        "latent-bilinear": lambda lr, hr, g: MethodOutput(latent_upsample(lr, scale, first_stage)),
        "psu-source": lambda lr, hr, g: MethodOutput(psu_source(lr, scale, first_stage)),
        "ceiling": lambda lr, hr, g: MethodOutput(first_stage_ceiling(hr, first_stage)),
    }
    methods = {BASELINES[key]: makers[key] for key in include if key != "realesrgan"}
    if "realesrgan" in include:
        from fmboost.models.realesrgan import realesrgan_restorer

        methods.update(restorer_methods("Real-ESRGAN", realesrgan_restorer(device=device), scale, projections))
    return methods


def restorer_methods(label: str, restorer: Restorer, scale: int, projections: Sequence[int]) -> dict[str, Method]:
    """'<label> · BPn' for each n: a pretrained restorer (Real-ESRGAN x4plus, or any weights file `Restorer.load`
    reads), then n steps of back-projection onto the input; the network runs once per image for all n."""
    if scale != restorer.scale:
        raise ValueError(f"{label} ({restorer.name}) up-samples ×{restorer.scale}, this evaluation is ×{scale}")
    memo = InputMemo()

    def method_for(steps: int) -> Method:
        def method(lr: torch.Tensor, hr: torch.Tensor, generator: torch.Generator) -> MethodOutput:
            image, shared = memo.get(restorer.sha256, lr, lambda: restorer(lr))
            return MethodOutput(consistency.back_project(image, lr, steps), shared_seconds=shared)

        return method

    return {f"{label} · BP{steps}": method_for(steps) for steps in dict.fromkeys(projections)}


def upsampler_method(upsampler: Upsampler, sampler: SamplerConfig, memo: InputMemo | None = None) -> Method:
    """An Upsampler (CFM or regression) rendering with `sampler` (detail and back-projection included):
    `Upsampler.finish` on the image's draft (R's estimate and the full sample, one per upsampler and ODE solve,
    kept in `memo`), so the image is exactly what `Upsampler.upscale` makes."""
    memo = memo or InputMemo()
    sampler = upsampler.settings(sampler)

    def method(lr: torch.Tensor, hr: torch.Tensor, generator: torch.Generator) -> MethodOutput:
        draft, shared = memo.get((id(upsampler), sampler.format()), lr,
                                 lambda: upsampler.draft(lr, generator, sampler))
        result = upsampler.finish(draft, sampler)
        return MethodOutput(result.image, result.nfe, shared)

    return method
