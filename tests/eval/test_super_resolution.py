"""`fmboost eval-sr` and its recipe on tiny random upsamplers (pixel space, 32² / 64² images)."""

import json
import math

import pytest
import torch
from fmboost.eval.baselines import ConditionMemo, MethodOutput, load_regression, psu_source, upsampler_method
from fmboost.eval.cli_eval_sr import curve_label
from fmboost.eval.pairs import iter_pairs
from fmboost.eval.super_resolution import MetricNetworks, evaluate, markdown_table, study_samplers
from fmboost.models import CFMUNet, CouplingFlowMatcher, IdentityAutoencoder, SamplerConfig, Upsampler
from fmboost.models.assets import shared_path
from fmboost.pipelines.cli import main

from .test_pairs import write_images

MISSING = "/nonexistent/weights.pth"
FAST_DOPRI5 = "dopri5:atol=0.001,rtol=0.01"  # random tiny models are stiff; loose tolerances keep tests fast


def tiny_upsampler(objective="cfm", seed=0):
    torch.manual_seed(seed)
    model = CFMUNet.from_preset("tiny", latent_channels=3).eval()
    return Upsampler(model, IdentityAutoencoder(), CouplingFlowMatcher(objective=objective), scale=4)


@pytest.fixture
def folders(tmp_path):
    """Three small images, a CFM upsampler and a regression upsampler saved to tmp_path."""
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
                 "--out", str(folders / "out"), "--hr-size", size[0], "--lr-size", size[1], *extra])


def test_cli_end_to_end(folders, capsys):
    code = eval_sr(folders, "--regression", str(folders / "regression"), "--sampler", "euler:linear:2",
                   "--sampler", "euler:logit_normal:mu=0.5,std=1:3", "--sampler", FAST_DOPRI5,
                   "--inception", MISSING, *lpips_args())
    assert code == 0
    out = folders / "out"
    results = json.loads((out / "results.json").read_text())
    cfm = ["CFM euler:linear:2", "CFM euler:logit_normal:mu=0.5,std=1:3", f"CFM {FAST_DOPRI5}"]
    baselines = ["bilinear", "bicubic", "latent bilinear", "PSU source", "first-stage ceiling", "regression"]
    assert list(results) == baselines + cfm  # the reference runs first but is reported in the given order
    for name, rows in results.items():
        for key in ("psnr", "ssim", "psnr_y", "ssim_y", "nfe", "seconds_per_image"):
            exact = name == "first-stage ceiling" and key.startswith("psnr")  # identity first stage: +inf → null
            assert rows[key] is None if exact else math.isfinite(rows[key]), (name, key)
    assert [results[m]["nfe"] for m in cfm[:2]] == [2, 3] and results[cfm[2]]["nfe"] > 3
    assert results["regression"]["nfe"] == 1 and results["bicubic"]["nfe"] == 0
    assert results[cfm[2]]["dist_to_reference"] == 0 and results[cfm[0]]["dist_to_reference"] > 0
    assert "fid" not in results["bicubic"]
    table = (out / "results.md").read_text()
    assert "| CFM euler:linear:2 |" in table and "fid skipped" in table and "3 images" in table
    for name in ("grid.png", "nfe_curve.png"):
        assert (out / name).stat().st_size > 10_000
    assert len(json.loads((out / "per_image.json").read_text())["bicubic"]["psnr"]) == 3
    assert "| bicubic |" in capsys.readouterr().out


def test_unavailable_metrics_are_skipped_with_a_reason(folders, capsys):
    assert eval_sr(folders, "--sampler", "euler:linear:1", "--lpips-weights", MISSING, "--inception", MISSING,
                   "--max-images", "2") == 0
    printed = capsys.readouterr().out
    assert f"lpips skipped: LPIPS weights not found at {MISSING}" in printed
    assert f"fid skipped: FID Inception weights not found at {MISSING}" in printed
    results = json.loads((folders / "out" / "results.json").read_text())
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
    assert min(evaluation.per_image["c"]["dist_to_reference"]) > 0
    # a different seed draws different noise
    other = evaluate(pairs[:1], {"a": methods["a"]}, 4, MetricNetworks(), seed=4)
    assert not torch.equal(other.grid["a"][0], evaluation.grid["a"][0])


def test_schedule_study(folders):
    assert eval_sr(folders, "--study", "schedules", "--study-nfe", "1,2", "--study-reference", FAST_DOPRI5,
                   "--max-images", "2", "--lpips-weights", MISSING, "--inception", MISSING,
                   size=("32", "8")) == 0
    results = json.loads((folders / "out" / "results.json").read_text())
    cfm = [name for name in results if name.startswith("CFM")]
    assert len(cfm) == 8 * 2 + 1  # 5 schedules + 3 logit-normal variants, at 2 NFE each, + the reference
    for mu in (-1, 0, 1):
        assert f"CFM euler:logit_normal:mu={mu},std=3:2" in results
    assert all(math.isfinite(results[name]["dist_to_reference"]) for name in cfm)
    assert results[f"CFM {FAST_DOPRI5}"]["dist_to_reference"] == 0
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
                 "--out", str(folders / "out"), "--hr-size", "64", "--lr-size", "16"])
    assert code == 2 and "not 'regression'" in capsys.readouterr().err


