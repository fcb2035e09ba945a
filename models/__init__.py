"""fmboost.models: the CFM network, the coupling, the flow objective, samplers and first stages."""

from .autoencoders import (
                           FIRST_STAGES,
                           DiffusersAutoencoder,
                           FirstStage,
                           IdentityAutoencoder,
                           TAEF2Autoencoder,
                           compute_latent_stats,
                           first_stage_from_config,
                           load_first_stage,
)
from .coupling import UPSAMPLE_MODES, CouplingBatch, cosine_alpha_bar, noise_augment, upsample_latent
from .flow import CouplingFlowMatcher, interpolate, sample_time, target_velocity
from .sampler_config import SamplerConfig
from .sampling import SCHEDULES, SOLVERS, SampleResult, sample_ode, time_grid
from .unet import PRESETS, CFMUNet
from .upsampler import BOOST_CONFIG_NAME, Upsampler

__all__ = [
                           "FIRST_STAGES",
                           "PRESETS",
                           "SCHEDULES",
                           "SOLVERS",
                           "UPSAMPLE_MODES",
                           "CFMUNet",
                           "CouplingBatch",
                           "CouplingFlowMatcher",
                           "DiffusersAutoencoder",
                           "FirstStage",
                           "IdentityAutoencoder",
                           "SampleResult",
                           "SamplerConfig",
                           "TAEF2Autoencoder",
                           "compute_latent_stats",
                           "cosine_alpha_bar",
                           "first_stage_from_config",
                           "interpolate",
                           "load_first_stage",
                           "noise_augment",
                           "sample_ode",
                           "sample_time",
                           "target_velocity",
                           "time_grid",
                           "upsample_latent",
                           "Upsampler",
                           "BOOST_CONFIG_NAME",
]
