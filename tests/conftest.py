"""Shared fixtures: seeded generators and the optional offline assets of $FMBOOST_SHARED (skipped with a reason)."""

import pytest
import torch
from fmboost.models.assets import LPIPS_SHARED_PATH, shared_path


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def require_shared(relative: str):
    """Path to an optional offline asset, or skip the test saying what is missing."""
    path = shared_path(relative)
    if path is None:
        pytest.skip(f"needs the optional offline asset {relative} in $FMBOOST_SHARED (default ../shared): absent")
    return path


@pytest.fixture
def taef2_dir():
    return require_shared("weights/taef2")


@pytest.fixture
def faces_dir():
    return require_shared("data/faces")


@pytest.fixture
def lpips_file():
    return require_shared(LPIPS_SHARED_PATH)
