"""On-disk cache of first-stage latents: encode the training patches once, train from the cache.

Without it, every step encodes high-res and low-res patches (TAEF2: ≈ 0.5 s per 256² patch on one
core), so CPU training is encoder-bound. The cache holds `crops_per_image` aligned patches per image:
the normalised high-res latent x1 (C, H, W) and the clean conditioning `cond` (C, H, W) of the
configured up-sampling mode (PSU: the low-res patch resized bicubically in pixel space and
encoded). Random flips are applied to the cached latents at load time — exact in pixel space, an
approximation for convolutional encoders, which are close to flip-equivariant.

The folder name is a hash of everything the latents depend on (the images' bytes, the first stage, the
resolution / crop / scale / up-sampling settings, the seed of the crop positions), so a changed
setting is a cache miss and an unchanged one a hit. A manifest written last marks a complete entry.

Posterior-mean flows also need R(cond) for every sample: `posterior_mean_file` computes it once per
regression model (keyed by a hash of R's weights and statistics) into the same entry, so training
reads it like the other latents instead of running R every step.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fmboost.models import CouplingFlowMatcher, FirstStage, compute_latent_stats
from fmboost.models.posterior_mean import PosteriorMean
from tqdm.auto import tqdm

from .config import TrainConfig
from .data import ImageRecord, downsample, make_pair, prepare_image, records_fingerprint

MANIFEST = "manifest.json"
CACHE_VERSION = 1


@dataclass
class LatentCache:
    """A complete cache entry: its folder, whether it was found (hit), its size and the latent stats."""

    path: Path
    hit: bool
    num_samples: int
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    encode_samples_per_second: float | None = None  # measured while building (a miss)


def cache_key(config: TrainConfig, records: list[ImageRecord], first_stage: FirstStage) -> str:
    settings = {name: getattr(config, name) for name in (
        "resolution", "crop_size", "scale", "center_crop", "crops_per_image", "latent_stats_images", "upsample",
        "seed")}
    spec = {k: v for k, v in first_stage.spec.items()}
    key = json.dumps({"version": CACHE_VERSION, "data": records_fingerprint(records), "first_stage": spec,
                      **settings}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def cache_patches(records: list[ImageRecord], config: TrainConfig):
    """Yield {"hr", "lr"} patches, `crops_per_image` per image, positions seeded by (seed, image index).

    Each image is decoded, resized and down-sampled once for all its patches."""
    for i, record in enumerate(records):
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + i)
        hr_image = prepare_image(record.open(), config, None if config.center_crop else generator)
        lr_image = downsample(hr_image[None], config.scale)[0]
        for _ in range(config.crops_per_image):
            yield make_pair(hr_image, config, generator, lr_image, flip=False)


def _batches(patches, batch_size: int):
    batch = []
    for patch in patches:
        batch.append(patch)
        if len(batch) == batch_size:
            yield {k: torch.stack([p[k] for p in batch]) for k in batch[0]}
            batch = []
    if batch:
        yield {k: torch.stack([p[k] for p in batch]) for k in batch[0]}


@torch.no_grad()
def encode_batch(batch: dict[str, torch.Tensor], first_stage: FirstStage, flow: CouplingFlowMatcher
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """{"hr": (B, 3, c, c), "lr": (B, 3, c/s, c/s)} images → (x1, cond), each (B, C, c/f, c/f)."""
    x1 = first_stage.encode(batch["hr"])
    return x1, flow.condition(None, x1.shape[-2:], first_stage, lr_image=batch["lr"])


def training_latent_stats(records: list[ImageRecord], config: TrainConfig, first_stage: FirstStage
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std (C,) of the high-res latents of the first `latent_stats_images` patches."""
    def hr_batches():
        patches = (p["hr"] for _, p in zip(range(config.latent_stats_images), cache_patches(records, config)))
        total = min(config.latent_stats_images, len(records) * config.crops_per_image)
        with tqdm(total=total, desc="latent statistics", unit="patch") as progress:
            for batch in _batches(({"hr": p} for p in patches), config.train_batch_size):
                progress.update(batch["hr"].shape[0])
                yield batch["hr"].to(first_stage.latent_mean.device)
    return compute_latent_stats(first_stage, hr_batches())


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def build_or_load(records: list[ImageRecord], config: TrainConfig, first_stage: FirstStage,
                  flow: CouplingFlowMatcher, cache_dir: str | Path) -> LatentCache:
    """Return the cache entry for these settings, encoding it first when absent (sets the first stage's
    latent stats either way). Single writer: call on the main process, then wait for the others."""
    path = Path(cache_dir) / cache_key(config, records, first_stage)
    manifest = path / MANIFEST
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        mean, std = torch.tensor(meta["latent_mean"]), torch.tensor(meta["latent_std"])
        first_stage.set_latent_stats(mean, std)
        return LatentCache(path, True, meta["num_samples"], mean, std)
    path.mkdir(parents=True, exist_ok=True)
    mean, std = training_latent_stats(records, config, first_stage)
    first_stage.set_latent_stats(mean, std)
    device, start, count, chunks = first_stage.latent_mean.device, time.perf_counter(), 0, []
    progress = tqdm(total=len(records) * config.crops_per_image, desc="latent cache", unit="patch")
    for index, batch in enumerate(_batches(cache_patches(records, config), config.train_batch_size)):
        x1, cond = encode_batch({k: v.to(device) for k, v in batch.items()}, first_stage, flow)
        progress.update(x1.shape[0])
        name = f"chunk_{index:06d}.pt"
        chunk = {"hr_latent": x1.cpu(), "cond": cond.cpu()}
        _write_atomic(path / name, lambda p, chunk=chunk: torch.save(chunk, p))
        chunks.append(name)
        count += x1.shape[0]
    progress.close()
    rate = count / (time.perf_counter() - start)
    meta = {"num_samples": count, "chunks": chunks, "latent_mean": mean.tolist(), "latent_std": std.tolist(),
            "encode_samples_per_second": rate, "settings": config.to_dict()}
    _write_atomic(manifest, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return LatentCache(path, False, count, mean, std, rate)


def _weights_fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


@torch.no_grad()
def posterior_mean_file(cache: LatentCache, posterior_mean: PosteriorMean, first_stage: FirstStage,
                        batch_size: int = 32) -> Path:
    """R(cond) (N, C, H, W) for every cached sample, in the cache's latent normalisation; computed once per R
    and stored beside the chunks (single writer, like `build_or_load`)."""
    path = cache.path / f"posterior_mean_{_weights_fingerprint(posterior_mean)}.pt"
    if path.is_file():
        return path
    meta = json.loads((cache.path / MANIFEST).read_text())
    device = first_stage.latent_mean.device
    estimates = []
    with tqdm(total=meta["num_samples"], desc="posterior mean R(cond)", unit="sample") as progress:
        for name in meta["chunks"]:
            cond = torch.load(cache.path / name, mmap=True, weights_only=True)["cond"]
            for start in range(0, cond.shape[0], batch_size):
                batch = cond[start:start + batch_size].to(device)
                estimates.append(posterior_mean(batch, first_stage.latent_mean, first_stage.latent_std).cpu())
                progress.update(batch.shape[0])
    _write_atomic(path, lambda p: torch.save(torch.cat(estimates), p))
    return path


class CachedLatentDataset(torch.utils.data.Dataset):
    """Item i → {"hr_latent", "cond"} (C, H, W) from a cache entry (and "posterior_mean" when that file is
    given), randomly flipped when configured (a generator seeded by (seed, epoch, i): reproducible, so resuming
    is exact). Flipping R(cond) stands in for R(flipped cond), the same approximation as for the latents."""

    def __init__(self, cache: LatentCache, config: TrainConfig, posterior_mean: Path | None = None):
        meta = json.loads((cache.path / MANIFEST).read_text())
        chunks = [torch.load(cache.path / name, mmap=True, weights_only=True) for name in meta["chunks"]]
        self.hr_latent = torch.cat([c["hr_latent"] for c in chunks])
        self.cond = torch.cat([c["cond"] for c in chunks])
        self.posterior_mean = None if posterior_mean is None else torch.load(posterior_mean, weights_only=True)
        if self.posterior_mean is not None and self.posterior_mean.shape != self.cond.shape:
            raise ValueError(f"{posterior_mean} holds {tuple(self.posterior_mean.shape)}, the cache "
                             f"{tuple(self.cond.shape)}: rebuild it (delete the file)")
        self.config, self.epoch = config, 0

    def __len__(self) -> int:
        return self.hr_latent.shape[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"hr_latent": self.hr_latent[index], "cond": self.cond[index]}
        if self.posterior_mean is not None:
            item["posterior_mean"] = self.posterior_mean[index]
        if self.config.random_flip:
            generator = torch.Generator().manual_seed(hash((self.config.seed, self.epoch, index)) % 2 ** 62)
            if bool(torch.rand(1, generator=generator) < 0.5):
                item = {k: v.flip(-1) for k, v in item.items()}
        return item
