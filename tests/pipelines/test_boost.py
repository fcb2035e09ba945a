"""BoostPipeline end to end with tiny random SD-style components (offline, CPU)."""

import contextlib
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fmboost.models import (
    CFMUNet,
    CouplingFlowMatcher,
    DiffusersAutoencoder,
    IdentityAutoencoder,
    SamplerConfig,
    Upsampler,
)
from fmboost.pipelines import BoostPipeline, BoostPipelineOutput
from fmboost.pipelines.random_sd import random_sd_components

BASE = dict(num_inference_steps=2, base_size=64)  # 8² base latents → 16² → 128 px


def make_upsampler(first_stage, upsample="psu", scale=2):
    torch.manual_seed(0)
    model = CFMUNet.from_preset("tiny", latent_channels=first_stage.latent_channels).eval()
    return Upsampler(model, first_stage, CouplingFlowMatcher(upsample=upsample, noising_step=400), scale=scale,
                     sampler=SamplerConfig(num_steps=2))


def boost(parts, upsample="psu"):
    base = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    first_stage = DiffusersAutoencoder(parts["vae"], {"kind": "autoencoder_kl", "path": None})
    first_stage.set_latent_stats(torch.full((4,), 0.1), torch.full((4,), 0.9))
    pipe = BoostPipeline.from_base(base, make_upsampler(first_stage, upsample))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def parts():
    return random_sd_components("tiny")


@pytest.fixture(scope="module")
def pipe(parts):
    return boost(parts)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_text_to_image_every_output_type(pipe):
    out = pipe("a photo of a cat", generator=seeded(), output_type="pt", **BASE)
    assert isinstance(out, BoostPipelineOutput) and out.images.shape == (1, 3, 128, 128)
    assert 0 <= out.images.min() and out.images.max() <= 1
    assert out.nfe == 2 and set(out.timings) == {"base", "upsample", "decode"}
    array = pipe("a photo of a cat", generator=seeded(), output_type="np", **BASE).images
    np.testing.assert_allclose(array[0], out.images[0].permute(1, 2, 0).numpy(), atol=1e-5)
    pil = pipe("a photo of a cat", generator=seeded(), output_type="pil", **BASE).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (128, 128)
    latent = pipe("a photo of a cat", generator=seeded(), output_type="latent", **BASE)
    assert latent.images.shape == (1, 4, 16, 16) and "encode" in latent.timings  # the latents of the same image
    torch.testing.assert_close(latent.images, pipe.first_stage().encode(out.images * 2 - 1), atol=1e-4, rtol=1e-4)
    images, nfe, timings = pipe("a photo of a cat", generator=seeded(), output_type="pt", return_dict=False, **BASE)
    torch.testing.assert_close(images, out.images)


def test_generator_reproducibility(pipe):
    a = pipe("a red house", generator=seeded(1), output_type="pt", **BASE).images
    b = pipe("a red house", generator=seeded(1), output_type="pt", **BASE).images
    c = pipe("a red house", generator=seeded(2), output_type="pt", **BASE).images
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3


def test_batch_num_images_and_generator_list(pipe):
    out = pipe(["a cat", "a dog"], num_images_per_prompt=2, generator=[seeded(i) for i in range(4)],
               output_type="pt", upsample_steps=3, solver="midpoint", schedule="logit_normal",
               schedule_params={"mu": 0.0, "std": 1.0}, **BASE)
    assert out.images.shape == (4, 3, 128, 128) and out.nfe == 6  # midpoint: 2 NFE per step
    single = pipe("a dog", num_images_per_prompt=2, generator=[seeded(2), seeded(3)], output_type="pt",
                  upsample_steps=3, solver="midpoint", schedule="logit_normal", schedule_params={"mu": 0.0, "std": 1.0},
                  **BASE).images
    torch.testing.assert_close(single, out.images[2:], atol=1e-4, rtol=1e-4)  # each sample seeded by its generator


def test_sampler_config_and_its_overrides(pipe):
    midpoint = SamplerConfig("midpoint", 3, "logit_normal", {"std": 1.0})
    out = pipe("a cat", sampler=midpoint, generator=seeded(), output_type="latent", **BASE)
    assert out.nfe == 6 and pipe.upsampler.sampler == SamplerConfig(num_steps=2)  # the saved one is kept
    same = pipe("a cat", upsample_steps=3, solver="midpoint", schedule="logit_normal", schedule_params={"std": 1.0},
                generator=seeded(), output_type="latent", **BASE)
    torch.testing.assert_close(same.images, out.images)
    assert pipe("a cat", sampler=midpoint, upsample_steps=1, output_type="latent", **BASE).nfe == 2  # kwarg wins
    with pytest.raises(ValueError, match="SamplerConfig.num_steps"):
        pipe("a cat", upsample_steps=0, **BASE)


