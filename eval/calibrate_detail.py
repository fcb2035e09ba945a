"""`fmboost calibrate-detail`: fit an upsampler folder's render settings on held-out images.

Runs `fmboost.models.calibration` — what training does when it saves a folder — on a folder afterwards: the
back-projection step count that measures best (every upsampler), and for posterior-mean flows the per-band
fidelity dial, its weights by least squares and (`--path lpips`, the default) its band order by the LPIPS each
band buys per unit of MSE after that back-projection. Both go into boost_config.json: the step count as the
folder's default `back_project`, the dial as "detail_calibration", recording the sampler and back-projection it
was measured with. The images are rendered with the folder's saved sampler, exactly as `fmboost upscale`
renders them. Use images neither R nor the flow was trained on (e.g. training's validation images), at the
scale the upsampler was trained at.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fmboost.models import BOOST_CONFIG_NAME, Upsampler
from fmboost.models import metrics as M
from fmboost.models.calibration import BACK_PROJECT_CANDIDATES, describe, fit_calibration
from fmboost.models.degradations import Degradation
from fmboost.models.detail_bands import DEFAULT_EDGES, DETAIL_PATHS
from fmboost.pipelines.cli_options import add_output_option, add_pair_arguments, default_device

from .cli_eval_sr import parse_list
from .pairs import count_images, iter_pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("upsampler", help="an upsampler folder (the dial: posterior-mean flows only)")
    add_pair_arguments(parser)
    add_output_option(parser, "write the calibrated upsampler here (default: update the upsampler folder's "
                              "boost_config.json in place)", old=("--out",), metavar="DIR")
    parser.add_argument("--edges", default=",".join(f"{e:g}" for e in DEFAULT_EDGES), metavar="LIST",
                        help="band edges in units of the low-res Nyquist frequency 0.5 / scale (default: %(default)s)")
    parser.add_argument("--path", choices=DETAIL_PATHS, default="lpips",
                        help="lpips: the dial turns the bands on one after another, the most LPIPS per unit of MSE "
                             "first (measured on --data; needs the LPIPS weights); uniform: all bands together "
                             "(default: %(default)s)")
    parser.add_argument("--back-project", default=",".join(map(str, BACK_PROJECT_CANDIDATES)), metavar="LIST",
                        help="back-projection step counts to try, comma-separated ints ≥ 0; the best measured becomes "
                             "the folder's default (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if args.hr_size % args.lr_size:
        raise ValueError(f"--hr-size {args.hr_size} must be a multiple of --lr-size {args.lr_size}")
    edges = tuple(parse_list("--edges", args.edges, float))
    candidates = parse_list("--back-project", args.back_project, int)
    degradation = Degradation.parse(args.degradation)
    upsampler = Upsampler.from_pretrained(args.upsampler)
    if args.hr_size // args.lr_size != upsampler.scale:
        raise ValueError(f"--hr-size / --lr-size is {args.hr_size // args.lr_size}, the upsampler's scale is "
                         f"{upsampler.scale}")
    device = default_device(args.device)
    upsampler.to(device)
    total = count_images(args.data, args.max_images)
    pairs = ((p.lr[None], p.hr[None]) for p in iter_pairs(args.data, args.hr_size, args.lr_size, args.crop,
                                                             args.resize, args.seed, args.max_images,
                                                             degradation))
    lpips = None
    if args.path == "lpips":
        try:
            lpips = M.load_lpips(args.lpips_weights, device)
        except M.MetricUnavailable as err:
            raise ValueError(f"--path lpips needs the LPIPS weights ({err}); pass --lpips-weights PATH, or --path "
                             "uniform to turn all bands on together") from None
    result = fit_calibration(upsampler, pairs, seed=args.seed, total=total, lpips=lpips, candidates=candidates,
                             edges=edges)
    upsampler = result.apply(upsampler)
    print(describe(result, upsampler.scale))
    if args.output:
        upsampler.save_pretrained(args.output)
        target = Path(args.output)
    else:  # only the config changes: rewrite it, leave the weights alone
        target = Path(args.upsampler)
        (target / BOOST_CONFIG_NAME).write_text(json.dumps(upsampler.config(), indent=2))
    dial = "" if result.calibration is None else " and the detail dial"
    print(f"fitted on {result.images} images rendered with {upsampler.sampler.format()}; wrote back_project "
          f"{result.back_project}{dial} to {target / BOOST_CONFIG_NAME}")
    return 0
