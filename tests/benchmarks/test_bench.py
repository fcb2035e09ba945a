"""`fmboost bench`: tiny sizes, JSON structure, and ratios that follow from the measured numbers."""

import json

import pytest
import torch
from fmboost.benchmarks.end_to_end import bench_end_to_end
from fmboost.benchmarks.pipeline import bench_pipeline
from fmboost.benchmarks.sampler import SAMPLER_CONFIGS
from fmboost.models import SamplerConfig
from fmboost.pipelines.cli import main


def test_pipeline_bench_json_and_ratios(tmp_path, capsys):
    out = tmp_path / "pipeline.json"
    argv = ["bench", "pipeline", "--size", "tiny", "--upsampler-preset", "tiny", "--lr-latent", "8", "--hr-latent",
            "16", "--base-steps", "3", "--upsample-steps", "2", "--decode", "sdpa,channels_last,tiled", "--warmup", "0",
            "-o", str(out)]
    assert main(argv) == 0
    assert "direct 128² / boosted" in capsys.readouterr().out
    result = json.loads(out.read_text())
    per_call, boosted, direct = result["per_call_s"], result["boosted_s"], result["direct_s"]
    assert set(boosted) == {"text_encoder", "base", "psu", "upsample", "decode", "total", "total_latent_mode"}
    assert boosted["base"] == pytest.approx(3 * per_call["unet_step_8"])
    assert direct["base"] == pytest.approx(3 * per_call["unet_step_16"])
    assert boosted["upsample"] == pytest.approx(2 * per_call["cfm_nfe_16"])
    assert boosted["psu"] == pytest.approx(per_call["psu_decode_64"] + per_call["psu_encode_128"])
    assert boosted["decode"] == direct["decode"] == per_call["decode_128_sdpa"]
    stages = [v for k, v in boosted.items() if k not in ("total", "total_latent_mode")]
    assert boosted["total"] == pytest.approx(sum(stages))
    assert result["speedup_direct_over_boosted"] == pytest.approx(direct["total"] / boosted["total"])
    assert result["speedup_latent_mode"] == pytest.approx(direct["total"] / (boosted["total"] - boosted["psu"]))
    assert result["decode_speedup_vs_sdpa"]["sdpa"] == 1.0
    assert result["decode_speedup_vs_sdpa"]["tiled"] == pytest.approx(per_call["decode_128_sdpa"]
                                                                       / per_call["decode_128_tiled"])
    assert result["setup"]["pixels"] == 128 and result["setup"]["upsample_steps"] == 2
    assert "multiplied" in result["method"]


def test_end_to_end_bench_times_the_whole_calls(tmp_path, capsys):
    """CFG and LCM recipes at two target sizes, eager: medians of the timed calls, ratios from them."""
    out = tmp_path / "e2e.json"
    assert main(["bench", "pipeline", "--end-to-end", "--size", "tiny", "--upsampler-preset", "tiny", "--pixels",
                 "64,128", "--recipes", "cfg:2,lcm:1", "--modes", "eager", "--repeats", "3", "--upsample-steps", "2",
                 "-o", str(out)]) == 0
    assert "lcm1   128² eager" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["setup"]["repeats"] == 3 and "null" in result["memory"]
    rows = result["rows"]
    assert [(r["recipe"], r["pixels"], r["base_pixels"]) for r in rows] == [
        ("cfg2", 64, 16), ("cfg2", 128, 32), ("lcm1", 64, 16), ("lcm1", 128, 32)]
    assert [r["guidance"] for r in rows] == [7.5, 7.5, 8.5, 8.5]  # the LCM-shaped UNet: embedded guidance
    for row in rows:
        eager = row["eager"]
        assert row["nfe"] == 2 and "fast" not in row
        for call in ("boosted", "direct"):
            assert len(eager[call]["runs_s"]) == 3 and eager[call]["peak_mib"] is None
            assert eager[call]["median_s"] == sorted(eager[call]["runs_s"])[1]
        assert set(eager["boosted"]["stages_s"]) == {"base", "upsample", "decode"}
        assert eager["speedup_direct_over_boosted"] == pytest.approx(eager["direct"]["median_s"]
                                                                     / eager["boosted"]["median_s"])