def test_baselines_in_pixel_space(generator, tmp_path):
    lr = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    bicubic = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(psu_source(lr, 4, IdentityAutoencoder()), bicubic)
    tiny_upsampler("regression").save_pretrained(tmp_path)
    assert load_regression(tmp_path).flow.objective == "regression"
    assert markdown_table({"bicubic": {"psnr": 20.0, "lpips": 0.3}}).splitlines()[2] == "| bicubic | 20.00 | 0.300 |"


def test_methods_share_one_conditioning_per_image_and_are_timed_as_if_alone(folders):
    upsampler = Upsampler.from_pretrained(folders / "cfm")
    calls = []
    condition = upsampler.condition
    upsampler.condition = lambda **kw: calls.append(1) or condition(**kw)
    memo = ConditionMemo()
    first, second = upsampler_method(upsampler, memo), upsampler_method(upsampler, memo)
    lr = torch.rand(1, 3, 16, 16) * 2 - 1
    generator = lambda: torch.Generator().manual_seed(0)
    a, b = first(lr, None, generator()), second(lr, None, generator())
    assert len(calls) == 1 and a.shared_seconds == 0 and b.shared_seconds > 0
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    first(lr.clone(), None, generator())  # a new input is conditioned afresh
    assert len(calls) == 2


def test_mean_of_k_samples_decodes_the_latent_mean(folders):
    upsampler = Upsampler.from_pretrained(folders / "cfm")
    lr = torch.rand(1, 3, 16, 16) * 2 - 1
    averaged = upsampler_method(upsampler, num_samples=3, sampler=SamplerConfig(num_steps=2))(
        lr, None, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    samples = [upsampler.upsample(lr_image=lr, generator=generator, num_steps=2).x1 for _ in range(3)]
    assert averaged.nfe == 6
    torch.testing.assert_close(averaged.latent, torch.stack(samples).mean(0))
    assert samples[0].sub(samples[1]).abs().max() > 1e-3  # the samples differ: the mean is not one of them


def test_several_upsamplers_and_averaging_in_one_run(folders, capsys):
    other = folders / "other" / "upsampler"
    tiny_upsampler("cfm", seed=2).save_pretrained(other)
    code = main(["eval-sr", "--data", str(folders / "images"), "--upsampler", f"first={folders / 'cfm'}",
                 "--upsampler", str(other), "--sampler", "euler:linear:2", "--average-samples", "2",
                 "--out", str(folders / "out"), "--hr-size", "64", "--lr-size", "16", "--max-images", "1",
                 "--inception", MISSING, "--lpips-weights", MISSING])
    assert code == 0
    results = json.loads((folders / "out" / "results.json").read_text())
    cfm = [name for name in results if name.startswith("CFM")]
    assert cfm == ["CFM[first] euler:linear:2", "CFM[first] euler:linear:2 · mean of 2",
                   "CFM[other] euler:linear:2", "CFM[other] euler:linear:2 · mean of 2"]
    assert results[cfm[1]]["nfe"] == 4 and results[cfm[0]]["psnr"] != results[cfm[2]]["psnr"]
    capsys.readouterr()
    assert main(["eval-sr", "--data", str(folders / "images"), "--upsampler", f"a={folders / 'cfm'}",
                 "--upsampler", f"b={other}", "--study", "schedules", "--out", str(folders / "out2"),
                 "--hr-size", "64", "--lr-size", "16"]) == 2
    assert "give a single --upsampler" in capsys.readouterr().err


def test_upsample_is_condition_then_sample(folders):
    upsampler = Upsampler.from_pretrained(folders / "cfm")
    lr = torch.rand(2, 3, 16, 16) * 2 - 1
    whole = upsampler.upsample(lr_image=lr, generator=torch.Generator().manual_seed(1), num_steps=3)
    cond = upsampler.condition(lr_image=lr)
    split = upsampler.sample(cond, torch.Generator().manual_seed(1), num_steps=3)
    assert cond.shape == (2, 3, 64, 64) and whole.nfe == split.nfe == 3
    torch.testing.assert_close(whole.x1, split.x1, rtol=0, atol=0)


def test_baseline_selection_and_back_projected_variants(folders, capsys):
    code = eval_sr(folders, "--regression", str(folders / "regression"), "--sampler", "euler:linear:2",
                   "--baselines", "bicubic,psu-source", "--back-project", "2", "--no-fid", "--lpips-weights", MISSING)
    assert code == 0
    results = json.loads((folders / "out" / "results.json").read_text())
    assert list(results) == ["bicubic", "PSU source", "regression", "CFM euler:linear:2", "regression + BP2",
                             "CFM euler:linear:2 + BP2"]
    cfm, fixed = results["CFM euler:linear:2"], results["CFM euler:linear:2 + BP2"]
    assert fixed["nfe"] == cfm["nfe"] == 2 and fixed["seconds_per_image"] >= cfm["seconds_per_image"]
    assert fixed["psnr"] > cfm["psnr"]  # a random tiny model drifts in the low frequencies; BP restores them
    assert eval_sr(folders, "--baselines", "bicubic,sharpest") == 2
    assert "unknown baseline(s) ['sharpest']" in capsys.readouterr().err
    assert eval_sr(folders, "--back-project", "-1") == 2
    assert (folders / "out" / "grid.png").stat().st_size > 10_000


def test_detail_sweep_of_a_posterior_mean_upsampler_and_the_perception_distortion_plot(folders, capsys):
    from fmboost.models.posterior_mean import PosteriorMean

    regression = Upsampler.from_pretrained(folders / "regression")
    torch.manual_seed(3)
    pm = Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), IdentityAutoencoder(),
                   CouplingFlowMatcher(source="posterior_mean"), scale=4,
                   posterior_mean=PosteriorMean.from_upsampler(regression))
    pm.save_pretrained(folders / "pm")
    code = main(["eval-sr", "--data", str(folders / "images"), "--upsampler", f"pm={folders / 'pm'}",
                 "--upsampler", f"paper={folders / 'cfm'}", "--regression", str(folders / "regression"),
                 "--sampler", "euler:linear:2", "--detail", "0,0.5,1", "--back-project", "1", "--baselines", "bicubic",
                 "--out", str(folders / "out"), "--hr-size", "64", "--lr-size", "16", "--no-fid",
                 "--lpips-weights", MISSING])
    assert code == 0
    results = json.loads((folders / "out" / "results.json").read_text())
    dial = [f"CFM[pm] euler:linear:2 · detail {d}" for d in ("0", "0.5", "1")]
    assert [results[m]["nfe"] for m in dial] == [1, 3, 3]  # R's pass, plus 2 Euler steps when the flow runs
    assert results[dial[0]]["psnr"] == pytest.approx(results["regression"]["psnr"])  # detail 0 is R itself
    assert "CFM[paper] euler:linear:2" in results and "CFM[paper] euler:linear:2 · detail 0" not in results
    assert f"{dial[1]} + BP1" in results
    assert (folders / "out" / "perception_distortion.png").stat().st_size > 10_000
    capsys.readouterr()
    assert eval_sr(folders, "--detail", "0.5") == 2
    assert "--detail needs a posterior-mean upsampler" in capsys.readouterr().err
    assert main(["eval-sr", "--data", str(folders / "images"), "--upsampler", str(folders / "pm"), "--detail", "2",
                 "--out", str(folders / "out"), "--hr-size", "64", "--lr-size", "16"]) == 2
    assert "must be in [0, 1]" in capsys.readouterr().err


