import json

import pytest
import torch
from fmboost.models import (
    BOOST_CONFIG_NAME,
    CFMUNet,
    CouplingFlowMatcher,
    IdentityAutoencoder,
    SamplerConfig,
    Upsampler,
)


def make_upsampler(upsample="psu"):
    first_stage = IdentityAutoencoder()
    first_stage.set_latent_stats(torch.tensor([0.1, 0.0, -0.1]), torch.tensor([0.5, 0.6, 0.7]))
    return Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), first_stage,
                     CouplingFlowMatcher(upsample=upsample, noising_step=300), scale=2,
                     sampler=SamplerConfig("euler", 3, "cosine"))


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
    assert config["sampler"] == SamplerConfig("euler", 3, "cosine").to_dict() and loaded.sampler == upsampler.sampler


def test_sampler_config_per_call(generator):
    upsampler = make_upsampler()
    image = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    midpoint = SamplerConfig("midpoint", 2, "logit_normal", {"std": 3.0})
    a = upsampler.upsample(lr_image=image, generator=torch.Generator().manual_seed(1), sampler=midpoint)
    assert a.nfe == 4 and upsampler.sampler == SamplerConfig("euler", 3, "cosine")  # the saved one is untouched
    b = upsampler.upsample(lr_image=image, generator=torch.Generator().manual_seed(1), solver="midpoint",
                           num_steps=2, schedule="logit_normal", schedule_params={"std": 3.0})
    torch.testing.assert_close(a.x1, b.x1)
    assert upsampler.upsample(lr_image=image, sampler=midpoint, num_steps=3).nfe == 6  # overrides on top
    with pytest.raises(ValueError, match="unknown sampler keys \\['steps'\\]"):
        upsampler.upsample(lr_image=image, steps=3)


@pytest.mark.parametrize("sampler, expected", [
    ({"solver": "euler", "num_steps": 2, "schedule": "linear"}, SamplerConfig(num_steps=2)),  # what training wrote
    ({"num_steps": 5}, SamplerConfig(num_steps=5)),  # missing keys: defaults
    ({"solver": "euler", "num_steps": 2, "schedule": "logit_normal", "schedule_params": {"std": 3, "mu": 1}},
     SamplerConfig("euler", 2, "logit_normal", (("mu", 1.0), ("std", 3.0)))),
    (None, SamplerConfig()),  # no "sampler" at all
])
def test_older_boost_config_files_load(tmp_path, sampler, expected):
    make_upsampler().save_pretrained(tmp_path)
    path = tmp_path / BOOST_CONFIG_NAME
    config = json.loads(path.read_text())
    if sampler is None:
        del config["sampler"]
    else:
        config["sampler"] = sampler
    path.write_text(json.dumps(config))
    loaded = Upsampler.from_pretrained(tmp_path)
    assert loaded.sampler == expected
    assert loaded.upsample(lr_image=torch.zeros(1, 3, 8, 8)).nfe == expected.num_steps


def test_latent_mode_accepts_latents_or_images(generator):
    upsampler = make_upsampler("bilinear")
    latent = torch.randn(1, 3, 4, 6, generator=generator)
    assert upsampler.upsample(lr_latent=latent).x1.shape == (1, 3, 8, 12)
    assert upsampler.upsample(lr_image=torch.zeros(1, 3, 4, 6)).x1.shape == (1, 3, 8, 12)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an fmboost upsampler folder"):
        Upsampler.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="sampler must be a SamplerConfig"):
        Upsampler(None, IdentityAutoencoder(), CouplingFlowMatcher(), 2, {"num_steps": 4})
    with pytest.raises(ValueError, match="needs lr_latent or lr_image"):
        make_upsampler().upsample()
