"""Supervision of the lab's processes (``--processes``): each restarted with backoff when it dies,
unless a hold file keeps it down."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from clustermesh.lab.servers import Process


class Supervised:
    """A lab process that is restarted with backoff when it dies (1, 2, 4 .. 30 s).

    While a file named like the process exists in ``hold_dir``, a dead process stays dead:
    chaos tests (and users) keep a component down for as long as they like with
    ``touch <lab>/hold/<name>; kill -9 <pid>``, and remove the file to get it back."""

    def __init__(self, process: Process, report: Callable[[str], None], hold_dir: Path | None = None) -> None:
        self.process = process
        self.report = report
        self.hold_dir = hold_dir
        self.restarts = 0
        self._restart_at: float | None = None
        self._started_at = 0.0
        self._held = False

    @property
    def name(self) -> str:
        return self.process.name

    def start(self) -> None:
        self.process.start()
        self._started_at = time.monotonic()

    def check(self) -> None:
        """Called about once a second by the lab's main loop."""
        if self.process.running:
            if time.monotonic() - self._started_at > 60:
                self.restarts = 0  # ran a minute: the next failure starts the backoff afresh
            return
        if self.hold_dir is not None and (self.hold_dir / self.name).exists():
            if not self._held:
                self._held = True
                self.report(f"{self.name} exited with {self.process.returncode}; held down while "
                            f"{self.hold_dir / self.name} exists")
            return
        if self._held:
            self._held = False
            self.restarts = 0
            self._restart_at = time.monotonic()  # released: back at once
        now = time.monotonic()
        if self._restart_at is None:
            delay = min(30.0, 2.0 ** self.restarts) if self.restarts else 0.5
            self._restart_at = now + delay
            self.report(f"{self.name} exited with {self.process.returncode}; restarting in {delay:.1f}s "
                        f"(log: {self.process.log_path})")
        elif now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self.start()
            self.report(f"{self.name} restarted (pid {self.process.pid})")
