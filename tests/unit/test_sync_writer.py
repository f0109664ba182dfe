"""The store writer's scheduling, with an in-memory stand-in for etcd (no I/O):
changes during a write, oversized records, stale keys of an earlier run, and
leases (kept alive, lost, taken over by the next writer)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from clustermesh.kvstore import KeyValue, LeaseNotFound, Listing
from clustermesh.store.sync import MAX_RECORD_BYTES, SyncStore, WriterSettings


class MemoryKV:
    """What SyncStore calls on a KVClient, over a dict, with etcd's lease rules on a clock the
    test moves (``advance``): a lease not kept alive for its TTL takes its keys with it, a
    write naming a missing lease fails. ``gate`` can hold a write in flight."""

    endpoint = "memory://"

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.key_lease: dict[str, int] = {}
        self.leases: dict[int, float] = {}  # id -> expiry on self.now
        self.ttls: dict[int, int] = {}
        self.keepalives = 0
        self.now = 0.0
        self.writes: list[dict[str, str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.in_flight = threading.Event()
        self.lock = threading.RLock()
        self._next_lease = 100

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds
            self._expire()

    def _expire(self) -> None:
        for lease in [lid for lid, expiry in self.leases.items() if expiry <= self.now]:
            self._drop_lease(lease)

    def _drop_lease(self, lease: int) -> None:
        self.leases.pop(lease, None)
        for key in [k for k, lid in self.key_lease.items() if lid == lease]:
            del self.key_lease[key]
            self.data.pop(key, None)

    def apply(self, puts: dict[str, str], deletes: list[str], lease: int | None = None) -> None:
        self.in_flight.set()
        self.gate.wait(10)
        try:
            with self.lock:
                self._expire()
                if lease is not None and lease not in self.leases:
                    raise LeaseNotFound(f"txn: lease {lease} not found")
                self.data.update(puts)
                self.key_lease.update(dict.fromkeys(puts, lease or 0))
                for key in deletes:
                    self.data.pop(key, None)
                    self.key_lease.pop(key, None)
                self.writes.append(dict(puts))
        finally:
            self.in_flight.clear()

    def list_prefix(self, prefix: str) -> Listing:
        with self.lock:
            self._expire()
            return Listing({k: KeyValue(k, v, 1, self.key_lease.get(k, 0))
                            for k, v in self.data.items() if k.startswith(prefix)}, 1)

    def grant_lease(self, ttl: int) -> int:
        with self.lock:
            self._next_lease += 1
            self.leases[self._next_lease] = self.now + ttl
            self.ttls[self._next_lease] = ttl
            return self._next_lease

    def keepalive(self, lease_id: int) -> int:
        with self.lock:
            self._expire()
            if lease_id not in self.leases:
                return 0
            self.leases[lease_id] = self.now + self.ttls[lease_id]
            self.keepalives += 1
            return self.ttls[lease_id]

    def revoke_lease(self, lease_id: int) -> None:
        with self.lock:
            self._drop_lease(lease_id)

    def wipe(self) -> None:
        """The store was replaced by an empty one: no keys, no leases."""
        with self.lock:
            self.data.clear()
            self.key_lease.clear()
            self.leases.clear()


SETTINGS = WriterSettings(lease_ttl=30, min_interval=0.05, heartbeat_interval=3600)
# Deadlines of waits for a condition: generous, so a loaded machine is slow, not failing.
WAIT = 20.0


@contextlib.asynccontextmanager
async def running(
    kv: MemoryKV, preset: dict[str, str] | None = None, settings: WriterSettings = SETTINGS
) -> AsyncIterator[SyncStore]:
    writer = SyncStore(kv, "c1", settings)  # type: ignore[arg-type]
    for key, value in (preset or {}).items():
        writer.set(key, value)
    task = asyncio.create_task(writer.run())
    try:
        yield writer
    finally:
        task.cancel()
        await writer.close()


async def _until(check: Any, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_change_during_a_write_is_written_promptly() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        async with running(kv) as writer:
            await writer.flushed(WAIT)
            kv.gate.clear()
            writer.set("cilium/state/services/v1/c1/ns/a", "v1")
            await asyncio.to_thread(kv.in_flight.wait, 2)
            writer.set("cilium/state/services/v1/c1/ns/a", "v2")  # while v1 is being written
            writer.set("cilium/state/services/v1/c1/ns/b", "x")
            kv.gate.set()
            await _until(lambda: kv.data.get("cilium/state/services/v1/c1/ns/a") == "v2"
                         and "cilium/state/services/v1/c1/ns/b" in kv.data)
            await writer.flushed(WAIT)

    asyncio.run(scenario())


def test_bursts_are_coalesced_and_unchanged_values_skipped() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        async with running(kv) as writer:
            await writer.flushed(WAIT)
            before = len(kv.writes)
            started = time.monotonic()
            for i in range(200):
                writer.set("k", f"v{i}")
                await asyncio.sleep(0.001)
            await _until(lambda: kv.data.get("k") == "v199")
            # At most two writes per min_interval while the burst lasts (however slow the machine
            # makes it), plus the last value: far fewer than the 200 changes.
            windows = (time.monotonic() - started) / SETTINGS.min_interval + 1
            written = len(kv.writes) - before
            assert written <= 2 * windows + 1 and written < 200, (written, windows)
            after = len(kv.writes)
            writer.set("k", "v199")  # the same value again: nothing to write
            await asyncio.sleep(SETTINGS.min_interval * 3)
            assert kv.data["k"] == "v199" and not writer.dirty
            assert [w for w in kv.writes[after:] if "k" in w] == []

    asyncio.run(scenario())


def test_oversized_record_is_skipped_and_the_rest_written() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        async with running(kv) as writer:
            writer.set("big", "x" * (MAX_RECORD_BYTES + 1))
            writer.set("small", "y")
            await writer.flushed(WAIT)
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


SVC = "cilium/state/services/v1/c1/ns/"
# A short TTL: the keeper refreshes every 0.5 s of real time; expiry is on the test's clock.
SHORT = WriterSettings(lease_ttl=1, min_interval=0.05, heartbeat_interval=3600)


def test_the_default_lease_outlives_an_operator_pause_as_cilium_s() -> None:
    from clustermesh.cli import build_parser

    assert WriterSettings().lease_ttl == 15 * 60
    assert build_parser().parse_args(["operator"]).lease_ttl == 15 * 60, "what `clustermesh operator` runs with"


def test_keep_alive_keeps_the_records_past_the_ttl() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        async with running(kv, {SVC + "a": "1"}, SHORT) as writer:
            await writer.flushed(WAIT)
            for _ in range(3):  # three TTLs in all, each refreshed in time
                seen = kv.keepalives
                kv.advance(0.6)
                await _until(lambda: kv.keepalives > seen, timeout=3)  # noqa: B023
            assert kv.data.get(SVC + "a") == "1"
            assert len([w for w in kv.writes if SVC + "a" in w]) == 1, "kept alive, not rewritten"

    asyncio.run(scenario())


def test_a_lost_lease_gets_a_new_one_and_every_record_is_written_again() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        async with running(kv, {SVC + "a": "1", SVC + "b": "2"}, SHORT) as writer:
            await writer.flushed(WAIT)
            first = kv.key_lease[SVC + "a"]
            kv.advance(5)  # we were away longer than the TTL: etcd dropped lease and keys
            assert SVC + "a" not in kv.data
            await _until(lambda: kv.data.get(SVC + "a") == "1" and kv.data.get(SVC + "b") == "2", timeout=5)
            assert kv.key_lease[SVC + "a"] != first and kv.key_lease[SVC + "a"] in kv.leases

    asyncio.run(scenario())


def test_a_wiped_store_is_noticed_by_the_next_write_and_everything_rewritten() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        # The default TTL: the keeper would not notice for a long while; the write does.
        async with running(kv, {SVC + "a": "1"}) as writer:
            await writer.flushed(WAIT)
            kv.wipe()
            writer.set(SVC + "b", "2")
            await _until(lambda: kv.data.get(SVC + "a") == "1" and kv.data.get(SVC + "b") == "2", timeout=5)
            assert set(kv.key_lease.values()) <= set(kv.leases)

    asyncio.run(scenario())


def test_a_graceful_stop_leaves_the_records_to_the_lease() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        async with running(kv, {SVC + "a": "1"}, SHORT) as writer:
            await writer.flushed(WAIT)
        assert kv.data.get(SVC + "a") == "1", "a restart must not blink records away"
        kv.advance(2)  # nobody keeps the lease alive any more
        assert SVC + "a" not in kv.data

    asyncio.run(scenario())


def test_a_new_writer_takes_the_records_over_and_the_old_lease_takes_nothing() -> None:
    async def scenario() -> None:
        kv = MemoryKV()
        async with running(kv, {SVC + "a": "1", SVC + "gone": "x"}) as old:
            await old.initial_sync([SVC], [])
        old_lease = kv.key_lease[SVC + "a"]
        # A restarted operator (or the next leader): "gone" was deleted meanwhile.
        async with running(kv, {SVC + "a": "1", SVC + "b": "2"}) as new:
            stale = await new.initial_sync([SVC], [])
            assert stale == 1 and set(kv.data) >= {SVC + "a", SVC + "b"} and SVC + "gone" not in kv.data
            assert old_lease in kv.leases, "deleted by the first full pass, not by an expiring lease"
            assert all(lid != old_lease for lid in kv.key_lease.values())
            kv.revoke_lease(old_lease)  # the old operator's lease ends (expiry, or its revoke)
            assert kv.data.get(SVC + "a") == "1" and kv.data.get(SVC + "b") == "2"

    asyncio.run(scenario())


def test_verify_takes_back_records_another_writer_put_on_its_own_lease() -> None:
    """A replica took over while this writer was paused, rewrote everything under its lease,
    then yielded and exited: without verify, its lease would take our records with it."""
    async def scenario() -> None:
        kv = MemoryKV()
        async with running(kv, {SVC + "a": "1", SVC + "b": "2", "cilium/cluster-config/c1": "{}"}) as writer:
            await writer.initial_sync([SVC], [])
            assert await writer.verify([SVC]) == 0, "nothing to fix when the store is as we left it"
            mine = kv.key_lease[SVC + "a"]
            other = kv.grant_lease(900)
            kv.apply({SVC + "a": "1", SVC + "extra": "x", "cilium/cluster-config/c1": "{}"}, [], other)
            assert await writer.verify([SVC]) == 3
            await writer.flushed(WAIT)
            assert kv.key_lease[SVC + "a"] == mine and kv.key_lease["cilium/cluster-config/c1"] == mine
            assert SVC + "extra" not in kv.data
            kv.revoke_lease(other)  # the other replica's lease ends
            assert kv.data.get(SVC + "a") == "1" and kv.data.get("cilium/cluster-config/c1") == "{}"

    asyncio.run(scenario())


def test_verify_survives_records_changing_while_it_lists() -> None:
    """verify() lists the keys outside its prefixes one by one, off the event loop: the cache and the
    exporter keep changing what is desired meanwhile (found by bench/hop_bench.py, where the resync
    task died with "dictionary changed size during iteration" and took the operator down)."""
    async def scenario() -> None:
        kv = MemoryKV()
        outside = {f"cilium/synced/r{i}/cilium/cache/services/v1": "x" for i in range(20)}
        async with running(kv, {SVC + "a": "1", **outside}) as writer:
            await writer.initial_sync([SVC], [])
            await writer.flushed(WAIT)
            listing = kv.list_prefix

            def list_and_change(prefix: str) -> Listing:
                # Another task of the loop changes the desired state while this listing runs.
                loop.call_soon_threadsafe(writer.set, f"cilium/cluster-config/r-{prefix.count('/')}-{len(prefix)}",
                                          "{}")
                return listing(prefix)

            loop = asyncio.get_running_loop()
            kv.list_prefix = list_and_change  # type: ignore[method-assign]
            assert await writer.verify([SVC]) >= 0
            kv.list_prefix = listing  # type: ignore[method-assign]
            await writer.flushed(WAIT)
            assert await writer.verify([SVC]) == 0, "what changed meanwhile was written; the store is as desired"

    asyncio.run(scenario())


def test_a_flap_goes_out_at_once_and_only_a_third_change_waits() -> None:
    """An add then its remove (a Service whose only backend came and went) are two writes without the
    coalescing delay; the third change of the same key inside min_interval waits for it."""
    async def scenario() -> None:
        kv = MemoryKV()
        slow = WriterSettings(lease_ttl=30, min_interval=1.0, heartbeat_interval=3600)
        async with running(kv, settings=slow) as writer:
            await writer.flushed(WAIT)
            loop = asyncio.get_running_loop()
            start = loop.time()
            writer.set("k", "add")
            await _until(lambda: kv.data.get("k") == "add")
            writer.set("k", None)
            await _until(lambda: "k" not in kv.data)
            assert loop.time() - start < 0.5, "the remove waited for the coalescing interval"
            writer.set("k", "again")
            await asyncio.sleep(0.3)
            assert "k" not in kv.data, "a third change inside the interval is coalesced"
            await _until(lambda: kv.data.get("k") == "again", timeout=2)

    asyncio.run(scenario())
