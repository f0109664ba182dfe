"""The cache's decisions (store/cache.py) over plain data: what it writes while a remote is usable,
when it marks the copy synced, and what leaves when the remote is withdrawn or leaves the mesh.
tests/integration/test_cache.py runs it in the operator against real etcd and grpc-proxy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from clustermesh import schema
from clustermesh.agent.agent import read_from
from clustermesh.schema import ClusterConfig, ClusterService, Node
from clustermesh.store.cache import RemoteCache


class FakeRemote:
    name = "far"

    def __init__(self) -> None:
        self.services = [ClusterService("far", "ns", "a", 42), ClusterService("far", "ns", "b", 42)]
        self.nodes = [Node("n1", "far", 42)]
        self.is_usable = True
        self.is_ready = True

    def cluster_config(self) -> ClusterConfig | None:
        return ClusterConfig(42)

    def service_records(self) -> list[ClusterService]:
        return list(self.services)

    def node_records(self) -> list[Node]:
        return list(self.nodes)

    def service_record(self, ref: tuple[str, str]) -> ClusterService | None:
        return next((s for s in self.services if (s.namespace, s.name) == ref), None)

    def take_changed(self) -> set[tuple[str, str]]:
        # Every Service it ever had: "everything may have changed" is always a correct answer.
        self.seen = getattr(self, "seen", set()) | {(s.namespace, s.name) for s in self.services}
        return set(self.seen)

    def usable(self, now: float | None = None) -> bool:
        return self.is_usable

    @property
    def ready(self) -> bool:
        return self.is_ready


class FakeWriter:
    def __init__(self) -> None:
        self.desired: dict[str, str] = {}
        self.synced_prefixes: list[tuple[str, ...]] = []

    def set(self, key: str, value: str | None) -> None:
        if value is None:
            self.desired.pop(key, None)
        else:
            self.desired[key] = value

    def replace_prefix(self, prefix: str, values: dict[str, str]) -> None:
        for key in [k for k in self.desired if k.startswith(prefix)]:
            del self.desired[key]
        self.desired.update(values)

    async def sync_prefixes(self, prefixes: Iterable[str]) -> int:
        self.synced_prefixes.append(tuple(prefixes))
        return 0


MARKERS = {schema.synced_key("far", p) for p in (schema.CACHE_SERVICES_PREFIX, schema.CACHE_NODES_PREFIX)}
RECORDS = {"cilium/cache/services/v1/far/ns/a", "cilium/cache/services/v1/far/ns/b", "cilium/cache/nodes/v1/far/n1"}


def test_a_usable_remote_is_copied_then_marked_synced_and_withdrawn_when_not_usable() -> None:
    async def run() -> None:
        remote, writer = FakeRemote(), FakeWriter()
        cache = RemoteCache(remote, writer)
        cache.refresh()
        assert set(writer.desired) == RECORDS | {"cilium/cluster-config/far"}  # markers only after the sync
        assert ClusterConfig.decode(writer.desired["cilium/cluster-config/far"]).cached
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert cache.synced and set(writer.desired) >= MARKERS
        assert writer.synced_prefixes == [("cilium/cache/services/v1/far/", "cilium/cache/nodes/v1/far/")]

        remote.services = remote.services[:1]  # a record gone at the remote
        cache.refresh()
        assert "cilium/cache/services/v1/far/ns/b" not in writer.desired

        remote.is_usable = False  # past the grace period (or not ready): records and markers leave
        cache.refresh()
        assert set(writer.desired) == {"cilium/cluster-config/far"} and not cache.synced

        remote.is_usable = True  # back: copied and marked again
        cache.refresh()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert set(writer.desired) >= MARKERS and "cilium/cache/services/v1/far/ns/a" in writer.desired

        cache.forget()  # left the mesh: its cluster-config too
        assert writer.desired == {}

    asyncio.run(run())


def test_agents_read_every_remote_from_their_store_with_the_cache_and_directly_without() -> None:
    entry = {"name": "far", "id": 42, "endpoints": ["https://far:2379"], "tls": {"secretName": "remote-far"}}
    assert read_from(entry, {"clusters": [entry]}) == entry
    assert read_from(entry, {"cache": {"enabled": False}}) == entry
    cached = read_from(entry, {"cache": {"enabled": True}})
    assert cached["name"] == "far" and cached["id"] == 42
    assert cached["endpoints"] == ["https://clustermesh-store.clustermesh-system.svc:2379"]
    assert cached["tls"] == {"secretName": "clustermesh-access-local-agents", "secretNamespace": "clustermesh-system"}
    custom = read_from(entry, {"cache": {"enabled": True, "endpoints": ["https://10.0.0.1:2379"],
                                         "tls": {"secretName": "mine"}}})
    assert custom["endpoints"] == ["https://10.0.0.1:2379"] and custom["tls"] == {"secretName": "mine"}


def test_a_remote_connected_again_keeps_its_copy_until_the_new_connection_is_ready() -> None:
    async def run() -> None:
        old, writer = FakeRemote(), FakeWriter()
        cache = RemoteCache(old, writer, grace_period=60)
        cache.refresh(now=0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert cache.synced
        new = FakeRemote()
        new.is_usable = new.is_ready = False  # still listing
        new.services = new.services[:1]
        cache.replace(new, now=10)
        cache.refresh(now=11)
        assert set(writer.desired) >= RECORDS, "the old connection's copy stays meanwhile"
        new.is_usable = new.is_ready = True
        cache.refresh(now=12)
        assert "cilium/cache/services/v1/far/ns/b" not in writer.desired and cache.remote is new

        stuck = FakeRemote()
        stuck.is_usable = stuck.is_ready = False  # new settings that never work
        cache.replace(stuck, now=100)
        cache.refresh(now=159)
        assert cache.synced
        cache.refresh(now=160)  # the grace period is over: withdrawn
        assert not cache.synced and set(writer.desired) == {"cilium/cluster-config/far"}

    asyncio.run(run())


class CountingRemote(FakeRemote):
    """10,000 Services that report exactly what changed, and count full listings."""

    def __init__(self) -> None:
        super().__init__()
        self.by_ref = {("ns", f"s{i}"): ClusterService("far", "ns", f"s{i}", 42) for i in range(10_000)}
        self.changed: set[tuple[str, str]] = set()
        self.listings = 0

    def service_records(self) -> list[ClusterService]:
        self.listings += 1
        return list(self.by_ref.values())

    def service_record(self, ref: tuple[str, str]) -> ClusterService | None:
        return self.by_ref.get(ref)

    def take_changed(self) -> set[tuple[str, str]]:
        changed, self.changed = self.changed, set()
        return changed


class CountingWriter(FakeWriter):
    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self, key: str, value: str | None) -> None:
        self.sets += 1
        super().set(key, value)


def test_a_change_copies_that_service_only_and_a_new_connection_is_copied_whole() -> None:
    async def run() -> None:
        remote, writer = CountingRemote(), CountingWriter()
        cache = RemoteCache(remote, writer)
        cache.refresh()
        assert remote.listings == 1 and len([k for k in writer.desired if "/services/" in k]) == 10_000
        before = writer.sets
        remote.by_ref[("ns", "s7")] = ClusterService("far", "ns", "s7", 42, shared=False)
        del remote.by_ref[("ns", "s8")]
        remote.changed |= {("ns", "s7"), ("ns", "s8")}
        cache.refresh()
        assert remote.listings == 1, "a change must not walk every Service"
        assert writer.sets - before == 2
        assert "cilium/cache/services/v1/far/ns/s8" not in writer.desired
        assert ClusterService.decode(writer.desired["cilium/cache/services/v1/far/ns/s7"]).shared is False
        # Another connection (new credentials): its records are walked once, whole.
        new = CountingRemote()
        cache.replace(new)
        cache.refresh()  # not synced yet: the new connection takes over at once
        assert new.listings == 1 and "cilium/cache/services/v1/far/ns/s8" in writer.desired

    asyncio.run(run())
