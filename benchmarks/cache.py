"""`fmboost bench cache`: the latent cache at scale, measured in one run.

build  the same cache built by 1 and by 2 processes (`torch.distributed.run`, gloo on CPU; one thread per
       process, so a process stands for one GPU): encoded samples/s of each and their ratio.
read   a synthetic cache of `--read-gb` GB with the latents' shapes (`--read-shape`, default SD 1024² crops:
       4×128²) read for one epoch in training order (EpochSampler, DataLoader, batches) by a fresh process:
       its peak RSS (and its workers') against the cache's size.
dtype  PSNR of decode(latent stored in float16 / bfloat16) against decode(float32 latent) on the first
       `--psnr-patches` patches of the configured images and first stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from fmboost.pipelines.cli_options import add_output_option
from fmboost.train.config import CACHE_DTYPES, TrainConfig, add_config_arguments, load_config, overrides_from_args
from safetensors.torch import save_file

from .measure import peak_rss_mb

# The workers import only what they use (not diffusers): the read worker's RSS is the figure measured.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training YAML (default: the embedded demo config)")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts to build with")
    parser.add_argument("--read-gb", type=float, default=4.0, help="size of the synthetic cache read back (0: skip)")
    parser.add_argument("--read-shape", default="4,128,128", help="C,H,W of the synthetic cache's latents")
    parser.add_argument("--read-workers", type=int, default=2, help="data loader workers while reading")
    parser.add_argument("--psnr-patches", type=int, default=16, help="patches for the dtype PSNR (0: skip)")
    parser.add_argument("--work-dir", help="where the caches are written (default: a temporary folder)")
    add_output_option(parser, "write the JSON here (default: print only)")
    add_config_arguments(parser, output=False)


# ------------------------------------------------------------------------------------------- build


def build_worker(config_file: str, cache_dir: str) -> None:
    """One process of a parallel build (run under torch.distributed.run); rank 0 prints the result as JSON."""
    from accelerate import PartialState
    from fmboost.train.cfm_upsampler import build_first_stage
    from fmboost.train.data import image_records, split_records
    from fmboost.train.latent_cache import MANIFEST, ShardReader, build_or_load

    torch.set_num_threads(1)
    state = PartialState(cpu=not torch.cuda.is_available())  # on CPU, accelerate needs cpu=True to use gloo
    config = load_config(None, json.loads(Path(config_file).read_text()))
    records, _ = split_records(image_records(config), config)
    first_stage = build_first_stage(config, state.device)
    cache = build_or_load(records, config, first_stage, config.flow(), cache_dir, state)
    if state.is_main_process:
        shards = json.loads((cache.path / MANIFEST).read_text())["shards"]
        ranks = [int(ShardReader(cache.path / s["file"]).metadata["rank"]) for s in shards]
        print(json.dumps({"processes": state.num_processes, "samples": cache.num_samples,
                          "samples_per_second": cache.encode_samples_per_second,
                          "shards_per_rank": [ranks.count(r) for r in range(state.num_processes)]}))


def measure_build(config: TrainConfig, processes: list[int], work: Path) -> dict:
    config_file = work / "config.json"
    config_file.write_text(json.dumps(config.to_dict()))
    results = {}
    for n in processes:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
                   "fmboost.benchmarks.cache", "--build-worker", str(config_file), str(work / f"build_{n}")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"the {n}-process build failed:\n{done.stderr[-4000:]}")
        results[n] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# -------------------------------------------------------------------------------------------- read


def write_synthetic_cache(folder: Path, gigabytes: float, shape: tuple[int, int, int], dtype: str,
                          shard_samples: int = 256) -> int:
    """A complete cache entry of random latents, `gigabytes` in all (hr_latent + cond); returns its sample count."""
    from fmboost.train.latent_cache import CACHE_VERSION, MANIFEST, shard_name

    sample_bytes = 2 * math.prod(shape) * CACHE_DTYPES[dtype].itemsize
    total = max(1, int(gigabytes * 2 ** 30 / sample_bytes))
    folder.mkdir(parents=True, exist_ok=True)
    shards, generator = [], torch.Generator().manual_seed(0)
    for index, start in enumerate(range(0, total, shard_samples)):
        n = min(shard_samples, total - start)
        tensors = {k: torch.randn(n, *shape, generator=generator).to(CACHE_DTYPES[dtype])
                   for k in ("hr_latent", "cond")}
        save_file(tensors, folder / shard_name(index), metadata={"rank": "0", "skipped": "[]"})
        shards.append({"file": shard_name(index), "num_samples": n})
        del tensors
    meta = {"version": CACHE_VERSION, "num_samples": total, "shards": shards, "dtype": dtype, "shape": list(shape),
            "latent_mean": [0.0] * shape[0], "latent_std": [1.0] * shape[0]}
    (folder / MANIFEST).write_text(json.dumps(meta))
    return total


def read_worker(cache_path: str, config_file: str, workers: int) -> None:
    """Read one epoch of the cache as training does; print peak RSS (MB) before and after, as JSON."""
    from fmboost.train.data import EpochSampler
    from fmboost.train.latent_cache import MANIFEST, CachedLatentDataset, LatentCache

    config = load_config(None, json.loads(Path(config_file).read_text()))
    meta = json.loads((Path(cache_path) / MANIFEST).read_text())
    cache = LatentCache(Path(cache_path), True, meta["num_samples"], torch.tensor(meta["latent_mean"]),
                        torch.tensor(meta["latent_std"]))
    dataset = CachedLatentDataset(cache, config)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, drop_last=True,
                                         sampler=EpochSampler(dataset, config.seed), num_workers=workers)
    before, start, samples, checksum = peak_rss_mb(), time.perf_counter(), 0, 0.0
    for batch in loader:
        samples += batch["hr_latent"].shape[0]
        checksum += float(batch["hr_latent"][:, 0, 0, 0].sum())  # touch the data, as a training step would
    print(json.dumps({"samples": samples, "seconds": time.perf_counter() - start, "rss_before_mb": before,
                      "peak_rss_mb": peak_rss_mb(), "peak_rss_workers_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)
                      if workers else None}))


def measure_read(config: TrainConfig, gigabytes: float, shape: tuple[int, int, int], workers: int, work: Path) -> dict:
    folder = work / "synthetic_cache"
    samples = write_synthetic_cache(folder, gigabytes, shape, config.latent_cache_dtype)
    cache_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2 ** 20
    command = [sys.executable, "-m", "fmboost.benchmarks.cache", "--read-worker", str(folder),
               str(work / "config.json"), str(workers)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"reading the cache failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "cache_mb": cache_mb, "cache_samples": samples, "shape": list(shape),
            "dtype": config.latent_cache_dtype, "workers": workers}


# ------------------------------------------------------------------------------------------- dtype


@torch.no_grad()
def measure_dtype_psnr(config: TrainConfig, patches: int) -> dict:
    """PSNR (dB, images in [-1, 1]) of decode(latent cast to each dtype) against decode(float32 latent)."""
    from fmboost.models.metrics import psnr
    from fmboost.train.cfm_upsampler import build_first_stage
    from fmboost.train.data import image_records, split_records
    from fmboost.train.latent_cache import _batches, cache_patches, training_latent_stats

    first_stage = build_first_stage(config, torch.device("cpu"))
    records, _ = split_records(image_records(config), config)
    first_stage.set_latent_stats(*training_latent_stats(records, config, first_stage))
    hr = next(_batches(({"hr": p["hr"]} for p in cache_patches(records, config)), patches))["hr"]
    latents = first_stage.encode(hr)
    reference = first_stage.decode(latents)
    result = {"first_stage": config.first_stage, "patches": hr.shape[0], "latent_shape": list(latents.shape[1:]),
              "psnr_db_vs_float32": {}, "max_abs_latent_error": {}}
    for name, dtype in CACHE_DTYPES.items():
        if dtype == torch.float32:
            continue
        stored = latents.to(dtype).float()
        decoded = first_stage.decode(stored)
        result["psnr_db_vs_float32"][name] = float(psnr((decoded + 1) / 2, (reference + 1) / 2).mean())
        result["max_abs_latent_error"][name] = float((stored - latents).abs().max())
    return result


# --------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    from fmboost.pipelines.info import collect
    from fmboost.train.demo import DEMO_CONFIG

    config = load_config(args.config, overrides_from_args(args), base=None if args.config else DEMO_CONFIG)
    result = {"benchmark": "cache", "config": args.config or "embedded demo config", "environment": collect()}
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        build = measure_build(config, [int(n) for n in args.processes.split(",") if n], work)
        result["build"] = {str(n): r for n, r in build.items()}
        if 1 in build and 2 in build:
            result["build_ratio_2_over_1"] = build[2]["samples_per_second"] / build[1]["samples_per_second"]
        if args.read_gb > 0:
            shape = tuple(int(v) for v in args.read_shape.split(","))
            result["read"] = measure_read(config, args.read_gb, shape, args.read_workers, work)
    if args.psnr_patches > 0:
        result["dtype"] = measure_dtype_psnr(config, args.psnr_patches)
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    for n, r in build.items():
        print(f"build with {n} process(es): {r['samples_per_second']:.2f} samples/s ({r['samples']} samples, "
              f"shards per rank {r['shards_per_rank']})", file=sys.stderr)
    if "build_ratio_2_over_1" in result:
        print(f"build throughput 2 / 1 processes: ×{result['build_ratio_2_over_1']:.2f}", file=sys.stderr)
    if "read" in result:
        r = result["read"]
        workers = f", workers {r['peak_rss_workers_mb']:.0f} MB" if r["peak_rss_workers_mb"] else ""
        print(f"read one epoch of a {r['cache_mb'] / 1024:.2f} GB cache: peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(before reading {r['rss_before_mb']:.0f} MB){workers}", file=sys.stderr)
    if "dtype" in result:
        print("decode PSNR vs float32 latents: " + ", ".join(
            f"{k} {v:.1f} dB" for k, v in result["dtype"]["psnr_db_vs_float32"].items()), file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":  # the worker processes of the benchmark
    if sys.argv[1] == "--build-worker":
        build_worker(*sys.argv[2:4])
    elif sys.argv[1] == "--read-worker":
        read_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
