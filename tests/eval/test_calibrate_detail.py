"""`fmboost calibrate-detail` (the folder's render settings: back-projection, and the per-band dial of posterior-mean
flows) and eval-sr's per-band dial, on tiny random upsamplers."""

import json
import re
import warnings

import pytest
import torch
from fmboost.eval.pairs import iter_pairs
from fmboost.models import BOOST_CONFIG_NAME, CFMUNet, CouplingFlowMatcher, IdentityAutoencoder, Upsampler
from fmboost.models import metrics as M
from fmboost.models.detail_bands import DetailCalibration
from fmboost.models.posterior_mean import PosteriorMean
from fmboost.pipelines.cli import main

from .test_pairs import write_images
from .test_super_resolution import MISSING, tiny_upsampler


@pytest.fixture
def pm_folder(tmp_path):
    write_images(tmp_path / "images", [(64, 64), (80, 72)])
    regression = tiny_upsampler("regression", seed=1)
    regression.save_pretrained(tmp_path / "regression")
    torch.manual_seed(3)
    Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), IdentityAutoencoder(),
              CouplingFlowMatcher(source="posterior_mean", posterior_mean_sigma=0.5), scale=4,
              posterior_mean=PosteriorMean.from_upsampler(regression)).save_pretrained(tmp_path / "pm")
    tiny_upsampler("cfm").save_pretrained(tmp_path / "cfm")
    return tmp_path


def calibrate(folder, upsampler, *extra):
    return main(["calibrate-detail", str(folder / upsampler), "--data", str(folder / "images"), "--hr-size", "64",
                 "--lr-size", "16", *extra])


def back_projection_scores(printed: str) -> tuple[dict[int, float], list[int]]:
    """The printed 'back-projection steps, …' line → ({steps: mean PSNR}, [the steps marked kept])."""
    line = next(line for line in printed.splitlines() if line.startswith("back-projection steps"))
    found = re.findall(r"(\d+): (-?[\d.]+) dB(?: / LPIPS [\d.]+)?( \(kept\))?", line)
    return {int(n): float(db) for n, db, _ in found}, [int(n) for n, _, kept in found if kept]


def save_sampler(folder, **changes) -> None:
    """Change the saved sampler of an upsampler folder in its boost_config.json."""
    config = json.loads((folder / BOOST_CONFIG_NAME).read_text())
    config["sampler"].update(changes)
    (folder / BOOST_CONFIG_NAME).write_text(json.dumps(config))


def test_calibrate_detail_writes_the_fit_into_the_folder_or_a_copy(pm_folder, capsys):
    assert calibrate(pm_folder, "pm", "-o", str(pm_folder / "pm_cal"), "--edges", "1,2", "--path", "uniform",
                     "--back-project", "0,3") == 0
    out = capsys.readouterr().out
    assert out.count("band [") == 3 and "fitted on 2 images" in out
    calibrated = Upsampler.from_pretrained(pm_folder / "pm_cal")
    calibration = calibrated.detail_calibration
    assert calibration.edges == (1.0, 2.0)
    assert all(0.0 <= w <= 1.0 for w in calibration.weights)
    assert calibration.spans is None  # --path uniform: all bands together
    # the dial records what it was measured with: the folder's sampler and its fitted back-projection
    scores, kept = back_projection_scores(out)
    assert list(scores) == [0, 3] and kept == [calibrated.sampler.back_project]
    assert calibration.sampler == calibrated.sampler.format() == "euler:linear:4"
    assert calibration.back_project == calibrated.sampler.back_project
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the folder's own settings are the dial's: no warning
        calibrated.settings(detail=0.5)
    with pytest.warns(UserWarning, match="the detail dial was fitted on euler:linear:4 samples"):
        calibrated.settings(detail=0.5, back_project=1 + calibrated.sampler.back_project)
    saved = json.loads((pm_folder / "pm" / BOOST_CONFIG_NAME).read_text())
    assert "detail_calibration" not in saved and saved["sampler"]["back_project"] == 0  # --out: a copy
    assert calibrate(pm_folder, "pm", "--path", "uniform") == 0  # in place: only boost_config.json changes
    assert Upsampler.from_pretrained(pm_folder / "pm").detail_calibration is not None


def test_calibrate_detail_picks_the_back_projection_of_a_regression_folder(pm_folder, capsys):
    """Any upsampler folder: the candidate with the best PSNR, the fewest steps within 0.01 dB of it, becomes its
    back_project; a regression folder gets no dial."""
    assert calibrate(pm_folder, "regression", "--back-project", "0,1,8,32", "--path", "uniform") == 0
    out = capsys.readouterr().out
    scores, kept = back_projection_scores(out)
    assert list(scores) == [0, 1, 8, 32]
    upsampler = Upsampler.from_pretrained(pm_folder / "regression")
    config = json.loads((pm_folder / "regression" / BOOST_CONFIG_NAME).read_text())
    assert kept == [upsampler.sampler.back_project] and "detail_calibration" not in config
    assert f"wrote back_project {kept[0]} to" in out and "band [" not in out
    # the PSNRs, measured here on the same pairs through `upscale`
    pairs = list(iter_pairs([pm_folder / "images"], 64, 16))
    psnr = {n: sum(M.psnr((upsampler.upscale(p.lr[None], back_project=n).image + 1) / 2, (p.hr[None] + 1) / 2).item()
                   for p in pairs) / len(pairs) for n in scores}
    for n, value in psnr.items():
        assert scores[n] == pytest.approx(value, abs=0.006)
    best = max(psnr.values())
    assert kept[0] == min(n for n in psnr if psnr[n] >= best - 0.01)
    assert kept[0] == 8  # on these images 32 steps add nothing over 8 (and 1 is 0.1 dB short)


