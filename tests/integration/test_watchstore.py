"""The store reader against a real etcd, reading through a real grpc-proxy that goes away."""

from __future__ import annotations

import shutil
import threading
import time

from clustermesh.kvstore import KVClient, Watch
from clustermesh.store.watch import CallbackObserver, WatchStore
from tests.waiting import eventually


class Recorder:
    def __init__(self) -> None:
        self.state: dict[str, str] = {}
        self.events: list[tuple[str, str]] = []
        self.synced = threading.Event()
        self.lock = threading.Lock()

    def observer(self) -> CallbackObserver:
        def upsert(key: str, value: str) -> None:
            with self.lock:
                self.state[key] = value
                self.events.append(("upsert", key))

        def delete(key: str) -> None:
            with self.lock:
                self.state.pop(key, None)
                self.events.append(("delete", key))

        return CallbackObserver(upsert, delete, self.synced.set)


def test_list_then_watch(kv: KVClient) -> None:
    kv.put("cilium/state/a", "1")
    kv.put("other/x", "ignored")
    rec = Recorder()
    store = WatchStore(kv, "cilium/state/", rec.observer(), name="t").start()
    try:
        assert rec.synced.wait(10)
        assert rec.state == {"cilium/state/a": "1"}
        kv.put("cilium/state/b", "2")
        kv.put("cilium/state/a", "1")  # same value: no event for the consumer
        kv.delete("cilium/state/a")
        eventually(lambda: _eq(rec.state, {"cilium/state/b": "2"}))
        assert rec.events == [("upsert", "cilium/state/a"), ("upsert", "cilium/state/b"),
                              ("delete", "cilium/state/a")]
    finally:
        store.stop()


def test_reconnect_keeps_cache_and_removes_only_what_is_gone(kv: KVClient, etcd_server, etcd_proxy_factory) -> None:
    for key in ("keep", "change", "gone"):
        kv.put(f"ns/cilium/state/{key}", "v1")
    proxy = etcd_proxy_factory(etcd_server.url, namespace="ns/")
    rec = Recorder()
    with KVClient(proxy.url, timeout=2) as remote:
        store = WatchStore(remote, "cilium/state/", rec.observer(), name="remote", backoff_max=0.5).start()
        try:
            assert rec.synced.wait(10)
            assert set(rec.state) == {"cilium/state/keep", "cilium/state/change", "cilium/state/gone"}
            proxy.stop()  # the remote cluster becomes unreachable
            kv.put("ns/cilium/state/change", "v2")
            kv.delete("ns/cilium/state/gone")
            kv.put("ns/cilium/state/new", "v1")
            eventually(lambda: _eq(store.connected, False), timeout=20)
            # Unreachable: the consumer still has everything it had.
            assert set(rec.state) == {"cilium/state/keep", "cilium/state/change", "cilium/state/gone"}
            proxy.process.start()
            eventually(lambda: _eq(rec.state, {"cilium/state/keep": "v1", "cilium/state/change": "v2",
                                               "cilium/state/new": "v1"}), timeout=30)
            assert ("delete", "cilium/state/keep") not in rec.events, "a reconnect never drains"
        finally:
            store.stop()
    store.drain()
    assert rec.state == {}


def _eq(a: object, b: object) -> None:
    assert a == b


def test_a_store_replaced_behind_the_proxy_is_relisted_on_request(etcd_server, etcd_proxy_factory) -> None:
    """A proxy in front of an etcd that is wiped and restarted on the same port keeps its
    watches waiting for revisions the new store has not reached: a frozen view. The next
    listing (RemoteCluster's probe asks for it when the revision goes back) shows a lower
    revision: the store was replaced, and what the new listing lacks is deleted."""
    with KVClient(etcd_server.url) as kv:
        for i in range(10):
            kv.put(f"ns/cilium/state/k{i}", "old")
    proxy = etcd_proxy_factory(etcd_server.url, namespace="ns/")
    rec = Recorder()
    with KVClient(proxy.url, timeout=2) as remote:
        store = WatchStore(remote, "cilium/state/", rec.observer(), name="remote", backoff_max=0.5).start()
        try:
            assert rec.synced.wait(10)
            assert len(rec.state) == 10 and store.max_revision >= 11
            etcd_server.stop()
            shutil.rmtree(etcd_server.directory / "data")
            etcd_server.start()
            with KVClient(etcd_server.url) as kv:
                kv.put("ns/cilium/state/k1", "new")
                kv.put("ns/cilium/state/fresh", "new")
                before = store.listings
                store.resync()
                eventually(lambda: _eq(rec.state, {"cilium/state/k1": "new", "cilium/state/fresh": "new"}))
                assert store.replaced == 1 and store.listings == before + 1
                kv.put("ns/cilium/state/after", "x")  # and the watch follows the new store
                eventually(lambda: _eq(rec.state.get("cilium/state/after"), "x"))
        finally:
            store.stop()


