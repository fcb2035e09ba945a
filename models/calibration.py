"""Fit an upsampler folder's render settings on held-out images: back-projection steps and the per-band dial.

Both are measured on the render path's own drafts (`Upsampler.draft`: R's estimate and the full sample, decoded
and cropped exactly as `fmboost upscale` makes them), so what is fitted is what users run:

1. the dial's weights (posterior-mean flows): per frequency band, the share of the flow's detail that best
   predicts the truth (least squares, `DetailCalibrationFit`);
2. back-projection: every candidate step count scored at the folder's detail; the folder keeps the one with
   the best PSNR (the fewest steps within `BACK_PROJECT_TOLERANCE_DB` of the best: the later steps of a
   converging projection buy nothing and cost resizes) among those that do not raise LPIPS above no
   projection's, when an LPIPS network is given. Projection inverts the bicubic reduction: on clean inputs it
   improves both, but onto a degraded input (JPEG, noise, blur) it buys PSNR by copying the degradation back
   into the image, raising LPIPS (RESULTS.md, "Real photos"), so a folder trained for degraded inputs keeps 0
   steps, or, when it starts from a restorer, may project onto the restorer's image instead (`anchor`);
3. the dial's band order (with an LPIPS network): the LPIPS each band buys per unit of MSE it costs, measured
   after the chosen back-projection (`fit_spans`);
4. the folder's detail (with an LPIPS network): the end of the band stretch with the lowest LPIPS. Bands last
   in the order raise LPIPS and MSE both (on faces the finest ones: invented texture a perceptual metric
   dislikes), so every detail above that point is worse on both axes; below it the dial trades LPIPS for PSNR,
   the user's choice. Back-projection is then re-chosen at that detail.

Training runs it on its validation images when it saves the folder (`save_upsampler`); `fmboost
calibrate-detail` runs it on a folder afterwards. Use images neither R nor the flow was trained on.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from . import metrics as M
from .consistency import back_project
from .detail_bands import DEFAULT_EDGES, BandGains, DetailCalibration, DetailCalibrationFit, fit_spans
from .sampler_config import SamplerConfig
from .upsampler import Draft, Upsampler

#: Back-projection step counts tried by default.
BACK_PROJECT_CANDIDATES = (0, 1, 2, 4, 8)
#: A step count within this many dB of the best PSNR counts as as good (the fewest such steps are kept).
BACK_PROJECT_TOLERANCE_DB = 0.01


@dataclass
class Calibration:
    """What was fitted: `sampler`, the folder's render setting with the fitted `back_project` (and `anchor`) and,
    when the dial's band order was measured, the fitted `detail` — one record, the `SamplerConfig` the folder
    saves; psnr / lpips per back-projection candidate (mean over the images; lpips only with an LPIPS network);
    for posterior-mean flows the dial (`calibration`, stamped with the setting it was fitted with), the
    least-squares fit behind its weights and, with an LPIPS network, the per-band measurements behind its order
    (`bands`) and the LPIPS at the end of each band's stretch of the dial (`detail_lpips`, the lowest chosen);
    images: how many were used. Nothing is changed by fitting: `apply` gives the calibrated upsampler."""

    sampler: SamplerConfig
    psnr: dict[int | str, float]
    lpips: dict[int | str, float] = field(default_factory=dict)
    detail_lpips: dict[float, float] = field(default_factory=dict)
    calibration: DetailCalibration | None = None
    fit: DetailCalibrationFit | None = None
    bands: list[BandGains] | None = None
    images: int = 0

    @property
    def back_project(self) -> int:
        return self.sampler.back_project

    @property
    def anchor(self) -> str:
        return self.sampler.anchor

    @property
    def detail(self) -> float:
        return self.sampler.detail

    def apply(self, upsampler: Upsampler) -> Upsampler:
        """`upsampler` with the fitted setting as its saved sampler and, when one was fitted, the fitted dial."""
        dial = upsampler.detail_calibration if self.calibration is None else self.calibration
        return dataclasses.replace(upsampler, sampler=self.sampler, detail_calibration=dial)


@torch.no_grad()
def fit_calibration(upsampler: Upsampler, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, seed: int = 0,
                    total: int | None = None, lpips: torch.nn.Module | None = None,
                    candidates: Sequence[int] = BACK_PROJECT_CANDIDATES, edges: tuple[float, ...] = DEFAULT_EDGES,
                    fit_dial: bool = True) -> Calibration:
    """Fit back-projection (and, for posterior-mean flows with `fit_dial`, the per-band dial; for flows from a
    restorer, only the order in which the dial turns the bands on: its detail 0 stays the restorer's image) over
    `pairs`, (lr (B, 3, h, w), hr (B, 3, s·h, s·w)) in [-1, 1], rendered with the upsampler's saved sampler; pair i
    draws its source noise from seed + i. Returns what was measured; `upsampler` is left as it was (the caller
    applies the result: `Calibration.apply`). The drafts are kept on the CPU in half precision for the later
    passes."""
    if not candidates or any(n < 0 for n in candidates):
        raise ValueError(f"back-projection candidates must be ints >= 0, got {list(candidates)}")
    device = next(upsampler.model.parameters()).device
    fit = DetailCalibrationFit(upsampler.scale, edges) if upsampler.dial is not None and fit_dial else None
    kept: list[tuple[Draft, torch.Tensor]] = []
    for index, (lr, hr) in enumerate(tqdm(pairs, total=total, desc="calibrate", unit="img")):
        draft = upsampler.draft(lr.to(device), torch.Generator(device).manual_seed(seed + index), upsampler.sampler)
        if fit is not None:
            fit.update(draft.estimate, draft.sample, hr.to(device))
        kept.append((_cast(draft, lambda x: x.half().cpu()), hr.half().cpu()))
    if not kept:
        raise ValueError("no images were given to calibrate on")
    if fit is None:
        return _choose_back_project(upsampler, upsampler.sampler, kept, candidates, lpips)
    dial = fit.result()
    if upsampler.restorer is not None:  # detail 0 is the restorer's own image, the dial's promise
        dial = replace(dial, weights=(0.0,) * dial.bands)
    view = dataclasses.replace(upsampler, detail_calibration=dial)  # scores with the fitted dial
    result = _choose_back_project(view, upsampler.sampler, kept, candidates, lpips)
    bands = None
    if lpips is not None:
        def post(pred: torch.Tensor, index: int) -> torch.Tensor:
            draft = kept[index][0]
            return back_project(pred, (draft.lr if result.anchor == "input" else draft.anchor).float(),
                                result.back_project)

        images = ((draft.estimate.float(), draft.sample.float(), hr.float())
                  for draft, hr in tqdm(kept, desc="detail path", unit="img"))
        dial, bands = fit_spans(dial, images, _distance(lpips), upsampler.scale, post)
        view = dataclasses.replace(upsampler, detail_calibration=dial)
        ends = sorted({end for _, end in dial.spans})
        _, detail_lpips = _score(view, kept, {d: result.sampler.replace(detail=d) for d in ends}, lpips)
        detail = min(detail_lpips, key=lambda d: (detail_lpips[d], -d))
        result = replace(_choose_back_project(view, result.sampler.replace(detail=detail), kept, candidates, lpips),
                         detail_lpips=detail_lpips)
    return replace(result, calibration=dial.stamped(result.sampler), fit=fit, bands=bands)


def calibrate(upsampler: Upsampler, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], **kwargs) -> Calibration:
    """Deprecated: `fit_calibration`, then the result written into `upsampler` (its sampler and dial). Use
    `upsampler = fit_calibration(upsampler, pairs).apply(upsampler)`."""
    warnings.warn("calibrate() changes the upsampler it measures and is deprecated: use "
                  "fit_calibration(upsampler, pairs), then result.apply(upsampler)", DeprecationWarning, stacklevel=2)
    result = fit_calibration(upsampler, pairs, **kwargs)
    calibrated = result.apply(upsampler)
    upsampler.sampler, upsampler.detail_calibration = calibrated.sampler, calibrated.detail_calibration
    return result


def _choose_back_project(upsampler: Upsampler, sampler: SamplerConfig, kept: list[tuple[Draft, torch.Tensor]],
                         candidates: Sequence[int], lpips: torch.nn.Module | None) -> Calibration:
    """Score every back-projection step count at `sampler`'s detail — onto the input, and for restorer estimates
    also onto the restorer's image reduced to the input's size (keys "n onto estimate"), which does not copy an
    input's noise and blocks back — and keep the best PSNR (the fewest steps within BACK_PROJECT_TOLERANCE_DB of
    it) among the settings whose LPIPS (when measured) is no worse than the fewest steps' as the folder's: the
    result's `sampler` is `sampler` with that choice."""
    options = {n: sampler.replace(back_project=n, anchor="input") for n in candidates}
    if upsampler.restorer is not None:
        options.update({f"{n} onto estimate": sampler.replace(back_project=n, anchor="estimate")
                        for n in candidates if n})
    psnr, lpips_scores = _score(upsampler, kept, options, lpips)
    fewest = min(candidates)
    allowed = [k for k in options if not lpips_scores or lpips_scores[k] <= lpips_scores[fewest]]
    best = max(psnr[k] for k in allowed)
    key = min((k for k in allowed if psnr[k] >= best - BACK_PROJECT_TOLERANCE_DB),
              key=lambda k: (options[k].back_project, -psnr[k]))
    return Calibration(options[key], psnr, lpips_scores, images=len(kept))


