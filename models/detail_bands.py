"""The calibrated fidelity dial: how much of a posterior-mean flow's detail to keep, frequency band by band.

A posterior-mean flow adds detail D = S − R to the regression estimate R (both decoded, pixels). Measured
on held-out faces (RESULTS.md, "The per-band dial"), D is not equally right at every scale:
the MSE-optimal share of it, w*_b = <D_b, (x − R)_b> / |D_b|² over a radial frequency band b, is ≈ 0 around
the low-res image's Nyquist frequency f_N = 0.5 / scale cycles per output pixel (invented texture: it only
costs PSNR) but ≈ 0.5 above 2 f_N (sharper edges where R is blurrier than the posterior mean). An ideal
posterior sampler would have w* = 0 everywhere; these weights measure what R leaves on the table.

`DetailCalibration` stores w* per band (fitted by `DetailCalibrationFit` on images the flow never saw) and
blends per band:

    x̂(d) = R + Σ_b (w_b + d (1 − w_b)) · D_b,

so detail d = 0 is the calibrated estimate R + Σ_b w_b D_b (a better MMSE estimate than R: measured, higher
PSNR on faces and photos, lower LPIPS on faces), d = 1 the flow's sample S, and in between the straight line
between the two, the same optimal-transport argument as the latent `blend` dial, started from the better estimate.

Bands do not buy perception equally either: per unit of MSE, the detail between 1.5 and 2 f_N lowers LPIPS
most (on the test faces 3× more than the detail at 2–3 f_N, 20× more than above 3 f_N, which on photos even
raises it; RESULTS.md, "Which bands buy perception"). So the
dial can also take the bands one after another, most perceptual gain per unit of MSE first: band b ramps
from w_b to 1 while d crosses its span [s_b, e_b], the spans tiling [0, 1] in that order with lengths ∝ each
band's MSE cost (so d stays roughly linear in distortion). `fit_spans` measures the order on held-out images;
without spans every band spans [0, 1], the straight line above. Either way d = 0 and d = 1 are the same
two images.

An upsampler without a fitted calibration uses the one-band dial (`DetailCalibration.uniform`):
x̂(d) = R + d (S − R) in pixels, the straight line between the estimate and the sample, so `detail` means the
same thing for every posterior-mean upsampler. A calibration records the sampler and the back-projection it
was fitted with (`sampler`, `back_project`): weights measured on one sampler's samples hold for that sampler.

Bands are square rings in the 2-D spectrum, max(|f_y|, |f_x|) in units of f_N, so they follow the
separable down-sampling that made the low-res input. The detail is mirror-padded before the FFT so the
image borders do not wrap into each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .upgrade import upgrade_boost_config

if TYPE_CHECKING:
    from .sampler_config import SamplerConfig

#: Default band edges, in units of the low-res Nyquist frequency f_N = 0.5 / scale (cycles per output pixel).
DEFAULT_EDGES = (0.5, 1.0, 1.5, 2.0, 3.0)


def band_index(height: int, width: int, scale: int, edges: tuple[float, ...], device=None) -> torch.Tensor:
    """(height, width) long tensor: the band of every FFT frequency, 0 … len(edges)."""
    fy = torch.fft.fftfreq(height, device=device).abs()[:, None]
    fx = torch.fft.fftfreq(width, device=device).abs()[None, :]
    radius = torch.maximum(fy, fx) / (0.5 / scale)
    return torch.bucketize(radius, torch.tensor(edges, device=device), right=True)


#: Mirror padding (pixels) around the detail before its FFT, at most: enough that opposite borders do not
#: wrap into each other, small enough that a 4096² output's FFT stays a few hundred MB.
MAX_PAD = 64


def detail_of(estimate: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """D = S − R (B, 3, H, W), float32: the detail the dial weighs."""
    if sample.shape != estimate.shape:
        raise ValueError(f"estimate {tuple(estimate.shape)} and sample {tuple(sample.shape)} differ in shape")
    return sample.float() - estimate.float()


def _mirror(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x (B, C, H, W) mirror-padded by min(MAX_PAD, a quarter of its smaller side) (reflect needs pad < side)."""
    pad = max(1, min(MAX_PAD, min(x.shape[-2:]) // 4))
    return F.pad(x, (pad, pad, pad, pad), mode="reflect"), pad


@dataclass(frozen=True)
class DetailCalibration:
    """edges: increasing band edges in units of f_N (empty: one band, the whole spectrum); weights: one value in
    [0, 1] per band (len(edges) + 1), the share of that band's detail kept at detail 0 (the MSE-optimal one when
    fitted); spans: None (every band ramps over [0, 1]) or one (start, end) per band, 0 ≤ start < end ≤ 1, the
    stretch of the dial over which it goes from its share to the full detail (`fit_spans`); sampler,
    back_project: what it was fitted with (`SamplerConfig.format()`, back-projection steps), None if unknown."""

    edges: tuple[float, ...] = DEFAULT_EDGES
    weights: tuple[float, ...] = (0.0,) * (len(DEFAULT_EDGES) + 1)
    spans: tuple[tuple[float, float], ...] | None = None
    sampler: str | None = None
    back_project: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if any(not a < b for a, b in zip((0.0,) + self.edges, self.edges)):
            raise ValueError(f"detail_calibration.edges must be positive and increasing, got {list(self.edges)}")
        if len(self.weights) != self.bands:
            raise ValueError(f"detail_calibration.weights needs {self.bands} values (one per band), got "
                             f"{len(self.weights)}")
        if any(not (math.isfinite(w) and 0.0 <= w <= 1.0) for w in self.weights):
            raise ValueError(f"detail_calibration.weights must lie in [0, 1], got {list(self.weights)}")
        if self.spans is not None:
            spans = tuple((float(a), float(b)) for a, b in self.spans)
            if len(spans) != len(self.weights):
                raise ValueError(f"detail_calibration.spans needs {len(self.weights)} [start, end] pairs (one per "
                                 f"band), got {len(spans)}")
            if any(not (0.0 <= a < b <= 1.0) for a, b in spans):
                raise ValueError(f"detail_calibration.spans must satisfy 0 <= start < end <= 1, got "
                                 f"{[list(x) for x in spans]}")
            object.__setattr__(self, "spans", spans)
        if self.back_project is not None and (isinstance(self.back_project, bool)
                                              or not isinstance(self.back_project, int) or self.back_project < 0):
            raise ValueError(f"detail_calibration.back_project must be an int >= 0, got {self.back_project!r}")

    @classmethod
    def uniform(cls) -> DetailCalibration:
        """The dial of an uncalibrated posterior-mean upsampler: one band, nothing kept at detail 0, so
        x̂(d) = R + d (S − R)."""
        return cls(edges=(), weights=(0.0,))

    def gains(self, detail: float) -> torch.Tensor:
        """(bands,) float64: the share of the flow's detail kept per band at `detail` ∈ [0, 1] (checked by
        `SamplerConfig`)."""
        kept = torch.tensor(self.weights, dtype=torch.float64)
        if self.spans is None:
            ramp = torch.full_like(kept, detail)
        else:
            start, end = torch.tensor(self.spans, dtype=torch.float64).unbind(-1)
            ramp = ((detail - start) / (end - start)).clamp(0.0, 1.0)
        return kept + ramp * (1.0 - kept)

    @property
    def bands(self) -> int:
        """The number of frequency bands, len(edges) + 1."""
        return len(self.edges) + 1

    def combine(self, estimate: torch.Tensor, sample: torch.Tensor, detail: float, scale: int) -> torch.Tensor:
        """estimate R and sample S, (B, 3, H, W) decoded images → x̂(detail) (B, 3, H, W), see the module
        docstring."""
        return self.combine_gains(estimate, sample, self.gains(detail), scale)

    def combine_gains(self, estimate: torch.Tensor, sample: torch.Tensor, gains: torch.Tensor,
                      scale: int) -> torch.Tensor:
        """R + Σ_b gains_b · D_b: `combine` with explicit gains (bands,). One band needs no FFT."""
        detail = detail_of(estimate, sample)
        if self.bands == 1:
            return (estimate.float() + float(gains[0]) * detail).to(estimate.dtype)
        padded, pad = _mirror(detail)
        bands = band_index(*padded.shape[-2:], scale, self.edges, padded.device)
        gain = gains.to(device=padded.device, dtype=torch.float32)[bands]
        kept = torch.fft.ifft2(torch.fft.fft2(padded) * gain).real
        return (estimate.float() + kept[..., pad:-pad, pad:-pad]).to(estimate.dtype)

    def stamped(self, sampler: SamplerConfig) -> DetailCalibration:
        """This dial, recorded as fitted with `sampler` (its ODE solve and back-projection steps)."""
        return replace(self, sampler=sampler.format(), back_project=sampler.back_project)

    def fitted_for(self, sampler: str, back_project: int) -> bool:
        """Whether this dial was measured with `sampler` (a `SamplerConfig.format()`) and `back_project` steps
        (unknown counts as yes: older folders did not record them)."""
        return self.sampler in (None, sampler) and self.back_project in (None, back_project)

    def to_dict(self) -> dict:
        config = {"edges": list(self.edges), "weights": list(self.weights)}
        if self.spans is not None:
            config["spans"] = [list(span) for span in self.spans]
        for key in ("sampler", "back_project"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        return config

    @classmethod
    def from_dict(cls, config: dict) -> DetailCalibration:
        """From `to_dict()`, or an older folder's "detail_calibration" dict (`upgrade_boost_config`)."""
        config = upgrade_boost_config({"detail_calibration": config})["detail_calibration"]
        allowed = {"edges", "weights", "spans", "sampler", "back_project"}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(f"unknown detail_calibration keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**config)


#: How the dial's bands are ordered: "lpips", one after another by measured LPIPS per unit of MSE
#: (`fit_spans`); "uniform", all together.
DETAIL_PATHS = ("lpips", "uniform")

#: A band's share of the dial is at least this, so every band has a ramp (none switches on at a jump).
MIN_SPAN = 0.01


@dataclass(frozen=True)
class BandGains:
    """What turning one band on (from its share at detail 0 to the full detail) does on the held-out images:
    band, its index; mse_cost, the rise in mean squared error; perceptual_gain, the fall in the perceptual
    distance."""

    band: int
    mse_cost: float
    perceptual_gain: float


@torch.no_grad()
def fit_spans(calibration: DetailCalibration, images: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: int,
              post: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
              ) -> tuple[DetailCalibration, list[BandGains]]:
    """Order the bands by perceptual gain per unit of MSE, measured on held-out `images` — (estimate R, sample S,
    target x), each (B, 3, H, W) in [-1, 1] — one band at a time turned on from detail 0; spans tile [0, 1]
    in that order, lengths ∝ each band's MSE cost (at least MIN_SPAN). `distance(pred, target)`: a perceptual
    distance, (B,), on [-1, 1] images (e.g. LPIPS); `post(pred, i)`: what the render path does to the dial's
    image of item i after the dial (back-projection onto its low-res input). Returns the calibration with
    spans, and the measured per-band numbers."""
    n = len(calibration.weights)
    base = calibration.gains(0.0)
    mse, dist = torch.zeros(n + 1, dtype=torch.float64), torch.zeros(n + 1, dtype=torch.float64)
    count = 0
    for index, (estimate, sample, target) in enumerate(images):
        for column in range(n + 1):  # column n: detail 0; column b: band b turned on
            gains = base.clone()
            if column < n:
                gains[column] = 1.0
            pred = calibration.combine_gains(estimate, sample, gains, scale).float().clamp(-1, 1)
            if post is not None:
                pred = post(pred, index)
            mse[column] += (pred - target.float()).square().mean((1, 2, 3)).sum().item()
            dist[column] += distance(pred, target.float()).sum().item()
        count += estimate.shape[0]
    if count == 0:
        raise ValueError("no images were given to fit the detail path")
    measured = [BandGains(b, (mse[b] - mse[n]).item() / count, (dist[n] - dist[b]).item() / count) for b in range(n)]
    order = sorted(measured, key=lambda g: -g.perceptual_gain / max(g.mse_cost, 1e-12))
    costs = torch.tensor([max(g.mse_cost, 0.0) for g in order], dtype=torch.float64)
    lengths = costs / costs.sum() if costs.sum() > 0 else torch.full_like(costs, 1.0 / n)
    lengths = lengths.clamp(min=MIN_SPAN)
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), (lengths / lengths.sum()).cumsum(0)]).tolist()
    edges[-1] = 1.0
    spans = [None] * n
    for position, gains in enumerate(order):
        spans[gains.band] = (edges[position], edges[position + 1])
    return replace(calibration, spans=tuple(spans)), measured


class DetailCalibrationFit:
    """Accumulates, per band b, <D_b, E_b> and |D_b|² (D = S − R, E = x − R) over images; `result()` gives
    w*_b = <D_b, E_b> / |D_b|² clipped to [0, 1]. Use images the flow and R were not trained on."""

    def __init__(self, scale: int, edges: tuple[float, ...] = DEFAULT_EDGES):
        self.scale, self.edges = scale, tuple(edges)
        self.correlation = torch.zeros(len(self.edges) + 1, dtype=torch.float64)
        self.energy = torch.zeros(len(self.edges) + 1, dtype=torch.float64)
        self.images = 0

    def update(self, estimate: torch.Tensor, sample: torch.Tensor, target: torch.Tensor) -> None:
        """estimate R, sample S, target x: (B, 3, H, W) images in one range."""
        if target.shape != estimate.shape:
            raise ValueError(f"estimate {tuple(estimate.shape)} and target {tuple(target.shape)} must have one shape")
        error = torch.fft.fft2(_mirror((target - estimate).float())[0])
        detail = torch.fft.fft2(_mirror(detail_of(estimate, sample))[0])
        bands = band_index(*error.shape[-2:], self.scale, self.edges, error.device).flatten().cpu()
        n = len(self.edges) + 1
        per_freq = (detail.conj() * error).real.sum((0, 1)).flatten().double().cpu()
        power = detail.abs().square().sum((0, 1)).flatten().double().cpu()
        self.correlation += torch.bincount(bands, per_freq, minlength=n)
        self.energy += torch.bincount(bands, power, minlength=n)
        self.images += estimate.shape[0]

    def raw_weights(self) -> list[float]:
        """w*_b before clipping (0 where a band holds no detail)."""
        return [c / e if e > 0 else 0.0 for c, e in zip(self.correlation.tolist(), self.energy.tolist())]

    def result(self) -> DetailCalibration:
        if self.images == 0:
            raise ValueError("no images were given to the detail calibration")
        return DetailCalibration(self.edges, tuple(min(1.0, max(0.0, w)) for w in self.raw_weights()))
