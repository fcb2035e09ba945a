import math

import numpy as np
import pytest
import torch
import torchdiffeq
from fmboost.models.sampling import (
    ADAPTIVE_SOLVERS,
    FIXED_SOLVERS,
    SCHEDULES,
    _CountedVelocity,
    sample_fixed,
    sample_ode,
    time_grid,
)

NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}

# --------------------------------------------------------------------------- time grids


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("num_steps", [1, 2, 7, 40])
def test_grid_starts_at_0_ends_at_1_increasing(schedule, num_steps):
    ts = time_grid(schedule, num_steps)
    assert ts.shape == (num_steps + 1,) and ts.dtype == torch.float64
    assert ts[0].item() == 0.0 and ts[-1].item() == 1.0
    assert bool((ts[1:] > ts[:-1]).all())


def steps(schedule, num_steps=10, **params):
    return time_grid(schedule, num_steps, **params).diff()


def test_linear_grid_has_equal_steps():
    assert torch.allclose(steps("linear"), torch.full((10,), 0.1, dtype=torch.float64))


@pytest.mark.parametrize("schedule,params", [("cosine", {}), ("polynomial", {}), ("polynomial", {"power": 3.0}),
                                             ("logit_normal", {"std": 1.0})])
def test_s_shaped_grids_are_slowest_at_both_ends_fastest_in_the_middle(schedule, params):
    s = steps(schedule, **params)
    assert s[0] < s[1:-1].min() and s[-1] < s[1:-1].min()
    assert int(s.argmax()) in (4, 5)
    assert torch.allclose(s, s.flip(0))  # symmetric about t = ½