def _score(upsampler: Upsampler, kept: list[tuple[Draft, torch.Tensor]], samplers: dict, lpips: torch.nn.Module | None
           ) -> tuple[dict, dict]:
    """Mean PSNR and (with an LPIPS network, else {}) LPIPS of the finished images (`Upsampler.finish` of each
    kept draft) for each of `samplers` ({key: SamplerConfig}), keyed alike."""
    psnr = dict.fromkeys(samplers, 0.0)
    lpips_scores = dict.fromkeys(samplers, 0.0) if lpips is not None else {}
    distance = _distance(lpips) if lpips is not None else None
    for draft, hr in kept:
        full, target = _cast(draft, lambda x: x.float()), hr.float()
        for key, sampler in samplers.items():
            image = upsampler.finish(full, sampler).image
            psnr[key] += M.psnr((image + 1) / 2, (target + 1) / 2).mean().item() / len(kept)
            if distance is not None:
                lpips_scores[key] += distance(image, target).mean().item() / len(kept)
    return psnr, lpips_scores


def _cast(draft: Draft, cast: Callable[[torch.Tensor], torch.Tensor]) -> Draft:
    """The draft with `cast` applied to its images (e.g. to half precision on the CPU, to keep; back to float)."""
    return replace(draft, lr=cast(draft.lr), estimate=None if draft.estimate is None else cast(draft.estimate),
                   sample=None if draft.sample is None else cast(draft.sample),
                   anchor=None if draft.anchor is None else cast(draft.anchor))


