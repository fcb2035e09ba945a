"""`fmboost generate "a prompt" -o out.png`: text → 256² base image → CFM → 1024² image.

`--base` is a diffusers SD-family pipeline (hub id or folder) or a saved BoostPipeline folder, an LCM one
included (4 steps without a guidance batch by default), or SD1.5 with `--lcm-lora`; `--upsampler` is an
upsampler folder (boost_config.json + CFMUNet weights); `--fast` compiles the networks. The loaders here are
shared with `fmboost upscale`; a missing or unreadable model is a `UserError` saying what was looked
for and how to provide it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from fmboost.models import SamplerConfig
from fmboost.pipelines.cli import UserError

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    """How the upsampler renders: the same three options on generate, upscale and serve (eval-sr and
    calibrate-detail take lists of the same); each defaults to the upsampler folder's saved setting."""
    parser.add_argument("--sampler", default=None, metavar="SPEC",
                        help="ODE solve: solver:schedule:steps (euler:linear:4, heun:cosine:2) or an adaptive solver "
                             "(dopri5) (default: the upsampler's saved sampler)")
    parser.add_argument("--detail", type=float, default=None, metavar="D",
                        help="fidelity dial of posterior-mean upsamplers, 0..1: 0 = the estimate (best PSNR, "
                             "smooth), 1 = the flow's full detail (default: the upsampler's saved value)")
    parser.add_argument("--back-project", type=int, default=None, metavar="N",
                        help="steps of back-projection onto the low-res image after the dial, 0 = none (default: "
                             "the upsampler's saved value, the one measured best on its validation images)")


#: `--fast` on generate, upscale and serve (one text, so the three commands describe one switch).
FAST_HELP = ("fast path: compile the base UNet and the upsampler's networks with torch.compile (diffusers' recipe: "
             "channels-last, mode reduce-overhead, static shapes); the first image at each size compiles (slow), "
             "later ones at the same size are fast, so it pays off over many images; where torch.compile cannot "
             "run it warns and stays eager")


def add_fast_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fast", action="store_true", help=FAST_HELP)


def render_settings(args: argparse.Namespace, saved: SamplerConfig) -> SamplerConfig:
    """The folder's saved setting with the command line's --sampler / --detail / --back-project (their ranges
    are checked by SamplerConfig: a bad value is a ValueError naming it)."""
    return saved.override(args.sampler, detail=args.detail, back_project=args.back_project)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by generate and upscale: device, output, passes and tiles."""
    parser.add_argument("-o", "--output", required=True, help="output image path (.png, .jpg, ...)")
    parser.add_argument("--cascade", type=int, default=1, help="passes (2 with a ×2 model: 512 → 1024 → 2048 px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--tiled", action="store_true", help="diffusers' tiled VAE decode (SD-VAE upsamplers)")
    parser.add_argument("--tile-size", type=int, default=None, metavar="PX",
                        help="upscale in overlapping tiles of PX output pixels (bounded memory); default: tiles of "
                             "1024 px when the output is larger than 1024 px, 0: never tile")
    parser.add_argument("--tile-overlap", type=int, default=None, metavar="PX",
                        help="overlap of neighbouring tiles in output pixels (default 128)")


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


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu" and dtype != torch.float32:
        raise UserError(f"--dtype {args.dtype} needs a GPU; on the CPU use --dtype float32")
    return device, dtype


def is_boost_pipeline(path: str) -> bool:
    index = Path(path) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "BoostPipeline"


def check_upsampler_folder(directory: str) -> Path:
    """Fail fast (before loading a base model) on a missing or incomplete upsampler folder."""
    from fmboost.models import BOOST_CONFIG_NAME

    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"upsampler folder {directory!r} not found: pass the folder written by training "
                        f"(it holds {BOOST_CONFIG_NAME}, config.json and diffusion_pytorch_model.safetensors)")
    for name in (BOOST_CONFIG_NAME, "config.json"):
        if not (path / name).is_file():
            raise UserError(f"upsampler folder {directory!r} has no {name}: not a saved fmboost upsampler")
    return path


def load_upsampler(directory: str, vae=None):
    """An `Upsampler` folder; SD-VAE upsamplers reuse `vae` (the base's) instead of loading their own."""
    from fmboost.models import Upsampler

    path = check_upsampler_folder(directory)
    try:
        return Upsampler.from_pretrained(path, vae=vae)
    except OSError as err:  # missing weights file, unreadable safetensors, the VAE it names not found
        raise UserError(f"could not load the upsampler from {directory!r}: {str(err).splitlines()[0]}") from None


def load_diffusers(path: str, what: str, loader, torch_dtype: torch.dtype = torch.float32):
    """`loader(path)` with a one-line message for a missing folder/file, unknown id or no network."""
    kwargs = {} if torch_dtype == torch.float32 else {"torch_dtype": torch_dtype}
    local = Path(path)
    if local.exists() and not (local / "model_index.json").is_file():
        raise UserError(f"{what} folder {path!r} has no model_index.json: save one there with "
                        "pipe.save_pretrained(folder), or give a Hugging Face hub id")
    try:
        return loader(path, **kwargs)
    except Exception as err:  # hub/network/file errors come in many types; all mean "not loadable here"
        where = "the local folder" if local.exists() else "the Hugging Face Hub (is there network access?)"
        raise UserError(f"could not load {what} {path!r} from {where}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''} — give a folder saved with "
                        "save_pretrained (model_index.json + component folders) or a reachable hub id") from None


def load_pipeline(base: str | None, upsampler: str | None, dtype: torch.dtype):
    """BoostPipeline from a saved BoostPipeline folder, or an SD-family base + an upsampler folder."""
    from diffusers import DiffusionPipeline
    from fmboost.pipelines.boost import BoostPipeline

    if upsampler is not None:
        check_upsampler_folder(upsampler)
    if base is not None and is_boost_pipeline(base):
        pipe = load_diffusers(base, "BoostPipeline", BoostPipeline.from_pretrained, torch_dtype=dtype)
        if upsampler is None:
            return pipe
        return BoostPipeline.from_base(pipe, load_upsampler(upsampler, pipe.vae).cast(dtype))
    if upsampler is None:
        raise UserError("--upsampler DIR is required (a folder with boost_config.json) unless --base is a saved "
                        "BoostPipeline folder")
    base_pipe = load_diffusers(base, "base pipeline", DiffusionPipeline.from_pretrained, torch_dtype=dtype)
    return BoostPipeline.from_base(base_pipe, load_upsampler(upsampler, base_pipe.vae).cast(dtype))


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


def save_image(image, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        image.save(out)
    except (ValueError, KeyError) as err:
        raise UserError(f"cannot write {path!r}: {err} (use a .png or .jpg name)") from None


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
