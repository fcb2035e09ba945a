"""The processes a launcher started: what training and a collection upscale ask before they make an Accelerator.

`torchrun` and `accelerate launch` tell each process its rank and the world size in the environment. Without a GPU
(or other accelerator) Accelerate would run each of N such processes as a lone single-process run; both callers then
pass `cpu=True`, which selects gloo and makes the N processes one group.
"""

from __future__ import annotations

import os

import torch


def launched_as() -> tuple[int, int]:
    """(rank, world size) that the launcher (torchrun, `accelerate launch`) gave this process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def has_device() -> bool:
    """A GPU (or other device) Accelerate distributes over; torch < 2.6 has no `torch.accelerator`."""
    device_api = getattr(torch, "accelerator", None)
    return device_api.is_available() if device_api is not None else torch.cuda.is_available()
