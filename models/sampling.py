"""ODE samplers for the CFM velocity field: time grids, solvers, and NFE accounting.

Sampling integrates dx/dt = v(x, t) from t = 0 (the noise-augmented, up-sampled source x0)
to t = 1 (the high-resolution latent x1). Every solver returns a :class:`SampleResult` that
carries the number of function evaluations (NFE) actually spent — the honest cost measure,
since `num_steps` means different work for different solvers (Euler: 1 NFE/step, midpoint: 2,
rk4: 4, dopri5: adaptive).

Time grids map a uniform grid u ∈ [0, 1] to t ∈ [0, 1]; every grid starts at exactly 0, ends at
exactly 1 and is strictly increasing. Where the grid is dense the solver "slows down".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchdiffeq

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""v(x, t): x (B, C, H, W), t a 0-d tensor in [0, 1] → velocity (B, C, H, W)."""


@dataclass
class SampleResult:
    """x1: (B, C, H, W) final state; nfe: velocity evaluations spent; times: (T,) the time points
    of `trajectory` (T, B, C, H, W), which is only filled when intermediates were asked for."""

    x1: torch.Tensor
    nfe: int
    times: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None


# --------------------------------------------------------------------------- time grids


def _uniform(num_steps: int) -> torch.Tensor:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    return torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)


def linear_grid(num_steps: int) -> torch.Tensor:
    """Equal steps: t_i = i / N."""
    return _uniform(num_steps)


def cosine_grid(num_steps: int) -> torch.Tensor:
    """t = (1 − cos πu) / 2: small steps at both ends, large in the middle."""
    u = _uniform(num_steps)
    return (1.0 - torch.cos(math.pi * u)) / 2.0


def polynomial_grid(num_steps: int, power: float = 2.0) -> torch.Tensor:
    """t = u^p (p > 1): small steps near t = 0, where the source's noise is resolved."""
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    return _uniform(num_steps) ** power


def inverse_cubic_grid(num_steps: int) -> torch.Tensor:
    """t = 1 − (1 − u)³: small steps near t = 1, where fine detail is added."""
    return 1.0 - (1.0 - _uniform(num_steps)) ** 3


def inverse_exp_grid(num_steps: int, rate: float = 3.0) -> torch.Tensor:
    """t = (1 − e^{−k u}) / (1 − e^{−k}): large steps first, exponentially smaller towards t = 1."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    return torch.expm1(-rate * _uniform(num_steps)) / math.expm1(-rate)


def logit_normal_grid(num_steps: int, mu: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Quantiles of the logit-normal(μ, σ) distribution, t = sigmoid(μ + σ Φ⁻¹(u)).

    Points are dense where the logit-normal training-time density is high: large steps at
    both ends, small in the middle around t = sigmoid(μ); μ > 0 moves the slow-down towards
    t = 1 (SD3, Esser et al. 2024, Eq. 19, used here as a sampling grid).
    """
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    u = _uniform(num_steps)
    t = torch.sigmoid(mu + std * torch.special.ndtri(u))
    t[0], t[-1] = 0.0, 1.0
    return t


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear_grid,
    "cosine": cosine_grid,
    "polynomial": polynomial_grid,
    "inverse_cubic": inverse_cubic_grid,
    "inverse_exp": inverse_exp_grid,
    "logit_normal": logit_normal_grid,
}


