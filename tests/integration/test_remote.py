"""RemoteCluster against a real etcd read through a real grpc-proxy."""

from __future__ import annotations

import json

import pytest

from clustermesh import schema
from clustermesh.kvstore import KVClient
from clustermesh.schema import ClusterConfig, ClusterService, Node, NodeAddress, PortConfig
from clustermesh.store.remote import RemoteCluster
from clustermesh.store.remote_config import RemoteConfig
from tests.waiting import eventually

NAME, ID = "cluster-2", 2


def export(kv: KVClient, prefix: str, *, cluster_id: int = ID, synced: bool = True) -> None:
    kv.put(prefix + schema.cluster_config_key(NAME), ClusterConfig(cluster_id).encode())
    svc = ClusterService(NAME, "ns", "echo", ID, frontends={"10.97.0.1": {"http": PortConfig("TCP", 80)}},
                         backends={"10.245.0.1": {"http": PortConfig("TCP", 8080)}})
    kv.put(prefix + svc.key, svc.encode())
    node = Node("n1", NAME, ID, (NodeAddress("InternalIP", "192.168.2.1"),), "10.245.0.0/24")
    kv.put(prefix + node.key, node.encode())
    if synced:
        for p in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
            kv.put(prefix + schema.synced_key(NAME, p), schema.rfc3339_now())


@pytest.fixture
def proxied(kv: KVClient, etcd_server, etcd_proxy_factory):
    proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
    return kv, proxy


def remote(url: str, grace: float = 60.0) -> RemoteCluster:
    return RemoteCluster(RemoteConfig(NAME, ID, (url,)), grace_period=grace).start()


def test_ready_only_after_config_and_synced_markers(proxied) -> None:
    kv, proxy = proxied
    export(kv, "c2/", synced=False)
    rc = remote(proxy.url)
    try:
        # Services and nodes come from two watches: wait for both.
        eventually(lambda: _eq((set(rc.services), set(rc.nodes)), ({("ns", "echo")}, {"n1"})))
        assert rc.nodes["n1"].ipv4_pod_cidr == "10.245.0.0/24"
        # Every prefix listed (the synced markers' too): what is missing is known to be missing.
        eventually(lambda: _eq(all(store.synced.is_set() for store in rc._stores), True))
        assert not rc.ready, "no synced marker yet: a half-written export is not trusted"
        assert "synced" in (rc.not_ready_reason() or ""), rc.not_ready_reason()
        export(kv, "c2/")
        eventually(lambda: _eq(rc.ready, True))
        assert rc.usable()
        eventually(lambda: _eq(rc.status(), {"name": NAME, "connected": True, "ready": True, "services": 1,
                                             "nodes": 1}))
    finally:
        rc.stop()


def test_bad_records_are_skipped_and_the_rest_kept(proxied) -> None:
    kv, proxy = proxied
    export(kv, "c2/")
    bad = json.loads(ClusterService(NAME, "ns", "other", ID).encode())
    kv.put("c2/" + schema.service_key(NAME, "ns", "not-json"), "{nope")
    kv.put("c2/" + schema.service_key(NAME, "ns", "wrong-key"), json.dumps(bad))
    bad["clusterID"] = 9
    bad["name"] = "wrong-id"
    kv.put("c2/" + schema.service_key(NAME, "ns", "wrong-id"), json.dumps(bad))
    rc = remote(proxy.url)
    try:
        eventually(lambda: _eq(rc.ready, True))
        eventually(lambda: _eq(set(rc.services), {("ns", "echo")}))
        eventually(lambda: _eq(len(rc._problems), 3))  # the three bad records were noticed
        # A record that gets fixed is taken.
        good = ClusterService(NAME, "ns", "not-json", ID)
        kv.put("c2/" + good.key, good.encode())
        eventually(lambda: _eq(set(rc.services), {("ns", "echo"), ("ns", "not-json")}))
    finally:
        rc.stop()


