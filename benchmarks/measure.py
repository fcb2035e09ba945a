"""What the benchmarks measure with: wall-clock seconds (CUDA synchronised) and the process's peak memory."""

from __future__ import annotations

import resource
import time

import torch


def seconds(fn, device: torch.device, warmup: int = 0, repeats: int = 1) -> float:
    """Median wall-clock seconds of fn() over `repeats` calls after `warmup` calls (CUDA synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory (MiB) of this process (or, RUSAGE_CHILDREN, of its largest waited-for child)."""
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB
