"""Posterior-mean flows: the source R(cond) + σ_s ε, the image-space fidelity dial, R inside the upsampler folder."""

import contextlib
import io
import json

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
from fmboost.models.posterior_mean import PosteriorMean


class ConstantVelocity(torch.nn.Module):
    """v(x, t, cond) = c · cond: straight paths, so every solver integrates it exactly."""

    def __init__(self, c: float = 1.0):
        super().__init__()
        self.c, self.calls, self.conds = c, 0, []

    def forward(self, x, t, cond):
        self.calls += 1
        self.conds.append(cond)
        return self.c * cond


def pm_flow(**changes):
    return CouplingFlowMatcher(**{"source": "posterior_mean", "posterior_mean_sigma": 0.2, **changes})


def test_source_is_the_estimate_plus_sigma_noise(generator):
    cond, estimate = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    x0 = pm_flow().couple(cond, generator=torch.Generator().manual_seed(1), posterior_mean=estimate).x0
    noise = torch.randn(cond.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x0, estimate + 0.2 * noise)
    torch.testing.assert_close(pm_flow(posterior_mean_sigma=0.0).couple(cond, posterior_mean=estimate).x0, estimate)
    with pytest.raises(ValueError, match="needs posterior_mean of shape"):
        pm_flow().couple(cond)
    with pytest.raises(ValueError, match="posterior_mean_sigma"):
        pm_flow(posterior_mean_sigma=-0.1)


def test_loss_targets_data_minus_source_and_concat_cond_off_feeds_zeros(generator):
    cond, x1 = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    estimate = x1 - 1.0  # the straight path from estimate (σ_s = 0) to x1 has velocity 1 everywhere
    model = ConstantVelocity()
    loss = pm_flow(posterior_mean_sigma=0.0, concat_cond=False).loss(model, x1, torch.ones_like(cond),
                                                                      posterior_mean=estimate)
    assert torch.count_nonzero(model.conds[-1]) == 0  # the network saw zeros, not cond
    assert loss.item() == pytest.approx(1.0)  # v = 0 against a target of 1
    loss = pm_flow(posterior_mean_sigma=0.0).loss(model, x1, torch.ones_like(cond), posterior_mean=estimate)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # v = cond = 1: exact


def test_flow_sampling_runs_the_ode_from_the_source_without_a_dial(generator):
    """On straight paths x̂1 = x0 + 0.5 cond: `sample` draws R + σ_s ε and transports it over every step; the
    fidelity dial is not the flow's any more (it acts on decoded images, `Upsampler.finish`)."""
    cond, estimate = torch.randn(1, 3, 4, 4, generator=generator), torch.randn(1, 3, 4, 4, generator=generator)
    noise = torch.randn(cond.shape, generator=torch.Generator().manual_seed(2))
    model = ConstantVelocity(0.5)
    result = pm_flow().sample(model, cond, torch.Generator().manual_seed(2), posterior_mean=estimate, num_steps=4)
    torch.testing.assert_close(result.x1, estimate + 0.2 * noise + 0.5 * cond)
    assert result.nfe == model.calls == 4
    x0 = pm_flow().draw_source(cond, torch.Generator().manual_seed(2), estimate)
    torch.testing.assert_close(pm_flow().transport(model, cond, x0, num_steps=2).x1, result.x1)


def test_detail_dial_runs_from_the_estimate_to_the_sample(generator, make_regression, make_posterior_mean):
    """x̂(d) = R + d (S − R) on the decoded images, from the same source noise at every d; at 0 the flow is
    skipped (NFE 1: R's pass)."""
    upsampler = make_posterior_mean(make_regression())
    image = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    draft = upsampler.draft(image, torch.Generator().manual_seed(2))
    assert not torch.allclose(draft.estimate, draft.sample, atol=1e-2)
    for detail in (0.0, 0.3, 1.0):
        result = upsampler.upscale(image, torch.Generator().manual_seed(2), detail=detail)
        expected = (draft.estimate + detail * (draft.sample - draft.estimate)).clamp(-1, 1)
        torch.testing.assert_close(result.image, expected)
        assert result.nfe == (1 if detail == 0 else 1 + 3)
    torch.testing.assert_close(upsampler.upscale(image, detail=0.0).image, draft.estimate)  # no noise drawn


def test_detail_is_refused_where_it_has_no_meaning(make_regression):
    image = torch.zeros(1, 3, 8, 8)
    for flow in (CouplingFlowMatcher(), CouplingFlowMatcher(source="noise"),
                 CouplingFlowMatcher(source="posterior_mean", objective="regression")):  # no estimate to dial to
        upsampler = make_regression()
        upsampler.flow = flow
        with pytest.raises(ValueError, match="detail 0.5 < 1 needs a posterior-mean upsampler"):
            upsampler.upscale(image, detail=0.5)
    with pytest.raises(ValueError, match=r"SamplerConfig.detail must be in \[0, 1\]"):
        SamplerConfig(detail=1.5)


