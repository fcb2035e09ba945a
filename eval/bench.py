"""`fmboost bench pipeline | sampler | train`: where the time of boosted generation goes.

pipeline  per-stage time of boosted 1024² generation (SD base at 256² = 32² latents, CFM per NFE at
          128² latents, PSU, VAE decode at 1024²) vs direct SD generation at 1024² (128² latents), with
          random weights at SD1.5 sizes (`--size real`; the compute is that of the real model) or a
          scaled-down architecture (`--size small`) so a CPU run takes minutes. Each stage is timed once
          per call (after `--warmup` calls) and multiplied by its step count: the totals are
          extrapolations from measured per-call times, which the output says. `--end-to-end` measures
          instead the whole calls, boosted and direct, eager and fast path (`fmboost.eval.bench_end_to_end`).
sampler   NFE and time per solver/schedule for CFMUNet presets at 128² latents.
upscale   peak memory and time of tiled vs untiled upscaling (`fmboost.eval.bench_upscale`).
collection  a folder by one `fmboost upscale` against a shell loop, 1 vs 2 processes, kills and reruns
          (`fmboost.eval.bench_collection`).
train     delegates to `fmboost.train.bench_train` (imported only when asked for).
cache     delegates to `fmboost.train.bench_cache`: parallel build, memory while reading, storage dtype.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from fmboost.eval import bench_collection, bench_end_to_end, bench_upscale
from fmboost.pipelines.random_sd import SD_SIZES, random_sd_components


def seconds(fn, device: torch.device, warmup: int = 0, repeats: int = 1) -> float:
    """Median wall-clock seconds of fn() over `repeats` calls after `warmup` calls (CUDA synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------- pipeline


class StageTimer:
    """Seconds per call of each stage and, on CUDA, the peak memory allocated while it ran.

    The peak includes every model resident at the time (all of them are loaded up front), so it is
    what a GPU must hold to run that stage, not the stage's own activations alone.
    """

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.seconds: dict[str, float] = {}
        self.peak_memory_mib: dict[str, float] = {}

    def __call__(self, name: str, fn) -> float:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.seconds[name] = seconds(fn, self.device, self.warmup)
        if cuda:
            self.peak_memory_mib[name] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return self.seconds[name]


def cuda_graph(fn, device: torch.device):
    """fn() captured once in a CUDA graph; returns graph.replay, which re-runs its kernels with no Python.

    fn must read only static tensors (its inputs are captured by address). Replaying shows what a stage
    costs once kernel-launch overhead is gone (the mechanism torch.compile(mode="reduce-overhead") uses).
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):  # warm up on a side stream so lazy initialisation is not captured
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        fn()
    return graph.replay


def decode_variants(vae, z: torch.Tensor, timer: StageTimer, names: list[str], pixels: int) -> dict:
    """Seconds to decode z (B, 4, h, w) to `pixels`² with each variant; `sdpa` is diffusers' default processor."""
    from diffusers import AutoencoderTiny
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    results = {}
    for name in names:
        model = vae
        if name == "tiny_decoder":  # TAESD-shaped preview decoder (random weights: timing only)
            model = AutoencoderTiny(decoder_block_out_channels=(64, 64, 64, 64)).to(z.device, vae.dtype).eval()
        vae.set_attn_processor(AttnProcessor() if name == "classic_attention" else AttnProcessor2_0())
        if name == "channels_last":
            vae.to(memory_format=torch.channels_last)
        if name == "tiled":
            vae.enable_tiling()
        x = z.to(memory_format=torch.channels_last) if name == "channels_last" else z
        results[name] = timer(f"decode_{pixels}_{name}", lambda m=model, x=x: m.decode(x))
        vae.disable_tiling()
        vae.to(memory_format=torch.contiguous_format)
    vae.set_attn_processor(AttnProcessor2_0())
    return results


def bench_pipeline(size: str = "small", base_steps: int = 25, upsample_steps: int = 4,
                   upsampler_preset: str = "reference", guidance: bool = True, decode: list[str] | None = None,
                   device: str | None = None, warmup: int | None = None, lr_latent: int = 32, hr_latent: int = 128,
                   dtype: str | None = None, cuda_graphs: bool = False, compile: bool = False) -> dict:
    """Per-call times (and CUDA peak memory) of every stage; extrapolated totals of boosted vs direct.

    dtype defaults to float16 on CUDA (how SD is run there) and float32 on CPU (no fast half kernels).
    cuda_graphs also times the UNet steps and the CFM NFE replayed from CUDA graphs (launch overhead removed),
    compile through the fast path's compiled SD UNet and CFM UNet (`fmboost.pipelines.fast_path.compile_module`,
    after every eager stage: it makes the weights channels-last; compiled during two untimed calls), and each
    gives the boosted / direct totals with those times beside the eager ones.
    """
    from fmboost.models import CFMUNet, DiffusersAutoencoder
    from fmboost.pipelines.fast_path import compile_module

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, got {device}")
    dtype = dtype or ("float16" if device.type == "cuda" else "float32")
    torch_dtype = getattr(torch, dtype)
    warmup = (0 if size == "real" and device.type == "cpu" else 1) if warmup is None else warmup
    parts = {k: (v.to(device, torch_dtype) if hasattr(v, "to") and k != "tokenizer" else v)
             for k, v in random_sd_components(size).items()}
    unet, vae = parts["unet"], parts["vae"]
    batch = 2 if guidance else 1  # classifier-free guidance runs the UNet on (uncond, cond)
    tokens = parts["tokenizer"](["a photo of a cat"] * batch, padding="max_length", max_length=77,
                                return_tensors="pt").input_ids.to(device)
    cfm = CFMUNet.from_preset(upsampler_preset, latent_channels=4).to(device, torch_dtype).eval()
    z_hr = torch.randn(1, 4, hr_latent, hr_latent, device=device, dtype=torch_dtype)
    first_stage = DiffusersAutoencoder(vae, {"kind": "autoencoder_kl"})
    f = first_stage.downsample_factor
    weights_mib = torch.cuda.memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    with torch.no_grad():
        text = parts["text_encoder"](tokens)[0]
    timer = StageTimer(device, warmup)

    network_calls = []  # (name, network, call): timed compiled once every eager stage is done

    def time_network_call(name: str, network: str, call) -> None:
        """A UNet step or CFM NFE, call(module): eager; with --cuda-graphs also replayed from a graph
        (`<name>_cuda_graph`); with --compile timed compiled later (`<name>_compiled`)."""
        module = {"unet": unet, "cfm": cfm}[network]
        timer(name, lambda: call(module))
        if cuda_graphs:
            timer(f"{name}_cuda_graph", cuda_graph(lambda: call(module), device))
        network_calls.append((name, network, call))

    def unet_step(n: int) -> None:
        z = torch.randn(batch, 4, n, n, device=device, dtype=torch_dtype)
        t = torch.tensor(500, device=device)
        time_network_call(f"unet_step_{n}", "unet", lambda m: m(z, t, encoder_hidden_states=text))

    timer("text_encoder", lambda: parts["text_encoder"](tokens))
    unet_step(lr_latent)
    unet_step(hr_latent)
    t_cfm = torch.tensor([0.5], device=device)
    time_network_call(f"cfm_nfe_{hr_latent}", "cfm", lambda m: m(z_hr, t_cfm, z_hr))
    timer(f"psu_decode_{lr_latent * f}", lambda: first_stage.decode(z_hr[..., :lr_latent, :lr_latent]))
    timer(f"psu_encode_{hr_latent * f}",
          lambda: first_stage.encode(torch.zeros(1, 3, hr_latent * f, hr_latent * f, device=device)))
    decode_s = decode_variants(vae, z_hr, timer, decode or ["sdpa"], hr_latent * f)
    if compile:  # the fast path's networks; their first calls compile (never timed)
        compiled = {"unet": compile_module(unet), "cfm": compile_module(cfm)}
        for name, network, call in network_calls:
            compiled_timer = StageTimer(device, max(2, warmup))
            compiled_timer(name, lambda call=call, module=compiled[network]: call(module))
            timer.seconds[f"{name}_compiled"] = compiled_timer.seconds[name]
            timer.peak_memory_mib.update({f"{name}_compiled": v for v in compiled_timer.peak_memory_mib.values()})
    result = summarise_pipeline(dict(timer.seconds), decode_s, dict(
        size=size, device=str(device), dtype=dtype, base_steps=base_steps, upsample_steps=upsample_steps,
        upsampler_preset=upsampler_preset, guidance=guidance, warmup=warmup, lr_latent=lr_latent,
        hr_latent=hr_latent, pixels=hr_latent * f))
    for enabled, key, suffix in ((cuda_graphs, "cuda_graphs", "_cuda_graph"), (compile, "compiled", "_compiled")):
        if enabled:
            variant = {k.removesuffix(suffix): v for k, v in timer.seconds.items() if k.endswith(suffix)}
            result[key] = summarise_pipeline({**timer.seconds, **variant}, decode_s, result["setup"])
    if device.type == "cuda":
        result["memory_mib"] = {"weights": weights_mib, "peak_per_stage": timer.peak_memory_mib}
    return result


def summarise_pipeline(per_call: dict, decode_s: dict, setup: dict) -> dict:
    """Stage totals = per-call seconds × calls; ratio = direct / boosted, for each decode variant."""
    lr, hr, steps = setup["lr_latent"], setup["hr_latent"], setup["base_steps"]
    f = setup["pixels"] // hr
    psu = per_call[f"psu_decode_{lr * f}"] + per_call[f"psu_encode_{hr * f}"]
    decode = decode_s.get("sdpa", next(iter(decode_s.values())))
    boosted = {"text_encoder": per_call["text_encoder"], "base": steps * per_call[f"unet_step_{lr}"],
               "psu": psu, "upsample": setup["upsample_steps"] * per_call[f"cfm_nfe_{hr}"], "decode": decode}
    direct = {"text_encoder": per_call["text_encoder"], "base": steps * per_call[f"unet_step_{hr}"], "decode": decode}
    boosted_total, direct_total = sum(boosted.values()), sum(direct.values())
    return {
        "setup": setup,
        "method": "each stage timed once per call (after warmup) and multiplied by its number of calls",
        "per_call_s": per_call,
        "boosted_s": {**boosted, "total": boosted_total, "total_latent_mode": boosted_total - psu},
        "direct_s": {**direct, "total": direct_total},
        "speedup_direct_over_boosted": direct_total / boosted_total,
        "speedup_latent_mode": direct_total / (boosted_total - psu),
        "decode_speedup_vs_sdpa": {k: decode / v for k, v in decode_s.items()},
    }


def print_pipeline(result: dict) -> None:
    s = result["setup"]
    print(f"bench pipeline: size={s['size']} device={s['device']} dtype={s['dtype']} base_steps={s['base_steps']} "
          f"upsample_steps={s['upsample_steps']} cfm={s['upsampler_preset']} ({result['method']})")
    peaks = result.get("memory_mib", {}).get("peak_per_stage", {})
    for name, value in result["per_call_s"].items():
        peak = f"   peak {peaks[name] / 1024:6.2f} GiB" if name in peaks else ""
        print(f"  per call  {name:<24} {value:9.3f} s{peak}")
    if "memory_mib" in result:
        print(f"  weights resident: {result['memory_mib']['weights'] / 1024:.2f} GiB")
    for label, key in (("boosted", "boosted_s"), ("direct", "direct_s")):
        print(f"  {label:<8}  " + "  ".join(f"{k}={v:.2f}s" for k, v in result[key].items()))
    print(f"  direct {s['pixels']}² / boosted: {result['speedup_direct_over_boosted']:.2f}× "
          f"(latent-space coupling instead of PSU: {result['speedup_latent_mode']:.2f}×)")
    speedups = result["decode_speedup_vs_sdpa"].items()
    print("  decode speed-up vs sdpa: " + ", ".join(f"{k} {v:.2f}×" for k, v in speedups))
    for key, label in (("cuda_graphs", "CUDA graphs"), ("compiled", "torch.compile")):
        if key in result:
            variant = result[key]
            print(f"  with {label} (UNet steps, CFM NFE): boosted {variant['boosted_s']['total']:.2f}s, direct "
                  f"{variant['direct_s']['total']:.2f}s → {variant['speedup_direct_over_boosted']:.2f}× "
                  f"(latent-space coupling: {variant['speedup_latent_mode']:.2f}×)")


# ---------------------------------------------------------------------------------------- sampler

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


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = sub.add_parser("pipeline", help="per-stage time of boosted vs direct 1024² generation")
    p.add_argument("--size", choices=list(SD_SIZES), default="small",
                   help="base/VAE architecture: real = SD1.5 sizes (slow on CPU), small = scaled down")
    p.add_argument("--base-steps", type=int, default=25)
    p.add_argument("--upsample-steps", type=int, default=4, help="CFM Euler steps, one NFE each")
    p.add_argument("--upsampler-preset", default="reference", help="CFMUNet preset (reference, base, small, tiny)")
    p.add_argument("--no-guidance", action="store_true", help="batch 1 UNet calls (LCM) instead of CFG's 2")
    p.add_argument("--decode", default="classic_attention,sdpa,channels_last,tiled,tiny_decoder",
                   help="comma-separated decode variants to time")
    p.add_argument("--lr-latent", type=int, default=32)
    p.add_argument("--hr-latent", type=int, default=128)
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per stage (default 1; 0 for real on CPU)")
    p.add_argument("--end-to-end", action="store_true",
                   help="time the whole calls instead: BoostPipeline vs the direct SD pipeline at each --pixels, "
                        "eager and fast path, for each --recipes (fmboost.eval.bench_end_to_end; its options below "
                        "say --end-to-end)")
    p.add_argument("--device", default=None)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time UNet steps and the CFM NFE replayed from CUDA graphs (no launch overhead)")
    p.add_argument("--compile", action="store_true",
                   help="also time UNet steps and the CFM NFE through the fast path's torch.compile (compiled in "
                        "untimed calls)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="weights and activations (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--output", "-o", default="bench_pipeline.json")
    bench_end_to_end.add_arguments(p)
    s = sub.add_parser("sampler", help="NFE and time per solver/schedule for CFMUNet presets")
    s.add_argument("--presets", default="reference,small")
    s.add_argument("--configs", default=",".join(SAMPLER_CONFIGS),
                   help="comma-separated SamplerConfig strings: solver:schedule:steps or an adaptive solver")
    s.add_argument("--latent-size", type=int, default=128)
    s.add_argument("--quick", action="store_true",
                   help="count NFE at 32² latents (time per NFE still at --latent-size)")
    s.add_argument("--upsampler", default=None, help="a trained upsampler folder instead of random presets")
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--device", default=None)
    s.add_argument("--output", "-o", default="bench_sampler.json")
    bench_upscale.add_arguments(sub.add_parser("upscale", help="peak memory of tiled vs untiled upscaling"))
    bench_collection.add_arguments(sub.add_parser(
        "collection", help="a folder by one upscale command vs a shell loop; 1 vs 2 processes; kills and reruns"))
    # `train` is owned by fmboost.train.bench_train; its arguments are parsed there, on demand.
    t = sub.add_parser("train", help="training throughput (fmboost.train.bench_train)", add_help=False,
                       prefix_chars="\x01")
    t.add_argument("train_args", nargs=argparse.REMAINDER)
    c = sub.add_parser("cache", help="latent cache: 1 vs 2 process build, RSS while reading (train.bench_cache)",
                       add_help=False, prefix_chars="\x01")
    c.add_argument("cache_args", nargs=argparse.REMAINDER)


def run_train(argv: list[str]) -> int:
    """`fmboost bench train` is the training benchmark of fmboost.train.bench_train, with its own options."""
    from fmboost.train import bench_train

    parser = argparse.ArgumentParser(prog="fmboost bench train")
    bench_train.add_arguments(parser)
    return bench_train.run(parser.parse_args(argv)) or 0


def run_cache(argv: list[str]) -> int:
    """`fmboost bench cache` is the latent cache benchmark of fmboost.train.bench_cache, with its own options."""
    from fmboost.train import bench_cache

    parser = argparse.ArgumentParser(prog="fmboost bench cache")
    bench_cache.add_arguments(parser)
    return bench_cache.run(parser.parse_args(argv)) or 0


def run(args: argparse.Namespace) -> int:
    if args.bench == "train":
        return run_train(args.train_args)
    if args.bench == "cache":
        return run_cache(args.cache_args)
    if args.bench == "upscale":
        return bench_upscale.run(args)
    if args.bench == "collection":
        return bench_collection.run(args)
    if args.bench == "pipeline" and args.end_to_end:
        return bench_end_to_end.run(args)
    if args.bench == "pipeline":
        result = bench_pipeline(args.size, args.base_steps, args.upsample_steps, args.upsampler_preset,
                                not args.no_guidance, [d for d in args.decode.split(",") if d], args.device,
                                args.warmup, args.lr_latent, args.hr_latent, args.dtype, args.cuda_graphs,
                                args.compile)
        print_pipeline(result)
    else:
        result = bench_sampler([p for p in args.presets.split(",") if p], [c for c in args.configs.split(",") if c],
                               args.latent_size, 32 if args.quick else None, args.device, args.warmup, args.upsampler)
        print_sampler(result)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return 0
