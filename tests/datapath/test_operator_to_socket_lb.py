"""The three parts together: a real operator exports a global Service from a real
kube-apiserver into etcd; an agent (played by this test, with the agent's own
RemoteCluster: readiness from the cluster-config and the synced markers) reads it
through the grpc-proxy, merges it with its local backends, and programs the real socket-LB.
Clients in a test netns then fail over from the local backend to the exported one,
and are refused once the exporting cluster has no backend left either."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest

from clustermesh.agent.merge import LocalService, merge
from clustermesh.datapath import Affinity, SocketLB
from clustermesh.schema import PortConfig
from clustermesh.store.remote import RemoteCluster
from clustermesh.store.remote_config import RemoteConfig
from tests.datapath.conftest import Topology
from tests.integration.test_operator import OperatorProcess, endpoint_slice, service
from tests.kubeapi import KubeAPI
from tests.kubectl import apply_crds
from tests.waiting import eventually

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
    remote = None
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
        remote = RemoteCluster(RemoteConfig(EXPORTING, EXPORTING_ID, (proxy.url,))).start()

        def program(local_backends: dict[str, dict[str, PortConfig]]) -> None:
            local = LocalService(ns, "echo", {CLUSTER_IP: HTTP}, local_backends, Affinity.LOCAL)
            assert remote is not None
            result = merge(LOCAL_ID, {(ns, "echo"): local}, remote.service_records() if remote.usable() else [])
            assert result.problems == []
            lb.program(result.specs)

        def exported_backends() -> set[str]:
            assert remote is not None
            rec = next((r for r in remote.service_records() if (r.namespace, r.name) == (ns, "echo")), None)
            return set(rec.backends) if rec else set()

        # Ready only once the operator's first full export is in (its synced markers).
        eventually(lambda: _eq(remote is not None and remote.ready, True), timeout=20)
        assert exported_backends() == {"10.245.1.10"}

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
        if remote is not None:
            remote.stop()
        if operator is not None:
            operator.kill()
        lb.destroy()
        api.delete("Namespace", None, ns)


def _names(results: list[dict[str, object]]) -> set[str]:
    assert all(r["ok"] for r in results), results
    return {str(r["name"]) for r in results}


def _eq(a: object, b: object) -> None:
    assert a == b
