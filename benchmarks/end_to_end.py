"""`fmboost bench pipeline --end-to-end`: the calls users make, timed whole — boosted vs direct, eager vs fast path.

For every base recipe and target size, one run measures side by side, with the same base parts:

    boosted  BoostPipeline.from_base(base, upsampler)(prompt, base_size=target / scale): the base at the low
             resolution, the CFM upsampler (PSU coupling, its NFE) to the target, decode — tiled where the real
             call tiles (above 1024 px);
    direct   the same StableDiffusionPipeline (parts, steps, guidance) called at the target size,

each first eager, then through the fast path (`BoostPipeline.enable_fast_path`; the direct pipeline's UNet
compiled by the same recipe, diffusers' `pipe.unet = torch.compile(...)`). Recipes: `cfg:N` — an SD1.5-shaped
UNet with DDIM, N steps at guidance 7.5 (UNet batch 2); `lcm:N` — an LCM-shaped UNet with its LCMScheduler,
N steps, one UNet call per step (`fmboost.pipelines.lcm.base_defaults`). Random weights at SD1.5 sizes
(`--size real`) have the real model's compute.

Each call runs once untimed — its seconds are `first_call_s`, which for the fast path is the compilation — then
`repeats` timed calls: medians. Peak memory is `torch.cuda.max_memory_allocated` over the timed calls on CUDA,
with every model resident; on a CPU it is null (the RSS high-water mark cannot be reset between calls of one
process). The fast path's image is compared with eager's from the same seed (`max_abs_diff_vs_eager`, in [0, 1]).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from fmboost.pipelines.random_sd import random_sd_components

PROMPT = "a photo of a cat"
RECIPES = ("cfg:25", "lcm:4")
#: classifier-free guidance of the `cfg` recipe (diffusers' SD default); `lcm` takes `base_defaults`.
CFG_GUIDANCE = 7.5
MODES = ("eager", "fast")


def parse_recipe(text: str) -> tuple[str, int]:
    """'cfg:25' → ('cfg', 25); 'lcm:4' → ('lcm', 4)."""
    kind, _, steps = text.partition(":")
    if kind not in ("cfg", "lcm") or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"recipe must be cfg:STEPS or lcm:STEPS (e.g. {', '.join(RECIPES)}), got {text!r}")
    return kind, int(steps)


def time_call(call, device: torch.device, repeats: int) -> dict:
    """call() once on its own (first_call_s: lazy initialisation, the fast path's compilation), then `repeats`
    timed calls → {first_call_s, median_s, runs_s, peak_mib (CUDA, over the timed calls; None on a CPU), output
    (the last call's)}."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, output = [], None
    for i in range(1 + repeats):
        if cuda and i == 1:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        start = time.perf_counter()
        output = call()
        sync()
        times.append(time.perf_counter() - start)
    return {"first_call_s": times[0], "median_s": statistics.median(times[1:]), "runs_s": times[1:],
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None, "output": output}


def bench_end_to_end(size: str = "real", pixels: list[int] | None = None, recipes: list[str] | None = None,
                     modes: list[str] | None = None, repeats: int = 3, scale: int = 4,
                     upsampler_preset: str = "reference", upsample_steps: int = 4, device: str | None = None,
                     dtype: str | None = None, compile_kwargs: dict | None = None) -> dict:
    """Median seconds, CUDA peak memory and speed-ups of boosted vs direct generation at each target size in
    `pixels`, for each recipe and mode (see the module docstring). dtype defaults to float16 on CUDA, float32 on a
    CPU; `compile_kwargs` go to `enable_fast_path` (tests compile with backend="eager")."""
    from fmboost.pipelines.info import collect

    pixels, modes = pixels or [1024, 2048], modes or list(MODES)
    recipes = [parse_recipe(r) for r in (recipes or RECIPES)]
    if unknown := set(modes) - set(MODES):
        raise ValueError(f"modes must be among {list(MODES)}, got {sorted(unknown)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or ("float16" if device.type == "cuda" else "float32")
    rows = []
    for kind, steps in recipes:
        base, pipe, guidance = _pipelines(kind, size, scale, upsampler_preset, upsample_steps, device,
                                          getattr(torch, dtype))
        for side in pixels:
            row = {"recipe": f"{kind}{steps}", "pixels": side, "base_pixels": side // scale, "steps": steps,
                   "guidance": guidance}
            rows.append(_measure(row, base, pipe, modes, repeats, device, compile_kwargs or {}))
        del base, pipe  # free this recipe's parts before the next one's
        if device.type == "cuda":
            torch.cuda.empty_cache()
    environment = collect()
    return {"setup": {"size": size, "device": str(device), "dtype": dtype, "scale": scale,
                      "upsampler_preset": upsampler_preset, "upsample_steps": upsample_steps, "repeats": repeats,
                      "batch": 1, "device_name": environment["device"], "versions": environment["versions"]},
            "method": "whole pipeline calls; each once untimed (first_call_s: the fast path compiles there), then "
                      "`repeats` timed calls, medians; speed-ups measured side by side in this run",
            "memory": ("peak_mib: torch.cuda.max_memory_allocated over the timed calls, every model resident"
                       if device.type == "cuda" else "peak_mib: null (CPU: no per-call peak in one process)"),
            "rows": rows}


def _pipelines(kind: str, size: str, scale: int, upsampler_preset: str, upsample_steps: int,
               device: torch.device, dtype: torch.dtype):
    """(direct StableDiffusionPipeline, BoostPipeline over the same parts, guidance scale) for a recipe kind:
    random SD1.5-shaped (cfg) or LCM-shaped (lcm) parts of `size`, a random CFMUNet preset, PSU coupling, Euler."""
    from diffusers import StableDiffusionPipeline
    from fmboost.models import CFMUNet, CouplingFlowMatcher, DiffusersAutoencoder, SamplerConfig, Upsampler
    from fmboost.pipelines.boost import BoostPipeline
    from fmboost.pipelines.lcm import base_defaults

    parts = {k: (v.to(device, dtype) if k != "tokenizer" and hasattr(v, "to") else v)
             for k, v in random_sd_components(size, lcm=kind == "lcm").items()}
    base = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    torch.manual_seed(0)
    cfm = CFMUNet.from_preset(upsampler_preset, latent_channels=4).to(device, dtype).eval()
    upsampler = Upsampler(cfm, DiffusersAutoencoder(parts["vae"], {"kind": "autoencoder_kl", "path": None}),
                          CouplingFlowMatcher(upsample="psu"), scale=scale,
                          sampler=SamplerConfig("euler", upsample_steps, "linear"))
    pipe = BoostPipeline.from_base(base, upsampler)
    for p in (base, pipe):
        p.set_progress_bar_config(disable=True)
    guidance = CFG_GUIDANCE if kind == "cfg" else base_defaults(parts["unet"], parts["scheduler"])[1]
    return base, pipe, guidance


def _measure(row: dict, base, pipe, modes: list[str], repeats: int, device: torch.device,
             compile_kwargs: dict) -> dict:
    """`row` (recipe, pixels, base_pixels, steps, guidance) with each mode's boosted and direct timings, the
    speed-ups and, with both modes, the fast path's image difference. The fast path is undone afterwards (eager
    parts, empty compile caches) for the next size or recipe."""
    side, kwargs = row["pixels"], dict(num_inference_steps=row["steps"], guidance_scale=row["guidance"],
                                       output_type="pt")
    calls = {"boosted": lambda: pipe(PROMPT, base_size=row["base_pixels"], **kwargs,
                                     generator=torch.Generator(device).manual_seed(0)),
             "direct": lambda: base(PROMPT, height=side, width=side, **kwargs,
                                    generator=torch.Generator(device).manual_seed(0))}
    images = {}
    for mode in modes:
        if mode == "fast":
            row["fast_path_on"] = pipe.enable_fast_path(**compile_kwargs)
            base.unet = pipe.unet  # the direct pipeline: the same compiled UNet (diffusers' recipe)
        measured = {name: time_call(call, device, repeats) for name, call in calls.items()}
        boosted = measured["boosted"].pop("output")
        images[mode] = {"boosted": boosted.images, "direct": measured["direct"].pop("output").images}
        if any(image.shape[-2:] != (side, side) for image in images[mode].values()):
            raise RuntimeError(f"expected {side}² images, got {[tuple(i.shape) for i in images[mode].values()]}")
        measured["boosted"]["stages_s"] = boosted.timings  # the last timed call's split
        measured["speedup_direct_over_boosted"] = measured["direct"]["median_s"] / measured["boosted"]["median_s"]
        row.update({"nfe": boosted.nfe, "tiles": boosted.tiles, mode: measured})
        if mode == "fast":
            pipe.disable_fast_path()
            base.unet = pipe.unet
            torch.compiler.reset()
    if set(MODES) <= set(images):
        row["fast"]["max_abs_diff_vs_eager"] = {
            name: (images["fast"][name].float() - images["eager"][name].float()).abs().max().item()
            for name in ("boosted", "direct")}
        row["fast_speedup_over_eager"] = {name: row["eager"][name]["median_s"] / row["fast"][name]["median_s"]
                                          for name in ("boosted", "direct")}
    return row


def print_end_to_end(result: dict) -> None:
    s = result["setup"]
    print(f"bench pipeline --end-to-end: size={s['size']} device={s['device']} dtype={s['dtype']} "
          f"CFM {s['upsampler_preset']} × {s['upsample_steps']} NFE, base at 1/{s['scale']} ({result['method']})")
    for row in result["rows"]:
        for mode in MODES:
            if mode in row:
                m = row[mode]
                peaks = "" if m["boosted"]["peak_mib"] is None else \
                    f"   peak {m['boosted']['peak_mib'] / 1024:.2f} / {m['direct']['peak_mib'] / 1024:.2f} GiB"
                print(f"  {row['recipe']:<6} {row['pixels']}² {mode:<5}  boosted {m['boosted']['median_s']:8.3f} s  "
                      f"direct {m['direct']['median_s']:8.3f} s  → {m['speedup_direct_over_boosted']:.2f}×"
                      f"   (first call {m['boosted']['first_call_s']:.1f} / {m['direct']['first_call_s']:.1f} s)"
                      + peaks)
        if "fast_speedup_over_eager" in row:
            diff = row["fast"]["max_abs_diff_vs_eager"]
            print(f"  {'':<6} fast / eager: boosted {row['fast_speedup_over_eager']['boosted']:.2f}×, direct "
                  f"{row['fast_speedup_over_eager']['direct']:.2f}×; image max |Δ| {diff['boosted']:.2e} / "
                  f"{diff['direct']:.2e}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `--end-to-end` beside the shared --size / --upsampler-preset / --upsample-steps / --device /
    --dtype / --output of `bench pipeline`."""
    parser.add_argument("--pixels", default="1024,2048", help="--end-to-end: target sides in pixels, comma-separated")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help="--end-to-end: base recipes, cfg:STEPS (guidance 7.5) and / or lcm:STEPS (LCM, no "
                             "guidance batch)")
    parser.add_argument("--modes", default=",".join(MODES), help="--end-to-end: eager and / or fast (the fast path)")
    parser.add_argument("--repeats", type=int, default=3, help="--end-to-end: timed calls per measurement (median)")
    parser.add_argument("--scale", type=int, default=4, help="--end-to-end: target / base resolution")


def run(args: argparse.Namespace) -> int:
    result = bench_end_to_end(args.size, [int(p) for p in args.pixels.split(",") if p],
                              [r for r in args.recipes.split(",") if r], [m for m in args.modes.split(",") if m],
                              args.repeats, args.scale, args.upsampler_preset, args.upsample_steps, args.device,
                              args.dtype)
    print_end_to_end(result)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return 0

