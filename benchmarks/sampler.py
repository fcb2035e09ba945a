"""`fmboost bench sampler`: NFE and time per solver / schedule for CFMUNet presets (or a trained upsampler's v_θ) at
128² latents: the ODE solve alone (images go through `Upsampler.upscale`: `bench upscale`, `bench pipeline`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from fmboost.pipelines.cli_options import add_output_option

from .measure import seconds

SAMPLER_CONFIGS = ("euler:linear:4", "euler:logit_normal:4", "euler:linear:8", "midpoint:linear:4",
                   "heun:linear:4", "rk4:linear:2", "dopri5")


def bench_sampler(presets: list[str], configs: list[str], latent_size: int = 128, nfe_latent_size: int | None = None,
                  device: str | None = None, warmup: int = 1, upsampler: str | None = None) -> dict:
    """NFE per sampler (`SamplerConfig.parse` strings, solved at `nfe_latent_size`) × measured seconds per NFE at
    `latent_size`: the ODE solve alone, on latents (images go through `Upsampler.upscale`: `bench upscale`,
    `bench pipeline`)."""
    from fmboost.models import CFMUNet, CouplingFlowMatcher, SamplerConfig, Upsampler

    configs = [SamplerConfig.parse(text) for text in configs]  # a typo fails before any model runs

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    nfe_latent_size = nfe_latent_size or latent_size
    models = ({"trained": Upsampler.from_pretrained(upsampler).model} if upsampler else
              {p: CFMUNet.from_preset(p, latent_channels=4) for p in presets})
    flow = CouplingFlowMatcher(upsample="bilinear")
    generator = torch.Generator(device).manual_seed(0)
    rows = {}
    for name, model in models.items():
        model = model.to(device).eval()
        c = model.config.latent_channels
        z = torch.randn(1, c, latent_size, latent_size, device=device, generator=generator)
        per_nfe = seconds(lambda m=model, z=z: m(z, 0.5, z), device, warmup)
        cond = torch.randn(1, c, nfe_latent_size, nfe_latent_size, device=device, generator=generator)
        rows[name] = {"per_nfe_s": per_nfe, "params_M": model.num_parameters() / 1e6, "configs": {}}
        for config in configs:
            start = time.perf_counter()
            nfe = flow.sample(model, cond, generator, **config.solve_kwargs()).nfe
            measured = time.perf_counter() - start
            rows[name]["configs"][config.format()] = {"nfe": nfe, "time_s": nfe * per_nfe,
                                                      "solve_s_at_nfe_size": measured}
    names = list(rows)
    ratios = {f"{a}/{b}": rows[a]["per_nfe_s"] / rows[b]["per_nfe_s"] for a in names for b in names if a != b}
    return {"setup": {"device": str(device), "latent_size": latent_size, "nfe_latent_size": nfe_latent_size,
                      "warmup": warmup},
            "method": "time_s = NFE (counted by solving at nfe_latent_size) × seconds per NFE measured at latent_size",
            "models": rows, "per_nfe_ratios": ratios}


def print_sampler(result: dict) -> None:
    s = result["setup"]
    print(f"bench sampler: device={s['device']} latents {s['latent_size']}² ({result['method']})")
    for name, row in result["models"].items():
        print(f"  {name} ({row['params_M']:.1f} M params): {row['per_nfe_s']:.3f} s per NFE")
        for text, c in row["configs"].items():
            print(f"    {text:<22} NFE {c['nfe']:>4}   {c['time_s']:8.2f} s")
    for pair, ratio in result["per_nfe_ratios"].items():
        print(f"  per-NFE time {pair}: {ratio:.2f}×")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="reference,small")
    parser.add_argument("--configs", default=",".join(SAMPLER_CONFIGS),
                        help="comma-separated SamplerConfig strings: solver:schedule:steps or an adaptive solver")
    parser.add_argument("--latent-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true",
                        help="count NFE at 32² latents (time per NFE still at --latent-size)")
    parser.add_argument("--upsampler", default=None, help="a trained upsampler folder instead of random presets")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None)
    add_output_option(parser, "the JSON result (default: %(default)s)", default="bench_sampler.json")


def run(args: argparse.Namespace) -> int:
    result = bench_sampler([p for p in args.presets.split(",") if p], [c for c in args.configs.split(",") if c],
                           args.latent_size, 32 if args.quick else None, args.device, args.warmup, args.upsampler)
    print_sampler(result)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return 0
