"""TAEF2: the tiny autoencoder for the FLUX.2 latent space (32 channels, 8× down-sampling).

A TAESD-family network (madebyollin/taesd, MIT): plain `nn.Sequential` stacks of 3×3 convs and
residual `Block`s, whose indices match the released `taef2_{encoder,decoder}.pth` state dicts.
Images are in **[0, 1]** (feeding [-1, 1] ruins the round trip; ../shared/README.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LATENT_CHANNELS = 32
WIDTH = 64


def _conv(c_in: int, c_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs)


class Block(nn.Module):
    """relu(conv³(x') + x') where x' = x + pool(x) for the blocks nearest the latent.

    The optional "pool" branch (1×1 conv to 4× channels, GroupNorm(4), ReLU, 1×1 conv back) is a
    cheap per-pixel MLP that widens the blocks where the representation is most compressed.
    """

    def __init__(self, channels: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))
        self.pool = nn.Sequential(
            nn.Conv2d(channels, 4 * channels, 1, bias=False), nn.GroupNorm(4, 4 * channels), nn.ReLU(),
            nn.Conv2d(4 * channels, channels, 1, bias=False),
        ) if pool else None
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


class Clamp(nn.Module):
    """Soft clamp of latents to (−3, 3) before decoding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def build_encoder() -> nn.Sequential:
    """(B, 3, H, W) in [0, 1] → (B, 32, H/8, W/8)."""
    c = WIDTH
    return nn.Sequential(
        _conv(3, c), Block(c),
        _conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),
        _conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),
        _conv(c, c, stride=2, bias=False), Block(c, pool=True), Block(c, pool=True), Block(c, pool=True),
        _conv(c, LATENT_CHANNELS),
    )


def build_decoder() -> nn.Sequential:
    """(B, 32, h, w) → (B, 3, 8h, 8w), roughly in [0, 1] (not clamped)."""
    c = WIDTH
    return nn.Sequential(
        Clamp(), _conv(LATENT_CHANNELS, c), nn.ReLU(),
        Block(c, pool=True), Block(c, pool=True), Block(c, pool=True),
        nn.Upsample(scale_factor=2), _conv(c, c, bias=False), Block(c), Block(c), Block(c),
        nn.Upsample(scale_factor=2), _conv(c, c, bias=False), Block(c), Block(c), Block(c),
        nn.Upsample(scale_factor=2), _conv(c, c, bias=False), Block(c),
        _conv(c, 3),
    )


def load_taef2(weights_dir: str | Path) -> tuple[nn.Sequential, nn.Sequential]:
    """Encoder and decoder with the released weights from `weights_dir/taef2_{encoder,decoder}.pth`."""
    weights_dir = Path(weights_dir)
    encoder, decoder = build_encoder(), build_decoder()
    for module, name in ((encoder, "taef2_encoder.pth"), (decoder, "taef2_decoder.pth")):
        path = weights_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"TAEF2 weights not found: {path}. Pass the folder holding taef2_encoder.pth and "
                f"taef2_decoder.pth (released by madebyollin/taesd; offline: $FMBOOST_SHARED/weights/taef2)."
            )
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return encoder.eval(), decoder.eval()
