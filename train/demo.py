"""`fmboost demo`: train a small CFM upsampler offline on CPU in minutes and show that it works.

It learns 4× super-resolution in pixel space on the photos shipped inside the scikit-image /
scikit-learn wheels (the last two, `china` and `flower`, are held out), then compares CFM with
bicubic and bilinear up-sampling on crops of the held-out photos: PSNR, SSIM, LPIPS (when its
weights can be found) and sharpness (high-frequency energy relative to the ground truth, 1.0 = as
sharp). Writes `results.json` ({method: {metric: value}}) and `comparison.png` to the output dir.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fmboost.models import Upsampler, metrics
from fmboost.pipelines.cli_options import add_option, add_output_option

from .cfm_upsampler import train
from .config import load_config
from .data import image_records, split_records, validation_pairs
from .validation import save_grid, upsample_images

# The embedded default (configs/demo.yaml holds the same keys; a test keeps them equal).
DEMO_CONFIG: dict = {
    "dataset_name": "sample_photos",
    "resolution": 256,  # short side resized to 256 px, centre/random 256² square (less JPEG grain)
    "crop_size": 32,
    "scale": 4,
    "random_flip": True,
    "num_validation_images": 2,  # china, flower: held out
    "use_latent_cache": True,
    "crops_per_image": 256,
    "latent_stats_images": 64,
    "first_stage": "identity",  # pixel space: PSU = bicubic up-sampling of the low-res image
    "model_preset": "small",
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_levels": [False, False, False],
    "upsample": "psu",
    "noise_sigma": 0.0,  # noise-free source: a 1 M UNet trained for minutes leaves injected noise as grain
    "objective": "cfm",
    "time_sampling": "uniform",  # Euler starts at t = 0, which logit-normal almost never samples
    "sampler": "euler:linear:2",
    "output_dir": "runs/demo",
    "train_batch_size": 8,
    "max_train_steps": 600,
    "learning_rate": 2.0e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 30,
    "ema_decay": 0.99,
    "checkpointing_steps": 1000000,
    "checkpoints_total_limit": 1,
    "validation_steps": 1000000,
}
METHODS = ("cfm", "bicubic", "bilinear")
METRICS = ("psnr", "ssim", "lpips", "sharpness")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML overriding the embedded demo config (e.g. configs/demo.yaml)")
    add_output_option(parser, "the run folder (default: runs/demo)", old=("--output_dir",), dest="output_dir")
    add_option(parser, "--max-train-steps", old=("--max_train_steps",), type=int, default=None,
               help="fewer for a quick look")
    add_option(parser, "--eval-crop-size", old=("--eval_crop_size",), type=int, default=128,
               help="high-res side of the held-out crops")
    add_option(parser, "--eval-crops-per-image", old=("--eval_crops_per_image",), type=int, default=6)


def score(pred: torch.Tensor, target: torch.Tensor, lpips_model) -> dict[str, float | None]:
    """Mean metrics of (N, 3, H, W) images in [-1, 1]."""
    p, t = (pred.clamp(-1, 1) + 1) / 2, (target + 1) / 2
    with torch.no_grad():
        lp = metrics.lpips(p, t, lpips_model).mean().item() if lpips_model is not None else None
    return {"psnr": metrics.psnr(p, t).mean().item(), "ssim": metrics.ssim(p, t).mean().item(), "lpips": lp,
            "sharpness": metrics.sharpness(p, t).mean().item()}


def evaluate(upsampler: Upsampler, pairs: dict, output_dir: Path, seed: int) -> dict:
    """{method: {metric: value}} on the held-out pairs, and comparison.png (bilinear | bicubic | CFM | truth)."""
    hr, lr = pairs["hr"], pairs["lr"]
    cfm, _ = upsample_images(upsampler, lr, seed)  # from_pretrained: the model is in eval mode
    outputs = {"cfm": cfm, "bicubic": F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False),
               "bilinear": F.interpolate(lr, size=hr.shape[-2:], mode="bilinear", align_corners=False)}
    try:
        lpips_model = metrics.load_lpips()
    except metrics.MetricUnavailable as err:
        print(f"LPIPS skipped: {err}")
        lpips_model = None
    save_grid([outputs["bilinear"].clamp(-1, 1), outputs["bicubic"].clamp(-1, 1), cfm, hr],
              ["bilinear", "bicubic", "CFM", "truth"], output_dir / "comparison.png")
    return {method: score(image, hr, lpips_model) for method, image in outputs.items()}


def format_table(results: dict) -> str:
    lines = [f"{'method':<10}{'PSNR dB':>9}{'SSIM':>8}{'LPIPS':>8}{'sharpness':>11}"]
    for method, row in results.items():
        lpips = "skipped" if row["lpips"] is None else f"{row['lpips']:.3f}"
        lines.append(f"{method:<10}{row['psnr']:>9.2f}{row['ssim']:>8.3f}{lpips:>8}{row['sharpness']:>11.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    overrides = {k: v for k, v in (("output_dir", args.output_dir), ("max_train_steps", args.max_train_steps))
                 if v is not None}
    config = load_config(args.config, overrides, base=DEMO_CONFIG)
    output_dir = Path(config.output_dir)
    upsampler = Upsampler.from_pretrained(train(config))
    _, held_out = split_records(image_records(config), config)
    pairs = validation_pairs(held_out, config, args.eval_crop_size, args.eval_crops_per_image)
    results = evaluate(upsampler, pairs, output_dir, config.seed)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n4× super-resolution on {pairs['hr'].shape[0]} held-out {args.eval_crop_size}² crops "
          f"({', '.join(r.name for r in held_out)}), CFM with {upsampler.sampler.num_steps} "
          f"{upsampler.sampler.solver} steps:")
    print(format_table(results))
    print("sharpness: high-frequency energy / ground truth's (1.0 = as sharp). Wrote "
          f"{output_dir / 'results.json'} and {output_dir / 'comparison.png'} in {time.perf_counter() - start:.0f} s.")
    return 0
