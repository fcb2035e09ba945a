"""A folder built on the shared Real-ESRGAN weights: trained a few steps, saved, reloaded, and rendered by
`fmboost upscale`, `BoostPipeline` and the page to the image `fmboost eval-sr` scored; the same weights file is an
eval-sr baseline row (`--baseline NAME=FILE`) equal to the built-in Real-ESRGAN row."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from fmboost.eval.super_resolution import method_folder
from fmboost.models import Upsampler
from fmboost.models.realesrgan import REALESRGAN_SHARED_PATH
from fmboost.pipelines import BoostPipeline
from fmboost.pipelines.cli import main
from fmboost.train.cfm_upsampler import train
from fmboost.train.config import load_config
from fmboost.train.sample_photos import load_sample_photos

from ..conftest import require_shared
from ..train.conftest import TINY, write_images
from .test_one_render_path import psnr_8bit, serve_upscale

HR, LR = 64, 16
PHOTOS = ["coffee", "astronaut"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    weights = require_shared(REALESRGAN_SHARED_PATH)
    root = tmp_path_factory.mktemp("restorer_render_path")
    config = load_config(None, {**TINY, "train_data_dir": str(write_images(root / "train", size=32)),
                                "resolution": 32, "crop_size": 32, "max_train_steps": 2, "source": "posterior_mean",
                                "restorer": str(weights), "output_dir": str(root / "run"), "validation_steps": 100})
    folder = train(config)
    data = root / "photos"
    data.mkdir()
    for name, photo in load_sample_photos(PHOTOS).items():
        photo.resize((96, 80), PIL.Image.LANCZOS).save(data / f"{name}.png")
    out = root / "eval"
    assert main(["eval-sr", "--data", str(data), "--upsampler", f"pm={folder}", "--hr-size", str(HR), "--lr-size",
                 str(LR), "--no-fid", "--save-images", "--baselines", "bicubic,realesrgan",
                 "--baseline", f"x4plus={weights}", "-o", str(out)]) == 0
    return folder, out, json.loads((out / "results.json").read_text())


def test_the_restorer_file_is_a_baseline_row_equal_to_real_esrgan(evaluated):
    _, _, results = evaluated
    ours, builtin = results["x4plus · BP0"], results["Real-ESRGAN · BP0"]
    assert ours["psnr"] == pytest.approx(builtin["psnr"]) and ours["lpips"] == pytest.approx(builtin["lpips"])


def test_upscale_pipeline_and_page_render_the_image_eval_sr_scored(evaluated, tmp_path):
    folder, out, results = evaluated
    upsampler = Upsampler.from_pretrained(folder)
    assert upsampler.restorer is not None and upsampler.restorer.name == "RealESRGAN_x4plus_fp16.safetensors"
    default = results["defaults"]["pm"]  # the folder at its saved settings
    pipe = BoostPipeline.from_upsampler(upsampler)
    pipe.set_progress_bar_config(disable=True)
    low_res = sorted((out / "images" / "low-res").glob("*.png"))
    assert len(low_res) == len(PHOTOS)
    for seed, path in enumerate(low_res):
        scored = np.asarray(PIL.Image.open(out / "images" / method_folder(default) / path.name))
        written = tmp_path / f"{path.stem}_x4.png"
        assert main(["upscale", str(path), "-o", str(written), "--upsampler", str(folder), "--seed", str(seed)]) == 0
        assert psnr_8bit(np.asarray(PIL.Image.open(written)), scored) >= 50
        piped = pipe(image=PIL.Image.open(path), generator=torch.Generator().manual_seed(seed)).images[0]
        assert psnr_8bit(np.asarray(piped), scored) >= 50
        restorer_only = np.asarray(PIL.Image.open(out / "images" / method_folder("Real-ESRGAN · BP0") / path.name))
        assert psnr_8bit(restorer_only, scored) < 50  # the comparison can fail: the flow's image is another one
    # saved as a diffusers pipeline, it finds the weights file again from its record
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = BoostPipeline.from_pretrained(tmp_path / "pipe")
    assert reloaded.upsampler.restorer.sha256 == upsampler.restorer.sha256


def test_the_page_serves_the_folder(evaluated):
    folder, out, results = evaluated
    default = results["defaults"]["pm"]
    path = sorted((out / "images" / "low-res").glob("*.png"))[0]
    served = serve_upscale(folder, PIL.Image.open(path), 0)
    if served is None:
        pytest.skip("gradio is not installed: the page cannot be built")
    scored = np.asarray(PIL.Image.open(out / "images" / method_folder(default) / path.name))
    assert psnr_8bit(np.asarray(served), scored) >= 50
    from fmboost.pipelines.serve import BoostService

    service = BoostService.load(str(folder))
    own = "restorer: RealESRGAN_x4plus_fp16.safetensors"
    assert service.references == ("bicubic", "Real-ESRGAN", own)  # the folder's own restorer: its detail 0
    image = PIL.Image.open(path).convert("RGB")
    theirs = np.asarray(service.reference(image, "Real-ESRGAN"))
    assert np.array_equal(np.asarray(service.reference(image, own)), theirs)


def test_eval_sr_scores_projection_onto_the_restorer_image(evaluated, tmp_path, capsys):
    folder, out, _ = evaluated
    data = out.parent / "photos"
    assert main(["eval-sr", "--data", str(data), "--upsampler", f"pm={folder}", "--hr-size", str(HR), "--lr-size",
                 str(LR), "--no-fid", "--baselines", "realesrgan", "--detail", "0", "--back-project", "0,1",
                 "--anchor", "input,estimate", "-o", str(tmp_path / "anchors")]) == 0
    results = json.loads((tmp_path / "anchors" / "results.json").read_text())
    rows = {name for name in results if name.startswith("CFM")}
    assert {name.split(" · ")[-1] for name in rows} == {"BP0", "BP1", "BP1 onto estimate"}
    onto_estimate = next(results[name] for name in rows if name.endswith("BP1 onto estimate"))
    # at detail 0 the image is the restorer's, which projecting onto its own reduction leaves as it is
    assert onto_estimate["psnr"] == pytest.approx(results["Real-ESRGAN · BP0"]["psnr"], abs=0.05)
    onto_input = next(results[name] for name in rows if name.endswith("BP1"))
    assert onto_input["psnr"] == pytest.approx(results["Real-ESRGAN · BP1"]["psnr"], abs=0.05)
    bad = ["--back-project", "1", "--anchor", "sideways", "-o", str(tmp_path / "bad")]
    assert main(["eval-sr", "--data", str(data), "--upsampler", str(folder), "--hr-size", str(HR), "--lr-size",
                 str(LR), "--no-fid", *bad]) == 2
    assert "--anchor ['sideways']: choose from ['input', 'estimate']" in capsys.readouterr().err
