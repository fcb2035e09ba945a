"""Atomic training checkpoints: `accelerator.save_state` into a temporary folder, then one rename.

    <output_dir>/checkpoint-<step>/     model, optimizer, LR scheduler, EMA, RNG states (accelerate)
                                        + trainer_state.json (step, epoch, batches into the epoch)
    <output_dir>/.tmp-checkpoint-<step>/  a save in progress; never read, removed on the next start

A process killed at any moment — even `kill -9` in the middle of a save — leaves either the
previous checkpoints alone or the new one complete, because `os.replace` of a folder is atomic on
POSIX file systems and a folder only gets its final name once everything inside it is on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
# Tests set this to "kill_during_save:<step>" to SIGKILL the process between writing and renaming.
FAULT_ENV = "FMBOOST_FAULT_INJECT"


@dataclass
class TrainerState:
    """Where the run is: optimizer steps done, and the data position (epoch, batches into it)."""

    global_step: int
    epoch: int
    batches_in_epoch: int


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
    if os.environ.get(FAULT_ENV) == f"kill_during_save:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders and foreign names ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if re.fullmatch(rf"{PREFIX}\d+", p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete leftovers of saves that were killed (main process only)."""
    for path in Path(output_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainerState, total_limit: int | None) -> Path:
    """Save everything `accelerator` tracks (+ `state`) as checkpoint-<step>, atomically; keep the newest
    `total_limit`. Every process must call it (accelerate gathers sharded state)."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{state.global_step}"
    tmp = output_dir / f"{TMP_PREFIX}{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state)))
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
    accelerator.wait_for_everyone()
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


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    """Restore model, optimizer, scheduler, EMA and RNG states; return the data position."""
    accelerator.load_state(str(path))
    return read_trainer_state(path)
