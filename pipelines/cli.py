"""`fmboost` command line: one subcommand per job, each a thin wrapper around the library.

Subcommands register themselves in COMMANDS as (module, help); `main` imports only the module of the command
that runs (`fmboost --help` lists the help strings and imports none), so `fmboost info` stays fast and a missing
optional dependency breaks only its command. The options several commands share are in
`fmboost.pipelines.cli_options`. A user error (bad argument, missing file or weights) prints one line, not a stack
trace.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable

# Without this, MKL's results depend on the memory alignment of their operands (its "conditional numerical
# reproducibility"), so an image rendered by another process, or after other work, can differ by one 8-bit level.
# MKL reads it at its first call, which no command has made yet; a user's own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# name -> (module with `add_arguments(parser)` and `run(args)`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("fmboost.pipelines.info", "print versions, device and which optional assets are found"),
    "train": ("fmboost.train.cli_train", "train a CFM upsampler from a YAML config (as train/cfm_upsampler.py)"),
    "demo": ("fmboost.train.demo", "train a small upsampler offline on CPU in minutes and compare it with bicubic"),
    "generate": ("fmboost.pipelines.generate", "text → 256² base image → CFM upsampler → high-resolution image"),
    "upscale": ("fmboost.pipelines.upscale", "super-resolve an image with a CFM upsampler (--compare: vs bicubic)"),
    "export": ("fmboost.train.export", "write a training checkpoint (EMA or training weights) as an upsampler folder"),
    "bench": ("fmboost.benchmarks.cli",
              "time boosted vs direct generation (pipeline), samplers, upscaling, training, latent cache"),
    "eval-sr": ("fmboost.eval.cli_eval_sr", "evaluate super-resolution: baselines, regression and CFM samplers"),
    "calibrate-detail": ("fmboost.eval.calibrate_detail",
                         "fit a posterior-mean upsampler's per-band fidelity dial on held-out images"),
    "serve": ("fmboost.pipelines.serve", "web app (Gradio): upscale photos vs bicubic, generate with a base model"),
}


class UserError(Exception):
    """An error the user can fix (bad input, missing weights): printed as one line, exit code 2."""


def build_parser(commands: Iterable[str] = tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The `fmboost` parser; the subcommands in `commands` get their options (importing their modules), the others
    only their name and help."""
    parser = argparse.ArgumentParser(prog="fmboost", description="Boost latent diffusion with coupling flow matching.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name in commands:
            importlib.import_module(module_name).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first argument (the top-level parser has no options but --help): only its module loads.
    args = build_parser(argv[:1]).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args) or 0
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"fmboost {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Re-import under the package name so `python -m` catches the same UserError class the commands raise.
    from fmboost.pipelines.cli import main as package_main

    sys.exit(package_main())
