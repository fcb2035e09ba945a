"""Upsampler: the folder round trip, sampler settings, and the one render path `upscale` = `finish(draft(...))`:
canvas → condition → source → ODE → decode → crop → fidelity dial → back-projection (tiny random models in pixel
space: an identity first stage makes images and latents the same, so the checks are exact)."""

import json
import warnings

import pytest
import torch
from fmboost.models import (
    BOOST_CONFIG_NAME,
    CFMUNet,
    CouplingFlowMatcher,
    IdentityAutoencoder,
    SamplerConfig,
    Upsampler,
)
from fmboost.models.consistency import back_project, downsample
from fmboost.models.detail_bands import DetailCalibration


def make_upsampler(upsample="psu"):
    first_stage = IdentityAutoencoder()
    first_stage.set_latent_stats(torch.tensor([0.1, 0.0, -0.1]), torch.tensor([0.5, 0.6, 0.7]))
    return Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), first_stage,
                     CouplingFlowMatcher(upsample=upsample, noising_step=300), scale=2,
                     sampler=SamplerConfig("euler", 3, "cosine"))


def seed(n: int) -> torch.Generator:
    return torch.Generator().manual_seed(n)


def low_res(generator, batch: int = 1, size: int = 8) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


class Calls:
    """Counts the forward passes of a network (a forward hook)."""

    def __init__(self, network: torch.nn.Module):
        self.count = 0
        network.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.count += 1


def test_save_load_round_trip_reproduces_samples(tmp_path, generator):
    upsampler = make_upsampler()
    upsampler.save_pretrained(tmp_path)
    config = json.loads((tmp_path / BOOST_CONFIG_NAME).read_text())
    assert config["scale"] == 2 and config["flow"]["noising_step"] == 300 and "dial" not in config["flow"]
    assert config["first_stage"]["latent_std"] == pytest.approx([0.5, 0.6, 0.7])
    loaded = Upsampler.from_pretrained(tmp_path)
    image = low_res(generator, batch=2)
    a = upsampler.upscale(image, seed(3))
    b = loaded.upscale(image, seed(3))
    assert a.nfe == b.nfe == 3 and a.image.shape == (2, 3, 16, 16) and a.tiles == 1
    torch.testing.assert_close(a.image, b.image)
    assert upsampler.upscale(image, num_steps=5).nfe == 5  # per-call override
    assert config["sampler"] == SamplerConfig("euler", 3, "cosine").to_dict() and loaded.sampler == upsampler.sampler
    assert config["sampler"]["back_project"] == 0 and "temperature" not in config["sampler"]


def test_sampler_config_per_call(generator):
    upsampler = make_upsampler()
    image = low_res(generator)
    midpoint = SamplerConfig("midpoint", 2, "logit_normal", {"std": 3.0})
    a = upsampler.upscale(image, seed(1), sampler=midpoint)
    assert a.nfe == 4 and upsampler.sampler == SamplerConfig("euler", 3, "cosine")  # the saved one is untouched
    b = upsampler.upscale(image, seed(1), solver="midpoint", num_steps=2, schedule="logit_normal",
                          schedule_params={"std": 3.0})
    torch.testing.assert_close(a.image, b.image)
    assert not torch.equal(a.image, upsampler.upscale(image, seed(1)).image)  # the sampler matters
    assert upsampler.upscale(image, sampler=midpoint, num_steps=3).nfe == 6  # overrides on top
    with pytest.raises(ValueError, match="unknown sampler keys \\['steps'\\]"):
        upsampler.upscale(image, steps=3)


def test_settings_apply_overrides_and_ignore_none():
    upsampler = make_upsampler()
    saved = upsampler.sampler
    assert upsampler.settings(num_steps=None, back_project=None) == saved  # None: keep
    assert upsampler.settings(num_steps=7, back_project=2) == saved.replace(num_steps=7, back_project=2)
    other = SamplerConfig("heun", 2)
    assert upsampler.settings(other, back_project=1) == other.replace(back_project=1)
    assert upsampler.sampler == saved


@pytest.mark.parametrize("sampler, expected", [
    ({"solver": "euler", "num_steps": 2, "schedule": "linear"}, SamplerConfig(num_steps=2)),  # what training wrote
    ({"num_steps": 5}, SamplerConfig(num_steps=5)),  # missing keys: defaults
    ({"solver": "euler", "num_steps": 2, "schedule": "logit_normal", "schedule_params": {"std": 3, "mu": 1}},
     SamplerConfig("euler", 2, "logit_normal", (("mu", 1.0), ("std", 3.0)))),
    ({"solver": "euler", "num_steps": 3, "schedule": "linear", "temperature": 1.0}, SamplerConfig(num_steps=3)),
    (None, SamplerConfig()),  # no "sampler" at all
])
def test_older_boost_config_files_load(tmp_path, sampler, expected):
    make_upsampler().save_pretrained(tmp_path)
    path = tmp_path / BOOST_CONFIG_NAME
    config = json.loads(path.read_text())
    if sampler is None:
        del config["sampler"]
    else:
        config["sampler"] = sampler
    config["flow"]["dial"] = "blend"  # older folders wrote the latent dial's form
    path.write_text(json.dumps(config))
    loaded = Upsampler.from_pretrained(tmp_path)
    assert loaded.sampler == expected
    assert loaded.flow == make_upsampler().flow
    assert loaded.upscale(torch.zeros(1, 3, 8, 8)).nfe == expected.num_steps


