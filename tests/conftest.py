"""Shared fixtures: seeded generators and the optional ../shared assets (skipped with a reason)."""

import pytest
import torch
from fmboost.models.assets import shared_path


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def require_shared(relative: str):
    """Path to a ../shared asset, or skip the test saying what is missing."""
    path = shared_path(relative)
    if path is None:
        pytest.skip(f"needs ../shared/{relative} (workplace asset; absent on this machine)")
    return path


@pytest.fixture
def taef2_dir():
    return require_shared("weights/taef2")


@pytest.fixture
def faces_dir():
    return require_shared("data/faces")
