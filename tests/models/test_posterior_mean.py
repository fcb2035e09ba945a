"""Posterior-mean flows: the source R(cond) + σ_s ε, the fidelity dial, R inside the upsampler folder."""

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


@pytest.mark.parametrize("dial", ["blend", "end_time"])
def test_detail_dial_runs_from_the_estimate_to_the_sample(generator, dial):
    """On straight paths both dial forms give R(cond) + detail · (x̂1 − R(cond)) exactly, at 0 with no flow NFE."""
    cond, estimate = torch.randn(1, 3, 4, 4, generator=generator), torch.randn(1, 3, 4, 4, generator=generator)
    flow, model = pm_flow(dial=dial), ConstantVelocity(0.5)
    full = flow.sample(model, cond, torch.Generator().manual_seed(2), posterior_mean=estimate, num_steps=4)
    for detail in (0.0, 0.3, 1.0):
        result = flow.sample(model, cond, torch.Generator().manual_seed(2), posterior_mean=estimate, num_steps=4,
                             detail=detail)
        expected = estimate + detail * (full.x1 - estimate) if detail < 1 else full.x1
        if detail < 1:  # the blend and the noise-free end-time point coincide: x̂1 − R = σ_s ε + 0.5 cond
            torch.testing.assert_close(result.x1, expected)
        assert result.nfe == (0 if detail == 0 else 4)
    torch.testing.assert_close(flow.sample(model, cond, posterior_mean=estimate, detail=0.0).x1, estimate)


def test_temperature_scales_the_source_noise(generator):
    """On straight paths x̂1 = x0 + 0.5 cond, so the temperature's effect is exactly R + T σ_s ε + 0.5 cond."""
    cond, estimate = torch.randn(1, 3, 4, 4, generator=generator), torch.randn(1, 3, 4, 4, generator=generator)
    noise = torch.randn(cond.shape, generator=torch.Generator().manual_seed(2))
    for temperature in (0.0, 0.5, 1.0, 1.5):
        result = pm_flow().sample(ConstantVelocity(0.5), cond, torch.Generator().manual_seed(2),
                                  posterior_mean=estimate, num_steps=2, temperature=temperature)
        torch.testing.assert_close(result.x1, estimate + temperature * 0.2 * noise + 0.5 * cond)
    with pytest.raises(ValueError, match="temperature != 1 needs a posterior-mean flow"):
        CouplingFlowMatcher().sample(ConstantVelocity(), cond, temperature=0.5)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        pm_flow().sample(ConstantVelocity(), cond, posterior_mean=estimate, temperature=-1.0)
    with pytest.raises(ValueError, match="SamplerConfig.temperature"):
        SamplerConfig(temperature=float("inf"))


def test_detail_is_refused_where_it_has_no_meaning(generator):
    cond = torch.randn(1, 3, 4, 4, generator=generator)
    with pytest.raises(ValueError, match="detail < 1 needs a posterior-mean flow"):
        CouplingFlowMatcher().sample(ConstantVelocity(), cond, detail=0.5)
    with pytest.raises(ValueError, match=r"detail must be in \[0, 1\]"):
        pm_flow().sample(ConstantVelocity(), cond, posterior_mean=cond, detail=1.5)
    with pytest.raises(ValueError, match="dial must be one of"):
        pm_flow(dial="sideways")


def regression_upsampler(mean, std, seed=1):
    torch.manual_seed(seed)
    first_stage = IdentityAutoencoder()
    first_stage.set_latent_stats(torch.tensor(mean), torch.tensor(std))
    return Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), first_stage,
                     CouplingFlowMatcher(objective="regression"), scale=2)


def pm_upsampler(r: Upsampler, mean=(0.1, 0.0, -0.1), std=(0.5, 0.6, 0.7), **flow):
    torch.manual_seed(0)
    first_stage = IdentityAutoencoder()
    first_stage.set_latent_stats(torch.tensor(mean), torch.tensor(std))
    return Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), first_stage, pm_flow(**flow), scale=2,
                     sampler=SamplerConfig(num_steps=3), posterior_mean=PosteriorMean.from_upsampler(r))


def test_estimate_is_r_in_the_raw_latent_space_whatever_the_normalisations(generator):
    r = regression_upsampler([0.3, -0.2, 0.0], [0.9, 1.1, 0.4])
    image = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    r_image = r.first_stage.decode(r.upsample(lr_image=image).x1)
    upsampler = pm_upsampler(r)
    estimate = upsampler.posterior_mean(upsampler.condition(lr_image=image), upsampler.first_stage.latent_mean,
                                        upsampler.first_stage.latent_std)
    torch.testing.assert_close(upsampler.first_stage.decode(estimate), r_image)
    torch.testing.assert_close(upsampler.upsample(lr_image=image, detail=0.0).x1, estimate)


def test_folder_is_self_contained_and_counts_r_in_the_nfe(tmp_path, generator):
    upsampler = pm_upsampler(regression_upsampler([0.0] * 3, [1.0] * 3), concat_cond=False)
    upsampler.save_pretrained(tmp_path / "pm")
    assert (tmp_path / "pm" / "posterior_mean" / "posterior_mean_stats.json").is_file()
    config = json.loads((tmp_path / "pm" / BOOST_CONFIG_NAME).read_text())
    assert config["flow"]["source"] == "posterior_mean" and config["flow"]["concat_cond"] is False
    loaded = Upsampler.from_pretrained(tmp_path / "pm")
    image = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    a = upsampler.upsample(lr_image=image, generator=torch.Generator().manual_seed(3))
    b = loaded.upsample(lr_image=image, generator=torch.Generator().manual_seed(3))
    assert a.nfe == b.nfe == 3 + 1  # three Euler steps and R's pass
    torch.testing.assert_close(a.x1, b.x1)
    assert loaded.upsample(lr_image=image, detail=0.0).nfe == 1


def test_r_must_be_a_regression_model_and_a_posterior_mean_flow_needs_one(tmp_path):
    cfm = regression_upsampler([0.0] * 3, [1.0] * 3)
    cfm.flow = CouplingFlowMatcher()
    with pytest.raises(ValueError, match="must be a regression upsampler"):
        PosteriorMean.from_upsampler(cfm)
    with pytest.raises(ValueError, match="needs its posterior-mean model R"):
        Upsampler(CFMUNet.from_preset("tiny", latent_channels=3), IdentityAutoencoder(), pm_flow(), scale=2)
    upsampler = pm_upsampler(regression_upsampler([0.0] * 3, [1.0] * 3))
    upsampler.save_pretrained(tmp_path / "pm")
    (tmp_path / "pm" / "posterior_mean" / "posterior_mean_stats.json").unlink()
    with pytest.raises(FileNotFoundError, match="posterior-mean model of this upsampler folder is missing"):
        Upsampler.from_pretrained(tmp_path / "pm")


def test_mixed_precision_runs_v_and_r_in_bf16_with_an_fp32_state_and_counts_every_evaluation(generator):
    upsampler = pm_upsampler(regression_upsampler([0.0] * 3, [1.0] * 3))
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


def test_upscale_times_its_stages(generator):
    upsampler = pm_upsampler(regression_upsampler([0.0] * 3, [1.0] * 3))
    calls = []

    @contextlib.contextmanager
    def stages(name):
        calls.append(name)
        yield

    image = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    timed = upsampler.upscale(image, torch.Generator().manual_seed(3), stages=stages)
    assert calls == ["upsample", "upsample", "decode"]  # canvas + condition, source + ODE, decode
    torch.testing.assert_close(timed.image, upsampler.upscale(image, torch.Generator().manual_seed(3)).image)
