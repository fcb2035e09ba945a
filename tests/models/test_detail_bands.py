"""The calibrated (per-band) fidelity dial: band arithmetic, the least-squares fit, and the Upsampler around it."""

import json
import math

import pytest
import torch
from fmboost.models import BOOST_CONFIG_NAME, Upsampler
from fmboost.models.detail_bands import (
    MIN_SPAN,
    DetailCalibration,
    DetailCalibrationFit,
    band_index,
    detail_components,
    fit_spans,
)

from .test_posterior_mean import pm_upsampler, regression_upsampler

SCALE = 4  # f_N = 0.125 cycles/px: edges (0.5, 1, 1.5, 2, 3) → 0.0625 … 0.375


def wave(cycles_per_px: float, size: int = 64) -> torch.Tensor:
    """(1, 3, size, size) vertical stripes of one frequency: a single band."""
    x = torch.arange(size, dtype=torch.float32)
    return torch.cos(2 * math.pi * cycles_per_px * x).expand(1, 3, size, size).clone()


def test_bands_follow_the_low_res_nyquist_frequency():
    bands = band_index(64, 64, SCALE, (0.5, 1.0, 1.5, 2.0, 3.0))
    assert bands[0, 0] == 0 and bands[0, 3] == 0 and bands[0, 4] == 1  # 1/16 cycles/px = f_N / 2: an edge opens a band
    assert bands[0, 5] == 1 and bands[0, 8] == 2 and bands[0, 16] == 4 and bands[0, 32] == 5
    assert bands[8, 1] == 2  # square rings: max(|f_y|, |f_x|)


def test_combine_scales_each_band_and_runs_from_the_calibrated_estimate_to_the_sample(generator):
    calibration = DetailCalibration(weights=(0.0, 0.0, 0.0, 0.0, 0.5, 0.5))
    estimate = torch.rand(1, 3, 64, 64, generator=generator)
    low, high = wave(2 / 64), wave(20 / 64)  # bands 0 and 4 (20/64 ≈ 0.31 cycles/px)
    sample = estimate + low + high
    interior = (..., slice(16, 48), slice(16, 48))
    for detail, expected in ((0.0, estimate + 0.5 * high), (0.5, estimate + 0.5 * low + 0.75 * high)):
        got = calibration.combine(estimate, sample, detail, SCALE)
        torch.testing.assert_close(got[interior], expected[interior], atol=0.03, rtol=0)
    torch.testing.assert_close(calibration.combine(estimate, sample, 1.0, SCALE), sample, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"detail must be in \[0, 1\]"):
        calibration.combine(estimate, sample, 1.5, SCALE)


def test_fit_recovers_the_share_of_the_detail_that_is_right(generator):
    """Truth = R + 0.5 · (the sample's high band) + noise the flow cannot know: w* ≈ 0.5 there, ≈ 0 below."""
    fit = DetailCalibrationFit(SCALE, (1.0,))
    for _ in range(4):
        estimate = torch.rand(1, 3, 64, 64, generator=generator)
        phase = torch.rand(2, generator=generator) * 6.28
        low = torch.cos(2 * math.pi * 4 / 64 * torch.arange(64.0) + phase[0]).expand(1, 3, 64, 64)
        high = torch.cos(2 * math.pi * 24 / 64 * torch.arange(64.0) + phase[1]).expand(1, 3, 64, 64)
        noise = 0.1 * torch.randn(1, 3, 64, 64, generator=generator)
        fit.update(estimate, estimate + low + high, estimate + 0.5 * high + noise)
    raw = fit.raw_weights()
    assert raw[0] == pytest.approx(0.0, abs=0.05) and raw[1] == pytest.approx(0.5, abs=0.05)
    assert fit.result().weights == pytest.approx((max(0.0, raw[0]), raw[1]))
    with pytest.raises(ValueError, match="no images"):
        DetailCalibrationFit(SCALE).result()


@pytest.mark.parametrize("config, match", [({"edges": [1.0, 0.5], "weights": [0, 0, 0]}, "increasing"),
                                           ({"edges": [1.0], "weights": [0.0]}, "needs 2 values"),
                                           ({"edges": [1.0], "weights": [0.0, 1.5]}, r"in \[0, 1\]"),
                                           ({"edges": [1.0], "weights": [0, 0], "gain": 2}, "unknown"),
                                           ({"edges": [1.0], "weights": [0, 0], "spans": [[0, 1]]}, "needs 2"),
                                           ({"edges": [1.0], "weights": [0, 0], "spans": [[0, 0.5], [0.5, 0.5]]},
                                            "start < end")])
