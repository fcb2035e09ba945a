"""Randomly initialised Stable-Diffusion-family parts at real or reduced sizes, built from config dicts.

Why: SD / LCM weights cannot be downloaded offline, yet the pipelines must be tested (`tiny`) and their
latency measured at the real architecture (`real`: the compute of SD1.5 without its weights). The parts
plug into diffusers' `StableDiffusionPipeline` and `BoostPipeline.from_base` like the downloaded ones.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

# SD1.5 architecture (stable-diffusion-v1-5 config.json values); "small"/"tiny" keep its shape, fewer channels.
SD_SIZES: dict[str, dict] = {
    "real": dict(unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                           cross_attention_dim=768, norm_num_groups=32),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
    "small": dict(unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, attention_head_dim=8,
                            cross_attention_dim=256, norm_num_groups=32),
                  vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32),
                  text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)),
    "tiny": dict(unet=dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8,
                           cross_attention_dim=32, norm_num_groups=8),
                 vae=dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)),
}
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def load_tokenizer(directory: str | Path | None = None):
    """The real CLIP tokenizer (`directory`, else $FMBOOST_SHARED/tokenizers/clip), else a toy byte-level
    vocabulary."""
    from fmboost.models.assets import shared_path
    from transformers import CLIPTokenizer

    directory = directory or shared_path("tokenizers/clip")
    if directory is not None:
        return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)
    return toy_tokenizer(Path(tempfile.mkdtemp(prefix="fmboost-toy-clip-")))


def toy_tokenizer(directory: Path):
    """A CLIPTokenizer over lower-case letters/digits (no merges): enough for offline tests."""
    from transformers import CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def random_sd_components(size: str = "tiny", lcm: bool = False, tokenizer=None, seed: int = 0) -> dict:
    """Randomly initialised SD1.5-shaped text_encoder/tokenizer/unet/scheduler/vae (`size`: real|small|tiny).

    lcm=True gives an LCM-style UNet (guidance embedding, time_cond_proj_dim) and an LCMScheduler.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in SD_SIZES:
        raise ValueError(f"size must be one of {list(SD_SIZES)}, got {size!r}")
    spec = SD_SIZES[size]
    tokenizer = tokenizer or load_tokenizer()
    torch.manual_seed(seed)
    levels = len(spec["unet"]["block_out_channels"])
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, down_block_types=down,
                                up_block_types=up, time_cond_proj_dim=256 if lcm else None, **spec["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=256 if size == "tiny" else 512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.18215, **spec["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tokenizer), 49408), max_position_embeddings=77,
                                                hidden_act="quick_gelu", **spec["text"]))
    scheduler = (LCMScheduler(steps_offset=1, **SD_BETAS) if lcm else
                 DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **SD_BETAS))
    return dict(text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
                vae=vae.eval())
