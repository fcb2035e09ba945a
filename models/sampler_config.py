"""SamplerConfig: how an upsampler makes its image — the ODE solve, the detail dial, back-projection — as one value.

One frozen, validated, hashable setting travels everywhere the sampler does: `Upsampler.sampler` and
boost_config.json ("sampler": `to_dict()`), `BoostPipeline`, training validation, `fmboost eval-sr` and
`fmboost bench`. Command lines write it as a string, read by `parse` and written by `format`:

    euler:linear:10                        fixed-step solver : schedule : num_steps
    euler:logit_normal:mu=0.5,std=3:10     … with schedule parameters
    dopri5    dopri5:atol=1e-5,rtol=1e-3   adaptive solver [: tolerances]

The string names the ODE solve only (what eval-sr results are keyed by); `detail`, the fidelity dial of
posterior-mean flows, and `back_project`, the low-res back-projection steps after it, have their own options
(`--detail`, `--back-project`) on every command that makes images. Their ranges are checked here and only here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .sampling import ADAPTIVE_SOLVERS, SCHEDULES, SOLVERS, time_grid
from .upgrade import upgrade_boost_config

ScheduleParams = tuple[tuple[str, float], ...]
TOLERANCES = ("atol", "rtol")
#: The fields of the ODE solve, those `format` / `parse` write and read.
SOLVE_FIELDS = ("solver", "num_steps", "schedule", "schedule_params", *TOLERANCES)
#: What back-projection pulls the image's low frequencies toward: the low-res input, or the estimate reduced to
#: the input's size (a restorer's output: the input without its noise and JPEG blocks, which projecting onto the
#: degraded input copies back).
ANCHORS = ("input", "estimate")


@dataclass(frozen=True)
class SamplerConfig:
    """solver: one of `SOLVERS`; fixed-step solvers take `num_steps` steps on the time grid `schedule`
    (a `SCHEDULES` name) with `schedule_params`, adaptive ones (dopri5, …) choose their steps to meet
    `atol` / `rtol`. detail ∈ [0, 1]: the fidelity dial of posterior-mean flows (0: the regression
    estimate R(cond), or the calibrated estimate, best PSNR; 1: the flow's full detail; `Upsampler.finish`).
    back_project ≥ 0: steps of low-res back-projection applied to the image last (`fmboost.models.consistency`);
    an upsampler folder saves the value measured best on its validation images. anchor: what it projects onto
    (`ANCHORS`; "estimate" needs an upsampler whose estimate is a restorer's image).

    `schedule_params` may be given as a dict; it is stored as a sorted tuple of (name, float) pairs so
    that equal settings are equal and hash alike (eval-sr keys methods by setting).
    """

    solver: str = "euler"
    num_steps: int = 4
    schedule: str = "linear"
    schedule_params: ScheduleParams = ()
    atol: float = 1e-6
    rtol: float = 1e-3
    detail: float = 1.0
    back_project: int = 0
    anchor: str = "input"

    def __post_init__(self):
        object.__setattr__(self, "schedule_params", _schedule_params(self.schedule_params))
        if self.solver not in SOLVERS:
            raise ValueError(f"SamplerConfig.solver must be one of {list(SOLVERS)}, got {self.solver!r}")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"SamplerConfig.num_steps must be a positive int, got {self.num_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"SamplerConfig.schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        for name in TOLERANCES:
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 < value < math.inf:
                raise ValueError(f"SamplerConfig.{name} must be a positive number, got {value!r}")
        if not _is_number(self.detail) or not 0.0 <= self.detail <= 1.0:
            raise ValueError(f"SamplerConfig.detail must be in [0, 1], got {self.detail!r}")
        if isinstance(self.back_project, bool) or not isinstance(self.back_project, int) or self.back_project < 0:
            raise ValueError(f"SamplerConfig.back_project must be an int >= 0, got {self.back_project!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"SamplerConfig.anchor must be one of {list(ANCHORS)}, got {self.anchor!r}")
        try:  # the grid itself checks parameter names, ranges and that it increases
            time_grid(self.schedule, self.num_steps, **dict(self.schedule_params))
        except ValueError as err:
            raise ValueError(f"SamplerConfig.schedule_params: {err}") from None

    @property
    def adaptive(self) -> bool:
        """True for step-size-controlled solvers, which ignore num_steps / schedule and use atol / rtol."""
        return self.solver in ADAPTIVE_SOLVERS

    def replace(self, **changes) -> SamplerConfig:
        """A copy with `changes` (any field; schedule_params may be a dict), validated like the constructor."""
        unknown = sorted(set(changes) - FIELDS)
        if unknown:
            raise ValueError(f"unknown sampler keys {unknown}; allowed: {sorted(FIELDS)}")
        return dataclasses.replace(self, **changes)

    def with_solve(self, solve: SamplerConfig) -> SamplerConfig:
        """This setting with `solve`'s ODE solve (solver, steps, schedule, tolerances: what `format` names);
        detail and back_project kept. A command line's `--sampler SPEC` applied to a folder's saved setting."""
        return dataclasses.replace(self, **{name: getattr(solve, name) for name in SOLVE_FIELDS})

    def override(self, sampler: SamplerConfig | str | None = None, **changes) -> SamplerConfig:
        """A call's setting, this one (a folder's saved setting) being the default: `sampler` replaces it (a
        SamplerConfig) or its ODE solve (a `parse` string, e.g. a command line's --sampler), then `changes` (any
        field, e.g. detail, back_project; None keeps the value). The one place "None means keep the saved value"
        is decided, for the pipeline, every command and `Upsampler.upscale`."""
        base = self if sampler is None else self.with_solve(SamplerConfig.parse(sampler)) \
            if isinstance(sampler, str) else sampler
        if not isinstance(base, SamplerConfig):
            raise TypeError(f"sampler must be a SamplerConfig or a spec string such as 'euler:linear:4', got "
                            f"{sampler!r}")
        return base.replace(**{k: v for k, v in changes.items() if v is not None})

    def solve_kwargs(self) -> dict:
        """Keyword arguments of `sample_ode` (and of `CouplingFlowMatcher.sample`)."""
        return {"solver": self.solver, "num_steps": self.num_steps, "schedule": self.schedule,
                "schedule_params": dict(self.schedule_params), "atol": self.atol, "rtol": self.rtol}

    # ------------------------------------------------------------------ JSON (boost_config.json)

    def to_dict(self) -> dict:
        """Every field, schedule_params as a {name: value} dict: what boost_config.json stores."""
        return {**dataclasses.asdict(self), "schedule_params": dict(self.schedule_params)}

    @classmethod
    def from_dict(cls, config: Mapping) -> SamplerConfig:
        """From `to_dict()` or an older boost_config.json "sampler" dict (`upgrade_boost_config`): missing keys
        take their defaults, schedule_params may be a dict, a list of pairs or null; an unknown key is an error
        naming it."""
        return cls().replace(**upgrade_boost_config({"sampler": config})["sampler"])

    # ------------------------------------------------------------------ the command-line string

    @classmethod
    def parse(cls, text: str) -> SamplerConfig:
        """'euler:linear:10', 'euler:logit_normal:mu=0.5,std=3:10', 'dopri5' or 'dopri5:atol=1e-5,rtol=1e-3'."""
        solver, *parts = text.split(":")
        if solver not in SOLVERS:
            raise ValueError(f"sampler {text!r}: solver must be one of {list(SOLVERS)}, got {solver!r}")
        if solver in ADAPTIVE_SOLVERS:
            if len(parts) > 1:
                raise ValueError(f"sampler {text!r}: adaptive solvers take only tolerances, e.g. "
                                 f"{solver}:atol=1e-6,rtol=1e-3")
            tolerances = dict(_parse_params(text, parts[0])) if parts else {}
            unknown = sorted(set(tolerances) - set(TOLERANCES))
            if unknown:
                raise ValueError(f"sampler {text!r}: unknown tolerance(s) {unknown}; allowed: {list(TOLERANCES)}")
            fields = {"solver": solver, **tolerances}
        else:
            if len(parts) not in (2, 3) or not parts[-1].isdigit():
                raise ValueError(f"sampler {text!r}: expected solver:schedule[:k=v,...]:num_steps, "
                                 f"e.g. {solver}:linear:4")
            fields = {"solver": solver, "num_steps": int(parts[-1]), "schedule": parts[0],
                      "schedule_params": _parse_params(text, parts[1]) if len(parts) == 3 else ()}
        try:
            return cls(**fields)
        except ValueError as err:
            raise ValueError(f"sampler {text!r}: {err}") from None

    def format(self) -> str:
        """The `parse` string of this setting: solver:schedule[:params]:num_steps, or solver[:atol=…,rtol=…]
        (tolerances written only when they differ from the defaults). `detail` and `back_project` are not part
        of it (`describe` names everything)."""
        if self.adaptive:
            tolerances = tuple((name, getattr(self, name)) for name in TOLERANCES)
            if all(value == DEFAULTS[name] for name, value in tolerances):
                return self.solver
            return f"{self.solver}:{_format_params(tolerances)}"
        params = [_format_params(self.schedule_params)] if self.schedule_params else []
        return ":".join([self.solver, self.schedule, *params, str(self.num_steps)])


    def describe(self) -> str:
        """Every setting that shapes the image, for results rows and logs: 'euler:linear:4 · detail 0.5 · BP2'."""
        anchor = "" if self.anchor == "input" or not self.back_project else f" onto {self.anchor}"
        return f"{self.format()} · detail {self.detail:g} · BP{self.back_project}{anchor}"


DEFAULTS = {field.name: field.default for field in dataclasses.fields(SamplerConfig)}
FIELDS = frozenset(DEFAULTS)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _schedule_params(params: Mapping | Iterable | None) -> ScheduleParams:
    """dict, pairs or None → sorted ((name, float), ...); a non-numeric value is an error naming it."""
    params = {} if params is None else params
    items = params.items() if isinstance(params, Mapping) else params
    try:
        pairs = [(name, value) for name, value in items]
    except (TypeError, ValueError):
        raise ValueError(f"SamplerConfig.schedule_params must be a dict or (name, value) pairs, got {params!r}") \
            from None
    for name, value in pairs:
        if not isinstance(name, str) or not _is_number(value):
            raise ValueError(f"SamplerConfig.schedule_params must map names to numbers, got {name!r}: {value!r}")
    return tuple(sorted((name, float(value)) for name, value in pairs))


def _parse_params(text: str, part: str) -> ScheduleParams:
    try:
        return tuple((k.strip(), float(v)) for k, v in (item.split("=") for item in part.split(",")))
    except ValueError:
        raise ValueError(f"sampler {text!r}: bad parameters {part!r}, expected k=v[,k=v]") from None


def _format_number(value: float) -> str:
    """Short ('3', '1e-05') where that reads back exactly, else the full repr."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _format_params(params: Iterable[tuple[str, float]]) -> str:
    return ",".join(f"{name}={_format_number(value)}" for name, value in params)
