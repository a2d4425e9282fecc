"""`python -m engine --help` and each subcommand's --help (CONTRACTS §3)."""
import subprocess
import sys

import pytest

from engine.__main__ import COMMANDS, main


def test_top_level_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "engine", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name.replace("_", "-") in out.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name.replace("_", "-"), "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_bad_arguments_exit_2_without_traceback():
    out = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", "tiny", "--prompt", "hi", "--media", "/nonexistent.png"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "nonexistent.png" in out.stderr
