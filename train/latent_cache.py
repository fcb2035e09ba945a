"""On-disk cache of first-stage latents: encode the training patches once, train from the cache.

Without it, every step encodes high-res and low-res patches (TAEF2: ≈ 0.5 s per 256² patch on one
core), so CPU training is encoder-bound. The cache holds `crops_per_image` aligned patches per image:
the normalised high-res latent x1 (C, H, W) and the clean conditioning `cond` (C, H, W) of the
configured up-sampling mode (PSU: the low-res patch resized bicubically in pixel space and
encoded). Random flips are applied to the cached latents at load time — exact in pixel space, an
approximation for convolutional encoders, which are close to flip-equivariant.

The folder name is a hash of everything the latents depend on (the images' bytes, the first stage, the
resolution / crop / scale / up-sampling settings, the degradation, the seed of the crop positions, the storage
dtype), so a changed setting is a cache miss and an unchanged one a hit, and an entry is found by what it holds:
without `latent_cache_dir` a run also reuses a complete entry of the same key in the runs beside its output_dir
(`cache_location`), so the second command of a two-command recipe (R, then the flow on it) encodes nothing. Inside
it:

    latent_stats.json          per-channel latent mean/std, computed first (by the main process): every
                               shard is normalised with them, also when a killed build resumes
    shard_000123.safetensors   the patches of images [123·S, 124·S) (S = latent_cache_shard_images):
                               "hr_latent" and "cond" (n, C, H, W) in `latent_cache_dtype`
    manifest.json              written last: the shards, their sizes, shapes, dtype → the entry is complete

Built in parallel: with P processes (`accelerate launch`, `torchrun`), process r encodes shards r, r + P,
... Each shard is written to a temporary file and renamed (atomic), so a build killed at any point
resumes with the shards that are missing. Shards are read by offset (`ShardReader`), one sample at a
time, so a cache of any size trains in the memory of a batch.

Posterior-mean flows also need their estimate for every sample: `posterior_mean_file` computes R(cond) once per
regression model (keyed by a hash of R's weights and statistics) into `posterior_mean_<hash>/`, and
`restorer_estimate_file` the latent of a pretrained restorer's image of each low-res patch once per restorer
(keyed by its weights file's sha256, inside the entry of one degradation) into `restorer_<sha256>/`; one shard per
cache shard, built the same way, so training reads them like the other latents instead of running R or the
restorer every step.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from fmboost.models import CouplingFlowMatcher, FirstStage, compute_latent_stats
from fmboost.models.posterior_mean import PosteriorMean
from fmboost.models.restorer import Restorer
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import CACHE_DTYPES, TrainConfig
from .data import low_res, make_pair, open_usable, prepare_image, records_fingerprint, warn_skipped
from .image_sources import ImageSource

MANIFEST = "manifest.json"
STATS = "latent_stats.json"
COMPLETE = "complete"  # marks a finished posterior-mean folder
CACHE_VERSION = 2  # 1: one process, torch.save chunks concatenated in RAM at load time


@dataclass
class LatentCache:
    """A complete cache entry: its folder, whether it was found (hit), its size and the latent stats."""

    path: Path
    hit: bool
    num_samples: int
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    encode_samples_per_second: float | None = None  # all processes together, measured while building (a miss)


def cache_key(config: TrainConfig, records: ImageSource, first_stage: FirstStage) -> str:
    settings = {name: getattr(config, name) for name in (
        "resolution", "crop_size", "scale", "center_crop", "crops_per_image", "latent_stats_images", "upsample",
        "seed", "latent_cache_dtype", "latent_cache_shard_images")}
    if config.degradation != "bicubic":  # absent for bicubic: the entries built before degradations existed
        settings["degradation"] = config.degradation
    spec = {k: v for k, v in first_stage.spec.items()}
    key = json.dumps({"version": CACHE_VERSION, "data": records_fingerprint(records), "first_stage": spec,
                      **settings}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def cache_location(config: TrainConfig) -> tuple[Path, list[Path]]:
    """(where this run builds its latent cache, the other folders searched first for a complete entry of the same
    key): `latent_cache_dir` alone when set; else <output_dir>/latent_cache, and the default caches of the runs
    beside it, <output_dir>/../*/latent_cache."""
    if config.latent_cache_dir:
        return Path(config.latent_cache_dir), []
    own = Path(config.output_dir) / "latent_cache"
    others = sorted(p for p in Path(config.output_dir).resolve().parent.glob("*/latent_cache")
                    if p.resolve() != own.resolve())
    return own, others


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.safetensors"


