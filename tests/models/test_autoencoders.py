from pathlib import Path

import numpy as np
import pytest
import torch
from fmboost.models import (
    DiffusersAutoencoder,
    IdentityAutoencoder,
    TAEF2Autoencoder,
    compute_latent_stats,
    first_stage_from_config,
    load_first_stage,
)
from PIL import Image


def tiny_kl(tmp_path: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, scaling_factor=0.18215)
    vae.save_pretrained(tmp_path / "vae")
    return load_first_stage("autoencoder_kl", str(tmp_path / "vae"))


def test_tiny_autoencoder_kl_round_trip_shapes_and_scaling(tmp_path, generator):
    first_stage = tiny_kl(tmp_path)
    assert isinstance(first_stage, DiffusersAutoencoder)
    assert (first_stage.latent_channels, first_stage.downsample_factor) == (4, 2)
    images = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    z = first_stage.encode(images)
    assert z.shape == (2, 4, 8, 8)
    raw = first_stage.vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(z, raw * 0.18215)  # posterior mode × scaling factor
    out = first_stage.decode(z)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="multiple of 2"):
        first_stage.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"latents must be \(B, 4"):
        first_stage.decode(torch.zeros(1, 3, 8, 8))


def test_latent_stats_normalise_and_survive_save_load(tmp_path, generator):
    first_stage = tiny_kl(tmp_path)
    batches = [torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1 for _ in range(3)]
    mean, std = compute_latent_stats(first_stage, batches)
    first_stage.set_latent_stats(mean, std)
    z = torch.cat([first_stage.encode(b) for b in batches])
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05
    rebuilt = first_stage_from_config(first_stage.config())
    torch.testing.assert_close(rebuilt.encode(batches[0]), first_stage.encode(batches[0]))
    torch.testing.assert_close(rebuilt.decode(z[:2]), first_stage.decode(z[:2]))
    with pytest.raises(ValueError, match="latent stats must have shape"):
        first_stage.set_latent_stats(torch.zeros(3), torch.ones(3))


def test_identity_and_unknown_kind(generator):
    first_stage = load_first_stage("identity")
    x = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    assert isinstance(first_stage, IdentityAutoencoder) and torch.equal(first_stage.decode(first_stage.encode(x)), x)
    with pytest.raises(ValueError, match="first stage kind must be one of"):
        load_first_stage("vqgan")
    with pytest.raises(FileNotFoundError, match="could not load AutoencoderKL"):
        load_first_stage("autoencoder_kl", "/nonexistent/vae")
    with pytest.raises(FileNotFoundError, match="TAEF2 weights not found"):
        TAEF2Autoencoder("/nonexistent/taef2")


def face(path: Path, size: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)[None]


def psnr01(a, b):
    return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()


@pytest.mark.shared
def test_taef2_round_trip_on_real_faces(taef2_dir, faces_dir):
    first_stage = TAEF2Autoencoder(taef2_dir)
    paths = sorted(faces_dir.glob("*"))[:3]
    with torch.no_grad():
        for path in paths:
            x01 = face(path, 512)
            z = first_stage.encode(x01 * 2 - 1)
            assert z.shape == (1, 32, 64, 64)
            good = psnr01((first_stage.decode(z) + 1) / 2, x01)
            assert good >= 30.0, (path.name, good)
            # Feeding [-1, 1] straight into the raw encoder/decoder (the classic mistake) loses > 8 dB.
            wrong = psnr01(first_stage.decoder(first_stage.encoder(x01 * 2 - 1)).clamp(-1, 1) / 2 + 0.5, x01)
            assert wrong < good - 8.0, (path.name, wrong, good)


@pytest.mark.shared
def test_psu_is_a_better_source_than_latent_bilinear_in_taef2(taef2_dir, faces_dir):
    """4× (64 → 256 px faces): pixel-space up-sampling + encode lands far closer to the target latent."""
    from fmboost.models import upsample_latent

    first_stage = TAEF2Autoencoder(taef2_dir)
    hr = torch.cat([face(path, 256) for path in sorted(faces_dir.glob("*"))[:4]]) * 2 - 1
    lr = torch.nn.functional.interpolate(hr, size=(64, 64), mode="bicubic", antialias=True).clamp(-1, 1)
    with torch.no_grad():
        target = first_stage.encode(hr)
        latent_bilinear = upsample_latent(first_stage.encode(lr), (32, 32), "bilinear")
        psu = upsample_latent(None, (32, 32), "psu", first_stage, lr_image=lr)

    def normalised_mse(z):
        return (((z - target) ** 2).mean() / target.var()).item()

    assert normalised_mse(psu) < 0.8 < 1.1 < normalised_mse(latent_bilinear), (
        normalised_mse(psu), normalised_mse(latent_bilinear))