def _distance(lpips: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """LPIPS (B,) between two batches of [-1, 1] images, on the LPIPS network's device."""
    device = next(lpips.parameters()).device

    def distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return M.lpips(((pred + 1) / 2).to(device), ((target + 1) / 2).to(device), lpips).cpu()

    return distance


def _key(result: Calibration) -> int | str:
    """The kept setting's key in `result.psnr`."""
    n = result.back_project
    return n if result.anchor == "input" or not n else f"{n} onto estimate"


def describe(result: Calibration, scale: int) -> str:
    """The back-projection scores (the kept count marked) and, for a dial, one line per band: its frequencies,
    w*, the share kept at detail 0 and (path lpips) its measured cost, gain and stretch of the dial."""
    lines = ["back-projection steps, mean over the images: " + ", ".join(
        f"{n}: {result.psnr[n]:.2f} dB" + (f" / LPIPS {result.lpips[n]:.4f}" if result.lpips else "")
        + (" (kept)" if n == _key(result) else "") for n in result.psnr)]
    if result.detail_lpips:
        lines.append("LPIPS at the end of each band's stretch of the dial: " + ", ".join(
            f"detail {d:.3f}: {v:.4f}" + (" (kept)" if d == result.detail else "")
            for d, v in result.detail_lpips.items()))
    if result.calibration is None:
        return "\n".join(lines)
    calibration, nyquist = result.calibration, 0.5 / scale
    bounds = (0.0, *calibration.edges, None)
    for band, (raw, kept) in enumerate(zip(result.fit.raw_weights(), calibration.weights)):
        lo, hi = bounds[band] * nyquist, bounds[band + 1]
        freq = f"[{lo:.4f}, {hi * nyquist:.4f})" if hi is not None else f"[{lo:.4f}, 0.5]"
        line = f"band {freq} cycles/px: w* {raw:+.3f} → kept at detail 0: {kept:.3f}"
        if result.bands is not None:
            gains, (start, end) = result.bands[band], calibration.spans[band]
            line += (f"; turned on: MSE {gains.mse_cost:+.2e}, LPIPS {-gains.perceptual_gain:+.5f} "
                     f"→ ramps over detail [{start:.3f}, {end:.3f}]")
        lines.append(line)
    return "\n".join(lines)
