import os
import shutil
from pathlib import Path

import torch
from fmboost.models import IdentityAutoencoder
from fmboost.train import latent_cache
from fmboost.train.data import image_records, split_records

from .conftest import write_images


def test_second_run_is_a_cache_hit(tmp_path, tiny_config, monkeypatch):
    config = tiny_config(use_latent_cache=True, crops_per_image=3)
    records, _ = split_records(image_records(config), config)
    flow = config.flow()
    first = latent_cache.build_or_load(records, config, IdentityAutoencoder(), flow, tmp_path / "cache")
    assert not first.hit and first.num_samples == 3 * len(records)
    assert first.encode_samples_per_second > 0

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cache hit must not encode")

    monkeypatch.setattr(latent_cache, "encode_batch", no_encoding)
    monkeypatch.setattr(latent_cache, "compute_latent_stats", no_encoding)
    first_stage = IdentityAutoencoder()
    second = latent_cache.build_or_load(records, config, first_stage, flow, tmp_path / "cache")
    assert second.hit and second.path == first.path
    torch.testing.assert_close(first_stage.latent_std, first.latent_std)  # stats restored from the cache
    dataset = latent_cache.CachedLatentDataset(second, config)
    assert len(dataset) == first.num_samples and dataset[0]["hr_latent"].shape == (3, 16, 16)


def test_changed_settings_miss(tmp_path, tiny_config):
    config = tiny_config(use_latent_cache=True)
    records, _ = split_records(image_records(config), config)
    key = latent_cache.cache_key(config, records, IdentityAutoencoder())
    assert key == latent_cache.cache_key(config, records, IdentityAutoencoder())
    assert key != latent_cache.cache_key(tiny_config(use_latent_cache=True, upsample="bilinear"), records,
                                         IdentityAutoencoder())
    assert key != latent_cache.cache_key(config, records[:-1], IdentityAutoencoder())


def test_a_copy_of_the_photos_hits_and_an_edited_photo_misses(tmp_path, tiny_config, image_dir):
    """A re-provisioned data folder (same bytes, new paths and times) must reuse the cache."""
    def key(folder):
        config = tiny_config(use_latent_cache=True, train_data_dir=str(folder))
        return latent_cache.cache_key(config, split_records(image_records(config), config)[0], IdentityAutoencoder())

    copy = shutil.copytree(image_dir, tmp_path / "copy", copy_function=shutil.copy)
    for path in copy.iterdir():
        os.utime(path, ns=(0, 0))
    assert key(copy) == key(image_dir)
    write_images(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "00.png", copy / "00.png")  # same name and size, other pixels
    assert (copy / "00.png").stat().st_size == (image_dir / "00.png").stat().st_size
    assert key(copy) != key(image_dir)


def test_cached_training_runs(tiny_config):
    from fmboost.train.cfm_upsampler import train

    config = tiny_config(use_latent_cache=True, crops_per_image=2, max_train_steps=2)
    upsampler = train(config)
    assert (upsampler / "boost_config.json").is_file()
    entries = list((Path(config.output_dir) / "latent_cache").iterdir())
    assert len(entries) == 1 and (entries[0] / latent_cache.MANIFEST).is_file()
