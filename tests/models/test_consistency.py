"""Low-res back-projection: consistency with the input, detail kept, errors on bad shapes."""

import pytest
import torch
import torch.nn.functional as F
from fmboost.models.consistency import back_project, downsample


def smooth_image(generator, size=64):
    """A band-limited image in [-0.8, 0.8]: its bicubic up-/down-sampling round trip is well behaved."""
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=generator) * 1.6 - 0.8
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-0.8, 0.8)


def test_back_projection_restores_low_frequencies_and_keeps_detail(generator):
    truth = smooth_image(generator)
    lr = downsample(truth, (16, 16))
    detail = 0.1 * torch.randn(truth.shape, generator=generator)
    detail = detail - F.interpolate(downsample(detail, (16, 16)), size=(64, 64), mode="bicubic", align_corners=False)
    drifted = truth + 0.2 + detail  # a brightness drift (low frequency) on top of added high-frequency detail
    fixed = back_project(drifted, lr, iterations=3)
    before = (downsample(drifted, (16, 16)) - lr).abs().mean()
    after = (downsample(fixed, (16, 16)) - lr).abs().mean()
    assert after < 0.1 * before
    assert (fixed - truth).pow(2).mean() < 0.5 * (drifted - truth).pow(2).mean()
    high = lambda x: x - F.interpolate(downsample(x, (16, 16)), size=(64, 64), mode="bicubic", align_corners=False)
    kept = F.cosine_similarity(high(fixed).flatten(), high(drifted).flatten(), dim=0)
    assert kept > 0.9  # the correction is band-limited: the detail survives


def test_zero_iterations_is_identity_and_output_is_clamped(generator):
    image = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    lr = downsample(image, (8, 8))
    torch.testing.assert_close(back_project(image, lr, 0), image)
    out = back_project(image, torch.ones_like(lr), 2)
    assert out.shape == image.shape and out.max() <= 1 and out.min() >= -1


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="multiple"):
        back_project(torch.zeros(1, 3, 30, 30), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        back_project(torch.zeros(3, 32, 32), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="iterations"):
        back_project(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 8, 8), -1)
