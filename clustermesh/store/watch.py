"""The reader side of a (remote) state store: the shape of Cilium's watchstore.

List the prefix, report every key, then watch from the listed revision + 1.
When the connection breaks (or the watch hits a compacted revision), keep the
cache, list again, report what changed, and report as deleted only the keys
that the new listing no longer has: a reconnect never drains the consumer,
and nothing stale survives it. Consumers see only ``on_upsert``/``on_delete``
(plus ``on_synced`` after the first complete listing).

A revision lower than one already seen (in a listing or an event) means the
store behind a proxy was replaced (wiped and restarted): the listing is then
taken as the whole truth. A proxy in front of such a store keeps its watches
waiting for revisions the new store has not reached, so it is the owner's
probe (``RemoteCluster``) that notices and calls ``resync()``.

A watch can also fall silent with its stream open: etcd's grpc-proxy keeps a client's watch on a
broadcast whose own watch to etcd has ended (etcd-io/etcd#21813, #18231). Nothing errors, so the
owner checks each watch against the store now and then (``verify``): a change older than one check
that the watch never delivered means it is dead, and the prefix is listed again.

Runs in its own thread: the etcd client's watch is a blocking iterator.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Protocol

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from clustermesh import metrics
from clustermesh.kvstore import KVClient, KVStoreError, PrefixSummary, RevisionCompacted, StoreId, Watch

log = logging.getLogger(__name__)


def behind(seen_revision: int, cached: int, summary: PrefixSummary) -> bool:
    """Whether a watch that has seen up to ``seen_revision`` and holds ``cached`` keys lacks
    something the store had when ``summary`` was read. Also true for a change in flight."""
    return summary.newest > seen_revision or summary.count != cached


def silent(seen_revision: int, cached: int, summary: PrefixSummary, earlier: PrefixSummary | None) -> bool:
    """Whether the watch is dead rather than late: it is behind now and was behind at the
    ``earlier`` check, with what it lacked then still missing (a change it never delivered, or a
    count that differs while the prefix has not changed since). A busy prefix whose watch keeps up
    is never silent: each check may catch a change in flight, never the same one twice."""
    if earlier is None or not behind(seen_revision, cached, summary):
        return False
    return earlier.newest > seen_revision or (earlier.count, earlier.newest) == (summary.count, summary.newest)


class StoreObserver(Protocol):
    def on_upsert(self, key: str, value: str) -> None: ...

    def on_delete(self, key: str) -> None: ...

    def on_synced(self) -> None: ...


class WatchStore:
    def __init__(
        self,
        client: KVClient,
        prefix: str,
        observer: StoreObserver,
        name: str = "",
        backoff_max: float = 5.0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.observer = observer
        self.name = name or prefix
        self.backoff_max = backoff_max
        # key -> digest of its value: enough to skip an unchanged value after a relisting, at a
        # tenth of the value's size (the observer keeps what it needs of the value itself).
        self.cache: dict[str, bytes] = {}
        self.synced = threading.Event()
        self.connected = False
        self.last_error: str | None = None
        self.revision = 0
        self.max_revision = 0
        """The highest store revision seen (listing or event). A lower one later means the
        store behind a proxy was replaced (wiped and restarted): what we have is from
        another store, so we list again."""
        self.store: StoreId | None = None
        """The etcd that the last listing came from (its events too)."""
        self.replaced = 0
        self.listings = 0
        self._stop = threading.Event()
        self._resync = threading.Event()
        self._wake = threading.Event()  # cuts a backoff short: stop() or resync()
        self._watch: Watch | None = None
        self._thread: threading.Thread | None = None
        self._behind: PrefixSummary | None = None  # what the last verify() found the watch lacking
        self.silent_watches = 0
        """How many times verify() found the watch dead and listed again."""

    # ------------------------------------------------------------ lifecycle

    def start(self) -> WatchStore:
        self._thread = threading.Thread(target=self._run, name=f"watchstore-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reading. The cache and what the observer was told stay as they are:
        stopping is not removing (an agent restart must not drain the datapath)."""
        self._stop.set()
        self._wake.set()
        watch = self._watch
        if watch is not None:
            watch.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def resync(self) -> None:
        """List again now (e.g. the data looks stale): ends the current watch. A request
        made while listing or creating the watch is kept for right after."""
        self._resync.set()
        self._wake.set()
        watch = self._watch
        if watch is not None:
            watch.cancel()

    @property
    def watching(self) -> bool:
        """A watch is open (registered with the store) after the last listing. ``synced`` is set
        before it opens: a change made meanwhile comes with the watch's start revision."""
        return self._watch is not None

    def verify(self) -> bool:
        """Check the watch against the store (one small read); list again when it has fallen
        silent (see ``silent``). Returns whether it did. Call it from one thread, every so often
        (more than a change's way through the watch): the owner's probe thread. A store that does
        not answer raises KVStoreError, as any read does."""
        if self._watch is None or not self.synced.is_set():
            self._behind = None  # listing, or between listings: nothing to check yet
            return False
        summary = self.client.summarize_prefix(self.prefix)
        # Read after the summary: a change the watch delivers meanwhile counts as delivered.
        seen, cached = self.max_revision, len(self.cache)
        if silent(seen, cached, summary, self._behind):
            log.warning("[%s] the watch fell silent: the store holds %d keys changed up to revision %d, "
                        "the watch has seen %d keys up to %d; listing again", self.name, summary.count,
                        summary.newest, cached, seen)
            metrics.ERRORS.labels("reader", "silent-watch").inc()
            self.silent_watches += 1
            self._behind = None
            self.resync()
            return True
        self._behind = summary if behind(seen, cached, summary) else None
        return False

    def drain(self) -> None:
        """Report every cached key as deleted: the remote was removed from the mesh."""
        for key in sorted(self.cache):
            self.observer.on_delete(key)
        self.cache.clear()

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                # A fresh backoff per session: one that listed and watched was healthy,
                # so the next outage starts again from the shortest wait.
                Retrying(
                    retry=retry_if_exception_type(KVStoreError),
                    wait=wait_exponential_jitter(multiplier=0.2, max=self.backoff_max, jitter=0.2),
                    before_sleep=self._on_retry,
                    sleep=self._sleep,
                )(self._list_and_watch)
        except Exception:  # a bug here must be visible, not a silently dead thread
            log.exception("[%s] watch store stopped by an unexpected error", self.name)
            raise

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)  # a stop or resync request cuts the backoff short
        self._wake.clear()

    def _on_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self.connected = False
        self.last_error = str(exc)
        if state.attempt_number == 1:
            log.warning("[%s] lost the store (%s); keeping %d cached keys, retrying", self.name, exc,
                        len(self.cache))
        metrics.ERRORS.labels("reader", "etcd").inc()

    def _list_and_watch(self) -> None:
        if self._stop.is_set():
            return
        self._resync.clear()  # this listing answers every request made so far
        self._wake.clear()
        listing = self.client.list_prefix(self.prefix)
        self.listings += 1
        self.connected = True
        self.last_error = None
        if listing.revision < self.max_revision:
            self._store_replaced(self.max_revision, listing.revision)
        elif self.store is not None and listing.store is not None and listing.store != self.store:
            log.info("[%s] now reading etcd %s (was %s)", self.name, listing.store, self.store)
        self.store = listing.store
        fresh = {k: kv.value for k, kv in listing.items.items()}
        for key, value in fresh.items():
            digest = _digest(value)
            if self.cache.get(key) != digest:
                self.cache[key] = digest
                self.observer.on_upsert(key, value)
        for key in [k for k in self.cache if k not in fresh]:  # deleted while we were away
            del self.cache[key]
            self.observer.on_delete(key)
        revision = self.revision = self.max_revision = listing.revision
        # The watch below runs for as long as this frame lives: not the listing with it.
        del listing, fresh
        if not self.synced.is_set():
            self.synced.set()
            self.observer.on_synced()
        watch = self.client.watch_prefix(self.prefix, start_revision=revision + 1)
        self._watch = watch
        if self._stop.is_set() or self._resync.is_set():
            watch.cancel()
            self._watch = None
            return
        try:
            for event in watch:
                if not event.key.startswith(self.prefix):
                    # The client's shared watch stream can hand a late reply of one timed-out
                    # watch to the next one created: this stream carries another prefix.
                    log.warning("[%s] the watch delivered %s, outside %s; listing again", self.name,
                                event.key, self.prefix)
                    metrics.ERRORS.labels("reader", "crossed-watch").inc()
                    return
                if event.revision < self.max_revision:
                    # Not from the store we listed: the listing that follows is the truth.
                    self._store_replaced(self.max_revision, event.revision)
                    return
                self.revision = self.max_revision = event.revision
                if event.kind == "put" and event.value is not None:
                    digest = _digest(event.value)
                    if self.cache.get(event.key) != digest:
                        self.cache[event.key] = digest
                        self.observer.on_upsert(event.key, event.value)
                elif event.key in self.cache:
                    del self.cache[event.key]
                    self.observer.on_delete(event.key)
        except RevisionCompacted as exc:
            log.info("[%s] %s", self.name, exc)
        except KVStoreError as exc:
            # The session was healthy until now: list again at once, backoff only if that fails.
            self.connected = False
            self.last_error = str(exc)
            log.warning("[%s] watch broke (%s); listing again", self.name, exc)
            metrics.ERRORS.labels("reader", "etcd").inc()
        finally:
            watch.cancel()
            self._watch = None

    def _store_replaced(self, seen: int, now: int) -> None:
        self.replaced += 1
        log.warning("[%s] store revision went back from %d to %d: the store was replaced; listing again "
                    "and dropping what it no longer has", self.name, seen, now)
        metrics.ERRORS.labels("reader", "store-replaced").inc()


class CallbackObserver:
    """An observer from three callables, for small consumers and tests."""

    def __init__(
        self,
        on_upsert: Callable[[str, str], None],
        on_delete: Callable[[str], None],
        on_synced: Callable[[], None] = lambda: None,
    ) -> None:
        self.on_upsert = on_upsert
        self.on_delete = on_delete
        self.on_synced = on_synced


def _digest(value: str | bytes) -> bytes:
    return hashlib.blake2b(value.encode() if isinstance(value, str) else value, digest_size=16).digest()
