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
    """t = u: equal steps, t_i = i / N."""
    return _uniform(num_steps)


def cosine_grid(num_steps: int) -> torch.Tensor:
    """t = (1 − cos πu) / 2: S-shaped, small steps at both ends, large in the middle."""
    u = _uniform(num_steps)
    return (1.0 - torch.cos(math.pi * u)) / 2.0


def polynomial_grid(num_steps: int, power: float = 2.0) -> torch.Tensor:
    """S-shaped power law: t = ½(2u)^p for u ≤ ½ and t = 1 − ½(2(1 − u))^p above (p ≥ 1).

    Each half is u^p mirrored about (½, ½), so dt/du = p(2u)^{p−1} near u = 0: small steps at both
    ends, largest (dt/du = p) in the middle, with p setting how strongly the ends are resolved
    (cosine is one fixed such shape). It is polynomial on each half and exactly symmetric,
    t(1 − u) = 1 − t(u); p = 1 is the linear grid.
    """
    if power < 1:
        raise ValueError(f"power must be >= 1 (below 1 the S turns inside out), got {power}")
    u = _uniform(num_steps)
    half = 0.5 * (2.0 * torch.minimum(u, 1.0 - u)) ** power
    return torch.where(u <= 0.5, half, 1.0 - half)


def inverse_cubic_grid(num_steps: int) -> torch.Tensor:
    """t = 1 − (1 − u)³: large steps first, ever smaller towards t = 1, where fine detail is added."""
    return 1.0 - (1.0 - _uniform(num_steps)) ** 3


def inverse_exp_grid(num_steps: int, rate: float = 3.0) -> torch.Tensor:
    """t = (1 − e^{−k u}) / (1 − e^{−k}): large steps first, exponentially smaller towards t = 1."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    return torch.expm1(-rate * _uniform(num_steps)) / math.expm1(-rate)


def logit_normal_grid(num_steps: int, mu: float = 0.0, std: float = 3.0) -> torch.Tensor:
    """The logit-normal(μ, σ) CDF on the uniform grid: t_i = Φ((logit(u_i) − μ) / σ), from 0 to 1.

    dt/du is the logit-normal density at u, so steps are large where that density is high. For a
    wide σ (the study's σ = 3) that density is U-shaped and the grid an inverted S: large steps at both
    ends, small in the middle around t = Φ(−μ/σ) (the image of u = ½); μ > 0 moves that slow-down
    towards t = 0 (σ = 3, μ = 1: t ≈ 0.34), μ < 0 towards t = 1. The ends only outgrow the middle
    once σ ≳ 1.7 (μ = 0, N = 8; ≈ 1.9 at N = 100): at σ = 1 the grid is S-shaped instead, small steps
    at both ends like cosine. The default σ = 3 is the timestep-schedule study's best grid.
    """
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    return torch.special.ndtr((torch.logit(_uniform(num_steps)) - mu) / std)


def logit_normal_quantile_grid(num_steps: int, mu: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Quantiles of the logit-normal(μ, σ) training-time density: t_i = sigmoid(μ + σ Φ⁻¹(u_i)).

    The inverse of `logit_normal_grid`'s map: points are dense where the training density is high,
    so each step covers an equal share of the times the network was trained on (SD3, Esser et al.
    2024, Eq. 19). For σ = 1: large steps at both ends, small in the middle around t = sigmoid(μ);
    μ > 0 moves the slow-down towards t = 1.
    """
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    return torch.sigmoid(mu + std * torch.special.ndtri(_uniform(num_steps)))


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear_grid,
    "cosine": cosine_grid,
    "polynomial": polynomial_grid,
    "inverse_cubic": inverse_cubic_grid,
    "inverse_exp": inverse_exp_grid,
    "logit_normal": logit_normal_grid,
    "logit_normal_quantile": logit_normal_quantile_grid,
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
    """Wraps v(x, t) as torchdiffeq's f(t, x) and counts every call, the NFE (probe included).

    Before their first step (`callback_step`) the adaptive solvers call f at t0 and at the initial
    step-size probe t0 + h0, which can lie past t = 1 where the network was never trained: only those
    calls are clamped to [0, 1]. Every stage of every step must lie in [0, 1] (`sample_adaptive` makes
    the last step end exactly at 1), so a time outside it raises rather than silently freezing v at 1.
    """

    def __init__(self, velocity: Velocity):
        super().__init__()
        self.velocity, self.nfe, self.stepping = velocity, 0, False

    def callback_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        """torchdiffeq calls this before every step: from the first one on, nothing is clamped."""
        self.stepping = True

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        if not self.stepping:
            t = t.clamp(0.0, 1.0)
        elif not 0.0 <= t <= 1.0:
            raise RuntimeError(f"solver stage at t = {t.item()} outside [0, 1]")
        return self.velocity(x, t)


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


# torchdiffeq's "rk4" is Kutta's 3/8 rule, also of fourth order; "heun2" is the second-order Heun.
FIXED_SOLVERS = {"euler": None, "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4"}
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
SOLVERS = tuple(FIXED_SOLVERS) + ADAPTIVE_SOLVERS


def sample_fixed(velocity: Velocity, x0: torch.Tensor, ts: torch.Tensor, method: str,
                 return_intermediates: bool = False) -> SampleResult:
    """A fixed-step torchdiffeq method (midpoint, heun, rk4) stepping exactly on the grid ts (T,).

    The grid and step sizes stay at least float32: in float16/bfloat16 neighbouring points of a fine
    grid round to the same time (inverse_cubic at N = 40 near t = 1). torchdiffeq still hands the
    velocity t in x0's dtype; float32/float64 states step on a grid of their own dtype, as before.
    """
    if method == "euler":
        return sample_euler(velocity, x0, ts, return_intermediates)
    f = _CountedVelocity(velocity)
    ts = ts.to(device=x0.device, dtype=torch.promote_types(x0.dtype, torch.float32))
    traj = torchdiffeq.odeint(f, x0, ts, method=FIXED_SOLVERS[method])
    return SampleResult(traj[-1], f.nfe, ts if return_intermediates else None,
                        traj if return_intermediates else None)


def sample_adaptive(velocity: Velocity, x0: torch.Tensor, method: str = "dopri5", atol: float = 1e-6,
                    rtol: float = 1e-3, num_outputs: int = 2) -> SampleResult:
    """Adaptive step-size integration from 0 to 1 (reference tolerances atol 1e-6, rtol 1e-3).

    The solver picks its own steps; `num_outputs` > 2 returns states at that many equally
    spaced times as the trajectory (these are interpolated, they do not add NFE). Left alone,
    torchdiffeq steps past t = 1 and interpolates back; `step_t` = [1] cuts the step that would cross
    it short, so the last step ends exactly at 1 and its stages see v at their own times. (`jump_t`
    would do the same but then re-evaluate v just past 1.)
    """
    f = _CountedVelocity(velocity)
    ts = torch.linspace(0.0, 1.0, num_outputs, device=x0.device, dtype=x0.dtype)
    traj = torchdiffeq.odeint(f, x0, ts, method=method, atol=atol, rtol=rtol, options={"step_t": ts[-1:]})
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
