"""`clustermesh agent` as a process: a real kube-apiserver for the local cluster, a real
remote store behind a grpc-proxy, the real socket-LB, clients in a test netns."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from clustermesh import schema
from clustermesh.datapath import hooks
from clustermesh.kvstore import KVClient
from clustermesh.lab.kubeapi import KubeAPI, eventually
from clustermesh.schema import ClusterConfig, ClusterService, Node, NodeAddress, PortConfig
from tests.datapath.conftest import Topology
from tests.integration.test_operator import REPO, endpoint_slice, service
from tests.kubectl import apply_crds

pytestmark = pytest.mark.datapath

REMOTE, REMOTE_ID = "cluster-2", 2


def export_remote(kv: KVClient, ns: str, backends: dict[str, dict[str, PortConfig]]) -> None:
    kv.put("c2/" + schema.cluster_config_key(REMOTE), ClusterConfig(REMOTE_ID).encode())
    rec = ClusterService(REMOTE, ns, "echo", REMOTE_ID, frontends={"10.97.0.1": {"http": PortConfig("TCP", 80)}},
                         backends=backends)
    kv.put("c2/" + rec.key, rec.encode())
    # A remote node whose pod CIDR the agent routes via its InternalIP (on the test veth).
    node = Node("n1", REMOTE, REMOTE_ID, (NodeAddress("InternalIP", "10.250.0.2"),), "10.246.0.0/24")
    kv.put("c2/" + node.key, node.encode())
    for prefix in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
        kv.put("c2/" + schema.synced_key(REMOTE, prefix), schema.rfc3339_now())


def names(topology: Topology, ip: str) -> set[str]:
    results = topology.client("tcp", ip, "80", "6")
    assert all(r["ok"] for r in results), results
    return {str(r["name"]) for r in results}


def refused(topology: Topology, ip: str) -> None:
    result = topology.client("tcp", ip, "80", "1")[0]
    assert result["ok"] is False and result["errno"] == errno.ECONNREFUSED, result


def test_agent_merges_remote_backends_and_fails_over(
    topology: Topology, cgroup: Path, pin_dir: Path, control_plane, kubeconfig: str,
    kv: KVClient, etcd_server, etcd_proxy_factory, tmp_path: Path,
) -> None:
    apply_crds(kubeconfig)
    api = KubeAPI.for_control_plane(control_plane)
    tag = uuid.uuid4().hex[:8]
    ns, mesh = f"a-{tag}", f"mesh-{tag}"
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
    export_remote(kv, ns, {"10.245.1.10": {"http": PortConfig("TCP", 8080)}})
    subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "apply", "-f", "-"], check=True, capture_output=True,
                   input=json.dumps({
                       "apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh", "metadata": {"name": mesh},
                       "spec": {"localCluster": {"name": "cluster-1", "id": 1},
                                "clusters": [{"name": REMOTE, "id": REMOTE_ID, "endpoints": [proxy.url]}]},
                   }).encode())
    svc = api.create(service(ns, "echo", {"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}))
    api.create(endpoint_slice(ns, "echo-local", "echo", [("10.244.1.10", True)]))
    cluster_ip = svc["spec"]["clusterIP"]
    topology.add_backends({"local-a": "10.244.1.10", "remote-b": "10.245.1.10"})

    argv = [sys.executable, "-m", "clustermesh.cli", "agent", "--kubeconfig", kubeconfig, "--node", "test",
            "--cgroup", str(cgroup), "--pin-dir", str(pin_dir), "--clustermesh", mesh,
            "--grace-period", "2", "--metrics-port", "-1", "--routes", f"netns:{topology.client_ns}"]
    log = (tmp_path / "agent.log").open("ab")
    agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        eventually(lambda: _eq(names(topology, cluster_ip), {"local-a"}), timeout=30)
        eventually(lambda: _eq(remote_routes(topology), ["10.246.0.0/24 via 10.250.0.2"]), timeout=10)

        api.delete("EndpointSlice", ns, "echo-local")  # the local backends die
        eventually(lambda: _eq(names(topology, cluster_ip), {"remote-b"}), timeout=15)

        proxy.stop()  # the remote becomes unreachable: after the 2 s grace period it is withdrawn
        eventually(lambda: refused(topology, cluster_ip), timeout=30)
        eventually(lambda: _eq(remote_routes(topology), []), timeout=10)  # withdrawn with the remote

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
        proxy.process.start()
        refused(topology, cluster_ip)  # maps kept as they were while no agent runs
        agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        eventually(lambda: _eq(names(topology, cluster_ip), {"remote-b"}), timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        hooks.destroy(cgroup, pin_dir)
        api.delete("Namespace", None, ns)
        subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "delete", "clustermesh", mesh], capture_output=True)


def remote_routes(topology: Topology) -> list[str]:
    out = subprocess.run(["ip", "-n", topology.client_ns, "route", "show", "proto", "177"],
                         capture_output=True, text=True, check=True).stdout
    return [" ".join(line.split()[:3]) for line in out.splitlines() if line.strip()]


def _eq(a: object, b: object) -> None:
    assert a == b
