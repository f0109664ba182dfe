"""The status manager of the lab's kubelet: one task writes every pod's status. Pod workers and
containers say that a pod changed (``changed``); the manager writes the changed pods together, and every
``resync`` seconds also each pod whose status on the API server differs from ours (the node controller
marked it not ready while our Lease was late, say)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clustermesh.lab.node.pod_worker import PodWorker

log = logging.getLogger("clustermesh.lab.node")


class StatusManager:
    RETRY = 1.0
    """Seconds before a status the API server refused is written again."""

    def __init__(self, resync: float = 10.0) -> None:
        self.resync = resync
        self._pods: dict[str, PodWorker] = {}
        self._changed: set[str] = set()
        self._wake = asyncio.Event()

    def track(self, worker: PodWorker) -> None:
        self._pods[worker.uid] = worker
        self.changed(worker)

    def changed(self, worker: PodWorker) -> None:
        self._changed.add(worker.uid)
        self._wake.set()

    async def run(self) -> None:
        next_resync = time.monotonic() + self.resync
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_resync - time.monotonic()))
            self._wake.clear()
            changed, self._changed = self._changed, set()
            full = time.monotonic() >= next_resync
            if full:
                next_resync = time.monotonic() + self.resync
            due = []
            for uid, w in list(self._pods.items()):
                if w.gone or (w.task is not None and w.task.done()):
                    del self._pods[uid]  # deleted: terminate() wrote its last status
                elif uid in changed or (full and w.needs_status()):
                    due.append(w)
            if due:
                await asyncio.gather(*(self._write(w) for w in due))

    async def _write(self, worker: PodWorker) -> None:
        if not await worker.push_status():
            asyncio.get_running_loop().call_later(self.RETRY, self.changed, worker)
