"""`fmboost calibrate-detail`: fit a posterior-mean upsampler's per-band fidelity dial on held-out images.

For every image: the low-res input (as `eval-sr` makes it), R's estimate and the flow's full sample, both
decoded (`--samples 2`: two samples, whose detail splits into a consistent and a random part, each weighed on
its own); per frequency band, the share of the flow's detail that best predicts the truth (least squares,
`fmboost.models.detail_bands`). Then (`--path lpips`, the default) the order in which the dial turns the bands
on: one band at a time, the LPIPS it buys per unit of MSE it costs, on the same images. Both go into
boost_config.json ("detail_calibration"), after which `upscale`, `BoostPipeline` and `eval-sr --detail` turn the
dial per band. Use images neither R nor the flow was trained on (e.g. training's validation images), at the
scale the upsampler was trained at; pass the `--back-project` you will evaluate with. The samples are drawn
with the folder's saved sampler, which `--sampler` sets: a dial measured on 2-step samples is not the dial of
4-step ones, so the folder keeps the sampler its dial was measured with as its default.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from fmboost.models import BOOST_CONFIG_NAME, SamplerConfig, Upsampler
from fmboost.models.consistency import back_project
from fmboost.models.detail_bands import (
    DEFAULT_EDGES,
    DETAIL_PATHS,
    DETAIL_SAMPLES,
    BandGains,
    DetailCalibration,
    DetailCalibrationFit,
    fit_spans,
)
from tqdm.auto import tqdm

from . import metrics as M
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
    parser.add_argument("--path", choices=DETAIL_PATHS, default="lpips",
                        help="lpips: the dial turns the bands on one after another, the most LPIPS per unit of MSE "
                             "first (measured on --data; needs the LPIPS weights); uniform: all bands together "
                             "(default: %(default)s)")
    parser.add_argument("--samples", type=int, choices=DETAIL_SAMPLES, default=1,
                        help="samples the dial blends: 2 splits the detail into the part two samples agree on and "
                             "the part they do not, a better frontier for twice the flow's NFE (default: %(default)s)")
    parser.add_argument("--sampler", default=None, metavar="SPEC",
                        help="calibrate on this sampler's samples (SamplerConfig.parse, e.g. euler:linear:4) and save "
                             "it as the folder's default: more steps draw more detail, so the dial's weights and "
                             "order hold for the sampler they were measured with (default: the saved sampler)")
    parser.add_argument("--back-project", type=int, default=0, metavar="N",
                        help="measure the --path order after N back-projection steps, as eval-sr --back-project N "
                             "scores (default: %(default)s, as `fmboost upscale` outputs)")
    parser.add_argument("--lpips", default=None, metavar="PATH", help="LPIPS weights (default: the shared copy)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i for its source noise")
    parser.add_argument("--device", default=None)


@dataclass
class Calibration:
    """The fitted dial, the least-squares fit behind its weights, and (path 'lpips') the per-band measurements
    behind its order."""

    calibration: DetailCalibration
    fit: DetailCalibrationFit
    bands: list[BandGains] | None = None


@torch.no_grad()
def calibrate(upsampler: Upsampler, pairs, edges: tuple[float, ...] = DEFAULT_EDGES, seed: int = 0,
              total: int | None = None, lpips: torch.nn.Module | None = None, back_project_steps: int = 0,
              samples: int = 1) -> Calibration:
    """Fit the per-band dial over `pairs`, (lr (B, 3, h, w), hr (B, 3, s·h, s·w)) in [-1, 1], with the
    upsampler's saved sampler run to the full sample(s) (`samples` per pair, 1 or 2); pair i draws its source
    noise from seed + i. With an `lpips` network the bands also get their order (`fit_spans`), measured after
    `back_project_steps` back-projection steps; the decoded images are kept for that second pass (on the CPU,
    in half precision)."""
    fit = DetailCalibrationFit(upsampler.scale, edges, samples)
    device = next(upsampler.model.parameters()).device
    kept = []
    for index, (lr, hr) in enumerate(tqdm(pairs, total=total, desc="calibrate-detail", unit="img")):
        lr, hr = lr.to(device), hr.to(device)
        estimate, drawn, _ = upsampler.estimate_and_sample(upsampler.condition(lr_image=lr),
                                                           torch.Generator(device).manual_seed(seed + index),
                                                           samples=samples)
        fit.update(estimate, drawn, hr)
        if lpips is not None:
            kept.append((lr.half().cpu(), estimate.half().cpu(), [s.half().cpu() for s in drawn], hr.half().cpu()))
    result = Calibration(fit.result(), fit)
    if lpips is None:
        return result
    lpips_device = next(lpips.parameters()).device

    def distance(pred, target):
        return M.lpips(((pred + 1) / 2).to(lpips_device), ((target + 1) / 2).to(lpips_device), lpips)

    def post(pred, index):
        return back_project(pred, kept[index][0].float(), back_project_steps)

    images = ((estimate.float(), [s.float() for s in drawn], target.float())
              for _, estimate, drawn, target in tqdm(kept, desc="detail path", unit="img"))
    result.calibration, result.bands = fit_spans(result.calibration, images, distance, upsampler.scale,
                                                 post if back_project_steps else None)
    return result


def run(args: argparse.Namespace) -> int:
    if args.back_project < 0:
        raise ValueError(f"--back-project must be ≥ 0, got {args.back_project}")
    if args.hr_size % args.lr_size:
        raise ValueError(f"--hr-size {args.hr_size} must be a multiple of --lr-size {args.lr_size}")
    try:
        edges = tuple(float(e) for e in args.edges.split(",") if e.strip())
    except ValueError:
        raise ValueError(f"--edges takes comma-separated numbers, got {args.edges!r}") from None
    solve = None if args.sampler is None else SamplerConfig.parse(args.sampler)
    upsampler = Upsampler.from_pretrained(args.upsampler)
    if solve is not None:  # the ODE solve only: the saved detail and temperature stay
        upsampler.sampler = solve.replace(detail=upsampler.sampler.detail, temperature=upsampler.sampler.temperature)
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
    lpips = None
    if args.path == "lpips":
        try:
            lpips = M.load_lpips(args.lpips, device)
        except M.MetricUnavailable as err:
            raise ValueError(f"--path lpips needs the LPIPS weights ({err}); pass --lpips PATH, or --path uniform "
                             "to turn all bands on together") from None
    result = calibrate(upsampler, pairs, edges, args.seed, total, lpips, args.back_project, args.samples)
    upsampler.detail_calibration = result.calibration
    print(describe(result, upsampler.scale))
    if args.out:
        upsampler.save_pretrained(args.out)
        target = Path(args.out)
    else:  # only the config changes: rewrite it, leave the weights alone
        target = Path(args.upsampler)
        (target / BOOST_CONFIG_NAME).write_text(json.dumps(upsampler.config(), indent=2))
    print(f"fitted on {result.fit.images} images, samples of {upsampler.sampler.format()} (the folder's sampler); "
          f"wrote detail_calibration to {target / BOOST_CONFIG_NAME}")
    return 0


def describe(result: Calibration, scale: int) -> str:
    """One line per band (two samples: per band of the consistent, then of the random detail): its frequencies,
    w*, the share kept at detail 0 and (path lpips) its measured cost, gain and stretch of the dial."""
    calibration, nyquist = result.calibration, 0.5 / scale
    bounds = (0.0, *calibration.edges, None)
    parts = ("",) if calibration.samples == 1 else ("consistent ", "random ")
    lines = []
    for index, (raw, kept) in enumerate(zip(result.fit.raw_weights(), calibration.weights)):
        part, band = divmod(index, calibration.bands)
        lo, hi = bounds[band] * nyquist, bounds[band + 1]
        freq = f"[{lo:.4f}, {hi * nyquist:.4f})" if hi is not None else f"[{lo:.4f}, 0.5]"
        line = f"{parts[part]}band {freq} cycles/px: w* {raw:+.3f} → kept at detail 0: {kept:.3f}"
        if result.bands is not None:
            gains, (start, end) = result.bands[index], calibration.spans[index]
            line += (f"; turned on: MSE {gains.mse_cost:+.2e}, LPIPS {-gains.perceptual_gain:+.5f} "
                     f"→ ramps over detail [{start:.3f}, {end:.3f}]")
        lines.append(line)
    return "\n".join(lines)