def test_temperature_sweep_crossed_with_the_detail_dial(folders, capsys):
    from fmboost.models.posterior_mean import PosteriorMean

    regression = Upsampler.from_pretrained(folders / "regression")
    torch.manual_seed(3)
    Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), IdentityAutoencoder(),
              CouplingFlowMatcher(source="posterior_mean", posterior_mean_sigma=0.5), scale=4,
              posterior_mean=PosteriorMean.from_upsampler(regression)).save_pretrained(folders / "pm")
    args = ["eval-sr", "--data", str(folders / "images"), "--upsampler", str(folders / "pm"), "--sampler",
            "euler:linear:2", "--baselines", "bicubic", "--out", str(folders / "out"), "--hr-size", "64",
            "--lr-size", "16", "--no-fid", "--lpips-weights", MISSING]
    assert main(args + ["--detail", "0.5,1", "--temperature", "0,1"]) == 0
    results = json.loads((folders / "out" / "results.json").read_text())
    names = [f"CFM euler:linear:2 · detail {d} · T {t}" for t in ("0", "1") for d in ("0.5", "1")]
    assert [m for m in results if m.startswith("CFM")] == names
    assert results[names[1]]["psnr"] != results[names[3]]["psnr"]  # T changes the sample …
    assert main(args + ["--temperature", "1"]) == 0  # … and T 1 is the trained source: the saved default's sample
    again = json.loads((folders / "out" / "results.json").read_text())
    assert again["CFM euler:linear:2 · T 1"]["psnr"] == pytest.approx(results[names[3]]["psnr"])
    capsys.readouterr()
    assert eval_sr(folders, "--temperature", "0.5") == 2
    assert "--temperature needs a posterior-mean upsampler" in capsys.readouterr().err
    assert main(args + ["--temperature", "-1"]) == 2
    assert "--temperature values must be ≥ 0" in capsys.readouterr().err