def test_polynomial_grid_is_the_mirrored_power_law():
    u = torch.linspace(0, 1, 9, dtype=torch.float64)
    expected = torch.where(u <= 0.5, 0.5 * (2 * u) ** 3, 1 - 0.5 * (2 * (1 - u)) ** 3)
    torch.testing.assert_close(time_grid("polynomial", 8, power=3.0), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(time_grid("polynomial", 8, power=1.0), time_grid("linear", 8), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="power must be >= 1"):
        time_grid("polynomial", 8, power=0.5)


@pytest.mark.parametrize("schedule", ["inverse_cubic", "inverse_exp"])
def test_inverse_grids_take_large_steps_first_ever_smaller_towards_1(schedule):
    s = steps(schedule)
    assert bool((s[1:] < s[:-1]).all())


def test_logit_normal_is_the_cdf_on_the_uniform_grid():
    expected = [0, 0.258, 0.357, 0.432, 0.5, 0.568, 0.643, 0.742, 1]
    assert time_grid("logit_normal", 8, mu=0.0, std=3.0).numpy().round(3).tolist() == expected
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    grid = time_grid("logit_normal", 8, mu=0.7, std=2.0)
    for i in range(1, 8):
        assert grid[i].item() == pytest.approx(phi((math.log(i / (8 - i)) - 0.7) / 2.0), rel=1e-12)


def test_wide_logit_normal_is_an_inverted_s():
    for num_steps in (8, 10, 40):
        s = steps("logit_normal", num_steps, std=3.0)
        middle = s[num_steps // 2 - 1:num_steps // 2 + 1].min()
        assert s[0] > middle and s[-1] > middle, num_steps
        assert int(s.argmax()) in (0, num_steps - 1)
        assert num_steps // 2 - 2 <= int(s.argmin()) <= num_steps // 2 + 1


def slowest_time(schedule, **params):
    """The t where the grid (20 steps) takes its smallest step."""
    ts = time_grid(schedule, 20, **params)
    i = int(ts.diff().argmin())
    return float(ts[i:i + 2].mean())


def test_logit_normal_mu_moves_the_slow_down_towards_0():
    """t(u) is the CDF, so where the density thins out (μ > 0: its low tail, t < ½) the grid is dense."""
    assert slowest_time("logit_normal", mu=1.0, std=3.0) < slowest_time("logit_normal", mu=0.0, std=3.0) < \
        slowest_time("logit_normal", mu=-1.0, std=3.0)
    assert slowest_time("logit_normal", mu=1.0, std=3.0) < 0.4
    assert slowest_time("logit_normal", mu=0.0, std=3.0) == pytest.approx(0.5, abs=0.02)


def test_logit_normal_quantile_is_dense_where_the_training_density_is_high():
    ts = time_grid("logit_normal_quantile", 8, mu=0.5, std=1.0)
    expected = torch.sigmoid(0.5 + torch.special.ndtri(torch.linspace(0, 1, 9, dtype=torch.float64)))
    torch.testing.assert_close(ts, expected, rtol=0, atol=1e-15)
    s = steps("logit_normal_quantile")
    assert s[0] > s[4] and s[-1] > s[5] and int(s.argmin()) in (4, 5)
    assert slowest_time("logit_normal_quantile", mu=-1.0) < slowest_time("logit_normal_quantile", mu=0.0) < \
        slowest_time("logit_normal_quantile", mu=1.0)
    assert slowest_time("logit_normal_quantile", mu=1.0) > 0.6


def test_bad_schedule_and_solver_names():
    with pytest.raises(ValueError, match="schedule must be one of"):
        time_grid("quadratic", 4)
    with pytest.raises(ValueError, match="num_steps"):
        time_grid("linear", 0)
    with pytest.raises(ValueError, match="bad parameters"):
        time_grid("linear", 4, mu=1.0)
    with pytest.raises(ValueError, match="solver must be one of"):
        sample_ode(lambda x, t: x, torch.zeros(1, 1, 2, 2), solver="leapfrog")
    with pytest.raises(ValueError, match="NaN"):
        sample_ode(lambda x, t: x, torch.full((1, 1, 2, 2), float("nan")))


# --------------------------------------------------------------------------- fixed-step solvers


class Exponential:
    """dx/dt = λ x: the exact solution x(1) = x0 e^λ, and every call is counted independently."""

    def __init__(self, rate=1.3):
        self.rate, self.calls = rate, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.rate * x


def test_euler_spends_exactly_num_steps_nfe_and_converges_first_order():
    x0 = torch.ones(2, 1, 3, 3, dtype=torch.float64)
    errors = []
    for n in (10, 20, 40):
        field = Exponential()
        result = sample_ode(field, x0, solver="euler", num_steps=n)
        assert result.nfe == n == field.calls
        errors.append((result.x1 - math.exp(1.3)).abs().max().item())
    assert 1.8 < errors[0] / errors[1] < 2.2 and 1.8 < errors[1] / errors[2] < 2.2


@pytest.mark.parametrize("solver,tolerance", [("midpoint", 3e-2), ("heun", 3e-2), ("rk4", 1e-4)])
def test_fixed_step_solvers_report_their_nfe(solver, tolerance):
    field = Exponential()
    result = sample_ode(field, torch.ones(1, 1, 2, 2, dtype=torch.float64), solver=solver, num_steps=8)
    assert result.nfe == field.calls == 8 * NFE_PER_STEP[solver]
    euler_error = abs(sample_ode(Exponential(), torch.ones(1, 1, 1, 1, dtype=torch.float64), num_steps=8).x1.item()
                      - math.exp(1.3))
    error = (result.x1 - math.exp(1.3)).abs().max().item()
    assert error < tolerance and error < euler_error / 5  # higher order than Euler


def riccati(x, t):
    """dx/dt = t x²: nonlinear in x and t, solved by x(t) = 1 / (1/x0 − t²/2)."""
    return t * x * x


def riccati_x1(x0):
    return 1 / (1 / x0 - 0.5)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_fixed_step_solvers_converge_at_their_order(solver, order):
    x0 = torch.linspace(0.2, 0.6, 4, dtype=torch.float64).reshape(1, 1, 2, 2)
    num_steps = (16, 32, 64)
    errors = [(sample_ode(riccati, x0, solver=solver, num_steps=n).x1 - riccati_x1(x0)).abs().max().item()
              for n in num_steps]
    slope = -np.polyfit(np.log(num_steps), np.log(errors), 1)[0]
    assert slope == pytest.approx(order, abs=0.15)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 1e-1)],
                         ids=["float16", "bfloat16"])
@pytest.mark.parametrize("solver", sorted(FIXED_SOLVERS))
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_half_precision_states_work_with_every_grid_and_fixed_solver(schedule, solver, dtype, tolerance):
    """A fine grid rounded to float16/bfloat16 repeats points near t = 1 (inverse_cubic, N = 40)."""
    calls = []

    def field(x, t):
        calls.append(t)
        return riccati(x, t)

    x0 = torch.linspace(0.2, 0.6, 4, dtype=torch.float64).reshape(1, 1, 2, 2)
    result = sample_ode(field, x0.to(dtype), solver=solver, num_steps=40, schedule=schedule)
    assert result.x1.dtype == dtype and bool(torch.isfinite(result.x1).all())
    assert result.nfe == len(calls) == 40 * NFE_PER_STEP[solver]
    assert all(t.dtype == dtype for t in calls)  # the velocity sees the state's dtype
    reference = sample_ode(riccati, x0, solver=solver, num_steps=40, schedule=schedule).x1
    assert (result.x1.double() - reference).abs().max().item() < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("solver", ["midpoint", "heun", "rk4"])
