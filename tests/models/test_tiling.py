"""Tiling: spans, blending weights, and `Upsampler.upscale` on any size, tiled or not (tiny random models)."""

import pytest
import torch
import torch.nn.functional as F
from fmboost.models import CFMUNet, CouplingFlowMatcher, IdentityAutoencoder, SamplerConfig, Upsampler
from fmboost.models.posterior_mean import PosteriorMean
from fmboost.models.tiling import Tiling


@pytest.mark.parametrize("length", [4, 16, 22, 40, 64])
def test_spans_cover_the_canvas_with_aligned_overlapping_tiles(length):
    tiling = Tiling(size=16, overlap=6, align=2)
    spans = tiling.spans(length)
    assert spans[0][0] == 0 and spans[-1][1] == length
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 - b0 >= 6 and b0 > a0 and b0 % 2 == 0  # overlap at least 6, strictly advancing, aligned
    assert all(b - a == min(16, length) for a, b in spans)


def test_bad_tilings_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        Tiling(size=6, overlap=2, align=4)
    with pytest.raises(ValueError, match="overlap"):
        Tiling(size=8, overlap=8)


@pytest.mark.parametrize("in_scale,out_scale", [(1, 1), (4, 1), (1, 4)])
def test_blending_reproduces_a_local_function_exactly(in_scale, out_scale):
    """Weights are normalised, so any function that does not look across tiles is reproduced exactly."""
    x = torch.randn(2, 3, 40 * in_scale, 28 * in_scale)

    def fn(t):  # pointwise, with the scale change
        t = F.avg_pool2d(t, in_scale) if in_scale > 1 else t
        return F.interpolate(t.tanh(), scale_factor=out_scale, mode="nearest")

    tiling = Tiling(size=12, overlap=4, align=2)
    torch.testing.assert_close(tiling.apply(fn, x, in_scale=in_scale, out_scale=out_scale), fn(x))
    assert tiling.count(40, 28) == len(tiling.spans(40)) * len(tiling.spans(28)) > 1


def test_weights_are_a_raised_cosine_partition_of_unity():
    spans = Tiling(size=8, overlap=4).spans(12)  # [(0, 8), (4, 12)]: overlap [4, 8)
    first, second = (Tiling._ramp(spans, i, 1, "cpu", torch.float64) for i in (0, 1))
    torch.testing.assert_close(first[4:] + second[:4], torch.ones(4, dtype=torch.float64))
    assert first[:4].eq(1).all() and first[-1] < 0.05 and (first[4:].diff() < 0).all()  # smooth fall to ~0


def make_upsampler(objective="cfm", source="coupling", seed=0, **flow):
    torch.manual_seed(seed)
    model = CFMUNet.from_preset("tiny", latent_channels=3).eval()
    posterior_mean = None
    if source == "posterior_mean":
        posterior_mean = PosteriorMean.from_upsampler(make_upsampler("regression", seed=seed + 1))
    return Upsampler(model, IdentityAutoencoder(), CouplingFlowMatcher(objective=objective, source=source, **flow),
                     scale=4, sampler=SamplerConfig(num_steps=2), posterior_mean=posterior_mean)


def test_upscale_any_size_tiled_or_not():
    upsampler = make_upsampler()
    image = torch.rand(1, 3, 13, 19) * 2 - 1  # odd sizes: padded, run, cropped back
    whole = upsampler.upscale(image, torch.Generator().manual_seed(0), tile_size=0)
    tiled = upsampler.upscale(image, torch.Generator().manual_seed(0), tile_size=32, tile_overlap=8)
    assert whole.image.shape == tiled.image.shape == (1, 3, 52, 76)
    assert whole.tiles == 1 and tiled.tiles > 1 and whole.nfe == tiled.nfe == 2
    assert whole.image.abs().max() <= 1 and not torch.equal(whole.image, tiled.image)
    assert upsampler.tiling((52, 76)) is None and upsampler.tiling((52, 2048)).size == 1024  # auto above 1024 px


def test_tiles_share_the_noise_of_one_canvas():
    """A flow whose velocity is zero returns its source: tiled equals untiled exactly only if the source noise
    is drawn once for the whole canvas (not per tile)."""
    upsampler = make_upsampler(upsample="bicubic")
    torch.nn.init.zeros_(upsampler.model.unet.conv_out.weight)
    torch.nn.init.zeros_(upsampler.model.unet.conv_out.bias)
    image = torch.rand(2, 3, 10, 14) * 2 - 1
    whole = upsampler.upscale(image, torch.Generator().manual_seed(0), tile_size=0).image
    tiled = upsampler.upscale(image, torch.Generator().manual_seed(0), tile_size=16, tile_overlap=8)
    assert tiled.tiles > 1
    torch.testing.assert_close(tiled.image, whole)


def test_posterior_mean_source_and_detail_dial_per_tile():
    upsampler = make_upsampler(source="posterior_mean", upsample="bicubic")
    image = torch.rand(1, 3, 9, 11) * 2 - 1
    estimate = upsampler.upscale(image, tile_size=16, tile_overlap=8, detail=0.0)
    sample = upsampler.upscale(image, torch.Generator().manual_seed(0), tile_size=16, tile_overlap=8)
    assert estimate.tiles > 1 and estimate.nfe == 1 and sample.nfe == 3  # R's pass counted once per sample
    # detail 0 is R(cond) itself: the regression upsampler R, tiled alike
    regression = Upsampler(upsampler.posterior_mean.model, IdentityAutoencoder(),
                           CouplingFlowMatcher(objective="regression", upsample="bicubic"), scale=4)
    torch.testing.assert_close(estimate.image, regression.upscale(image, tile_size=16, tile_overlap=8).image)
    assert not torch.equal(estimate.image, sample.image)