def test_a_watch_that_fell_silent_is_found_by_verify_and_listed_again(kv: KVClient) -> None:
    """A watch whose stream stays open and says nothing more (what a grpc-proxy does with a client
    watch on a broadcast that lost its own watch to etcd, etcd-io/etcd#21813): ``verify``, with no
    probe and no resync asked, finds it behind twice on the same change, calls it silent and lists
    again. The silence is made inside the etcd client (its watcher forgets our callback, so the
    events etcd sends are dropped as a cancelled watch's): the only part not real here."""
    for i in range(3):
        kv.put(f"cilium/state/k{i}", "v1")
    rec = Recorder()
    with KVClient(kv.endpoints[0]) as reader:
        store = WatchStore(reader, "cilium/state/", rec.observer(), name="reader").start()
        try:
            assert rec.synced.wait(10)
            eventually(lambda: _eq(store.watching, True))  # listed first, then the watch opens
            assert store.verify() is False  # in step with the store: nothing to say
            etcd = reader._client
            with etcd.watcher._lock:
                etcd.watcher._callbacks.clear()
            kv.put("cilium/state/k1", "v2")
            kv.delete("cilium/state/k2")
            kv.put("cilium/state/new", "v1")
            assert store.verify() is False, "one check behind may be a change in flight"
            assert rec.state == {f"cilium/state/k{i}": "v1" for i in range(3)}, "the watch delivered nothing"
            assert store.verify() is True
            eventually(lambda: _eq(rec.state, {"cilium/state/k0": "v1", "cilium/state/k1": "v2",
                                               "cilium/state/new": "v1"}))
            assert store.silent_watches == 1
            kv.put("cilium/state/after", "x")  # and the new watch delivers
            eventually(lambda: _eq(rec.state.get("cilium/state/after"), "x"))
        finally:
            store.stop()


def test_verify_never_calls_a_watch_that_keeps_up_silent(kv: KVClient) -> None:
    """Changes in flight at every check (a writer busy all along) are not a silent watch. The checks
    are 0.2 s apart, as verify asks: more than a change's way through a watch here (30 s in use)."""
    rec = Recorder()
    store = WatchStore(kv, "cilium/busy/", rec.observer(), name="busy").start()
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            kv.put(f"cilium/busy/k{i % 7}", str(i))
            if i % 3 == 0:
                kv.delete(f"cilium/busy/k{(i + 2) % 7}")
            i += 1

    writer = threading.Thread(target=write, daemon=True)
    try:
        assert rec.synced.wait(10)
        writer.start()
        checks = 0
        while checks < 30:
            store.verify()
            checks += 1
            time.sleep(0.2)
        assert store.silent_watches == 0
    finally:
        stop.set()
        writer.join(10)
        store.stop()


def test_a_watch_from_a_compacted_revision_lists_again_and_loses_nothing(kv: KVClient) -> None:
    """Between the listing and its watch, changes are made and etcd compacts past the listing's
    revision (a reader that listed and then stalled). The watch from listing + 1 is refused as
    compacted, the reader lists again, and the changes made in between arrive: the delete as a
    delete, the new key once."""
    kv.put("cilium/c/a", "1")
    rec = Recorder()
    compacted: list[int] = []

    class CompactsBeforeTheFirstWatch(KVClient):
        def watch_prefix(self, prefix: str, start_revision: int | None = None) -> Watch:
            if not compacted:
                kv.put("cilium/c/b", "2")
                kv.delete("cilium/c/a")
                compacted.append(kv.revision())
                kv._client.compact(compacted[0], physical=True)
                assert start_revision is not None and start_revision <= compacted[0]
            return super().watch_prefix(prefix, start_revision)

    with CompactsBeforeTheFirstWatch(kv.endpoints[0]) as reader:
        store = WatchStore(reader, "cilium/c/", rec.observer(), name="c", backoff_max=0.5).start()
        try:
            eventually(lambda: _eq(rec.state, {"cilium/c/b": "2"}))
            assert compacted and store.listings >= 2
            assert rec.events == [("upsert", "cilium/c/a"), ("upsert", "cilium/c/b"), ("delete", "cilium/c/a")]
            kv.put("cilium/c/after", "3")  # and the new watch delivers
            eventually(lambda: _eq(rec.state.get("cilium/c/after"), "3"))
        finally:
            store.stop()
