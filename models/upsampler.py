"""Upsampler: a trained CFMUNet bundled with everything needed to use it, saved as one folder.

    <dir>/config.json, diffusion_pytorch_model.safetensors   the CFMUNet (diffusers save_pretrained)
    <dir>/boost_config.json                                  first stage (+ latent stats), scale,
                                                             CouplingFlowMatcher, sampler defaults
    <dir>/posterior_mean/                                    R, for posterior-mean flows only (frozen
                                                             regression CFMUNet + its latent stats)

Training writes it; `BoostPipeline`, `fmboost upscale` and `fmboost eval-sr` load it, so inference
uses exactly the coupling and latent normalisation the model was trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .autoencoders import FirstStage, first_stage_from_config
from .flow import CouplingFlowMatcher
from .posterior_mean import PosteriorMean
from .sampling import SampleResult

BOOST_CONFIG_NAME = "boost_config.json"
POSTERIOR_MEAN_FOLDER = "posterior_mean"
SAMPLER_KEYS = ("solver", "num_steps", "schedule", "schedule_params", "atol", "rtol", "detail")


@dataclass
class Upsampler:
    """model: v_θ; first_stage: the latent space it works in; scale: pixel up-sampling factor (e.g. 4);
    posterior_mean: R, required by (and only by) flows with source 'posterior_mean'.

    sampler: the saved defaults — solver, num_steps, schedule, schedule_params, atol, rtol, and `detail`,
    the fidelity dial of posterior-mean flows (0: R's estimate, best PSNR; 1, the default: full detail)."""

    model: torch.nn.Module
    first_stage: FirstStage
    flow: CouplingFlowMatcher
    scale: int
    sampler: dict = field(default_factory=lambda: {"solver": "euler", "num_steps": 4, "schedule": "linear"})
    posterior_mean: PosteriorMean | None = None

    def __post_init__(self):
        if self.flow.needs_posterior_mean and self.posterior_mean is None:
            raise ValueError("a flow with source 'posterior_mean' needs its posterior-mean model R "
                             "(PosteriorMean.from_upsampler(<regression Upsampler>))")
        unknown = sorted(set(self.sampler) - set(SAMPLER_KEYS))
        if unknown:
            raise ValueError(f"unknown sampler keys {unknown}; allowed: {list(SAMPLER_KEYS)}")
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be a positive int, got {self.scale!r}")

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        config = {"first_stage": self.first_stage.config(), "scale": self.scale, "flow": self.flow.to_dict(),
                  "sampler": self.sampler}
        if self.posterior_mean is not None:
            self.posterior_mean.save_pretrained(directory / POSTERIOR_MEAN_FOLDER)
        (directory / BOOST_CONFIG_NAME).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, first_stage: FirstStage | None = None) -> "Upsampler":
        """Load a saved upsampler; pass `first_stage` to reuse one already in memory (e.g. a pipeline's VAE)."""
        from .unet import CFMUNet

        directory = Path(directory)
        config_path = directory / BOOST_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"no {BOOST_CONFIG_NAME} in {directory}: not an fmboost upsampler folder "
                                    "(train one with `fmboost train` or `accelerate launch train/cfm_upsampler.py`)")
        config = json.loads(config_path.read_text())
        if first_stage is None:
            first_stage = first_stage_from_config(config["first_stage"])
        else:
            stats = config["first_stage"]
            first_stage.set_latent_stats(torch.tensor(stats["latent_mean"]), torch.tensor(stats["latent_std"]))
        model = CFMUNet.from_pretrained(directory).eval()
        flow = CouplingFlowMatcher.from_dict(config["flow"])
        posterior_mean = PosteriorMean.from_pretrained(directory / POSTERIOR_MEAN_FOLDER) \
            if flow.needs_posterior_mean else None
        return cls(model, first_stage, flow, config["scale"], config.get("sampler", {}), posterior_mean)

    def to(self, device: torch.device | str) -> "Upsampler":
        """Move the networks (CFMUNet, first stage, R) to `device`; returns self."""
        self.model.to(device)
        self.first_stage.to(device)
        if self.posterior_mean is not None:
            self.posterior_mean.to(device)
        return self

    @torch.no_grad()
    def upsample(self, lr_latent: torch.Tensor | None = None, lr_image: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, **sampler_overrides) -> SampleResult:
        """High-res latent (B, C, s·h, s·w) from a low-res latent (B, C, h, w) and/or image (B, 3, f·h, f·w).

        `sampler_overrides` (solver, num_steps, schedule, schedule_params, atol, rtol, detail,
        return_intermediates) replace the saved defaults for this call.
        """
        return self.sample(self.condition(lr_latent, lr_image), generator, **sampler_overrides)

    @torch.no_grad()
    def condition(self, lr_latent: torch.Tensor | None = None, lr_image: torch.Tensor | None = None) -> torch.Tensor:
        """The clean up-sampled latent (B, C, s·h, s·w) the model is conditioned on.

        Split from `sample` because it holds the expensive part for PSU (encoding the s×-up-sampled image):
        callers that draw several samples or compare samplers on one input compute it once.
        """
        if lr_latent is None and lr_image is None:
            raise ValueError("upsample needs lr_latent or lr_image")
        if lr_latent is not None:
            h, w = lr_latent.shape[-2:]
        else:
            f = self.first_stage.downsample_factor
            if lr_image.shape[-2] % f or lr_image.shape[-1] % f:
                raise ValueError(f"lr_image size {tuple(lr_image.shape[-2:])} must be a multiple of {f}")
            h, w = lr_image.shape[-2] // f, lr_image.shape[-1] // f
        return self.flow.condition(lr_latent, (h * self.scale, w * self.scale), self.first_stage, lr_image)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None,
               **sampler_overrides) -> SampleResult:
        """x1 (B, C, H, W) from a conditioning made by `condition`, with the saved sampler unless overridden.

        Posterior-mean flows first run R on cond (one network evaluation, counted in the NFE)."""
        posterior_mean = None
        if self.flow.needs_posterior_mean:
            posterior_mean = self.posterior_mean(cond, self.first_stage.latent_mean, self.first_stage.latent_std)
        result = self.flow.sample(self.model, cond, generator, posterior_mean=posterior_mean,
                                  **{**self.sampler, **sampler_overrides})
        if posterior_mean is not None:
            result.nfe += 1
        return result
