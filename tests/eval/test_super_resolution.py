"""`fmboost eval-sr` and its recipe on tiny random upsamplers (pixel space, 32² / 64² images)."""

import json
import math

import numpy as np
import pytest
import torch
from fmboost.eval.baselines import (
    LATENT_BASELINES,
    InputMemo,
    MethodOutput,
    default_baselines,
    load_regression,
    psu_source,
    upsampler_method,
)
from fmboost.eval.cli_eval_sr import curve_label, model_rows
from fmboost.eval.pairs import iter_pairs, load_image
from fmboost.eval.super_resolution import MetricNetworks, evaluate, markdown_table, method_folder, study_samplers
from fmboost.models import CFMUNet, CouplingFlowMatcher, FirstStage, IdentityAutoencoder, SamplerConfig, Upsampler
from fmboost.models.assets import shared_path
from fmboost.pipelines.cli import build_parser, main
from PIL import Image

from .test_pairs import write_images

MISSING = "/nonexistent/weights.pth"
FAST_DOPRI5 = "dopri5:atol=0.001,rtol=0.01"  # random tiny models are stiff; loose tolerances keep tests fast


def tiny_upsampler(objective="cfm", seed=0):
    torch.manual_seed(seed)
    model = CFMUNet.from_preset("tiny", latent_channels=3).eval()
    return Upsampler(model, IdentityAutoencoder(), CouplingFlowMatcher(objective=objective), scale=4)


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Three small images, a CFM upsampler and a regression upsampler saved to tmp_path. Real-ESRGAN, a default
    baseline at ×4 where $FMBOOST_SHARED has its weights, is left out so that these runs do not depend on them."""
    monkeypatch.setattr("fmboost.models.realesrgan.default_realesrgan_path", lambda: None)
    write_images(tmp_path / "images", [(80, 72), (64, 64), (96, 64)])
    tiny_upsampler("cfm").save_pretrained(tmp_path / "cfm")
    tiny_upsampler("regression", seed=1).save_pretrained(tmp_path / "regression")
    return tmp_path


def lpips_args():
    """Real LPIPS weights when $FMBOOST_SHARED has them, so the end-to-end run covers LPIPS too."""
    path = shared_path("weights/lpips/lpips_alex_v0.1_full_state_dict.pth")
    return ["--lpips-weights", str(path)] if path else ["--lpips-weights", MISSING]


def eval_sr(folders, *extra, size=("64", "16")):
    return main(["eval-sr", "--data", str(folders / "images"), "--upsampler", str(folders / "cfm"),
                 "-o", str(folders / "out"), "--hr-size", size[0], "--lr-size", size[1], *extra])


def read_results(folders) -> tuple[dict, dict]:
    """results.json of the last run: ({row: {metric: mean}}, its "defaults")."""
    results = json.loads((folders / "out" / "results.json").read_text())
    defaults = results.pop("defaults")
    return results, defaults


def test_cli_end_to_end(folders, capsys):
    code = eval_sr(folders, "--regression", str(folders / "regression"), "--sampler", "euler:linear:2",
                   "--sampler", "euler:logit_normal:mu=0.5,std=1:3", "--sampler", FAST_DOPRI5,
                   "--inception", MISSING, *lpips_args())
    assert code == 0
    out = folders / "out"
    results, defaults = read_results(folders)
    cfm = ["CFM euler:linear:2 · BP0", "CFM euler:logit_normal:mu=0.5,std=1:3 · BP0", f"CFM {FAST_DOPRI5} · BP0"]
    # pixel space: no latent baselines; the reference runs first but is reported in the given order
    assert list(results) == ["bilinear", "bicubic", *cfm, "regression · BP0"]
    assert defaults == {"regression": "regression · BP0"}  # the CFM folder's saved euler:linear:4 was not asked for
    for name, rows in results.items():
        for key in ("psnr", "ssim", "psnr_y", "ssim_y", "nfe", "seconds_per_image"):
            assert math.isfinite(rows[key]), (name, key)
    assert [results[m]["nfe"] for m in cfm[:2]] == [2, 3] and results[cfm[2]]["nfe"] > 3
    assert results["regression · BP0"]["nfe"] == 1 and results["bicubic"]["nfe"] == 0
    assert results[cfm[2]]["dist_to_reference"] == 0 and results[cfm[0]]["dist_to_reference"] > 0
    assert "dist_to_reference" not in results["bicubic"] and "fid" not in results["bicubic"]
    table = (out / "results.md").read_text()
    assert "| CFM euler:linear:2 · BP0 |" in table and "fid skipped" in table and "3 images" in table
    for name in ("grid.png", "nfe_curve.png"):
        assert (out / name).stat().st_size > 10_000
    assert len(json.loads((out / "per_image.json").read_text())["bicubic"]["psnr"]) == 3
    assert "| bicubic |" in capsys.readouterr().out
    assert not (out / "images").exists()  # only with --save-images


def test_unavailable_metrics_are_skipped_with_a_reason(folders, capsys):
    assert eval_sr(folders, "--sampler", "euler:linear:1", "--lpips-weights", MISSING, "--inception", MISSING,
                   "--max-images", "2") == 0
    printed = capsys.readouterr().out
    assert f"lpips skipped: LPIPS weights not found at {MISSING}" in printed
    assert f"fid skipped: FID Inception weights not found at {MISSING}" in printed
    results, _ = read_results(folders)
    for rows in results.values():
        assert "lpips" not in rows and "fid" not in rows and math.isfinite(rows["ssim"])
    assert "lpips skipped" in (folders / "out" / "results.md").read_text()


def test_fid_and_patch_fid_with_a_stand_in_feature_network(folders):
    """The FID path end to end; a pooled-colour network stands in for Inception (input 299², any features)."""
    stand_in = torch.nn.Sequential(torch.nn.AvgPool2d(23), torch.nn.Flatten(), torch.nn.Linear(3 * 13 * 13, 16))
    networks = MetricNetworks(inception=stand_in)
    exact = lambda lr, hr, g: MethodOutput(hr)
    grey = lambda lr, hr, g: MethodOutput(hr * 0)
    pairs = iter_pairs([folders / "images"], 64, 16)
    evaluation = evaluate(pairs, {"exact": exact, "grey": grey}, 4, networks)
    exact, grey = evaluation.results["exact"], evaluation.results["grey"]
    assert abs(exact["fid"]) < 1e-6 and abs(exact["patch_fid"]) < 1e-6
    assert grey["fid"] > 1e-3 and grey["patch_fid"] > 1e-3


def test_samplers_start_from_the_same_noise(folders):
    upsampler = Upsampler.from_pretrained(folders / "cfm")
    sampler = SamplerConfig.parse("euler:linear:2")
    methods = {"a": upsampler_method(upsampler, sampler=sampler), "b": upsampler_method(upsampler, sampler=sampler),
               "c": upsampler_method(upsampler, sampler=SamplerConfig.parse("euler:inverse_cubic:2"))}
    pairs = list(iter_pairs([folders / "images"], 64, 16))
    evaluation = evaluate(pairs, methods, 4, MetricNetworks(), seed=3, reference="a")
    for a, b in zip(evaluation.grid["a"], evaluation.grid["b"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert evaluation.per_image["b"]["dist_to_reference"] == [0.0, 0.0, 0.0]
    # the distance to the reference is the pixel MSE between the images made from the same noise
    for index, image in enumerate(evaluation.grid["c"]):
        expected = (image - evaluation.grid["a"][index]).pow(2).mean().item()
        assert evaluation.per_image["c"]["dist_to_reference"][index] == pytest.approx(expected) and expected > 0
    # a different seed draws different noise
    other = evaluate(pairs[:1], {"a": methods["a"]}, 4, MetricNetworks(), seed=4)
    assert not torch.equal(other.grid["a"][0], evaluation.grid["a"][0])


def test_schedule_study(folders):
    assert eval_sr(folders, "--study", "schedules", "--study-nfe", "1,2", "--study-reference", FAST_DOPRI5,
                   "--max-images", "2", "--lpips-weights", MISSING, "--inception", MISSING,
                   size=("32", "8")) == 0
    results, _ = read_results(folders)
    cfm = [name for name in results if name.startswith("CFM")]
    assert len(cfm) == 8 * 2 + 1  # 5 schedules + 3 logit-normal variants, at 2 NFE each, + the reference
    for mu in (-1, 0, 1):
        assert f"CFM euler:logit_normal:mu={mu},std=3:2 · BP0" in results
    assert all(math.isfinite(results[name]["dist_to_reference"]) for name in cfm)
    assert results[f"CFM {FAST_DOPRI5} · BP0"]["dist_to_reference"] == 0
    assert (folders / "out" / "nfe_curve.png").stat().st_size > 10_000


def test_study_samplers_and_curve_labels():
    study = study_samplers([2, 4], reference="dopri5:atol=1e-5,rtol=1e-3")
    assert all(isinstance(s, SamplerConfig) for s in study) and len(set(study)) == len(study) == 8 * 2 + 1
    assert SamplerConfig("euler", 4, "logit_normal", {"mu": -1.0, "std": 3.0}) in study
    assert study[-1] == SamplerConfig("dopri5", atol=1e-5, rtol=1e-3)
    assert curve_label(SamplerConfig.parse("euler:logit_normal:mu=0.5,std=1:10")) == "euler:logit_normal:mu=0.5,std=1"
    assert curve_label(study[-1]) == "dopri5:atol=1e-05,rtol=0.001"


def test_user_errors_exit_with_code_2(folders, capsys):
    assert eval_sr(folders, size=("64", "32")) == 2  # the upsampler is ×4
    assert "up-samples ×4" in capsys.readouterr().err
    code = main(["eval-sr", "--data", str(folders / "images"), "--regression", str(folders / "cfm"),
                 "-o", str(folders / "out"), "--hr-size", "64", "--lr-size", "16"])
    assert code == 2 and "not 'regression'" in capsys.readouterr().err
    assert eval_sr(folders, "--back-project", "1.5") == 2
    assert "--back-project takes comma-separated integers, got '1.5'" in capsys.readouterr().err
    assert eval_sr(folders, "--back-project", "-1") == 2
    assert "back_project must be an int >= 0, got -1" in capsys.readouterr().err


def test_baselines_in_pixel_space(generator, tmp_path):
    lr = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    bicubic = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(psu_source(lr, 4, IdentityAutoencoder()), bicubic)
    tiny_upsampler("regression").save_pretrained(tmp_path)
    assert load_regression(tmp_path).flow.objective == "regression"
    assert markdown_table({"bicubic": {"psnr": 20.0, "lpips": 0.3}}).splitlines()[2] == "| bicubic | 20.00 | 0.300 |"


def test_default_baselines_of_a_pixel_space_folder_are_pixel_interpolation(tmp_path):
    """A pixel-space upsampler has no latent space: no latent bilinear, PSU source (bicubic again) or ceiling
    (the truth itself, a lossless row). At ×2 (Real-ESRGAN is ×4 only) that leaves bilinear and bicubic."""
    write_images(tmp_path / "images", [(40, 36)])
    torch.manual_seed(0)
    Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), IdentityAutoencoder(), CouplingFlowMatcher(),
              scale=2, sampler=SamplerConfig(num_steps=1)).save_pretrained(tmp_path / "x2")
    assert main(["eval-sr", "--data", str(tmp_path / "images"), "--upsampler", str(tmp_path / "x2"), "-o",
                 str(tmp_path / "out"), "--hr-size", "32", "--lr-size", "16", "--no-fid", "--lpips-weights",
                 MISSING]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results) == ["bilinear", "bicubic", "CFM euler:linear:1 · BP0", "defaults"]
    assert default_baselines(IdentityAutoencoder(), 2) == default_baselines(None, 2) == ["bilinear", "bicubic"]
    lossy = FirstStage(4, 8, {"kind": "stand-in"})  # any latent first stage: the latent baselines mean something
    assert default_baselines(lossy, 2) == ["bilinear", "bicubic", *LATENT_BASELINES]


def test_rows_of_one_model_share_one_draft_per_image_and_are_timed_as_if_alone(folders):
    upsampler = Upsampler.from_pretrained(folders / "cfm")
    calls = []
    draft = upsampler.draft
    upsampler.draft = lambda *args, **kwargs: calls.append(1) or draft(*args, **kwargs)
    memo = InputMemo()
    sampler = SamplerConfig(num_steps=2)
    plain, projected = upsampler_method(upsampler, sampler, memo), \
        upsampler_method(upsampler, sampler.replace(back_project=2), memo)
    lr = torch.rand(1, 3, 16, 16) * 2 - 1
    generator = lambda: torch.Generator().manual_seed(0)
    a, b = plain(lr, None, generator()), projected(lr, None, generator())
    assert len(calls) == 1 and a.shared_seconds == 0 and b.shared_seconds > 0
    assert a.nfe == b.nfe == 2 and not torch.equal(a.image, b.image)
    upsampler_method(upsampler, SamplerConfig.parse("euler:cosine:2"), memo)(lr, None, generator())
    assert len(calls) == 2  # another ODE solve: another draft
    plain(lr.clone(), None, generator())  # a new input is drafted afresh
    assert len(calls) == 3
    # each row is exactly the image `upscale` makes with its settings
    for output, steps in ((a, 0), (b, 2)):
        expected = upsampler.upscale(lr, generator(), sampler, back_project=steps)
        torch.testing.assert_close(output.image, expected.image, rtol=0, atol=0)


def test_upscale_is_draft_then_finish(folders):
    upsampler = Upsampler.from_pretrained(folders / "cfm")
    lr = torch.rand(2, 3, 16, 16) * 2 - 1
    whole = upsampler.upscale(lr, torch.Generator().manual_seed(1), num_steps=3, back_project=1)
    sampler = upsampler.settings(num_steps=3, back_project=1)
    draft = upsampler.draft(lr, torch.Generator().manual_seed(1), sampler)
    split = upsampler.finish(draft, sampler)
    assert draft.sample.shape == (2, 3, 64, 64) and draft.estimate is None  # no R: a plain CFM flow
    assert whole.nfe == split.nfe == draft.flow_nfe == 3
    torch.testing.assert_close(whole.image, split.image, rtol=0, atol=0)
    assert not torch.equal(split.image, draft.sample)  # finish back-projected the sample


def test_several_upsamplers_in_one_run(folders, capsys):
    other = folders / "other" / "upsampler"
    tiny_upsampler("cfm", seed=2).save_pretrained(other)
    code = main(["eval-sr", "--data", str(folders / "images"), "--upsampler", f"first={folders / 'cfm'}",
                 "--upsampler", str(other), "--sampler", "euler:linear:2", "-o", str(folders / "out"),
                 "--hr-size", "64", "--lr-size", "16", "--max-images", "1", "--inception", MISSING,
                 "--lpips-weights", MISSING])
    assert code == 0
    results, defaults = read_results(folders)
    cfm = [name for name in results if name.startswith("CFM")]
    assert cfm == ["CFM[first] euler:linear:2 · BP0", "CFM[other] euler:linear:2 · BP0"]  # 'other': its run folder
    assert results[cfm[0]]["psnr"] != results[cfm[1]]["psnr"] and defaults == {}
    capsys.readouterr()
    assert main(["eval-sr", "--data", str(folders / "images"), "--upsampler", f"a={folders / 'cfm'}",
                 "--upsampler", f"b={other}", "--study", "schedules", "-o", str(folders / "out2"),
                 "--hr-size", "64", "--lr-size", "16"]) == 2
    assert "give a single --upsampler" in capsys.readouterr().err


def test_a_named_upsampler_keeps_its_name_when_it_is_the_only_one():
    """`--upsampler pm=DIR` alone: its rows (and NFE curve) say 'pm'; an unnamed folder alone: no name."""
    parser = build_parser(["eval-sr"])
    for value, row, curve in (("pm=runs/pm/upsampler", "CFM[pm] euler:linear:4 · BP0", "pm euler:linear"),
                              ("runs/pm/upsampler", "CFM euler:linear:4 · BP0", "euler:linear")):
        args = parser.parse_args(["eval-sr", "--data", "images", "-o", "out", "--upsampler", value])
        rows = model_rows({"pm": tiny_upsampler()}, None, args, InputMemo(), None)
        assert list(rows.methods) == [row] and rows.defaults == {"pm": row} and rows.curves == {row: curve}


def test_baseline_selection_and_back_projection_rows(folders, capsys):
    code = eval_sr(folders, "--regression", str(folders / "regression"), "--sampler", "euler:linear:2",
                   "--baselines", "bicubic,psu-source,ceiling", "--back-project", "0,2", "--no-fid", "--lpips-weights",
                   MISSING)
    assert code == 0
    results, defaults = read_results(folders)
    assert list(results) == ["bicubic", "PSU source", "first-stage ceiling", "CFM euler:linear:2 · BP0",
                             "CFM euler:linear:2 · BP2", "regression · BP0", "regression · BP2"]
    assert results["first-stage ceiling"]["psnr"] is None  # asked for in pixel space: exact, +inf → null in JSON
    assert results["PSU source"]["psnr"] == pytest.approx(results["bicubic"]["psnr"])  # identity: bicubic again
    assert defaults == {"regression": "regression · BP0"}
    cfm, fixed = results["CFM euler:linear:2 · BP0"], results["CFM euler:linear:2 · BP2"]
    assert fixed["nfe"] == cfm["nfe"] == 2
    assert fixed["psnr"] > cfm["psnr"]  # a random tiny model drifts in the low frequencies; BP restores them
    assert results["regression · BP2"]["psnr"] > results["regression · BP0"]["psnr"]
    assert eval_sr(folders, "--baselines", "bicubic,sharpest") == 2
    assert "unknown baseline(s) ['sharpest']" in capsys.readouterr().err
    assert (folders / "out" / "grid.png").stat().st_size > 10_000


@pytest.fixture
def pm_folder(folders, make_posterior_mean):
    """A tiny ×4 posterior-mean flow (3 Euler steps) on the regression folder's model, saved as folders/pm with
    detail 0 and 2 back-projection steps as its settings."""
    pm = make_posterior_mean(Upsampler.from_pretrained(folders / "regression"))
    pm.sampler = pm.sampler.replace(detail=0.0, back_project=2)
    pm.save_pretrained(folders / "pm")
    return folders / "pm"


def test_back_projection_and_detail_rows_are_named_by_their_settings(folders, pm_folder):
    assert main(["eval-sr", "--data", str(folders / "images"), "--upsampler", str(pm_folder), "--back-project", "0,2",
                 "--detail", "0,1", "--baselines", "bicubic", "-o", str(folders / "out"), "--hr-size", "64",
                 "--lr-size", "16", "--max-images", "2", "--no-fid", "--lpips-weights", MISSING]) == 0
    results, defaults = read_results(folders)
    row = "CFM euler:linear:3 · detail {} · BP{}".format
    assert list(results) == ["bicubic", row(0, 0), row(1, 0), row(0, 2), row(1, 2)]
    assert defaults == {"pm": row(0, 2)}  # the folder's saved settings: detail 0, BP2
    assert [results[row(d, 0)]["nfe"] for d in (0, 1)] == [1, 4]  # detail 0: R alone; 1: R and 3 Euler steps
    for detail in (0, 1):  # back-projection onto the input makes the untrained model's output consistent with it
        assert results[row(detail, 2)]["psnr"] > results[row(detail, 0)]["psnr"] + 0.5
        assert results[row(detail, 2)]["nfe"] == results[row(detail, 0)]["nfe"]


def test_detail_sweep_of_a_posterior_mean_upsampler_and_the_perception_distortion_plot(folders, pm_folder, capsys):
    code = main(["eval-sr", "--data", str(folders / "images"), "--upsampler", f"pm={pm_folder}",
                 "--upsampler", f"paper={folders / 'cfm'}", "--regression", str(folders / "regression"),
                 "--sampler", "euler:linear:2", "--detail", "0,0.5,1", "--back-project", "1", "--baselines", "bicubic",
                 "-o", str(folders / "out"), "--hr-size", "64", "--lr-size", "16", "--no-fid",
                 "--lpips-weights", MISSING])
    assert code == 0
    results, _ = read_results(folders)
    dial = [f"CFM[pm] euler:linear:2 · detail {d} · BP1" for d in ("0", "0.5", "1")]
    assert [results[m]["nfe"] for m in dial] == [1, 3, 3]  # R's pass, plus 2 Euler steps when the flow runs
    assert results[dial[0]]["psnr"] == pytest.approx(results["regression · BP1"]["psnr"])  # detail 0 is R itself
    assert results[dial[2]]["psnr"] != pytest.approx(results[dial[0]]["psnr"])
    assert "CFM[paper] euler:linear:2 · BP1" in results and "CFM[paper] euler:linear:2 · detail 0 · BP1" not in results
    assert (folders / "out" / "perception_distortion.png").stat().st_size > 10_000
    capsys.readouterr()
    assert eval_sr(folders, "--detail", "0.5") == 2
    assert "--detail needs a posterior-mean upsampler" in capsys.readouterr().err
    assert main(["eval-sr", "--data", str(folders / "images"), "--upsampler", str(pm_folder), "--detail", "2",
                 "-o", str(folders / "out"), "--hr-size", "64", "--lr-size", "16"]) == 2
    assert "must be in [0, 1]" in capsys.readouterr().err


def test_save_images_writes_the_inputs_and_every_row(folders):
    assert eval_sr(folders, "--sampler", "euler:linear:2", "--back-project", "1", "--max-images", "2", "--seed", "3",
                   "--save-images", "--no-fid", "--lpips-weights", MISSING) == 0
    results, _ = read_results(folders)
    images = folders / "out" / "images"
    assert method_folder("CFM euler:linear:2 · BP1") == "CFM_euler-linear-2_BP1"
    assert sorted(p.name for p in images.iterdir()) == sorted(["low-res", *map(method_folder, results)])
    for folder in images.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["im0.png", "im1.png"]
    upsampler = Upsampler.from_pretrained(folders / "cfm")
    for index, pair in enumerate(iter_pairs([folders / "images"], 64, 16, max_images=2)):
        low_res = load_image(images / "low-res" / f"{pair.name}.png")
        assert torch.equal(low_res, pair.lr)  # the 8-bit input every method saw, exactly
        # `upscale` on the saved input, with the row's settings and noise, makes the saved image
        made = upsampler.upscale(low_res[None], torch.Generator().manual_seed(3 + index),
                                 SamplerConfig.parse("euler:linear:2"), back_project=1).image[0]
        expected = (((made + 1) / 2).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        saved = np.asarray(Image.open(images / "CFM_euler-linear-2_BP1" / f"{pair.name}.png"))
        np.testing.assert_array_equal(saved, expected)
        bicubic = np.asarray(Image.open(images / "bicubic" / f"{pair.name}.png"))
        assert bicubic.shape == (64, 64, 3) and not np.array_equal(bicubic, saved)
