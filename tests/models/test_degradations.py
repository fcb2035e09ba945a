"""Degradations of the low-res input: bicubic (the default) and JPEG, deterministic and as documented."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from fmboost.models.consistency import downsample
from fmboost.models.degradations import BICUBIC, SECOND_ORDER, Degradation, add_noise, blur, to_8bit
from fmboost.pipelines.cli import main
from fmboost.train.sample_photos import load_sample_photos


def photo(size: int = 256) -> torch.Tensor:
    """A real photo (scikit-image's astronaut) as (1, 3, size, size) in [-1, 1]."""
    image = load_sample_photos(["astronaut"])["astronaut"].resize((size, size), PIL.Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1


def block_edge_ratio(image: torch.Tensor) -> float:
    """Mean |horizontal + vertical step| across 8-px block boundaries over the mean step inside blocks: ≈ 1 for a
    natural image, above 1 where JPEG's 8 × 8 blocks show."""
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs().mean(dim=(0, 1, 2))  # step between columns x and x + 1
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    steps = torch.cat([dx, dy])
    boundary = torch.cat([torch.arange(dx.numel()) % 8 == 7, torch.arange(dy.numel()) % 8 == 7])
    return float(steps[boundary].mean() / steps[~boundary].mean())


def test_parse_and_name_round_trip_and_bad_names_are_refused():
    assert Degradation.parse("bicubic") == BICUBIC and str(BICUBIC) == "bicubic"
    assert Degradation.parse("jpeg:75") == Degradation("jpeg", 75) and str(Degradation("jpeg", 75)) == "jpeg:75"
    assert str(Degradation.parse("second-order")) == "second-order" and Degradation.parse("second-order").seeded
    for bad in ("jpeg", "jpeg:0", "jpeg:96", "jpeg:x", "bicubic:3", "blur", "second-order:2"):
        with pytest.raises(ValueError, match="degradation"):
            Degradation.parse(bad)


def test_bicubic_is_the_antialiased_reduction_on_8_bit_levels():
    hr = photo(64)
    lr = BICUBIC(hr, (16, 16))
    torch.testing.assert_close(lr, to_8bit(downsample(hr, (16, 16))), rtol=0, atol=0)
    torch.testing.assert_close(lr, to_8bit(lr), rtol=0, atol=0)


def test_jpeg_is_deterministic_and_adds_8_pixel_blocks_growing_with_compression():
    hr = photo(512)
    clean = BICUBIC(hr, (128, 128))
    ratios = {}
    for quality in (90, 30, 10):
        degraded = Degradation("jpeg", quality)(hr, (128, 128))
        torch.testing.assert_close(degraded, Degradation("jpeg", quality)(hr, (128, 128)), rtol=0, atol=0)
        assert degraded.shape == clean.shape and (degraded - clean).abs().mean() > 1e-3
        torch.testing.assert_close(degraded, to_8bit(degraded), rtol=0, atol=0)
        ratios[quality] = block_edge_ratio(degraded)
    assert block_edge_ratio(clean) < 1.1  # no block structure without JPEG
    assert ratios[10] > ratios[30] > 1.1 and ratios[10] > 1.3, ratios


def test_second_order_is_deterministic_per_seed_and_needs_one_seed_per_image():
    hr = photo(128).repeat(3, 1, 1, 1)
    second_order = Degradation("second-order")
    lr = second_order(hr, (32, 32), seeds=[5, 6, 7])
    assert lr.shape == (3, 3, 32, 32)
    torch.testing.assert_close(lr, to_8bit(lr), rtol=0, atol=0)  # what an 8-bit file holds
    torch.testing.assert_close(lr[1:2], second_order(hr[:1], (32, 32), seeds=[6]), rtol=0, atol=0)
    assert min((lr[i] - lr[j]).abs().mean() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-2  # other seeds, other draws
    clean = BICUBIC(hr[:1], (32, 32))
    assert all((image - clean[0]).abs().mean() > 0.02 for image in lr)  # degraded well beyond the 8-bit rounding
    for seeds in (None, [1, 2]):
        with pytest.raises(ValueError, match="needs one seed per image"):
            second_order(hr, (32, 32), seeds=seeds)


def test_second_order_ends_with_8_pixel_jpeg_blocks():
    hr = photo(512)
    ratios = [block_edge_ratio(Degradation("second-order")(hr, (128, 128), seeds=[seed])) for seed in range(8)]
    assert sum(ratios) / len(ratios) > 1.1, ratios  # the last stage's JPEG, at quality 30–95


def test_blur_width_is_the_documented_sigma():
    """The blur of an impulse is the kernel: its spread along each axis is the σ it was asked for."""
    impulse = torch.zeros(3, 41, 41)
    impulse[:, 20, 20] = 1
    widest = SECOND_ORDER[0].blur_sigma[1]  # (σ under ~0.5 px samples to nearly an impulse on the pixel grid)
    for sigma_y, sigma_x in ((0.8, 0.8), (1.5, 2.5), (widest, widest)):
        kernel = blur(impulse, (sigma_y, sigma_x))[0]
        offsets = torch.arange(41.0) - 20
        spread_y = ((kernel.sum(1) * offsets ** 2).sum() / kernel.sum()).sqrt()
        spread_x = ((kernel.sum(0) * offsets ** 2).sum() / kernel.sum()).sqrt()
        assert abs(spread_y - sigma_y) < 0.05 * sigma_y + 0.02 and abs(spread_x - sigma_x) < 0.05 * sigma_x + 0.02
        assert abs(kernel.sum() - 1) < 1e-4  # blurring keeps the mean brightness


def test_noise_level_is_the_documented_sigma():
    grey = torch.full((3, 128, 128), 0.5)
    generator = torch.Generator().manual_seed(0)
    for sigma in (1 / 255, 10 / 255, 30 / 255):
        noise = add_noise(grey, generator, sigma=sigma) - grey
        assert abs(noise.std() / sigma - 1) < 0.03 and abs(noise.mean()) < sigma / 20
    shared = add_noise(grey, generator, sigma=0.1, grey=True) - grey
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[1], shared[2])
    for level, scale in ((0.2, 1.0), (0.8, 2.5)):
        shot = add_noise(torch.full((3, 128, 128), level), generator, poisson_scale=scale) - level
        expected = scale * (level * 255) ** 0.5 / 255  # Poisson: variance = mean count, in 8-bit counts
        assert abs(shot.std() / expected - 1) < 0.05


def test_eval_sr_degrades_every_input_and_names_the_degradation(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    for name, image in load_sample_photos(["coffee", "chelsea"]).items():
        image.resize((128, 96), PIL.Image.LANCZOS).save(data / f"{name}.png")
    scores = {}
    for degradation in ("bicubic", "jpeg:20", "second-order"):
        out = tmp_path / degradation.replace(":", "_")
        assert main(["eval-sr", "--data", str(data), "--first-stage", "identity", "--hr-size", "64", "--lr-size", "16",
                     "--baselines", "bicubic", "--no-fid", "-o", str(out), "--degradation", degradation]) == 0
        results = json.loads((out / "results.json").read_text())
        assert f"degradation {degradation};" in (out / "results.md").read_text()
        scores[degradation] = results["bicubic"]["psnr"]
    assert scores["jpeg:20"] < scores["bicubic"] - 0.3, scores  # bicubic up-sampling of a JPEG input is worse
    assert scores["second-order"] < scores["bicubic"] - 0.3, scores
    assert main(["eval-sr", "--data", str(data), "--first-stage", "identity", "--hr-size", "64", "--lr-size", "16",
                 "-o", str(tmp_path / "bad"), "--degradation", "jpeg:200"]) == 2  # a one-line user error
