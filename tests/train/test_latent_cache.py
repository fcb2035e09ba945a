import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
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


def test_a_run_reuses_the_entry_of_a_run_beside_it(tmp_path, tiny_config, monkeypatch):
    """A recipe's second command (another output_dir, the same data, crops, first stage and degradation) finds the
    first one's cache by its key; a run with other settings, or with its own latent_cache_dir, builds its own."""
    first_config = tiny_config(use_latent_cache=True, output_dir=str(tmp_path / "runs" / "reg"))
    records, _ = split_records(image_records(first_config), first_config)
    cache_dir, elsewhere = latent_cache.cache_location(first_config)
    assert cache_dir == tmp_path / "runs" / "reg" / "latent_cache" and elsewhere == []
    first = latent_cache.build_or_load(records, first_config, IdentityAutoencoder(), first_config.flow(), cache_dir,
                                       elsewhere=elsewhere)
    second_config = tiny_config(use_latent_cache=True, output_dir=str(tmp_path / "runs" / "pm"), objective="regression")
    cache_dir, elsewhere = latent_cache.cache_location(second_config)
    assert cache_dir == tmp_path / "runs" / "pm" / "latent_cache" and elsewhere == [first.path.parent.resolve()]

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cache hit must not encode")

    with monkeypatch.context() as patched:
        patched.setattr(latent_cache, "encode_batch", no_encoding)
        second = latent_cache.build_or_load(records, second_config, IdentityAutoencoder(), second_config.flow(),
                                            cache_dir, elsewhere=elsewhere)
    assert second.hit and second.path.resolve() == first.path.resolve()
    other = tiny_config(use_latent_cache=True, output_dir=str(tmp_path / "runs" / "jpeg"), degradation="jpeg:50")
    cache_dir, elsewhere = latent_cache.cache_location(other)
    built = latent_cache.build_or_load(records, other, IdentityAutoencoder(), other.flow(), cache_dir,
                                       elsewhere=elsewhere)
    assert not built.hit and built.path.parent == tmp_path / "runs" / "jpeg" / "latent_cache"
    own = tiny_config(use_latent_cache=True, output_dir=str(tmp_path / "runs" / "own"),
                      latent_cache_dir=str(tmp_path / "mine"))
    assert latent_cache.cache_location(own) == (tmp_path / "mine", [])


def test_changed_settings_miss(tmp_path, tiny_config):
    config = tiny_config(use_latent_cache=True)
    records, _ = split_records(image_records(config), config)
    key = latent_cache.cache_key(config, records, IdentityAutoencoder())
    assert key == latent_cache.cache_key(config, records, IdentityAutoencoder())
    assert key != latent_cache.cache_key(tiny_config(use_latent_cache=True, upsample="bilinear"), records,
                                         IdentityAutoencoder())
    assert key != latent_cache.cache_key(config, records[:-1], IdentityAutoencoder())


def test_a_cache_built_with_one_degradation_refuses_another(tmp_path, tiny_config):
    """Each degradation has its own entry (the key holds it), bicubic keeps the key of caches built before
    degradations existed, and an entry whose manifest names another degradation is refused, not reused."""
    bicubic = tiny_config(use_latent_cache=True)
    records, _ = split_records(image_records(bicubic), bicubic)
    keys = {name: latent_cache.cache_key(tiny_config(use_latent_cache=True, degradation=name), records,
                                         IdentityAutoencoder()) for name in ("bicubic", "jpeg:50", "second-order")}
    assert len(set(keys.values())) == 3
    degraded = tiny_config(use_latent_cache=True, degradation="second-order")
    built = latent_cache.build_or_load(records, degraded, IdentityAutoencoder(), degraded.flow(), tmp_path / "cache")
    assert built.path.name == keys["second-order"]
    assert json.loads((built.path / latent_cache.MANIFEST).read_text())["settings"]["degradation"] == "second-order"
    plain = latent_cache.build_or_load(records, bicubic, IdentityAutoencoder(), bicubic.flow(), tmp_path / "cache")
    assert plain.path != built.path
    shutil.rmtree(plain.path)
    shutil.copytree(built.path, plain.path)  # a second-order entry under the bicubic key
    with pytest.raises(ValueError, match="degraded with 'second-order', not the configured degradation 'bicubic'"):
        latent_cache.build_or_load(records, bicubic, IdentityAutoencoder(), bicubic.flow(), tmp_path / "cache")


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



def _all_items(cache, config) -> dict[str, torch.Tensor]:
    dataset = latent_cache.CachedLatentDataset(cache, config)
    return {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in ("hr_latent", "cond")}


