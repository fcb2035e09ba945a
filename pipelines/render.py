"""PIL images through an `Upsampler`, with no text-to-image pipeline: what `fmboost upscale`, a collection run and the
page's Upscale tab make images with.

    images (RGB, one size) → (B, 3, h, w) in [-1, 1] → `Upsampler.upscale` × cascade → 8-bit images

`Upsampler.upscale` is the one render path (`fmboost.models.upsampler`), so an image made here is the one
`BoostPipeline(image=...)` and `fmboost eval-sr` make from the same input and seed.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from fmboost.models import DiffusersAutoencoder, SamplerConfig, Upsampler
from fmboost.models.degradations import to_uint8
from fmboost.models.upsampler import Generators


@dataclass
class Rendered:
    """images: RGB, each scale^cascade × its input; nfe: network evaluations per image, all passes (R's included;
    a tiled pass runs each of them on every tile); seconds: wall clock; tiles: tiles of the last pass (1: untiled)."""

    images: list[PIL.Image.Image]
    nfe: int
    seconds: float
    tiles: int


def to_tensor(images: list[PIL.Image.Image], device: torch.device) -> torch.Tensor:
    """RGB images of one size → (B, 3, h, w) in [-1, 1] on `device`."""
    if len({image.size for image in images}) != 1:
        raise ValueError(f"images in a batch must share one size, got {sorted({image.size for image in images})}")
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).to(device) * 2 - 1


@contextlib.contextmanager
def full_precision_vae(vae: torch.nn.Module | None):
    """Inside the block, an fp16 diffusers VAE that asks for it (`config.force_upcast`: SD's VAE overflows in fp16 at
    high resolution) runs in fp32; any other VAE, or None, as it is."""
    upcast = vae is not None and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(torch.float16)


@torch.no_grad()
def upscale_images(upsampler: Upsampler, images: list[PIL.Image.Image], generator: Generators = None,
                   sampler: SamplerConfig | str | None = None, cascade: int = 1, tile_size: int | None = None,
                   tile_overlap: int | None = None, progress: dict | None = None) -> Rendered:
    """`images` super-resolved by `cascade` passes of `upsampler.upscale` (arguments as there; `sampler` default:
    the saved one), on the device of the upsampler's networks (`fmboost.pipelines.cli_options.load_image_upsampler`
    places them). `progress`: tqdm keyword arguments of the bar ticked per network evaluation (disable=True: none)."""
    if not isinstance(cascade, int) or cascade < 1:
        raise ValueError(f"cascade must be a positive int (number of passes), got {cascade!r}")
    upsampler = upsampler.mixed_precision()  # the view that counts network evaluations (a no-op when it is one)
    device = next(upsampler.model.parameters()).device
    first_stage = upsampler.first_stage
    start, image, nfe = time.perf_counter(), to_tensor(images, device), 0
    with full_precision_vae(first_stage.vae if isinstance(first_stage, DiffusersAutoencoder) else None):
        for _ in range(cascade):
            with upsampler.model.counting(**{"desc": "upsample", **(progress or {})}):
                result = upsampler.upscale(image, generator, sampler, tile_size, tile_overlap)
            image, nfe = result.image, nfe + result.nfe
    pixels = to_uint8(image)  # copies to the CPU: waits for the device
    return Rendered([PIL.Image.fromarray(p) for p in pixels], nfe, time.perf_counter() - start, result.tiles)
