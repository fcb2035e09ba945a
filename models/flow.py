"""Coupling flow matching: the probability path, its training loss and sampling.

Path (Lipman et al. 2023, Eq. 22; Albergo & Vanden-Eijnden 2023 for data couplings):
    x_t = t · x1 + (1 − (1 − σ_min) t) · x0,      u_t = x1 − (1 − σ_min) · x0,
where x0 is the source and x1 the high-res latent. The network regresses u_t with MSE; sampling
integrates v_θ from t = 0 to 1. Sources:
  "coupling"        the paper's: the up-sampled latent, noise-augmented by q(x_t | x_0) at a fixed step;
  "posterior_mean"  PMRF's: R(cond) + σ_s·ε, R a frozen regression upsampler (the MMSE estimate), so the
                    flow starts at the best-PSNR point and only adds the detail the mean averages away;
  "noise"           N(0, I): plain conditional flow matching (ablation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from .autoencoders import FirstStage
from .coupling import UPSAMPLE_MODES, CouplingBatch, cosine_alpha_bar, noise_augment, upsample_latent
from .deprecated import renamed_keywords
from .sampling import SampleResult, sample_ode
from .upgrade import upgrade_boost_config

TIME_SAMPLINGS = ("uniform", "logit_normal")
SOURCES = ("coupling", "posterior_mean", "noise")
#: What the network is conditioned on beside x_t: the up-sampled low-res input, or the estimate a posterior-mean
#: flow starts from (a restorer's output: a clean image where the input is noisy, blurred or blocky).
CONDITIONS = ("input", "estimate")
OBJECTIVES = ("cfm", "regression")


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float = 0.0) -> torch.Tensor:
    """x_t (B, C, H, W) on the straight path; t (B,) broadcast over C, H, W."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return t * x1 + (1 - (1 - sigma_min) * t) * x0


def target_velocity(x0: torch.Tensor, x1: torch.Tensor, sigma_min: float = 0.0) -> torch.Tensor:
    """u_t = d x_t / dt = x1 − (1 − σ_min) x0, constant along the path."""
    return x1 - (1 - sigma_min) * x0


