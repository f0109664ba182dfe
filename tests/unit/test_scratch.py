"""Scratch folders for remote credentials: the folders of dead processes go, no others."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from clustermesh.scratch import private_folder


def test_a_new_folder_removes_only_the_folders_of_dead_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    dead = tmp_path / f"clustermesh-agent-{dead_pid}-abc"
    live = tmp_path / f"clustermesh-agent-{os.getppid()}-def"  # pytest's parent: alive
    odd = tmp_path / "clustermesh-agent-manual"
    other = tmp_path / f"clustermesh-operator-{dead_pid}-ghi"  # another component's: not this one's to sweep
    for folder in (dead, live, odd, other):
        folder.mkdir()
        (folder / "tls.key").write_text("secret")

    made = private_folder("agent")

    assert not dead.exists()
    assert live.exists() and odd.exists() and other.exists()
    assert made.parent == tmp_path and made.name.startswith(f"clustermesh-agent-{os.getpid()}-")
    assert made.stat().st_mode & 0o777 == 0o700
