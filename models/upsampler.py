"""Upsampler: a trained CFMUNet bundled with everything needed to use it, saved as one folder.

    <dir>/config.json, diffusion_pytorch_model.safetensors   the CFMUNet (diffusers save_pretrained)
    <dir>/boost_config.json                                  first stage (+ latent stats), scale,
                                                             CouplingFlowMatcher, SamplerConfig
    <dir>/posterior_mean/                                    R, for posterior-mean flows only (frozen
                                                             regression CFMUNet + its latent stats)

Training writes it; `BoostPipeline`, `fmboost upscale` and `fmboost eval-sr` load it, so inference
uses exactly the coupling and latent normalisation the model was trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .autoencoders import FirstStage, first_stage_from_config
from .flow import CouplingFlowMatcher
from .posterior_mean import PosteriorMean
from .sampler_config import SamplerConfig
from .sampling import SampleResult

BOOST_CONFIG_NAME = "boost_config.json"
POSTERIOR_MEAN_FOLDER = "posterior_mean"
Generators = torch.Generator | list[torch.Generator] | None


@dataclass
class FlowSource:
    """Where sampling starts. cond: (B, C, H, W) the clean conditioning; x0: (B, C, H, W) the ODE's state at t = 0
    (None for regression upsamplers, which make one pass on cond); posterior_mean: (B, C, H, W) R(cond) for
    posterior-mean flows, else None."""

    cond: torch.Tensor
    x0: torch.Tensor | None
    posterior_mean: torch.Tensor | None = None


@dataclass
class Upsampler:
    """model: v_θ; first_stage: the latent space it works in; scale: pixel up-sampling factor (e.g. 4);
    posterior_mean: R, required by (and only by) flows with source 'posterior_mean'.

    sampler: the saved default `SamplerConfig` — ODE solver, steps, schedule, tolerances, and `detail`, the
    fidelity dial of posterior-mean flows (0: R's estimate, best PSNR; 1, the default: full detail)."""

    model: torch.nn.Module
    first_stage: FirstStage
    flow: CouplingFlowMatcher
    scale: int
    sampler: SamplerConfig = SamplerConfig()
    posterior_mean: PosteriorMean | None = None

    def __post_init__(self):
        if self.flow.needs_posterior_mean and self.posterior_mean is None:
            raise ValueError("a flow with source 'posterior_mean' needs its posterior-mean model R "
                             "(PosteriorMean.from_upsampler(<regression Upsampler>))")
        if not isinstance(self.sampler, SamplerConfig):
            raise TypeError(f"sampler must be a SamplerConfig (SamplerConfig.from_dict for a dict), "
                            f"got {self.sampler!r}")
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be a positive int, got {self.scale!r}")

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if self.posterior_mean is not None:
            self.posterior_mean.save_pretrained(directory / POSTERIOR_MEAN_FOLDER)
        (directory / BOOST_CONFIG_NAME).write_text(json.dumps(self.config(), indent=2))

    def config(self) -> dict:
        """What boost_config.json holds: first stage (+ latent stats), scale, flow and sampler."""
        return {"first_stage": self.first_stage.config(), "scale": self.scale, "flow": self.flow.to_dict(),
                "sampler": self.sampler.to_dict()}

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
        sampler = SamplerConfig.from_dict(config.get("sampler", {}))  # older files: a partial dict
        return cls(model, first_stage, flow, config["scale"], sampler, posterior_mean)

    def to(self, device: torch.device | str) -> "Upsampler":
        """Move the networks (CFMUNet, first stage, R) to `device`; returns self."""
        self.model.to(device)
        self.first_stage.to(device)
        if self.posterior_mean is not None:
            self.posterior_mean.to(device)
        return self

    # ------------------------------------------------------------------ sampling, in its steps

    @torch.no_grad()
    def upsample(self, lr_latent: torch.Tensor | None = None, lr_image: torch.Tensor | None = None,
                 generator: Generators = None, sampler: SamplerConfig | None = None,
                 return_intermediates: bool = False, **overrides) -> SampleResult:
        """High-res latent (B, C, s·h, s·w) from a low-res latent (B, C, h, w) and/or image (B, 3, f·h, f·w):
        `condition` → `draw_source` → `transport`.

        Samples with `sampler` (default: the saved one) changed by `overrides`, any SamplerConfig field
        (e.g. num_steps=8, detail=0.5), for this call only.
        """
        return self.sample(self.condition(lr_latent, lr_image), generator, sampler, return_intermediates,
                           **overrides)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: Generators = None, sampler: SamplerConfig | None = None,
               return_intermediates: bool = False, **overrides) -> SampleResult:
        """x1 (B, C, H, W) from a conditioning made by `condition`; arguments as in `upsample`."""
        return self.transport(self.draw_source(cond, generator), sampler, return_intermediates, **overrides)

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
    def draw_source(self, cond: torch.Tensor, generator: Generators = None) -> FlowSource:
        """The source x0 the ODE starts from — cond noise-augmented at the trained step, or R(cond) + σ_s ε
        for posterior-mean flows (R runs here, once). `generator`: one, or a list with one per sample, so that
        each sample is reproducible on its own whatever batch it is drawn in."""
        estimate = None
        if self.flow.needs_posterior_mean:
            estimate = self.posterior_mean(cond, self.first_stage.latent_mean, self.first_stage.latent_std)
        if not isinstance(generator, list):
            return FlowSource(cond, self.flow.draw_source(cond, generator, estimate), estimate)
        if len(generator) != cond.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {cond.shape[0]}")
        rows = [self.flow.draw_source(cond[i:i + 1], g, None if estimate is None else estimate[i:i + 1])
                for i, g in enumerate(generator)]
        return FlowSource(cond, None if rows[0] is None else torch.cat(rows), estimate)

    @torch.no_grad()
    def transport(self, source: FlowSource, sampler: SamplerConfig | None = None, return_intermediates: bool = False,
                  **overrides) -> SampleResult:
        """x1 (B, C, H, W), the ODE solved from x0 with `sampler` (default: the saved one) changed by
        `overrides`. The NFE counts R's pass for posterior-mean flows."""
        sampler = (sampler or self.sampler).replace(**overrides)
        result = self.flow.transport(self.model, source.cond, source.x0, source.posterior_mean, sampler.detail,
                                     return_intermediates=return_intermediates, **sampler.solve_kwargs())
        if source.posterior_mean is not None:
            result.nfe += 1
        return result
