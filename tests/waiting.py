"""Waiting for a condition in tests (never a fixed sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.1) -> T:
    """Poll ``check`` until it returns without AssertionError; re-raise the last one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


def freeze(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP ``pid`` and return once every thread of it is stopped: kill() returns before a
    thread running on another core has stopped, and a request it handles meanwhile is answered."""
    import os
    import signal
    from pathlib import Path

    os.kill(pid, signal.SIGSTOP)

    def stopped() -> None:
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue  # a thread that just ended
            assert state in ("T", "t"), f"thread {stat.parent.name} of {pid} is {state}"

    eventually(stopped, timeout=timeout, interval=0.01)
