"""The super-resolution evaluation recipe behind `fmboost eval-sr`, top to bottom.

    pairs (hr, lr)  ──►  every method on the same lr  ──►  per-image PSNR / SSIM (RGB and Y) / LPIPS,
                                                            Inception features of the image and of 4 crops
                    ──►  means per method + FID / patch-FID  ──►  results.json, results.md, grid, NFE curve

Pairing: image i uses one seed (seed + i) for everything random — its patch-FID crop anchors (shared by
the real and every generated image) and the generator handed to each method, so every CFM sampler
starts from the same x0 noise and samplers are compared sample by sample. The distance to the
reference sampler (dopri5) is the pixel MSE between the images made from that same x0.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from fmboost.models import SamplerConfig
from fmboost.models import metrics as M
from fmboost.models.degradations import to_uint8
from fmboost.models.sampling import SCHEDULES
from tqdm.auto import tqdm

from .baselines import Method
from .pairs import Pair

#: Metric keys in table order: (key, column title, higher is better).
COLUMNS = (("nfe", "NFE", None), ("psnr", "PSNR ↑", True), ("ssim", "SSIM ↑", True), ("psnr_y", "PSNR-Y ↑", True),
           ("ssim_y", "SSIM-Y ↑", True), ("lpips", "LPIPS ↓", False), ("fid", "FID ↓", False),
           ("patch_fid", "pFID ↓", False), ("dist_to_reference", "MSE→dopri5 ↓", False),
           ("seconds_per_image", "s/img", None))
PATCH_CROPS, PATCH_SIZE = 4, 512


# --------------------------------------------------------------------------- samplers


def study_samplers(nfes: Iterable[int] = (2, 4, 8, 16, 32), reference: str = "dopri5") -> list[SamplerConfig]:
    """The schedule study: Euler with every seed schedule at every NFE (logit-normal CDF: μ ∈ {−1, 0, 1}, σ = 3)
    + the reference (a `SamplerConfig.parse` string, dopri5 by default). The logit-normal quantile grid is not
    one of the seed's and is left out."""
    variants = []
    for schedule in SCHEDULES:
        if schedule == "logit_normal_quantile":
            continue
        if schedule == "logit_normal":
            variants += [(schedule, {"mu": float(mu), "std": 3.0}) for mu in (-1, 0, 1)]
        else:
            variants.append((schedule, {}))
    configs = [SamplerConfig("euler", n, schedule, params) for schedule, params in variants for n in nfes]
    return configs + [SamplerConfig.parse(reference)]


# --------------------------------------------------------------------------- metrics


@dataclass
class MetricNetworks:
    """The pretrained metric networks that could be loaded; `skipped` maps metric → reason for the others."""

    lpips: torch.nn.Module | None = None
    inception: torch.nn.Module | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, lpips_weights: str | None = None, inception: str | None = None, device: str = "cpu",
             use_lpips: bool = True, use_fid: bool = True) -> MetricNetworks:
        networks = cls()
        if use_lpips:
            try:
                networks.lpips = M.load_lpips(lpips_weights, device)
            except M.MetricUnavailable as err:
                networks.skipped["lpips"] = str(err)
        if use_fid:
            try:
                networks.inception = M.load_inception(inception, device)
            except M.MetricUnavailable as err:
                networks.skipped["fid"] = networks.skipped["patch_fid"] = str(err)
        return networks


def image_metrics(pred: torch.Tensor, target: torch.Tensor, scale: int, networks: MetricNetworks) -> dict[str, float]:
    """PSNR / SSIM in RGB and on Y with a `scale`-pixel border crop, and LPIPS; (1, 3, H, W) images in [0, 1]."""
    values = {"psnr": M.psnr(pred, target), "ssim": M.ssim(pred, target),
              "psnr_y": M.psnr(pred, target, y_channel=True, crop_border=scale),
              "ssim_y": M.ssim(pred, target, y_channel=True, crop_border=scale)}
    if networks.lpips is not None:
        values["lpips"] = M.lpips(pred, target, networks.lpips)
    return {key: float(value.item()) for key, value in values.items()}


