"""The three parts together: a real operator exports a global Service from a real
kube-apiserver into etcd; an agent (played by this test) reads it through the
grpc-proxy, merges it with its local backends, and programs the real socket-LB.
Clients in a test netns then fail over from the local backend to the exported one,
and are refused once the exporting cluster has no backend left either."""

from __future__ import annotations

import errno
import threading
import uuid
from pathlib import Path

import pytest

from clustermesh import schema
from clustermesh.agent.merge import LocalService, merge
from clustermesh.datapath import Affinity, SocketLB
from clustermesh.kvstore import KVClient
from clustermesh.lab.kubeapi import KubeAPI, eventually
from clustermesh.schema import ClusterService, PortConfig
from clustermesh.store.watch import CallbackObserver, WatchStore
from tests.datapath.conftest import Topology
from tests.integration.test_operator import OperatorProcess, endpoint_slice, service
from tests.kubectl import apply_crds

pytestmark = pytest.mark.datapath

EXPORTING, EXPORTING_ID = "cluster-1", 1
LOCAL_ID = 2
CLUSTER_IP = "10.96.50.10"
HTTP = {"http": PortConfig("TCP", 80)}


def test_exported_backends_take_over_when_local_ones_are_gone(
    topology: Topology, cgroup: Path, pin_dir: Path, control_plane, kubeconfig: str,
    etcd_server, etcd_proxy_factory, tmp_path: Path,
) -> None:
    apply_crds(kubeconfig)
    api = KubeAPI.for_control_plane(control_plane)
    ns = f"p-{uuid.uuid4().hex[:8]}"
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    operator = None
    lb = SocketLB(cgroup, pin_dir, LOCAL_ID)
    store = None
    try:
        # The exporting cluster: one ready backend, 10.245.1.10, behind a global Service.
        api.create(service(ns, "echo", {"service.cilium.io/global": "true"}))
        api.create(endpoint_slice(ns, "echo-1", "echo", [("10.245.1.10", True)]))
        operator = OperatorProcess(kubeconfig, etcd_server.url, EXPORTING, EXPORTING_ID,
                                   tmp_path / "operator.log", "--etcd-prefix", f"{EXPORTING}/").start()
        proxy = etcd_proxy_factory(etcd_server.url, namespace=f"{EXPORTING}/")

        # The consuming cluster's node: a local backend and the datapath.
        topology.add_backends({"local-a": "10.244.1.10", "exported-b": "10.245.1.10"})
        lb.load()
        records: dict[str, ClusterService] = {}
        lock = threading.Lock()

        def upsert(key: str, value: str) -> None:
            with lock:
                records[key] = ClusterService.decode(value, key=key)

        def delete(key: str) -> None:
            with lock:
                records.pop(key, None)

        store = WatchStore(KVClient(proxy.url), schema.services_cluster_prefix(EXPORTING),
                           CallbackObserver(upsert, delete), name=EXPORTING).start()

        def program(local_backends: dict[str, dict[str, PortConfig]]) -> None:
            local = LocalService(ns, "echo", {CLUSTER_IP: HTTP}, local_backends, Affinity.LOCAL)
            with lock:
                result = merge(LOCAL_ID, {(ns, "echo"): local}, list(records.values()))
            assert result.problems == []
            lb.reconcile(result.specs)

        def exported_backends() -> set[str]:
            with lock:
                rec = records.get(schema.service_key(EXPORTING, ns, "echo"))
            return set(rec.backends) if rec else set()

        eventually(lambda: _eq(exported_backends(), {"10.245.1.10"}), timeout=20)

        program({"10.244.1.10": {"http": PortConfig("TCP", 8080)}})
        assert _names(topology.client("tcp", CLUSTER_IP, "80", "10")) == {"local-a"}

        program({})  # the local backends die: the exported one takes over
        assert _names(topology.client("tcp", CLUSTER_IP, "80", "10")) == {"exported-b"}

        api.delete("EndpointSlice", ns, "echo-1")  # ...and then the exporting cluster loses it too
        eventually(lambda: _eq(exported_backends(), set()), timeout=20)
        program({})
        refused = topology.client("tcp", CLUSTER_IP, "80", "1")
        assert refused[0]["ok"] is False and refused[0]["errno"] == errno.ECONNREFUSED
    finally:
        if store is not None:
            store.stop()
        if operator is not None:
            operator.kill()
        lb.destroy()
        api.delete("Namespace", None, ns)


def _names(results: list[dict[str, object]]) -> set[str]:
    assert all(r["ok"] for r in results), results
    return {str(r["name"]) for r in results}


def _eq(a: object, b: object) -> None:
    assert a == b
