"""The store pod's cache of its remotes (operator --cache, Cilium's KVStoreMesh layout) against real
etcd, grpc-proxy and kube-apiserver: a remote's records are mirrored into the local store, a reader
of the local store (what an agent in cache mode is) sees them as the remote's, and they leave the
cache when the remote is past its grace period or leaves the mesh."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from clustermesh import schema
from clustermesh.kvstore import KVClient
from clustermesh.store.remote import RemoteCluster
from clustermesh.store.remote_config import RemoteConfig
from tests.integration.test_operator import _assert_true, cluster, crds, operators  # noqa: F401
from tests.waiting import eventually

pytestmark = pytest.mark.integration

FAR, FAR_ID = "far", 42


def publish(kv: KVClient, services: int) -> None:
    """What far's operator writes into far's store (behind the proxy's far/ namespace)."""
    kv.put("far/" + schema.cluster_config_key(FAR), schema.ClusterConfig(FAR_ID).encode())
    for i in range(services):
        kv.put("far/" + schema.service_key(FAR, "ns", f"svc-{i}"), schema.ClusterService(
            FAR, "ns", f"svc-{i}", FAR_ID, shared=True).encode())
    kv.put("far/" + schema.node_key(FAR, "node-1"), schema.Node("node-1", FAR, FAR_ID).encode())
    for prefix in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
        kv.put("far/" + schema.synced_key(FAR, prefix), schema.rfc3339_now())


def cached(kv: KVClient) -> dict[str, Any]:
    out = {k: json.loads(v.value) for k, v in kv.list_prefix("cilium/cache/").items.items()}
    for key in (schema.cluster_config_key(FAR), schema.synced_key(FAR, schema.CACHE_SERVICES_PREFIX),
                schema.synced_key(FAR, schema.CACHE_NODES_PREFIX)):
        value = kv.get(key)
        if value is not None:
            out[key] = json.loads(value) if value.startswith("{") else value
    return out


def patch_clusters(kubeconfig: str, mesh: str, clusters: list[dict[str, Any]]) -> None:
    subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "patch", "clustermesh", mesh, "--type=merge", "-p",
                    json.dumps({"spec": {"clusters": clusters}})], check=True, capture_output=True)


def test_the_cache_mirrors_a_remote_and_withdraws_it_past_its_grace_period(
    kv: KVClient, etcd_server, etcd_proxy_factory, cluster: str, operators, kubeconfig: str,  # noqa: F811
    crds: None,  # noqa: F811
) -> None:
    publish(kv, 3)
    proxy = etcd_proxy_factory(etcd_server.url, namespace="far/")
    operators("--cache", "--grace-period", "3")
    mesh = f"mesh-{cluster}"
    eventually(lambda: _assert_true(subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "clustermesh",
                                                    mesh], capture_output=True).returncode == 0))
    patch_clusters(kubeconfig, mesh, [{"name": FAR, "id": FAR_ID, "endpoints": [proxy.url]}])

    def complete(services: tuple[str, ...] = ("svc-0", "svc-1", "svc-2")) -> None:
        got = cached(kv)
        assert {k for k in got if k.startswith("cilium/cache/")} == {
            *(f"cilium/cache/services/v1/far/ns/{name}" for name in services), "cilium/cache/nodes/v1/far/node-1"}
        assert got["cilium/cache/services/v1/far/ns/svc-1"]["name"] == "svc-1"
        assert got[schema.cluster_config_key(FAR)] == {
            "id": FAR_ID, "capabilities": {"syncedCanaries": True, "cached": True, "maxConnectedClusters": 255}}
        assert schema.synced_key(FAR, schema.CACHE_SERVICES_PREFIX) in got
        assert schema.synced_key(FAR, schema.CACHE_NODES_PREFIX) in got

    eventually(complete, timeout=30)

    # An agent in cache mode: far's entry points at the local store, and the records are far's.
    reader = RemoteCluster(RemoteConfig(FAR, FAR_ID, (etcd_server.url,)), grace_period=3).start()
    try:
        eventually(lambda: _assert_true(reader.ready and reader.cached), timeout=30)
        assert sorted(s.name for s in reader.service_records()) == ["svc-0", "svc-1", "svc-2"]
        assert [n.name for n in reader.node_records()] == ["node-1"]

        kv.delete("far/" + schema.service_key(FAR, "ns", "svc-2"))  # a change at the remote
        eventually(lambda: _assert_true(sorted(s.name for s in reader.service_records()) == ["svc-0", "svc-1"]),
                   timeout=30)

        proxy.stop()  # far unreachable: its copy stays for the grace period, then leaves
        eventually(lambda: _assert_true(not any(k.startswith("cilium/cache/") for k in cached(kv))), timeout=30)
        assert schema.synced_key(FAR, schema.CACHE_SERVICES_PREFIX) not in cached(kv)
        eventually(lambda: _assert_true(reader.service_records() == [] and not reader.ready), timeout=30)

        proxy.start()  # back: listed again, copied again
        eventually(lambda: complete(("svc-0", "svc-1")), timeout=60)
        eventually(lambda: _assert_true(reader.ready and len(reader.service_records()) == 2), timeout=30)

        patch_clusters(kubeconfig, mesh, [])  # far leaves the mesh: everything of it leaves the cache
        eventually(lambda: _assert_true(cached(kv) == {}), timeout=30)
    finally:
        reader.stop()
