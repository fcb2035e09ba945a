"""`fmboost calibrate-detail` and eval-sr's per-band dial, on tiny random posterior-mean upsamplers."""

import json

import pytest
import torch
from fmboost.models import BOOST_CONFIG_NAME, CFMUNet, CouplingFlowMatcher, IdentityAutoencoder, Upsampler
from fmboost.models.detail_bands import DetailCalibration
from fmboost.models.posterior_mean import PosteriorMean
from fmboost.pipelines.cli import main

from .test_pairs import write_images
from .test_super_resolution import MISSING, tiny_upsampler


@pytest.fixture
def pm_folder(tmp_path):
    write_images(tmp_path / "images", [(64, 64), (80, 72)])
    regression = tiny_upsampler("regression", seed=1)
    torch.manual_seed(3)
    Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), IdentityAutoencoder(),
              CouplingFlowMatcher(source="posterior_mean", posterior_mean_sigma=0.5), scale=4,
              posterior_mean=PosteriorMean.from_upsampler(regression)).save_pretrained(tmp_path / "pm")
    tiny_upsampler("cfm").save_pretrained(tmp_path / "cfm")
    return tmp_path


def calibrate(folder, upsampler, *extra):
    return main(["calibrate-detail", str(folder / upsampler), "--data", str(folder / "images"), "--hr-size", "64",
                 "--lr-size", "16", *extra])


def test_calibrate_detail_writes_the_fit_into_the_folder_or_a_copy(pm_folder, capsys):
    assert calibrate(pm_folder, "pm", "--out", str(pm_folder / "pm_cal"), "--edges", "1,2", "--path", "uniform") == 0
    out = capsys.readouterr().out
    assert out.count("band [") == 3 and "fitted on 2 images" in out
    calibrated = Upsampler.from_pretrained(pm_folder / "pm_cal")
    assert calibrated.detail_calibration.edges == (1.0, 2.0)
    assert all(0.0 <= w <= 1.0 for w in calibrated.detail_calibration.weights)
    assert "detail_calibration" not in json.loads((pm_folder / "pm" / BOOST_CONFIG_NAME).read_text())
    assert calibrated.detail_calibration.spans is None  # --path uniform: all bands together
    assert calibrate(pm_folder, "pm", "--path", "uniform") == 0  # in place: only boost_config.json changes
    assert Upsampler.from_pretrained(pm_folder / "pm").detail_calibration is not None


def test_calibrate_detail_orders_the_bands_by_measured_lpips(pm_folder, lpips_file, capsys):
    assert calibrate(pm_folder, "pm", "--out", str(pm_folder / "pm_path"), "--edges", "1,2", "--lpips",
                     str(lpips_file), "--back-project", "2") == 0
    out = capsys.readouterr().out
    assert out.count("ramps over detail [") == 3
    spans = Upsampler.from_pretrained(pm_folder / "pm_path").detail_calibration.spans
    assert sorted(spans)[0][0] == 0.0 and sorted(spans)[-1][1] == 1.0
    assert all(a[1] == pytest.approx(b[0]) for a, b in zip(sorted(spans), sorted(spans)[1:]))  # they tile [0, 1]


def test_calibrate_detail_measures_the_samples_of_the_sampler_it_saves(pm_folder, capsys):
    """--sampler: the fit is made on that sampler's samples (other weights than the saved sampler's), and the
    folder keeps it as its default, with the saved detail."""
    folder = pm_folder / "pm"
    config = json.loads((folder / BOOST_CONFIG_NAME).read_text())
    config["sampler"]["detail"] = 0.5
    (folder / BOOST_CONFIG_NAME).write_text(json.dumps(config))
    weights = {}
    for name, extra in (("saved", ()), ("euler4", ("--sampler", "euler:cosine:4"))):
        assert calibrate(pm_folder, "pm", "--out", str(pm_folder / name), "--path", "uniform", *extra) == 0
        upsampler = Upsampler.from_pretrained(pm_folder / name)
        weights[name] = upsampler.detail_calibration.weights
    assert f"samples of {upsampler.sampler.format()}" in capsys.readouterr().out
    assert upsampler.sampler.format() == "euler:cosine:4" and upsampler.sampler.detail == 0.5
    assert weights["saved"] != weights["euler4"]
    assert calibrate(pm_folder, "pm", "--sampler", "euler:4") == 2
    assert "expected solver:schedule" in capsys.readouterr().err


