import json
import subprocess
import sys

from fmboost.pipelines.cli import COMMANDS, main


def test_info_prints_versions_device_and_assets(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("torch", "diffusers", "device", "TAEF2 autoencoder", "LPIPS"):
        assert needle in out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "fmboost.pipelines.cli", "info"], capture_output=True, text=True)
    assert result.returncode == 0 and "device" in result.stdout


def test_unknown_command_is_a_usage_error(capsys):
    try:
        main(["frobnicate"])
    except SystemExit as exit_:
        assert exit_.code == 2
    assert "invalid choice" in capsys.readouterr().err


#: What `fmboost info` and `fmboost --help` must not import: diffusers' pipelines, the web app and every command
#: module but info's own (each is imported only when its command runs).
HEAVY = ("diffusers.pipelines", "gradio", "fmboost.eval", "fmboost.benchmarks", "fmboost.train",
         "fmboost.pipelines.boost", "fmboost.pipelines.generate", "fmboost.pipelines.upscale",
         "fmboost.pipelines.serve")
IMPORTED = """
import contextlib, io, json, sys
from fmboost.pipelines.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    main(["info"])
    try:
        main(["--help"])
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)))
"""


def test_info_and_help_import_no_other_command():
    result = subprocess.run([sys.executable, "-c", IMPORTED], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout)
    assert "fmboost.pipelines.info" in imported
    assert [m for m in imported if m.startswith(HEAVY)] == []


def test_help_lists_every_command_without_importing_it(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    for name, (_, help_text) in COMMANDS.items():
        assert name in out and help_text.split()[0] in out
