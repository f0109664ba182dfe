from __future__ import annotations

import subprocess
import sys

import pytest

from clustermesh import __version__
from clustermesh.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"clustermesh {__version__}"


def test_help_lists_every_component() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "clustermesh.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("operator", "agent", "status", "connect", "lab", "datapath", "version"):
        assert command in out


def test_no_command_prints_help_and_fails() -> None:
    assert main([]) == 2
