"""The command line's plumbing: the options several commands share, written once, and the loaders they share.

Option groups (each adds its options to a command's parser):

    add_render_arguments   --sampler / --detail / --back-project     generate, upscale, serve
    add_fast_argument      --fast                                    generate, upscale, serve
    add_device_arguments   --device / --dtype (`device_and_dtype`)   generate, upscale, serve
    add_output_arguments   -o, --cascade, --seed, tiles              generate, upscale
    add_pair_arguments     the held-out image pairs: --data, sizes,  eval-sr, calibrate-detail
                           crop, degradation, --seed, --device

Spelling: flags are hyphenated and "where the result goes" is `-o/--output` on every command. `add_option` keeps a
flag's older spellings (`--out`, `--output_dir`, `--max_train_steps`) working for a release: hidden from --help, and
printing a warning that names the new spelling when used.

Loaders, each failing with a one-line `UserError` that says what was looked for: `load_upsampler` (an upsampler
folder), `load_image_upsampler` (what image-only commands render with: an upsampler folder or a saved
BoostPipeline folder, on a device, in a dtype, optionally compiled), `load_pipeline` (a BoostPipeline for
text → image), `load_diffusers`; and `save_image`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from fmboost.pipelines.cli import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: The parts of an SD-family text-to-image pipeline (a BoostPipeline's base model: its `vae` is one of them).
BASE_PARTS = ("text_encoder", "tokenizer", "unet", "scheduler", "vae")
#: `--fast` on generate, upscale and serve (one text, so the three commands describe one switch).
FAST_HELP = ("fast path: compile the base UNet and the upsampler's networks with torch.compile (diffusers' recipe: "
             "channels-last, mode reduce-overhead, static shapes); the first image at each size compiles (slow), "
             "later ones at the same size are fast, so it pays off over many images; where torch.compile cannot "
             "run it warns and stays eager")


# ---------------------------------------------------------------------- spelling


class _OldSpelling(argparse.Action):
    """An older spelling of another option: hidden from --help; when used it warns, naming the new spelling, and
    stores what the new one would."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated and goes in the next release: use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_option(parser, *flags: str, old: tuple[str, ...] = (), required: bool = False, **kwargs) -> argparse.Action:
    """`parser.add_argument(*flags, **kwargs)` (a parser or an argument group), and each spelling in `old` accepted for
    a release (`_OldSpelling`). With old spellings the option and its aliases form a mutually exclusive group, which
    carries `required`: either spelling satisfies it, and giving both is an error."""
    if not old:
        return parser.add_argument(*flags, required=required, **kwargs)
    group = parser.add_mutually_exclusive_group(required=required)
    action = group.add_argument(*flags, **kwargs)
    for flag in old:
        group.add_argument(flag, dest=action.dest, nargs=action.nargs, const=action.const, type=action.type,
                           choices=action.choices, metavar=action.metavar, default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS, action=_OldSpelling, new="/".join(action.option_strings))
    return action


def add_output_option(parser, help: str, old: tuple[str, ...] = (), **kwargs) -> argparse.Action:
    """`-o/--output`: where a command writes its result (an image, a folder, a JSON file)."""
    return add_option(parser, "-o", "--output", old=old, help=help, **kwargs)


# ---------------------------------------------------------------------- option groups


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


def render_settings(args: argparse.Namespace, saved):
    """The folder's saved SamplerConfig with the command line's --sampler / --detail / --back-project (their ranges
    are checked by SamplerConfig: a bad value is a ValueError naming it)."""
    return saved.override(args.sampler, detail=args.detail, back_project=args.back_project)


def add_fast_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fast", action="store_true", help=FAST_HELP)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device / --dtype, read by `device_and_dtype`."""
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float16 on GPU, float32 on CPU")


