"""`fmboost bench pipeline`: where the time of boosted generation goes, stage by stage.

Per-stage time of boosted 1024² generation (SD base at 256² = 32² latents, CFM per NFE at 128² latents, PSU, VAE
decode at 1024²) vs direct SD generation at 1024² (128² latents), with random weights at SD1.5 sizes (`--size real`;
the compute is that of the real model) or a scaled-down architecture (`--size small`) so a CPU run takes minutes.
Each stage is timed once per call (after `--warmup` calls) and multiplied by its step count: the totals are
extrapolations from measured per-call times, which the output says. `--end-to-end` measures instead the whole
calls, boosted and direct, eager and fast path (`fmboost.benchmarks.end_to_end`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from fmboost.pipelines.cli_options import DTYPES, add_output_option
from fmboost.pipelines.random_sd import SD_SIZES, random_sd_components

from . import end_to_end
from .measure import seconds


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=list(SD_SIZES), default="small",
                        help="base/VAE architecture: real = SD1.5 sizes (slow on CPU), small = scaled down")
    parser.add_argument("--base-steps", type=int, default=25)
    parser.add_argument("--upsample-steps", type=int, default=4, help="CFM Euler steps, one NFE each")
    parser.add_argument("--upsampler-preset", default="reference",
                        help="CFMUNet preset (reference, base, small, tiny)")
    parser.add_argument("--no-guidance", action="store_true", help="batch 1 UNet calls (LCM) instead of CFG's 2")
    parser.add_argument("--decode", default="classic_attention,sdpa,channels_last,tiled,tiny_decoder",
                        help="comma-separated decode variants to time")
    parser.add_argument("--lr-latent", type=int, default=32)
    parser.add_argument("--hr-latent", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls per stage (default 1; 0 for real on CPU)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="time the whole calls instead: BoostPipeline vs the direct SD pipeline at each --pixels, "
                             "eager and fast path, for each --recipes (fmboost.benchmarks.end_to_end; its options "
                             "below say --end-to-end)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time UNet steps and the CFM NFE replayed from CUDA graphs (no launch overhead)")
    parser.add_argument("--compile", action="store_true",
                        help="also time UNet steps and the CFM NFE through the fast path's torch.compile (compiled "
                             "in untimed calls)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights and activations (default: float16 on CUDA, float32 on CPU)")
    add_output_option(parser, "the JSON result (default: %(default)s)", default="bench_pipeline.json")
    end_to_end.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.end_to_end:
        return end_to_end.run(args)
    result = bench_pipeline(args.size, args.base_steps, args.upsample_steps, args.upsampler_preset,
                            not args.no_guidance, [d for d in args.decode.split(",") if d], args.device,
                            args.warmup, args.lr_latent, args.hr_latent, args.dtype, args.cuda_graphs, args.compile)
    print_pipeline(result)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return 0
