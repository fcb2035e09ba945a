"""`fmboost info`: versions, compute device, and which optional offline assets ($FMBOOST_SHARED) are found."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

import torch
from fmboost.models.assets import LPIPS_SHARED_PATH, shared_dir, shared_path

PACKAGES = ("fmboost", "torch", "diffusers", "transformers", "accelerate", "torchdiffeq", "kornia", "torchmetrics",
            "datasets", "gradio")
ASSETS = {
    "TAEF2 autoencoder": "weights/taef2/taef2_encoder.pth",
    "LPIPS (AlexNet) weights": LPIPS_SHARED_PATH,
    "CLIP tokenizer": "tokenizers/clip/tokenizer.json",
    "face photos": "data/faces",
    "landscape photos": "data/landscapes",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def collect() -> dict:
    """Everything `info` prints, as a dict (also used by benchmarks to record the environment)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    elif torch.backends.mps.is_available():
        device = "mps"
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    shared = shared_dir()
    assets = {label: str(shared_path(rel)) if shared_path(rel) else "not found" for label, rel in ASSETS.items()}
    return {"python": platform.python_version(), "versions": versions, "device": device,
            "shared_dir": str(shared) if shared else "not found (set FMBOOST_SHARED)", "assets": assets}


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(f"python        {info['python']}")
    for name, version in info["versions"].items():
        print(f"{name:<14}{version}")
    print(f"device        {info['device']}")
    print(f"shared dir    {info['shared_dir']}")
    for label, where in info["assets"].items():
        print(f"  {label:<24}{where}")
    return 0
