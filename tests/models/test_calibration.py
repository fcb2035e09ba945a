"""`fmboost.models.calibration`: back-projection steps and the dial fitted on the render path's drafts (tiny random
upsamplers in pixel space)."""

import warnings

import pytest
import torch
from fmboost.models.calibration import BACK_PROJECT_TOLERANCE_DB, calibrate, describe, fit_calibration
from fmboost.models.consistency import downsample


def pairs(count: int = 2, size: int = 16, scale: int = 2, seed: int = 0):
    """(lr, hr) pairs in [-1, 1]: smooth high-res images and their antialiased bicubic down-sampling."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        coarse = torch.rand(1, 3, size // 4, size // 4, generator=generator) * 1.6 - 0.8
        hr = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        hr = hr.clamp(-1, 1)
        out.append((downsample(hr, (size // scale, size // scale)), hr))
    return out


def kept_rule_holds(result, candidates):
    best = max(result.psnr.values())
    within = [n for n in candidates if result.psnr[n] >= best - BACK_PROJECT_TOLERANCE_DB]
    return result.back_project == min(within)


def test_calibrate_fits_back_projection_and_the_dial_and_applies_them(make_regression, make_posterior_mean):
    upsampler = make_posterior_mean(make_regression())
    upsampler.sampler = upsampler.sampler.replace(detail=0.5)
    data = pairs()
    result = calibrate(upsampler, data, seed=3, candidates=(0, 1, 3), edges=(1.0,))
    assert result.images == 2 and set(result.psnr) == {0, 1, 3} and result.lpips == {}
    assert kept_rule_holds(result, (0, 1, 3))
    assert result.psnr[3] > result.psnr[0]  # an untrained flow drifts: back-projection pays
    assert upsampler.sampler.back_project == result.back_project > 0 and upsampler.sampler.detail == 0.5
    calibration = upsampler.detail_calibration
    assert calibration is result.calibration and calibration.edges == (1.0,) and calibration.spans is None
    assert (calibration.sampler, calibration.back_project) == (upsampler.sampler.format(), result.back_project)
    assert result.fit.images == 2 and result.bands is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the dial now matches the folder's own setting
        image = upsampler.upscale(data[0][0], torch.Generator().manual_seed(3)).image
    assert image.shape == data[0][1].shape
    text = describe(result, upsampler.scale)
    assert text.count("band [") == 2 and f"{result.back_project}: " in text and "(kept)" in text


def test_calibrate_scores_what_upscale_makes(make_regression):
    """The PSNR per step count is the mean over the pairs of `upscale`'s own images (same seeds)."""
    r = make_regression()
    data = pairs(count=2)
    result = calibrate(r, data, seed=7, candidates=(0, 2))
    assert result.calibration is None and result.fit is None  # a regression upsampler has no dial
    for steps in (0, 2):
        psnr = 0.0
        for index, (lr, hr) in enumerate(data):
            image = r.upscale(lr, torch.Generator().manual_seed(7 + index), back_project=steps).image
            psnr += (10 * torch.log10(4 / (image - hr).square().mean())).item() / len(data)
        assert result.psnr[steps] == pytest.approx(psnr, abs=0.02)  # drafts are kept in half precision
    assert r.sampler.back_project == result.back_project and kept_rule_holds(result, (0, 2))
    assert describe(result, r.scale).count("\n") == 0


class OppositeOfFidelity(torch.nn.Module):
    """A stand-in perceptual distance that rises as an image gets closer to its target: what LPIPS does when
    back-projection copies a degraded input's noise and blocks back into the image."""

    def __init__(self):
        super().__init__()
        self.device_anchor = torch.nn.Parameter(torch.zeros(()))  # calibration finds the device by a parameter

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -(pred - target).abs().mean(dim=(1, 2, 3))


def test_back_projection_that_raises_lpips_is_not_kept(make_regression):
    r = make_regression()
    data = pairs(count=2, size=32)
    by_psnr = calibrate(r, data, seed=1, candidates=(0, 1, 2))
    assert by_psnr.back_project > 0 and by_psnr.psnr[by_psnr.back_project] > by_psnr.psnr[0]
    result = calibrate(r, data, seed=1, candidates=(0, 1, 2), lpips=OppositeOfFidelity())
    assert result.psnr == pytest.approx(by_psnr.psnr) and result.lpips[by_psnr.back_project] > result.lpips[0]
    assert result.back_project == 0 and r.sampler.back_project == 0  # better PSNR, worse LPIPS: not kept


def test_calibrate_refuses_nothing_to_fit(make_regression):
    with pytest.raises(ValueError, match="no images"):
        calibrate(make_regression(), [])
    with pytest.raises(ValueError, match="candidates"):
        calibrate(make_regression(), pairs(1), candidates=(0, -1))


def test_fit_calibration_leaves_the_upsampler_alone_and_apply_gives_the_calibrated_one(make_regression,
                                                                                     make_posterior_mean):
    upsampler = make_posterior_mean(make_regression())
    before = (upsampler.sampler, upsampler.detail_calibration)
    data = pairs()
    result = fit_calibration(upsampler, data, seed=3, candidates=(0, 1, 3), edges=(1.0,))
    assert (upsampler.sampler, upsampler.detail_calibration) == before  # measured, not changed
    assert result.sampler == before[0].replace(back_project=result.back_project, anchor=result.anchor)
    calibrated = result.apply(upsampler)
    assert calibrated is not upsampler and calibrated.model is upsampler.model
    assert calibrated.sampler == result.sampler and calibrated.detail_calibration is result.calibration
    assert result.calibration.fitted_for(result.sampler.format(), result.back_project)
    with pytest.warns(DeprecationWarning, match="fit_calibration"):
        old = calibrate(upsampler, data, seed=3, candidates=(0, 1, 3), edges=(1.0,))
    assert old.sampler == result.sampler and upsampler.sampler == calibrated.sampler
    assert upsampler.detail_calibration == calibrated.detail_calibration


def test_a_regression_upsampler_keeps_its_setting_but_back_projection(make_regression):
    r = make_regression()
    result = fit_calibration(r, pairs(count=2), seed=7, candidates=(0, 2))
    assert result.calibration is None and result.apply(r).detail_calibration is None
    assert result.apply(r).sampler == r.sampler.replace(back_project=result.back_project)
