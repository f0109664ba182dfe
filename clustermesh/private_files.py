"""Private scratch folders for the remotes' credentials (the agent's and the operator's).

Each process writes the TLS keys and passwords of its remotes into a folder of its own. A
process killed with SIGKILL cannot remove it, so the next one removes the folders of processes
that are gone: keys do not pile up in /tmp across crashes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

COMPONENTS = ("agent", "operator")


def private_folder(component: str) -> Path:
    """A new 0700 folder named after ``component`` and this process; the folders of dead
    processes of the same component are removed first."""
    remove_dead_folders(component)
    prefix = f"clustermesh-{component}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=tempfile.gettempdir()))


def remove_dead_folders(component: str) -> None:
    """Remove the folders of ``component`` processes that are gone (say, after a lab is down)."""
    prefix = f"clustermesh-{component}-"
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        pid = _pid_of(stale.name.removeprefix(prefix))
        if pid is not None and not _alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_of(rest: str) -> int | None:
    """The pid in ``<pid>-<random>``; None for a folder named otherwise (not ours to judge)."""
    head, sep, _ = rest.partition("-")
    return int(head) if sep and head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    # A killed process stays a zombie until it is reaped (after a cgroup.kill its parent is gone
    # too, and init reaps when it gets to it); a zombie will never use its folder again.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def write_private(path: Path, data: bytes) -> None:
    """Write key material: a new 0600 file renamed over ``path``, so no reader ever sees it looser."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
