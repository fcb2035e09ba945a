"""The posterior-mean estimator R(cond) that a posterior-mean flow starts from.

PMRF (Ohayon et al., ICLR 2025) and Latent-PMRF (arXiv 2507.00447): a regression network trained
with MSE approximates the posterior mean E[x1 | low-res] (the best PSNR any estimator can reach, but
blurry); a flow from R(cond) + σ_s·ε to the data then only has to add the detail the mean averages
away. Here R is a trained regression upsampler (`objective: regression`, x̂1 = cond + net(cond, 0, cond)),
frozen, and kept inside the posterior-mean upsampler's folder so that folder is self-contained.

R was trained in its own latent normalisation (per-channel mean / std of its training latents); the
flow may use another, so latents are mapped through the raw latent space on the way in and out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .autoencoders import stats_from_record, stats_record
from .flow import CouplingFlowMatcher
from .unet import CFMUNet

STATS_NAME = "posterior_mean_stats.json"


class PosteriorMean(torch.nn.Module):
    """R: the frozen regression network plus the latent statistics it was trained with.

    model: CFMUNet trained with objective 'regression'; latent_mean / latent_std: (C,) its normalisation.
    """

    def __init__(self, model: CFMUNet, latent_mean: torch.Tensor, latent_std: torch.Tensor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("latent_mean", torch.as_tensor(latent_mean, dtype=torch.float32))
        self.register_buffer("latent_std", torch.as_tensor(latent_std, dtype=torch.float32))

    @classmethod
    def from_upsampler(cls, upsampler) -> PosteriorMean:
        """From a loaded regression `Upsampler`; any other objective is refused (its output is no mean)."""
        if upsampler.flow.objective != "regression":
            raise ValueError(f"the posterior-mean model must be a regression upsampler (objective 'regression'), "
                             f"got objective {upsampler.flow.objective!r}")
        stage = upsampler.first_stage
        return cls(upsampler.model, stage.latent_mean.detach().cpu(), stage.latent_std.detach().cpu())

    @classmethod
    def from_stats(cls, model: CFMUNet, stats: dict) -> PosteriorMean:
        """R from its network and `stats()` (a BoostPipeline's regression_unet and its boost_config's record)."""
        return cls(model, *stats_from_record(stats))

    def stats(self) -> dict:
        """R's latent normalisation as JSON stores it."""
        return stats_record(self.latent_mean, self.latent_std)

    @torch.no_grad()
    def forward(self, cond: torch.Tensor, latent_mean: torch.Tensor, latent_std: torch.Tensor) -> torch.Tensor:
        """R(cond): cond (B, C, H, W) in the caller's normalisation (latent_mean / latent_std, (C,)) →
        the posterior-mean estimate (B, C, H, W) in that same normalisation. One network evaluation."""
        shape = (1, -1, 1, 1)
        ours_mean, ours_std = latent_mean.to(cond).view(shape), latent_std.to(cond).view(shape)
        r_mean, r_std = self.latent_mean.to(cond).view(shape), self.latent_std.to(cond).view(shape)
        cond_r = (cond * ours_std + ours_mean - r_mean) / r_std
        estimate_r = CouplingFlowMatcher.regress(self.model, cond_r)
        return (estimate_r * r_std + r_mean - ours_mean) / ours_std

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        (directory / STATS_NAME).write_text(json.dumps(self.stats(), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PosteriorMean:
        directory = Path(directory)
        stats_path = directory / STATS_NAME
        if not stats_path.is_file():
            raise FileNotFoundError(f"no {STATS_NAME} in {directory}: the posterior-mean model of this upsampler "
                                    "folder is missing or incomplete")
        return cls.from_stats(CFMUNet.from_pretrained(directory), json.loads(stats_path.read_text()))
