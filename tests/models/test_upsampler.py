import json

import pytest
import torch
from fmboost.models import BOOST_CONFIG_NAME, CFMUNet, CouplingFlowMatcher, IdentityAutoencoder, Upsampler


def make_upsampler(upsample="psu"):
    first_stage = IdentityAutoencoder()
    first_stage.set_latent_stats(torch.tensor([0.1, 0.0, -0.1]), torch.tensor([0.5, 0.6, 0.7]))
    return Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), first_stage,
                     CouplingFlowMatcher(upsample=upsample, noising_step=300), scale=2,
                     sampler={"solver": "euler", "num_steps": 3, "schedule": "cosine"})


def test_save_load_round_trip_reproduces_samples(tmp_path, generator):
    upsampler = make_upsampler()
    upsampler.save_pretrained(tmp_path)
    config = json.loads((tmp_path / BOOST_CONFIG_NAME).read_text())
    assert config["scale"] == 2 and config["flow"]["noising_step"] == 300
    assert config["first_stage"]["latent_std"] == pytest.approx([0.5, 0.6, 0.7])
    loaded = Upsampler.from_pretrained(tmp_path)
    image = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    a = upsampler.upsample(lr_image=image, generator=torch.Generator().manual_seed(3))
    b = loaded.upsample(lr_image=image, generator=torch.Generator().manual_seed(3))
    assert a.nfe == b.nfe == 3 and a.x1.shape == (2, 3, 16, 16)
    torch.testing.assert_close(a.x1, b.x1)
    assert upsampler.upsample(lr_image=image, num_steps=5).nfe == 5  # per-call override


def test_latent_mode_accepts_latents_or_images(generator):
    upsampler = make_upsampler("bilinear")
    latent = torch.randn(1, 3, 4, 6, generator=generator)
    assert upsampler.upsample(lr_latent=latent).x1.shape == (1, 3, 8, 12)
    assert upsampler.upsample(lr_image=torch.zeros(1, 3, 4, 6)).x1.shape == (1, 3, 8, 12)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an fmboost upsampler folder"):
        Upsampler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown sampler keys"):
        Upsampler(None, IdentityAutoencoder(), CouplingFlowMatcher(), 2, {"steps": 4})
    with pytest.raises(ValueError, match="needs lr_latent or lr_image"):
        make_upsampler().upsample()
