"""`fmboost train --config X.yaml [--key value ...]`: the accelerate entry's code, run in-process."""

from __future__ import annotations

import argparse

from .cfm_upsampler import NonFiniteLossError, train
from .config import add_config_arguments, load_config, overrides_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="flat YAML config (keys = fmboost.train.config.TrainConfig fields)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides_from_args(args))
    try:
        train(config)
    except NonFiniteLossError as err:
        print(f"fmboost train: {err}")
        return 1
    return 0