def test_bad_calibrations_name_the_problem(config, match):
    with pytest.raises(ValueError, match=match):
        DetailCalibration.from_dict(config)


def test_calibrated_upsampler_renders_the_dial_in_pixels_and_round_trips(tmp_path, generator):
    calibration = DetailCalibration((1.0,), (0.0, 1.0))
    plain = pm_upsampler(regression_upsampler([0.0] * 3, [1.0] * 3))
    calibrated = pm_upsampler(regression_upsampler([0.0] * 3, [1.0] * 3))
    calibrated.detail_calibration = calibration
    calibrated.save_pretrained(tmp_path / "pm")
    assert json.loads((tmp_path / "pm" / BOOST_CONFIG_NAME).read_text())["detail_calibration"] == {
        "edges": [1.0], "weights": [0.0, 1.0]}
    loaded = Upsampler.from_pretrained(tmp_path / "pm")
    assert loaded.detail_calibration == calibration
    image = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
    cond = plain.condition(lr_image=image)

    def render(upsampler, detail):
        return upsampler.render(cond, torch.Generator().manual_seed(5), detail=detail)

    full = render(plain, 1.0)
    torch.testing.assert_close(render(loaded, 1.0).image, full.image)  # detail 1: the sample, one decode
    estimate = plain.first_stage.decode(plain.draw_source(cond).posterior_mean)
    for detail in (0.0, 0.5):
        got = render(loaded, detail)
        assert got.nfe == full.nfe  # the flow runs to the end at every detail
        torch.testing.assert_close(got.image, calibration.combine(estimate, full.image, detail, plain.scale))
    assert not torch.allclose(render(loaded, 0.5).image, render(plain, 0.5).image)  # not the latent blend
    upscaled = loaded.upscale(image, torch.Generator().manual_seed(5), detail=0.0)
    assert upscaled.image.shape == (1, 3, 32, 32) and upscaled.nfe == full.nfe
    with pytest.raises(ValueError, match="detail_calibration needs a posterior-mean flow"):
        Upsampler(regression_upsampler([0.0] * 3, [1.0] * 3).model, plain.first_stage,
                  regression_upsampler([0.0] * 3, [1.0] * 3).flow, scale=2, detail_calibration=calibration)


def test_spans_turn_the_bands_on_one_after_another_between_the_same_two_images(generator):
    calibration = DetailCalibration((1.0,), (0.2, 0.5), spans=((0.25, 1.0), (0.0, 0.25)))
    assert calibration.gains(0.0).tolist() == pytest.approx([0.2, 0.5])
    assert calibration.gains(0.125).tolist() == pytest.approx([0.2, 0.75])  # band 1 half-way, band 0 not started
    assert calibration.gains(0.625).tolist() == pytest.approx([0.6, 1.0])
    assert calibration.gains(1.0).tolist() == pytest.approx([1.0, 1.0])
    uniform = DetailCalibration((1.0,), (0.2, 0.5))
    estimate = torch.rand(1, 3, 32, 32, generator=generator)
    sample = estimate + 0.3 * torch.randn(1, 3, 32, 32, generator=generator)
    for detail in (0.0, 1.0):  # the endpoints do not depend on the path
        torch.testing.assert_close(calibration.combine(estimate, sample, detail, SCALE),
                                   uniform.combine(estimate, sample, detail, SCALE))
    assert DetailCalibration.from_dict(calibration.to_dict()) == calibration
    assert "spans" not in uniform.to_dict()


