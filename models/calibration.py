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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from . import metrics as M
from .consistency import back_project
from .detail_bands import DEFAULT_EDGES, BandGains, DetailCalibration, DetailCalibrationFit, fit_spans
from .upsampler import Draft, Upsampler

#: Back-projection step counts tried by default.
BACK_PROJECT_CANDIDATES = (0, 1, 2, 4, 8)
#: A step count within this many dB of the best PSNR counts as as good (the fewest such steps are kept).
BACK_PROJECT_TOLERANCE_DB = 0.01


@dataclass
class Calibration:
    """What was fitted: back_project, the step count kept, with psnr / lpips per candidate (mean over the
    images; lpips only with an LPIPS network); for posterior-mean flows the dial (`calibration`), the
    least-squares fit behind its weights and, with an LPIPS network, the per-band measurements behind its order
    (`bands`), the LPIPS at the end of each band's stretch of the dial (`detail_lpips`) and the folder's detail
    chosen from them (`detail`, the lowest); images: how many were used."""

    back_project: int
    psnr: dict[int | str, float]
    lpips: dict[int | str, float] = field(default_factory=dict)
    detail_lpips: dict[float, float] = field(default_factory=dict)
    detail: float | None = None
    calibration: DetailCalibration | None = None
    fit: DetailCalibrationFit | None = None
    bands: list[BandGains] | None = None
    images: int = 0
    anchor: str = "input"


@torch.no_grad()
def calibrate(upsampler: Upsampler, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, seed: int = 0,
              total: int | None = None, lpips: torch.nn.Module | None = None,
              candidates: Sequence[int] = BACK_PROJECT_CANDIDATES, edges: tuple[float, ...] = DEFAULT_EDGES,
              fit_dial: bool = True) -> Calibration:
    """Fit back-projection (and, for posterior-mean flows with `fit_dial`, the per-band dial; for flows from a
    restorer, only the order in which the dial turns the bands on: its detail 0 stays the restorer's image) over
    `pairs`, (lr (B, 3, h, w), hr (B, 3, s·h, s·w)) in [-1, 1], rendered with the upsampler's saved sampler; pair i
    draws its source noise from seed + i. Applies the result to `upsampler` (its sampler's back_project, its
    detail_calibration) and returns what was measured. The drafts are kept on the CPU in half precision for
    the later passes."""
    if not candidates or any(n < 0 for n in candidates):
        raise ValueError(f"back-projection candidates must be ints >= 0, got {list(candidates)}")
    device = next(upsampler.model.parameters()).device
    pm = upsampler.flow.needs_posterior_mean and fit_dial
    fit = DetailCalibrationFit(upsampler.scale, edges) if pm else None
    kept: list[tuple[Draft, torch.Tensor]] = []
    for index, (lr, hr) in enumerate(tqdm(pairs, total=total, desc="calibrate", unit="img")):
        draft = upsampler.draft(lr.to(device), torch.Generator(device).manual_seed(seed + index), upsampler.sampler)
        if fit is not None:
            fit.update(draft.estimate, draft.sample, hr.to(device))
        kept.append((_cast(draft, lambda x: x.half().cpu()), hr.half().cpu()))
    if not kept:
        raise ValueError("no images were given to calibrate on")
    if fit is not None:
        dial = fit.result()
        if upsampler.restorer is not None:  # detail 0 is the restorer's own image, the dial's promise
            dial = replace(dial, weights=(0.0,) * dial.bands)
        upsampler.detail_calibration = replace(dial, sampler=upsampler.sampler.format())
    result = _choose_back_project(upsampler, kept, candidates, lpips)
    if fit is None:
        return result
    calibration, bands = upsampler.detail_calibration, None
    if lpips is not None:
        def post(pred: torch.Tensor, index: int) -> torch.Tensor:
            draft = kept[index][0]
            return back_project(pred, (draft.lr if result.anchor == "input" else draft.anchor).float(),
                                result.back_project)

        images = ((draft.estimate.float(), draft.sample.float(), hr.float())
                  for draft, hr in tqdm(kept, desc="detail path", unit="img"))
        calibration, bands = fit_spans(calibration, images, _distance(lpips), upsampler.scale, post)
        upsampler.detail_calibration = calibration
        ends = sorted({end for _, end in calibration.spans})
        _, detail_lpips = _score(upsampler, kept, {d: upsampler.sampler.replace(detail=d) for d in ends}, lpips)
        detail = min(detail_lpips, key=lambda d: (detail_lpips[d], -d))
        upsampler.sampler = upsampler.sampler.replace(detail=detail)
        result = replace(_choose_back_project(upsampler, kept, candidates, lpips), detail_lpips=detail_lpips,
                         detail=detail)
    upsampler.detail_calibration = replace(calibration, back_project=result.back_project)
    result.calibration, result.fit, result.bands = upsampler.detail_calibration, fit, bands
    return result


def _choose_back_project(upsampler: Upsampler, kept: list[tuple[Draft, torch.Tensor]], candidates: Sequence[int],
                         lpips: torch.nn.Module | None) -> Calibration:
    """Score every back-projection step count at the folder's detail — onto the input, and for restorer estimates
    also onto the restorer's image reduced to the input's size (keys "n onto estimate"), which does not copy an
    input's noise and blocks back — and keep the best PSNR (the fewest steps within BACK_PROJECT_TOLERANCE_DB of
    it) among the settings whose LPIPS (when measured) is no worse than the fewest steps' as the folder's."""
    options = {n: upsampler.sampler.replace(back_project=n, anchor="input") for n in candidates}
    if upsampler.restorer is not None:
        options.update({f"{n} onto estimate": upsampler.sampler.replace(back_project=n, anchor="estimate")
                        for n in candidates if n})
    psnr, lpips_scores = _score(upsampler, kept, options, lpips)
    fewest = min(candidates)
    allowed = [k for k in options if not lpips_scores or lpips_scores[k] <= lpips_scores[fewest]]
    best = max(psnr[k] for k in allowed)
    key = min((k for k in allowed if psnr[k] >= best - BACK_PROJECT_TOLERANCE_DB),
              key=lambda k: (options[k].back_project, -psnr[k]))
    upsampler.sampler = upsampler.sampler.replace(back_project=options[key].back_project, anchor=options[key].anchor)
    return Calibration(options[key].back_project, psnr, lpips_scores, images=len(kept), anchor=options[key].anchor)


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
