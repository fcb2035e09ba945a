"""A network run in its own dtype inside an fp32 ODE: how `Upsampler.mixed_precision` runs v_θ and R.

On a GPU the CFMUNets are stored in fp16 / bf16 for speed and memory, while the ODE state x_t, the time t
and the solver's sum of N small increments stay in fp32. The wrapper casts the inputs to the weights' dtype on
the way in and the velocity back to the state's dtype on the way out, reading the dtype at each call, so it
follows the network through later `.to(dtype)` calls. It also ticks a progress bar once per network evaluation
(`counting`), which is what a user waiting on a 1024² sample wants to see.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm


class MixedPrecisionVelocity(torch.nn.Module):
    """v(x_t (B, C, H, W), t (B,) or float, cond (B, C, H, W)) → (B, C, H, W) in x_t's dtype; `model` runs in its
    own dtype (fp32, fp16 or bf16)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.progress = model, None

    @property
    def size_multiple(self) -> int:
        return self.model.size_multiple

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.model.dtype
        t = torch.as_tensor(t, device=x_t.device, dtype=x_t.dtype)
        v = self.model(x_t.to(dtype), t.to(dtype), cond.to(dtype))
        if self.progress is not None:
            self.progress.update(1)
        return v.to(x_t.dtype)

    @contextlib.contextmanager
    def counting(self, **bar):
        """A progress bar (tqdm keyword arguments `bar`) ticked once per network evaluation while the block runs."""
        with tqdm(total=None, unit="nfe", **bar) as self.progress:
            try:
                yield
            finally:
                self.progress = None
