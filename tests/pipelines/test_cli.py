import subprocess
import sys

from fmboost.pipelines.cli import main


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