def default_device(device: str | None = None) -> torch.device:
    """`device`, or cuda where there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = default_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu" and dtype != torch.float32:
        raise UserError(f"--dtype {args.dtype} needs a GPU; on the CPU use --dtype float32")
    return device, dtype


def add_output_arguments(parser: argparse.ArgumentParser,
                         output_help: str = "output image path (.png, .jpg, ...)") -> None:
    """Options shared by generate and upscale: output, passes, seed, device and tiles."""
    add_output_option(parser, output_help, required=True)
    parser.add_argument("--cascade", type=int, default=1, help="passes (2 with a ×2 model: 512 → 1024 → 2048 px)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)
    parser.add_argument("--tiled", action="store_true", help="diffusers' tiled VAE decode (SD-VAE upsamplers)")
    parser.add_argument("--tile-size", type=int, default=None, metavar="PX",
                        help="upscale in overlapping tiles of PX output pixels (bounded memory); default: tiles of "
                             "1024 px when the output is larger than 1024 px, 0: never tile")
    parser.add_argument("--tile-overlap", type=int, default=None, metavar="PX",
                        help="overlap of neighbouring tiles in output pixels (default 128)")


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """The held-out image pairs eval-sr and calibrate-detail read (`fmboost.eval.pairs.iter_pairs`): high-res
    images, how they are cropped and reduced to the low-res inputs, the seed, the LPIPS weights and the device."""
    from fmboost.eval.pairs import CROPS

    parser.add_argument("--data", action="append", required=True, metavar="DIR",
                        help="folder of held-out high-res images (repeatable)")
    parser.add_argument("--max-images", type=int, default=None, metavar="N",
                        help="use the first N images (sorted by name)")
    parser.add_argument("--hr-size", type=int, default=1024)
    parser.add_argument("--lr-size", type=int, default=256)
    parser.add_argument("--crop", choices=CROPS, default="center", help="square crop to --hr-size")
    parser.add_argument("--degradation", default="bicubic", metavar="NAME",
                        help="how the low-res inputs are made: bicubic (antialiased reduction), jpeg:Q (the same, "
                             "then a JPEG at quality Q) or second-order (Real-ESRGAN's blur → resize → noise → JPEG, "
                             "twice, drawn from seed + image index); use the one the upsampler was trained for "
                             "(default: %(default)s)")
    parser.add_argument("--resize", action=argparse.BooleanOptionalAction, default=True,
                        help="scale the shorter side to --hr-size before cropping (whole images; default)")
    parser.add_argument("--lpips-weights", default=None, metavar="PATH",
                        help="LPIPS AlexNet state dict (default: $FMBOOST_SHARED's, else AlexNet is downloaded)")
    parser.add_argument("--seed", type=int, default=0,
                        help="image i uses seed + i for its source noise, crop anchor and degradation")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


# ---------------------------------------------------------------------- loaders


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


def load_image_upsampler(directory: str, device: torch.device, dtype: torch.dtype, fast: bool = False,
                         tiled: bool = False):
    """What image-only commands render with: the `Upsampler` of an upsampler folder, or of a saved BoostPipeline
    folder (its base model is not loaded), on `device`, v_θ and R stored in `dtype` and run on an fp32 ODE state
    (`Upsampler.mixed_precision`); `fast` compiles them (the fast path), `tiled` turns on diffusers' tiled VAE
    decode. The first stage keeps its own weights' dtype (fp32: an SD VAE in fp16 overflows at high resolution)."""
    from fmboost.models import DiffusersAutoencoder
    from fmboost.pipelines import fast_path

    if is_boost_pipeline(directory):
        from fmboost.pipelines.boost import BoostPipeline

        without_base = functools.partial(BoostPipeline.from_pretrained,
                                         **dict.fromkeys(p for p in BASE_PARTS if p != "vae"))
        pipe = load_diffusers(directory, "BoostPipeline", without_base).to(device)
        pipe.upsampler.cast(dtype)
        if fast:
            pipe.enable_fast_path()
        upsampler = pipe.upsampler.to(device)  # a TAEF2 or pixel first stage and a restorer are no components
    else:
        upsampler = load_upsampler(directory).cast(dtype).to(device)
        if fast:
            fast_path.compile_upsampler(upsampler, device)
        upsampler = upsampler.mixed_precision()
    if tiled:
        if not isinstance(upsampler.first_stage, DiffusersAutoencoder):
            raise UserError(f"--tiled is diffusers' tiled VAE decode, and this upsampler works in a "
                            f"{upsampler.first_stage.spec['kind']!r} latent space: use --tile-size to bound memory")
        upsampler.first_stage.vae.enable_tiling()
    return upsampler


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


def save_image(image, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        image.save(out)
    except (ValueError, KeyError) as err:
        raise UserError(f"cannot write {path!r}: {err} (use a .png or .jpg name)") from None
