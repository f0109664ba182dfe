"""The etcd client against a real etcd, and reads through a real grpc-proxy --namespace."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from clustermesh.kvstore import KVClient, KVUnavailable, LeaseKeeper, LeaseNotFound, WatchEvent
from tests.waiting import freeze


def test_put_get_list_delete(kv: KVClient) -> None:
    kv.put("cilium/state/a", "1")
    kv.put("cilium/state/b", "2")
    kv.put("other/c", "3")
    assert kv.get("cilium/state/a") == "1"
    assert kv.get("missing") is None
    listing = kv.list_prefix("cilium/state/")
    assert {k: v.value for k, v in listing.items.items()} == {"cilium/state/a": "1", "cilium/state/b": "2"}
    assert listing.revision >= max(v.mod_revision for v in listing.items.values())
    assert kv.count_prefix("cilium/state/") == 2
    assert kv.count_prefix("nothing/") == 0
    assert kv.delete("cilium/state/a") is True
    assert kv.delete("cilium/state/a") is False
    assert kv.delete_prefix("cilium/") == 1
    assert kv.get("other/c") == "3"


def test_watch_from_listed_revision_sees_every_change(kv: KVClient) -> None:
    kv.put("p/before", "x")
    listing = kv.list_prefix("p/")
    watch = kv.watch_prefix("p/", start_revision=listing.revision + 1)
    events: list[WatchEvent] = []

    def consume() -> None:
        for ev in watch:
            events.append(ev)
            if len(events) == 3:
                return

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    kv.put("p/one", "1")
    kv.put("p/one", "2")
    kv.delete("p/before")
    kv.put("q/outside", "ignored")
    t.join(10)
    watch.cancel()
    assert [(e.kind, e.key, e.value) for e in events] == [
        ("put", "p/one", "1"),
        ("put", "p/one", "2"),
        ("delete", "p/before", None),
    ]
    assert events[0].revision == listing.revision + 1


def test_lease_binds_keys_and_keeper_keeps_them(kv: KVClient) -> None:
    keeper = LeaseKeeper(kv, ttl=3)
    kv.put("leased/k", "v", lease=keeper.lease_id)
    time.sleep(6)  # twice the TTL: only the keep-alive keeps the key
    assert kv.get("leased/k") == "v"
    assert kv.lease_ttl(keeper.lease_id) > 0
    keeper.close()  # revokes
    assert kv.get("leased/k") is None


def test_lease_expiry_removes_keys(kv: KVClient) -> None:
    lease = kv.grant_lease(1)
    kv.put("leased/gone", "v", lease=lease)
    deadline = time.monotonic() + 10
    while kv.get("leased/gone") is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kv.get("leased/gone") is None
    assert kv.keepalive(lease) <= 0


def test_grpc_proxy_namespace_exposes_only_its_prefix(kv: KVClient, etcd_server, etcd_proxy_factory) -> None:
    kv.put("cluster1/cilium/state/services/v1/cluster1/ns/svc", '{"x":1}')
    kv.put("secret/outside", "no")
    proxy = etcd_proxy_factory(etcd_server.url, namespace="cluster1/")
    with KVClient(proxy.url) as remote:
        assert remote.get("cilium/state/services/v1/cluster1/ns/svc") == '{"x":1}'
        listing = remote.list_prefix("")
        assert set(listing.items) == {"cilium/state/services/v1/cluster1/ns/svc"}
        assert remote.get("secret/outside") is None


def test_unreachable_etcd_raises_kvunavailable() -> None:
    from clustermesh.lab.servers import free_port

    with KVClient(f"http://127.0.0.1:{free_port()}", timeout=1) as client, pytest.raises(KVUnavailable):
        client.get("x")


def test_a_failed_call_moves_the_client_to_the_next_endpoint(etcd_server) -> None:
    from clustermesh.lab.servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with KVClient([dead, etcd_server.url], timeout=1) as client:
        with pytest.raises(KVUnavailable):
            client.get("x")
        assert client.get("x") is None, "the second endpoint answers"
        assert str(client.endpoint) == etcd_server.url
        assert client.sessions == 2
        client.get("x")
        assert client.sessions == 2, "a working session is kept"


def test_a_write_under_a_missing_lease_raises_lease_not_found(kv: KVClient) -> None:
    lease = kv.grant_lease(60)
    kv.revoke_lease(lease)  # what a wiped store or an expired lease looks like to the writer
    with pytest.raises(LeaseNotFound):
        kv.apply({"leased/x": "v"}, [], lease)
    with pytest.raises(LeaseNotFound):
        kv.put("leased/x", "v", lease=lease)
    assert kv.get("leased/x") is None


def test_probe_reports_the_revision_and_a_frozen_proxy_by_its_deadline(
    kv: KVClient, etcd_server, etcd_proxy_factory
) -> None:
    kv.put("ns/cilium/x", "1")
    proxy = etcd_proxy_factory(etcd_server.url, namespace="ns/")
    with KVClient(proxy.url) as remote:
        assert remote.probe("cilium/.heartbeat", 2.0).revision == kv.revision()
        pid = proxy.process.pid
        assert pid is not None
        freeze(pid)
        try:
            start = time.monotonic()
            with pytest.raises(KVUnavailable):
                remote.probe("cilium/.heartbeat", 1.0)
            assert time.monotonic() - start < 3, "the probe's own deadline, not the client's"
        finally:
            os.kill(pid, signal.SIGCONT)
        assert remote.probe("cilium/.heartbeat", 2.0).revision == kv.revision()
