"""`fmboost export CHECKPOINT -o DIR`: turn a training checkpoint into an `Upsampler` folder.

Training saves only the final EMA weights as `<output_dir>/upsampler`. To evaluate an earlier step, or
the training weights instead of their EMA (is the EMA helping?), export the checkpoint: the weights come
from `CHECKPOINT`, everything else — the CFMUNet architecture, the first stage with its latent
statistics, the coupling and the default SamplerConfig — from an upsampler folder of the same run (`--like`,
default `<output_dir>/upsampler`), because the latent statistics are a property of the run's data, not
of the step.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from accelerate.utils.constants import SAFE_WEIGHTS_NAME
from diffusers.training_utils import EMAModel
from fmboost.models.unet import CFMUNet
from fmboost.models.upsampler import BOOST_CONFIG_NAME, POSTERIOR_MEAN_FOLDER
from fmboost.pipelines.cli_options import add_output_option
from fmboost.train.checkpoint import read_trainer_state
from safetensors.torch import load_file

EMA_STATE_NAME = "custom_checkpoint_0.pkl"  # the trainer registers the EMA as its only custom object
WEIGHTS = ("ema", "training")


def export_checkpoint(checkpoint: str | Path, out: str | Path, weights: str = "ema",
                      like: str | Path | None = None) -> int:
    """Write `checkpoint`'s `weights` ("ema" or "training") as an Upsampler folder `out`; returns its step."""
    checkpoint, out = Path(checkpoint), Path(out)
    like = Path(like) if like is not None else checkpoint.parent / "upsampler"
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if not (checkpoint / SAFE_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} in {checkpoint}: not a training checkpoint folder")
    if not (like / BOOST_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {BOOST_CONFIG_NAME} in {like}: pass --like, a saved upsampler of the same run")
    step = read_trainer_state(checkpoint).global_step  # refuses a checkpoint whose save never completed
    if out.resolve() == like.resolve():
        raise ValueError(f"-o {out} is the folder the rest is read from (--like): write somewhere else")
    ema_path = checkpoint / EMA_STATE_NAME
    if weights == "ema" and not ema_path.is_file():
        raise FileNotFoundError(f"no EMA state ({EMA_STATE_NAME}) in {checkpoint}: the run had use_ema false; "
                                "export --weights training")

    model = CFMUNet.from_config(CFMUNet.load_config(like))
    state, expected = load_file(checkpoint / SAFE_WEIGHTS_NAME), model.state_dict()
    misfits = sorted((expected.keys() ^ state.keys())
                     | {k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape})
    if misfits:
        raise ValueError(f"the weights in {checkpoint} do not fit the CFMUNet of {like} (another run?): "
                         f"{len(misfits)} tensors missing, extra or of another shape, e.g. {misfits[0]}")
    model.load_state_dict(state)
    if weights == "ema":
        ema = EMAModel(model.parameters())
        ema.load_state_dict(torch.load(ema_path, map_location="cpu", weights_only=True))
        ema.copy_to(model.parameters())
    model.save_pretrained(out)
    if (like / POSTERIOR_MEAN_FOLDER).is_dir():  # a posterior-mean flow: its frozen R goes along unchanged
        shutil.copytree(like / POSTERIOR_MEAN_FOLDER, out / POSTERIOR_MEAN_FOLDER, dirs_exist_ok=True)
    shutil.copyfile(like / BOOST_CONFIG_NAME, out / BOOST_CONFIG_NAME)
    return step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a training checkpoint folder, e.g. runs/x/checkpoint-3000")
    add_output_option(parser, "the Upsampler folder to write", old=("--out",), required=True)
    parser.add_argument("--weights", choices=WEIGHTS, default="ema",
                        help="the EMA weights (what training saves at the end) or the raw training weights")
    parser.add_argument("--like", help="a saved upsampler of the same run, for everything but the weights "
                                       "(default: CHECKPOINT/../upsampler)")


def run(args: argparse.Namespace) -> int:
    step = export_checkpoint(args.checkpoint, args.output, args.weights, args.like)
    which = "EMA" if args.weights == "ema" else "training"
    print(f"exported the {which} weights of step {step} from {args.checkpoint} to {args.output}")
    return 0
