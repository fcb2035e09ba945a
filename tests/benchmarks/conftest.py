"""Fixtures of the benchmark tests: the training tests' tiny image folder."""

import pytest

from ..train.conftest import write_images


@pytest.fixture
def image_dir(tmp_path):
    return write_images(tmp_path / "images")