def test_upsampler_is_built_once(parts, monkeypatch):
    builds = []
    build = Upsampler.from_config.__func__
    monkeypatch.setattr(Upsampler, "from_config",
                        classmethod(lambda cls, *args, **kwargs: builds.append(args) or build(cls, *args, **kwargs)))
    pipe = boost(parts)  # built once, by the caller: the pipeline holds it
    held = pipe.upsampler
    pipe("a cat", generator=seeded(), output_type="latent", noising_step=100, **BASE)
    pipe(image=torch.rand(1, 3, 32, 32), output_type="latent")
    assert pipe.upsampler is held and len(builds) == 0
    assert held.flow.noising_step == 400  # a per-call override does not stick
    assert pipe.first_stage() is held.first_stage and held.first_stage.vae is pipe.vae
    pipe.vae = random_sd_components("tiny", tokenizer=parts["tokenizer"])["vae"]  # a replaced component is picked up
    assert pipe.upsampler is not held and pipe.upsampler.first_stage.vae is pipe.vae


def test_lcm_base_and_latent_coupling(parts):
    lcm = boost(random_sd_components("tiny", lcm=True, tokenizer=parts["tokenizer"]), upsample="bilinear")
    seen = []

    def on_step(pipeline, step, timestep, kwargs):
        seen.append(step)
        return kwargs

    out = lcm("a cat", guidance_scale=8.0, generator=seeded(), output_type="pt", callback_on_step_end=on_step, **BASE)
    assert out.images.shape == (1, 3, 128, 128) and seen == [0, 1]


def test_noising_step_override_and_preview_decoder(pipe):
    from diffusers import AutoencoderTiny

    a = pipe("a cat", generator=seeded(), output_type="latent", **BASE).images
    b = pipe("a cat", generator=seeded(), output_type="latent", noising_step=100, **BASE).images
    assert (a - b).abs().max() > 1e-3
    torch.manual_seed(0)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4).eval()
    out = pipe("a cat", generator=seeded(), output_type="pt", preview_vae=taesd, **BASE)
    assert out.images.shape == (1, 3, 128, 128)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = BoostPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.boost_config == pipe.config.boost_config
    assert loaded.first_stage().latent_std.tolist() == pytest.approx([0.9] * 4)
    a = pipe("a cat", generator=seeded(), output_type="pt", **BASE).images
    b = loaded("a cat", generator=seeded(), output_type="pt", **BASE).images
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cascade_two_passes(pipe):
    out = pipe("a cat", cascade=2, generator=seeded(), output_type="pt", **BASE)
    assert out.images.shape == (1, 3, 256, 256) and out.nfe == 4


def test_tiled_decode_matches_untiled(pipe):
    # 192 px base → 48² latents after ×2: above the tiny VAE's 32² tile, so tiling really happens.
    kwargs = dict(num_inference_steps=1, base_size=192, output_type="pt")
    plain = pipe("a cat", generator=seeded(), **kwargs).images
    pipe.enable_vae_tiling()
    try:
        tiled = pipe("a cat", generator=seeded(), **kwargs).images
    finally:
        pipe.disable_vae_tiling()
    assert tiled.shape == plain.shape == (1, 3, 384, 384)
    # Random weights + per-tile GroupNorm statistics: close, not identical (trained VAEs are closer).
    psnr = 10 * torch.log10(1 / ((tiled - plain) ** 2).mean())
    assert psnr > 20, f"tiled vs untiled decode: {psnr:.1f} dB"


def test_super_resolve_images_and_latents(pipe):
    rgb = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)  # non-square, multiple of 8
    from_pil = pipe(image=PIL.Image.fromarray(rgb), generator=seeded(), output_type="pt")
    assert from_pil.images.shape == (1, 3, 96, 160) and "base" not in from_pil.timings
    from_np = pipe(image=rgb, generator=seeded(), output_type="pt").images
    torch.testing.assert_close(from_np, from_pil.images)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    from_pt = pipe(image=tensor, num_images_per_prompt=2, generator=seeded(), output_type="pt").images
    assert from_pt.shape == (2, 3, 96, 160)
    latents = torch.randn(1, 4, 6, 10, generator=seeded())
    assert pipe(image=latents, output_type="pt").images.shape == (1, 3, 96, 160)


