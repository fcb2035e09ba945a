"""Lay out the train / test splits that RESULTS.md evaluates, as folders of symlinks under data/.

    python scripts/make_splits.py [--shared ../shared] [-o data]

Faces (256 → 1024): every photo of shared/data/faces and shared/data/faces_more that is at least 1024 px
on its short side is a training face, except the held-out test set — the ≥ 1024-px photos among the last 20
of shared/data/faces sorted by name (18 faces; none of faces_more is a near-duplicate of them). Photos
(256 → 1024): shared/data/photos, landscapes and nature sorted by path; every 10th is held out.
faces2_val / photos_val: the last 2 training images by name, the ones training holds out for validation
(`--num-validation-images 2`), on which `fmboost calibrate-detail` fits the per-band dial.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fmboost.pipelines.cli_options import add_output_option
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def at_least(path: Path, side: int) -> bool:
    with Image.open(path) as image:
        return min(image.size) >= side


def link(paths: list[Path], folder: Path, prefix_parent: bool = False) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        name = f"{path.parent.name}__{path.name}" if prefix_parent else path.name
        target = folder / name
        if not target.exists():
            os.symlink(path.resolve(), target)
    return len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=os.environ.get("FMBOOST_SHARED", "../shared"))
    add_output_option(parser, "where the split folders are made (default: %(default)s)", old=("--out",), default="data")
    args = parser.parse_args()
    data, out = Path(args.shared) / "data", Path(args.output)
    faces = images(data / "faces")
    test = [p for p in faces[-20:] if at_least(p, 1024)]
    train = [p for p in faces[:-20] + images(data / "faces_more") if at_least(p, 1024)]
    photos = sorted(p for d in ("photos", "landscapes", "nature") for p in images(data / d))
    photos_train = [p for i, p in enumerate(photos, 1) if i % 10]
    counts = {"faces2_train": link(train, out / "faces2_train"), "faces_test1024": link(test, out / "faces_test1024"),
              "faces2_val": link(sorted(train, key=lambda p: p.name)[-2:], out / "faces2_val"),
              "photos_train": link(photos_train, out / "photos_train", True),
              "photos_test": link([p for i, p in enumerate(photos, 1) if not i % 10], out / "photos_test", True),
              "photos_val": link(sorted(photos_train, key=lambda p: f"{p.parent.name}__{p.name}")[-2:],
                                 out / "photos_val", True)}
    print(", ".join(f"{out / name}: {n}" for name, n in counts.items()))


if __name__ == "__main__":
    main()
