"""`fmboost generate "a prompt" -o out.png`: text → 256² base image → CFM → 1024² image.

`--base` is a diffusers SD-family pipeline (hub id or folder) or a saved BoostPipeline folder, an LCM one
included (4 steps without a guidance batch by default), or SD1.5 with `--lcm-lora`; `--upsampler` is an
upsampler folder (boost_config.json + CFMUNet weights); `--fast` compiles the networks. The options and loaders it
shares with `fmboost upscale` and `fmboost serve` are in `fmboost.pipelines.cli_options`; a missing or unreadable
model is a `UserError` saying what was looked for and how to provide it.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
from fmboost.pipelines.cli import UserError
from fmboost.pipelines.cli_options import (
    add_fast_argument,
    add_output_arguments,
    add_render_arguments,
    device_and_dtype,
    load_pipeline,
    render_settings,
    save_image,
)

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--base", default=DEFAULT_BASE, help="SD1.5 / LCM pipeline: hub id or folder, or a saved "
                                                             "BoostPipeline folder (then --upsampler is optional)")
    parser.add_argument("--upsampler", default=None, help="upsampler folder (boost_config.json + CFMUNet weights)")
    parser.add_argument("--lcm-lora", default=None, metavar="PATH_OR_REPO",
                        help="LCM-LoRA for an SD1.5 base (e.g. latent-consistency/lcm-lora-sdv1-5): an LCMScheduler, "
                             "the LoRA loaded with diffusers' load_lora_weights and fused (needs peft: "
                             "pip install \"fmboost[lora]\")")
    parser.add_argument("--base-steps", type=int, default=None,
                        help="base-model denoising steps (default 25; an LCM base or --lcm-lora: 4)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale of the base (default 7.5; an LCM base: no guidance batch, i.e. 1 with "
                             "--lcm-lora and the embedded 8.5 for an LCM-distilled UNet)")
    parser.add_argument("--base-size", type=int, default=256, help="base resolution in pixels")
    add_render_arguments(parser)
    add_output_arguments(parser)
    add_fast_argument(parser)


def apply_lcm_lora(pipe, lora: str):
    """`fmboost.pipelines.lcm.load_lcm_lora` with one-line errors for a missing peft or an unloadable LoRA."""
    from fmboost.pipelines.lcm import load_lcm_lora

    if importlib.util.find_spec("peft") is None:
        raise UserError('--lcm-lora needs peft (diffusers loads LoRAs through it): pip install "fmboost[lora]"')
    try:
        return load_lcm_lora(pipe, lora)
    except Exception as err:  # hub/network/file/key-mismatch errors come in many types; all mean "not loadable"
        raise UserError(f"could not load the LCM-LoRA {lora!r}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None


def pipeline_kwargs(args: argparse.Namespace, pipe, device: torch.device) -> dict:
    """The BoostPipeline call's render settings, passes, tiles and seeded generator from the command line."""
    return dict(sampler=render_settings(args, pipe.upsampler.sampler), cascade=args.cascade,
                tile_size=args.tile_size, tile_overlap=args.tile_overlap,
                generator=torch.Generator(device).manual_seed(args.seed))


def run(args: argparse.Namespace) -> int:
    device, dtype = device_and_dtype(args)
    pipe = load_pipeline(args.base, args.upsampler, dtype).to(device)
    if args.lcm_lora:
        apply_lcm_lora(pipe, args.lcm_lora)
    if args.fast:
        pipe.enable_fast_path()
    if args.tiled:
        pipe.enable_vae_tiling()
    out = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.base_steps,
               guidance_scale=args.guidance, base_size=args.base_size, **pipeline_kwargs(args, pipe, device))
    save_image(out.images[0], args.output)
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in out.timings.items())
    print(f"wrote {args.output} ({out.images[0].width}x{out.images[0].height}, NFE {out.nfe}; {timings})")
    return 0
