"""`fmboost bench collection`'s pieces: its inputs, its bad inputs and its comparison of two output folders."""

import numpy as np
import PIL.Image
import pytest
from fmboost.benchmarks import collection as bench_collection
from fmboost.pipelines.collection import BadInput, read_image
from fmboost.train.image_sources import ImageRecord


def test_inputs_bad_inputs_and_comparison(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)).save(source / f"{i}.jpg")
    inputs = bench_collection.make_inputs([str(source)], 2, 16, tmp_path / "inputs")
    assert sorted(p.name for p in inputs.iterdir()) == ["0000.png", "0001.png"]
    assert PIL.Image.open(inputs / "0000.png").size == (16, 16)
    bad = bench_collection.add_bad_inputs(inputs, 3)
    kinds = set()
    for name in bad:
        with pytest.raises(BadInput) as caught:
            read_image(ImageRecord(name, str(inputs / name)), 16.0)
        kinds.add(caught.value.kind)
    assert kinds == {"unreadable", "empty", "not-an-image"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, value in (("a", 10), ("b", 11)):
        PIL.Image.fromarray(np.full((4, 4, 3), 10, np.uint8)).save(tmp_path / folder / "same.png")
        PIL.Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(tmp_path / folder / "other.png")
    assert bench_collection.compare(tmp_path / "a", tmp_path / "b") == {
        "same_names": True, "files": 2, "byte_identical": 1, "max_abs_diff": 1}
