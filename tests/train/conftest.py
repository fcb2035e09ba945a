"""Tiny training setups: a few random 24² PNGs, pixel space, a 2-level UNet without attention."""

import re

import numpy as np
import pytest
import torch
from fmboost.models.calibration import BACK_PROJECT_CANDIDATES
from fmboost.train.config import load_config
from PIL import Image
from safetensors.torch import load_file

TINY = dict(resolution=16, crop_size=16, scale=4, model_preset="tiny", block_out_channels=[8, 16], layers_per_block=1,
            train_batch_size=2, crops_per_image=1, num_validation_images=1, max_train_steps=4, checkpointing_steps=2,
            validation_steps=2, learning_rate=1e-2, lr_warmup_steps=0, ema_decay=0.9, latent_stats_images=4)


def write_images(folder, count: int = 6, size: int = 24, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(folder / f"{i:02d}.png")
    return folder


def weights(folder) -> dict[str, torch.Tensor]:
    """The UNet weights of a training checkpoint or of a saved upsampler folder."""
    name = "model.safetensors" if (folder / "model.safetensors").is_file() else "diffusion_pytorch_model.safetensors"
    return load_file(folder / name)


def fitted_back_projection(printed: str) -> tuple[dict[int, float], int]:
    """What the last training in `printed` said when it fitted the saved folder's render settings → ({steps: mean
    validation PSNR} for every default candidate, the steps marked kept), checked to be the best PSNR (the fewest
    steps within 0.01 dB; the printed values are rounded to 0.01)."""
    marker = "render settings fitted on the validation images:\n"
    assert marker in printed, "training did not fit the render settings"
    line = printed.rsplit(marker, 1)[1].splitlines()[0]
    found = re.findall(r"(\d+): (-?[\d.]+) dB(?: / LPIPS [\d.]+)?( \(kept\))?", line)
    scores, kept = {int(n): float(db) for n, db, _ in found}, [int(n) for n, _, mark in found if mark]
    assert tuple(scores) == BACK_PROJECT_CANDIDATES and len(kept) == 1, line
    best = max(scores.values())
    assert scores[kept[0]] >= best - 0.02, line  # within 0.01 dB of the best, up to the rounding
    assert all(scores[n] < best - 0.005 for n in scores if n < kept[0]), line  # fewer steps: measurably worse
    return scores, kept[0]


@pytest.fixture
def image_dir(tmp_path):
    return write_images(tmp_path / "images")


@pytest.fixture
def tiny_config(tmp_path, image_dir):
    """tiny_config(**overrides) → a TrainConfig writing to tmp_path/<output_name>."""
    def make(output_name: str = "run", **overrides):
        return load_config(None, {**TINY, "train_data_dir": str(image_dir), "output_dir": str(tmp_path / output_name),
                                  **overrides})
    return make