def test_fit_spans_puts_the_band_with_most_perceptual_gain_per_mse_first():
    """The flow invents a high-band texture of the truth's strength but the wrong phase (it costs MSE) and a
    low-band detail the truth lacks (it costs 4× more). A stand-in perceptual distance that compares the high
    band's strength only: the high band pays, the low one does not, so the high band comes first and the spans
    split [0, 1] by MSE cost."""
    calibration = DetailCalibration((1.0,), (0.0, 0.0))
    x = torch.arange(64.0)
    estimate = torch.zeros(1, 3, 64, 64)
    low, high = 0.2 * wave(4 / 64), 0.1 * wave(24 / 64)
    target = (0.1 * torch.sin(2 * math.pi * 24 / 64 * x)).expand(1, 3, 64, 64)

    def high_band_strength_gap(pred, target):
        return (torch.fft.fft2(pred)[..., 0, 24].abs() - torch.fft.fft2(target)[..., 0, 24].abs()).abs().mean(1)

    fitted, measured = fit_spans(calibration, [(estimate, estimate + low + high, target)], high_band_strength_gap,
                                 SCALE)
    assert abs(measured[0].perceptual_gain) < 0.01 * measured[1].perceptual_gain  # edge leakage only
    assert measured[0].mse_cost == pytest.approx(4 * measured[1].mse_cost, rel=0.1)
    (low_start, low_end), (high_start, high_end) = fitted.spans
    assert high_start == 0.0 and high_end == pytest.approx(low_start) and low_end == 1.0
    share = measured[1].mse_cost / (measured[0].mse_cost + measured[1].mse_cost)
    assert high_end == pytest.approx(share) and share == pytest.approx(0.2, abs=0.02) and share > MIN_SPAN
    seen = []
    fit_spans(calibration, [(estimate, estimate + low + high, target)] * 2, high_band_strength_gap, SCALE,
              post=lambda pred, index: seen.append(index) or pred)
    assert sorted(set(seen)) == [0, 1]  # post-processing sees which image it works on
    with pytest.raises(ValueError, match="no images"):
        fit_spans(calibration, [], high_band_strength_gap, SCALE)


def test_two_samples_split_the_detail_into_consistent_and_random_and_end_at_the_first_sample(generator):
    estimate = torch.rand(2, 3, 32, 32, generator=generator)
    first, second = (estimate + 0.3 * torch.randn(2, 3, 32, 32, generator=generator) for _ in range(2))
    consistent, random = detail_components(estimate, (first, second))
    torch.testing.assert_close(consistent, (first + second) / 2 - estimate)
    torch.testing.assert_close(consistent + random, first - estimate)
    calibration = DetailCalibration((1.0,), (0.4, 0.8, 0.0, 0.0), samples=2)
    assert calibration.bands == 2
    torch.testing.assert_close(calibration.combine(estimate, (first, second), 1.0, SCALE), first, atol=1e-5, rtol=0)
    one_sample = DetailCalibration((1.0,), (0.4, 0.8))  # the same shares on the mean of the two as one sample
    torch.testing.assert_close(calibration.combine(estimate, (first, second), 0.0, SCALE),
                               one_sample.combine(estimate, (first + second) / 2, 0.0, SCALE), atol=1e-5, rtol=0)
    assert DetailCalibration.from_dict(calibration.to_dict()) == calibration
    assert calibration.to_dict()["samples"] == 2 and "samples" not in one_sample.to_dict()
    with pytest.raises(ValueError, match="splits the detail over 2 sample"):
        calibration.combine(estimate, first, 0.5, SCALE)
    with pytest.raises(ValueError, match="takes 1 or 2 samples"):
        detail_components(estimate, (first, second, first))


@pytest.mark.parametrize("config, match", [({"edges": [1.0], "weights": [0, 0], "samples": 2}, "needs 4 values"),
                                           ({"edges": [1.0], "weights": [0, 0], "samples": 3}, "samples must be"),
                                           ({"edges": [1.0], "weights": [0] * 4, "samples": 2,
                                             "spans": [[0, 1]] * 2}, "needs 4")])
def test_bad_two_sample_calibrations_name_the_problem(config, match):
    with pytest.raises(ValueError, match=match):
        DetailCalibration.from_dict(config)


