"""Resume at the exact step after a kill, and atomic checkpoints under `kill -9` during a save."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fmboost.train import checkpoint as ckpt
from fmboost.train.cfm_upsampler import train
from fmboost.train.config import config_flag

from .conftest import weights

ENTRY = Path(__file__).resolve().parents[2] / "train" / "cfm_upsampler.py"


def run_entry(config, fault: str | None = None, **overrides) -> subprocess.CompletedProcess:
    """The accelerate entry script in a subprocess, with the config as --key value overrides."""
    args = []
    for key, value in {**config.to_dict(), **overrides}.items():
        if value is not None:
            args += [config_flag(key), json.dumps(value) if not isinstance(value, str) else value]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env[ckpt.FAULT_ENV] = fault
    return subprocess.run([sys.executable, str(ENTRY), *args], env=env, capture_output=True, text=True, timeout=300)


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture
def reference(tiny_config):
    """An uninterrupted 4-step run (in-process: `fmboost train` runs the same code)."""
    torch.set_num_threads(1)
    config = tiny_config("reference")
    train(config)
    return Path(config.output_dir)


def test_resume_after_kill_matches_uninterrupted_run(tiny_config, reference):
    config = tiny_config("killed")
    killed = run_entry(config, fault="kill_after_step:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = Path(config.output_dir)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "upsampler").exists()
    resumed = run_entry(config, resume_from_checkpoint="latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    state = json.loads((out / "checkpoint-4" / ckpt.TRAINER_STATE).read_text())
    assert state == json.loads((reference / "checkpoint-4" / ckpt.TRAINER_STATE).read_text())
    assert state["global_step"] == 4
    assert_same_weights(weights(out / "checkpoint-4"), weights(reference / "checkpoint-4"))  # training weights
    assert_same_weights(weights(out / "upsampler"), weights(reference / "upsampler"))  # EMA weights


def test_kill_during_save_leaves_previous_checkpoint_loadable(tiny_config, reference):
    config = tiny_config("killed_in_save")
    killed = run_entry(config, fault="kill_during_save:4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = Path(config.output_dir)
    assert (out / f"{ckpt.TMP_PREFIX}4").is_dir()  # the half-finished save is there ...
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]  # ... but never taken for a checkpoint
    train(config.__class__(**{**config.to_dict(), "resume_from_checkpoint": "latest"}))
    assert not (out / f"{ckpt.TMP_PREFIX}4").exists()  # cleaned up on start
    assert_same_weights(weights(out / "checkpoint-4"), weights(reference / "checkpoint-4"))


def test_total_limit_keeps_newest(tiny_config):
    config = tiny_config("limited", max_train_steps=6, checkpoints_total_limit=2, validation_steps=100)
    train(config)
    assert [p.name for p in ckpt.list_checkpoints(config.output_dir)] == ["checkpoint-4", "checkpoint-6"]


def test_resolve_checkpoint(tmp_path):
    assert ckpt.resolve_checkpoint(tmp_path, "latest") is None
    assert ckpt.resolve_checkpoint(tmp_path, None) is None
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / ckpt.TRAINER_STATE).write_text("{}")
    (tmp_path / "checkpoint-9").mkdir()  # incomplete: no trainer state
    assert ckpt.resolve_checkpoint(tmp_path, "latest").name == "checkpoint-10"
    with pytest.raises(FileNotFoundError, match="checkpoint-9"):
        ckpt.resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-9"))


def test_continue_with_another_world_size_keeps_the_sample_position():
    """Batches of one process into the epoch × processes = batches of the epoch's permutation consumed."""
    saved = ckpt.TrainerState(global_step=12, epoch=3, batches_in_epoch=12, num_processes=2)
    assert ckpt.continue_with(saved, 2) == saved
    assert ckpt.continue_with(saved, 1) == ckpt.TrainerState(12, 3, 24, 1)
    assert ckpt.continue_with(saved, 8) == ckpt.TrainerState(12, 3, 3, 8)  # 24 batches = 3 steps of 8 processes
    assert ckpt.continue_with(saved, 5) == ckpt.TrainerState(12, 3, 4, 5)  # rounded down: 4 batches seen again


def test_checkpoints_from_before_the_world_size_was_recorded_still_load(tmp_path):
    (tmp_path / ckpt.TRAINER_STATE).write_text(json.dumps(dict(global_step=7, epoch=1, batches_in_epoch=5)))
    state = ckpt.read_trainer_state(tmp_path)
    assert state == ckpt.TrainerState(7, 1, 5, None)
    assert ckpt.continue_with(state, 4) == ckpt.TrainerState(7, 1, 5, 4)  # unknown: taken as unchanged


def test_resume_refuses_a_network_built_differently(tiny_config):
    """A changed default (here padding_mode) must not load old weights into another architecture silently."""
    config = tiny_config("changed_network", max_train_steps=2, checkpointing_steps=2, validation_steps=100,
                         padding_mode="zeros")
    train(config)
    saved = json.loads((Path(config.output_dir) / "checkpoint-2" / ckpt.MODEL_CONFIG).read_text())
    assert saved["padding_mode"] == "zeros"
    resumed = {**config.to_dict(), "resume_from_checkpoint": "latest", "max_train_steps": 4}
    with pytest.raises(ValueError, match="padding_mode: checkpoint 'zeros', this run 'replicate'.*--padding-mode"):
        train(config.__class__(**{**resumed, "padding_mode": "replicate"}))
    train(config.__class__(**resumed))  # the same network resumes
    assert (Path(config.output_dir) / "checkpoint-4").is_dir()


def test_resume_with_a_decaying_schedule_cools_down_from_the_checkpoint_step(tiny_config):
    """Training a finished run further (the guide's recipe): a constant-LR run resumed with `cosine` and a larger
    `max_train_steps` continues at the cosine's LR for its step, as if it had used cosine all along."""
    from diffusers.optimization import get_scheduler

    config = tiny_config("cooldown", max_train_steps=2, checkpointing_steps=1, validation_steps=100,
                         lr_scheduler="constant_with_warmup", lr_warmup_steps=1)
    train(config)
    longer = config.__class__(**{**config.to_dict(), "resume_from_checkpoint": "latest", "max_train_steps": 6,
                                 "lr_scheduler": "cosine"})
    train(longer)

    def saved_lr(step: int) -> float:
        state = torch.load(Path(config.output_dir) / f"checkpoint-{step}" / "scheduler.bin", weights_only=False)
        return state["_last_lr"][0]

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    cosine = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=6)
    expected = []
    for _ in range(6):
        optimizer.step()
        cosine.step()
        expected.append(cosine.get_last_lr()[0])
    assert saved_lr(6) == pytest.approx(expected[5], abs=1e-12)  # 0 at the end
    assert saved_lr(5) == pytest.approx(expected[4]) and 0 < saved_lr(5) < config.learning_rate / 2