def test_an_id_that_disagrees_with_the_mesh_is_refused(proxied) -> None:
    kv, proxy = proxied
    export(kv, "c2/", cluster_id=5)
    rc = remote(proxy.url)
    try:
        eventually(lambda: _eq(rc.config_error is not None, True))
        assert not rc.ready and not rc.usable()
        assert "ID is 5" in rc.status()["lastFailure"]
    finally:
        rc.stop()


def test_unreachable_remote_is_kept_for_the_grace_period_then_withdrawn(proxied) -> None:
    kv, proxy = proxied
    export(kv, "c2/")
    rc = remote(proxy.url, grace=2.0)
    try:
        eventually(lambda: _eq(rc.usable(), True))
        proxy.stop()
        eventually(lambda: _eq(rc.connected, False), timeout=20)
        assert rc.usable(), "within the grace period the cached backends still serve"
        eventually(lambda: _eq(rc.usable(), False), timeout=10)
        assert set(rc.services) == {("ns", "echo")}, "withdrawn from use, not forgotten"
        proxy.process.start()
        eventually(lambda: _eq(rc.usable(), True), timeout=30)
    finally:
        rc.stop()


def test_expired_records_leave_at_once_and_remove_drains(proxied) -> None:
    kv, proxy = proxied
    export(kv, "c2/")
    lease = kv.grant_lease(1)
    extra = ClusterService(NAME, "ns", "leased", ID)
    kv.put("c2/" + extra.key, extra.encode(), lease=lease)
    changes: list[str] = []
    rc = RemoteCluster(RemoteConfig(NAME, ID, (proxy.url,)), on_change=changes.append).start()
    try:
        eventually(lambda: _eq(set(rc.services), {("ns", "echo"), ("ns", "leased")}))
        eventually(lambda: _eq(set(rc.services), {("ns", "echo")}), timeout=10)  # the lease expired
        rc.remove()
        assert rc.services == {} and rc.nodes == {} and not rc.ready
        assert changes and set(changes) == {NAME}
    finally:
        rc.stop()


def test_a_stale_heartbeat_lists_again_and_withdraws_nothing(proxied) -> None:
    kv, proxy = proxied
    export(kv, "c2/")
    kv.put("c2/" + schema.HEARTBEAT_KEY, schema.rfc3339_now())
    rc = RemoteCluster(RemoteConfig(NAME, ID, (proxy.url,)), grace_period=1.0, heartbeat_timeout=2.0,
                       probe_interval=0.2).start()
    try:
        eventually(lambda: _eq(rc.usable(), True))
        listings = [s.listings for s in rc._stores]
        # The operator stops refreshing (paused, restarting): its records are still right.
        eventually(lambda: _eq(rc.heartbeat_relists, 1), timeout=10)
        eventually(lambda: _eq(all(s.listings > n for s, n in zip(rc._stores, listings, strict=True)), True))
        assert rc.heartbeat_stale and rc.connected and rc.usable(), "a stale heartbeat alone withdraws nothing"
        kv.put("c2/" + schema.HEARTBEAT_KEY, schema.rfc3339_now())
        eventually(lambda: _eq(rc.heartbeat_stale, False), timeout=10)
    finally:
        rc.stop()


def test_a_node_with_another_cluster_id_is_refused(proxied) -> None:
    kv, proxy = proxied
    export(kv, "c2/")
    bad = Node("n9", NAME, 9, (NodeAddress("InternalIP", "192.168.2.9"),), "10.245.9.0/24")
    kv.put("c2/" + bad.key, bad.encode())
    rc = remote(proxy.url)
    try:
        eventually(lambda: _eq(rc.ready, True))
        eventually(lambda: _eq(bad.key in rc._problems, True))
        assert set(rc.nodes) == {"n1"} and "ClusterID 9" in rc._problems[bad.key]
        fixed = Node("n9", NAME, ID, (NodeAddress("InternalIP", "192.168.2.9"),), "10.245.9.0/24")
        kv.put("c2/" + fixed.key, fixed.encode())
        eventually(lambda: _eq(set(rc.nodes), {"n1", "n9"}))
    finally:
        rc.stop()