def test_single_and_double_precision_still_step_on_a_grid_of_their_dtype(solver, dtype):
    x0 = torch.linspace(0.2, 0.6, 4, dtype=dtype).reshape(1, 1, 2, 2)
    ts = time_grid("inverse_cubic", 12)
    expected = torchdiffeq.odeint(lambda t, x: riccati(x, t), x0, ts.to(dtype), method=FIXED_SOLVERS[solver])[-1]
    assert torch.equal(sample_fixed(riccati, x0, ts, solver).x1, expected)


def test_intermediates_follow_the_grid():
    x0 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    result = sample_ode(Exponential(1.0), x0, solver="euler", num_steps=4, schedule="cosine",
                        return_intermediates=True)
    assert result.trajectory.shape == (5, 1, 1, 1, 1)
    assert torch.equal(result.trajectory[0], x0) and torch.equal(result.trajectory[-1], result.x1)
    assert torch.allclose(result.times.double(), time_grid("cosine", 4), atol=1e-6)


# --------------------------------------------------------------------------- adaptive solvers


class GaussianFlow:
    """The exact marginal velocity of the linear path x_t = (1 − t) x0 + t x1, x0 ~ N(m0, s0²) ⊥ x1 ~ N(m1, s1²).

    x_t ~ N(m_t, s_t²) with m_t = (1 − t) m0 + t m1 and s_t² = (1 − t)² s0² + t² s1², and
    v(x, t) = E[x1 − x0 | x_t = x] = (m1 − m0) + Cov(x1 − x0, x_t) / s_t² (x − m_t), where
    Cov(x1 − x0, x_t) = t s1² − (1 − t) s0² = s_t ds_t/dt. Its flow keeps the standardised position,
    x_t = m_t + (s_t / s0)(x0 − m0), so it maps x0 to x1 = m1 + (s1 / s0)(x0 − m0). Parameters are floats
    or tensors broadcasting against x (B, C, H, W); every call's t is recorded.
    """

    def __init__(self, m0, s0, m1, s1):
        self.m0, self.s0, self.m1, self.s1, self.times = m0, s0, m1, s1, []

    def __call__(self, x, t):
        self.times.append(t.item())
        m_t = (1 - t) * self.m0 + t * self.m1
        var_t = (1 - t) ** 2 * self.s0**2 + t**2 * self.s1**2
        return (self.m1 - self.m0) + (t * self.s1**2 - (1 - t) * self.s0**2) / var_t * (x - m_t)

    def endpoint(self, x0):
        return self.m1 + self.s1 / self.s0 * (x0 - self.m0)


