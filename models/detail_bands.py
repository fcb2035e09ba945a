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

Bands are square rings in the 2-D spectrum, max(|f_y|, |f_x|) in units of f_N, so they follow the
separable down-sampling that made the low-res input. The detail is mirror-padded before the FFT so the
image borders do not wrap into each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def _mirror(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x (B, C, H, W) mirror-padded by min(MAX_PAD, a quarter of its smaller side) (reflect needs pad < side)."""
    pad = max(1, min(MAX_PAD, min(x.shape[-2:]) // 4))
    return F.pad(x, (pad, pad, pad, pad), mode="reflect"), pad


@dataclass(frozen=True)
class DetailCalibration:
    """edges: increasing band edges in units of f_N; weights: len(edges) + 1 values in [0, 1], the share of the
    flow's detail kept in each band at detail 0 (the MSE-optimal one when fitted)."""

    edges: tuple[float, ...] = DEFAULT_EDGES
    weights: tuple[float, ...] = (0.0,) * (len(DEFAULT_EDGES) + 1)

    def __post_init__(self):
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.edges or any(not a < b for a, b in zip((0.0,) + self.edges, self.edges)):
            raise ValueError(f"detail_calibration.edges must be positive and increasing, got {list(self.edges)}")
        if len(self.weights) != len(self.edges) + 1:
            raise ValueError(f"detail_calibration.weights needs {len(self.edges) + 1} values (one per band), "
                             f"got {len(self.weights)}")
        if any(not (math.isfinite(w) and 0.0 <= w <= 1.0) for w in self.weights):
            raise ValueError(f"detail_calibration.weights must lie in [0, 1], got {list(self.weights)}")

    def combine(self, estimate: torch.Tensor, sample: torch.Tensor, detail: float, scale: int) -> torch.Tensor:
        """estimate R, sample S: (B, 3, H, W) decoded images → x̂(detail) (B, 3, H, W), see the module docstring."""
        if estimate.shape != sample.shape:
            raise ValueError(f"estimate {tuple(estimate.shape)} and sample {tuple(sample.shape)} differ in shape")
        if not 0.0 <= detail <= 1.0:
            raise ValueError(f"detail must be in [0, 1], got {detail}")
        padded, pad = _mirror((sample - estimate).float())
        bands = band_index(*padded.shape[-2:], scale, self.edges, padded.device)
        kept = torch.tensor(self.weights, device=padded.device)
        gain = (kept + detail * (1.0 - kept))[bands]
        detail_kept = torch.fft.ifft2(torch.fft.fft2(padded) * gain).real[..., pad:-pad, pad:-pad]
        return (estimate.float() + detail_kept).to(estimate.dtype)

    def to_dict(self) -> dict:
        return {"edges": list(self.edges), "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, config: dict) -> DetailCalibration:
        unknown = sorted(set(config) - {"edges", "weights"})
        if unknown:
            raise ValueError(f"unknown detail_calibration keys {unknown}; allowed: ['edges', 'weights']")
        return cls(**config)


class DetailCalibrationFit:
    """Accumulates, per band, <D_b, E_b> and |D_b|² (D = S − R, E = x − R) over images; `result()` gives
    w*_b = <D_b, E_b> / |D_b|² clipped to [0, 1]. Use images the flow and R were not trained on."""

    def __init__(self, scale: int, edges: tuple[float, ...] = DEFAULT_EDGES):
        self.scale, self.edges = scale, tuple(edges)
        self.correlation = torch.zeros(len(self.edges) + 1, dtype=torch.float64)
        self.energy = torch.zeros(len(self.edges) + 1, dtype=torch.float64)
        self.images = 0

    def update(self, estimate: torch.Tensor, sample: torch.Tensor, target: torch.Tensor) -> None:
        """estimate R, sample S, target x: (B, 3, H, W) images in the same range."""
        if not estimate.shape == sample.shape == target.shape:
            raise ValueError(f"estimate {tuple(estimate.shape)}, sample {tuple(sample.shape)} and target "
                             f"{tuple(target.shape)} must have one shape")
        detail = torch.fft.fft2(_mirror((sample - estimate).float())[0])
        error = torch.fft.fft2(_mirror((target - estimate).float())[0])
        bands = band_index(*detail.shape[-2:], self.scale, self.edges, detail.device).flatten()
        n = len(self.edges) + 1
        per_freq = (detail.conj() * error).real.sum((0, 1)).flatten().double().cpu()
        power = detail.abs().square().sum((0, 1)).flatten().double().cpu()
        self.correlation += torch.bincount(bands.cpu(), per_freq, minlength=n)
        self.energy += torch.bincount(bands.cpu(), power, minlength=n)
        self.images += estimate.shape[0]

    def raw_weights(self) -> list[float]:
        """w*_b before clipping (0 where a band holds no detail)."""
        return [c / e if e > 0 else 0.0 for c, e in zip(self.correlation.tolist(), self.energy.tolist())]

    def result(self) -> DetailCalibration:
        if self.images == 0:
            raise ValueError("no images were given to the detail calibration")
        return DetailCalibration(self.edges, tuple(min(1.0, max(0.0, w)) for w in self.raw_weights()))
