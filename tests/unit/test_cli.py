from __future__ import annotations

import subprocess
import sys

import pytest

from clustermesh import __version__
from clustermesh.cli import build_parser, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"clustermesh {__version__}"


def test_help_lists_every_component() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "clustermesh.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("operator", "agent", "status", "connect", "disconnect", "lab", "datapath", "version"):
        assert command in out


def test_no_command_prints_help_and_fails() -> None:
    assert main([]) == 2


def test_disconnect_takes_the_same_flags_as_connect() -> None:
    flags = ["--kubeconfig", "k", "--context", "a", "--destination-kubeconfig", "k2", "--destination-context", "b",
             "--clustermesh", "m", "--destination-clustermesh", "n", "--one-way"]
    connect, disconnect = (vars(build_parser().parse_args([cmd, *flags])) for cmd in ("connect", "disconnect"))
    assert connect.pop("func").__name__ == "cmd_connect" and disconnect.pop("func").__name__ == "cmd_disconnect"
    assert {**connect, "command": "x"} == {**disconnect, "command": "x"}
    assert connect["one_way"] is True and connect["destination_context"] == "b"


def test_status_flags() -> None:
    args = build_parser().parse_args(["status"])
    assert (args.output, args.wait, args.timeout) == ("table", False, 60.0)
    args = build_parser().parse_args(["status", "-o", "json", "--wait", "--timeout", "5"])
    assert (args.output, args.wait, args.timeout) == ("json", True, 5.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["status", "--output", "yaml"])