def sample_time(batch_size: int, distribution: str = "uniform", mu: float = 0.0, std: float = 1.0,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) training times: U(0, 1) or logit-normal(μ, s) = sigmoid(N(μ, s²)) (SD3, Eq. 19)."""
    if distribution == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    if distribution == "logit_normal":
        return torch.sigmoid(mu + std * torch.randn(batch_size, generator=generator, device=device))
    raise ValueError(f"time_sampling must be one of {list(TIME_SAMPLINGS)}, got {distribution!r}")


@dataclass(frozen=True)
class CouplingFlowMatcher:
    """Everything that defines the method (not the network): coupling, path, objective, time sampling.

    Flat and JSON-able (`to_dict` / `from_dict`), so it is stored in `boost_config.json` and the
    pipeline samples exactly the way the model was trained.
    """

    upsample: str = "psu"
    noising_step: int = 400
    num_train_timesteps: int = 1000
    noise_sigma: float | None = None  # overrides noising_step: ᾱ = 1 − σ²
    source: str = "coupling"  # "posterior_mean": from R(cond) + σ_s ε; "noise": from N(0, I) (ablation)
    posterior_mean_sigma: float = 0.1  # σ_s of the posterior-mean source, in normalised latent units
    concat_cond: bool = True  # concatenate the clean up-sampled latent to x_t; False feeds zeros (PMRF's flow)
    condition_on: str = "input"  # "estimate": the posterior-mean estimate is the conditioning (see `conditioning`)
    objective: str = "cfm"  # "regression": one-pass baseline, x̂1 = cond + net(cond, 0, cond)
    sigma_min: float = 0.0
    time_sampling: str = "uniform"
    logit_normal_mu: float = 0.0
    logit_normal_std: float = 1.0

    def __post_init__(self):
        for name, value, allowed in (("upsample", self.upsample, UPSAMPLE_MODES), ("source", self.source, SOURCES),
                                     ("objective", self.objective, OBJECTIVES),
                                     ("condition_on", self.condition_on, CONDITIONS),
                                     ("time_sampling", self.time_sampling, TIME_SAMPLINGS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if self.noise_sigma is not None and not 0.0 <= self.noise_sigma < 1.0:
            raise ValueError(f"noise_sigma must be in [0, 1), got {self.noise_sigma}")
        if not self.posterior_mean_sigma >= 0.0:
            raise ValueError(f"posterior_mean_sigma must be >= 0, got {self.posterior_mean_sigma}")
        if not 0.0 <= self.sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {self.sigma_min}")
        if self.condition_on == "estimate" and not self.needs_posterior_mean:
            raise ValueError("condition_on 'estimate' needs a posterior-mean flow (source 'posterior_mean', objective "
                             "'cfm'): other flows have no estimate")
        cosine_alpha_bar(self.noising_step, self.num_train_timesteps)  # validates the step

    @property
    def alpha_bar(self) -> float:
        if self.noise_sigma is not None:
            return 1.0 - self.noise_sigma ** 2
        return cosine_alpha_bar(self.noising_step, self.num_train_timesteps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> CouplingFlowMatcher:
        """From `to_dict()`, or an older folder's "flow" dict (`upgrade_boost_config`)."""
        config = upgrade_boost_config({"flow": config})["flow"]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown CouplingFlowMatcher keys {unknown}; allowed: {sorted(known)}")
        return cls(**config)

    def condition(self, lr_latent: torch.Tensor | None, size: tuple[int, int], first_stage: FirstStage | None = None,
                  lr_image: torch.Tensor | None = None) -> torch.Tensor:
        """The clean up-sampled latent (B, C, H, W) used as conditioning (see `upsample_latent`)."""
        for name, tensor in (("lr_latent", lr_latent), ("lr_image", lr_image)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name} contains NaN or inf")
        return upsample_latent(lr_latent, size, self.upsample, first_stage, lr_image)

    @property
    def needs_posterior_mean(self) -> bool:
        return self.source == "posterior_mean" and self.objective == "cfm"

    def conditioning(self, cond: torch.Tensor, estimate: torch.Tensor | None) -> torch.Tensor:
        """The conditioning (B, C, H, W) of training and sampling: the up-sampled input `cond`, or with
        condition_on 'estimate' the estimate (a restorer's clean output in place of a degraded input)."""
        return estimate if self.condition_on == "estimate" else cond

    def network_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """What the network sees beside x_t: the clean up-sampled latent, or zeros when `concat_cond` is off."""
        return cond if self.concat_cond else torch.zeros_like(cond)

    @renamed_keywords(posterior_mean="estimate")
    def couple(self, cond: torch.Tensor, x1: torch.Tensor | None = None, generator: torch.Generator | None = None,
               estimate: torch.Tensor | None = None) -> CouplingBatch:
        """x0 (B, C, H, W) from the conditioning: noise-augmented cond, estimate + σ_s ε (the estimate R(cond), or a
        restorer's image's latent), or pure noise."""
        if self.source == "noise":
            x0 = torch.randn(cond.shape, generator=generator, device=cond.device, dtype=cond.dtype)
        elif self.source == "posterior_mean":
            if estimate is None or estimate.shape != cond.shape:
                got = None if estimate is None else tuple(estimate.shape)
                raise ValueError(f"source 'posterior_mean' needs posterior_mean of shape {tuple(cond.shape)}: the "
                                 f"estimate (R(cond), or a restorer's image's latent), got {got}")
            noise = torch.randn(cond.shape, generator=generator, device=cond.device, dtype=cond.dtype)
            x0 = estimate + self.posterior_mean_sigma * noise
        else:
            x0 = noise_augment(cond, self.alpha_bar, generator)
        return CouplingBatch(x0=x0, cond=cond, x1=x1)

    @renamed_keywords(posterior_mean="estimate")
    def loss(self, model: torch.nn.Module, x1: torch.Tensor, cond: torch.Tensor,
             generator: torch.Generator | None = None, estimate: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar MSE loss for targets x1 and conditionings cond, both (B, C, H, W); `estimate`
        (B, C, H, W), e.g. R(cond), for the posterior-mean source."""
        if x1.shape != cond.shape:
            raise ValueError(f"x1 {tuple(x1.shape)} and cond {tuple(cond.shape)} must have the same shape")
        if self.objective == "regression":
            return F.mse_loss(self.regress(model, cond).float(), x1.float())
        batch = self.couple(cond, x1, generator, estimate)
        t = sample_time(x1.shape[0], self.time_sampling, self.logit_normal_mu, self.logit_normal_std,
                        generator, x1.device).to(x1.dtype)
        x_t = interpolate(batch.x0, x1, t, self.sigma_min)
        prediction = model(x_t, t, self.network_cond(cond))
        return F.mse_loss(prediction.float(), target_velocity(batch.x0, x1, self.sigma_min).float())

    @staticmethod
    def regress(model: torch.nn.Module, cond: torch.Tensor) -> torch.Tensor:
        """Regression baseline: x̂1 = cond + net(cond, t=0, cond), one network evaluation (static: R, the frozen
        regression model of posterior-mean flows, runs it too)."""
        return cond + model(cond, torch.zeros(cond.shape[0], device=cond.device, dtype=cond.dtype), cond)

    @renamed_keywords(posterior_mean="estimate")
    def draw_source(self, cond: torch.Tensor, generator: torch.Generator | None = None,
                    estimate: torch.Tensor | None = None) -> torch.Tensor | None:
        """x0 (B, C, H, W), where sampling starts at t = 0 (see `couple`); None for the regression objective,
        which makes one pass on cond instead of solving an ODE."""
        if self.objective == "regression":
            return None
        return self.couple(cond, generator=generator, estimate=estimate).x0

    @torch.no_grad()
    @renamed_keywords(posterior_mean="estimate")
    def sample(self, model: torch.nn.Module, cond: torch.Tensor, generator: torch.Generator | None = None,
               estimate: torch.Tensor | None = None, **solver_kwargs) -> SampleResult:
        """x1 (B, C, H, W) from the conditioning: `draw_source` x0, then `transport` it (see there)."""
        x0 = self.draw_source(cond, generator, estimate)
        return self.transport(model, cond, x0, **solver_kwargs)

    @torch.no_grad()
    def transport(self, model: torch.nn.Module, cond: torch.Tensor, x0: torch.Tensor | None,
                  **solver_kwargs) -> SampleResult:
        """x1 (B, C, H, W) from the source x0 (B, C, H, W) made by `draw_source`, by integrating v_θ(·, ·, cond) from
        t = 0 to 1; solver_kwargs go to `sample_ode` (solver, num_steps, schedule, schedule_params, atol, rtol,
        return_intermediates; `SamplerConfig.solve_kwargs()`). Regression: one pass on cond, NFE 1.
        The NFE reported is the flow's; the caller that computed R(cond) for a posterior-mean source adds R's pass.
        The fidelity dial of posterior-mean flows acts on decoded images (`Upsampler.finish`), not here."""
        if self.objective == "regression":
            return SampleResult(self.regress(model, cond), nfe=1)
        net_cond = self.network_cond(cond)
        return sample_ode(lambda x, t: model(x, t, net_cond), x0, **solver_kwargs)
