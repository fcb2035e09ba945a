"""LCM bases, offline on randomly initialised LCM-shaped parts: the distilled-UNet recipe and SD1.5 + LCM-LoRA
(a random LoRA made with peft and saved with diffusers' `save_lora_weights`), in the library and `fmboost generate`."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline
from fmboost.models import CFMUNet, CouplingFlowMatcher, DiffusersAutoencoder, SamplerConfig, Upsampler
from fmboost.pipelines import BoostPipeline, fast_path
from fmboost.pipelines.cli import main
from fmboost.pipelines.lcm import base_defaults, load_lcm_lora
from fmboost.pipelines.random_sd import random_sd_components

BASE = dict(base_size=64, output_type="pt")  # 8² base latents → 16² → 128 px


def tiny_upsampler(vae) -> Upsampler:
    torch.manual_seed(0)
    return Upsampler(CFMUNet.from_preset("tiny", latent_channels=4).eval(),
                     DiffusersAutoencoder(vae, {"kind": "autoencoder_kl", "path": None}),
                     CouplingFlowMatcher(upsample="psu"), scale=2, sampler=SamplerConfig(num_steps=2))


def boost(parts) -> BoostPipeline:
    base = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = BoostPipeline.from_base(base, tiny_upsampler(parts["vae"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def unet_batches(pipe, **kwargs) -> tuple[torch.Tensor, list[int]]:
    """The image and the batch size of every base UNet call (2: a classifier-free guidance batch)."""
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        image = pipe("a cat", generator=seeded(), **BASE, **kwargs).images
    finally:
        hook.remove()
    return image, batches


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A random LoRA on the tiny UNet's attention projections, saved as diffusers saves trained LoRAs."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = random_sd_components("tiny")["unet"]
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    directory = tmp_path_factory.mktemp("lcm_lora")
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return directory


def test_base_defaults_by_scheduler_and_unet():
    plain, distilled = random_sd_components("tiny"), random_sd_components("tiny", lcm=True)
    assert base_defaults(plain["unet"], plain["scheduler"]) == (25, 7.5)
    assert base_defaults(plain["unet"], LCMScheduler.from_config(plain["scheduler"].config)) == (4, 1.0)  # LoRA
    assert base_defaults(distilled["unet"], distilled["scheduler"]) == (4, 8.5)  # guidance embedded


def test_lcm_distilled_base_takes_four_steps_without_a_guidance_batch():
    pipe = boost(random_sd_components("tiny", lcm=True))
    embeddings = []
    hook = pipe.unet.register_forward_hook(
        lambda module, args, kwargs, out: embeddings.append(kwargs["timestep_cond"]), with_kwargs=True)
    image, batches = unet_batches(pipe)
    hook.remove()
    assert batches == [1, 1, 1, 1] and image.shape == (1, 3, 128, 128)
    assert all(e is not None and e.shape == (1, 256) for e in embeddings)  # w = 8.5 − 1, embedded
    other, _ = unet_batches(pipe, guidance_scale=2.0)
    assert (other - image).abs().max() > 1e-3  # the embedded guidance is an input of the UNet


def test_lcm_lora_changes_the_base_and_fuses(lora_dir):
    pipe = boost(random_sd_components("tiny"))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    without, batches = unet_batches(pipe)
    assert batches == [1, 1, 1, 1]  # LCM-LoRA defaults: 4 steps, guidance 1 (no guidance batch)
    pipe.load_lora_weights(lora_dir)  # diffusers' loader, on the BoostPipeline itself
    unfused, _ = unet_batches(pipe)
    assert (unfused - without).abs().max() > 1e-2
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the merged weights stay: a plain UNet again
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())
    fused, _ = unet_batches(pipe)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=0)

    recipe = load_lcm_lora(boost(random_sd_components("tiny")), lora_dir)  # scheduler + load + fuse + unload
    assert isinstance(recipe.scheduler, LCMScheduler) and recipe.scheduler.config.steps_offset == 1
    torch.testing.assert_close(unet_batches(recipe)[0], fused, atol=1e-6, rtol=0)


def test_generate_with_lcm_lora_and_fast(lora_dir, tmp_path, monkeypatch, capsys):
    parts = random_sd_components("tiny")
    pipe = boost(parts)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "base")
    tiny_upsampler(parts["vae"]).save_pretrained(tmp_path / "upsampler")
    expected = load_lcm_lora(pipe, lora_dir)("a cat", generator=seeded(), base_size=64).images[0]
    monkeypatch.setattr(fast_path, "FAST_PATH_COMPILE", {**fast_path.FAST_PATH_COMPILE, "backend": "eager",
                                                         "mode": None})  # dynamo only: seconds, not minutes
    compiled = []
    enable = BoostPipeline.enable_fast_path
    monkeypatch.setattr(BoostPipeline, "enable_fast_path", lambda self, **kw: compiled.append(enable(self, **kw)))
    out = tmp_path / "cat.png"
    assert main(["generate", "a cat", "-o", str(out), "--base", str(tmp_path / "base"), "--upsampler",
                 str(tmp_path / "upsampler"), "--base-size", "64", "--lcm-lora", str(lora_dir), "--fast"]) == 0
    assert compiled == [True]
    difference = np.abs(np.asarray(PIL.Image.open(out), dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1  # the library recipe's image (8-bit levels)
    assert main(["generate", "a cat", "-o", str(out), "--base", str(tmp_path / "base"), "--upsampler",
                 str(tmp_path / "upsampler"), "--lcm-lora", str(tmp_path / "missing")]) == 2
    assert "could not load the LCM-LoRA" in capsys.readouterr().err


def test_a_plain_base_keeps_its_defaults():
    pipe = boost(random_sd_components("tiny"))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    _, batches = unet_batches(pipe, num_inference_steps=2)
    assert batches == [2, 2]  # guidance 7.5: the classifier-free guidance batch