def test_end_to_end_bench_fast_path_beside_eager():
    """The fast path measured after eager in the same run (dynamo only here: compiling with inductor is the fast
    path's own test), its image compared with eager's."""
    result = bench_end_to_end("tiny", [64], ["lcm:1"], ["eager", "fast"], repeats=1, upsampler_preset="tiny",
                              upsample_steps=1, compile_kwargs={"backend": "eager", "mode": None})
    (row,) = result["rows"]
    assert row["fast_path_on"] and row["fast"]["boosted"]["first_call_s"] > 0
    assert 0 <= row["fast"]["max_abs_diff_vs_eager"]["boosted"] <= 1e-4
    assert 0 <= row["fast"]["max_abs_diff_vs_eager"]["direct"] <= 1e-4
    assert row["fast_speedup_over_eager"]["direct"] == pytest.approx(row["eager"]["direct"]["median_s"]
                                                                     / row["fast"]["direct"]["median_s"])
    with pytest.raises(ValueError, match="recipe must be cfg:STEPS or lcm:STEPS"):
        bench_end_to_end("tiny", [64], ["lcm4"])


def test_sampler_bench_counts_nfe_and_times(tmp_path):
    out = tmp_path / "sampler.json"
    assert main(["bench", "sampler", "--presets", "tiny", "--latent-size", "16", "--configs",
                 "euler:linear:4,heun:cosine:3,rk4:linear:1", "--warmup", "0", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["models"]["tiny"]
    assert {k: c["nfe"] for k, c in row["configs"].items()} == {"euler:linear:4": 4, "heun:cosine:3": 6,
                                                                "rk4:linear:1": 4}
    for config in row["configs"].values():
        assert config["time_s"] == pytest.approx(config["nfe"] * row["per_nfe_s"])
    assert result["per_nfe_ratios"] == {}  # one model: nothing to compare


def test_sampler_bench_quick_compares_presets(tmp_path):
    out = tmp_path / "sampler.json"
    assert main(["bench", "sampler", "--presets", "tiny,small", "--latent-size", "16", "--quick", "--configs",
                 "euler:linear:2", "--warmup", "0", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    ratio = result["models"]["small"]["per_nfe_s"] / result["models"]["tiny"]["per_nfe_s"]
    assert result["per_nfe_ratios"]["small/tiny"] == pytest.approx(ratio)
    assert result["setup"]["nfe_latent_size"] == 32


def test_sampler_configs_are_sampler_config_strings(capsys):
    assert [SamplerConfig.parse(text).format() for text in SAMPLER_CONFIGS] == list(SAMPLER_CONFIGS)
    assert main(["bench", "sampler", "--presets", "tiny", "--configs", "euler:wiggly:4"]) == 2
    assert "sampler 'euler:wiggly:4': SamplerConfig.schedule" in capsys.readouterr().err


def test_pipeline_bench_runs_in_the_requested_dtype():
    """Every stage (text encoder, both UNet sizes, CFM, PSU, decode variants) runs on bfloat16 weights and inputs."""
    result = bench_pipeline("tiny", base_steps=1, upsample_steps=1, upsampler_preset="tiny",
                            decode=["sdpa", "tiny_decoder"], device="cpu", warmup=0, lr_latent=8, hr_latent=16,
                            dtype="bfloat16")
    assert result["setup"]["dtype"] == "bfloat16"
    assert set(result["per_call_s"]) == {"text_encoder", "unet_step_8", "unet_step_16", "cfm_nfe_16",
                                         "psu_decode_64", "psu_encode_128", "decode_128_sdpa",
                                         "decode_128_tiny_decoder"}
    assert "memory_mib" not in result  # peak memory is a CUDA measurement; a CPU run reports none


def test_pipeline_bench_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        bench_pipeline("tiny", upsampler_preset="tiny", device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_pipeline_bench_cuda_graph_totals_use_the_replayed_times():
    result = bench_pipeline("tiny", base_steps=3, upsample_steps=2, upsampler_preset="tiny", decode=["sdpa"],
                            device="cuda", lr_latent=8, hr_latent=16, cuda_graphs=True)
    per_call, graphs = result["per_call_s"], result["cuda_graphs"]
    assert graphs["boosted_s"]["base"] == pytest.approx(3 * per_call["unet_step_8_cuda_graph"])
    assert graphs["direct_s"]["base"] == pytest.approx(3 * per_call["unet_step_16_cuda_graph"])
    assert graphs["boosted_s"]["upsample"] == pytest.approx(2 * per_call["cfm_nfe_16_cuda_graph"])
    assert set(result["memory_mib"]["peak_per_stage"]) == set(per_call)


@pytest.mark.slow  # two fresh Python processes
def test_upscale_bench_measures_each_tile_size_in_its_own_process(tmp_path, capsys):
    from fmboost.models import CFMUNet, CouplingFlowMatcher, IdentityAutoencoder, Upsampler

    torch.manual_seed(0)
    Upsampler(CFMUNet.from_preset("tiny", latent_channels=3).eval(), IdentityAutoencoder(), CouplingFlowMatcher(),
              scale=4, sampler=SamplerConfig(num_steps=2)).save_pretrained(tmp_path / "up")
    out = tmp_path / "upscale.json"
    assert main(["bench", "upscale", "--upsampler", str(tmp_path / "up"), "--output-size", "96", "--tile-sizes",
                 "0,32", "--tile-overlap", "8", "--device", "cpu", "-o", str(out)]) == 0
    rows = json.loads(out.read_text())["runs"]
    assert [r["tile_size"] for r in rows] == [0, 32] and rows[0]["tiles"] == 1 and rows[1]["tiles"] > 4
    assert all(r["nfe"] == 2 and r["peak_rss_mib"] >= r["rss_before_mib"] > 0 and r["cuda_peak_mib"] is None
               for r in rows)
    assert "peak RSS MiB" in capsys.readouterr().out
    # bf16 weights run through Upsampler.mixed_precision, as BoostPipeline runs them (an fp32 state would fail)
    assert main(["bench", "upscale", "--upsampler", str(tmp_path / "up"), "--output-size", "96", "--tile-sizes", "0",
                 "--device", "cpu", "--dtype", "bfloat16", "-o", str(out)]) == 0
    (row,) = json.loads(out.read_text())["runs"]
    assert "error" not in row and row["nfe"] == 2


@pytest.mark.slow
def test_pipeline_bench_compiled_totals_use_the_compiled_network_times():
    """`--compile`: the UNet steps and CFM NFE timed through torch.compile, the totals recomputed from them."""
    result = bench_pipeline("tiny", base_steps=4, upsample_steps=2, upsampler_preset="tiny", guidance=False,
                            decode=["sdpa"], warmup=0, lr_latent=8, hr_latent=16, compile=True)
    per_call, compiled = result["per_call_s"], result["compiled"]
    for name in ("unet_step_8", "unet_step_16", "cfm_nfe_16"):
        assert per_call[f"{name}_compiled"] > 0
    assert compiled["boosted_s"]["base"] == pytest.approx(4 * per_call["unet_step_8_compiled"])
    assert compiled["boosted_s"]["upsample"] == pytest.approx(2 * per_call["cfm_nfe_16_compiled"])
    assert compiled["direct_s"]["base"] == pytest.approx(4 * per_call["unet_step_16_compiled"])
    assert compiled["boosted_s"]["decode"] == result["boosted_s"]["decode"]  # only the networks are compiled
    assert result["boosted_s"]["base"] == pytest.approx(4 * per_call["unet_step_8"])  # eager totals unchanged
