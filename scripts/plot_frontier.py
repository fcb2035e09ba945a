"""Draw PSNR–LPIPS curves from several `fmboost eval-sr` results.json files on one plot, with a target corner.

    python scripts/plot_frontier.py OUT.png --reference "regression · BP2" \
        --curve "blend, 2 Euler steps=runs/x/results.json|CFM[pm] euler:linear:2 · detail {d} · BP2|0.5,0.75,1" ...

A curve is LABEL=RESULTS_JSON|METHOD_PATTERN|VALUES — METHOD_PATTERN names the methods with `{d}` replaced
by each of VALUES (comma-separated). The reference method (from the first curve's file) is drawn as a star,
and the target corner (PSNR ≥ reference − --psnr-margin, LPIPS ≤ --lpips-ratio × reference) as dashed lines.
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def parse_curve(text: str) -> tuple[str, str, str, list[str]]:
    label, rest = text.split("=", 1)
    path, pattern, values = (rest.split("|") + [""])[:3]
    return label, path, pattern, [v for v in values.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--curve", action="append", required=True, metavar="LABEL=JSON|PATTERN|VALUES")
    parser.add_argument("--reference", default="regression · BP2")
    parser.add_argument("--psnr-margin", type=float, default=0.1)
    parser.add_argument("--lpips-ratio", type=float, default=0.9)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(7, 5))
    reference = None
    for text in args.curve:
        label, path, pattern, values = parse_curve(text)
        results = json.loads(open(path).read())
        if reference is None:
            reference = results[args.reference]
        names = [pattern.replace("{d}", v) for v in values] if values else [pattern]
        points = [(results[n]["psnr"], results[n]["lpips"]) for n in names]
        ax.plot(*zip(*points), marker="o", label=label)
        for (x, y), v in zip(points, values):
            ax.annotate(v, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    x0, y0 = reference["psnr"], reference["lpips"]
    ax.plot([x0], [y0], marker="*", markersize=14, color="black", linestyle="none", label=args.reference)
    ax.axvline(x0 - args.psnr_margin, color="grey", linestyle="--", linewidth=1)
    ax.axhline(args.lpips_ratio * y0, color="grey", linestyle="--", linewidth=1)
    ax.fill_between([x0 - args.psnr_margin, ax.get_xlim()[1]], ax.get_ylim()[0], args.lpips_ratio * y0,
                    color="green", alpha=0.08, label="target")
    ax.set_xlabel("PSNR (dB) →")
    ax.set_ylabel("← LPIPS")
    ax.set_title(args.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
