"""The loop's guards and options: NaN stop, regression objective, the saved Upsampler, the demo."""

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from fmboost.models import CouplingFlowMatcher, SamplerConfig, Upsampler
from fmboost.models.calibration import BACK_PROJECT_CANDIDATES
from fmboost.train import checkpoint as ckpt
from fmboost.train import demo
from fmboost.train.cfm_upsampler import NonFiniteLossError, main, train
from fmboost.train.config import config_flag, load_config

from .conftest import fitted_back_projection


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_config, monkeypatch):
    config = tiny_config(max_train_steps=6)
    real_loss, calls = CouplingFlowMatcher.loss, []

    def loss_nan_at_step_3(self, *args, **kwargs):
        calls.append(1)
        value = real_loss(self, *args, **kwargs)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(CouplingFlowMatcher, "loss", loss_nan_at_step_3)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(config)
    out = Path(config.output_dir)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "upsampler").exists()
    monkeypatch.setattr(CouplingFlowMatcher, "loss", real_loss)
    train(load_config(None, {**config.to_dict(), "resume_from_checkpoint": "latest"}))  # still resumable
    assert (out / "upsampler" / "boost_config.json").is_file()


def test_main_reports_nan_as_an_error(tiny_config, monkeypatch, capsys):
    config = tiny_config()
    monkeypatch.setattr(CouplingFlowMatcher, "loss", lambda self, model, x1, cond, **kwargs:
                        model(x1, torch.zeros(x1.shape[0]), cond).mean() * float("inf"))
    args = [f"{config_flag(k)}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in config.to_dict().items()
            if v is not None]
    assert main(args) == 1
    assert "at step 1" in capsys.readouterr().err


def test_regression_objective_trains_and_saves(tiny_config, capsys):
    config = tiny_config(objective="regression", max_train_steps=12, crops_per_image=4, validation_steps=100)
    folder = train(config)
    upsampler = Upsampler.from_pretrained(folder)
    params = sum(p.numel() for p in upsampler.model.parameters())
    printed = capsys.readouterr().out
    assert (f"training a regression upsampler of {params / 1e6:.3g} M parameters: 20 samples of 5 images "
            "(1 held out for validation), batch 2, 12 steps (1.2 epochs)") in printed
    assert upsampler.flow.objective == "regression"
    losses = [json.loads(line) for line in (Path(config.output_dir) / "validation" / "metrics.jsonl").open()]
    assert losses[-1]["nfe"] == 1
    # saved with the back-projection steps measured best on the validation images; no dial without an estimate
    _, kept = fitted_back_projection(printed)
    assert upsampler.sampler.back_project == kept and upsampler.detail_calibration is None
    result = upsampler.upscale(torch.zeros(1, 3, 4, 4))
    assert result.nfe == 1 and result.image.shape == (1, 3, 16, 16)


def test_saved_upsampler_has_latent_stats_and_ema_weights(tiny_config):
    config = tiny_config()
    folder = train(config)
    saved = json.loads((folder / "boost_config.json").read_text())
    assert saved["scale"] == 4 and saved["flow"]["upsample"] == "psu"
    assert saved["first_stage"]["latent_std"] != [1.0, 1.0, 1.0]  # computed on the training data
    fitted = saved["sampler"]["back_project"]  # measured on the validation images (test_regression_objective_…)
    assert fitted in BACK_PROJECT_CANDIDATES
    assert saved["sampler"] == SamplerConfig(solver="euler", num_steps=4, schedule="linear",
                                             back_project=fitted).to_dict()
    training = Upsampler.from_pretrained(folder).model.state_dict()
    from safetensors.torch import load_file
    last = load_file(Path(config.output_dir) / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(training[k], last[k]) for k in last)  # the EMA, not the last training weights


def test_demo_yaml_is_the_embedded_default():
    path = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    assert yaml.safe_load(path.read_text()) == demo.DEMO_CONFIG
    load_config(None, demo.DEMO_CONFIG)


def test_demo_smoke(tmp_path, capsys):
    override = tmp_path / "quick.yaml"
    override.write_text(yaml.safe_dump({"crops_per_image": 4, "max_train_steps": 3, "train_batch_size": 4,
                                        "block_out_channels": [16, 32], "attention_levels": [False, False]}))
    args = argparse.Namespace(config=str(override), output_dir=str(tmp_path / "demo"), max_train_steps=None,
                              eval_crop_size=32, eval_crops_per_image=2)
    assert demo.run(args) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert list(results) == ["cfm", "bicubic", "bilinear"]
    for row in results.values():
        assert set(row) == {"psnr", "ssim", "lpips", "sharpness"}
        assert row["psnr"] > 10 and 0 < row["ssim"] <= 1 and row["sharpness"] > 0
        assert row["lpips"] is None or 0 <= row["lpips"] < 1
    assert (tmp_path / "demo" / "comparison.png").is_file()
    printed = capsys.readouterr().out
    assert "bicubic" in printed and ("LPIPS skipped" in printed) == (results["cfm"]["lpips"] is None)


def test_fmboost_train_command_runs_the_same_loop(tiny_config, capsys):
    from fmboost.pipelines.cli import main as cli_main

    config = tiny_config(max_train_steps=2, validation_steps=100)
    args = [f"{config_flag(k)}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in config.to_dict().items()
            if v is not None]
    assert cli_main(["train", *args]) == 0
    assert (Path(config.output_dir) / "upsampler" / "boost_config.json").is_file()
    with pytest.raises(SystemExit):  # an unknown key is refused by the parser, naming it
        cli_main(["train", *args, "--learning_rte=1"])
    assert cli_main(["train", *args, "--num_inference_steps=2"]) == 2  # renamed: the error names the new key
    assert "'num_inference_steps' is now 'upsample_steps'" in capsys.readouterr().err
