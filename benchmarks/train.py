"""`fmboost bench train`: training throughput with and without the latent cache, side by side in one run.

The three measurements use the same config, model size and batch size, one after the other in this
process: `steps` optimizer steps reading image pairs and encoding them every step (no cache), then
`steps` steps reading the cached latents through the DataLoader (`dataloader_num_workers` workers), then
`steps` steps on one cached batch kept on the device (synthetic input: no data loading at all, the upper
bound). cached / synthetic says whether training from the cache is data-starved (well below 1) or
compute-bound (≈ 1). Reports samples/s of each, their ratios, the cache build time and peak memory
(CUDA: max allocated; CPU: the process's peak RSS after each phase) as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from fmboost.models import Upsampler
from fmboost.pipelines.cli_options import add_option, add_output_option
from fmboost.pipelines.info import collect
from fmboost.train.cfm_upsampler import Optimization, build_first_stage, build_model, build_optimizer, train_step
from fmboost.train.config import add_config_arguments, load_config, overrides_from_args
from fmboost.train.data import EpochSampler, PairDataset, image_records, split_records
from fmboost.train.demo import DEMO_CONFIG
from fmboost.train.latent_cache import CachedLatentDataset, build_or_load

from .measure import peak_rss_mb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training YAML (default: the embedded demo config)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per mode (after 1 warm-up)")
    add_option(parser, "--cache-dir", old=("--cache_dir",),
               help="latent cache folder (default: a temporary one, built in this run)")
    add_output_option(parser, "write the JSON here (default: print only)")
    add_config_arguments(parser, output=False)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mb()


def time_steps(dataset, config, accelerator, first_stage, flow, steps: int, synthetic: bool = False) -> dict:
    """Train a fresh model for 1 + `steps` steps on `dataset`; samples/s over the timed steps. `synthetic`: the
    loader's first batch, already on the device, is reused for every step (the no-data-loading upper bound)."""
    torch.manual_seed(config.seed)
    model = build_model(config, first_stage.latent_channels)
    optimizer, lr_scheduler = build_optimizer(config, model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size,
                                         sampler=EpochSampler(dataset, config.seed), drop_last=True,
                                         num_workers=config.dataloader_num_workers)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    upsampler = Upsampler(model, first_stage, flow, config.scale, config.sampler_config())
    optimization = Optimization(optimizer, lr_scheduler)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    done, start = 0, None
    batches = itertools.repeat(next(iter(loader))) if synthetic else None
    while done <= steps:
        for batch in batches or loader:  # data loading is part of the timed work: that is what the cache removes
            train_step(batch, upsampler, optimization, accelerator, config, done)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            done += 1
            if done == 1:
                start = time.perf_counter()  # the first step (allocations, kernels) is not timed
            if done > steps:
                break
    seconds = time.perf_counter() - start
    return {"samples_per_second": steps * config.train_batch_size / seconds, "seconds": seconds, "steps": steps,
            "peak_memory_mb": peak_memory_mb(accelerator.device)}


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides_from_args(args), base=None if args.config else DEMO_CONFIG)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    records, _ = split_records(image_records(config), config)
    first_stage, flow = build_first_stage(config, accelerator.device), config.flow()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache = build_or_load(records, config, first_stage, flow, args.cache_dir or tmp)  # sets the latent stats
        build_seconds = time.perf_counter() - start
        without = time_steps(PairDataset(records, config), config, accelerator, first_stage, flow, args.steps)
        cached = CachedLatentDataset(cache, config)
        with_cache = time_steps(cached, config, accelerator, first_stage, flow, args.steps)
        synthetic = time_steps(cached, config, accelerator, first_stage, flow, args.steps, synthetic=True)
    result = {
        "benchmark": "train", "config": args.config or "embedded demo config", "first_stage": config.first_stage,
        "crop_size": config.crop_size, "train_batch_size": config.train_batch_size,
        "latent_shape": list(cached[0]["hr_latent"].shape), "cache_hit": cache.hit, "cache_samples": cache.num_samples,
        "dataloader_num_workers": config.dataloader_num_workers, "cache_build_seconds": build_seconds,
        "without_cache": without, "with_cache": with_cache, "synthetic_input": synthetic,
        "speedup": with_cache["samples_per_second"] / without["samples_per_second"],
        "cached_over_synthetic": with_cache["samples_per_second"] / synthetic["samples_per_second"],
        "environment": collect(),
    }
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    print(f"without cache {without['samples_per_second']:.2f} samples/s, with cache "
          f"{with_cache['samples_per_second']:.2f} samples/s: ×{result['speedup']:.2f} "
          f"(cache built in {build_seconds:.1f} s, {cache.num_samples} samples); synthetic input "
          f"{synthetic['samples_per_second']:.2f} samples/s: the cache reaches ×{result['cached_over_synthetic']:.2f} "
          f"of it with {config.dataloader_num_workers} loader workers", file=sys.stderr)
    print(text)
    return 0