def test_calibrate_detail_measures_the_samples_of_the_sampler_it_saves(pm_folder, capsys):
    """The fit is made on the folder's saved sampler's samples (other weights than another sampler's), and the
    folder keeps that sampler and its detail."""
    folder = pm_folder / "pm"
    save_sampler(folder, detail=0.5)
    weights = {}
    for name, schedule in (("linear", "linear"), ("cosine", "cosine")):
        save_sampler(folder, schedule=schedule)
        assert calibrate(pm_folder, "pm", "-o", str(pm_folder / name), "--path", "uniform") == 0
        upsampler = Upsampler.from_pretrained(pm_folder / name)
        weights[name] = upsampler.detail_calibration.weights
        assert upsampler.sampler.format() == upsampler.detail_calibration.sampler == f"euler:{schedule}:4"
        assert upsampler.sampler.detail == 0.5
        assert f"rendered with euler:{schedule}:4" in capsys.readouterr().out
    assert weights["linear"] != weights["cosine"]


def test_calibrate_detail_orders_the_bands_by_measured_lpips(pm_folder, lpips_file, capsys):
    assert calibrate(pm_folder, "pm", "-o", str(pm_folder / "pm_path"), "--edges", "1,2", "--lpips-weights",
                     str(lpips_file), "--back-project", "2") == 0
    out = capsys.readouterr().out
    assert out.count("ramps over detail [") == 3 and "2: " in out and "/ LPIPS " in out
    calibrated = Upsampler.from_pretrained(pm_folder / "pm_path")
    spans = calibrated.detail_calibration.spans
    assert sorted(spans)[0][0] == 0.0 and sorted(spans)[-1][1] == 1.0
    assert all(a[1] == pytest.approx(b[0]) for a, b in zip(sorted(spans), sorted(spans)[1:]))  # they tile [0, 1]
    assert calibrated.sampler.back_project == calibrated.detail_calibration.back_project == 2  # the only candidate


def test_calibrate_detail_refuses_what_it_cannot_fit(pm_folder, capsys):
    assert main(["calibrate-detail", str(pm_folder / "pm"), "--data", str(pm_folder / "images"), "--hr-size", "64",
                 "--lr-size", "32"]) == 2
    assert "the upsampler's scale is 4" in capsys.readouterr().err
    assert calibrate(pm_folder, "pm", "--edges", "2,1", "--path", "uniform") == 2
    assert "increasing" in capsys.readouterr().err
    assert calibrate(pm_folder, "pm", "--lpips-weights", MISSING) == 2
    assert "--path lpips needs the LPIPS weights" in capsys.readouterr().err
    assert calibrate(pm_folder, "pm", "--path", "uniform", "--back-project", "-1") == 2
    assert "candidates must be ints >= 0, got [-1]" in capsys.readouterr().err
    assert calibrate(pm_folder, "pm", "--path", "uniform", "--back-project", "two") == 2
    assert "--back-project takes comma-separated integers" in capsys.readouterr().err
    # a plain CFM folder has no dial to fit, but its back-projection is fitted
    assert calibrate(pm_folder, "cfm", "--path", "uniform", "--back-project", "3") == 0
    assert "and the detail dial" not in capsys.readouterr().out
    cfm = Upsampler.from_pretrained(pm_folder / "cfm")
    assert cfm.sampler.back_project == 3 and cfm.detail_calibration is None


def eval_calibrated(folder, name: str, calibration: DetailCalibration, detail: str) -> dict:
    """eval-sr's results.json for the pm folder saved with `calibration` (as NAME) beside it as it is ('plain')."""
    upsampler = Upsampler.from_pretrained(folder / "pm")
    upsampler.detail_calibration = calibration
    upsampler.save_pretrained(folder / name)
    assert main(["eval-sr", "--data", str(folder / "images"), "--upsampler", f"{name}={folder / name}",
                 "--upsampler", f"plain={folder / 'pm'}", "--sampler", "euler:linear:2", "--detail", detail,
                 "--baselines", "bicubic", "-o", str(folder / "out"), "--hr-size", "64", "--lr-size", "16",
                 "--no-fid", "--lpips-weights", MISSING]) == 0
    return json.loads((folder / "out" / "results.json").read_text())


def test_eval_sr_sweeps_the_calibrated_dial_from_one_sample_per_image(pm_folder):
    results = eval_calibrated(pm_folder, "cal", DetailCalibration((1.0,), (0.0, 0.5)), "0,0.5,1")
    cal = [results[f"CFM[cal] euler:linear:2 · detail {d} · BP0"] for d in ("0", "0.5", "1")]
    plain = [results[f"CFM[plain] euler:linear:2 · detail {d} · BP0"] for d in ("0", "0.5", "1")]
    assert [r["nfe"] for r in cal] == [3, 3, 3] and plain[0]["nfe"] == 1  # the calibrated estimate needs the sample
    assert cal[2]["psnr"] == pytest.approx(plain[2]["psnr"])  # detail 1: the same sample
    assert cal[1]["psnr"] != pytest.approx(plain[1]["psnr"])  # in between: per band, not the latent blend
