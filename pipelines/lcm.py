"""LCM bases: the defaults that make a Latent Consistency Model base fast, and the LCM-LoRA recipe.

The paper's fast configuration boosts an LCM base. Two ways to one, both plain diffusers parts for
`BoostPipeline.from_base` (or `fmboost generate --base ... [--lcm-lora ...]`):

* an LCM-distilled SD1.5 UNet with its `LCMScheduler` (a `LatentConsistencyModelPipeline` folder or hub id);
  its config has `time_cond_proj_dim`: the guidance scale is an input embedding, not a second UNet batch;
* SD1.5 + LCM-LoRA: `load_lcm_lora(pipe, "latent-consistency/lcm-lora-sdv1-5")` on any SD1.5 pipeline.

Either way the base takes 4 steps with one UNet call per step (no classifier-free guidance batch), which is what
`base_defaults` gives when the scheduler is an `LCMScheduler`.
"""

from __future__ import annotations

from diffusers import LCMScheduler

DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 7.5
LCM_STEPS = 4
#: LCM-LoRA on an SD1.5 UNet: guidance 1, i.e. classifier-free guidance off (diffusers' LCM-LoRA guide).
LCM_LORA_GUIDANCE = 1.0
#: An LCM-distilled UNet embeds w = guidance − 1 (trained on a range of w, so 1 would be off its training range):
#: `LatentConsistencyModelPipeline`'s default; it costs no extra UNet call.
LCM_EMBEDDED_GUIDANCE = 8.5


def base_defaults(unet, scheduler) -> tuple[int, float]:
    """(num_inference_steps, guidance_scale) for a base with this UNet and scheduler: 25 steps at guidance 7.5, or,
    with an LCMScheduler, 4 steps without a guidance batch (guidance 1 for LCM-LoRA, the embedded default 8.5 for a
    UNet with `time_cond_proj_dim`)."""
    if not isinstance(scheduler, LCMScheduler):
        return DEFAULT_STEPS, DEFAULT_GUIDANCE
    embedded = unet is not None and unet.config.get("time_cond_proj_dim") is not None
    return LCM_STEPS, LCM_EMBEDDED_GUIDANCE if embedded else LCM_LORA_GUIDANCE


def load_lcm_lora(pipe, lora: str, **load_kwargs):
    """diffusers' LCM-LoRA recipe on `pipe` (an SD-family pipeline or a BoostPipeline; returns it): an LCMScheduler
    from the current scheduler's config, `load_lora_weights(lora)` (a hub id, folder or .safetensors file; needs
    peft), then `fuse_lora()` and `unload_lora_weights()`, which leave a plain UNet with the LoRA merged into its
    weights: no per-step LoRA matmuls, and the fast path compiles it as it compiles SD1.5's."""
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(lora, **load_kwargs)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe
