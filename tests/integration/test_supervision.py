"""The lab's supervisor with real processes: restart with backoff, and the hold file that
keeps a killed component down (what the chaos tests and users rely on)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from clustermesh.lab.servers import Process
from clustermesh.lab.supervise import Supervised
from tests.waiting import eventually


def _assert(value: bool, what: str = "") -> None:
    assert value, what


def test_a_held_process_stays_down_until_released(tmp_path: Path) -> None:
    reports: list[str] = []
    proc = Process("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "sleeper.log")
    sup = Supervised(proc, reports.append, hold_dir=tmp_path / "hold")
    sup.start()
    try:
        first = proc.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)

        def restarted() -> None:
            sup.check()
            _assert(proc.running and proc.pid != first, str(reports))

        eventually(restarted, timeout=10, interval=0.1)  # not held: back after the backoff
        assert any("restarted" in r for r in reports)

        (tmp_path / "hold").mkdir()
        (tmp_path / "hold" / "sleeper").touch()
        second = proc.pid
        assert second is not None
        os.kill(second, signal.SIGKILL)

        def held() -> None:
            sup.check()
            _assert(any("held down" in r for r in reports), str(reports))

        eventually(held, timeout=10, interval=0.1)
        sup.check()  # the decision is made once, when the death is seen: no restart is scheduled
        assert not proc.running, "a held process was restarted"

        (tmp_path / "hold" / "sleeper").unlink()
        sup.check()
        assert proc.running and proc.pid not in (first, second), "released: restarted at once"
    finally:
        proc.kill()
