"""One spelling per flag: hyphens, `-o/--output` for every result, the older spellings hidden but still accepted for
a release with a warning that names the new one."""

import argparse
import re

import pytest
from fmboost.benchmarks.cli import BENCHMARKS
from fmboost.pipelines.cli import COMMANDS, build_parser
from fmboost.pipelines.cli_options import add_option, add_output_option


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """{command: its parser} for every `fmboost` command and every `fmboost bench` benchmark."""
    import importlib

    commands = build_parser()._subparsers._group_actions[0].choices
    parsers = {name: commands[name] for name in COMMANDS}
    for name, (module_name, _) in BENCHMARKS.items():
        parsers[f"bench {name}"] = parser = argparse.ArgumentParser()
        importlib.import_module(module_name).add_arguments(parser)
    return parsers


def visible_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions if action.help != argparse.SUPPRESS for flag in action.option_strings]


def test_every_flag_is_hyphenated_and_every_output_is_dash_o():
    for name, parser in command_parsers().items():
        flags = visible_flags(parser)
        assert [f for f in flags if "_" in f] == [], name
        assert not {"--out", "--output-dir", "--output_dir"} & set(flags), name
        outputs = [a for a in parser._actions if "--output" in a.option_strings]
        assert all(a.option_strings == ["-o", "--output"] for a in outputs), name
    for name in ("eval-sr", "calibrate-detail", "export", "demo", "train", "generate", "upscale"):
        assert "-o" in visible_flags(command_parsers()[name]), name


@pytest.mark.parametrize("argv, dest, value, new", [
    (["eval-sr", "--data", "images", "--out", "results"], "output", "results", "-o/--output"),
    (["calibrate-detail", "up", "--data", "images", "--out", "cal"], "output", "cal", "-o/--output"),
    (["export", "run/checkpoint-2", "--out", "up"], "output", "up", "-o/--output"),
    (["demo", "--output_dir", "runs/x", "--max_train_steps", "5"], "max_train_steps", 5, "--max-train-steps"),
    (["train", "--output_dir", "runs/x"], "override_output_dir", "runs/x", "-o/--output"),
    (["train", "--learning_rate", "1e-3"], "override_learning_rate", "1e-3", "--learning-rate"),
])
def test_old_spellings_still_work_and_name_the_new_one(argv, dest, value, new, capsys):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert f"is deprecated and goes in the next release: use {new}" in err
    assert argv[-2] in err  # the old spelling that was used


def test_new_spellings_parse_silently(capsys):
    args = build_parser().parse_args(["train", "-o", "runs/x", "--learning-rate", "1e-3"])
    assert (args.override_output_dir, args.override_learning_rate) == ("runs/x", "1e-3")
    args = build_parser().parse_args(["demo", "-o", "runs/x", "--max-train-steps", "5"])
    assert (args.output_dir, args.max_train_steps, args.eval_crop_size) == ("runs/x", 5, 128)
    assert capsys.readouterr().err == ""


def test_an_old_spelling_meets_required_and_clashes_with_the_new_one(capsys):
    parser = argparse.ArgumentParser(prog="x")
    add_output_option(parser, "where", old=("--out",), required=True)
    add_option(parser, "--cache-dir", old=("--cache_dir",), type=int)
    assert parser.parse_args(["--out", "a", "--cache_dir", "3"]) == argparse.Namespace(output="a", cache_dir=3)
    for argv in ([], ["--out", "a", "-o", "b"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    err = capsys.readouterr().err
    assert "one of the arguments -o/--output is required" in err and "not allowed with argument" in err
    assert not re.search(r"--out\b|--cache_dir", parser.format_help())  # hidden
