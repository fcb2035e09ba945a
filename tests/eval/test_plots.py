"""The comparison grid's column titles wrap to the column instead of running into their neighbours."""

import torch
from fmboost.eval.plots import TITLE_WIDTH, column_title, comparison_grid


def test_long_method_names_wrap_at_spaces_and_keep_every_word():
    name = "CFM[pm0.1_cool] euler:linear:2 · detail 0.75 · BP2"
    title = column_title(name)
    lines = title.split("\n")
    assert len(lines) > 1 and all(len(line) <= TITLE_WIDTH for line in lines)
    assert title.split() == name.split()
    assert column_title("regression") == "regression"


def test_grid_draws_wrapped_titles(tmp_path):
    images = [torch.rand(3, 32, 32)]
    grid = {"low-res": [torch.rand(3, 8, 8)], "CFM[pm0.1_cool] euler:linear:2 · detail 0 · BP2": images,
            "ground truth": images}
    path = comparison_grid(grid, list(grid), tmp_path / "grid.png")
    assert path.stat().st_size > 1000
