"""How a low-res input is made from a high-res image: the degradation that evaluation (and training) simulate.

    bicubic     antialiased bicubic reduction (`consistency.downsample`, the degradation back-projection
                inverts), rounded to 8-bit levels: a clean low-res photo.
    jpeg:Q      the same reduction, then saved and read back as a JPEG at quality Q (1–95) by libjpeg through
                Pillow (4:2:0 chroma subsampling, its default): 8 × 8-pixel blocks, ringing and colour bleeding,
                as in photos that went through a camera, a phone or the web.
    second-order
                Real-ESRGAN's (Wang et al. 2021) "blur → resize → noise → JPEG, twice" with its x4plus training
                ranges, drawn per image from a seed (`SECOND_ORDER` lists them; values are for images in [0, 1]):
                  stage 1: Gaussian blur σx, σy ~ U(0.2, 3) px (isotropic with probability 0.45), at the high-res
                           size; resize by a factor drawn up (p 0.2, U(1, 1.5)) / down (p 0.7, U(0.15, 1)) / kept
                           (p 0.1), with area, bilinear or bicubic interpolation; Gaussian noise σ ~ U(1, 30)/255
                           (p 0.5) or Poisson noise scaled by U(0.05, 3), grey (one field for all channels) with
                           probability 0.4; JPEG at Q ~ U(30, 95).
                  stage 2: blur with probability 0.8, σ ~ U(0.2, 1.5); resize to the low-res size × a factor up
                           (p 0.3, U(1, 1.2)) / down (p 0.4, U(0.3, 1)) / kept (p 0.3); noise σ ~ U(1, 25)/255 or
                           Poisson scaled by U(0.05, 2.5); resize to the low-res size; JPEG at Q ~ U(30, 95).
                Left out of Real-ESRGAN's recipe: rotated, generalised-Gaussian, plateau and sinc kernels (the blur
                here is an axis-aligned Gaussian, kornia's `gaussian_blur2d`) and the random order of the last
                resize and JPEG. The JPEG is the real codec (libjpeg), not a differentiable stand-in.

bicubic and jpeg are deterministic (JPEG encoding is); second-order is deterministic per seed, and callers pass
one seed per image (eval: seed + image index; training: per sample), so every method in a comparison sees the
same degraded input. A `Degradation` is written and read as its name (`parse` / `str`), the form
`eval-sr --degradation` and `TrainConfig.degradation` take.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import kornia
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .consistency import downsample

#: The degradation names `Degradation.parse` reads (jpeg takes its quality after a colon).
DEGRADATIONS = ("bicubic", "jpeg:Q", "second-order")
#: Pillow's useful JPEG quality range (above 95 its docs advise against: larger files, no visible gain).
JPEG_QUALITY = (1, 95)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → (N, H, W, 3) uint8: what an 8-bit image file stores."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_8bit(image: torch.Tensor) -> torch.Tensor:
    """An image in [-1, 1] rounded to the 256 levels an 8-bit file stores."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1.0


@dataclass(frozen=True)
class Degradation:
    """kind: "bicubic", "jpeg" or "second-order"; quality: the JPEG quality (jpeg only)."""

    kind: str = "bicubic"
    quality: int | None = None

    def __post_init__(self):
        if self.kind in ("bicubic", "second-order") and self.quality is None:
            return
        low, high = JPEG_QUALITY
        if self.kind != "jpeg" or isinstance(self.quality, bool) or not isinstance(self.quality, int) \
                or not low <= self.quality <= high:
            raise ValueError(f"degradation must be one of {list(DEGRADATIONS)} with Q an int in [{low}, {high}], "
                             f"got {self.kind!r} with quality {self.quality!r}")

    @classmethod
    def parse(cls, text: str) -> Degradation:
        """'bicubic' or 'jpeg:75'."""
        kind, _, quality = text.partition(":")
        if kind == "jpeg":
            if not quality.isdigit():
                raise ValueError(f"degradation {text!r}: jpeg takes a quality, e.g. jpeg:75")
            return cls("jpeg", int(quality))
        if quality or kind not in ("bicubic", "second-order"):
            raise ValueError(f"degradation must be one of {list(DEGRADATIONS)}, got {text!r}")
        return cls(kind)

    def __str__(self) -> str:
        return f"jpeg:{self.quality}" if self.kind == "jpeg" else self.kind

    @property
    def seeded(self) -> bool:
        """Whether the degradation is random, so that every call needs one seed per image."""
        return self.kind == "second-order"

    def __call__(self, hr: torch.Tensor, size: tuple[int, int], seeds: Sequence[int] | None = None
                 ) -> torch.Tensor:
        """hr (B, 3, H, W) in [-1, 1] → the degraded low-res input (B, 3, *size) in [-1, 1], on 8-bit levels.
        seeds: one per image, required by the seeded (random) degradation and ignored by the others."""
        if self.seeded:
            if seeds is None or len(seeds) != len(hr):
                raise ValueError(f"the {self} degradation needs one seed per image ({len(hr)}), got {seeds!r}")
            return torch.stack([second_order(image, size, torch.Generator().manual_seed(int(seed)))
                                for image, seed in zip(hr.float(), seeds)]).to(hr)
        lr = to_8bit(downsample(hr, size))
        if self.kind == "bicubic":
            return lr
        return torch.stack([_jpeg(image, self.quality) for image in lr]).to(lr)


