"""Super-resolution methods compared by `fmboost eval-sr`, all with one signature.

    method(lr, hr, generator) -> MethodOutput(image, nfe, latent)   lr (B, 3, h, w), image (B, 3, s·h, s·w), [-1, 1]

Pixel baselines interpolate the low-res image; latent baselines go through a first stage; the
first-stage ceiling decodes the autoencoder's own high-res latent (no up-sampler can beat it in
that latent space, so it needs hr); the regression baseline and CFM load trained `Upsampler`s.
Methods that share a coupling share its conditioning through a `ConditionMemo`: for PSU at 1024²
it is a full-resolution encode, as slow as the decode, and is computed once per image.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from fmboost.models import FirstStage, SamplerConfig, Upsampler
from fmboost.models.consistency import back_project
from fmboost.models.coupling import upsample_latent

#: Baseline keys for `baseline_methods(include=...)` → the method names they appear under in results.
BASELINES = {"bilinear": "bilinear", "bicubic": "bicubic", "latent-bilinear": "latent bilinear",
             "psu-source": "PSU source", "ceiling": "first-stage ceiling"}


@dataclass
class MethodOutput:
    """image: (B, 3, H, W) in [-1, 1]; nfe: network evaluations per image (0 for baselines);
    latent: the high-res latent the image was decoded from (CFM samples, for distances between samplers);
    shared_seconds: time of work this method reused from another (the conditioning), added to its s/img so
    each method is timed as if it ran alone."""

    image: torch.Tensor
    nfe: int = 0
    latent: torch.Tensor | None = None
    shared_seconds: float = 0.0


Method = Callable[[torch.Tensor, torch.Tensor, torch.Generator], MethodOutput]
"""method(lr, hr, generator); only the first-stage ceiling may look at hr."""


@dataclass(frozen=True)
class DerivedMethod:
    """A method that post-processes another method's output on the same image instead of running it again
    (at 1024² a CFM sample costs a full-resolution decode); `evaluate` runs `base` first and times this one
    as base + transform. transform(output, lr) -> MethodOutput."""

    base: str
    transform: Callable[[MethodOutput, torch.Tensor], MethodOutput]


def back_projected_name(base: str, iterations: int) -> str:
    """The results row of `base` after `iterations` back-projection steps, e.g. 'CFM euler:linear:2 + BP2'."""
    return f"{base} + BP{iterations}"


def back_projected(base: str, iterations: int) -> DerivedMethod:
    """`base` followed by `iterations` steps of low-res back-projection (fmboost.models.consistency)."""

    def transform(output: MethodOutput, lr: torch.Tensor) -> MethodOutput:
        return MethodOutput(back_project(output.image, lr, iterations), output.nfe)

    return DerivedMethod(base, transform)


class ConditionMemo:
    """Conditionings of the current low-res input, keyed by coupling (first-stage config with its latent
    stats + up-sampling mode); a new input clears it. Holds the input so its identity stays unique."""

    def __init__(self):
        self._lr: torch.Tensor | None = None
        self._store: dict[str, tuple[torch.Tensor, float]] = {}

    @staticmethod
    def key(first_stage: FirstStage, mode: str) -> str:
        return json.dumps({"first_stage": first_stage.config(), "upsample": mode}, sort_keys=True)

    def get(self, key: str, lr: torch.Tensor, make: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
        """(conditioning, seconds it took when made earlier — 0.0 if made by this call)."""
        if lr is not self._lr:
            self._lr, self._store = lr, {}
        if key in self._store:
            return self._store[key]
        start = time.perf_counter()
        cond = make()
        self._store[key] = (cond, time.perf_counter() - start)
        return cond, 0.0


def pixel_upsample(lr: torch.Tensor, scale: int, mode: str = "bicubic") -> torch.Tensor:
    """Bilinear / bicubic interpolation in pixel space: (B, 3, h, w) → (B, 3, s·h, s·w), clamped to [-1, 1]."""
    size = (lr.shape[-2] * scale, lr.shape[-1] * scale)
    return F.interpolate(lr, size=size, mode=mode, align_corners=False).clamp(-1, 1)


def latent_upsample(lr: torch.Tensor, scale: int, first_stage: FirstStage, mode: str = "bilinear") -> torch.Tensor:
    """decode(interpolate(encode(lr))): the latent-interpolation source, decoded without a model."""
    z = first_stage.encode(lr)
    z = F.interpolate(z, size=(z.shape[-2] * scale, z.shape[-1] * scale), mode=mode, align_corners=False)
    return first_stage.decode(z)


def psu_condition(lr: torch.Tensor, scale: int, first_stage: FirstStage) -> torch.Tensor:
    """encode(bicubic(lr)): the PSU coupling's clean source latent (B, C, s·h/f, s·w/f)."""
    f = first_stage.downsample_factor
    size = (lr.shape[-2] * scale // f, lr.shape[-1] * scale // f)
    return upsample_latent(None, size, "psu", first_stage, lr)


def psu_source(lr: torch.Tensor, scale: int, first_stage: FirstStage) -> torch.Tensor:
    """decode(encode(bicubic(lr))): the PSU coupling's clean source, decoded without a model."""
    return first_stage.decode(psu_condition(lr, scale, first_stage))


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


def baseline_methods(scale: int, first_stage: FirstStage | None, memo: ConditionMemo | None = None,
                     include: Sequence[str] = tuple(BASELINES)) -> dict[str, Method]:
    """Pixel bilinear / bicubic; the latent baselines and the ceiling when a first stage is given; only the
    `include` keys of BASELINES (at 1024² each latent baseline costs a full-resolution decode per image)."""
    unknown = sorted(set(include) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    methods: dict[str, Method] = {
        "bilinear": lambda lr, hr, g: MethodOutput(pixel_upsample(lr, scale, "bilinear")),
        "bicubic": lambda lr, hr, g: MethodOutput(pixel_upsample(lr, scale, "bicubic")),
    }
    if first_stage is not None:
        methods["latent bilinear"] = lambda lr, hr, g: MethodOutput(latent_upsample(lr, scale, first_stage))
        memo = memo or ConditionMemo()
        key = ConditionMemo.key(first_stage, "psu")

        def psu(lr: torch.Tensor, hr: torch.Tensor, g: torch.Generator) -> MethodOutput:
            cond, shared = memo.get(key, lr, lambda: psu_condition(lr, scale, first_stage))
            return MethodOutput(first_stage.decode(cond), shared_seconds=shared)

        methods["PSU source"] = psu
        methods["first-stage ceiling"] = lambda lr, hr, g: MethodOutput(first_stage_ceiling(hr, first_stage))
    wanted = {BASELINES[key] for key in include}
    return {name: method for name, method in methods.items() if name in wanted}


def upsampler_method(upsampler: Upsampler, memo: ConditionMemo | None = None, num_samples: int = 1,
                     sampler: SamplerConfig | None = None) -> Method:
    """An Upsampler (CFM or regression) as a method, sampling with `sampler` (default: its saved one).

    num_samples > 1 decodes the mean of that many latent samples (an estimate of the posterior mean: higher
    PSNR, blurrier); its NFE is the total over the samples, and its first sample is the single-sample method's.
    A calibrated dial (`Upsampler.detail_calibration`, detail < 1) blends the decoded estimate and full
    sample(s) per band; they are kept in `memo` for the image, so a sweep over detail samples and decodes once.
    """
    memo = memo or ConditionMemo()
    key = ConditionMemo.key(upsampler.first_stage, upsampler.flow.upsample)
    sampler = sampler or upsampler.sampler

    def method(lr: torch.Tensor, hr: torch.Tensor, generator: torch.Generator) -> MethodOutput:
        cond, shared = memo.get(key, lr, lambda: upsampler.condition(lr_image=lr))
        if num_samples == 1 and upsampler.calibrated(sampler):
            pair_key = f"{key} calibrated {id(upsampler)} {sampler.replace(detail=1.0)}"
            (estimate, samples, result), seconds = memo.get(
                pair_key, lr, lambda: upsampler.estimate_and_sample(cond, generator, sampler))
            image = upsampler.detail_calibration.combine(estimate, samples, sampler.detail, upsampler.scale)
            return MethodOutput(image, result.nfe, result.x1[:lr.shape[0]], shared + seconds)
        results = [upsampler.sample(cond, generator, sampler) for _ in range(num_samples)]
        x1 = torch.stack([r.x1 for r in results]).mean(0) if num_samples > 1 else results[0].x1
        return MethodOutput(upsampler.first_stage.decode(x1), sum(r.nfe for r in results), x1, shared)

    return method
