"""`fmboost bench BENCH [options]`: where the time and the memory go, measured through the library.

    pipeline    per-stage time of boosted vs direct 1024² generation; --end-to-end: the whole calls, eager and
                fast path (`fmboost.benchmarks.pipeline`, `fmboost.benchmarks.end_to_end`)
    sampler     NFE and time per solver / schedule for CFMUNet presets (`fmboost.benchmarks.sampler`)
    upscale     peak memory and time of tiled vs untiled upscaling (`fmboost.benchmarks.upscale`)
    collection  a folder by one `fmboost upscale` against a shell loop, 1 vs 2 processes, kills and reruns
                (`fmboost.benchmarks.collection`)
    train       training throughput with and without the latent cache (`fmboost.benchmarks.train`)
    cache       the latent cache: parallel build, memory while reading, storage dtype (`fmboost.benchmarks.cache`)

Each benchmark is a module with `add_arguments(parser)` and `run(args)`, imported only when it runs (train and
cache import the training code); `fmboost bench BENCH --help` lists its options. The benchmarks import the library;
nothing in the library imports them.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module with `add_arguments(parser)` and `run(args)`, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "pipeline": ("fmboost.benchmarks.pipeline", "per-stage time of boosted vs direct 1024² generation"),
    "sampler": ("fmboost.benchmarks.sampler", "NFE and time per solver/schedule for CFMUNet presets"),
    "upscale": ("fmboost.benchmarks.upscale", "peak memory of tiled vs untiled upscaling"),
    "collection": ("fmboost.benchmarks.collection",
                   "a folder by one upscale command vs a shell loop; 1 vs 2 processes; kills and reruns"),
    "train": ("fmboost.benchmarks.train", "training throughput with and without the latent cache"),
    "cache": ("fmboost.benchmarks.cache", "latent cache: 1 vs 2 process build, RSS while reading, storage dtype"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the list below, one benchmark a line
    parser.epilog = "benchmarks:\n" + "\n".join(f"  {name:<12}{text}" for name, (_, text) in BENCHMARKS.items())
    parser.add_argument("benchmark", choices=list(BENCHMARKS), metavar="BENCH", help="the benchmark to run (below)")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's options (fmboost bench BENCH -h)")


def run(args: argparse.Namespace) -> int:
    module_name, text = BENCHMARKS[args.benchmark]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"fmboost bench {args.benchmark}", description=text)
    module.add_arguments(parser)
    return module.run(parser.parse_args(args.options)) or 0
