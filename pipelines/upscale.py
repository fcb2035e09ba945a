"""`fmboost upscale in.png -o out.png --upsampler DIR`: super-resolve an image of any size with a CFM upsampler.

The output is exactly scale × the input: the image is padded (edge pixels replicated) to sizes the networks
accept, with context at the borders, and cropped back. Outputs larger than 1024 px are upscaled in
overlapping tiles (`--tile-size` / `--tile-overlap`, in output pixels; `--tile-size 0` never tiles), so
memory stays bounded. `--compare` also writes `<out>_compare.<ext>`: bicubic | CFM, side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import PIL.Image
from fmboost.pipelines.cli import UserError
from fmboost.pipelines.generate import (
    add_fast_argument,
    add_output_arguments,
    add_render_arguments,
    device_and_dtype,
    is_boost_pipeline,
    load_diffusers,
    load_upsampler,
    pipeline_kwargs,
    save_image,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="input image, any size")
    parser.add_argument("--upsampler", required=True, help="upsampler or BoostPipeline folder")
    parser.add_argument("--compare", action="store_true", help="also write a side-by-side with bicubic up-sampling")
    add_render_arguments(parser)
    add_output_arguments(parser)
    add_fast_argument(parser)


def side_by_side(left: PIL.Image.Image, right: PIL.Image.Image) -> PIL.Image.Image:
    canvas = PIL.Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def load_image_pipeline(directory: str, dtype):
    from fmboost.pipelines.boost import BoostPipeline

    if is_boost_pipeline(directory):
        return load_diffusers(directory, "BoostPipeline", BoostPipeline.from_pretrained, torch_dtype=dtype)
    return BoostPipeline.from_upsampler(load_upsampler(directory).cast(dtype))


def run(args: argparse.Namespace) -> int:
    path = Path(args.image)
    if not path.is_file():
        raise UserError(f"input image {args.image!r} not found")
    try:
        image = PIL.Image.open(path).convert("RGB")
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise UserError(f"cannot read {args.image!r} as an image: {err}") from None
    device, dtype = device_and_dtype(args)
    pipe = load_image_pipeline(args.upsampler, dtype).to(device)
    if args.fast:
        pipe.enable_fast_path()
    if args.tiled:
        pipe.enable_vae_tiling()
    out = pipe(image=image, **pipeline_kwargs(args, pipe, device))
    result = out.images[0]
    save_image(result, args.output)
    tiles = f" in {out.tiles} tiles" if out.tiles > 1 else ""
    print(f"wrote {args.output} ({result.width}x{result.height}{tiles}, NFE {out.nfe}, "
          f"{sum(out.timings.values()):.2f} s)")
    if args.compare:
        bicubic = image.resize(result.size, PIL.Image.BICUBIC)
        compare = Path(args.output).with_name(f"{Path(args.output).stem}_compare{Path(args.output).suffix}")
        save_image(side_by_side(bicubic, result), str(compare))
        print(f"wrote {compare} (left: bicubic, right: CFM)")
    return 0
