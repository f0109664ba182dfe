"""The writer side of a cluster's state store (the shape of Cilium's syncstore).

Callers say what *should* be in the store (``set(key, value)``); one asyncio
task makes it so:

- coalescing: a key is written at most twice per ``min_interval``; a burst of
  changes to one Service becomes a few writes of its latest value, while a single
  change, or a change and its undo (a flap: an add, then a remove), go out at once;
- skip-unchanged: a value equal to the last one written is not sent again;
- one lease for every key (15 minutes, as Cilium's), kept alive from a thread;
  when it is lost (etcd was away longer than the TTL, or was wiped: a write
  then says "lease not found"), a new lease is granted and every key is
  written again. A new writer (restart, leader change) writes every key under
  its own lease; the old lease, holding nothing any more, expires by itself;
- retries with exponential backoff (tenacity) while the desired state keeps
  moving, so the store converges to the latest state once etcd is back;
- after the first full pass, keys under the managed prefixes that are not
  desired are deleted, then the "synced" markers are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from clustermesh import metrics, schema, trace
from clustermesh.kvstore import KeyValue, KVClient, KVStoreError, LeaseKeeper, LeaseNotFound

log = logging.getLogger(__name__)

# etcd refuses requests over 1.5 MiB by default; keep a record well under it.
MAX_RECORD_BYTES = 1024 * 1024


@dataclass
class WriterSettings:
    lease_ttl: int = 900
    """Seconds. Records of a dead writer disappear this long after its last keep-alive.
    Cilium's kvstore lease is 15 minutes too: long enough that an operator paused, restarting
    or handing over to another replica never takes its cluster's records with it. A new
    writer rewrites every record under its own lease and its first full pass deletes what
    the previous one left, so a long lease does not keep stale records around."""
    min_interval: float = 0.25
    """Seconds between two writes of the same key; changes in between are coalesced."""
    heartbeat_interval: float = 60.0
    """Seconds between refreshes of ``cilium/.heartbeat``."""
    backoff_initial: float = 0.2
    backoff_max: float = 5.0


def _kind(key: str) -> str:
    if key.startswith(schema.SERVICES_PREFIX):
        return "service"
    if key.startswith(schema.NODES_PREFIX):
        return "node"
    return "meta"


class SyncStore:
    def __init__(self, client: KVClient, cluster: str, settings: WriterSettings | None = None) -> None:
        self.client = client
        self.cluster = cluster
        self.settings = settings or WriterSettings()
        self.desired: dict[str, str] = {}
        self.written: dict[str, str] = {}
        self.dirty: set[str] = set()
        self.last_write: dict[str, float] = {}
        self.prev_write: dict[str, float] = {}  # the write before last: two per min_interval
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self.last_sync: dt.datetime | None = None
        self.synced = False
        self.oversized: dict[str, int] = {}
        self.desired_frozen = False
        self._lease: LeaseKeeper | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_heartbeat = 0.0
        self._closing = False

    # ------------------------------------------------------------ desired state

    def set(self, key: str, value: str | None) -> None:
        """Desired value of ``key``; None means the key must not exist."""
        if self.desired_frozen:
            return
        if value is None:
            if self.desired.pop(key, None) is None and key not in self.written:
                return
        elif self.desired.get(key) == value:
            return
        else:
            self.desired[key] = value
        self._mark(key)

    def replace_prefix(self, prefix: str, values: Mapping[str, str]) -> None:
        """Make ``values`` the whole desired content under ``prefix``."""
        for key in [k for k in self.desired if k.startswith(prefix) and k not in values]:
            self.set(key, None)
        for key, value in values.items():
            self.set(key, value)

    def count(self, prefix: str) -> int:
        return sum(1 for k in self.desired if k.startswith(prefix))

    def _mark(self, key: str) -> None:
        self.dirty.add(key)
        self._idle.clear()
        metrics.QUEUE_DEPTH.set(len(self.dirty))
        self._wake.set()

    async def flushed(self, timeout: float | None = None) -> None:
        """Wait until every desired value is in the store."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    # ------------------------------------------------------------ first full pass

    async def initial_sync(self, prefixes: Iterable[str], synced_prefixes: Iterable[str]) -> int:
        """After the caller has set the complete desired state: write it, delete the
        rest under ``prefixes``, then write the synced markers. Returns the number of
        stale keys deleted. Retries while etcd is away."""
        stale = await self.sync_prefixes(prefixes)
        now = schema.rfc3339_now()
        for prefix in synced_prefixes:
            self.set(schema.synced_key(self.cluster, prefix), now)
        await self.flushed()
        self.synced = True
        return stale

    async def sync_prefixes(self, prefixes: Iterable[str]) -> int:
        """Once the desired state under ``prefixes`` is complete: write it, then delete every key
        there that is not desired (left by an earlier run). Returns how many were deleted."""
        await self.flushed()
        stale: list[str] = []
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(KVStoreError),
            wait=wait_exponential_jitter(multiplier=self.settings.backoff_initial, max=self.settings.backoff_max),
            before_sleep=self._on_retry,
        ):
            with attempt:
                stale = []
                for prefix in prefixes:
                    listing = await self._etcd("list", self.client.list_prefix, prefix)
                    stale += [k for k in listing.items if k not in self.desired]
        if stale:
            log.info("removing %d stale records left by an earlier run: %s", len(stale), ", ".join(stale[:5]))
        self.delete_found(stale)
        await self.flushed()
        return len(stale)

    def delete_found(self, keys: Iterable[str]) -> None:
        """Delete keys found in the store that this writer never wrote (an earlier run's). Through
        the writer, so a key that becomes desired meanwhile is written, not lost."""
        for key in keys:
            if key not in self.desired:
                self.written[key] = ""
                self._mark(key)

    async def verify(self, prefixes: Iterable[str]) -> int:
        """Compare the store with what we wrote, and make it so again: a record missing,
        changed, or on another lease than ours is written again; one under ``prefixes``
        that we do not want is deleted. Returns how many keys were wrong.

        Two writers can meet: a replica that took over while this one was paused writes
        every record under its own lease, then sees us again, yields and exits. Its lease,
        no longer kept alive, would take those records with it 15 minutes later, while our
        cache says they are written. The periodic resync calls this to catch that."""
        if self._lease is None or not self.synced:
            return 0  # the first full pass does this anyway
        lease = self._lease.lease_id
        prefixes = tuple(prefixes)
        seen: dict[str, KeyValue] = {}
        for prefix in prefixes:
            seen.update((await self._etcd("list", self.client.list_prefix, prefix)).items)
        # A snapshot: the listings below run off the event loop, where the exporter and the cache go
        # on changing what is desired; a key added meanwhile is judged (and written) like any other.
        for key in [k for k in self.desired if not k.startswith(prefixes) and k != schema.HEARTBEAT_KEY]:
            if key in self.desired:
                listing = await self._etcd("list", self.client.list_prefix, key)
                if key in listing.items:
                    seen[key] = listing.items[key]
        wrong = [k for k, v in self.desired.items()
                 if k != schema.HEARTBEAT_KEY and (k not in seen or seen[k].value != v or seen[k].lease != lease)]
        wrong += [k for k in seen if k not in self.desired]
        for key in wrong:
            if key in self.desired:
                self.written.pop(key, None)
            else:
                self.written[key] = ""
            self._mark(key)
        if wrong:
            log.warning("%d records in the store were not as this writer left them (another writer, or "
                        "a lost lease); writing them again: %s", len(wrong), ", ".join(sorted(wrong)[:5]))
            metrics.ERRORS.labels("operator", "store-drift").inc()
        return len(wrong)

    # ------------------------------------------------------------ the worker

    async def run(self) -> None:
        """Write forever; cancel the task to stop (the lease is kept: see close())."""
        self._loop = asyncio.get_running_loop()
        while not self._closing:
            # Cleared before the cycle: a set() while a write is in flight wakes the next one.
            self._wake.clear()
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(KVStoreError),
                wait=wait_exponential_jitter(
                    multiplier=self.settings.backoff_initial, max=self.settings.backoff_max, jitter=0.2
                ),
                before_sleep=self._on_retry,
            ):
                with attempt:
                    delay = await self._cycle()
            self._set_reachable(True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _on_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self._set_reachable(False, str(exc))
        if state.attempt_number == 1:
            log.warning("state store write failed, retrying with backoff: %s", exc)
        metrics.ERRORS.labels("operator", "etcd").inc()

    def _set_reachable(self, ok: bool, error: str | None = None) -> None:
        if ok and self.reachable is False:
            log.info("state store %s reachable again", self.client.endpoint)
        self.reachable = ok
        self.last_error = error
        metrics.STORE_REACHABLE.set(1 if ok else 0)

    async def _cycle(self) -> float:
        """Ensure the lease, refresh the heartbeat if due, write what is due.
        Returns how long the worker may sleep if nothing else happens."""
        await self._ensure_lease()
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self.set(schema.HEARTBEAT_KEY, schema.rfc3339_now())
            self._next_heartbeat = now + self.settings.heartbeat_interval
        ready = [key for key in self.dirty if self.prev_write.get(key, 0.0) + self.settings.min_interval <= now]
        puts: dict[str, str] = {}
        deletes: list[str] = []
        for key in ready:
            value = self.desired.get(key)
            if value == self.written.get(key):
                self.dirty.discard(key)
                metrics.SKIPPED_WRITES.inc()
            elif value is None:
                deletes.append(key)
            elif len(key) + len(value) > MAX_RECORD_BYTES:
                if self.oversized.get(key) != len(value):
                    self.oversized[key] = len(value)
                    log.error("record %s is %d bytes, over etcd's request limit; not written", key, len(value))
                    metrics.ERRORS.labels("operator", "oversized").inc()
                self.dirty.discard(key)
            else:
                self.oversized.pop(key, None)
                puts[key] = value
        if puts or deletes:
            lease = self._lease.lease_id if self._lease else None
            if trace.enabled():
                _trace_writes([*puts, *deletes])
            try:
                await self._etcd("txn", self.client.apply, puts, deletes, lease)
            except LeaseNotFound:
                # Gone before the keeper noticed (the store was wiped or the lease expired
                # while we were away): the retry gets a new lease and rewrites everything.
                if self._lease is not None:
                    self._lease.lost.set()
                raise
            stamp = time.monotonic()
            for key, value in puts.items():
                self.written[key] = value
                metrics.EXPORTS.labels(_kind(key), "put").inc()
            for key in deletes:
                self.written.pop(key, None)
                metrics.EXPORTS.labels(_kind(key), "delete").inc()
            for key in (*puts, *deletes):
                self.prev_write[key] = self.last_write.get(key, 0.0)
                self.last_write[key] = stamp
                # A change that arrived while the write was in flight stays dirty.
                if self.desired.get(key) == self.written.get(key):
                    self.dirty.discard(key)
            self.last_sync = dt.datetime.now(dt.UTC)
        metrics.QUEUE_DEPTH.set(len(self.dirty))
        if not self.dirty:
            self._idle.set()
        now = time.monotonic()
        sleep = self._next_heartbeat - now
        for key in self.dirty:  # keys still waiting: their own due times, not the heartbeat's
            sleep = min(sleep, self.prev_write.get(key, 0.0) + self.settings.min_interval - now)
        return max(sleep, 0.0)

    async def _ensure_lease(self) -> None:
        if self._lease is not None and not self._lease.lost.is_set():
            return
        if self._lease is not None:
            await asyncio.to_thread(self._lease.close, False)
        keeper = await self._etcd("lease", LeaseKeeper, self.client, self.settings.lease_ttl, self._lease_lost)
        self._lease = keeper
        if self.written:
            log.warning("new lease %x: rewriting all %d records", keeper.lease_id, len(self.desired))
        # Keys under the old lease are gone; deletes still pending (stale keys of an earlier
        # run, under another lease) must still happen.
        pending = {k for k in self.dirty if k not in self.desired and k in self.written}
        self.written = dict.fromkeys(pending, "")
        self.dirty = set(self.desired) | pending
        self.last_write.clear()
        self.prev_write.clear()

    def _lease_lost(self, lease_id: int) -> None:
        # Called from the keeper's thread.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _etcd(self, op: str, fn, *args):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            metrics.ETCD_LATENCY.labels(op).observe(time.perf_counter() - start)

    def pause(self) -> None:
        """Write nothing more (another writer took over); the lease is left to expire or be
        closed by close()."""
        self._closing = True
        self.desired_frozen = True
        self.dirty.clear()
        self._wake.set()

    async def close(self, revoke: bool = False) -> None:
        """Stop keeping the lease alive. Without ``revoke`` the records stay until
        the lease expires, so a restarting writer does not blink its records away."""
        self._closing = True
        self._wake.set()
        if self._lease is not None:
            await asyncio.to_thread(self._lease.close, revoke)


def _trace_writes(keys: list[str]) -> None:
    for hop, prefix in (("etcd-write", schema.SERVICES_PREFIX), ("cache-write", schema.CACHE_SERVICES_PREFIX)):
        trace.hops(hop, (trace.service_ref(k) for k in keys if k.startswith(prefix + "/")))
