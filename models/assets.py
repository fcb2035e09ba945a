"""Where optional offline assets live: the folder `$FMBOOST_SHARED` names, else `../shared` beside the checkout.

They are what a machine without network access needs for real experiments and full tests: real photos, the
pretrained TAEF2 and LPIPS weights, the CLIP tokenizer. None of it is required: code that uses an asset takes an
explicit path too, and tests that need one skip, naming it, where it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ENV = "FMBOOST_SHARED"
#: The LPIPS (AlexNet, v0.1) state dict inside the shared-assets folder.
LPIPS_SHARED_PATH = "weights/lpips/lpips_alex_v0.1_full_state_dict.pth"


def shared_dir() -> Path | None:
    """The shared-assets folder, or None when there is none (e.g. a fresh clone with $FMBOOST_SHARED unset)."""
    candidate = Path(os.environ.get(SHARED_ENV, REPO_ROOT.parent / "shared"))
    return candidate if candidate.is_dir() else None


def shared_path(relative: str) -> Path | None:
    """`shared_dir() / relative` if it exists, else None."""
    root = shared_dir()
    path = root / relative if root is not None else None
    return path if path is not None and path.exists() else None
