"""Training a flow from a pretrained restorer: the restorer frozen, its estimates cached per restorer and
degradation, the folder recording the weights file it needs."""

import json
from pathlib import Path

import pytest
import torch
from fmboost.models import Upsampler
from fmboost.models.restorer import Restorer
from fmboost.train.cfm_upsampler import train
from fmboost.train.data import image_records, split_records
from fmboost.train.latent_cache import cache_patches, restorer_estimate_file
from safetensors.torch import load_file

from ..models.test_restorer import write_rrdbnet


@pytest.fixture
def restorer_file(tmp_path):
    return write_rrdbnet(tmp_path / "weights" / "tiny_x4.safetensors")


def estimate_folders(cache_dir) -> list[Path]:
    return sorted(Path(cache_dir).glob("*/restorer_*"))


def test_restorer_estimates_are_cached_once_per_restorer_and_degradation(tiny_config, restorer_file, tmp_path,
                                                                         capsys):
    cache_dir = tmp_path / "cache"
    config = tiny_config("from_restorer", source="posterior_mean", restorer=str(restorer_file), use_latent_cache=True,
                         latent_cache_dir=str(cache_dir), degradation="second-order", max_train_steps=2)
    folder = train(config)
    printed = capsys.readouterr().out
    (estimates,) = estimate_folders(cache_dir)
    restorer = Restorer.load(restorer_file)
    assert estimates.name == f"restorer_{restorer.sha256[:20]}"
    assert json.loads((estimates / "restorer.json").read_text())["sha256"] == restorer.sha256
    # each cached estimate is the restorer's image of that sample's (degraded) low-res patch, encoded
    upsampler = Upsampler.from_pretrained(folder)
    cached = load_file(estimates / "shard_000000.safetensors")["posterior_mean"]
    train_records, _ = split_records(image_records(config), config)
    lr = torch.stack([patch["lr"] for patch in cache_patches(train_records, config)])
    expected = upsampler.first_stage.encode(restorer(lr)).half()
    assert cached.shape == expected.shape
    torch.testing.assert_close(cached, expected)
    # calibration measured projection onto the restorer's image beside projection onto the input
    assert "1 onto estimate:" in printed and upsampler.sampler.anchor in ("input", "estimate")
    assert upsampler.restorer.sha256 == restorer.sha256 and upsampler.estimate is upsampler.restorer

    # another restorer: its own estimates, the first ones untouched; a tampered entry is refused
    other = write_rrdbnet(tmp_path / "weights" / "other_x4.safetensors", seed=3)
    train(tiny_config("other", source="posterior_mean", restorer=str(other), use_latent_cache=True,
                      latent_cache_dir=str(cache_dir), degradation="second-order", max_train_steps=1))
    assert len(estimate_folders(cache_dir)) == 2
    record = estimates / "restorer.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="holds the estimates of another restorer"):
        from fmboost.train.latent_cache import build_or_load

        cache = build_or_load(train_records, config, upsampler.first_stage, config.flow(), cache_dir)
        restorer_estimate_file(cache, restorer, train_records, config, upsampler.first_stage)
    # the same restorer on inputs made by another degradation: another cache entry, never these estimates
    train(tiny_config("bicubic", source="posterior_mean", restorer=str(restorer_file), use_latent_cache=True,
                      latent_cache_dir=str(cache_dir), max_train_steps=1))
    assert len({p.parent for p in estimate_folders(cache_dir)}) == 2


def test_restorer_flows_train_on_the_fly_and_refuse_a_wrong_setup(tiny_config, restorer_file, tmp_path):
    folder = train(tiny_config("on_the_fly", source="posterior_mean", restorer=str(restorer_file),
                               condition_on="estimate", max_train_steps=2, calibrate_detail=False))
    upsampler = Upsampler.from_pretrained(folder)
    assert upsampler.flow.condition_on == "estimate" and upsampler.restorer.name == "tiny_x4.safetensors"
    with pytest.raises(ValueError, match="exactly one"):
        tiny_config(source="posterior_mean", restorer=str(restorer_file), posterior_mean_model=str(tmp_path))
    with pytest.raises(ValueError, match="only used with source 'posterior_mean'"):
        tiny_config(restorer=str(restorer_file))
    with pytest.raises(ValueError, match="condition_on 'estimate' needs a posterior-mean flow"):
        tiny_config(condition_on="estimate")
    with pytest.raises(ValueError, match=r"up-scales ×4, this run ×2"):
        train(tiny_config(source="posterior_mean", restorer=str(restorer_file), scale=2))
