"""How a low-res input is made from a high-res image: the degradation that evaluation (and training) simulate.

    bicubic     antialiased bicubic reduction (`consistency.downsample`, the degradation back-projection
                inverts), rounded to 8-bit levels: a clean low-res photo.
    jpeg:Q      the same reduction, then saved and read back as a JPEG at quality Q (1–95) by libjpeg through
                Pillow (4:2:0 chroma subsampling, its default): 8 × 8-pixel blocks, ringing and colour bleeding,
                as in photos that went through a camera, a phone or the web.

Each is deterministic (JPEG encoding is), so every method in a comparison sees the same degraded input. A
`Degradation` is written and read as its name (`parse` / `str`), the form `eval-sr --degradation` takes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from .consistency import downsample

#: The degradation names `Degradation.parse` reads (jpeg takes its quality after a colon).
DEGRADATIONS = ("bicubic", "jpeg:Q")
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
    """kind: "bicubic" or "jpeg"; quality: the JPEG quality (jpeg only)."""

    kind: str = "bicubic"
    quality: int | None = None

    def __post_init__(self):
        if self.kind == "bicubic" and self.quality is None:
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
        if quality or kind != "bicubic":
            raise ValueError(f"degradation must be one of {list(DEGRADATIONS)}, got {text!r}")
        return cls()

    def __str__(self) -> str:
        return self.kind if self.kind == "bicubic" else f"jpeg:{self.quality}"

    def __call__(self, hr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """hr (B, 3, H, W) in [-1, 1] → the degraded low-res input (B, 3, *size) in [-1, 1], on 8-bit levels."""
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
