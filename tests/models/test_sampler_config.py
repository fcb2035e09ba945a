"""SamplerConfig: validation, the command-line string, JSON and older boost_config.json "sampler" dicts."""

import json

import pytest
import torch
from fmboost.models import SamplerConfig, sample_ode
from fmboost.models.sampler_config import SOLVE_FIELDS

STRINGS = ["euler:linear:10", "euler:logit_normal:mu=0.5,std=3:10", "midpoint:cosine:4",
           "euler:polynomial:power=1.25:3", "dopri5", "dopri5:atol=1e-05,rtol=0.001"]


@pytest.mark.parametrize("text", STRINGS)
def test_parse_format_round_trip(text):
    config = SamplerConfig.parse(text)
    assert config.format() == text
    assert SamplerConfig.parse(config.format()) == config and hash(SamplerConfig.parse(text)) == hash(config)


def test_parse_reads_fields_and_keeps_the_old_names():
    config = SamplerConfig.parse("euler:logit_normal:std=3,mu=0.5:10")  # params in any order
    assert config == SamplerConfig("euler", 10, "logit_normal", {"mu": 0.5, "std": 3.0})
    assert config.schedule_params == (("mu", 0.5), ("std", 3.0)) and not config.adaptive
    assert config.format() == "euler:logit_normal:mu=0.5,std=3:10"
    adaptive = SamplerConfig.parse("dopri5:atol=1e-5,rtol=1e-3")
    assert adaptive.adaptive and (adaptive.atol, adaptive.rtol) == (1e-5, 1e-3)
    assert adaptive.format() == "dopri5:atol=1e-05,rtol=0.001"  # eval-sr's method name, as before
    assert SamplerConfig.parse("dopri5:atol=1e-6,rtol=1e-3").format() == "dopri5"  # the defaults
    assert SamplerConfig(detail=0.5).format() == "euler:linear:4"  # detail has its own option
    assert SamplerConfig(back_project=2).format() == "euler:linear:4"  # and so has back-projection


