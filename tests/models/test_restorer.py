"""A pretrained restorer as the estimate: reading weights files, finding them again, and the render path from it."""

import dataclasses
import json

import pytest
import torch
from fmboost.models import (
    BOOST_CONFIG_NAME,
    CFMUNet,
    CouplingFlowMatcher,
    IdentityAutoencoder,
    SamplerConfig,
    Upsampler,
)
from fmboost.models.consistency import back_project, downsample
from fmboost.models.realesrgan import REALESRGAN_SHARED_PATH, RRDBNet, realesrgan_restorer, realesrgan_upscale
from fmboost.models.restorer import Restorer, run_tiled
from safetensors.torch import save_file

from ..conftest import require_shared


def write_rrdbnet(path, seed: int = 0, num_block: int = 1):
    """A random small ESRGAN-layout network (the x4plus key names) saved as safetensors → its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    save_file(RRDBNet(num_feat=8, num_block=num_block, num_grow_ch=4).state_dict(), str(path))
    return path


def restorer_flow(restorer: Restorer, num_steps: int = 2, **flow) -> Upsampler:
    """A pixel-space posterior-mean flow (random tiny v_θ) that starts from `restorer`."""
    torch.manual_seed(0)
    first_stage = IdentityAutoencoder()
    first_stage.set_latent_stats(torch.tensor([0.1, 0.0, -0.1]), torch.tensor([0.5, 0.6, 0.7]))
    return Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), first_stage,
                     CouplingFlowMatcher(source="posterior_mean", **flow), restorer.scale,
                     SamplerConfig(num_steps=num_steps), restorer)


@pytest.fixture
def tiny_restorer(tmp_path):
    return Restorer.load(write_rrdbnet(tmp_path / "weights" / "tiny_x4.safetensors"))


def test_rrdbnet_files_load_built_in_from_safetensors_and_basicsr_pth(tmp_path, generator):
    path = write_rrdbnet(tmp_path / "a.safetensors", num_block=2)
    restorer = Restorer.load(path)
    assert (restorer.scale, restorer.architecture, restorer.name) == (4, "RRDBNet", "a.safetensors")
    assert len(restorer.model.body) == 2 and restorer.model.conv_first.out_channels == 8  # read from the keys
    state = {k: v.clone() for k, v in restorer.model.state_dict().items()}
    torch.save({"params_ema": state}, tmp_path / "a.pth")  # basicsr's checkpoint layout
    lr = torch.rand(2, 3, 9, 7, generator=generator) * 2 - 1
    out = restorer(lr)
    assert out.shape == (2, 3, 36, 28) and out.abs().max() <= 1
    torch.testing.assert_close(Restorer.load(tmp_path / "a.pth")(lr), out)
    torch.testing.assert_close(out, run_tiled(restorer.model, lr, 4, tile=4, tile_overlap=8))  # overlap ≥ field
    assert Restorer.load(tmp_path / "a.pth").sha256 != restorer.sha256  # the file's bytes, not the weights
    record = restorer.record()
    assert record["file"] == "a.safetensors" and record["sha256"] == restorer.sha256 and record["scale"] == 4


def test_an_unknown_architecture_says_how_to_read_it(tmp_path):
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="odd.safetensors"):
        Restorer.load(tmp_path / "odd.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Restorer.load(tmp_path / "missing.safetensors")


def test_find_returns_the_recorded_file_and_refuses_other_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("FMBOOST_SHARED", str(tmp_path / "no_shared"))
    monkeypatch.chdir(tmp_path)
    original = Restorer.load(write_rrdbnet(tmp_path / "w" / "x4.safetensors"))
    record = original.record()
    assert Restorer.find(record).sha256 == original.sha256  # the recorded path
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "w" / "x4.safetensors").rename(moved / "x4.safetensors")
    with pytest.raises(FileNotFoundError, match=r"x4.safetensors \(sha256 .*not found in"):
        Restorer.find(record)
    monkeypatch.setenv("FMBOOST_RESTORERS", str(moved))
    assert Restorer.find(record).path == moved / "x4.safetensors"
    write_rrdbnet(moved / "x4.safetensors", seed=1)  # same name, other weights
    with pytest.raises(ValueError, match="differ from the ones this folder was trained with"):
        Restorer.find(record)
    with pytest.raises(ValueError, match="differ"):
        Restorer.find(record, path=moved / "x4.safetensors")


def test_detail_zero_is_the_restorer_image_and_projection_can_pull_toward_it(tiny_restorer, generator):
    upsampler = restorer_flow(tiny_restorer)
    lr = torch.rand(2, 3, 10, 12, generator=generator) * 2 - 1
    restored = tiny_restorer(lr)
    estimate = upsampler.upscale(lr, torch.Generator().manual_seed(0), detail=0.0)
    assert estimate.nfe == 1  # the restorer's pass, no flow
    torch.testing.assert_close(estimate.image, restored)
    projected = upsampler.upscale(lr, detail=0.0, back_project=2)
    torch.testing.assert_close(projected.image, back_project(restored, lr, 2))
    # onto the restorer's own reduction its image is (nearly) a fixed point; the flow's image is pulled toward it
    anchor = downsample(restored, (10, 12)).clamp(-1, 1)
    onto_estimate = upsampler.upscale(lr, detail=0.0, back_project=2, anchor="estimate")
    torch.testing.assert_close(onto_estimate.image, back_project(restored, anchor, 2))
    full = upsampler.upscale(lr, torch.Generator().manual_seed(0))
    assert full.nfe == 1 + 2
    pulled = upsampler.upscale(lr, torch.Generator().manual_seed(0), back_project=4, anchor="estimate")
    distance = [(downsample(x, (10, 12)) - anchor).abs().mean() for x in (full.image, pulled.image)]
    assert distance[1] < 0.5 * distance[0]
    with pytest.raises(ValueError, match="anchor 'estimate'"):
        dataclasses.replace(upsampler, estimate=None, flow=CouplingFlowMatcher()).upscale(
            lr, back_project=1, anchor="estimate")


@pytest.mark.parametrize("condition_on", ["input", "estimate"])
def test_the_flow_starts_from_the_restorer_latent_and_sees_what_it_is_conditioned_on(tiny_restorer, condition_on,
                                                                                    generator):
    upsampler = restorer_flow(tiny_restorer, condition_on=condition_on,
                              posterior_mean_sigma=0.0)
    seen = []
    upsampler.model.register_forward_hook(lambda module, args, out: seen.append(args[2].clone()))
    lr = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    upsampler.upscale(lr, torch.Generator().manual_seed(0))
    canvas = upsampler.canvas(lr)
    restored_latent = upsampler.first_stage.encode(canvas.pad(tiny_restorer(lr)))
    expected = restored_latent if condition_on == "estimate" else upsampler._condition(canvas.image)
    torch.testing.assert_close(seen[0], expected)
    assert not torch.allclose(restored_latent, upsampler._condition(canvas.image))  # the two choices differ


def test_a_folder_records_the_restorer_and_reloads_only_with_the_same_file(tiny_restorer, tmp_path, generator,
                                                                          monkeypatch):
    monkeypatch.setenv("FMBOOST_SHARED", str(tmp_path / "no_shared"))
    upsampler = restorer_flow(tiny_restorer)
    upsampler.sampler = upsampler.sampler.replace(back_project=2, anchor="estimate", detail=0.5)
    upsampler.save_pretrained(tmp_path / "folder")
    config = json.loads((tmp_path / "folder" / BOOST_CONFIG_NAME).read_text())
    assert config["restorer"]["sha256"] == tiny_restorer.sha256 and config["sampler"]["anchor"] == "estimate"
    assert not (tmp_path / "folder" / "posterior_mean").exists()  # the weights are found again, not copied
    lr = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    expected = upsampler.upscale(lr, torch.Generator().manual_seed(3)).image
    reloaded = Upsampler.from_pretrained(tmp_path / "folder")
    assert reloaded.restorer.sha256 == tiny_restorer.sha256 and reloaded.sampler == upsampler.sampler
    torch.testing.assert_close(reloaded.upscale(lr, torch.Generator().manual_seed(3)).image, expected,
                               atol=1e-5, rtol=0)
    other = Restorer.load(write_rrdbnet(tmp_path / "other.safetensors", seed=5))
    with pytest.raises(ValueError, match="is not the one"):
        Upsampler.from_pretrained(tmp_path / "folder", restorer=other)
    write_rrdbnet(tiny_restorer.path, seed=7)  # the weights file changed on disk
    with pytest.raises(ValueError, match="differ from the ones this folder was trained with"):
        Upsampler.from_pretrained(tmp_path / "folder")


def test_tiled_canvases_run_the_restorer_once_on_the_whole_input(tiny_restorer, generator):
    upsampler = restorer_flow(tiny_restorer)
    lr = torch.rand(1, 3, 24, 20, generator=generator) * 2 - 1
    tiled = upsampler.upscale(lr, torch.Generator().manual_seed(0), tile_size=32, detail=0.0)
    assert tiled.tiles > 1
    torch.testing.assert_close(tiled.image, tiny_restorer(lr))
    assert upsampler.upscale(lr, torch.Generator().manual_seed(0), tile_size=32).image.shape == (1, 3, 96, 80)


def test_shared_realesrgan_as_a_restorer_equals_the_built_in_baseline():
    path = require_shared(REALESRGAN_SHARED_PATH)
    restorer = realesrgan_restorer(path)
    assert (restorer.architecture, restorer.scale, restorer.name) == ("RRDBNet", 4, path.name)
    lr = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    from fmboost.models.realesrgan import load_realesrgan

    torch.testing.assert_close(restorer(lr), realesrgan_upscale(load_realesrgan(path), lr), atol=0, rtol=0)


def test_spandrel_reads_the_shared_realesrgan_like_the_built_in_network():
    path = require_shared(REALESRGAN_SHARED_PATH)
    try:
        import spandrel
    except Exception as err:  # not installed, or torchvision failing to import beside this torch
        pytest.skip(f"spandrel does not import here ({type(err).__name__}: {err}); the optional extra "
                    "fmboost[restorers] needs a torchvision built for the installed torch")
    descriptor = spandrel.ModelLoader().load_from_file(str(path))
    assert descriptor.scale == 4
    built_in = realesrgan_restorer(path)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    theirs = run_tiled(descriptor.model.float().eval(), lr, descriptor.scale)
    torch.testing.assert_close(theirs, built_in(lr), atol=1e-6, rtol=0)
