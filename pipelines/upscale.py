"""`fmboost upscale in.png -o out.png --upsampler DIR`: super-resolve an image of any size with a CFM upsampler.

The output is exactly scale × the input: the image is padded (edge pixels replicated) to sizes the networks
accept, with context at the borders, and cropped back. Outputs larger than 1024 px are upscaled in
overlapping tiles (`--tile-size` / `--tile-overlap`, in output pixels; `--tile-size 0` never tiles), so
memory stays bounded. `--compare` also writes `<out>_compare.<ext>`: bicubic | CFM, side by side.

Several inputs, a folder, a glob, a dataset or webdataset shards, or `-o` naming a folder, make it a collection
run (`fmboost.pipelines.collection`): one model load, batches, a progress bar, resumable, and under
`accelerate launch` / `torchrun` split between the processes. One file with `-o FILE` is the single-image
command, seeded with `--seed` itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import PIL.Image
import torch
from fmboost.pipelines import collection
from fmboost.pipelines.cli import UserError
from fmboost.pipelines.cli_options import (
    add_fast_argument,
    add_output_arguments,
    add_render_arguments,
    device_and_dtype,
    load_image_upsampler,
    render_settings,
    save_image,
)
from fmboost.pipelines.processes import has_device, launched_as
from fmboost.pipelines.render import upscale_images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files (any size), folders (recursive), glob patterns ('shots/**/*.jpg'), local "
                             "Hugging Face datasets or webdataset .tar shards")
    parser.add_argument("--upsampler", required=True, help="upsampler or BoostPipeline folder")
    parser.add_argument("--compare", action="store_true", help="also write a side-by-side with bicubic up-sampling "
                                                               "(one image with -o FILE)")
    add_render_arguments(parser)
    add_output_arguments(parser, "output image (one input) or output folder (several inputs, a folder, glob or "
                                 "dataset, or a name ending in / or without a suffix): the folder mirrors the input "
                                 "names")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="collections: render up to N same-size inputs at once (default 8)")
    parser.add_argument("--overwrite", action="store_true",
                        help="collections: redo outputs that exist (default: a rerun skips them and resumes)")
    parser.add_argument("--max-megapixels", type=float, default=16.0, metavar="MP",
                        help="collections: inputs above MP megapixels are reported as too large (default 16)")
    parser.add_argument("--ext", default="png", help="collections: output format by suffix (default png, lossless)")
    parser.add_argument("--image-column", default="image", metavar="NAME",
                        help="collections: the image column of a Hugging Face dataset (default image)")
    add_fast_argument(parser)


def side_by_side(left: PIL.Image.Image, right: PIL.Image.Image) -> PIL.Image.Image:
    canvas = PIL.Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The command line's upsampler on `device`, with --fast / --tiled applied (`load_image_upsampler`)."""
    return load_image_upsampler(args.upsampler, device, dtype, fast=args.fast, tiled=args.tiled)


def is_single_image(args: argparse.Namespace) -> bool:
    """One image file into one output file: the single-image command (seeded with --seed as given)."""
    if len(args.inputs) != 1:
        return False
    path, out = Path(args.inputs[0]), Path(args.output)
    is_image = path.suffix.lower() not in (".tar", ".parquet", ".arrow") and not path.is_dir()
    names_file = out.suffix != "" and not args.output.endswith(("/", "\\")) and not out.is_dir()
    return is_image and names_file and not (collection.GLOB_CHARS & set(args.inputs[0]))


