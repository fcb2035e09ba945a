"""`fmboost bench upscale --upsampler DIR`: peak memory and time of `Upsampler.upscale`, tiled vs untiled.

Each tile size runs in its own Python process, so every peak is that run's alone (a high-water mark
cannot be reset within one process on the CPU): peak resident memory (ru_maxrss) and, on CUDA, the peak
allocated by torch. The input is a random image of output/scale pixels (memory does not depend on the
content); the upsampler samples with its saved sampler unless `--upsample-steps` is given.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from fmboost.pipelines.cli_options import DTYPES, add_output_option

from .measure import peak_rss_mb

WORKER = "fmboost.benchmarks.upscale"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upsampler", required=True, help="upsampler folder")
    parser.add_argument("--output-size", type=int, default=2048, help="output side in pixels (a square image)")
    parser.add_argument("--tile-sizes", default="0,512,1024",
                        help="comma-separated tile sizes in output pixels; 0 = untiled")
    parser.add_argument("--tile-overlap", type=int, default=None, help="output pixels (default: upscale's, 128)")
    parser.add_argument("--upsample-steps", type=int, default=None)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="CFMUNet weights (default: float16 on CUDA, float32 on CPU)")
    add_output_option(parser, "the JSON result (default: %(default)s)", default="bench_upscale.json")


def measure(upsampler_dir: str, output_size: int, tile_size: int, tile_overlap: int | None, steps: int | None,
            device: str, dtype: str) -> dict:
    """One upscale in this process → {seconds, tiles, nfe, peak_rss_mib, rss_before_mib, cuda_peak_mib}."""
    from fmboost.models import Upsampler

    upsampler = Upsampler.from_pretrained(upsampler_dir).to(device).cast(getattr(torch, dtype))
    if dtype != "float32":
        upsampler = upsampler.mixed_precision()
    side = output_size // upsampler.scale
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    overrides = {} if steps is None else {"num_steps": steps}
    rss_before = _rss_mib()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = upsampler.upscale(image, torch.Generator(device).manual_seed(0), tile_size=tile_size,
                               tile_overlap=tile_overlap, **overrides)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert result.image.shape[-1] == output_size
    return {"tile_size": tile_size, "seconds": round(seconds, 2), "tiles": result.tiles, "nfe": result.nfe,
            "peak_rss_mib": round(peak_rss_mb()),
            "rss_before_mib": round(rss_before),
            "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20) if device.startswith("cuda") else None}


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2 ** 20


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    rows = []
    for tile_size in (int(t) for t in args.tile_sizes.split(",") if t):
        config = {"upsampler_dir": args.upsampler, "output_size": args.output_size, "tile_size": tile_size,
                  "tile_overlap": args.tile_overlap, "steps": args.upsample_steps, "device": device, "dtype": dtype}
        done = subprocess.run([sys.executable, "-m", WORKER, json.dumps(config)], capture_output=True, text=True)
        if done.returncode:  # e.g. out of memory untiled: a result too, recorded with its reason
            lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
            rows.append({"tile_size": tile_size, "error": lines[-1][:300]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"upsampler": args.upsampler, "output_size": args.output_size, "device": device, "dtype": dtype,
              "torch_threads": torch.get_num_threads(), "runs": rows}
    print(f"upscale to {args.output_size}² on {device} ({dtype}), one process per row:")
    print(f"{'tile px':>8}{'tiles':>7}{'NFE':>5}{'s':>9}{'peak RSS MiB':>14}{'RSS before':>12}{'CUDA peak MiB':>15}")
    for r in rows:
        if "error" in r:
            print(f"{r['tile_size'] or 'none':>8}  failed: {r['error']}")
            continue
        cuda = "-" if r["cuda_peak_mib"] is None else str(r["cuda_peak_mib"])
        print(f"{r['tile_size'] or 'none':>8}{r['tiles']:>7}{r['nfe']:>5}{r['seconds']:>9.2f}{r['peak_rss_mib']:>14}"
              f"{r['rss_before_mib']:>12}{cuda:>15}")
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":  # the measuring process: one configuration, one JSON line
    with torch.no_grad():
        print(json.dumps(measure(**json.loads(sys.argv[1]))))
