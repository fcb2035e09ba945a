"""The fast path (`BoostPipeline.enable_fast_path`): compiled image = eager image, no recompiles at the same sizes,
every network compiled, the eager fallback with a warning, and `--fast` on generate / upscale / serve."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import is_compiled_module
from fmboost.models import CFMUNet, CouplingFlowMatcher, DiffusersAutoencoder, SamplerConfig, Upsampler
from fmboost.pipelines import BoostPipeline, fast_path
from fmboost.pipelines.cli import build_parser, main
from fmboost.pipelines.random_sd import random_sd_components

BASE = dict(num_inference_steps=2, base_size=64, output_type="pt")  # 8² base latents → 16² → 128 px
#: The tolerance the README and `enable_fast_path` state: largest |fast − eager| in [0, 1], CPU, fp32.
TOLERANCE = 1e-4
#: torch.compile through dynamo alone (no inductor, no C++ compiler): the same wiring in seconds.
DYNAMO_ONLY = dict(backend="eager", mode=None)


def text_pipeline():
    parts = random_sd_components("tiny")
    base = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    torch.manual_seed(0)
    upsampler = Upsampler(CFMUNet.from_preset("tiny", latent_channels=4).eval(),
                          DiffusersAutoencoder(parts["vae"], {"kind": "autoencoder_kl", "path": None}),
                          CouplingFlowMatcher(upsample="psu"), scale=2, sampler=SamplerConfig(num_steps=2))
    pipe = BoostPipeline.from_base(base, upsampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_pipeline(make_regression, make_posterior_mean):
    """A posterior-mean upsampler (v_θ and R) without a base model."""
    pipe = BoostPipeline.from_upsampler(make_posterior_mean(make_regression()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.slow  # inductor compiles the tiny UNet and CFMUNet: ~30 s with a warm compile cache, ~2 min cold
def test_fast_path_matches_eager_and_does_not_recompile(caplog):
    pipe = text_pipeline()
    eager = pipe("a cat", generator=seeded(), **BASE).images
    assert pipe.enable_fast_path() and pipe.fast_path
    with caplog.at_level(logging.WARNING, logger="fmboost.pipelines.boost"):
        fast = pipe("a cat", generator=seeded(), **BASE).images
    assert [r.message for r in caplog.records if "compiling" in r.message] == [
        "fast path: compiling unet, cfm_unet with torch.compile; this first call is slow (and so is the first at "
        "any new size), later calls at the same sizes are fast"]
    assert 0 < (fast - eager).abs().max() <= TOLERANCE  # compiled kernels: rounding differs, the image does not
    caplog.clear()
    with torch._dynamo.config.patch(error_on_recompile=True), caplog.at_level(logging.WARNING):
        again = pipe("a cat", generator=seeded(), **BASE).images  # same sizes: the compiled graphs are reused
    assert not caplog.records  # said once
    torch.testing.assert_close(again, fast, atol=0, rtol=0)


def test_fast_path_compiles_every_network_and_disables(make_regression, make_posterior_mean):
    pipe = text_pipeline()
    eager = pipe("a cat", generator=seeded(), **BASE).images
    unet, cfm = pipe.unet, pipe.cfm_unet
    assert pipe.enable_fast_path(**DYNAMO_ONLY)
    assert is_compiled_module(pipe.unet) and is_compiled_module(pipe.cfm_unet) and pipe.regression_unet is None
    assert pipe.unet._orig_mod is unet and unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.upsampler.model.model is pipe.cfm_unet  # the render path runs the compiled v_θ
    torch.testing.assert_close(pipe("a cat", generator=seeded(), **BASE).images, eager, atol=TOLERANCE, rtol=0)
    pipe.disable_fast_path()
    assert pipe.unet is unet and pipe.cfm_unet is cfm and not pipe.fast_path
    assert unet.conv_in.weight.is_contiguous()

    pipe = image_pipeline(make_regression, make_posterior_mean)
    image = torch.rand(1, 3, 16, 16, generator=seeded())
    eager = pipe(image=image, generator=seeded(), output_type="pt").images
    assert pipe.enable_fast_path(**DYNAMO_ONLY)
    assert is_compiled_module(pipe.cfm_unet) and is_compiled_module(pipe.regression_unet) and pipe.unet is None
    torch.testing.assert_close(pipe(image=image, generator=seeded(), output_type="pt").images, eager, atol=TOLERANCE,
                               rtol=0)


def test_fast_path_saves_the_uncompiled_networks(tmp_path, make_regression, make_posterior_mean):
    pipe = image_pipeline(make_regression, make_posterior_mean)
    image = torch.rand(1, 3, 16, 16, generator=seeded())
    eager = pipe(image=image, generator=seeded(), output_type="pt").images
    pipe.enable_fast_path(**DYNAMO_ONLY)
    pipe.save_pretrained(tmp_path / "boost")
    loaded = BoostPipeline.from_pretrained(tmp_path / "boost")
    assert not loaded.fast_path and not is_compiled_module(loaded.cfm_unet)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded(image=image, generator=seeded(), output_type="pt").images, eager)


@pytest.mark.parametrize("failure", ["at compile", "at the first call"])
def test_fast_path_falls_back_to_eager_with_a_warning(monkeypatch, failure):
    """torch.compile raising (an unsupported Python) or its first call failing (no C++ compiler for inductor)."""
    def broken_compile(fn, **kwargs):
        if failure == "at compile":
            raise RuntimeError("torch.compile is not supported on this Python")

        def run(*args):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\n(long compiler log)")
        return run

    pipe = text_pipeline()
    eager = pipe("a cat", generator=seeded(), **BASE).images
    unet, cfm = pipe.unet, pipe.cfm_unet
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match=r"fast path unavailable on cpu, running eager .*: torch.compile failed: "
                                         r"RuntimeError: (torch.compile is not|InductorError: CppCompileError)"):
        assert pipe.enable_fast_path() is False
    assert pipe.unet is unet and pipe.cfm_unet is cfm and not pipe.fast_path
    assert unet.conv_in.weight.is_contiguous()  # eager means untouched
    torch.testing.assert_close(pipe("a cat", generator=seeded(), **BASE).images, eager, atol=0, rtol=0)


def test_the_fast_flag_on_upscale_and_serve(monkeypatch, tmp_path, make_regression, make_posterior_mean):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    helps = {name: next(a.help for a in commands[name]._actions if a.dest == "fast")
             for name in ("generate", "upscale", "serve")}
    assert len(set(helps.values())) == 1 and "torch.compile" in helps["upscale"]

    folder = tmp_path / "pm"
    make_posterior_mean(make_regression()).save_pretrained(folder)
    source = tmp_path / "in.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(source)
    monkeypatch.setattr(fast_path, "FAST_PATH_COMPILE", {**fast_path.FAST_PATH_COMPILE, **DYNAMO_ONLY})
    compiled = []
    compile_upsampler = fast_path.compile_upsampler  # upscale and serve render with the upsampler alone
    monkeypatch.setattr(fast_path, "compile_upsampler", lambda *a, **kw: compiled.append(compile_upsampler(*a, **kw)))
    for flags in ([], ["--fast"]):
        out = tmp_path / f"out{len(flags)}.png"
        assert main(["upscale", str(source), "-o", str(out), "--upsampler", str(folder), *flags]) == 0
    assert compiled == [True]
    eager, fast = (np.asarray(PIL.Image.open(tmp_path / f"out{n}.png"), dtype=np.int16) for n in (0, 1))
    assert np.abs(fast - eager).max() <= 1  # 8-bit levels: TOLERANCE can flip a rounding

    from fmboost.pipelines.serve import BoostService

    service = BoostService.load(str(folder), device="cpu", fast=True)
    assert compiled == [True, True] and is_compiled_module(service.upsampler.model.model)  # v_θ in its fp32 wrapper