def test_ids_up_to_511_when_the_mesh_allows_them(kv: KVClient, etcd_server, etcd_proxy_factory) -> None:
    name, cid = "big", 400
    kv.put("big/" + schema.cluster_config_key(name), ClusterConfig(cid, max_connected_clusters=511).encode())
    svc = ClusterService(name, "ns", "echo", cid, backends={"10.246.0.1": {"http": PortConfig("TCP", 8080)}})
    kv.put("big/" + svc.key, svc.encode())
    node = Node("n1", name, cid, (NodeAddress("InternalIP", "192.168.4.1"),), "10.246.0.0/24")
    kv.put("big/" + node.key, node.encode())
    for p in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
        kv.put("big/" + schema.synced_key(name, p), schema.rfc3339_now())
    proxy = etcd_proxy_factory(etcd_server.url, namespace="big/")
    wide = RemoteCluster(RemoteConfig(name, cid, (proxy.url,)), max_cluster_id=511).start()
    narrow = RemoteCluster(RemoteConfig(name, cid, (proxy.url,))).start()
    try:
        eventually(lambda: _eq((wide.ready, set(wide.services), set(wide.nodes)), (True, {("ns", "echo")}, {"n1"})))
        eventually(lambda: _eq("outside 1..255" in str(narrow.status().get("lastFailure")), True))
        eventually(lambda: _eq(len(narrow._problems), 3))  # config, service and node refused
        assert not narrow.ready and narrow.services == {} and narrow.nodes == {}
    finally:
        wide.stop()
        narrow.stop()


def test_a_remote_without_synced_canaries_is_trusted_once_listed(proxied) -> None:
    """What cilium-operator writes in kvstore mode: a cluster-config without the syncedCanaries
    capability, and never a synced marker. Cilium trusts such a remote at once."""
    kv, proxy = proxied
    export(kv, "c2/", synced=False)
    kv.put("c2/" + schema.cluster_config_key(NAME), '{"id":2,"capabilities":{"maxConnectedClusters":255}}')
    rc = remote(proxy.url)
    try:
        eventually(lambda: _eq((rc.ready, set(rc.services), set(rc.nodes)), (True, {("ns", "echo")}, {"n1"})))
        assert rc.usable()
    finally:
        rc.stop()


def _eq(a: object, b: object) -> None:
    assert a == b


def test_a_watch_that_falls_silent_is_listed_again_by_the_probe_thread(proxied) -> None:
    """The probe thread checks every watch against the store each ``watch_check_interval``: a
    service watch that stops delivering (its callback gone from the etcd client's watcher, the way
    a grpc-proxy's dead broadcast leaves a stream open and quiet) is listed again, and a change it
    missed arrives."""
    kv, proxy = proxied
    export(kv, "c2/")
    rc = RemoteCluster(RemoteConfig(NAME, ID, (proxy.url,)), probe_interval=0.2, watch_check_interval=0.5).start()
    try:
        eventually(lambda: _eq(rc.ready, True))
        # Ready means listed; the watches open right after: silence them once they are open.
        eventually(lambda: _eq(all(store.watching for store in rc._record_stores), True))
        services = rc._record_stores[0]
        etcd = rc.client._client
        with etcd.watcher._lock:
            etcd.watcher._callbacks.clear()  # every watch of this client falls silent
        svc = ClusterService(NAME, "ns", "late", ID, frontends={"10.97.0.2": {"http": PortConfig("TCP", 80)}},
                             backends={"10.245.0.2": {"http": PortConfig("TCP", 8080)}})
        kv.put("c2/" + svc.key, svc.encode())
        eventually(lambda: _eq(("ns", "late") in rc.services, True), timeout=20)
        assert services.silent_watches == 1
    finally:
        rc.stop()
