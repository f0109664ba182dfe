"""The writer (store/sync.py) against a real etcd: what tests/unit/test_sync_writer.py checks on its
in-memory store, here with etcd's own leases and a store really wiped."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from clustermesh.kvstore import KVClient
from clustermesh.store.sync import SyncStore, WriterSettings

SVC = "cilium/state/services/v1/c1/ns/"
FAST = WriterSettings(lease_ttl=5, min_interval=0.05, heartbeat_interval=3600)
WAIT = 20.0


@asynccontextmanager
async def running(client: KVClient, records: dict[str, str], settings: WriterSettings = FAST
                  ) -> AsyncIterator[SyncStore]:
    writer = SyncStore(client, "c1", settings)
    for key, value in records.items():
        writer.set(key, value)
    task = asyncio.create_task(writer.run())
    try:
        await writer.flushed(WAIT)
        yield writer
    finally:
        task.cancel()
        await writer.close()


async def until(check, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "not within the timeout"
        await asyncio.sleep(0.05)


def lease_of(kv: KVClient, key: str) -> int:
    return kv.list_prefix(key).items[key].lease


def test_a_revoked_lease_gets_a_new_one_and_every_record_is_written_again(kv: KVClient, etcd_server) -> None:
    """Another hand (an operator with root, a lease expired while we were away) ends our lease: its
    keys go with it, and the writer grants a new one and writes them all again."""
    async def scenario() -> None:
        with KVClient(etcd_server.url) as client:
            async with running(client, {SVC + "a": "1", SVC + "b": "2"}):
                first = lease_of(kv, SVC + "a")
                assert first and lease_of(kv, SVC + "b") == first
                kv.revoke_lease(first)
                assert kv.get(SVC + "a") is None
                await until(lambda: kv.get(SVC + "a") == "1" and kv.get(SVC + "b") == "2")
                again = lease_of(kv, SVC + "a")
                assert again not in (0, first) and kv.lease_ttl(again) > 0

    asyncio.run(scenario())


def test_a_wiped_store_is_noticed_and_everything_written_again(kv: KVClient, etcd_server) -> None:
    """The store's etcd is wiped and restarted on the same address (a replaced store pod): the writer's
    lease is unknown there, and the next write (or keep-alive) finds out; every record comes back."""
    async def scenario() -> None:
        with KVClient(etcd_server.url, timeout=3) as client:
            async with running(client, {SVC + "a": "1"}) as writer:
                etcd_server.stop()
                shutil.rmtree(etcd_server.directory / "data")
                etcd_server.start()
                with KVClient(etcd_server.url) as fresh:
                    assert fresh.get(SVC + "a") is None
                    writer.set(SVC + "b", "2")
                    await until(lambda: fresh.get(SVC + "a") == "1" and fresh.get(SVC + "b") == "2")
                    assert fresh.lease_ttl(lease_of(fresh, SVC + "a")) > 0

    asyncio.run(scenario())


def test_a_graceful_stop_leaves_the_records_to_the_lease(kv: KVClient, etcd_server) -> None:
    """What a rolling update does to the operator (SIGTERM: ``close()`` without revoke): the records
    stay while a new writer starts, and go only when nobody keeps the lease alive past its TTL."""
    async def scenario() -> None:
        with KVClient(etcd_server.url) as client:
            async with running(client, {SVC + "a": "1"}):
                lease = lease_of(kv, SVC + "a")
            assert kv.get(SVC + "a") == "1", "a restart must not blink records away"
            assert 0 < kv.lease_ttl(lease) <= FAST.lease_ttl, "the lease runs out by itself"
            await until(lambda: kv.get(SVC + "a") is None, timeout=FAST.lease_ttl + 5)

    asyncio.run(scenario())