#: The default degradation: the clean antialiased bicubic reduction.
BICUBIC = Degradation()


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """(3, h, w) in [-1, 1] on 8-bit levels → the same image saved and read back as a JPEG at `quality`."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(to_uint8(image[None].float())[0]).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(decoded).permute(2, 0, 1) / 127.5 - 1.0


@dataclass(frozen=True)
class StageRanges:
    """One stage of the second-order degradation (Real-ESRGAN's x4plus ranges; noise in [0, 1] image units)."""

    blur_probability: float
    blur_sigma: tuple[float, float]
    resize_probabilities: tuple[float, float, float]  # up, down, keep
    resize_up: tuple[float, float]
    resize_down: tuple[float, float]
    gaussian_noise_probability: float
    noise_sigma: tuple[float, float]
    poisson_scale: tuple[float, float]
    jpeg_quality: tuple[int, int]


#: The two stages of `second_order`: stage 1 resizes relative to the high-res size, stage 2 to the low-res one.
SECOND_ORDER = (StageRanges(1.0, (0.2, 3.0), (0.2, 0.7, 0.1), (1.0, 1.5), (0.15, 1.0), 0.5, (1 / 255, 30 / 255),
                            (0.05, 3.0), (30, 95)),
                StageRanges(0.8, (0.2, 1.5), (0.3, 0.4, 0.3), (1.0, 1.2), (0.3, 1.0), 0.5, (1 / 255, 25 / 255),
                            (0.05, 2.5), (30, 95)))
ISOTROPIC_PROBABILITY = 0.45
GREY_NOISE_PROBABILITY = 0.4
RESIZE_MODES = ("area", "bilinear", "bicubic")
BLUR_KERNEL = 21  # ±10 px: 3.3 σ at the widest blur


def blur(image: torch.Tensor, sigma: tuple[float, float]) -> torch.Tensor:
    """(3, H, W) → the same blurred by an axis-aligned Gaussian of standard deviations (σy, σx) px, reflected
    at the borders (kornia; the kernel shrinks to fit images under 11 px)."""
    kernel = min(BLUR_KERNEL, 2 * min(image.shape[-2:]) - 1)
    return kornia.filters.gaussian_blur2d(image[None], kernel, torch.tensor([sigma], dtype=image.dtype))[0]


def add_noise(image01: torch.Tensor, generator: torch.Generator, sigma: float | None = None,
              poisson_scale: float | None = None, grey: bool = False) -> torch.Tensor:
    """(3, H, W) in [0, 1] → + Gaussian noise of standard deviation `sigma`, or + Poisson (shot) noise at 8-bit
    photon counts scaled by `poisson_scale`; `grey`: one noise field shared by the three channels."""
    channels = 1 if grey else 3
    if sigma is not None:
        noise = torch.randn((channels, *image01.shape[-2:]), generator=generator) * sigma
    else:
        counts = (image01.mean(0, keepdim=True) if grey else image01).clamp(0, 1) * 255
        noise = (torch.poisson(counts, generator=generator) - counts) / 255 * poisson_scale
    return image01 + noise.expand_as(image01)


def second_order(hr: torch.Tensor, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(3, H, W) in [-1, 1] → (3, *size): the second-order degradation (module docstring), every random choice
    drawn from `generator`, rounded to 8-bit levels."""
    def uniform(bounds) -> float:
        low, high = bounds
        return low + (high - low) * float(torch.rand((), generator=generator))

    def choice(probabilities) -> int:
        return int(torch.multinomial(torch.tensor(probabilities), 1, generator=generator))

    def resize(image, target):
        mode = RESIZE_MODES[choice([1.0] * len(RESIZE_MODES))]
        corners = None if mode == "area" else False
        return F.interpolate(image[None], size=target, mode=mode, align_corners=corners)[0]

    image = (hr.float() + 1) / 2
    for number, stage in enumerate(SECOND_ORDER):
        if float(torch.rand((), generator=generator)) < stage.blur_probability:
            sigma_y = uniform(stage.blur_sigma)
            isotropic = float(torch.rand((), generator=generator)) < ISOTROPIC_PROBABILITY
            image = blur(image, (sigma_y, sigma_y if isotropic else uniform(stage.blur_sigma)))
        direction = choice(stage.resize_probabilities)
        factor = (uniform(stage.resize_up), uniform(stage.resize_down), 1.0)[direction]
        reference = image.shape[-2:] if number == 0 else size
        image = resize(image, tuple(max(1, round(side * factor)) for side in reference)).clamp(0, 1)
        grey = float(torch.rand((), generator=generator)) < GREY_NOISE_PROBABILITY
        if float(torch.rand((), generator=generator)) < stage.gaussian_noise_probability:
            image = add_noise(image, generator, sigma=uniform(stage.noise_sigma), grey=grey)
        else:
            image = add_noise(image, generator, poisson_scale=uniform(stage.poisson_scale), grey=grey)
        if number == len(SECOND_ORDER) - 1:
            image = resize(image, tuple(size))
        quality = int(round(uniform(stage.jpeg_quality)))
        image = (_jpeg(to_8bit(image.clamp(0, 1) * 2 - 1), quality) + 1) / 2
    return to_8bit(image * 2 - 1)
