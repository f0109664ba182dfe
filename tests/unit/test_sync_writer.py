"""The store writer's scheduling, with an in-memory stand-in for etcd (no I/O):
changes during a write, oversized records, stale keys of an earlier run."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

from clustermesh.kvstore import KeyValue, Listing
from clustermesh.store.sync import MAX_RECORD_BYTES, SyncStore, WriterSettings


class MemoryKV:
    """What SyncStore calls on a KVClient, over a dict; ``gate`` can hold a write in flight."""

    endpoint = "memory://"

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.writes: list[dict[str, str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.in_flight = threading.Event()

    def apply(self, puts: dict[str, str], deletes: list[str], lease: int | None = None) -> None:
        self.in_flight.set()
        self.gate.wait(10)
        self.data.update(puts)
        for key in deletes:
            self.data.pop(key, None)
        self.writes.append(dict(puts))
        self.in_flight.clear()

    def list_prefix(self, prefix: str) -> Listing:
        return Listing({k: KeyValue(k, v, 1, 0) for k, v in self.data.items() if k.startswith(prefix)}, 1)

    def grant_lease(self, ttl: int) -> int:
        return 1

    def keepalive(self, lease_id: int) -> int:
        return 10

    def revoke_lease(self, lease_id: int) -> None:
        pass


SETTINGS = WriterSettings(lease_ttl=30, min_interval=0.05, heartbeat_interval=3600)


@contextlib.asynccontextmanager
async def running(kv: MemoryKV, preset: dict[str, str] | None = None) -> AsyncIterator[SyncStore]:
    writer = SyncStore(kv, "c1", SETTINGS)  # type: ignore[arg-type]
    for key, value in (preset or {}).items():
        writer.set(key, value)
    task = asyncio.create_task(writer.run())
    try:
        yield writer
    finally:
        task.cancel()
        await writer.close()


async def _until(check: Any, timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_change_during_a_write_is_written_promptly() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        async with running(kv) as writer:
            await writer.flushed(2)
            kv.gate.clear()
            writer.set("cilium/state/services/v1/c1/ns/a", "v1")
            await asyncio.to_thread(kv.in_flight.wait, 2)
            writer.set("cilium/state/services/v1/c1/ns/a", "v2")  # while v1 is being written
            writer.set("cilium/state/services/v1/c1/ns/b", "x")
            kv.gate.set()
            await _until(lambda: kv.data.get("cilium/state/services/v1/c1/ns/a") == "v2"
                         and "cilium/state/services/v1/c1/ns/b" in kv.data)
            await writer.flushed(1)

    asyncio.run(scenario())


def test_bursts_are_coalesced_and_unchanged_values_skipped() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        async with running(kv) as writer:
            await writer.flushed(2)
            before = len(kv.writes)
            for i in range(200):
                writer.set("k", f"v{i}")
                await asyncio.sleep(0.001)
            await _until(lambda: kv.data.get("k") == "v199")
            assert len(kv.writes) - before < 20
            writer.set("k", "v199")  # the same value again: nothing to write
            await asyncio.sleep(0.2)
            assert kv.data["k"] == "v199" and not writer.dirty

    asyncio.run(scenario())


def test_oversized_record_is_skipped_and_the_rest_written() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        async with running(kv) as writer:
            writer.set("big", "x" * (MAX_RECORD_BYTES + 1))
            writer.set("small", "y")
            await writer.flushed(2)
            assert kv.data.get("small") == "y" and "big" not in kv.data
            assert "big" in writer.oversized

    asyncio.run(scenario())


def test_initial_sync_removes_what_an_earlier_run_left() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        kv.data = {"cilium/state/services/v1/c1/ns/old": "{}", "cilium/state/services/v1/c1/ns/kept": "{}",
                   "cilium/state/services/v1/c2/ns/other": "{}"}
        async with running(kv, {"cilium/state/services/v1/c1/ns/kept": '{"new":1}'}) as writer:
            stale = await writer.initial_sync(["cilium/state/services/v1/c1/"], ["cilium/state/services/v1"])
            assert stale == 1
            assert set(kv.data) == {"cilium/state/services/v1/c1/ns/kept", "cilium/state/services/v1/c2/ns/other",
                                    "cilium/synced/c1/cilium/state/services/v1", "cilium/.heartbeat"}
            assert writer.synced

    asyncio.run(scenario())