def test_older_posterior_mean_folders_load_with_a_one_sample_dial(tmp_path, make_regression, make_posterior_mean):
    upsampler = make_posterior_mean(make_regression())
    upsampler.save_pretrained(tmp_path)
    path = tmp_path / BOOST_CONFIG_NAME
    config = json.loads(path.read_text())
    config["flow"]["dial"] = "blend"
    config["sampler"]["temperature"] = 1.0
    del config["sampler"]["back_project"]
    config["detail_calibration"] = {"edges": [1.0], "weights": [0.25, 0.5], "samples": 1}
    path.write_text(json.dumps(config))
    loaded = Upsampler.from_pretrained(tmp_path)
    assert loaded.flow == upsampler.flow and loaded.sampler == upsampler.sampler
    assert loaded.detail_calibration == DetailCalibration((1.0,), (0.25, 0.5))
    assert loaded.detail_calibration.sampler is None and loaded.detail_calibration.back_project is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dial that recorded no sampler is taken as fitted for any
        loaded.upscale(torch.zeros(1, 3, 8, 8), seed(0), detail=0.5)


@pytest.mark.parametrize("part, key, value, match", [
    ("sampler", "temperature", 0.5, "temperature 0.5 is no longer supported"),
    ("flow", "dial", "end_time", "dial 'end_time' is no longer supported"),
    ("detail_calibration", "samples", 2, "blends two samples, which is no longer supported"),
])
def test_older_folders_with_removed_settings_fail_with_a_message(tmp_path, make_regression, make_posterior_mean,
                                                                  part, key, value, match):
    upsampler = make_posterior_mean(make_regression())
    upsampler.detail_calibration = DetailCalibration((1.0,), (0.0, 0.5))
    upsampler.save_pretrained(tmp_path)
    path = tmp_path / BOOST_CONFIG_NAME
    config = json.loads(path.read_text())
    config[part][key] = value
    if part == "detail_calibration":
        config[part]["weights"] = [0.0, 0.5, 0.0, 0.0]  # what a two-sample dial stored: a share per band and sample
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        Upsampler.from_pretrained(tmp_path)


def test_latent_upsample_modes_work_on_images():
    upsampler = make_upsampler("bilinear")
    assert upsampler.upscale(torch.zeros(1, 3, 4, 6)).image.shape == (1, 3, 8, 12)


def test_errors(tmp_path, make_regression):
    with pytest.raises(FileNotFoundError, match="not an fmboost upsampler folder"):
        Upsampler.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="sampler must be a SamplerConfig"):
        Upsampler(None, IdentityAutoencoder(), CouplingFlowMatcher(), 2, {"num_steps": 4})
    with pytest.raises(ValueError, match=r"lr_image must be \(B, 3, h, w\)"):
        make_upsampler().upscale(torch.zeros(3, 8, 8))
    r = make_regression()
    draft = r.draft(torch.zeros(1, 3, 8, 8), sample=False)
    assert draft.sample is None and draft.estimate is None
    with pytest.raises(ValueError, match="this draft has no sample"):
        r.finish(draft)


# ---------------------------------------------------------------------- the render path: draft → finish


@pytest.mark.parametrize("back_steps", [0, 2])
@pytest.mark.parametrize("detail", [0.0, 0.5, 1.0])
def test_finish_of_the_draft_is_upscale_for_a_posterior_mean_flow(generator, make_regression, make_posterior_mean,
                                                                   detail, back_steps):
    upsampler = make_posterior_mean(make_regression())
    image = low_res(generator, batch=2)
    sampler = upsampler.settings(detail=detail, back_project=back_steps)
    draft = upsampler.draft(image, seed(4), sampler)
    assert draft.estimate.shape == draft.sample.shape == (2, 3, 16, 16)
    assert (draft.estimate_nfe, draft.flow_nfe, draft.tiles) == (1, 3, 1)
    finished = upsampler.finish(draft, sampler)
    direct = upsampler.upscale(image, seed(4), detail=detail, back_project=back_steps)
    assert torch.equal(finished.image, direct.image)
    assert finished.nfe == direct.nfe == (1 if detail == 0 else 4) and finished.tiles == direct.tiles == 1
    other_seed = upsampler.upscale(image, seed(5), detail=detail, back_project=back_steps).image
    assert torch.equal(other_seed, direct.image) == (detail == 0)  # the seed draws the source; R's estimate has none


