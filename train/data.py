"""Training pairs made on the fly: a high-res image at `resolution` and its ÷`scale` version (`degradation`).

Patch training: both are cropped at aligned positions (a `crop_size`² high-res patch ↔ the matching
(`crop_size`/`scale`)² low-res patch), so small machines train a fully convolutional UNet on patches
of the full-resolution regime. The low-res patch is cut from the down-sampled *whole* image, exactly
as a low-res generator's output would be, rather than down-sampling the patch.

Images come from `train_data_dir` or `dataset_name`: a local image folder, `datasets` arrow folder or files,
parquet files or webdataset tar shards (opened lazily by `image_sources`), a Hugging Face hub id
(`dataset_name` + `image_column`) or the photos shipped in installed wheels (`dataset_name: sample_photos`).
Unreadable, corrupt or too-small images are skipped where they are decoded and counted in one warning;
no training image at all is an error.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from fmboost.models import consistency
from fmboost.models.degradations import Degradation
from PIL import Image

from .config import TrainConfig
from .image_sources import ArrowDataset, ConcatSource, ImageRecord, ImageSource, ListSource, open_local
from .sample_photos import SAMPLE_PHOTOS, sample_photo_path

SAMPLE_PHOTOS_NAME = "sample_photos"


def image_records(config: TrainConfig) -> ImageSource:
    """All images of the configured source, in a fixed order, opened lazily (see `image_sources`)."""
    if config.dataset_name == SAMPLE_PHOTOS_NAME:
        return ListSource([ImageRecord(name, str(sample_photo_path(name))) for name in SAMPLE_PHOTOS])
    if config.train_data_dir is not None:
        folders = [config.train_data_dir] if isinstance(config.train_data_dir, str) else config.train_data_dir
        for folder in folders:
            if not Path(folder).exists():
                raise FileNotFoundError(f"train_data_dir {folder!r} does not exist")
        sources = [open_local(folder, config.image_column) for folder in folders]
        return sources[0] if len(sources) == 1 else ConcatSource(sources)
    if Path(config.dataset_name).exists():
        return open_local(config.dataset_name, config.image_column)
    import datasets  # a hub id: downloaded and converted to arrow by `datasets`, then memory-mapped

    return ArrowDataset(datasets.load_dataset(config.dataset_name, split="train"), config.image_column)


def prepare_image(image: Image.Image, config: TrainConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """PIL image → high-res (3, R, R) in [-1, 1]: short side resized to `resolution`, square crop
    (random with `generator`, else centred). `resolution: 0` keeps the native size, cropped to a
    multiple of `scale`."""
    if config.resolution:
        w, h = image.size
        ratio = config.resolution / min(w, h)
        image = image.resize((max(config.resolution, round(w * ratio)), max(config.resolution, round(h * ratio))),
                             Image.Resampling.BICUBIC, reducing_gap=None)
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    H, W = x.shape[-2:]
    size = (config.resolution, config.resolution) if config.resolution else (H - H % config.scale, W - W % config.scale)
    top, left = _crop_origin((H, W), size, 1, generator)
    return x[:, top:top + size[0], left:left + size[1]]


def _crop_origin(full: tuple[int, int], size: tuple[int, int], step: int,
                 generator: torch.Generator | None) -> tuple[int, int]:
    """Top-left corner (multiples of `step`) of a `size` crop of `full`: random, or centred when no generator."""
    slots = [(f - s) // step for f, s in zip(full, size)]
    if generator is None:
        return tuple(n // 2 * step for n in slots)
    return tuple(int(torch.randint(n + 1, (1,), generator=generator)) * step for n in slots)


def low_res(hr_image: torch.Tensor, config: TrainConfig, seed: int) -> torch.Tensor:
    """(3, H, W) high-res image in [-1, 1] → (3, H/s, W/s): the low-res input the upsampler learns to invert,
    `config.degradation` of the whole image (patches are cut from it, as from a low-res generator's output).

    bicubic is the antialiased reduction D that evaluation pairs use and back-projection inverts
    (`fmboost.models.consistency.downsample`), not rounded to 8-bit levels, so latent caches built before
    degradations existed stay valid. The others are `fmboost.models.degradations.Degradation`, the function
    `eval-sr --degradation` degrades its inputs with; `seed` draws the random one (one seed per image)."""
    height, width = hr_image.shape[-2:]
    if height % config.scale or width % config.scale:
        raise ValueError(f"image size {height}x{width} is not a multiple of scale {config.scale}")
    size = (height // config.scale, width // config.scale)
    if config.degradation == "bicubic":
        return consistency.downsample(hr_image[None], size)[0].clamp(-1, 1)
    return Degradation.parse(config.degradation)(hr_image[None], size, seeds=[seed])[0]


def make_pair(hr_image: torch.Tensor, config: TrainConfig, generator: torch.Generator | None = None,
              lr_image: torch.Tensor | None = None, flip: bool = True, crop_size: int | None = None,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """(3, H, W) high-res image → {"hr": (3, c, c), "lr": (3, c/s, c/s)} aligned patches, random
    (with `generator`, + random flip if `flip`) or centred. `lr_image`: the image already degraded (`low_res`),
    else it is degraded here with `seed`."""
    s, c = config.scale, crop_size or config.crop_size
    lr_full = low_res(hr_image, config, seed) if lr_image is None else lr_image
    top, left = _crop_origin(tuple(hr_image.shape[-2:]), (c, c), s, generator)
    hr = hr_image[:, top:top + c, left:left + c]
    lr = lr_full[:, top // s:(top + c) // s, left // s:(left + c) // s]
    if generator is not None and flip and config.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
        hr, lr = hr.flip(-1), lr.flip(-1)
    return {"hr": hr, "lr": lr}


def open_usable(record: ImageRecord, config: TrainConfig) -> tuple[Image.Image | None, str | None]:
    """(the RGB image, None), or (None, why it cannot be used: "unreadable: ...", "too small: WxH")."""
    try:
        image = record.open()
    except Exception as err:  # PIL raises many types for truncated / corrupt files
        return None, f"unreadable: {type(err).__name__}"
    if min(image.size) < (config.resolution or config.crop_size):
        return None, f"too small: {image.size[0]}x{image.size[1]}"
    return image, None


def warn_skipped(skipped: list[str], total: int, where: str) -> None:
    """One warning for all skipped images: "<where> skipped k of N images: name (why), ..."."""
    if skipped:
        warnings.warn(f"{where} skipped {len(skipped)} of {total} images: " + ", ".join(skipped[:10])
                      + (" ..." if len(skipped) > 10 else ""), stacklevel=3)


def split_records(records: ImageSource, config: TrainConfig) -> tuple[ImageSource, list[ImageRecord]]:
    """Images → (train, validation): the last `num_validation_images` usable images are held out.

    Only the validation images (and bad ones met while looking for them, from the end) are opened here:
    the training images are decoded where they are used — the latent cache build and `PairDataset` skip
    bad ones with a warning — so start-up costs no pass over 10⁵ images."""
    n_val, end, validation, skipped = config.num_validation_images, len(records), [], []
    while len(validation) < n_val and end > 0:
        end -= 1
        record = records[end]
        image, problem = open_usable(record, config)
        if image is None:
            skipped.append(f"{record.name} ({problem})")
        else:
            validation.insert(0, record)
    warn_skipped(skipped, len(records), "choosing the validation images")
    if end == 0:
        raise ValueError(f"no training images: {len(records)} images, {len(validation)} usable ones held out "
                         f"(need more than num_validation_images={n_val}; images must be readable and at least "
                         f"{config.resolution or config.crop_size} px on the short side)")
    train = records[:end]
    return (train if config.max_train_samples is None else train[:config.max_train_samples]), validation


def validation_pairs(records: list[ImageRecord], config: TrainConfig, crop_size: int, crops_per_image: int
                     ) -> dict[str, torch.Tensor]:
    """The fixed validation set: for each image, up to `crops_per_image` aligned patches on an even grid of
    its centred high-res image → {"hr": (N, 3, c, c), "lr": (N, 3, c/s, c/s)}.

    Grid positions that coincide are kept once (a crop as large as the image is one patch, not
    `crops_per_image` copies of it): repeats would weigh that image more and only cost time."""
    hr, lr = [], []
    for number, record in enumerate(records):
        hr_image = prepare_image(record.open(), config)
        lr_image = low_res(hr_image, config, config.seed * 1_000_003 + number)
        H, W = hr_image.shape[-2:]
        if min(H, W) < crop_size:
            raise ValueError(f"validation image {record.name} ({W}x{H}) is smaller than the crop {crop_size}")
        columns = max(1, round((crops_per_image * W / H) ** 0.5))
        rows = -(-crops_per_image // columns)
        corners = dict.fromkeys(
            ((H - crop_size) * (k // columns) // max(rows - 1, 1) // config.scale * config.scale,
             (W - crop_size) * (k % columns) // max(columns - 1, 1) // config.scale * config.scale)
            for k in range(crops_per_image))
        for top, left in corners:
            hr.append(hr_image[:, top:top + crop_size, left:left + crop_size])
            s = config.scale
            lr.append(lr_image[:, top // s:(top + crop_size) // s, left // s:(left + crop_size) // s])
    return {"hr": torch.stack(hr), "lr": torch.stack(lr)}


def records_fingerprint(records: ImageSource) -> str:
    """Hash of the images' names and bytes, for cache keys.

    Contents, not modification times: a copy of the same photos (a re-provisioned or rsynced data
    folder, a fresh container) must hit the cache that an earlier run built, and an edited photo must
    miss it. Reading the files costs about a second per GB, far less than encoding them."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.name.encode())
        if isinstance(record.data, bytes):
            digest.update(hashlib.sha256(record.data).digest())
        else:
            file_digest = hashlib.sha256()
            with open(record.data, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    file_digest.update(chunk)
            digest.update(file_digest.digest())
    return digest.hexdigest()[:16]


class PairDataset(torch.utils.data.Dataset):
    """Item i → {"hr", "lr"} patches of image i mod N (`crops_per_image` items per image and epoch).
    Random crops/flips come from a generator seeded by (seed, epoch, i), so the data of any step is
    reproducible (exact resume) whatever the number of workers. An unusable image is replaced by the next
    usable one (deterministically) and reported once per process."""

    def __init__(self, records: ImageSource, config: TrainConfig):
        self.records, self.config, self.epoch, self.bad = records, config, 0, {}

    def __len__(self) -> int:
        return len(self.records) * self.config.crops_per_image

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        seed = hash((self.config.seed, self.epoch, index)) % 2 ** 62
        generator = torch.Generator().manual_seed(seed)
        image = self._image(index % len(self.records))
        hr_image = prepare_image(image, self.config, None if self.config.center_crop else generator)
        return make_pair(hr_image, self.config, generator, seed=seed)

    def _image(self, index: int):
        for offset in range(len(self.records)):
            position = (index + offset) % len(self.records)
            if position in self.bad:
                continue
            record = self.records[position]
            image, problem = open_usable(record, self.config)
            if image is not None:
                return image
            self.bad[position] = f"{record.name} ({problem})"
            warn_skipped([self.bad[position]], len(self.records), "the training data")
        raise ValueError(f"none of the {len(self.records)} training images is usable: {list(self.bad.values())[:10]}")


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of the data set seeded by (seed, epoch): the order is a pure function of the epoch.

    `set_epoch` (which Accelerate's data loaders call with their own epoch counter) also sets the
    dataset's epoch, so the order and the random crops always agree on the epoch."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.size, self.seed, self.epoch = dataset, len(dataset), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())
