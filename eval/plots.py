"""Figures for `fmboost eval-sr`: the comparison grid and quality-vs-NFE curves (matplotlib, no pyplot state)."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

#: Zoom window for the grid as (center_y, center_x, side), fractions of the image: aligned faces have
#: their eyes a little above the middle, where CFM artefacts show first.
ZOOM = (0.45, 0.5, 0.3)
#: Characters per line of a grid column's title: a 2.6-inch column holds about this many at 10 pt, so longer
#: method names ("CFM[pm0.1] euler:linear:2 · detail 0.75 + BP2") wrap instead of running into their neighbours.
TITLE_WIDTH = 28
CURVE_METRICS = (("psnr", "PSNR (dB) ↑"), ("lpips", "LPIPS ↓"), ("dist_to_reference", "latent MSE to dopri5 ↓"))


def _zoom_box(height: int, width: int, zoom: tuple[float, float, float]) -> tuple[int, int, int]:
    center_y, center_x, side = zoom
    size = max(1, int(side * min(height, width)))
    top = min(max(0, int(center_y * height) - size // 2), height - size)
    left = min(max(0, int(center_x * width) - size // 2), width - size)
    return top, left, size


def column_title(name: str, width: int = TITLE_WIDTH) -> str:
    """`name` wrapped at spaces into lines of at most `width` characters (a longer word keeps its own line)."""
    return textwrap.fill(name, width, break_long_words=False, break_on_hyphens=False)


def comparison_grid(grid: dict[str, list[torch.Tensor]], columns: list[str], path: str | Path,
                    zoom: tuple[float, float, float] = ZOOM) -> Path:
    """Saves a PNG with, per image, a row of full images (`columns` of `grid`, (3, H, W) in [0, 1]) and a row
    of the same zoomed window; the low-res column is shown with nearest-neighbour pixels at the high-res size."""
    columns = [c for c in columns if c in grid]
    num_images = len(grid[columns[0]])
    figure = Figure(figsize=(2.6 * len(columns), 5.2 * num_images), layout="constrained")
    axes = figure.subplots(2 * num_images, len(columns), squeeze=False)
    for i in range(num_images):
        height, width = grid["ground truth" if "ground truth" in grid else columns[-1]][i].shape[-2:]
        top, left, size = _zoom_box(height, width, zoom)
        for j, column in enumerate(columns):
            image = grid[column][i]
            if image.shape[-2:] != (height, width):
                image = F.interpolate(image[None], size=(height, width), mode="nearest")[0]
            array = image.permute(1, 2, 0).clamp(0, 1).numpy()
            full, crop = axes[2 * i, j], axes[2 * i + 1, j]
            full.imshow(array)
            full.add_patch(Rectangle((left, top), size, size, fill=False, edgecolor="yellow", linewidth=1.2))
            crop.imshow(array[top:top + size, left:left + size], interpolation="nearest")
            if i == 0:
                full.set_title(column_title(column), fontsize=10)
            for axis in (full, crop):
                axis.set_axis_off()
    figure.savefig(path, dpi=110)
    return Path(path)


def nfe_curves(results: dict[str, dict[str, float]], curves: dict[str, str], path: str | Path,
               adaptive: tuple[str, ...] = (), baselines: tuple[str, ...] = ("bicubic",)) -> Path:
    """Saves quality vs NFE: one line per curve (methods grouped by `curves`: method → curve label), adaptive
    solvers as dashed horizontal lines (NFE in the legend), baselines dotted; one panel per metric present.
    The distance-to-reference panel is log-scaled and leaves out the reference itself (distance 0)."""
    panels = [(key, title) for key, title in CURVE_METRICS if any(key in results[m] for m in curves)]
    figure = Figure(figsize=(5 * max(1, len(panels)), 4), layout="constrained")
    axes = figure.subplots(1, max(1, len(panels)), squeeze=False)[0]
    lines = defaultdict(list)
    for method, label in curves.items():
        if method not in adaptive:
            lines[label].append(method)
    for axis, (key, title) in zip(axes, panels):
        for label, methods in lines.items():
            points = sorted((results[m]["nfe"], results[m][key]) for m in methods if key in results[m])
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        for method in adaptive:
            if key in results[method] and key != "dist_to_reference":  # the reference's own distance is 0
                axis.axhline(results[method][key], linestyle="--", color="black",
                             label=f"{method} (NFE {results[method]['nfe']:.0f})")
        for method in baselines:
            if method in results and key in results[method]:
                axis.axhline(results[method][key], linestyle=":", color="gray", label=method)
        axis.set_xscale("log", base=2)
        if key == "dist_to_reference":
            axis.set_yscale("log")
        axis.set_xlabel("NFE")
        axis.set_ylabel(title)
        axis.grid(alpha=0.3)
    if panels:
        axes[0].legend(fontsize=7)
    figure.savefig(path, dpi=110)
    return Path(path)


PD_PANELS = (("lpips", "LPIPS ↓"), ("patch_fid", "patch-FID ↓"))


def perception_distortion(results: dict[str, dict[str, float]], sweeps: dict[str, list[str]], path: str | Path,
                          title: str = "") -> Path:
    """Saves the perception–distortion plane: PSNR on x (better to the right), LPIPS and patch-FID on y (better
    down), one panel each where measured; every method a labelled point, each `sweeps` entry (label → its
    methods, e.g. one fidelity-dial sweep) a line through its points in the given order."""
    panels = [(key, name) for key, name in PD_PANELS if any(key in r for r in results.values())]
    figure = Figure(figsize=(6.5 * max(1, len(panels)), 5), layout="constrained")
    axes = figure.subplots(1, max(1, len(panels)), squeeze=False)[0]
    swept = {m for methods in sweeps.values() for m in methods}
    for axis, (key, name) in zip(axes, panels):
        for label, methods in sweeps.items():
            points = [(results[m]["psnr"], results[m][key]) for m in methods if key in results.get(m, {})]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=4, label=label)
        for method, row in results.items():
            if method in swept or key not in row or "psnr" not in row:
                continue
            axis.scatter(row["psnr"], row[key], s=22)
            axis.annotate(method, (row["psnr"], row[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel("PSNR (dB) →")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        if sweeps:
            axis.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=110)
    return Path(path)