def test_estimate_is_r_in_the_raw_latent_space_whatever_the_normalisations(generator, make_regression,
                                                                          make_posterior_mean):
    r = make_regression([0.3, -0.2, 0.0], [0.9, 1.1, 0.4])
    image = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    r_image = r.upscale(image).image
    upsampler = make_posterior_mean(r)
    assert upsampler.first_stage.latent_std.tolist() != r.first_stage.latent_std.tolist()
    draft = upsampler.draft(image, estimate=True, sample=False)
    assert draft.sample is None and (draft.estimate_nfe, draft.flow_nfe) == (1, 0)
    torch.testing.assert_close(draft.estimate, r_image)
    torch.testing.assert_close(upsampler.upscale(image, detail=0.0).image, draft.estimate)


def test_folder_is_self_contained_and_counts_r_in_the_nfe(tmp_path, generator, make_regression, make_posterior_mean):
    upsampler = make_posterior_mean(make_regression(), concat_cond=False)
    upsampler.save_pretrained(tmp_path / "pm")
    assert (tmp_path / "pm" / "posterior_mean" / "posterior_mean_stats.json").is_file()
    config = json.loads((tmp_path / "pm" / BOOST_CONFIG_NAME).read_text())
    assert config["flow"]["source"] == "posterior_mean" and config["flow"]["concat_cond"] is False
    loaded = Upsampler.from_pretrained(tmp_path / "pm")
    image = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    a = upsampler.upscale(image, torch.Generator().manual_seed(3))
    b = loaded.upscale(image, torch.Generator().manual_seed(3))
    assert a.nfe == b.nfe == 3 + 1  # three Euler steps and R's pass
    torch.testing.assert_close(a.image, b.image)
    assert loaded.upscale(image, detail=0.0).nfe == 1


def test_r_must_be_a_regression_model_and_a_posterior_mean_flow_needs_one(tmp_path, make_regression,
                                                                         make_posterior_mean):
    cfm = make_regression()
    cfm.flow = CouplingFlowMatcher()
    with pytest.raises(ValueError, match="must be a regression upsampler"):
        PosteriorMean.from_upsampler(cfm)
    with pytest.raises(ValueError, match="needs its posterior-mean model R"):
        Upsampler(CFMUNet.from_preset("tiny", latent_channels=3), IdentityAutoencoder(), pm_flow(), scale=2)
    upsampler = make_posterior_mean(make_regression())
    upsampler.save_pretrained(tmp_path / "pm")
    (tmp_path / "pm" / "posterior_mean" / "posterior_mean_stats.json").unlink()
    with pytest.raises(FileNotFoundError, match="posterior-mean model of this upsampler folder is missing"):
        Upsampler.from_pretrained(tmp_path / "pm")


def test_mixed_precision_runs_v_and_r_in_bf16_with_an_fp32_state_and_counts_every_evaluation(generator, make_regression,
                                                                                              make_posterior_mean):
    upsampler = make_posterior_mean(make_regression())
    image = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    full = upsampler.upscale(image, torch.Generator().manual_seed(3))
    mixed = upsampler.cast(torch.bfloat16).mixed_precision()
    assert mixed.mixed_precision() is mixed and mixed.model.dtype == mixed.posterior_mean.model.dtype == torch.bfloat16
    with mixed.model.counting(file=io.StringIO()):
        half = mixed.upscale(image, torch.Generator().manual_seed(3))
        evaluations = mixed.model.progress.n
    assert half.image.dtype == torch.float32 and evaluations == half.nfe - 1 == full.nfe - 1  # R's pass is not v's
    assert (half.image - full.image).abs().max() < 0.1  # bf16 rounding, not another sample
    with pytest.raises(RuntimeError):  # without the view, bf16 weights refuse the fp32 state
        upsampler.upscale(image, torch.Generator().manual_seed(3))


def test_upscale_times_its_stages(generator, make_regression, make_posterior_mean):
    upsampler = make_posterior_mean(make_regression())
    calls = []

    @contextlib.contextmanager
    def stages(name):
        calls.append(name)
        yield

    image = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    timed = upsampler.upscale(image, torch.Generator().manual_seed(3), stages=stages)
    assert calls[0] == "upsample" and set(calls[1:]) == {"decode"}  # canvas, R, source, ODE; then decode, dial, BP
    torch.testing.assert_close(timed.image, upsampler.upscale(image, torch.Generator().manual_seed(3)).image)