@pytest.mark.parametrize("text, match", [
    ("euler", "num_steps"), ("euler:linear", "num_steps"), ("euler:wiggly:4", "schedule"),
    ("leapfrog:linear:4", "solver"), ("euler:linear:mu:4", "k=v"), ("dopri5:a:b", "tolerances"),
    ("dopri5:foo=1", "foo"), ("euler:linear:0", "num_steps"), ("euler:logit_normal:std=-1:4", "std"),
    ("euler:linear:mu=1:4", "mu"),
])
def test_parse_errors_name_the_bad_part(text, match):
    with pytest.raises(ValueError, match=match) as info:
        SamplerConfig.parse(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("fields, bad", [
    ({"solver": "leapfrog"}, "solver"), ({"num_steps": 0}, "num_steps"), ({"num_steps": 2.0}, "num_steps"),
    ({"num_steps": True}, "num_steps"), ({"schedule": "wiggly"}, "schedule"), ({"atol": 0.0}, "atol"),
    ({"rtol": -1.0}, "rtol"), ({"detail": 1.5}, "detail"), ({"detail": -0.1}, "detail"),
    ({"back_project": -1}, "back_project"), ({"back_project": 1.5}, "back_project"),
    ({"back_project": True}, "back_project"), ({"back_project": "2"}, "back_project"),
    ({"schedule_params": {"mu": "a"}}, "schedule_params"), ({"schedule_params": "mu"}, "schedule_params"),
])
def test_construction_is_validated(fields, bad):
    with pytest.raises(ValueError, match=f"SamplerConfig.{bad}"):
        SamplerConfig(**fields)


def test_replace_accepts_a_dict_and_names_unknown_keys():
    config = SamplerConfig().replace(schedule="logit_normal", schedule_params={"std": 2, "mu": 1})
    assert config.schedule_params == (("mu", 1.0), ("std", 2.0))
    assert {config, SamplerConfig("euler", 4, "logit_normal", (("std", 2.0), ("mu", 1.0)))} == {config}  # hashable
    with pytest.raises(ValueError, match="steps"):
        config.replace(steps=3)
    with pytest.raises(ValueError, match="detail"):
        config.replace(detail=2.0)


def test_json_round_trip():
    config = SamplerConfig("heun", 6, "logit_normal", {"mu": -1.0, "std": 3.0}, detail=0.25, back_project=3)
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["schedule_params"] == {"mu": -1.0, "std": 3.0} and stored["back_project"] == 3
    assert "temperature" not in stored
    assert SamplerConfig.from_dict(stored) == config


@pytest.mark.parametrize("old, expected", [
    ({"solver": "euler", "num_steps": 4, "schedule": "linear"}, SamplerConfig()),  # what training wrote
    ({"num_steps": 2}, SamplerConfig(num_steps=2)),  # missing keys: defaults
    ({}, SamplerConfig()),
    ({"solver": "euler", "num_steps": 8, "schedule": "logit_normal", "schedule_params": {"std": 3.0, "mu": 0.5},
      "detail": 0.5}, SamplerConfig("euler", 8, "logit_normal", (("mu", 0.5), ("std", 3.0)), detail=0.5)),
    ({"solver": "dopri5", "atol": 1e-5, "rtol": 1e-4, "schedule_params": None},
     SamplerConfig("dopri5", atol=1e-5, rtol=1e-4)),
    ({"solver": "euler", "num_steps": 4, "schedule": "linear", "temperature": 1.0, "detail": 0.5},
     SamplerConfig(detail=0.5)),  # the removed temperature at its neutral value: dropped
    ({"temperature": 1}, SamplerConfig()),
])
def test_older_sampler_dicts_load(old, expected):
    assert SamplerConfig.from_dict(old) == expected


@pytest.mark.parametrize("temperature", [0.5, 1.5, 0.0])
def test_a_stored_temperature_other_than_1_is_refused(temperature):
    with pytest.raises(ValueError, match=f"temperature {temperature} is no longer supported.*use detail instead"):
        SamplerConfig.from_dict({"num_steps": 4, "temperature": temperature})
    with pytest.raises(TypeError):
        SamplerConfig(temperature=temperature)  # not a field any more


def test_with_solve_takes_the_ode_fields_and_keeps_detail_and_back_projection():
    saved = SamplerConfig("euler", 4, "linear", detail=0.3, back_project=2)
    solve = SamplerConfig.parse("heun:logit_normal:std=3:6")
    combined = saved.with_solve(solve)
    assert combined.format() == solve.format() == "heun:logit_normal:std=3:6"
    assert (combined.detail, combined.back_project) == (0.3, 2)
    adaptive = saved.with_solve(SamplerConfig.parse("dopri5:atol=1e-05,rtol=0.001"))
    assert (adaptive.solver, adaptive.atol, adaptive.rtol, adaptive.detail) == ("dopri5", 1e-5, 1e-3, 0.3)
    assert set(SOLVE_FIELDS) == set(SamplerConfig().solve_kwargs())  # what the ODE takes, no more


def test_describe_names_everything_that_shapes_the_image():
    assert SamplerConfig(detail=0.5, back_project=2).describe() == "euler:linear:4 · detail 0.5 · BP2"
    assert SamplerConfig.parse("dopri5").describe() == "dopri5 · detail 1 · BP0"


def test_unknown_key_in_a_stored_dict_is_named():
    with pytest.raises(ValueError, match="unknown sampler keys \\['steps'\\]"):
        SamplerConfig.from_dict({"steps": 4})


def test_solve_kwargs_feed_sample_ode():
    config = SamplerConfig("midpoint", 3, "logit_normal", {"std": 3.0})
    x0 = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    result = sample_ode(lambda x, t: -x, x0, **config.solve_kwargs())
    assert result.nfe == 6  # midpoint: 2 per step
    torch.testing.assert_close(result.x1, x0 * torch.exp(torch.tensor(-1.0, dtype=torch.float64)), atol=2e-2, rtol=0)
