import math

import pytest
import torch
from fmboost.models import (
    CFMUNet,
    CouplingFlowMatcher,
    IdentityAutoencoder,
    cosine_alpha_bar,
    interpolate,
    noise_augment,
    sample_time,
    target_velocity,
    upsample_latent,
)


def test_cosine_alpha_bar_matches_the_reference_noise_level():
    assert cosine_alpha_bar(400) == pytest.approx(0.6545, abs=1e-4)
    assert cosine_alpha_bar(0) == 1.0
    assert cosine_alpha_bar(400, offset=0.008) == pytest.approx(0.6475, abs=1e-4)
    with pytest.raises(ValueError, match="noising_step"):
        cosine_alpha_bar(1001)


def test_noise_augmented_source_has_the_statistics_of_q(generator):
    cond = torch.full((64, 4, 16, 16), 2.0)
    fm = CouplingFlowMatcher(upsample="bilinear", noising_step=400)
    batch = fm.couple(cond, generator=generator)
    a = fm.alpha_bar
    assert batch.x0.mean().item() == pytest.approx(math.sqrt(a) * 2.0, abs=0.01)
    assert batch.x0.std().item() == pytest.approx(math.sqrt(1 - a), abs=0.01)
    assert torch.equal(batch.cond, cond)  # the conditioning stays clean
    assert CouplingFlowMatcher(noise_sigma=0.5).alpha_bar == pytest.approx(0.75)
    assert torch.equal(noise_augment(cond, 1.0), cond)


def test_noise_source_ignores_the_conditioning(generator):
    cond = torch.full((16, 4, 8, 8), 5.0)
    x0 = CouplingFlowMatcher(source="noise").couple(cond, generator=generator).x0
    assert abs(x0.mean().item()) < 0.05 and x0.std().item() == pytest.approx(1.0, abs=0.05)


def test_latent_upsampling_modes_and_shapes(generator):
    lr = torch.randn(2, 4, 8, 8, generator=generator)
    for mode in ("bilinear", "bicubic", "nearest"):
        up = upsample_latent(lr, (32, 32), mode)
        assert up.shape == (2, 4, 32, 32)
    assert torch.equal(upsample_latent(lr, (16, 16), "nearest")[:, :, ::2, ::2], lr)
    # Given only the image, latent modes encode it first (identity first stage: the image itself).
    image = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    torch.testing.assert_close(upsample_latent(None, (16, 16), "bilinear", IdentityAutoencoder(), lr_image=image),
                               upsample_latent(image, (16, 16), "bilinear"))
    with pytest.raises(ValueError, match="upsample mode must be one of"):
        upsample_latent(lr, (16, 16), "lanczos")
    with pytest.raises(ValueError, match="multiple of the low-res size"):
        upsample_latent(lr, (20, 20), "bilinear")
    with pytest.raises(ValueError, match="needs first_stage"):
        upsample_latent(lr, (16, 16), "psu")


def test_psu_in_pixel_space_is_bicubic_resizing(generator):
    image = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    up = upsample_latent(None, (16, 16), "psu", IdentityAutoencoder(), lr_image=image)
    expected = torch.nn.functional.interpolate(image, size=(16, 16), mode="bicubic", align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(up, expected)
    # Without the image, PSU decodes the low-res latent (identity here), giving the same result.
    torch.testing.assert_close(upsample_latent(image, (16, 16), "psu", IdentityAutoencoder()), expected)


def test_path_and_velocity():
    x0, x1 = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t = torch.tensor([0.0, 0.25])
    xt = interpolate(x0, x1, t)
    assert torch.equal(xt[0], x0[0]) and torch.allclose(xt[1], torch.full((1, 2, 2), 0.25))
    assert torch.equal(target_velocity(x0, x1), x1 - x0)
    # σ_min > 0: x_1 is reached exactly and x_t stays σ_min-wide around x1 at t = 1.
    assert torch.allclose(interpolate(x1, x1 * 3, torch.ones(2), sigma_min=0.1), 3 * x1 + 0.1 * x1)


def test_time_sampling(generator):
    u = sample_time(10000, "uniform", generator=generator)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    ln = sample_time(10000, "logit_normal", mu=1.0, generator=generator)
    assert abs(torch.logit(ln).mean() - 1.0) < 0.05
    with pytest.raises(ValueError, match="time_sampling must be one of"):
        sample_time(4, "beta")


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="upsample must be one of"):
        CouplingFlowMatcher(upsample="area")
    with pytest.raises(ValueError, match="objective must be one of"):
        CouplingFlowMatcher(objective="gan")
    with pytest.raises(ValueError, match="unknown CouplingFlowMatcher keys"):
        CouplingFlowMatcher.from_dict({"upsampel": "psu"})
    with pytest.raises(ValueError, match="lr_latent contains NaN"):
        CouplingFlowMatcher(upsample="bilinear").condition(torch.full((1, 4, 2, 2), float("nan")), (4, 4))
    fm = CouplingFlowMatcher(upsample="bicubic", noising_step=300, time_sampling="logit_normal")
    assert CouplingFlowMatcher.from_dict(fm.to_dict()) == fm


def test_older_flow_dicts_drop_the_latent_dial_and_refuse_end_time():
    fm = CouplingFlowMatcher(source="posterior_mean", posterior_mean_sigma=0.2)
    assert "dial" not in fm.to_dict()
    assert CouplingFlowMatcher.from_dict({**fm.to_dict(), "dial": "blend"}) == fm  # what older folders wrote
    with pytest.raises(ValueError, match="dial 'end_time' is no longer supported"):
        CouplingFlowMatcher.from_dict({**fm.to_dict(), "dial": "end_time"})
    with pytest.raises(TypeError):
        CouplingFlowMatcher(dial="blend")  # not a field any more


def test_loss_and_sampling_for_both_objectives(generator):
    net = CFMUNet.from_preset("tiny", latent_channels=4)
    cond = torch.randn(2, 4, 8, 8, generator=generator)
    x1 = torch.randn(2, 4, 8, 8, generator=generator)
    for objective in ("cfm", "regression"):
        fm = CouplingFlowMatcher(upsample="bilinear", objective=objective)
        loss = fm.loss(net, x1, cond, generator)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
    regression = CouplingFlowMatcher(objective="regression").sample(net, cond)
    assert regression.nfe == 1
    torch.testing.assert_close(regression.x1, cond + net(cond, 0.0, cond))
    cfm = CouplingFlowMatcher().sample(net, cond, generator=torch.Generator().manual_seed(1), num_steps=3)
    again = CouplingFlowMatcher().sample(net, cond, generator=torch.Generator().manual_seed(1), num_steps=3)
    assert cfm.nfe == 3 and torch.equal(cfm.x1, again.x1)  # reproducible with a generator
    with pytest.raises(ValueError, match="same shape"):
        CouplingFlowMatcher().loss(net, x1, cond[:, :, :4, :4])
