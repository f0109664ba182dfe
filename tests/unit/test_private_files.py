"""Scratch folders for remote credentials: the folders of dead processes go, no others."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from clustermesh.private_files import private_folder, remove_dead_folders


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


def test_the_folder_of_a_killed_process_not_yet_reaped_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lab's teardown kills every process of its cgroup; their parents die too, so they stay
    # zombies until init reaps them, and the sweep that follows must not take them for alive.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    zombie = tmp_path / f"clustermesh-agent-{child.pid}-abc"
    zombie.mkdir()
    try:
        remove_dead_folders("agent")
        assert not zombie.exists()
    finally:
        child.wait()