def test_pixel_space_upsampler_without_base():
    pipe = BoostPipeline.from_upsampler(make_upsampler(IdentityAutoencoder(), upsample="bicubic"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=torch.rand(1, 3, 12, 20), output_type="np")
    assert out.images.shape == (1, 24, 40, 3)
    with pytest.raises(ValueError, match="needs a base model"):
        pipe("a cat")


@pytest.mark.shared
def test_taef2_upsampler_text_and_image(parts, taef2_dir, faces_dir):
    from fmboost.models import TAEF2Autoencoder

    upsampler = make_upsampler(TAEF2Autoencoder(taef2_dir))
    base = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = BoostPipeline.from_base(base, upsampler)
    pipe.set_progress_bar_config(disable=True)
    text = pipe("a cat", generator=seeded(), output_type="pt", **BASE)  # SD base image → TAEF2 PSU
    assert text.images.shape == (1, 3, 128, 128)
    photos = sorted(p for p in faces_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    face = PIL.Image.open(photos[0]).convert("RGB").resize((64, 48))
    out = pipe(image=face, generator=seeded(), output_type="pt")
    assert out.images.shape == (1, 3, 96, 128) and out.nfe == 2


def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match="multiple of 8"):  # any size for images out, not for latents out
        pipe(image=np.zeros((50, 64, 3), dtype=np.uint8), output_type="latent")
    with pytest.raises(ValueError, match="exactly one of prompt"):
        pipe("a cat", image=np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="exactly one of prompt"):
        pipe()
    with pytest.raises(ValueError, match="output_type"):
        pipe("a cat", output_type="jpeg")
    with pytest.raises(ValueError, match="cascade"):
        pipe("a cat", cascade=0)
    with pytest.raises(ValueError, match="3 channels"):
        pipe(image=torch.zeros(1, 5, 16, 16))
    with pytest.raises(ValueError, match="needs a posterior-mean upsampler"):
        pipe("a cat", detail=0.5, **BASE)
    with pytest.raises(ValueError, match="back_project"):
        pipe("a cat", back_project=-1, **BASE)


def test_half_precision_on_cpu_is_a_clear_error(parts):
    pipe = boost(random_sd_components("tiny", tokenizer=parts["tokenizer"]))
    pipe.cfm_unet.to(torch.float16)
    with pytest.raises(ValueError, match="half precision needs a GPU"):
        pipe("a cat", **BASE)


def test_progress_bars_follow_config(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    try:
        pipe("a cat", generator=seeded(), output_type="latent", **BASE)
    finally:
        pipe.set_progress_bar_config(disable=True)
    err = capsys.readouterr().err
    assert "base" in err and "upsample" in err
    pipe("a cat", generator=seeded(), output_type="latent", **BASE)
    assert "upsample" not in capsys.readouterr().err


def test_posterior_mean_pipeline_text_image_save_load_and_detail(parts, tmp_path):
    """R is a pipeline component: text → image and image → image run it, the dial reaches it, it saves and loads."""
    from fmboost.models.posterior_mean import PosteriorMean

    base = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    first_stage = DiffusersAutoencoder(parts["vae"], {"kind": "autoencoder_kl", "path": None})
    first_stage.set_latent_stats(torch.full((4,), 0.1), torch.full((4,), 0.9))
    torch.manual_seed(1)
    r = Upsampler(CFMUNet.from_preset("tiny", latent_channels=4).eval(), first_stage,
                  CouplingFlowMatcher(objective="regression"), scale=2)
    upsampler = make_upsampler(first_stage)
    upsampler = Upsampler(upsampler.model, first_stage, CouplingFlowMatcher(source="posterior_mean"), scale=2,
                          sampler=upsampler.sampler, posterior_mean=PosteriorMean.from_upsampler(r))
    pipe = BoostPipeline.from_base(base, upsampler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", generator=seeded(), output_type="latent", **BASE)
    assert out.nfe == 2 + 1
    image = torch.rand(1, 3, 48, 48, generator=seeded())
    estimate = pipe(image=image, detail=0.0, output_type="latent")
    expected = first_stage.encode(upsampler.upscale(image * 2 - 1, detail=0.0).image)
    assert estimate.nfe == 1  # R's pass: the flow is skipped where the dial does not use it
    torch.testing.assert_close(estimate.images, expected, atol=1e-5, rtol=1e-4)
    pipe.save_pretrained(tmp_path)
    loaded = BoostPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    again = loaded("a cat", generator=seeded(), output_type="latent", **BASE)
    torch.testing.assert_close(again.images, out.images, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="needs its regression_unet"):
        BoostPipeline(pipe.cfm_unet, boost_config=pipe.config.boost_config)


@pytest.mark.parametrize("upsample", ["psu", "bilinear"])
def test_pipeline_renders_through_upscale_with_the_dial_and_back_projection(parts, upsample, tmp_path):
    """A calibrated dial and back-projection, for PSU and latent up-sampling: the pipeline's image is
    `Upsampler.upscale`'s, the NFE counts R and the flow, and the calibration travels with the pipeline."""
    from fmboost.models.detail_bands import DetailCalibration
    from fmboost.models.posterior_mean import PosteriorMean

    base = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    first_stage = DiffusersAutoencoder(parts["vae"], {"kind": "autoencoder_kl", "path": None})
    torch.manual_seed(1)
    r = Upsampler(CFMUNet.from_preset("tiny", latent_channels=4).eval(), first_stage,
                  CouplingFlowMatcher(objective="regression", upsample=upsample), scale=2)
    upsampler = make_upsampler(first_stage)
    upsampler = Upsampler(upsampler.model, first_stage, CouplingFlowMatcher(source="posterior_mean", upsample=upsample),
                          scale=2, sampler=upsampler.sampler.replace(back_project=2),
                          posterior_mean=PosteriorMean.from_upsampler(r),
                          detail_calibration=DetailCalibration((1.0,), (0.2, 0.6), sampler="euler:linear:2",
                                                               back_project=2))
    pipe = BoostPipeline.from_base(base, upsampler)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 48, 48, generator=seeded())
    for detail, back_project in ((0.5, None), (0.5, 0), (1.0, 3)):
        fitted = back_project is None or detail == 1.0  # a dial used with other settings than it was fitted with warns
        with contextlib.nullcontext() if fitted else pytest.warns(UserWarning, match="fitted on euler:linear:2"):
            out = pipe(image=image, detail=detail, back_project=back_project, generator=seeded(3), output_type="pt")
        assert out.nfe == 2 + 1
        with warnings.catch_warnings(action="ignore"):
            expected = upsampler.upscale(image * 2 - 1, seeded(3), detail=detail, back_project=back_project)
        torch.testing.assert_close(out.images, (expected.image / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=1e-4)
    pipe.save_pretrained(tmp_path)
    loaded = BoostPipeline.from_pretrained(tmp_path)
    assert loaded.upsampler.detail_calibration == upsampler.detail_calibration
    assert loaded.upsampler.sampler.back_project == 2
    from_upsampler = BoostPipeline.from_upsampler(upsampler)
    assert from_upsampler.upsampler.detail_calibration == upsampler.detail_calibration


def test_text_to_image_back_projects_onto_the_base_image(parts):
    """In text → image, back-projection makes the output agree with the base model's own decoded image."""
    from fmboost.models.consistency import downsample

    pipe = boost(parts)
    base = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    low_res = base("a cat", generator=seeded(), output_type="pt", height=64, width=64, num_inference_steps=2).images
    errors = []
    for steps in (0, 4):
        out = pipe("a cat", back_project=steps, generator=seeded(), output_type="pt", **BASE).images
        errors.append((downsample(out * 2 - 1, (64, 64)) - (low_res * 2 - 1)).square().mean().item())
    assert errors[1] < 0.25 * errors[0], errors


def test_the_pipeline_holds_the_upsampler_it_was_given(parts, monkeypatch):
    """from_base / from_upsampler keep the given upsampler (no boost_config round trip, no from_dict); a replaced
    component is followed; `sampler` takes a spec string, merged with detail / back_project the way commands do."""
    first_stage = DiffusersAutoencoder(parts["vae"], {"kind": "autoencoder_kl", "path": None})
    first_stage.set_latent_stats(torch.full((4,), 0.1), torch.full((4,), 0.9))
    upsampler = make_upsampler(first_stage)
    calls = []
    for cls in (CouplingFlowMatcher, SamplerConfig):
        original = cls.from_dict.__func__
        monkeypatch.setattr(cls, "from_dict", classmethod(lambda c, d, f=original: calls.append(c) or f(c, d)))
    pipe = BoostPipeline.from_upsampler(upsampler)
    pipe.set_progress_bar_config(disable=True)
    held = pipe.upsampler
    assert held.model.model is upsampler.model and held.first_stage is first_stage and held.flow is upsampler.flow
    image = torch.rand(1, 3, 48, 48, generator=seeded())
    out = pipe(image=image, sampler="midpoint:linear:1", back_project=1, generator=seeded(2), output_type="pt")
    expected = upsampler.upscale(image * 2 - 1, seeded(2), SamplerConfig("midpoint", 1, "linear", back_project=1))
    torch.testing.assert_close(out.images, (expected.image / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=1e-4)
    assert out.nfe == 2 and calls == [] and pipe.upsampler is held  # built once, by the caller
    pipe.vae = parts["vae"].__class__(**parts["vae"].config)  # another VAE of the same latent space: followed
    assert pipe.upsampler.first_stage.vae is pipe.vae
    torch.testing.assert_close(pipe.upsampler.first_stage.latent_mean, first_stage.latent_mean)
    with pytest.warns(DeprecationWarning, match="upsample_steps"):
        pipe(image=image, upsample_steps=1, output_type="pt")
