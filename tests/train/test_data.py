"""Pairs, bad-image skipping, the sample-photo source."""

import pytest
import torch
from fmboost.eval.pairs import resize
from fmboost.models.degradations import Degradation
from fmboost.train.config import load_config
from fmboost.train.data import PairDataset, image_records, low_res, make_pair, split_records, validation_pairs
from PIL import Image

from .conftest import write_images


def test_bad_images_are_skipped_and_counted(tmp_path, tiny_config):
    """Bad images at the end are skipped while choosing the validation images; bad training images where they are
    decoded (the latent cache build, PairDataset), never in a pass over all images at start-up."""
    folder = write_images(tmp_path / "mixed", count=4)
    good = (folder / "00.png").read_bytes()
    (folder / "zz_truncated.png").write_bytes(good[: len(good) // 2])  # corrupt
    Image.new("RGB", (8, 8)).save(folder / "zz_tiny.png")  # smaller than resolution 16
    Image.new("L", (24, 24), 128).save(folder / "grey.png")  # not RGB: converted, kept
    (folder / "01_truncated.png").write_bytes(good[: len(good) // 2])  # a bad training image
    config = tiny_config(train_data_dir=str(folder))
    with pytest.warns(UserWarning, match=r"validation images skipped 2 of 8 images") as caught:
        train, val = split_records(image_records(config), config)
    message = str(caught[0].message)
    assert "zz_truncated.png (unreadable" in message and "zz_tiny.png (too small: 8x8)" in message
    assert [r.name for r in val] == ["grey.png"]
    assert [r.name for r in train] == ["00.png", "01.png", "01_truncated.png", "02.png", "03.png"]
    dataset = PairDataset(train, config)
    with pytest.warns(UserWarning, match=r"training data skipped 1 of 5 images: 01_truncated.png \(unreadable"):
        assert dataset[2]["hr"].shape == (3, 16, 16)  # the next usable image stands in
    grey = PairDataset(val, config)[0]
    assert grey["hr"].shape == (3, 16, 16) and grey["lr"].shape == (3, 4, 4)
    assert torch.allclose(grey["hr"], torch.full_like(grey["hr"], 128 / 127.5 - 1), atol=1e-2)  # L → RGB, values kept


def test_empty_dataset_is_a_clear_error(tmp_path, tiny_config):
    folder = tmp_path / "empty"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "small.png")
    config = tiny_config(train_data_dir=str(folder))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no training images"):
        split_records(image_records(config), config)


def test_pairs_are_aligned_crops_of_the_downsampled_image(tiny_config):
    config = tiny_config(resolution=32, crop_size=16)
    hr_image = torch.linspace(-1, 1, 32).repeat(3, 32, 1)  # a horizontal ramp: crops differ by position
    pair = make_pair(hr_image, config, torch.Generator().manual_seed(3), flip=False)
    low = torch.nn.functional.interpolate(hr_image[None], scale_factor=0.25, mode="bicubic", antialias=True)[0]
    left = int(((pair["hr"][0, 0, 0] + 1) / 2 * 31).round())
    assert left % 4 == 0
    torch.testing.assert_close(pair["lr"], low[:, :4, left // 4:left // 4 + 4].clamp(-1, 1))


def test_training_low_res_is_the_evaluation_degradation(tiny_config):
    """Training pairs, evaluation pairs and back-projection share one degradation D: a model trained
    on one and scored on another would be penalised for the mismatch, not for its up-sampling."""
    image = torch.rand(3, 48, 64) * 2 - 1
    assert torch.equal(low_res(image, tiny_config(), seed=0), resize(image, (12, 16)))
    with pytest.raises(ValueError, match="multiple of scale 4"):
        low_res(image[:, :46], tiny_config(), seed=0)
    jpeg = low_res(image, tiny_config(degradation="jpeg:40"), seed=0)
    torch.testing.assert_close(jpeg, Degradation("jpeg", 40)(image[None], (12, 16))[0], rtol=0, atol=0)


def test_second_order_training_inputs_are_seeded_per_sample(tiny_config):
    """The random degradation is drawn from the sample's seed: the same sample is the same input in every
    epoch replay and every process, and different samples see different degradations."""
    config = tiny_config(degradation="second-order")
    image = torch.rand(3, 48, 64) * 2 - 1
    first = low_res(image, config, seed=3)
    assert first.shape == (3, 12, 16)
    assert torch.equal(first, low_res(image, config, seed=3))
    torch.testing.assert_close(first, Degradation("second-order")(image[None], (12, 16), seeds=[3])[0], rtol=0,
                               atol=0)
    assert (first - low_res(image, config, seed=4)).abs().mean() > 1e-2
    dataset = PairDataset(image_records(config), config)
    assert torch.equal(dataset[1]["lr"], dataset[1]["lr"]) and not torch.equal(dataset[1]["lr"], dataset[7]["lr"])
    bicubic = PairDataset(image_records(tiny_config()), tiny_config())
    assert torch.equal(dataset[1]["hr"], bicubic[1]["hr"])  # the degradation draws do not move the crops
    assert not torch.equal(dataset[1]["lr"], bicubic[1]["lr"])


def test_an_unknown_degradation_names_the_key(tiny_config):
    with pytest.raises(ValueError, match="degradation: .*'blur'"):
        tiny_config(degradation="blur")


def test_validation_pairs_are_fixed(tiny_config):
    config = tiny_config(resolution=24)
    records = image_records(config)[:2]
    a, b = validation_pairs(records, config, 16, 2), validation_pairs(records, config, 16, 2)
    assert a["hr"].shape == (4, 3, 16, 16) and a["lr"].shape == (4, 3, 4, 4)
    assert torch.equal(a["hr"], b["hr"])
    assert not torch.equal(a["hr"][0], a["hr"][1])  # two places in the image, not one patch twice


def test_validation_pairs_keep_a_whole_image_crop_once(tiny_config):
    config = tiny_config()  # resolution 16, crop 16: every grid position is the whole image
    records = image_records(config)[:2]
    pairs = validation_pairs(records, config, 16, 16)
    assert pairs["hr"].shape == (2, 3, 16, 16) and pairs["lr"].shape == (2, 3, 4, 4)


def test_sample_photos_source():
    config = load_config(None, {"dataset_name": "sample_photos", "resolution": 0, "crop_size": 32})
    records = image_records(config)
    assert len(records) >= 7
    assert records[0].open().mode == "RGB"
