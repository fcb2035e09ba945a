"""Data-parallel training in several processes (torchrun, gloo on CPUs): the demo config trained by two
processes, killed with SIGKILL, resumed by one process, killed again and finished by two.

Rank 1 is slowed down before it writes its part of every checkpoint (`slow_save`), which makes the
race of rank 0 renaming the temporary folder while rank 1 still writes into it fire on every save
unless the barriers of `checkpoint.save_checkpoint` hold.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fmboost.models import Upsampler
from fmboost.train import checkpoint as ckpt
from fmboost.train.cfm_upsampler import make_accelerator
from fmboost.train.config import config_flag, load_config
from fmboost.train.latent_cache import weights_digest

from .conftest import fitted_back_projection

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "train" / "cfm_upsampler.py"
DEMO = ROOT / "configs" / "demo.yaml"


def launch(processes: int, output_dir: Path, cache_dir: Path, faults: tuple[str, ...] = (),
           **overrides) -> subprocess.CompletedProcess:
    """The demo config in `processes` processes (torchrun for more than one); stdout and stderr together."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    args = {"output_dir": str(output_dir), "latent_cache_dir": str(cache_dir), "validation_steps": 1000,
            "checkpointing_steps": 2, "checkpoints_total_limit": 2, **overrides}
    tokens = [token for key, value in args.items() for token in (config_flag(key), str(value))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", ckpt.FAULT_ENV: ",".join(faults)}
    return subprocess.run([*launcher, str(ENTRY), "--config", str(DEMO), *tokens], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)


def step_losses(log: str) -> list[float]:
    """The loss of every step, from rank 0's progress bar (tqdm redraws a step's postfix; repeats dropped)."""
    losses = [float(x) for x in re.findall(r"loss=([0-9.]+)", log)]
    return [x for i, x in enumerate(losses) if i == 0 or x != losses[i - 1]]


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / ckpt.TRAINER_STATE).read_text())


def scheduler_position(checkpoint: Path) -> int:
    return torch.load(checkpoint / "scheduler.bin", weights_only=False)["last_epoch"]


def assert_complete(out: Path, processes: dict[str, int]):
    """Exactly these checkpoints, each holding the RNG state of every rank that saved it; no temporary folder
    left behind."""
    assert [p.name for p in ckpt.list_checkpoints(out)] == list(processes)
    for name, count in processes.items():
        assert sorted(p.name for p in (out / name).glob("random_states_*.pkl")) == \
            [f"random_states_{rank}.pkl" for rank in range(count)]
    assert not list(out.glob(f"{ckpt.TMP_PREFIX}*"))


@pytest.mark.slow
def test_two_processes_train_resume_with_one_and_finish_with_two(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"

    # two processes, rank 1 slow at every checkpoint, all killed with SIGKILL after step 12 of 16
    first = launch(2, out, cache, ("slow_save:1:0.2", "kill_after_step:12"), max_train_steps=16)
    assert first.returncode != 0, first.stdout[-3000:]
    log = first.stdout
    assert "batch 16, 16 steps (0.1 epochs) on 2 processes (8 samples each)" in log, log[-3000:]
    assert log.count("latent cache built") == 1 and log.count("training a cfm upsampler") == 1
    steps = [int(n) for n in re.findall(r"\| *(\d+)/16 \[", log)]
    assert steps and steps == sorted(steps)  # one progress bar (rank 0's): the count never goes back
    losses = step_losses(log)
    assert len(losses) == 12
    assert sum(losses[-4:]) < 0.6 * sum(losses[:4]), losses
    assert_complete(out, {"checkpoint-10": 2, "checkpoint-12": 2})
    assert trainer_state(out / "checkpoint-12") == dict(global_step=12, epoch=0, batches_in_epoch=12, num_processes=2)
    assert not (out / "upsampler").exists()

    # one process resumes the two-process checkpoint: 12 batches of 2 ranks = 24 batches into the epoch
    second = launch(1, out, cache, ("kill_after_step:14",), max_train_steps=16, resume_from_checkpoint="latest")
    assert second.returncode == -9, second.stdout[-3000:]
    assert f"resumed from {out / 'checkpoint-12'} at step 12 (saved by 2 processes, continued by 1" in second.stdout
    assert_complete(out, {"checkpoint-12": 2, "checkpoint-14": 1})
    assert trainer_state(out / "checkpoint-14") == dict(global_step=14, epoch=0, batches_in_epoch=26, num_processes=1)
    assert scheduler_position(out / "checkpoint-14") == 14  # the LR schedule advances once per step and process

    # two processes finish it
    third = launch(2, out, cache, ("slow_save:1:0.2",), max_train_steps=16, resume_from_checkpoint="latest")
    assert third.returncode == 0, third.stdout[-3000:]
    assert "at step 14 (saved by 1 processes, continued by 2" in third.stdout
    assert_complete(out, {"checkpoint-14": 1, "checkpoint-16": 2})
    assert trainer_state(out / "checkpoint-16") == dict(global_step=16, epoch=0, batches_in_epoch=15, num_processes=2)
    assert scheduler_position(out / "checkpoint-16") == 32
    assert third.stdout.count("saved the EMA upsampler") == 1
    digest = re.search(r"weights sha256 ([0-9a-f]{64}), identical on all 2 processes", third.stdout)
    assert digest, third.stdout[-3000:]
    saved = Upsampler.from_pretrained(out / "upsampler")
    assert weights_digest(saved.model.parameters()) == digest[1]  # rank 0's EMA weights are the saved ones
    assert third.stdout.count("render settings fitted") == 1  # by rank 0 alone, before it saved
    assert saved.sampler.back_project == fitted_back_projection(third.stdout)[1]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-14", "checkpoint-16", "upsampler", "validation"]


def test_refuses_to_run_when_accelerate_sees_fewer_processes_than_launched(tmp_path, monkeypatch):
    """A launcher that started two processes, an Accelerate that sees one: each would train alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # Accelerate then finds no distributed launch
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)  # so it is not told to use gloo
    config = load_config(DEMO, {"output_dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match="rank 1: launched as one of 2 processes, but Accelerate runs 1"):
        make_accelerator(config)