def test_a_killed_build_resumes_with_the_missing_shards(tmp_path, tiny_config, monkeypatch):
    config = tiny_config(use_latent_cache=True, crops_per_image=2, latent_cache_shard_images=2, random_flip=False,
                         latent_cache_dtype="float32")
    records, _ = split_records(image_records(config), config)  # 5 images → shards of 2, 2, 1
    flow, encode, calls = config.flow(), latent_cache.encode_batch, []

    def dies_in_the_second_shard(batch, *args):
        calls.append(batch["hr"].shape[0])
        if len(calls) == 3:  # batches of 2 patches: shard 0 took two
            raise KeyboardInterrupt  # stands in for a kill: the shard being written is lost
        return encode(batch, *args)

    monkeypatch.setattr(latent_cache, "encode_batch", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        latent_cache.build_or_load(records, config, IdentityAutoencoder(), flow, tmp_path / "cache")
    entry = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["latent_stats.json", "shard_000000.safetensors"]
    (entry / ".shard_000001.safetensors.tmp123").write_bytes(b"half")  # left by a killed writer

    calls.clear()
    monkeypatch.setattr(latent_cache, "encode_batch", lambda batch, *args: calls.append(1) or encode(batch, *args))
    monkeypatch.setattr(latent_cache, "compute_latent_stats", None)  # the stats of the first attempt are kept
    resumed = latent_cache.build_or_load(records, config, IdentityAutoencoder(), flow, tmp_path / "cache")
    assert len(calls) == 3 and resumed.num_samples == 10 and not resumed.hit  # shards 1 (2 batches) and 2 (1)
    assert not list(entry.glob(".*tmp*"))
    monkeypatch.undo()
    fresh = latent_cache.build_or_load(records, config, IdentityAutoencoder(), flow, tmp_path / "fresh")
    for name, tensor in _all_items(fresh, config).items():
        torch.testing.assert_close(_all_items(resumed, config)[name], tensor, rtol=0, atol=0)


def test_storage_dtype(tmp_path, tiny_config):
    """float16 (the default) and bfloat16 halve the cache; training reads float32 close to the float32 cache."""
    records = None
    caches = {}
    for dtype in ("float32", "float16", "bfloat16"):
        config = tiny_config(use_latent_cache=True, random_flip=False, latent_cache_dtype=dtype)
        records = records or split_records(image_records(config), config)[0]
        cache = latent_cache.build_or_load(records, config, IdentityAutoencoder(), config.flow(), tmp_path / "cache")
        assert json.loads((cache.path / latent_cache.MANIFEST).read_text())["dtype"] == dtype
        caches[dtype] = (_all_items(cache, config), sum(p.stat().st_size for p in cache.path.glob("shard_*")))
    assert tiny_config().latent_cache_dtype == "float16"
    reference, size = caches["float32"]
    for dtype, tolerance in (("float16", 2 ** -10), ("bfloat16", 2 ** -7)):
        items, half_size = caches[dtype]
        assert items["hr_latent"].dtype == torch.float32 and half_size < 0.6 * size
        torch.testing.assert_close(items["hr_latent"], reference["hr_latent"], rtol=tolerance, atol=tolerance)
        assert not torch.equal(items["cond"], reference["cond"])  # really stored in the lower precision
    with pytest.raises(ValueError, match=r"latent_cache_dtype must be one of \['float16', 'bfloat16', 'float32'\]"):
        tiny_config(latent_cache_dtype="fp16")
    with pytest.raises(ValueError, match="latent_cache_shard_images must be >= 1"):
        tiny_config(latent_cache_shard_images=0)


def test_the_dataset_holds_no_latents(tmp_path, tiny_config):
    """Items are read from the shards when asked: the dataset (what every data loader worker receives) stays small."""
    config = tiny_config(use_latent_cache=True, crops_per_image=64, latent_cache_shard_images=2)
    records, _ = split_records(image_records(config), config)
    cache = latent_cache.build_or_load(records, config, IdentityAutoencoder(), config.flow(), tmp_path / "cache")
    cache_bytes = sum(p.stat().st_size for p in cache.path.glob("shard_*"))
    dataset = latent_cache.CachedLatentDataset(cache, config)
    assert len(pickle.dumps(dataset)) < cache_bytes / 20
    clone = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(clone[len(dataset) - 1], dataset[len(dataset) - 1])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_old_format_entries_are_named_and_refused(tmp_path, tiny_config):
    config = tiny_config(use_latent_cache=True)
    records, _ = split_records(image_records(config), config)
    old = tmp_path / "cache" / "0123456789abcdef0123"
    old.mkdir(parents=True)
    (old / latent_cache.MANIFEST).write_text(json.dumps({"num_samples": 5, "chunks": ["chunk_000000.pt"]}))
    with pytest.warns(UserWarning, match="1 latent cache entries .* older format .* delete them"):
        cache = latent_cache.build_or_load(records, config, IdentityAutoencoder(), config.flow(), tmp_path / "cache")
    assert cache.path != old and not cache.hit
    stale = latent_cache.LatentCache(old, True, 5, torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="format version 1; .* delete the folder and rebuild"):
        latent_cache.CachedLatentDataset(stale, config)
