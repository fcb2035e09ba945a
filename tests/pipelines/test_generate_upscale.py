"""`fmboost generate` / `fmboost upscale` on tiny saved pipelines and upsamplers; user errors are one line."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fmboost.models import (
    CFMUNet,
    CouplingFlowMatcher,
    DiffusersAutoencoder,
    IdentityAutoencoder,
    SamplerConfig,
    Upsampler,
)
from fmboost.pipelines import BoostPipeline
from fmboost.pipelines.cli import main
from fmboost.pipelines.random_sd import random_sd_components

FAST = ["--base-steps", "1", "--base-size", "64", "--sampler", "euler:linear:2"]


def tiny_upsampler(first_stage, upsample="psu"):
    torch.manual_seed(0)
    return Upsampler(CFMUNet.from_preset("tiny", latent_channels=first_stage.latent_channels).eval(), first_stage,
                     CouplingFlowMatcher(upsample=upsample), scale=2, sampler=SamplerConfig(num_steps=2))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders: an SD base pipeline, an SD-VAE upsampler, a BoostPipeline, a pixel-space upsampler."""
    root = tmp_path_factory.mktemp("models")
    parts = random_sd_components("tiny")
    base = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    base.save_pretrained(root / "base")
    upsampler = tiny_upsampler(DiffusersAutoencoder(parts["vae"], {"kind": "autoencoder_kl", "path": None}))
    upsampler.save_pretrained(root / "upsampler")
    BoostPipeline.from_base(base, upsampler).save_pretrained(root / "boost")
    tiny_upsampler(IdentityAutoencoder(), "bicubic").save_pretrained(root / "pixel")
    return root


def error_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"fmboost {argv[0]}: error: ")
    return err.splitlines()[-1]


def test_generate_from_base_and_upsampler(saved, tmp_path, capsys):
    out = tmp_path / "cat.png"
    argv = ["generate", "a cat", "-o", str(out), "--base", str(saved / "base"), "--upsampler", str(saved / "upsampler")]
    assert main(argv + FAST) == 0
    assert PIL.Image.open(out).size == (128, 128) and "NFE 2" in capsys.readouterr().out


def test_generate_from_boost_pipeline_folder_with_options(saved, tmp_path):
    out = tmp_path / "cat.png"
    assert main(["generate", "a cat", "-o", str(out), "--base", str(saved / "boost"), "--seed", "3", "--cascade", "2",
                 "--tiled", "--back-project", "2"] + FAST[:-2] + ["--sampler", "heun:cosine:2"]) == 0
    assert PIL.Image.open(out).size == (256, 256)


def test_upscale_any_size_with_compare(saved, tmp_path, capsys):
    source = tmp_path / "in.png"
    PIL.Image.new("RGB", (37, 21), (200, 30, 30)).save(source)  # pixel space: any size works
    out = tmp_path / "out.png"
    assert main(["upscale", str(source), "-o", str(out), "--upsampler", str(saved / "pixel"), "--compare"]) == 0
    assert PIL.Image.open(out).size == (74, 42)
    assert PIL.Image.open(tmp_path / "out_compare.png").size == (148, 42)
    assert "centre-cropped" not in capsys.readouterr().out


def test_upscale_with_sd_vae_boost_pipeline(saved, tmp_path, capsys):
    source = tmp_path / "in.png"
    PIL.Image.new("RGB", (45, 27), (10, 120, 30)).save(source)  # SD VAE (8×): padded, run, cropped back
    out = tmp_path / "out.jpg"
    assert main(["upscale", str(source), "-o", str(out), "--upsampler", str(saved / "boost")]) == 0
    assert PIL.Image.open(out).size == (90, 54)
    assert "tiles" not in capsys.readouterr().out
    assert main(["upscale", str(source), "-o", str(out), "--upsampler", str(saved / "boost"), "--tile-size", "32",
                 "--tile-overlap", "8"]) == 0
    # 32 px = 4 latents per tile on a canvas of 20 × 16 latents (the input with its border context)
    assert PIL.Image.open(out).size == (90, 54) and "in 63 tiles, NFE 2" in capsys.readouterr().out


