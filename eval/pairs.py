"""Evaluation pairs from image folders: a square high-res crop and its antialiased down-sampling.

    image ──(resize: shorter side → hr_size)──► crop hr_size² (center, or random with a per-image seed)
          ──► hr (3, hr, hr) ──(degradation: bicubic, antialias; + JPEG; second-order)──► lr (3, lr, lr)
                                                                       both in [-1, 1], on 8-bit levels

Both are rounded to 8-bit levels, as image files hold them: a low-res PNG saved from a pair is exactly the
input every method saw, so `fmboost upscale` on it reproduces what eval-sr scored.

`resize=True` (default) evaluates whole images at a common resolution, the paper's FacesHQ regime
(1024 → 256); `resize=False` cuts native-resolution crops instead (LHQ-style), which needs images at
least hr_size on their shorter side.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fmboost.models.consistency import downsample
from fmboost.models.degradations import BICUBIC, Degradation, to_8bit
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CROPS = ("center", "random")


@dataclass
class Pair:
    """name: source file stem; hr: (3, hr_size, hr_size); lr: (3, lr_size, lr_size); both in [-1, 1]."""

    name: str
    hr: torch.Tensor
    lr: torch.Tensor


def list_images(folders: Sequence[str | Path]) -> list[Path]:
    """Image files of each folder (not recursive), sorted by name within a folder, folders in the given order."""
    paths = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        paths.extend(found)
    return paths


def load_image(path: str | Path) -> torch.Tensor:
    """(3, H, W) float in [-1, 1] from an image file (RGB; alpha and palettes dropped)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of (3, H, W) to (3, *size), antialiased when shrinking, clamped to [-1, 1]. Shrinking is
    the degradation D that back-projection (`fmboost.models.consistency`) inverts, so both use one function."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return downsample(image[None], tuple(size))[0].clamp(-1, 1)


def square_crop(image: torch.Tensor, size: int, crop: str = "center",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A size × size window of (3, H, W): centered, or at a uniformly random corner drawn from `generator`."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {list(CROPS)}, got {crop!r}")
    height, width = image.shape[-2:]
    if min(height, width) < size:
        raise ValueError(f"image of {height}x{width} is smaller than the crop {size}x{size} "
                         "(use resize=True to scale images to the high-res size first)")
    if crop == "center":
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return image[:, top:top + size, left:left + size]


def make_pair(image: torch.Tensor, hr_size: int, lr_size: int, crop: str = "center", resize_image: bool = True,
              generator: torch.Generator | None = None, name: str = "",
              degradation: Degradation = BICUBIC, degradation_seed: int = 0) -> Pair:
    """hr = crop of (3, H, W) `image` (after scaling its shorter side to hr_size if `resize_image`), lr = hr
    degraded (default: the antialiased bicubic reduction; a random degradation draws from `degradation_seed`)."""
    if hr_size % lr_size:
        raise ValueError(f"hr_size {hr_size} must be a multiple of lr_size {lr_size}")
    if resize_image:
        height, width = image.shape[-2:]
        factor = hr_size / min(height, width)
        image = resize(image, (max(hr_size, round(height * factor)), max(hr_size, round(width * factor))))
    hr = to_8bit(square_crop(image, hr_size, crop, generator))
    return Pair(name, hr, degradation(hr[None], (lr_size, lr_size), seeds=[degradation_seed])[0])


def iter_pairs(folders: Sequence[str | Path], hr_size: int = 1024, lr_size: int = 256, crop: str = "center",
               resize_image: bool = True, seed: int = 0, max_images: int | None = None,
               degradation: Degradation = BICUBIC) -> Iterator[Pair]:
    """Pairs for the first `max_images` images of `folders`; image i's random crop and random degradation use
    seed + i (reproducible: every method of an evaluation sees the same degraded input)."""
    paths = list_images(folders)[:max_images]
    for index, path in enumerate(paths):
        generator = torch.Generator().manual_seed(seed + index)
        yield make_pair(load_image(path), hr_size, lr_size, crop, resize_image, generator, path.stem, degradation,
                        seed + index)


def count_images(folders: Sequence[str | Path], max_images: int | None = None) -> int:
    return len(list_images(folders)[:max_images])
