"""`fmboost export`: a checkpoint's EMA or training weights as a loadable Upsampler folder."""

import json
from pathlib import Path

import pytest
import torch
from fmboost.models import Upsampler
from fmboost.pipelines.cli import main as cli
from fmboost.train.cfm_upsampler import train
from fmboost.train.checkpoint import TRAINER_STATE
from fmboost.train.config import load_config
from fmboost.train.export import EMA_STATE_NAME, export_checkpoint

from .conftest import TINY, weights, write_images


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 and the final EMA upsampler."""
    root = tmp_path_factory.mktemp("export")
    images = write_images(root / "images")
    torch.set_num_threads(1)
    config = load_config(None, {**TINY, "train_data_dir": str(images), "output_dir": str(root / "run")})
    train(config)
    return Path(config.output_dir)


def test_ema_export_of_the_last_checkpoint_is_the_saved_upsampler(run_dir, tmp_path):
    step = export_checkpoint(run_dir / "checkpoint-4", tmp_path / "ema")
    assert step == 4
    saved, exported = weights(run_dir / "upsampler"), weights(tmp_path / "ema")
    assert saved.keys() == exported.keys()
    for key in saved:
        torch.testing.assert_close(exported[key], saved[key], msg=key)


def test_training_export_is_the_raw_weights_and_loads(run_dir, tmp_path):
    export_checkpoint(run_dir / "checkpoint-4", tmp_path / "raw", weights="training")
    raw, ema = weights(tmp_path / "raw"), weights(run_dir / "upsampler")
    checkpoint = weights(run_dir / "checkpoint-4")
    for key in checkpoint:
        torch.testing.assert_close(raw[key], checkpoint[key], msg=key)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw), "EMA (decay 0.9) must differ from the raw weights"
    upsampler = Upsampler.from_pretrained(tmp_path / "raw")
    reference = Upsampler.from_pretrained(run_dir / "upsampler")
    assert upsampler.scale == reference.scale and upsampler.sampler == reference.sampler
    torch.testing.assert_close(upsampler.first_stage.latent_std, reference.first_stage.latent_std)


def test_an_earlier_checkpoint_exports_its_own_weights(run_dir, tmp_path):
    assert export_checkpoint(run_dir / "checkpoint-2", tmp_path / "step2", weights="training") == 2
    step2 = weights(tmp_path / "step2")
    step4 = weights(run_dir / "checkpoint-4")
    assert any(not torch.equal(step2[k], step4[k]) for k in step2)


def test_cli_export_and_its_errors(run_dir, tmp_path, capsys):
    assert cli(["export", str(run_dir / "checkpoint-4"), "-o", str(tmp_path / "cli"), "--weights", "training"]) == 0
    assert "exported the training weights of step 4" in capsys.readouterr().out
    assert (tmp_path / "cli" / "boost_config.json").is_file()

    assert cli(["export", str(run_dir), "-o", str(tmp_path / "x")]) == 2  # the run folder, not a checkpoint
    assert "not a training checkpoint folder" in capsys.readouterr().err
    assert cli(["export", str(run_dir / "checkpoint-4"), "-o", str(tmp_path / "x"),
                "--like", str(tmp_path)]) == 2
    assert "pass --like" in capsys.readouterr().err
    assert cli(["export", str(run_dir / "checkpoint-2"), "-o", str(run_dir / "upsampler")]) == 2
    assert "write somewhere else" in capsys.readouterr().err


def test_weights_of_another_architecture_are_refused(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "boost_config.json"):
        (other / name).write_text((run_dir / "upsampler" / name).read_text())
    config = json.loads((other / "config.json").read_text())
    config["layers_per_block"] += 1
    (other / "config.json").write_text(json.dumps(config))
    assert cli(["export", str(run_dir / "checkpoint-4"), "-o", str(tmp_path / "x"), "--like", str(other)]) == 2
    assert "do not fit the CFMUNet" in capsys.readouterr().err


def copy_of_checkpoint_4(run_dir, tmp_path, names) -> Path:
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    for name in names:
        (checkpoint / name).write_bytes((run_dir / "checkpoint-4" / name).read_bytes())
    return checkpoint


def test_an_incomplete_checkpoint_is_refused(run_dir, tmp_path):
    checkpoint = copy_of_checkpoint_4(run_dir, tmp_path, ["model.safetensors", EMA_STATE_NAME])  # no trainer state
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        export_checkpoint(checkpoint, tmp_path / "out", like=run_dir / "upsampler")


def test_ema_export_without_ema_state_says_so(run_dir, tmp_path):
    checkpoint = copy_of_checkpoint_4(run_dir, tmp_path, ["model.safetensors", TRAINER_STATE])
    assert not (checkpoint / EMA_STATE_NAME).exists()
    with pytest.raises(FileNotFoundError, match="use_ema false"):
        export_checkpoint(checkpoint, tmp_path / "out", like=run_dir / "upsampler")