def fid_features(images: torch.Tensor, anchors: list[tuple[int, int]], crop_size: int,
                 inception: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Inception features of (1, 3, H, W) images in [0, 1]: the whole image (1, D) and its crops (K, D)."""
    return (M.inception_features(images, inception),
            M.inception_features(M.take_crops(images, anchors, crop_size), inception))


# --------------------------------------------------------------------------- the evaluation loop


@dataclass
class Evaluation:
    """results: {method: {metric: mean}}; per_image: {method: {metric: [values]}}; grid: the first images
    as {"low-res" | "ground truth" | method: [(3, H, W) in [0, 1]]}; skipped: metric → reason."""

    results: dict[str, dict[str, float]]
    per_image: dict[str, dict[str, list[float]]]
    grid: dict[str, list[torch.Tensor]]
    skipped: dict[str, str]
    num_images: int


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1] float32."""
    return ((images.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def evaluate(pairs: Iterable[Pair], methods: dict[str, Method], scale: int, networks: MetricNetworks,
             seed: int = 0, reference: str | None = None, device: str = "cpu", grid_images: int = 3,
             num_images: int | None = None, save_images: str | Path | None = None) -> Evaluation:
    """Runs every method on every pair (reference first) and aggregates the metrics; see the module docstring.
    `save_images`: a folder that receives every scored image as an 8-bit PNG, `<method>/<image>.png`, and the
    inputs, `low-res/<image>.png` (what `fmboost upscale` would be given)."""
    order = list(methods)
    if reference is not None:
        methods = {reference: methods[reference], **methods}  # its image is the others' distance reference
    per_image = {name: defaultdict(list) for name in methods}
    features = {name: ([], []) for name in ("real", *methods)}
    grid: dict[str, list[torch.Tensor]] = defaultdict(list)
    index = -1
    progress = tqdm(total=None if num_images is None else num_images * len(methods), desc="eval-sr", unit="run")
    for index, pair in enumerate(pairs):
        hr, lr = pair.hr[None].to(device), pair.lr[None].to(device)
        target = to_unit(hr)
        crop_size = M.effective_crop_size(*hr.shape[-2:], PATCH_SIZE)
        anchors = M.crop_anchors(*hr.shape[-2:], crop_size, PATCH_CROPS, torch.Generator().manual_seed(seed + index))
        if networks.inception is not None:
            _append_features(features["real"], fid_features(target, anchors, crop_size, networks.inception))
        if index < grid_images:
            grid["low-res"].append(to_unit(pair.lr))
            grid["ground truth"].append(target[0].cpu())
        if save_images is not None:
            save_png(to_unit(lr)[0], Path(save_images) / "low-res" / f"{pair.name}.png")
        reference_image = None
        for name, method in methods.items():
            progress.set_postfix_str(f"{pair.name[:24]} · {name}")
            generator = torch.Generator(device).manual_seed(seed + index)  # same x0 noise for every sampler
            start = time.perf_counter()
            output = method(lr, hr, generator)
            seconds = time.perf_counter() - start + output.shared_seconds
            pred = to_unit(output.image)
            row = {**image_metrics(pred, target, scale, networks), "nfe": output.nfe, "seconds_per_image": seconds}
            if reference is not None and output.nfe:
                if name == reference:
                    reference_image = pred
                if reference_image is not None:
                    row["dist_to_reference"] = float((pred - reference_image).pow(2).mean())
            if save_images is not None:
                save_png(pred[0], Path(save_images) / method_folder(name) / f"{pair.name}.png")
            for key, value in row.items():
                per_image[name][key].append(value)
            if networks.inception is not None:
                _append_features(features[name], fid_features(pred, anchors, crop_size, networks.inception))
            if index < grid_images:
                grid[name].append(pred[0].cpu())
            progress.update()
    progress.close()
    num = index + 1
    if num == 0:
        raise ValueError("no evaluation pairs")
    results = {name: {key: _mean(values) for key, values in per_image[name].items()} for name in order}
    skipped = dict(networks.skipped)
    if networks.inception is not None:
        skipped.update(_add_fid(results, features))
    return Evaluation(results, {n: dict(r) for n, r in per_image.items()}, dict(grid), skipped, num)


def method_folder(name: str) -> str:
    """A results row's name as a folder name: 'CFM euler:linear:2 · BP2' → 'CFM_euler-linear-2_BP2'."""
    safe = "".join(c if c.isalnum() or c in ".-" else "-" if c in ":=," else "_" for c in name)
    return "_".join(part for part in safe.split("_") if part)


def save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] → an 8-bit RGB PNG (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(to_uint8(image[None] * 2 - 1)[0]).save(path)


def _append_features(store: tuple[list, list], new: tuple[torch.Tensor, torch.Tensor]) -> None:
    store[0].append(new[0])
    store[1].append(new[1])


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


def _add_fid(results: dict[str, dict[str, float]], features: dict[str, tuple[list, list]]) -> dict[str, str]:
    """FID on whole images and patch-FID on crops, each method against the real set; returns skip reasons."""
    real_full, real_crops = (torch.cat(f) for f in features["real"])
    if real_full.shape[0] < 2:
        return {"fid": f"needs at least 2 images, got {real_full.shape[0]}"}
    for name, rows in results.items():
        full, crops = (torch.cat(f) for f in features[name])
        rows["fid"] = M.frechet_distance(full, real_full)
        rows["patch_fid"] = M.frechet_distance(crops, real_crops)
    return {}


# --------------------------------------------------------------------------- reporting


def format_value(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "∞"
    if key == "nfe":
        return f"{value:g}"
    if key in ("ssim", "ssim_y", "lpips"):
        return f"{value:.3f}"
    if key == "dist_to_reference":
        return f"{value:.2e}"
    return f"{value:.2f}"


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """A README-ready table: one row per method, one column per metric any method has."""
    present = [(key, title) for key, title, _ in COLUMNS if any(key in rows for rows in results.values())]
    lines = ["| method | " + " | ".join(title for _, title in present) + " |",
             "|---|" + "---:|" * len(present)]
    for name, rows in results.items():
        lines.append(f"| {name} | " + " | ".join(format_value(key, rows.get(key)) for key, _ in present) + " |")
    return "\n".join(lines)


def json_safe(value):
    """Non-finite floats (PSNR of an exact reconstruction is +inf) become null, so the file is strict JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value if not isinstance(value, float) or math.isfinite(value) else None