@pytest.mark.parametrize("back_steps", [0, 2])
def test_finish_of_the_draft_is_upscale_for_a_regression_upsampler(generator, make_regression, back_steps):
    r = make_regression()
    image = low_res(generator, batch=2)
    sampler = r.settings(back_project=back_steps)
    draft = r.draft(image, seed(4), sampler)
    assert draft.estimate is None and (draft.estimate_nfe, draft.flow_nfe) == (0, 1)
    finished, direct = r.finish(draft, sampler), r.upscale(image, seed(4), back_project=back_steps)
    assert torch.equal(finished.image, direct.image) and finished.nfe == direct.nfe == 1
    assert r.dial is None


def test_detail_0_without_calibration_is_the_estimate_back_projected_and_skips_the_flow(generator, make_regression,
                                                                                         make_posterior_mean):
    r = make_regression()
    upsampler = make_posterior_mean(r)
    assert upsampler.detail_calibration is None and upsampler.dial == DetailCalibration.uniform()
    velocity, estimator = Calls(upsampler.model), Calls(upsampler.posterior_mean.model)
    image = low_res(generator)
    full = upsampler.upscale(image, seed(2))
    assert (velocity.count, estimator.count, full.nfe) == (3, 1, 4)  # the hooks see every pass
    velocity.count = estimator.count = 0
    result = upsampler.upscale(image, seed(2), detail=0.0, back_project=2)
    assert velocity.count == 0 and estimator.count == 1 and result.nfe == 1  # R's pass only
    estimate = r.upscale(image, back_project=0).image  # R itself, on the same canvas
    torch.testing.assert_close(result.image, back_project(estimate, image, 2))
    assert not torch.allclose(result.image, estimate, atol=1e-3)  # back-projected, not the bare estimate
    torch.testing.assert_close(upsampler.upscale(image, detail=0.0).image, estimate)


@pytest.mark.parametrize("kind", ["posterior_mean", "regression"])
def test_back_projection_is_the_last_step_of_the_path(generator, make_regression, make_posterior_mean, kind):
    r = make_regression()
    upsampler = make_posterior_mean(r) if kind == "posterior_mean" else r
    detail = 0.5 if kind == "posterior_mean" else 1.0
    image = low_res(generator)
    plain = upsampler.upscale(image, seed(6), detail=detail, back_project=0).image
    projected = upsampler.upscale(image, seed(6), detail=detail, back_project=3).image

    def lr_error(output):
        return (downsample(output, tuple(image.shape[-2:])) - image).square().mean().item()

    assert lr_error(projected) < 0.5 * lr_error(plain)
    assert torch.equal(projected, back_project(plain, image, 3))
    upsampler.sampler = upsampler.sampler.replace(back_project=3)  # the saved count is the default
    assert torch.equal(upsampler.upscale(image, seed(6), detail=detail).image, projected)


def test_detail_below_1_needs_a_posterior_mean_upsampler(make_regression):
    r, coupling = make_regression(), make_upsampler()
    for upsampler in (r, coupling):
        assert upsampler.dial is None
        with pytest.raises(ValueError, match="needs a posterior-mean upsampler"):
            upsampler.upscale(torch.zeros(1, 3, 8, 8), detail=0.5)
        with pytest.raises(ValueError, match="needs a posterior-mean upsampler"):
            upsampler.settings(SamplerConfig(detail=0.0))
    assert r.upscale(torch.zeros(1, 3, 8, 8), detail=1.0).nfe == 1
    with pytest.raises(ValueError, match="SamplerConfig.back_project"):
        SamplerConfig(back_project=-1)
    with pytest.raises(ValueError, match="SamplerConfig.detail"):
        SamplerConfig(detail=1.5)
    with pytest.raises(ValueError, match="SamplerConfig.back_project"):
        r.upscale(torch.zeros(1, 3, 8, 8), back_project=-1)


def test_a_dial_fitted_for_another_sampler_warns_at_detail_below_1(generator, make_regression, make_posterior_mean):
    upsampler = make_posterior_mean(make_regression())  # saved sampler: euler:linear:3, back_project 0
    image = low_res(generator)
    weights = (0.0, 0.5)
    for sampler, back_steps in (("euler:linear:8", 0), ("euler:linear:3", 2)):  # another solve; another BP count
        upsampler.detail_calibration = DetailCalibration((1.0,), weights, sampler=sampler, back_project=back_steps)
        with pytest.warns(UserWarning, match="fitted on"):
            upsampler.upscale(image, seed(0), detail=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            upsampler.upscale(image, seed(0), detail=1.0)  # the sample itself: no dial
    upsampler.detail_calibration = DetailCalibration((1.0,), weights, sampler="euler:linear:8", back_project=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upsampler.upscale(image, seed(0), detail=0.5, num_steps=8, back_project=2)  # what it was fitted with
    with pytest.warns(UserWarning, match="euler:linear:3"):
        upsampler.settings(detail=0.0)
