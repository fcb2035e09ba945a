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
    fit_spans,
)

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


def test_the_one_band_dial_is_the_straight_line_from_the_estimate_to_the_sample(generator):
    uniform = DetailCalibration.uniform()
    assert uniform.bands == 1 and uniform.edges == () and uniform.weights == (0.0,)
    estimate = torch.rand(2, 3, 16, 24, generator=generator) * 2 - 1
    sample = estimate + 0.4 * torch.randn(2, 3, 16, 24, generator=generator)
    for detail in (0.0, 0.25, 0.7, 1.0):
        assert uniform.gains(detail).tolist() == [detail]
        torch.testing.assert_close(uniform.combine(estimate, sample, detail, SCALE),
                                   estimate + detail * (sample - estimate))
    assert DetailCalibration.from_dict(uniform.to_dict()) == uniform


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
                                            "start < end"),
                                           ({"edges": [1.0], "weights": [0] * 4, "samples": 2}, "two samples"),
                                           ({"edges": [1.0], "weights": [0, 0], "back_project": -1}, "back_project"),
                                           ({"edges": [1.0], "weights": [0, 0], "back_project": 1.5},
                                            "back_project")])
def test_bad_calibrations_name_the_problem(config, match):
    with pytest.raises(ValueError, match=match):
        DetailCalibration.from_dict(config)


def test_calibrated_upsampler_renders_the_dial_in_pixels_and_round_trips(tmp_path, generator, make_regression,
                                                                        make_posterior_mean):
    calibration = DetailCalibration((1.0,), (0.0, 1.0), sampler="euler:linear:3", back_project=0)
    plain = make_posterior_mean(make_regression())
    calibrated = make_posterior_mean(make_regression())
    calibrated.detail_calibration = calibration
    calibrated.save_pretrained(tmp_path / "pm")
    assert json.loads((tmp_path / "pm" / BOOST_CONFIG_NAME).read_text())["detail_calibration"] == {
        "edges": [1.0], "weights": [0.0, 1.0], "sampler": "euler:linear:3", "back_project": 0}
    loaded = Upsampler.from_pretrained(tmp_path / "pm")
    assert loaded.detail_calibration == calibration and loaded.dial == calibration
    image = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1

    def render(upsampler, detail):
        return upsampler.upscale(image, torch.Generator().manual_seed(5), detail=detail)

    full = render(plain, 1.0)
    torch.testing.assert_close(render(loaded, 1.0).image, full.image)  # detail 1: the sample itself
    draft = plain.draft(image, torch.Generator().manual_seed(5))
    torch.testing.assert_close(draft.sample, full.image)
    for detail in (0.0, 0.5):
        got = render(loaded, detail)
        assert got.nfe == full.nfe and got.image.shape == (1, 3, 32, 32)  # band 1 keeps the flow's detail: it runs
        expected = calibration.combine(draft.estimate, draft.sample, detail, plain.scale).clamp(-1, 1)
        torch.testing.assert_close(got.image, expected)
    assert not torch.allclose(got.image, render(plain, 0.5).image)  # not the one-band dial
    with pytest.raises(ValueError, match="detail_calibration needs a posterior-mean flow"):
        Upsampler(make_regression().model, plain.first_stage, make_regression().flow, scale=2,
                  detail_calibration=calibration)


def test_a_dial_that_keeps_nothing_at_detail_0_skips_the_flow(generator, make_regression, make_posterior_mean):
    upsampler = make_posterior_mean(make_regression())
    image = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    estimate = upsampler.upscale(image, detail=0.0)
    upsampler.detail_calibration = DetailCalibration((1.0,), (0.0, 0.0))
    result = upsampler.upscale(image, detail=0.0)
    assert result.nfe == estimate.nfe == 1 and torch.equal(result.image, estimate.image)
    upsampler.detail_calibration = DetailCalibration((1.0,), (0.0, 0.3))
    assert upsampler.upscale(image, torch.Generator().manual_seed(0), detail=0.0).nfe == 1 + 3


def test_a_dial_records_what_it_was_fitted_with():
    calibration = DetailCalibration((1.0,), (0.0, 0.5), sampler="euler:linear:4", back_project=2)
    assert calibration.fitted_for("euler:linear:4", 2)
    assert not calibration.fitted_for("euler:linear:8", 2) and not calibration.fitted_for("euler:linear:4", 0)
    assert DetailCalibration((1.0,), (0.0, 0.5)).fitted_for("dopri5", 8)  # unknown (older folders): any
    assert DetailCalibration((1.0,), (0.0, 0.5), sampler="euler:linear:4").fitted_for("euler:linear:4", 3)
    assert DetailCalibration.from_dict(calibration.to_dict()) == calibration


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