def cache_patches(records: ImageSource, config: TrainConfig, indices: range | None = None,
                  skipped: list[str] | None = None):
    """Yield {"hr", "lr"} patches, `crops_per_image` per image, positions seeded by (seed, image index), so a
    patch does not depend on which process or shard encodes it. Unusable images yield none (listed in
    `skipped`). Each image is decoded, resized and down-sampled once for all its patches."""
    for i in range(len(records)) if indices is None else indices:
        record = records[i]
        image, problem = open_usable(record, config)
        if image is None:
            if skipped is not None:
                skipped.append(f"{record.name} ({problem})")
            continue
        seed = config.seed * 1_000_003 + i  # the image's crop positions and its degradation
        generator = torch.Generator().manual_seed(seed)
        hr_image = prepare_image(image, config, None if config.center_crop else generator)
        lr_image = low_res(hr_image, config, seed)
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


def training_latent_stats(records: ImageSource, config: TrainConfig, first_stage: FirstStage
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


def _remove_temporaries(folder: Path) -> None:
    """Half-written files of a killed build (`_write_atomic` names them .<name>.tmp<pid>)."""
    for tmp in folder.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


def _note_old_entries(cache_dir: Path) -> None:
    old = [p.parent.name for p in cache_dir.glob(f"*/{MANIFEST}")
           if json.loads(p.read_text()).get("version", 1) < CACHE_VERSION]
    if old:
        warnings.warn(f"{len(old)} latent cache entries in {cache_dir} have an older format (version 1: chunk_*.pt) "
                      f"and are not used (this run builds its own); delete them to free the disk: {old[:5]}",
                      stacklevel=3)


def _encode_shard(records: ImageSource, indices: range, config: TrainConfig, first_stage: FirstStage,
                  flow: CouplingFlowMatcher, path: Path, rank: int, progress) -> None:
    """Encode the patches of images `indices` and write them as one shard (atomically)."""
    device, dtype, start = first_stage.latent_mean.device, CACHE_DTYPES[config.latent_cache_dtype], time.perf_counter()
    side = config.crop_size // first_stage.downsample_factor
    x1s, conds, skipped = [], [], []
    for batch in _batches(cache_patches(records, config, indices, skipped), config.train_batch_size):
        x1, cond = encode_batch({k: v.to(device) for k, v in batch.items()}, first_stage, flow)
        x1s.append(x1.to("cpu", dtype))
        conds.append(cond.to("cpu", dtype))
        progress.update(x1.shape[0])
    empty = torch.empty(0, first_stage.latent_channels, side, side, dtype=dtype)
    tensors = {"hr_latent": torch.cat(x1s) if x1s else empty, "cond": torch.cat(conds) if conds else empty}
    metadata = {"images": f"{indices.start}:{indices.stop}", "rank": str(rank), "skipped": json.dumps(skipped),
                "seconds": f"{time.perf_counter() - start:.3f}"}
    _write_atomic(path, lambda p: save_file(tensors, p, metadata=metadata))


def _shard_ranges(num_images: int, shard_images: int) -> list[range]:
    return [range(start, min(start + shard_images, num_images)) for start in range(0, num_images, shard_images)]


def build_or_load(records: ImageSource, config: TrainConfig, first_stage: FirstStage, flow: CouplingFlowMatcher,
                  cache_dir: str | Path, state: PartialState | None = None, elsewhere: Iterable[Path] = ()
                  ) -> LatentCache:
    """Return the cache entry for these settings, encoding what is missing first (sets the first stage's latent
    stats either way): the one in `cache_dir`, else a complete one of the same key in one of the `elsewhere`
    folders, else built in `cache_dir`. Call it on every process (`state`: the Accelerator or PartialState; default
    the current one): each encodes its share of the shards; it returns on all of them once the entry is complete."""
    state = state or PartialState()
    key = cache_key(config, records, first_stage)
    path = Path(cache_dir) / key
    if not (path / MANIFEST).exists():
        path = next((folder / key for folder in elsewhere if (folder / key / MANIFEST).is_file()), path)
    hit = (path / MANIFEST).is_file()
    if not hit:
        _build(records, config, first_stage, flow, path, state)
    meta = json.loads((path / MANIFEST).read_text())
    built_with = meta["settings"].get("degradation", "bicubic")
    if built_with != config.degradation:
        raise ValueError(f"the latent cache {path} holds inputs degraded with {built_with!r}, not the configured "
                         f"degradation {config.degradation!r}: it is never reused for another degradation")
    mean, std = torch.tensor(meta["latent_mean"]), torch.tensor(meta["latent_std"])
    first_stage.set_latent_stats(mean, std)
    return LatentCache(path, hit, meta["num_samples"], mean, std,
                       None if hit else meta["encode_samples_per_second"])


def _build(records: ImageSource, config: TrainConfig, first_stage: FirstStage, flow: CouplingFlowMatcher,
           path: Path, state: PartialState) -> None:
    if state.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        _note_old_entries(path.parent)
        _remove_temporaries(path)
        if not (path / STATS).is_file():  # a resumed build keeps the stats its shards were normalised with
            mean, std = training_latent_stats(records, config, first_stage)
            _write_atomic(path / STATS, lambda p: p.write_text(json.dumps(
                {"latent_mean": mean.tolist(), "latent_std": std.tolist()})))
    state.wait_for_everyone()
    stats = json.loads((path / STATS).read_text())
    first_stage.set_latent_stats(torch.tensor(stats["latent_mean"]), torch.tensor(stats["latent_std"]))
    shards = _shard_ranges(len(records), config.latent_cache_shard_images)
    mine = [s for s in range(state.process_index, len(shards), state.num_processes)
            if not (path / shard_name(s)).is_file()]
    start = time.perf_counter()
    with tqdm(total=sum(len(shards[s]) for s in mine) * config.crops_per_image, unit="patch",
              desc=f"latent cache ({state.num_processes} processes)", disable=not state.is_main_process) as progress:
        for s in mine:
            _encode_shard(records, shards[s], config, first_stage, flow, path / shard_name(s), state.process_index,
                          progress)
    state.wait_for_everyone()
    if state.is_main_process:
        _write_manifest(path, shards, config, first_stage, stats, time.perf_counter() - start)
    state.wait_for_everyone()


def _write_manifest(path: Path, shards: list[range], config: TrainConfig, first_stage: FirstStage, stats: dict,
                    seconds: float) -> None:
    entries, skipped = [], []
    for s in range(len(shards)):
        reader = ShardReader(path / shard_name(s))
        entries.append({"file": shard_name(s), "num_samples": reader.num_samples})
        skipped += json.loads(reader.metadata["skipped"])
    num_images = shards[-1].stop if shards else 0
    warn_skipped(skipped, num_images, "the latent cache")
    count = sum(e["num_samples"] for e in entries)
    if count == 0:
        raise ValueError(f"the latent cache holds no samples: all {num_images} training images were skipped")
    side = config.crop_size // first_stage.downsample_factor
    meta = {"version": CACHE_VERSION, "num_samples": count, "shards": entries, "dtype": config.latent_cache_dtype,
            "shape": [first_stage.latent_channels, side, side], "skipped_images": len(skipped), **stats,
            "encode_samples_per_second": count / seconds, "settings": config.to_dict()}
    _write_atomic(path / MANIFEST, lambda p: p.write_text(json.dumps(meta, indent=2)))


def weights_digest(tensors: Iterable[torch.Tensor], names: Sequence[str] | None = None) -> str:
    """sha256 over the raw bytes of `tensors`, in order, each preceded by its name when `names` are given:
    equal digests ⇔ bit-identical weights. Keys the R(cond) cache (a state dict: names and buffers too) and
    checks that data-parallel replicas agree (their parameters)."""
    digest = hashlib.sha256()
    for index, tensor in enumerate(tensors):
        if names is not None:
            digest.update(names[index].encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def posterior_mean_file(cache: LatentCache, posterior_mean: PosteriorMean, first_stage: FirstStage,
                        batch_size: int = 32, state: PartialState | None = None) -> Path:
    """The folder of R(cond) (n, C, H, W) per cache shard, in the cache's latent normalisation and dtype; computed
    once per R, every process its share of the shards (call it on all of them, like `build_or_load`)."""
    names, tensors = zip(*sorted(posterior_mean.state_dict().items()))
    device = first_stage.latent_mean.device

    def estimate_shard(index: int, entry: dict, dtype: torch.dtype, progress) -> torch.Tensor:
        reader, estimates = ShardReader(cache.path / entry["file"]), []
        for start in range(0, reader.num_samples, batch_size):
            cond = reader.rows("cond", start, min(start + batch_size, reader.num_samples)).to(device, torch.float32)
            estimates.append(posterior_mean(cond, first_stage.latent_mean, first_stage.latent_std).to("cpu", dtype))
            progress.update(cond.shape[0])
        return torch.cat(estimates) if estimates else torch.empty(0, *reader.tensors["cond"]["shape"][1:], dtype=dtype)

    folder = cache.path / f"posterior_mean_{weights_digest(tensors, names)[:20]}"
    return _estimates_folder(cache, folder, "posterior mean R(cond)", estimate_shard, state or PartialState())


@torch.no_grad()
def restorer_estimate_file(cache: LatentCache, restorer: Restorer, records: ImageSource, config: TrainConfig,
                           first_stage: FirstStage, state: PartialState | None = None) -> Path:
    """The folder of the restorer's estimates (n, C, H, W) per cache shard: each cached sample's low-res patch
    (`cache_patches` makes it again from `records`, the images the cache was built from, in the same order) through
    the restorer, encoded, in the cache's normalisation and dtype. Computed once per restorer (its sha256 names the
    folder and is recorded in it: an entry built with another restorer is refused), every process its share."""
    state, device = state or PartialState(), first_stage.latent_mean.device
    shards = _shard_ranges(len(records), config.latent_cache_shard_images)
    folder = cache.path / f"restorer_{restorer.sha256[:20]}"
    record = folder / "restorer.json"
    if record.is_file() and json.loads(record.read_text())["sha256"] != restorer.sha256:
        raise ValueError(f"{folder} holds the estimates of another restorer ({json.loads(record.read_text())}), not "
                         f"of {restorer.name} (sha256 {restorer.sha256[:16]}…): delete it to rebuild")

    def estimate_shard(index: int, entry: dict, dtype: torch.dtype, progress) -> torch.Tensor:
        estimates = []
        for batch in _batches(cache_patches(records, config, shards[index]), config.train_batch_size):
            restored = restorer(batch["lr"].to(device))
            estimates.append(first_stage.encode(restored).to("cpu", dtype))
            progress.update(restored.shape[0])
        side = config.crop_size // first_stage.downsample_factor
        tensor = torch.cat(estimates) if estimates else torch.empty(0, first_stage.latent_channels, side, side,
                                                                    dtype=dtype)
        if tensor.shape[0] != entry["num_samples"]:
            raise ValueError(f"the images gave {tensor.shape[0]} patches for {entry['file']}, which holds "
                             f"{entry['num_samples']}: these are not the images the latent cache was built from")
        return tensor

    if state.is_main_process:
        folder.mkdir(exist_ok=True)
        _write_atomic(record, lambda p: p.write_text(json.dumps(restorer.record())))
    return _estimates_folder(cache, folder, f"restorer estimates ({restorer.name})", estimate_shard, state)


def _estimates_folder(cache: LatentCache, folder: Path, desc: str, estimate_shard, state: PartialState) -> Path:
    """Build `folder`: one safetensors file ("posterior_mean") per cache shard, `estimate_shard(index, entry, dtype,
    progress)` → (n, C, H, W); each written atomically, so a killed build resumes with the missing shards;
    process r builds shards r, r + P, ...; a COMPLETE marker says the folder is whole."""
    if (folder / COMPLETE).is_file():
        return folder
    if state.is_main_process:
        folder.mkdir(exist_ok=True)
        _remove_temporaries(folder)
    state.wait_for_everyone()
    meta = json.loads((cache.path / MANIFEST).read_text())
    dtype = CACHE_DTYPES[meta["dtype"]]
    mine = [(index, entry) for index, entry in enumerate(meta["shards"])
            if index % state.num_processes == state.process_index and not (folder / entry["file"]).is_file()]
    with tqdm(total=sum(entry["num_samples"] for _, entry in mine), desc=desc, unit="sample",
              disable=not state.is_main_process) as progress:
        for index, entry in mine:
            tensor = estimate_shard(index, entry, dtype, progress)
            _write_atomic(folder / entry["file"], lambda p, t=tensor: save_file({"posterior_mean": t}, p))
    state.wait_for_everyone()
    if state.is_main_process:
        _write_atomic(folder / COMPLETE, lambda p: p.write_text(""))
    state.wait_for_everyone()
    return folder


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


class ShardReader:
    """Rows of the tensors of one safetensors file, read by offset (`os.pread`) when asked.

    Not a memory map on purpose: mapped pages that a process has touched count in its resident memory
    (RSS) until the kernel reclaims them, so random reads over a large cache would show (and be budgeted)
    as a cache-sized RSS in every data loader worker. `pread` goes through the page cache, shared by all
    processes and dropped under memory pressure. The file is opened lazily, once per process."""

    def __init__(self, path: Path):
        self.path, self._fd = path, None
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        self.metadata = header.pop("__metadata__", {})
        self.tensors, self.data_start = header, 8 + length
        self.num_samples = next(iter(header.values()))["shape"][0] if header else 0

    def __getstate__(self):  # data loader workers open their own descriptor
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` → (stop - start, *shape[1:]) in its stored dtype."""
        info = self.tensors[name]
        dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
        row = int(np.prod(shape[1:])) * dtype.itemsize
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        offset = self.data_start + info["data_offsets"][0] + start * row
        data = os.pread(self._fd, (stop - start) * row, offset)
        return torch.frombuffer(bytearray(data), dtype=dtype).view(stop - start, *shape[1:])


class CachedLatentDataset(torch.utils.data.Dataset):
    """Item i → {"hr_latent", "cond"} (C, H, W) float32 from a cache entry (and "posterior_mean" when its folder is
    given), randomly flipped when configured (a generator seeded by (seed, epoch, i): reproducible, so resuming
    is exact). Flipping R(cond) stands in for R(flipped cond), the same approximation as for the latents.

    Holds only the shard headers: each item is read from its shard when asked (see `ShardReader`)."""

    def __init__(self, cache: LatentCache, config: TrainConfig, posterior_mean: Path | None = None):
        meta = json.loads((cache.path / MANIFEST).read_text())
        if meta.get("version", 1) != CACHE_VERSION:
            raise ValueError(f"{cache.path} is a latent cache of format version {meta.get('version', 1)}; this "
                             f"version reads {CACHE_VERSION}: delete the folder and rebuild the cache")
        self.shards = [ShardReader(cache.path / e["file"]) for e in meta["shards"]]
        self.estimates = None if posterior_mean is None else \
            [ShardReader(Path(posterior_mean) / e["file"]) for e in meta["shards"]]
        for shard, estimate in zip(self.shards, self.estimates or []):
            if estimate.num_samples != shard.num_samples:
                raise ValueError(f"{estimate.path} holds {estimate.num_samples} samples, {shard.path} "
                                 f"{shard.num_samples}: rebuild it (delete {posterior_mean})")
        self.ends = np.cumsum([shard.num_samples for shard in self.shards])
        self.config, self.epoch = config, 0

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} cached samples")
        s = int(np.searchsorted(self.ends, index, side="right"))
        row = index - (int(self.ends[s - 1]) if s else 0)
        item = {name: self.shards[s].rows(name, row, row + 1)[0].float() for name in ("hr_latent", "cond")}
        if self.estimates is not None:
            item["estimate"] = self.estimates[s].rows("posterior_mean", row, row + 1)[0].float()  # its name on disk
        if self.config.random_flip:
            generator = torch.Generator().manual_seed(hash((self.config.seed, self.epoch, index)) % 2 ** 62)
            if bool(torch.rand(1, generator=generator) < 0.5):
                item = {k: v.flip(-1) for k, v in item.items()}
        return item