def test_user_errors_are_one_line(saved, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    err = error_line(capsys, ["generate", "a cat", "-o", out, "--base", str(saved / "base"),
                              "--upsampler", str(tmp_path / "missing")])
    assert "upsampler folder" in err and "not found" in err and "boost_config.json" in err
    err = error_line(capsys, ["generate", "a cat", "-o", out, "--base", str(saved / "base")])
    assert "--upsampler DIR is required" in err
    err = error_line(capsys, ["generate", "a cat", "-o", out, "--base", str(tmp_path),
                              "--upsampler", str(saved / "upsampler")])
    assert "no model_index.json" in err
    err = error_line(capsys, ["generate", "a cat", "-o", out, "--base", "nobody/no-such-model-xyz",
                              "--upsampler", str(saved / "upsampler")])
    assert "could not load base pipeline 'nobody/no-such-model-xyz'" in err and "save_pretrained" in err
    err = error_line(capsys, ["upscale", str(tmp_path / "none.png"), "-o", out, "--upsampler", str(saved / "pixel")])
    assert "not found" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    err = error_line(capsys, ["upscale", str(tmp_path / "none.png"), "-o", out, "--upsampler", str(tmp_path)])
    assert "not found" in err  # the input image is checked first
    source = tmp_path / "in.png"
    PIL.Image.new("RGB", (16, 16)).save(source)
    err = error_line(capsys, ["upscale", str(source), "-o", out, "--upsampler", str(tmp_path / "broken")])
    assert "has no boost_config.json" in err
    (tmp_path / "broken" / "boost_config.json").write_text((saved / "pixel" / "boost_config.json").read_text())
    (tmp_path / "broken" / "config.json").write_text((saved / "pixel" / "config.json").read_text())
    err = error_line(capsys, ["upscale", str(source), "-o", out, "--upsampler", str(tmp_path / "broken")])
    assert "could not load the upsampler" in err  # weights file missing
    err = error_line(capsys, ["upscale", str(source), "-o", out, "--upsampler", str(saved / "pixel"),
                              "--dtype", "float16", "--device", "cpu"])
    assert "needs a GPU" in err
    err = error_line(capsys, ["upscale", str(source), "-o", out, "--upsampler", str(saved / "pixel"), "--detail", "2"])
    assert "SamplerConfig.detail must be in [0, 1]" in err
    err = error_line(capsys, ["upscale", str(source), "-o", out, "--upsampler", str(saved / "pixel"),
                              "--detail", "0.5"])
    assert "needs a posterior-mean upsampler" in err
    err = error_line(capsys, ["upscale", str(source), "-o", out, "--upsampler", str(saved / "pixel"),
                              "--tile-size", "-1"])
    assert "tile_size and tile_overlap must be >= 0" in err


def test_upscale_with_a_posterior_mean_upsampler_and_the_detail_dial(tmp_path, capsys):
    from fmboost.models.posterior_mean import PosteriorMean

    torch.manual_seed(1)
    regression = Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), IdentityAutoencoder(),
                           CouplingFlowMatcher(upsample="bicubic", objective="regression"), scale=2)
    pm = Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), IdentityAutoencoder(),
                   CouplingFlowMatcher(upsample="bicubic", source="posterior_mean"), scale=2,
                   sampler=SamplerConfig(num_steps=2), posterior_mean=PosteriorMean.from_upsampler(regression))
    pm.save_pretrained(tmp_path / "pm")
    source = tmp_path / "in.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(source)
    outputs = {}
    for detail in ("0", "1"):
        out = tmp_path / f"out_{detail}.png"
        assert main(["upscale", str(source), "-o", str(out), "--upsampler", str(tmp_path / "pm"),
                     "--detail", detail]) == 0
        outputs[detail] = np.asarray(PIL.Image.open(out))
        assert f"NFE {1 if detail == '0' else 3}" in capsys.readouterr().out
    assert outputs["0"].shape == (40, 48, 3) and not np.array_equal(outputs["0"], outputs["1"])
