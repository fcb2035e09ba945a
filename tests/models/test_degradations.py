"""Degradations of the low-res input: bicubic (the default) and JPEG, deterministic and as documented."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from fmboost.models.consistency import downsample
from fmboost.models.degradations import BICUBIC, Degradation, to_8bit
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
    for bad in ("jpeg", "jpeg:0", "jpeg:96", "jpeg:x", "bicubic:3", "blur"):
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


def test_eval_sr_degrades_every_input_and_names_the_degradation(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    for name, image in load_sample_photos(["coffee", "chelsea"]).items():
        image.resize((128, 96), PIL.Image.LANCZOS).save(data / f"{name}.png")
    scores = {}
    for degradation in ("bicubic", "jpeg:20"):
        out = tmp_path / degradation.replace(":", "_")
        assert main(["eval-sr", "--data", str(data), "--first-stage", "identity", "--hr-size", "64", "--lr-size", "16",
                     "--baselines", "bicubic", "--no-fid", "--out", str(out), "--degradation", degradation]) == 0
        results = json.loads((out / "results.json").read_text())
        assert f"degradation {degradation};" in (out / "results.md").read_text()
        scores[degradation] = results["bicubic"]["psnr"]
    assert scores["jpeg:20"] < scores["bicubic"] - 0.3, scores  # bicubic up-sampling of a JPEG input is worse
    assert main(["eval-sr", "--data", str(data), "--first-stage", "identity", "--hr-size", "64", "--lr-size", "16",
                 "--out", str(tmp_path / "bad"), "--degradation", "jpeg:200"]) == 2  # a one-line user error
