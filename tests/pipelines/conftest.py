"""Fixtures of the page and collection tests."""

import pytest
import torch
from fmboost.models import CFMUNet, CouplingFlowMatcher, IdentityAutoencoder, SamplerConfig, Upsampler


@pytest.fixture(scope="module")
def upsampler_dir(tmp_path_factory):
    """A tiny ×2 pixel-space upsampler folder (random weights, 2 Euler steps)."""
    torch.manual_seed(0)
    net = CFMUNet.from_preset("tiny", latent_channels=3, block_out_channels=(8, 16, 16),
                              attention_levels=(False, False, False)).eval()
    path = tmp_path_factory.mktemp("upsampler") / "upsampler"
    Upsampler(net, IdentityAutoencoder(), CouplingFlowMatcher(upsample="bicubic"), scale=2,
              sampler=SamplerConfig(num_steps=2)).save_pretrained(path)
    return path