def test_two_sample_fit_weighs_the_consistent_detail_and_keeps_none_of_the_random(generator):
    """Truth = R + 0.5 · what both samples share (in the high band) + noise; each sample adds its own texture.
    The consistent detail's w* ≈ 0.5 where it is right, ≈ 0 where it is not; the random detail's w* is measured
    (≈ 0: it cannot predict the truth) and its share fixed at 0."""
    fit = DetailCalibrationFit(SCALE, (1.0,), samples=2)
    for _ in range(4):
        estimate = torch.rand(1, 3, 64, 64, generator=generator)
        phase = torch.rand(4, generator=generator) * 6.28
        shared = torch.cos(2 * math.pi * 24 / 64 * torch.arange(64.0) + phase[0]).expand(1, 3, 64, 64)
        invented = torch.cos(2 * math.pi * 4 / 64 * torch.arange(64.0) + phase[1]).expand(1, 3, 64, 64)
        own = [0.5 * torch.cos(2 * math.pi * f / 64 * torch.arange(64.0) + p).expand(1, 3, 64, 64)
               for f, p in ((20, phase[2]), (6, phase[3]))]
        noise = 0.1 * torch.randn(1, 3, 64, 64, generator=generator)
        fit.update(estimate, [estimate + shared + invented + own[0], estimate + shared + invented - own[1]],
                   estimate + 0.5 * shared + noise)
    raw = fit.raw_weights()
    assert len(raw) == 4 and raw[0] == pytest.approx(0.0, abs=0.05) and raw[1] == pytest.approx(0.5, abs=0.05)
    assert raw[2] == pytest.approx(0.0, abs=0.05) and raw[3] == pytest.approx(0.0, abs=0.05)
    result = fit.result()
    assert result.samples == 2 and result.weights[2:] == (0.0, 0.0)
    with pytest.raises(ValueError, match="splits the detail over 2 sample"):
        fit.update(estimate, estimate, estimate)


def test_upsampler_with_a_two_sample_dial_draws_two_sources_and_counts_both(tmp_path, generator):
    plain = pm_upsampler(regression_upsampler([0.0] * 3, [1.0] * 3))
    paired = pm_upsampler(regression_upsampler([0.0] * 3, [1.0] * 3))
    paired.detail_calibration = DetailCalibration((1.0,), (0.3, 0.6, 0.0, 0.0), samples=2)
    paired.save_pretrained(tmp_path / "pm")
    loaded = Upsampler.from_pretrained(tmp_path / "pm")
    assert loaded.detail_calibration == paired.detail_calibration
    image = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    cond = plain.condition(lr_image=image)
    one = plain.draw_source(cond, torch.Generator().manual_seed(5))
    two = plain.draw_source(cond, torch.Generator().manual_seed(5), samples=2)
    assert two.samples == 2 and two.inputs == 2 and two.x0.shape[0] == 4
    torch.testing.assert_close(two.x0[:2], one.x0)  # the first source is the 1-sample one
    assert not torch.allclose(two.x0[2:], one.x0)
    full = plain.render(cond, torch.Generator().manual_seed(5))
    per_input = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    listed = plain.draw_source(cond, per_input, samples=2)
    torch.testing.assert_close(listed.x0[:2], plain.draw_source(cond, [torch.Generator().manual_seed(5 + i)
                                                                         for i in range(2)]).x0)
    torch.testing.assert_close(loaded.render(cond, torch.Generator().manual_seed(5), detail=1.0).image, full.image)
    estimate, samples, result = loaded.estimate_and_sample(cond, torch.Generator().manual_seed(5))
    assert len(samples) == 2 and result.nfe == 2 * (full.nfe - 1) + 1  # both samples' steps, and R's pass
    torch.testing.assert_close(samples[0], full.image)
    for detail in (0.0, 0.5):
        got = loaded.render(cond, torch.Generator().manual_seed(5), detail=detail)
        assert got.nfe == result.nfe and got.latent.shape == full.latent.shape
        torch.testing.assert_close(got.image, loaded.detail_calibration.combine(estimate, samples, detail, 2))
    assert loaded.upscale(image, torch.Generator().manual_seed(5), detail=0.5).nfe == result.nfe
    with pytest.raises(ValueError, match="draw it with image_samples"):
        loaded.decode_sample(one, loaded.transport(one, loaded.image_sampler(loaded.sampler.replace(detail=0.5))),
                             loaded.sampler.replace(detail=0.5))
    with pytest.raises(ValueError, match="2 samples per input need a posterior-mean flow"):
        regression_upsampler([0.0] * 3, [1.0] * 3).draw_source(cond, samples=2)
    with pytest.raises(ValueError, match="samples must be ≥ 1, got 0"):
        plain.draw_source(cond, samples=0)
