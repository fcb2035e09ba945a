"""Training a posterior-mean flow: R loaded from a regression run, R(cond) cached, the folder self-contained."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from fmboost.models import Upsampler
from fmboost.train.cfm_upsampler import train
from fmboost.train.config import load_config
from safetensors.torch import load_file

from .conftest import fitted_back_projection, write_images


@pytest.fixture
def regression_folder(tiny_config):
    return train(tiny_config("reg", objective="regression", max_train_steps=2, validation_steps=100))


@pytest.mark.parametrize("cached", [True, False])
def test_posterior_mean_flow_trains_and_saves_r_inside(tiny_config, regression_folder, cached, capsys):
    config = tiny_config("pm", source="posterior_mean", posterior_mean_model=str(regression_folder),
                         posterior_mean_sigma=0.05, concat_cond=False, use_latent_cache=cached,
                         latent_cache_dir=str(Path(regression_folder).parent.parent / "cache"),
                         calibrate_detail=cached)
    capsys.readouterr()
    folder = train(config)
    printed = capsys.readouterr().out
    if cached:
        estimates = list((Path(config.latent_cache_dir)).glob("*/posterior_mean_*/shard_*.safetensors"))
        assert len(estimates) == 1 and load_file(estimates[0])["posterior_mean"].shape[0] == 5  # 5 images × 1 crop
    upsampler = Upsampler.from_pretrained(folder)
    assert upsampler.flow.source == "posterior_mean" and upsampler.posterior_mean is not None
    # the back-projection steps measured best on the validation images, with or without the dial
    _, kept = fitted_back_projection(printed)
    assert upsampler.sampler.back_project == kept
    assert upsampler.sampler.replace(back_project=0) == config.sampler_config()  # otherwise the configured sampler
    if cached:  # the per-band dial, fitted on the validation images when saving, records what it was fitted with
        calibration = upsampler.detail_calibration
        assert len(calibration.weights) == len(calibration.edges) + 1
        assert calibration.sampler == upsampler.sampler.format() == config.sampler_config().format()
        assert calibration.back_project == upsampler.sampler.back_project
        assert calibration.spans is None  # 16² patches: too small for LPIPS, said so
        assert "detail path: uniform, LPIPS needs patches of at least 32², crop_size is 16" in printed
        assert printed.count("band [") == len(calibration.weights)
    else:
        assert upsampler.detail_calibration is None and "band [" not in printed
    regression = Upsampler.from_pretrained(regression_folder)
    for name, tensor in regression.model.state_dict().items():  # R is the regression run's weights, frozen
        torch.testing.assert_close(upsampler.posterior_mean.model.state_dict()[name], tensor)
    validation = [json.loads(line) for line in (Path(config.output_dir) / "validation" / "metrics.jsonl").open()]
    assert validation[-1]["nfe"] == config.upsample_steps + 1
    # detail 0 of the one-band dial is R's estimate, with the same back-projection as the regression model's
    image = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    uncalibrated = dataclasses.replace(upsampler, detail_calibration=None)
    estimate = uncalibrated.upscale(image, detail=0.0, back_project=2)
    assert estimate.nfe == 1
    torch.testing.assert_close(estimate.image, regression.upscale(image, back_project=2).image)


def test_config_errors_name_the_key(tiny_config, regression_folder, tmp_path):
    with pytest.raises(ValueError, match="needs posterior_mean_model"):
        tiny_config(source="posterior_mean")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['detail_samples'\]"):  # two-sample dials: removed
        tiny_config(detail_samples=2)
    with pytest.raises(ValueError, match="only used with source 'posterior_mean'"):
        tiny_config(posterior_mean_model=str(regression_folder))
    with pytest.raises(ValueError, match="posterior_mean_model: no boost_config.json"):
        train(tiny_config(source="posterior_mean", posterior_mean_model=str(tmp_path / "nothing")))
    cfm_folder = train(tiny_config("cfm", max_train_steps=1, validation_steps=100))
    with pytest.raises(ValueError, match="must be a regression upsampler"):
        train(tiny_config(source="posterior_mean", posterior_mean_model=str(cfm_folder)))
    with pytest.raises(ValueError, match="needs ×2"):
        train(load_config(None, {**tiny_config().to_dict(), "scale": 2, "source": "posterior_mean",
                                 "posterior_mean_model": str(regression_folder)}))


def test_export_of_a_posterior_mean_checkpoint_carries_r(tiny_config, regression_folder, tmp_path):
    from fmboost.train.export import export_checkpoint

    config = tiny_config("pm", source="posterior_mean", posterior_mean_model=str(regression_folder),
                         checkpointing_steps=2, max_train_steps=4)
    folder = train(config)
    export_checkpoint(str(Path(config.output_dir) / "checkpoint-2"), str(tmp_path / "exported"))
    exported = Upsampler.from_pretrained(tmp_path / "exported")
    trained = Upsampler.from_pretrained(folder)
    for name, tensor in trained.posterior_mean.model.state_dict().items():
        torch.testing.assert_close(exported.posterior_mean.model.state_dict()[name], tensor)


def test_posterior_mean_training_orders_the_dial_by_lpips(tiny_config, tmp_path, lpips_file):
    """With patches LPIPS can see and its weights present (`lpips_file`: the shared copy training loads), the
    saved dial carries the measured band order."""
    images = write_images(tmp_path / "images40", size=40)
    sizes = dict(train_data_dir=str(images), resolution=32, crop_size=32, max_train_steps=2, validation_steps=100)
    regression = train(tiny_config("reg32", objective="regression", **sizes))
    upsampler = Upsampler.from_pretrained(train(tiny_config("pm32", source="posterior_mean",
                                                            posterior_mean_model=str(regression), **sizes)))
    spans = sorted(upsampler.detail_calibration.spans)
    assert spans[0][0] == 0.0 and spans[-1][1] == 1.0
    # the order was measured after the folder's back-projection, which the dial records with its sampler
    assert upsampler.detail_calibration.back_project == upsampler.sampler.back_project
    assert upsampler.detail_calibration.sampler == upsampler.sampler.format()
