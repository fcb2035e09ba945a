"""Atomic training checkpoints: `accelerator.save_state` into a temporary folder, then one rename.

    <output_dir>/checkpoint-<step>/     model, optimizer, LR scheduler, EMA, RNG states (accelerate)
                                        + trainer_state.json (step, epoch, batches into the epoch, processes)
    <output_dir>/.tmp-checkpoint-<step>/  a save in progress; never read, removed on the next start

A process killed at any moment — even `kill -9` in the middle of a save — leaves either the
previous checkpoints alone or the new one complete, because `os.replace` of a folder is atomic on
POSIX file systems and a folder only gets its final name once everything inside it is on disk.

With several processes, every one of them writes into the temporary folder (rank 0 the model,
optimizer, scheduler, EMA and trainer state; every rank its own `random_states_<rank>.pkl`), so the
folder has one owner and three barriers: rank 0 creates it before anyone writes, and flushes,
renames and rotates only after every rank has finished writing. `output_dir` must therefore be on a
file system every node sees (the usual shared storage of a cluster); a rank that cannot see the
folder stops with an error naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
#: The network's constructor config: a resume must build the same network (defaults change between versions).
MODEL_CONFIG = "model_config.json"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
# Tests inject faults through this variable, comma-separated:
#   kill_during_save:<step>     rank 0 SIGKILLs itself between writing checkpoint <step> and renaming it
#   slow_save:<rank>:<seconds>  rank <rank> waits before writing its part of every checkpoint (the race of a
#                               rank still writing while rank 0 renames, made likely)
#   kill_after_step:<step>      every process SIGKILLs itself right after that step (cfm_upsampler)
FAULT_ENV = "FMBOOST_FAULT_INJECT"


def injected_faults() -> list[str]:
    return [fault for fault in os.environ.get(FAULT_ENV, "").split(",") if fault]


@dataclass
class TrainerState:
    """Where the run is: optimizer steps done, and the data position (epoch, batches of one process into it).
    `num_processes` is the world size that saved it (None: saved before it was recorded)."""

    global_step: int
    epoch: int
    batches_in_epoch: int
    num_processes: int | None = None


def _fsync_tree(directory: Path) -> None:
    """Flush every file and the folder itself, so the rename never exposes half-written data."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _maybe_inject_fault(step: int) -> None:
    if f"kill_during_save:{step}" in injected_faults():
        os.kill(os.getpid(), signal.SIGKILL)


def _maybe_delay(rank: int) -> None:
    for fault in injected_faults():
        if fault.startswith(f"slow_save:{rank}:"):
            time.sleep(float(fault.rsplit(":", 1)[1]))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders and foreign names ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if re.fullmatch(rf"{PREFIX}\d+", p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete leftovers of saves that were killed. Rank 0 only, at start, before any rank can save."""
    for path in Path(output_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainerState, total_limit: int | None,
                    model_config: dict | None = None) -> Path:
    """Save everything `accelerator` tracks (+ `state`, + the network's `model_config`) as checkpoint-<step>,
    atomically; keep the newest `total_limit`. Every process must call it: each writes its own part of the state."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{state.global_step}"
    tmp = output_dir / f"{TMP_PREFIX}{state.global_step}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()  # 1: the folder exists (and is empty) before anyone writes into it
    if not tmp.is_dir():
        raise RuntimeError(f"rank {rank}: {tmp}, created by rank 0, is not visible here; output_dir must be on a "
                           "file system that every node shares")
    _maybe_delay(rank)
    accelerator.save_state(str(tmp))  # rank 0: model, optimizer, scheduler, EMA; every rank: its RNG state
    if accelerator.is_main_process:
        saved = replace(state, num_processes=accelerator.num_processes)
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(saved)))
        if model_config is not None:
            (tmp / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2))
    accelerator.wait_for_everyone()  # 2: every rank has written and closed its files
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        _maybe_inject_fault(state.global_step)
        if final.exists():  # re-saving a step after a resume: move the old one aside first
            old = output_dir / f"{TMP_PREFIX}{state.global_step}-old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(output_dir)
        if total_limit is not None:
            for stale in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()  # 3: the checkpoint is complete (and the rotated ones gone) for every rank
    return final


def resolve_checkpoint(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """`resume_from` "latest" → the newest complete checkpoint in output_dir (None when there is none,
    so the run starts fresh); a path → that checkpoint, which must be complete."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    return path


def read_trainer_state(path: str | Path) -> TrainerState:
    """The step and data position saved with a checkpoint; only a complete checkpoint has them."""
    state_file = Path(path) / TRAINER_STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    return TrainerState(**json.loads(state_file.read_text()))


def continue_with(state: TrainerState, num_processes: int) -> TrainerState:
    """The saved data position for `num_processes` processes.

    Each step takes one batch per process from the epoch's permutation (a function of seed and epoch
    only), so what was consumed is `batches_in_epoch × saved processes` batches: another world size
    resumes the same permutation at that point (rounded down to its own step), while the global step,
    epoch and LR schedule carry over. Which sample lands on which rank, and the noise draws (RNG states
    are per rank), then differ from an uninterrupted run; with the same world size everything is exact."""
    saved = state.num_processes or num_processes
    return replace(state, batches_in_epoch=state.batches_in_epoch * saved // num_processes,
                   num_processes=num_processes)


def check_model_config(path: Path, model_config: dict) -> None:
    """Raise if the checkpoint at `path` was saved from a network built differently from `model_config`
    (the weights would load into another architecture — e.g. another padding — and training would silently
    start from a broken model). Checkpoints written before MODEL_CONFIG existed are not checked."""
    saved_file = Path(path) / MODEL_CONFIG
    if not saved_file.is_file():
        return
    from fmboost.train.config import config_flag

    saved = json.loads(saved_file.read_text())
    differ = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {model_config.get(k)!r}" for k in differ)
        raise ValueError(f"{path} was saved from another network ({details}); resume with the options that built "
                         f"it (e.g. {config_flag(differ[0])} {json.dumps(saved.get(differ[0]))})")


def load_checkpoint(accelerator, path: Path, model_config: dict | None = None) -> TrainerState:
    """Restore model, optimizer, scheduler, EMA and RNG states; return the data position for this world size.
    `model_config`: the network this run built, checked against the one the checkpoint was saved from."""
    if model_config is not None:
        check_model_config(path, model_config)
    accelerator.load_state(str(path))
    return continue_with(read_trainer_state(path), accelerator.num_processes)