def test_calibrate_detail_refuses_what_it_cannot_fit(pm_folder, capsys):
    assert calibrate(pm_folder, "cfm") == 2
    assert "not a posterior-mean upsampler" in capsys.readouterr().err
    assert main(["calibrate-detail", str(pm_folder / "pm"), "--data", str(pm_folder / "images"), "--hr-size", "64",
                 "--lr-size", "32"]) == 2
    assert "the upsampler's scale is 4" in capsys.readouterr().err
    assert calibrate(pm_folder, "pm", "--edges", "2,1", "--path", "uniform") == 2
    assert "increasing" in capsys.readouterr().err
    assert calibrate(pm_folder, "pm", "--lpips", MISSING) == 2
    assert "--path lpips needs the LPIPS weights" in capsys.readouterr().err
    assert calibrate(pm_folder, "pm", "--path", "uniform", "--back-project", "-1") == 2
    assert "--back-project must be ≥ 0" in capsys.readouterr().err


def eval_calibrated(folder, name: str, calibration: DetailCalibration, detail: str) -> dict:
    """eval-sr's results.json for the pm folder saved with `calibration` (as NAME) beside it as it is ('plain')."""
    upsampler = Upsampler.from_pretrained(folder / "pm")
    upsampler.detail_calibration = calibration
    upsampler.save_pretrained(folder / name)
    assert main(["eval-sr", "--data", str(folder / "images"), "--upsampler", f"{name}={folder / name}",
                 "--upsampler", f"plain={folder / 'pm'}", "--sampler", "euler:linear:2", "--detail", detail,
                 "--baselines", "bicubic", "--out", str(folder / "out"), "--hr-size", "64", "--lr-size", "16",
                 "--no-fid", "--lpips-weights", MISSING]) == 0
    return json.loads((folder / "out" / "results.json").read_text())


def test_eval_sr_sweeps_the_calibrated_dial_from_one_sample_per_image(pm_folder):
    results = eval_calibrated(pm_folder, "cal", DetailCalibration((1.0,), (0.0, 0.5)), "0,0.5,1")
    cal = [results[f"CFM[cal] euler:linear:2 · detail {d}"] for d in ("0", "0.5", "1")]
    plain = [results[f"CFM[plain] euler:linear:2 · detail {d}"] for d in ("0", "0.5", "1")]
    assert [r["nfe"] for r in cal] == [3, 3, 3] and plain[0]["nfe"] == 1  # the calibrated estimate needs the sample
    assert cal[2]["psnr"] == pytest.approx(plain[2]["psnr"])  # detail 1: the same sample
    assert cal[1]["psnr"] != pytest.approx(plain[1]["psnr"])  # in between: per band, not the latent blend


def test_calibrate_detail_with_two_samples_weighs_consistent_and_random_detail(pm_folder, capsys):
    assert calibrate(pm_folder, "pm", "--out", str(pm_folder / "pm_pair"), "--edges", "1,2", "--path", "uniform",
                     "--samples", "2") == 0
    out = capsys.readouterr().out
    assert out.count("consistent band [") == 3 and out.count("random band [") == 3
    calibration = Upsampler.from_pretrained(pm_folder / "pm_pair").detail_calibration
    assert calibration.samples == 2 and len(calibration.weights) == 6 and calibration.weights[3:] == (0.0,) * 3
    with pytest.raises(SystemExit):
        calibrate(pm_folder, "pm", "--samples", "3")
    assert "--samples: invalid choice: 3" in capsys.readouterr().err


def test_eval_sr_counts_both_samples_of_a_two_sample_dial(pm_folder):
    results = eval_calibrated(pm_folder, "pair", DetailCalibration((1.0,), (0.0, 0.5, 0.0, 0.0), samples=2), "0.5,1")
    pair = [results[f"CFM[pair] euler:linear:2 · detail {d}"] for d in ("0.5", "1")]
    plain = results["CFM[plain] euler:linear:2 · detail 1"]
    assert pair[0]["nfe"] == 5 and pair[1]["nfe"] == 3  # two samples of 2 steps and R; detail 1: one sample
    assert pair[1]["psnr"] == pytest.approx(plain["psnr"])  # detail 1: the first sample, the 1-sample one
