"""Hop tracing: when a Service's change passed each component, for bench/hop_bench.py.

Off unless ``CLUSTERMESH_TRACE`` names a folder; then each process appends one line per hop to a
file of its own there: ``<wall time> <hop> <namespace>/<name>``. Wall time, because the hops of one
change happen in different processes (operator, cache, agent) on one machine's clock. The hops:

- ``k8s-event``  the operator got an EndpointSlice event of the Service;
- ``etcd-write`` a writer sends a transaction with the Service's state record (sent, not returned: the
  readers' watch events may arrive before the writer hears back);
- ``cache-write`` the same for the Service's cached copy (``cilium/cache/...``);
- ``watch-event`` a reader of a store (an agent's, or the cache's) got the Service's record;
- ``map-write``  the agent's datapath step that merged the Service returned.

Tracing costs one attribute check per call when it is off.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

ENV = "CLUSTERMESH_TRACE"
MAX_LINES_PER_CALL = 1000  # a full resync touches every Service; the bench changes one at a time


class _Tracer:
    def __init__(self) -> None:
        self.folder = os.environ.get(ENV) or None
        self.role = "process"
        self._file: IO[str] | None = None
        self._lock = threading.Lock()

    def _out(self) -> IO[str]:
        if self._file is None:
            assert self.folder is not None
            where = os.environ.get("NODE_NAME") or socket.gethostname()
            path = Path(self.folder) / f"{self.role}-{where}-{os.getpid()}.trace"
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        return self._file

    def write(self, hop: str, refs: Iterable[str]) -> None:
        now = time.time()
        lines = [f"{now:.6f} {hop} {ref}\n" for _, ref in zip(range(MAX_LINES_PER_CALL), refs, strict=False)]
        with self._lock:
            self._out().write("".join(lines))


_tracer = _Tracer()


def enabled() -> bool:
    return _tracer.folder is not None


def set_role(role: str) -> None:
    """Name this process's trace file (``agent``, ``operator``)."""
    _tracer.role = role


def hop(name: str, *refs: str) -> None:
    if _tracer.folder is not None:
        _tracer.write(name, refs)


def hops(name: str, refs: Iterable[str]) -> None:
    if _tracer.folder is not None:
        _tracer.write(name, refs)


def service_ref(key: str) -> str:
    """``<namespace>/<name>`` of a service record's key (the last two path parts)."""
    return "/".join(key.rsplit("/", 2)[-2:])
