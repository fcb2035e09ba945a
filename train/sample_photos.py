"""Real colour photos that ship inside installed PyPI wheels: the offline data of the demo and tests.

scikit-image and scikit-learn carry a handful of natural photographs as package data, so a fresh
machine with no network and no `../shared` still has real images to learn super-resolution on.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# (package, file) — colour photographs only; the wheels' grey textures and diagrams are left out.
SAMPLE_PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}


def sample_photo_path(name: str) -> Path:
    """Path of one photo inside its installed package."""
    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"sample photo must be one of {sorted(SAMPLE_PHOTOS)}, got {name!r}")
    package, relative = SAMPLE_PHOTOS[name]
    module = __import__(package)
    path = Path(module.__file__).parent / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {package} (its wheel ships this photo)")
    return path


def load_sample_photos(names: list[str] | None = None) -> dict[str, Image.Image]:
    """{name: RGB PIL image} for the given names (default: all)."""
    return {name: Image.open(sample_photo_path(name)).convert("RGB") for name in (names or SAMPLE_PHOTOS)}