def test_dopri5_lands_on_the_exact_gaussian_transport_map():
    """N(0, 1) → N(2, 0.2²): with the last step frozen at v(x, 1) this missed by 8.0e-2 (20 NFE)."""
    field = GaussianFlow(0.0, 1.0, 2.0, 0.2)
    x0 = torch.linspace(-2, 2, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    result = sample_ode(field, x0, solver="dopri5", atol=1e-6, rtol=1e-3)
    assert (result.x1 - field.endpoint(x0)).abs().max().item() < 5e-3
    assert result.nfe == len(field.times)


@pytest.mark.parametrize("rtol", [1e-3, 1e-6])
def test_dopri5_meets_its_tolerance_on_a_multidimensional_gaussian(rtol):
    generator = torch.Generator().manual_seed(0)
    shape = (2, 3, 2, 2)
    draw = lambda: torch.rand(shape, generator=generator, dtype=torch.float64)
    field = GaussianFlow(2 * draw() - 1, 0.5 + draw(), 4 * draw() - 2, 0.1 + draw())
    x0 = field.m0 + field.s0 * torch.linspace(-2, 2, 24, dtype=torch.float64).reshape(shape)
    result = sample_ode(field, x0, solver="dopri5", atol=1e-9, rtol=rtol)
    assert (result.x1 - field.endpoint(x0)).abs().max().item() < 10 * rtol
    assert result.nfe == len(field.times)


@pytest.mark.parametrize("solver", ADAPTIVE_SOLVERS)
def test_adaptive_steps_end_exactly_at_1_without_freezing_the_velocity(solver):
    """Every stage sees its own time in [0, 1]: the last step's stages at 1⁻, none clamped to exactly 1."""
    field = GaussianFlow(0.0, 1.0, 2.0, 0.2)
    x0 = torch.linspace(-2, 2, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    result = sample_ode(field, x0, solver=solver)
    assert result.nfe == len(field.times)
    assert all(0.0 <= t < 1.0 for t in field.times)
    assert max(field.times) == pytest.approx(1.0, abs=1e-12)
    assert (result.x1 - field.endpoint(x0)).abs().max().item() < 0.1  # fehlberg2 (2nd order): 6.0e-2


def test_only_the_initial_step_size_probe_is_clamped():
    """Large x0, slow v: torchdiffeq's first-step heuristic probes v at t0 + h0 with h0 = 0.01 |x0|/|v| = 100."""
    times = []

    def creep(x, t):
        times.append(t.item())
        return torch.full_like(x, 0.01)

    x0 = torch.full((1, 1, 2, 2), 100.0, dtype=torch.float64)
    result = sample_ode(creep, x0, solver="dopri5")
    assert times[:2] == [0.0, 1.0]  # the start, then the clamped probe
    assert all(0.0 < t < 1.0 for t in times[2:])
    assert result.nfe == len(times)
    torch.testing.assert_close(result.x1, x0 + 0.01)


def test_a_stage_outside_0_1_raises_once_stepping_has_begun():
    f = _CountedVelocity(lambda x, t: x)
    x = torch.ones(1)
    assert f(torch.tensor(1.5), x) is not None  # before the first step: the probe, clamped
    f.callback_step(torch.tensor(0.0), x, torch.tensor(0.1))
    with pytest.raises(RuntimeError, match="outside"):
        f(torch.tensor(1.5), x)
    assert f.nfe == 2


@pytest.mark.parametrize("rtol", [1e-3, 1e-6])
def test_dopri5_meets_its_tolerance_and_reports_nfe(rtol):
    field = Exponential()
    x0 = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    result = sample_ode(field, x0, solver="dopri5", atol=1e-9, rtol=rtol)
    rel_error = ((result.x1 - math.exp(1.3)).abs() / math.exp(1.3)).max().item()
    assert rel_error < 10 * rtol
    assert result.nfe == field.calls > 0


# --------------------------------------------------------------------------- peer: facebookresearch/flow_matching


class PeerVelocity(torch.nn.Module):
    """flow_matching's ODESolver calls velocity_model(x=x, t=t)."""

    def __init__(self, velocity):
        super().__init__()
        self.velocity = velocity

    def forward(self, x, t):
        return self.velocity(x, t)


def wavy(x, t):
    """A smooth nonlinear field: dx/dt = sin(3x) cos(2t) + t x² / 4."""
    return torch.sin(3 * x) * torch.cos(2 * t) + t * x * x / 4


@pytest.mark.parametrize("schedule", ["linear", "cosine", "logit_normal"])
def test_fixed_solvers_agree_with_flow_matching(schedule):
    """flow_matching hands the grid to torchdiffeq, so it has a peer for every fixed solver: euler ("euler",
    an independent check of our own loop), midpoint, heun ("heun2"; its docs' "heun3" is a third-order method
    we do not offer) and rk4. The adaptive solvers have none: flow_matching lets torchdiffeq step past t = 1."""
    ode_solver = pytest.importorskip("flow_matching.solver", reason="flow_matching (the dev extra) is not installed")
    peer = ode_solver.ODESolver(velocity_model=PeerVelocity(wavy))
    x0 = torch.linspace(-1.5, 1.5, 12, dtype=torch.float64).reshape(1, 3, 2, 2)
    params = {"std": 3.0} if schedule == "logit_normal" else {}
    grid = time_grid(schedule, 10, **params)
    for solver, method in {"euler": "euler", "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4"}.items():
        ours = sample_ode(wavy, x0, solver=solver, num_steps=10, schedule=schedule, schedule_params=params).x1
        theirs = peer.sample(x_init=x0, step_size=None, method=method, time_grid=grid)
        assert (ours - theirs).abs().max().item() < 1e-10, solver
