"""`upgrade_boost_config`: every older boost_config.json form in one function, and a folder written the old way
loading and rendering the same image as the folder it was made from."""

import json
import warnings

import pytest
import torch
from fmboost.models import BOOST_CONFIG_NAME, Upsampler
from fmboost.models.detail_bands import DetailCalibration
from fmboost.models.upgrade import upgrade_boost_config


def old_form(config: dict) -> dict:
    """`config` (a current boost_config.json) as the oldest folders wrote it: the flow's latent dial, the sampler's
    neutral temperature without back_project, a one-sample dial that recorded nothing it was fitted with."""
    old = json.loads(json.dumps(config))
    old["flow"]["dial"] = "blend"
    old["sampler"]["temperature"] = 1.0
    del old["sampler"]["back_project"], old["sampler"]["anchor"]
    old["detail_calibration"] = {"edges": [1.0], "weights": [0.25, 0.5], "samples": 1}
    return old


def test_every_old_form_is_upgraded_in_one_place(make_regression, make_posterior_mean):
    current = make_posterior_mean(make_regression()).config()
    old = old_form(current)
    before = json.dumps(old)
    upgraded = upgrade_boost_config(old)
    assert json.dumps(old) == before  # the input is left alone
    assert upgraded["flow"] == current["flow"] and "temperature" not in upgraded["sampler"]
    assert upgraded["detail_calibration"] == {"edges": [1.0], "weights": [0.25, 0.5]}
    assert upgrade_boost_config(current) == current  # the current form is its own upgrade
    assert upgrade_boost_config({k: v for k, v in current.items() if k != "sampler"})["sampler"] == {}


@pytest.mark.parametrize("section, change, match", [
    ("sampler", {"temperature": 0.5}, "temperature 0.5 is no longer supported"),
    ("flow", {"dial": "end_time"}, "dial 'end_time' is no longer supported"),
    ("detail_calibration", {"edges": [1.0], "weights": [0] * 4, "samples": 2}, "two samples"),
])
def test_removed_settings_are_refused_saying_what_to_use(section, change, match):
    with pytest.raises(ValueError, match=match):
        upgrade_boost_config({section: change})


def test_a_folder_written_the_old_way_loads_and_renders_the_same_image(tmp_path, generator, make_regression,
                                                                      make_posterior_mean):
    upsampler = make_posterior_mean(make_regression())
    upsampler.detail_calibration = DetailCalibration((1.0,), (0.25, 0.5))
    upsampler.save_pretrained(tmp_path / "new")
    upsampler.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / BOOST_CONFIG_NAME
    path.write_text(json.dumps(old_form(json.loads(path.read_text()))))
    image = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    renders = []
    for name in ("new", "old"):
        loaded = Upsampler.from_pretrained(tmp_path / name)
        assert loaded.sampler == upsampler.sampler and loaded.detail_calibration == upsampler.detail_calibration
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            renders.append(loaded.upscale(image, torch.Generator().manual_seed(4), detail=0.5).image)
    torch.testing.assert_close(renders[0], renders[1], rtol=0, atol=0)
