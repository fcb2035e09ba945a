"""`fmboost calibrate-detail`: fit a posterior-mean upsampler's per-band fidelity dial on held-out images.

For every image: the low-res input (as `eval-sr` makes it), R's estimate and the flow's full sample, both
decoded; per frequency band, the share of the flow's detail that best predicts the truth (least squares,
`fmboost.models.detail_bands`). The weights go into boost_config.json ("detail_calibration"), after which
`upscale`, `BoostPipeline` and `eval-sr --detail` turn the dial per band. Use images neither R nor the flow
was trained on (e.g. training's validation images), at the scale the upsampler was trained at.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from fmboost.models import BOOST_CONFIG_NAME, Upsampler
from fmboost.models.detail_bands import DEFAULT_EDGES, DetailCalibrationFit
from tqdm.auto import tqdm

from .pairs import CROPS, count_images, iter_pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("upsampler", help="a posterior-mean upsampler folder")
    parser.add_argument("--data", action="append", required=True, metavar="DIR",
                        help="held-out high-res images (repeatable)")
    parser.add_argument("--out", metavar="DIR", help="write the calibrated upsampler here (default: update "
                                                     "the upsampler folder's boost_config.json in place)")
    parser.add_argument("--max-images", type=int, default=None, metavar="N")
    parser.add_argument("--hr-size", type=int, default=1024)
    parser.add_argument("--lr-size", type=int, default=256)
    parser.add_argument("--crop", choices=CROPS, default="center")
    parser.add_argument("--resize", action=argparse.BooleanOptionalAction, default=True,
                        help="scale the shorter side to --hr-size before cropping (whole images; default)")
    parser.add_argument("--edges", default=",".join(f"{e:g}" for e in DEFAULT_EDGES), metavar="LIST",
                        help="band edges in units of the low-res Nyquist frequency 0.5 / scale (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i for its source noise")
    parser.add_argument("--device", default=None)


@torch.no_grad()
def calibrate(upsampler: Upsampler, pairs, edges: tuple[float, ...] = DEFAULT_EDGES, seed: int = 0,
              total: int | None = None) -> DetailCalibrationFit:
    """Accumulate the per-band fit over `pairs`, (lr (B, 3, h, w), hr (B, 3, s·h, s·w)) in [-1, 1], with the
    upsampler's saved sampler run to the full sample; pair i draws its source noise from seed + i."""
    fit = DetailCalibrationFit(upsampler.scale, edges)
    device = next(upsampler.model.parameters()).device
    for index, (lr, hr) in enumerate(tqdm(pairs, total=total, desc="calibrate-detail", unit="img")):
        lr, hr = lr.to(device), hr.to(device)
        estimate, sample, _ = upsampler.estimate_and_sample(upsampler.condition(lr_image=lr),
                                                            torch.Generator(device).manual_seed(seed + index))
        fit.update(estimate, sample, hr)
    return fit


def run(args: argparse.Namespace) -> int:
    if args.hr_size % args.lr_size:
        raise ValueError(f"--hr-size {args.hr_size} must be a multiple of --lr-size {args.lr_size}")
    try:
        edges = tuple(float(e) for e in args.edges.split(",") if e.strip())
    except ValueError:
        raise ValueError(f"--edges takes comma-separated numbers, got {args.edges!r}") from None
    upsampler = Upsampler.from_pretrained(args.upsampler)
    if not upsampler.flow.needs_posterior_mean:
        raise ValueError(f"{args.upsampler} is not a posterior-mean upsampler (trained with source: posterior_mean): "
                         "only those have an estimate to weigh the flow's detail against")
    if args.hr_size // args.lr_size != upsampler.scale:
        raise ValueError(f"--hr-size / --lr-size is {args.hr_size // args.lr_size}, the upsampler's scale is "
                         f"{upsampler.scale}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    upsampler.to(device)
    total = count_images(args.data, args.max_images)
    if total == 0:
        raise ValueError(f"no images in {args.data}")
    pairs = ((p.lr[None], p.hr[None]) for p in iter_pairs(args.data, args.hr_size, args.lr_size, args.crop,
                                                             args.resize, args.seed, args.max_images))
    fit = calibrate(upsampler, pairs, edges, args.seed, total)
    upsampler.detail_calibration = fit.result()
    nyquist = 0.5 / upsampler.scale
    bounds = (0.0, *edges, None)
    for band, (raw, kept) in enumerate(zip(fit.raw_weights(), upsampler.detail_calibration.weights)):
        lo, hi = bounds[band] * nyquist, bounds[band + 1]
        span = f"[{lo:.4f}, {hi * nyquist:.4f})" if hi is not None else f"[{lo:.4f}, 0.5]"
        print(f"band {span} cycles/px: w* {raw:+.3f} → kept at detail 0: {kept:.3f}")
    if args.out:
        upsampler.save_pretrained(args.out)
        target = Path(args.out)
    else:  # only the config changes: rewrite it, leave the weights alone
        target = Path(args.upsampler)
        (target / BOOST_CONFIG_NAME).write_text(json.dumps(upsampler.config(), indent=2))
    print(f"fitted on {fit.images} images; wrote detail_calibration to {target / BOOST_CONFIG_NAME}")
    return 0
