"""What eval-sr scores is what users get: one render path from `fmboost upscale` to the results table.

A small posterior-mean upsampler with a calibrated dial and a measured back-projection setting is evaluated by
`fmboost eval-sr --save-images` on real photos; the image scored for the folder's default row must be the image
`fmboost upscale`, `BoostPipeline(image=...)` and the serve page's `/upscale` event make from the saved low-res
PNG with the same seed — identical up to 8-bit image files (≥ 50 dB).
"""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from fmboost.eval.super_resolution import method_folder
from fmboost.models import Upsampler
from fmboost.models.calibration import calibrate
from fmboost.pipelines import BoostPipeline
from fmboost.pipelines.cli import main
from fmboost.train.sample_photos import load_sample_photos

from ..conftest import tiny_posterior_mean, tiny_regression

HR, LR = 64, 32
PHOTOS = ["coffee", "astronaut", "chelsea"]


def psnr_8bit(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(upsampler folder, eval-sr output folder, the default row's name) for a calibrated tiny PM flow."""
    root = tmp_path_factory.mktemp("render_path")
    data = root / "photos"
    data.mkdir()
    for name, photo in load_sample_photos(PHOTOS).items():
        photo.resize((96, 80), PIL.Image.LANCZOS).save(data / f"{name}.png")
    upsampler = tiny_posterior_mean(tiny_regression(), num_steps=2)
    upsampler.sampler = upsampler.sampler.replace(detail=0.5)  # the folder's default uses the dial
    held_out = [photo.resize((HR, HR), PIL.Image.LANCZOS)
                for photo in load_sample_photos(["rocket", "flower"]).values()]
    pairs = []
    for photo in held_out:
        hr = torch.from_numpy(np.asarray(photo, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        pairs.append((torch.nn.functional.interpolate(hr, size=(LR, LR), mode="bicubic", antialias=True), hr))
    result = calibrate(upsampler, pairs, candidates=(0, 2))
    assert result.back_project == 2 and upsampler.sampler.back_project == 2  # projection fixes an untrained model
    assert upsampler.detail_calibration.back_project == 2 and upsampler.detail_calibration.sampler == "euler:linear:2"
    upsampler.save_pretrained(root / "pm")
    out = root / "eval"
    assert main(["eval-sr", "--data", str(data), "--upsampler", str(root / "pm"), "--hr-size", str(HR),
                 "--lr-size", str(LR), "--no-fid", "--save-images", "-o", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    return root / "pm", out, results["defaults"]["pm"], results


def saved_pairs(out):
    """[(seed, low-res PNG path, the PNG eval-sr scored for the default row)] in evaluation order."""
    low_res = sorted((out / "images" / "low-res").glob("*.png"))
    assert [p.stem for p in low_res] == sorted(PHOTOS)
    return [(index, path) for index, path in enumerate(low_res)]


def test_eval_sr_rows_name_their_settings_and_the_defaults(evaluated):
    _, _, default, results = evaluated
    assert default == "CFM euler:linear:2 · detail 0.5 · BP2"
    assert set(results) == {"bilinear", "bicubic", default, "defaults"}  # pixel space: no latent baselines


def test_upscale_pipeline_and_serve_make_the_image_eval_sr_scored(evaluated, tmp_path):
    folder, out, default, _ = evaluated
    pipe = BoostPipeline.from_upsampler(Upsampler.from_pretrained(folder))
    pipe.set_progress_bar_config(disable=True)
    for seed, low_res in saved_pairs(out):
        scored = np.asarray(PIL.Image.open(out / "images" / method_folder(default) / low_res.name))
        written = tmp_path / f"{low_res.stem}_x2.png"
        assert main(["upscale", str(low_res), "-o", str(written), "--upsampler", str(folder),
                     "--seed", str(seed)]) == 0
        assert psnr_8bit(np.asarray(PIL.Image.open(written)), scored) >= 50
        piped = pipe(image=PIL.Image.open(low_res), generator=torch.Generator().manual_seed(seed)).images[0]
        assert psnr_8bit(np.asarray(piped), scored) >= 50
        served = serve_upscale(folder, PIL.Image.open(low_res), seed)
        if served is not None:
            assert psnr_8bit(np.asarray(served), scored) >= 50
        bicubic = np.asarray(PIL.Image.open(low_res).resize(scored.shape[1::-1], PIL.Image.BICUBIC))
        assert psnr_8bit(bicubic, scored) < 50  # the comparison can fail: another image is told apart


def serve_upscale(folder, image: PIL.Image.Image, seed: int) -> PIL.Image.Image | None:
    """The page's `/upscale` event at its default controls (None without Gradio: the event cannot be built)."""
    try:
        import gradio  # noqa: F401
        from fmboost.pipelines.serve import BoostService, build_app
    except ImportError:
        return None
    service = BoostService.load(str(folder))
    app = build_app(service)
    fns = app.fns.values() if isinstance(app.fns, dict) else app.fns
    upscale = next(f.fn for f in fns if f.api_name == "upscale")
    default = service.default_sampler
    (_, result), _, _ = upscale(image, default.solver, default.num_steps, default.detail, default.back_project, seed,
                                 "bicubic")
    return result
