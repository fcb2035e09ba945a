import math

import pytest
import torch
from fmboost.models.sampling import SCHEDULES, sample_ode, time_grid


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("num_steps", [1, 2, 7, 40])
def test_grid_starts_at_0_ends_at_1_increasing(schedule, num_steps):
    ts = time_grid(schedule, num_steps)
    assert ts.shape == (num_steps + 1,)
    assert ts[0].item() == 0.0 and ts[-1].item() == 1.0
    assert bool((ts[1:] > ts[:-1]).all())


def steps(schedule, **params):
    return time_grid(schedule, 10, **params).diff()


def test_grid_shapes_match_their_description():
    assert torch.allclose(steps("linear"), torch.full((10,), 0.1, dtype=torch.float64))
    cos = steps("cosine")
    assert cos[0] < cos[5] and cos[-1] < cos[5]  # slow at both ends
    assert steps("polynomial")[0] < steps("polynomial")[-1]  # slow near t = 0
    for name in ("inverse_cubic", "inverse_exp"):
        s = steps(name)
        assert bool((s[1:] < s[:-1]).all()), name  # ever slower towards t = 1
    ln = steps("logit_normal")
    assert ln[0] > ln[4] and ln[-1] > ln[5]  # large steps at both ends, small in the middle
    assert int(ln.argmin()) in (4, 5)


def test_logit_normal_mu_moves_the_slow_down():
    def slowest_time(mu):
        ts = time_grid("logit_normal", 20, mu=mu)
        i = int(ts.diff().argmin())
        return float(ts[i:i + 2].mean())

    assert slowest_time(-1.0) < slowest_time(0.0) < slowest_time(1.0)
    assert slowest_time(1.0) > 0.6


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


@pytest.mark.parametrize("solver,per_step,tolerance", [("midpoint", 2, 3e-2), ("heun", 2, 3e-2), ("rk4", 4, 1e-4)])
def test_fixed_step_solvers_report_their_nfe(solver, per_step, tolerance):
    field = Exponential()
    result = sample_ode(field, torch.ones(1, 1, 2, 2, dtype=torch.float64), solver=solver, num_steps=8)
    assert result.nfe == field.calls == 8 * per_step
    euler_error = abs(sample_ode(Exponential(), torch.ones(1, 1, 1, 1, dtype=torch.float64), num_steps=8).x1.item()
                      - math.exp(1.3))
    error = (result.x1 - math.exp(1.3)).abs().max().item()
    assert error < tolerance and error < euler_error / 5  # higher order than Euler


@pytest.mark.parametrize("rtol", [1e-3, 1e-6])
def test_dopri5_meets_its_tolerance_and_reports_nfe(rtol):
    field = Exponential()
    x0 = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    result = sample_ode(field, x0, solver="dopri5", atol=1e-9, rtol=rtol)
    rel_error = ((result.x1 - math.exp(1.3)).abs() / math.exp(1.3)).max().item()
    assert rel_error < 10 * rtol
    assert result.nfe == field.calls > 0


def test_intermediates_follow_the_grid():
    x0 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    result = sample_ode(Exponential(1.0), x0, solver="euler", num_steps=4, schedule="cosine",
                        return_intermediates=True)
    assert result.trajectory.shape == (5, 1, 1, 1, 1)
    assert torch.equal(result.trajectory[0], x0) and torch.equal(result.trajectory[-1], result.x1)
    assert torch.allclose(result.times.double(), time_grid("cosine", 4), atol=1e-6)