def time_grid(schedule: str, num_steps: int, **params: float) -> torch.Tensor:
    """(num_steps + 1,) float64 grid from 0 to 1 for the named schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    try:
        ts = SCHEDULES[schedule](num_steps, **params)
    except TypeError as err:
        raise ValueError(f"bad parameters {params} for schedule {schedule!r}: {err}") from None
    if not bool((ts[1:] > ts[:-1]).all()):
        raise ValueError(f"schedule {schedule!r} with {params} is not strictly increasing at N={num_steps}")
    return ts


# --------------------------------------------------------------------------- solvers


class _CountedVelocity(torch.nn.Module):
    """Wraps v(x, t) to count evaluations (torchdiffeq calls f(t, x)).

    t is clamped to [0, 1]: torchdiffeq's initial step-size heuristic probes f at t0 + h0, which can
    lie just past the end of the interval, where the network was never trained.
    """

    def __init__(self, velocity: Velocity):
        super().__init__()
        self.velocity, self.nfe = velocity, 0

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.velocity(x, t.clamp(0.0, 1.0))


def sample_euler(velocity: Velocity, x0: torch.Tensor, ts: torch.Tensor, return_intermediates: bool = False):
    """Explicit Euler on the grid ts (T,): x_{i+1} = x_i + (t_{i+1} − t_i) v(x_i, t_i); NFE = T − 1."""
    ts = ts.to(x0.device)
    x, states = x0, [x0]
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t).to(x.dtype) * velocity(x, t.to(x.dtype))
        if return_intermediates:
            states.append(x)
    trajectory = torch.stack(states) if return_intermediates else None
    return SampleResult(x, len(ts) - 1, ts.float() if return_intermediates else None, trajectory)


FIXED_SOLVERS = {"euler": None, "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4"}
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
SOLVERS = tuple(FIXED_SOLVERS) + ADAPTIVE_SOLVERS


def sample_fixed(velocity: Velocity, x0: torch.Tensor, ts: torch.Tensor, method: str,
                 return_intermediates: bool = False) -> SampleResult:
    """A fixed-step torchdiffeq method (midpoint, heun, rk4) stepping exactly on the grid ts."""
    if method == "euler":
        return sample_euler(velocity, x0, ts, return_intermediates)
    f = _CountedVelocity(velocity)
    ts = ts.to(device=x0.device, dtype=x0.dtype)
    traj = torchdiffeq.odeint(f, x0, ts, method=FIXED_SOLVERS[method])
    return SampleResult(traj[-1], f.nfe, ts if return_intermediates else None,
                        traj if return_intermediates else None)


def sample_adaptive(velocity: Velocity, x0: torch.Tensor, method: str = "dopri5", atol: float = 1e-6,
                    rtol: float = 1e-3, num_outputs: int = 2) -> SampleResult:
    """Adaptive step-size integration from 0 to 1 (reference tolerances atol 1e-6, rtol 1e-3).

    The solver picks its own steps; `num_outputs` > 2 returns states at that many equally
    spaced times as the trajectory (these are interpolated, they do not add NFE).
    """
    f = _CountedVelocity(velocity)
    ts = torch.linspace(0.0, 1.0, num_outputs, device=x0.device, dtype=x0.dtype)
    traj = torchdiffeq.odeint(f, x0, ts, method=method, atol=atol, rtol=rtol)
    keep = num_outputs > 2
    return SampleResult(traj[-1], f.nfe, ts if keep else None, traj if keep else None)


def sample_ode(velocity: Velocity, x0: torch.Tensor, *, solver: str = "euler", num_steps: int = 40,
               schedule: str = "linear", schedule_params: dict | None = None, atol: float = 1e-6,
               rtol: float = 1e-3, return_intermediates: bool = False) -> SampleResult:
    """Integrate from x0 (B, C, H, W) at t = 0 to t = 1 with any solver/schedule; reports NFE.

    Fixed-step solvers take `num_steps` steps on `time_grid(schedule, num_steps, **schedule_params)`;
    adaptive solvers ignore num_steps/schedule and use atol/rtol instead.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (B, C, H, W), got shape {tuple(x0.shape)}")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 contains NaN or inf")
    if solver in ADAPTIVE_SOLVERS:
        num_outputs = num_steps + 1 if return_intermediates else 2
        return sample_adaptive(velocity, x0, solver, atol, rtol, num_outputs)
    ts = time_grid(schedule, num_steps, **(schedule_params or {}))
    return sample_fixed(velocity, x0, ts, solver, return_intermediates)