def run(args: argparse.Namespace) -> int:
    if not is_single_image(args):
        return run_collection(args)
    path = Path(args.inputs[0])
    if not path.is_file():
        raise UserError(f"input image {args.inputs[0]!r} not found")
    try:
        image = PIL.Image.open(path).convert("RGB")
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise UserError(f"cannot read {args.inputs[0]!r} as an image: {err}") from None
    device, dtype = device_and_dtype(args)
    upsampler = load(args, device, dtype)
    out = upscale_images(upsampler, [image], torch.Generator(device).manual_seed(args.seed),
                         render_settings(args, upsampler.sampler), args.cascade, args.tile_size, args.tile_overlap)
    result = out.images[0]
    save_image(result, args.output)
    tiles = f" in {out.tiles} tiles" if out.tiles > 1 else ""
    print(f"wrote {args.output} ({result.width}x{result.height}{tiles}, NFE {out.nfe}, {out.seconds:.2f} s)")
    if args.compare:
        bicubic = image.resize(result.size, PIL.Image.BICUBIC)
        compare = Path(args.output).with_name(f"{Path(args.output).stem}_compare{Path(args.output).suffix}")
        save_image(side_by_side(bicubic, result), str(compare))
        print(f"wrote {compare} (left: bicubic, right: CFM)")
    return 0


def run_collection(args: argparse.Namespace) -> int:
    """Every input into the folder -o (see `fmboost.pipelines.collection`), this process's share of them when
    launched by accelerate / torchrun. Exit status 0 when every input was written or skipped, 1 when some
    failed (listed in the report)."""
    from accelerate import PartialState

    if args.compare:
        raise UserError("--compare writes one side-by-side: give one image and -o FILE")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out_dir, ext = Path(args.output), collection.check_ext(args.ext)
    inputs = collection.collect_inputs(args.inputs, out_dir, args.image_column)
    # Without a GPU, Accelerate would run each of N launched processes alone: cpu=True selects gloo (as training)
    _, world_size = launched_as()
    state = PartialState(cpu=world_size > 1 and (not has_device() or args.device == "cpu"))
    if state.num_processes != world_size:
        raise UserError(f"launched as {world_size} processes, but Accelerate runs {state.num_processes} "
                        f"({state.distributed_type}): check the launcher")
    args.device = args.device or str(state.device)  # accelerate's: each process its own GPU
    device, dtype = device_and_dtype(args)
    upsampler = load(args, device, dtype)
    sampler = upsampler.settings(render_settings(args, upsampler.sampler))  # a bad value fails now
    settings = {"upsampler": str(Path(args.upsampler).resolve()), "sampler": sampler.format(),
                "detail": sampler.detail, "back_project": sampler.back_project, "seed": args.seed,
                "cascade": args.cascade, "tile_size": args.tile_size, "tile_overlap": args.tile_overlap,
                "dtype": str(dtype).removeprefix("torch.")}
    tmp_dir = collection.prepare_output(out_dir, settings, args.overwrite, state)

    def render(images: list[PIL.Image.Image], names: list[str]) -> list[PIL.Image.Image]:
        return upscale_images(upsampler, images, collection.generators(device, args.seed, names), sampler,
                              args.cascade, args.tile_size, args.tile_overlap, progress={"disable": True}).images

    if state.is_main_process:
        print(f"upscale: {len(inputs)} inputs → {out_dir}/ on {state.num_processes} process(es), batches of "
              f"{args.batch_size}, {sampler.format()}, seed {args.seed} (each input's from its name)")
    try:
        summary = collection.upscale_collection(render, inputs, out_dir, ext, args.batch_size, args.max_megapixels,
                                                args.overwrite, tmp_dir, state)
    except KeyboardInterrupt:
        print(f"\nupscale: interrupted; what is in {out_dir}/ is whole: rerun the same command to resume",
              flush=True)
        return 130
    from accelerate.utils import gather_object

    summaries = gather_object([summary])
    if not state.is_main_process:
        return 1 if any(s.failures for s in summaries) else 0
    report = collection.write_report(out_dir, inputs, summaries, settings)
    rate = f", {report['images_per_second']:g} images/s" if report["written"] else ""
    print(f"upscale: {report['written']} written, {report['skipped']} skipped (already there), {report['failed']} "
          f"failed of {report['inputs']} inputs in {report['seconds']:.1f} s{rate}; report: "
          f"{out_dir / collection.REPORT_NAME}")
    return 1 if report["failed"] else 0
