"""Overlapping tiles with smooth blending: run a spatial network on a canvas larger than memory allows.

A `Tiling` cuts a canvas into tiles of `size` units that overlap by at least `overlap` units, calls a
function on each tile and blends the outputs with separable raised-cosine weights: across an overlap
of n output pixels a tile's weight rises as sin²(π/2 · (i + ½)/n) while its neighbour's falls as cos², so
the weights of two tiles sum to one and the outermost pixels of a tile — those a network with zero
padding gets wrong (`Upsampler.upscale`) — count least. Sides on the canvas edge keep weight one.

`Upsampler.upscale` tiles three stages with one tiling in units of high-res latent pixels: the PSU
encode (input unit: f image pixels), every velocity evaluation of the ODE and R's pass (unit: one latent
pixel), and the decode (output unit: f pixels). Blending the *velocity* at every NFE, not the finished
tiles, keeps the tiles agreeing along the whole trajectory (MultiDiffusion, Bar-Tal et al. 2023); the
ODE state, the noise and the conditioning are whole-canvas latents, so the source noise is drawn once
and overlapping tiles see the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tiling:
    """Tiles of `size` units overlapping by at least `overlap` units, starting at multiples of `align`.

    size must be a multiple of align (the network's size multiple) and larger than overlap; a canvas
    side no longer than `size` is one tile."""

    size: int
    overlap: int
    align: int = 1

    def __post_init__(self):
        if self.align < 1 or self.size < self.align or self.size % self.align:
            raise ValueError(f"tile size {self.size} must be a positive multiple of {self.align}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"tile overlap {self.overlap} must be in [0, tile size {self.size})")

    def spans(self, length: int) -> list[tuple[int, int]]:
        """[(start, end)] covering [0, length); the last tile ends at `length` (length must be a multiple
        of align when it exceeds size, so every tile has the full size)."""
        if length <= self.size:
            return [(0, length)]
        if length % self.align:
            raise ValueError(f"canvas side {length} must be a multiple of {self.align}")
        stride = max(self.align, (self.size - self.overlap) // self.align * self.align)
        starts = list(range(0, length - self.size, stride)) + [length - self.size]
        return [(s, s + self.size) for s in starts]

    def count(self, height: int, width: int) -> int:
        """Number of tiles on a (height, width) canvas."""
        return len(self.spans(height)) * len(self.spans(width))

    @staticmethod
    def _ramp(spans: list[tuple[int, int]], index: int, scale: int, device, dtype) -> torch.Tensor:
        """1-D weights (scale · tile length,) of tile `index`: raised-cosine ramps over its overlaps."""
        start, end = spans[index]
        weight = torch.ones((end - start) * scale, device=device, dtype=dtype)
        if index > 0:
            n = (spans[index - 1][1] - start) * scale
            weight[:n] = torch.sin(math.pi / 2 * (torch.arange(n, device=device, dtype=dtype) + 0.5) / n) ** 2
        if index + 1 < len(spans):
            n = (end - spans[index + 1][0]) * scale
            weight[-n:] *= torch.cos(math.pi / 2 * (torch.arange(n, device=device, dtype=dtype) + 0.5) / n) ** 2
        return weight

    def apply(self, fn: Callable[..., torch.Tensor], *inputs, in_scale: int = 1, out_scale: int = 1) -> torch.Tensor:
        """fn over tiles, blended. inputs: tensors (B, C, H·in_scale, W·in_scale) — sliced per tile — and
        anything else (passed through); the first input sets the canvas of H × W units. fn must map a tile of
        h × w units to (B, C', h·out_scale, w·out_scale). One tile: fn(*inputs) itself."""
        H, W = inputs[0].shape[-2] // in_scale, inputs[0].shape[-1] // in_scale
        rows, cols = self.spans(H), self.spans(W)
        if len(rows) == 1 and len(cols) == 1:
            return fn(*inputs)
        spatial = [isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[-2:] == inputs[0].shape[-2:]
                   for x in inputs]
        out = weights = None
        for i, (y0, y1) in enumerate(rows):
            for j, (x0, x1) in enumerate(cols):
                tile = [x[..., y0 * in_scale:y1 * in_scale, x0 * in_scale:x1 * in_scale] if s else x
                        for x, s in zip(inputs, spatial)]
                y = fn(*tile)
                if out is None:
                    out = y.new_zeros((*y.shape[:2], H * out_scale, W * out_scale))
                    weights = y.new_zeros((H * out_scale, W * out_scale))
                w = self._ramp(rows, i, out_scale, y.device, y.dtype)[:, None] \
                    * self._ramp(cols, j, out_scale, y.device, y.dtype)[None]
                region = (..., slice(y0 * out_scale, y1 * out_scale), slice(x0 * out_scale, x1 * out_scale))
                out[region] += y * w
                weights[region[1:]] += w
        return out / weights


class TiledModule(torch.nn.Module):
    """A spatial network (v_θ, or R) run tile by tile: forward(*args) = tiling.apply(module, *args)."""

    def __init__(self, module: torch.nn.Module, tiling: Tiling):
        super().__init__()
        self.module, self.tiling = module, tiling

    def forward(self, *args) -> torch.Tensor:
        return self.tiling.apply(self.module, *args)


class TiledFirstStage:
    """A `FirstStage` whose encode / decode run tile by tile (tiles in latent units); stats and factor are
    the wrapped stage's."""

    def __init__(self, first_stage, tiling: Tiling):
        self.first_stage, self.tiling = first_stage, tiling
        self.downsample_factor = first_stage.downsample_factor
        self.latent_channels = first_stage.latent_channels

    @property
    def latent_mean(self) -> torch.Tensor:
        return self.first_stage.latent_mean

    @property
    def latent_std(self) -> torch.Tensor:
        return self.first_stage.latent_std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, C, H/f, W/f), encoded in tiles of `tiling.size` latents."""
        return self.tiling.apply(self.first_stage.encode, images, in_scale=self.downsample_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, 3, f·h, f·w) in [-1, 1], decoded in tiles and blended in pixel space."""
        return self.tiling.apply(self.first_stage.decode, latents, out_scale=self.downsample_factor)
