"""CFMUNet: the velocity network v_θ(x_t, t | cond) of coupling flow matching.

An ADM-style UNet built from diffusers' UNet2D blocks. The input is the noisy latent x_t
concatenated with the clean up-sampled conditioning latent (2C channels); the output is the
velocity (C channels). Time is continuous, t ∈ [0, 1]; it is scaled by `time_scale` (1000)
before diffusers' sinusoidal embedding so the embedding spans the frequencies it was designed for.

`padding_mode` is that of every padded convolution. diffusers pads with zeros, which puts a black frame
around whatever the network sees (and its stride-2 down-sampling pads only the top and left); a model
trained so leaves a thin dark / bright frame along the image edges. "replicate" (what training uses, see
TrainConfig.padding_mode) removes it (measured: BENCHMARKS.md, "Borders and tiles"). Saved models without the
key load as "zeros".
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config

PRESETS: dict[str, dict] = {
    # The paper's upsampler at 128² latents: 128 ch, mult 1-2-4-8, 3 res blocks per level, attention
    # at the 16² level and in the middle. With diffusers' blocks this is 323 M parameters (ADM: ≈306 M).
    "reference": dict(block_out_channels=(128, 256, 512, 1024), layers_per_block=3,
                      attention_levels=(False, False, False, True), attention_head_dim=64),
    # ≈ 62 M: a GPU-friendly ablation size.
    "base": dict(block_out_channels=(64, 128, 256, 512), layers_per_block=2,
                 attention_levels=(False, False, False, True), attention_head_dim=64),
    # ≈ 4 M: trains on a CPU in minutes to hours (demo, TAEF2 patch training).
    "small": dict(block_out_channels=(32, 64, 128), layers_per_block=2,
                  attention_levels=(False, False, True), attention_head_dim=32, norm_num_groups=16),
    # ≈ 0.1 M: unit tests.
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1,
                 attention_levels=(False, True), attention_head_dim=8, norm_num_groups=8),
}


PADDING_MODES = ("zeros", "replicate", "reflect")


class CFMUNet(ModelMixin, ConfigMixin):
    """v_θ(x_t, t, cond): x_t, cond (B, C, H, W), t (B,) or scalar in [0, 1] → (B, C, H, W).

    H and W must be divisible by 2^(len(block_out_channels) − 1). Fully convolutional (attention
    is global over whatever size it sees), so it trains on crops and samples on whole images.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 1024),
        layers_per_block: int = 3,
        attention_levels: tuple[bool, ...] = (False, False, False, True),
        attention_head_dim: int = 64,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        time_scale: float = 1000.0,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {list(PADDING_MODES)}, got {padding_mode!r}")
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(
                f"attention_levels has {len(attention_levels)} entries but block_out_channels has "
                f"{len(block_out_channels)}; give one bool per resolution level"
            )
        if any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(f"every block_out_channels entry must be divisible by norm_num_groups={norm_num_groups}")
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
        self.unet = UNet2DModel(
            in_channels=2 * latent_channels,
            out_channels=latent_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=down,
            up_block_types=up,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
        )
        for conv in self.unet.modules():
            if isinstance(conv, torch.nn.Conv2d) and any(conv.padding):
                conv.padding_mode = padding_mode

    @classmethod
    def from_preset(cls, name: str, latent_channels: int = 4, **overrides) -> CFMUNet:
        """Build a named size (`reference`, `base`, `small`, `tiny`) for the given latent channels."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(latent_channels=latent_channels, **{**PRESETS[name], **overrides})

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this (one halving per down-sampling level)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor) -> torch.Tensor:
        C = self.config.latent_channels
        if x_t.ndim != 4 or x_t.shape[1] != C:
            raise ValueError(f"x_t must be (B, {C}, H, W), got {tuple(x_t.shape)}")
        if cond.shape != x_t.shape:
            raise ValueError(f"cond must have the shape of x_t {tuple(x_t.shape)}, got {tuple(cond.shape)}")
        H, W = x_t.shape[-2:]
        if H % self.size_multiple or W % self.size_multiple:
            raise ValueError(f"latent size {H}x{W} must be divisible by {self.size_multiple}")
        # Range-checked while t is on the host (a float or CPU tensor): checking a GPU tensor's values would
        # stall the host every NFE and cannot be captured in a CUDA graph, so a t already on the GPU is trusted;
        # so is t under torch.compile (a value test is data-dependent control flow, which breaks the graph).
        t = torch.as_tensor(t, dtype=x_t.dtype)
        if t.device.type == "cpu" and not torch.compiler.is_compiling() and bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"t must lie in [0, 1], got range [{t.min().item():.3g}, {t.max().item():.3g}]")
        t = t.to(x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must be a scalar or shape ({x_t.shape[0]},), got {tuple(t.shape)}")
        x = torch.cat([x_t, cond], dim=1)
        return self.unet(x, t * self.config.time_scale).sample
