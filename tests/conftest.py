"""Shared fixtures: seeded generators and the optional offline assets of $FMBOOST_SHARED (skipped with a reason)."""

import pytest
import torch
from fmboost.models.assets import LPIPS_SHARED_PATH, shared_path


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def require_shared(relative: str):
    """Path to an optional offline asset, or skip the test saying what is missing."""
    path = shared_path(relative)
    if path is None:
        pytest.skip(f"needs the optional offline asset {relative} in $FMBOOST_SHARED (default ../shared): absent")
    return path


@pytest.fixture
def taef2_dir():
    return require_shared("weights/taef2")


@pytest.fixture
def faces_dir():
    return require_shared("data/faces")


@pytest.fixture
def lpips_file():
    return require_shared(LPIPS_SHARED_PATH)


def tiny_regression(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), seed: int = 1, scale: int = 2):
    """A ×`scale` regression upsampler in pixel space (identity first stage with the given latent stats)."""
    from fmboost.models import CFMUNet, CouplingFlowMatcher, IdentityAutoencoder, Upsampler

    torch.manual_seed(seed)
    first_stage = IdentityAutoencoder()
    first_stage.set_latent_stats(torch.tensor(mean), torch.tensor(std))
    return Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), first_stage,
                     CouplingFlowMatcher(objective="regression"), scale=scale)


def tiny_posterior_mean(r, mean=(0.1, 0.0, -0.1), std=(0.5, 0.6, 0.7), num_steps: int = 3, **flow):
    """A posterior-mean flow from the regression upsampler `r`, in pixel space, `num_steps` Euler steps."""
    from fmboost.models import CFMUNet, CouplingFlowMatcher, IdentityAutoencoder, SamplerConfig, Upsampler
    from fmboost.models.posterior_mean import PosteriorMean

    torch.manual_seed(0)
    first_stage = IdentityAutoencoder()
    first_stage.set_latent_stats(torch.tensor(mean), torch.tensor(std))
    flow = CouplingFlowMatcher(**{"source": "posterior_mean", "posterior_mean_sigma": 0.2, **flow})
    return Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), first_stage, flow, scale=r.scale,
                     sampler=SamplerConfig(num_steps=num_steps), estimate=PosteriorMean.from_upsampler(r))


@pytest.fixture
def make_regression():
    """Factory of tiny regression upsamplers (`tiny_regression`)."""
    return tiny_regression


@pytest.fixture
def make_posterior_mean():
    """Factory of tiny posterior-mean upsamplers (`tiny_posterior_mean`)."""
    return tiny_posterior_mean
