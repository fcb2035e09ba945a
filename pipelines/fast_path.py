"""The fast path: diffusers' recipe for compiling a pipeline's networks, and the check that it can run here.

diffusers compiles a pipeline's UNet as (docs, "Accelerate inference" → torch.compile)

    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)

`BoostPipeline.enable_fast_path` applies exactly this to the base UNet, v_θ and R, and `compile_upsampler` to the v_θ
and R of an `Upsampler` that image-only commands render with (`fmboost upscale --fast`, the page's Upscale tab), both
through `compile_networks`, with static shapes (dynamic=False): each size compiles once, on its first call, and later
calls at the same sizes reuse it.
Why: at batch 1 on a GPU an SD UNet step costs the same at 32² latents as at 128² in eager mode (0.049 vs
0.051 s on an H100, BENCHMARKS.md) because the GPU waits on Python launching kernels; "reduce-overhead" replays
CUDA graphs, so the 16× smaller base stage finally saves time. On a CPU the same call runs inductor's C++
kernels (no CUDA graphs there).
"""

from __future__ import annotations

import logging
import warnings

import torch
from diffusers.utils.torch_utils import is_compiled_module

logger = logging.getLogger(__name__)

#: torch.compile's settings for the fast path: diffusers' for a pipeline's UNet, with static shapes.
FAST_PATH_COMPILE = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}
#: The pipeline components the fast path compiles: the base UNet, v_θ and R (each when present).
FAST_PATH_COMPONENTS = ("unet", "cfm_unet", "regression_unet")


def compile_module(module: torch.nn.Module, **compile_kwargs) -> torch.nn.Module:
    """`module` with channels-last weights, wrapped in torch.compile with FAST_PATH_COMPILE (changed by
    `compile_kwargs`). The wrapper shares the module's weights; compilation happens at its first call."""
    module.to(memory_format=torch.channels_last)
    return torch.compile(module, **{**FAST_PATH_COMPILE, **compile_kwargs})


def compile_networks(networks: list[tuple[object, str]], device: torch.device, **compile_kwargs) -> bool:
    """Replace each network `getattr(owner, name)` of `networks` ((owner, name) pairs; absent or already compiled
    ones are skipped) by `compile_module` of it. Where torch.compile cannot run on `device` (`compile_unavailable`)
    it warns and leaves every network eager. Returns whether the networks are now compiled."""
    reason = compile_unavailable(device, **compile_kwargs)
    if reason is not None:
        warnings.warn(f"fast path unavailable on {device}, running eager (the same image, uncompiled): "
                      f"torch.compile failed: {reason}", stacklevel=3)
        return False
    for owner, name in networks:
        module = getattr(owner, name, None)
        if module is not None and not is_compiled_module(module):
            setattr(owner, name, compile_module(module, **compile_kwargs))
    return True


def compile_upsampler(upsampler, device: torch.device, **compile_kwargs) -> bool:
    """The fast path of an `Upsampler` (before `mixed_precision`, on `device`): its v_θ and, for posterior-mean
    flows, R compiled in place (`compile_networks`; a restorer stays eager, as in `BoostPipeline`). They compile at
    their first call at each size, which is slow and said here. Returns whether they are compiled."""
    from fmboost.models.posterior_mean import PosteriorMean

    networks = [(upsampler, "model")]
    if isinstance(upsampler.estimate, PosteriorMean):
        networks.append((upsampler.estimate, "model"))
    compiled = compile_networks(networks, device, **compile_kwargs)
    if compiled:
        logger.warning("fast path: the upsampler's networks compile with torch.compile at their first call at each "
                       "size (slow); later calls at the same sizes are fast")
    return compiled


def compile_unavailable(device: torch.device, **compile_kwargs) -> str | None:
    """Why torch.compile with the fast path's settings cannot run on `device` (one line), or None when it can.

    Compiles and runs a two-operation function: that needs what any network needs (inductor's C++ compiler on a
    CPU, Triton on a GPU), and fails in seconds instead of at a network's first call, mid-generation."""
    try:
        compiled = torch.compile(_probe, **{**FAST_PATH_COMPILE, **compile_kwargs})
        x = torch.linspace(-1, 1, 16, device=device).view(2, 8)
        if not torch.allclose(compiled(x).cpu(), _probe(x).cpu(), atol=1e-5):
            return "the compiled probe gave another result than eager"
    except Exception as err:  # torch.compile raising, a missing compiler, an unsupported device: all mean "eager"
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def _probe(x: torch.Tensor) -> torch.Tensor:
    """(2, 8) → (8,): a pointwise op and a reduction, the two kernel kinds inductor generates."""
    return torch.nn.functional.silu(x * 2 + 1).sum(0)
