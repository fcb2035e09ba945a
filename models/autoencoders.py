"""First stages: one small adapter per autoencoder, all mapping images ↔ *normalised* latents.

Every adapter takes images (B, 3, H, W) in [-1, 1] and returns latents (B, C, H/f, W/f) that are
already scaled (the SD scaling factor lives in `DiffusersAutoencoder` and nowhere else) and then
normalised per channel with optional data statistics (`latent_mean`, `latent_std`), so the flow
model sees roughly unit-variance latents whichever autoencoder produced them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .assets import shared_path
from .taef2 import LATENT_CHANNELS as TAEF2_CHANNELS
from .taef2 import load_taef2

#: The diffusers autoencoders (`DiffusersAutoencoder`): a pipeline's VAE can serve as their first stage.
DIFFUSERS_KINDS = ("autoencoder_kl", "autoencoder_tiny")
FIRST_STAGES = (*DIFFUSERS_KINDS, "taef2", "identity")


def stats_record(mean: torch.Tensor, std: torch.Tensor) -> dict:
    """Per-channel latent statistics (C,) as JSON stores them (boost_config.json, R's folder, the latent cache)."""
    return {"latent_mean": torch.as_tensor(mean).tolist(), "latent_std": torch.as_tensor(std).tolist()}


def stats_from_record(record: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `stats_record`: (mean, std), each (C,)."""
    return torch.tensor(record["latent_mean"]), torch.tensor(record["latent_std"])


class FirstStage(nn.Module):
    """Base adapter: subclasses implement `_encode_raw` / `_decode_raw`; stats are handled here."""

    latent_channels: int
    downsample_factor: int

    def __init__(self, latent_channels: int, downsample_factor: int, spec: dict):
        super().__init__()
        self.latent_channels, self.downsample_factor = latent_channels, downsample_factor
        self.spec = spec  # how to rebuild this adapter: {"kind": ..., "path": ..., "subfolder": ...}
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    def _encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        return self.latent_mean.to(z).view(shape), self.latent_std.to(z).view(shape)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], H and W multiples of the down-sampling factor → (B, C, H/f, W/f)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {f} for {self.spec['kind']}")
        z = self._encode_raw(images)
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) normalised latents → (B, 3, f·h, f·w) images in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        mean, std = self._stats(latents)
        return self._decode_raw(latents * std + mean).clamp(-1, 1)

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics (C,) of the raw (scaled) latents; encode() subtracts/divides them."""
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (self.latent_channels,) or std.shape != (self.latent_channels,):
            raise ValueError(f"latent stats must have shape ({self.latent_channels},), "
                             f"got {tuple(mean.shape)}, {tuple(std.shape)}")
        if bool((std <= 0).any()):
            raise ValueError("latent_std must be positive")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def config(self) -> dict:
        """JSON-able description (spec + stats) that `first_stage_from_config` rebuilds."""
        return {**self.spec, **stats_record(self.latent_mean, self.latent_std)}


class DiffusersAutoencoder(FirstStage):
    """diffusers `AutoencoderKL` (SD VAE: posterior mode × scaling factor) or `AutoencoderTiny` (TAESD)."""

    def __init__(self, vae: nn.Module, spec: dict):
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__(vae.config.latent_channels, factor, spec)
        self.vae = vae
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)

    def _encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(images.to(self.vae.dtype))
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents  # KL: posterior mode
        return (z.float() - self.shift_factor) * self.scaling_factor

    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()


class TAEF2Autoencoder(FirstStage):
    """TAEF2 (FLUX.2 latent space, 32 ch, 8×); rescales [-1, 1] ↔ the [0, 1] it was trained on."""

    def __init__(self, weights_dir: str | Path | None = None):
        resolved = weights_dir or shared_path("weights/taef2")
        if resolved is None:
            raise FileNotFoundError(
                "TAEF2 weights not found: pass the folder with taef2_{encoder,decoder}.pth (released by "
                "madebyollin/taesd), or set $FMBOOST_SHARED to an assets folder holding weights/taef2"
            )
        super().__init__(TAEF2_CHANNELS, 8, {"kind": "taef2", "path": str(weights_dir) if weights_dir else None})
        self.encoder, self.decoder = load_taef2(resolved)

    def _encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder((images.float() + 1) / 2)

    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents.float()) * 2 - 1


class IdentityAutoencoder(FirstStage):
    """Pixel space: the 'latent' is the image itself (3 channels, factor 1)."""

    def __init__(self):
        super().__init__(3, 1, {"kind": "identity"})

    def _encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def load_first_stage(kind: str, path: str | None = None, subfolder: str | None = None,
                     torch_dtype: torch.dtype | None = None) -> FirstStage:
    """Build a first stage by kind. `path` is a hub id or local folder for the diffusers kinds,
    the weights folder for `taef2` (default: $FMBOOST_SHARED/weights/taef2), unused for `identity`."""
    if kind == "identity":
        return IdentityAutoencoder()
    if kind == "taef2":
        return TAEF2Autoencoder(path)
    if kind in DIFFUSERS_KINDS:
        from diffusers import AutoencoderKL, AutoencoderTiny

        if not path:
            raise ValueError(f"first stage {kind!r} needs a path: a hub id (e.g. "
                             "'stable-diffusion-v1-5/stable-diffusion-v1-5' with subfolder='vae') or a local folder")
        cls = AutoencoderKL if kind == "autoencoder_kl" else AutoencoderTiny
        kwargs = {"subfolder": subfolder} if subfolder else {}
        try:
            vae = cls.from_pretrained(path, torch_dtype=torch_dtype, **kwargs)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"could not load {cls.__name__} from {path!r}{f' (subfolder {subfolder!r})' if subfolder else ''}: "
                f"{err}. Give a local folder with config.json and weights, or a hub id with network access."
            ) from None
        return DiffusersAutoencoder(vae.eval(), {"kind": kind, "path": path, "subfolder": subfolder})
    raise ValueError(f"first stage kind must be one of {list(FIRST_STAGES)}, got {kind!r}")


def first_stage_from_config(config: dict, vae: nn.Module | None = None) -> FirstStage:
    """Inverse of `FirstStage.config()`. `vae`: a diffusers autoencoder already in memory (e.g. a pipeline's) to
    use instead of loading the one named, for the diffusers kinds; ignored for the others."""
    if vae is not None and config["kind"] in DIFFUSERS_KINDS:
        first_stage = DiffusersAutoencoder(vae, {k: v for k, v in config.items() if not k.startswith("latent_")})
    else:
        first_stage = load_first_stage(config["kind"], config.get("path"), config.get("subfolder"))
    if "latent_mean" in config:
        first_stage.set_latent_stats(*stats_from_record(config))
    return first_stage


@torch.no_grad()
def compute_latent_stats(first_stage: FirstStage, images: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) of the raw latents of `images` (batches in [-1, 1]).

    Resets any stats first so the result describes the autoencoder, not a previous normalisation.
    """
    first_stage.set_latent_stats(torch.zeros(first_stage.latent_channels), torch.ones(first_stage.latent_channels))
    total, total_sq, count = 0.0, 0.0, 0
    for batch in images:
        z = first_stage.encode(batch).double()
        total = total + z.sum(dim=(0, 2, 3))
        total_sq = total_sq + (z ** 2).sum(dim=(0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
    if count == 0:
        raise ValueError("compute_latent_stats got no images")
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()
