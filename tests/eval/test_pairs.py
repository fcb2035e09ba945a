import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fmboost.eval.pairs import iter_pairs, list_images, load_image, make_pair, resize, square_crop, to_8bit
from PIL import Image


def write_images(folder, sizes, seed=0):
    """Random RGB PNGs of the given (height, width) sizes, named im0.png, im1.png, …"""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (height, width) in enumerate(sizes):
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_pair_sizes_range_and_antialiased_lr(generator):
    image = torch.rand(3, 90, 70, generator=generator) * 2 - 1
    pair = make_pair(image, hr_size=64, lr_size=16)
    assert pair.hr.shape == (3, 64, 64) and pair.lr.shape == (3, 16, 16)
    assert pair.hr.min() >= -1 and pair.hr.max() <= 1
    # antialiased: close to 4×4 block averages of hr, unlike plain (aliasing) bicubic sampling
    area = F.avg_pool2d(pair.hr[None], 4)[0]
    aliased = F.interpolate(pair.hr[None], size=(16, 16), mode="bicubic", align_corners=False)[0]
    assert (pair.lr - area).abs().mean() < 0.5 * (aliased - area).abs().mean()


def test_pairs_are_on_8_bit_levels_as_image_files_hold_them(generator, tmp_path):
    image = torch.rand(3, 90, 70, generator=generator) * 2 - 1
    pair = make_pair(image, hr_size=64, lr_size=16)
    for x in (pair.hr, pair.lr):
        levels = (x + 1) * 127.5
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    torch.testing.assert_close(pair.lr, to_8bit(resize(pair.hr, (16, 16))), rtol=0, atol=0)  # hr ↓, then rounded
    torch.testing.assert_close(to_8bit(pair.lr), pair.lr, rtol=0, atol=0)
    # lr written as a PNG reads back as lr exactly: a saved input reproduces what the methods were given
    Image.fromarray(((pair.lr + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / "lr.png")
    assert torch.equal(load_image(tmp_path / "lr.png"), pair.lr)


def test_resize_keeps_the_whole_image_and_center_crop_is_centered():
    # a 64 × 128 image: resize makes the shorter side 32, the center crop keeps the middle half of the width
    image = torch.zeros(3, 64, 128)
    image[:, :, 32:96] = 1.0
    pair = make_pair(image, hr_size=32, lr_size=8)
    assert pair.hr.shape == (3, 32, 32)
    assert pair.hr[:, :, 2:-2].min() > 0.9  # the bright middle only
    no_resize = make_pair(image, hr_size=32, lr_size=8, resize_image=False)
    torch.testing.assert_close(no_resize.hr, image[:, 16:48, 48:80])


def test_random_crop_is_deterministic_per_seed():
    image = torch.linspace(-1, 1, 3 * 100 * 100).view(3, 100, 100)
    crop = lambda seed: square_crop(image, 40, "random", torch.Generator().manual_seed(seed))
    torch.testing.assert_close(crop(1), crop(1))
    assert not torch.equal(crop(1), crop(2))


def test_iter_pairs_reads_folders_in_order_and_seeds_crops(tmp_path):
    folder = write_images(tmp_path / "a", [(80, 80), (70, 90), (64, 64)])
    pairs = list(iter_pairs([folder], hr_size=32, lr_size=8, crop="random", resize_image=False, seed=5))
    again = list(iter_pairs([folder], hr_size=32, lr_size=8, crop="random", resize_image=False, seed=5))
    assert [p.name for p in pairs] == ["im0", "im1", "im2"]
    for a, b in zip(pairs, again):
        torch.testing.assert_close(a.hr, b.hr)
    assert len(list(iter_pairs([folder], 32, 8, max_images=2))) == 2
    # image i's crop is drawn from a generator seeded with seed + i (im0: seed 5)
    image = load_image(folder / "im0.png")
    expected = square_crop(image, 32, "random", torch.Generator().manual_seed(5))
    torch.testing.assert_close(pairs[0].hr, expected)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images([tmp_path / "empty"])
    with pytest.raises(ValueError, match="smaller than the crop"):
        make_pair(torch.zeros(3, 20, 40), hr_size=32, lr_size=8, resize_image=False)
    with pytest.raises(ValueError, match="multiple of lr_size"):
        make_pair(torch.zeros(3, 40, 40), hr_size=32, lr_size=10)
