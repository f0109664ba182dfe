"""`clustermesh agent` as a process: a real kube-apiserver for the local cluster, a real
remote store behind a grpc-proxy, the real socket-LB, clients in a test netns."""

from __future__ import annotations

import errno
import json
import os
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


def apply_mesh(kubeconfig: str, mesh: str, clusters: list[dict[str, object]]) -> None:
    subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "apply", "-f", "-"], check=True, capture_output=True,
                   input=json.dumps({
                       "apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh", "metadata": {"name": mesh},
                       "spec": {"localCluster": {"name": "cluster-1", "id": 1}, "clusters": clusters},
                   }).encode())


def put_remote(kv: KVClient, prefix: str, cluster: str, cluster_id: int, ns: str, backends: list[str]) -> None:
    """A remote cluster's export of ``ns/echo`` under ``prefix`` (what its grpc-proxy serves)."""
    kv.put(prefix + schema.cluster_config_key(cluster), ClusterConfig(cluster_id).encode())
    rec = ClusterService(cluster, ns, "echo", cluster_id, frontends={"10.97.0.1": {"http": PortConfig("TCP", 80)}},
                         backends={ip: {"http": PortConfig("TCP", 8080)} for ip in backends})
    kv.put(prefix + rec.key, rec.encode())
    for synced in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
        kv.put(prefix + schema.synced_key(cluster, synced), schema.rfc3339_now())


def test_a_restarted_agent_keeps_what_a_frozen_remote_served_until_its_grace_period(
    topology: Topology, cgroup: Path, pin_dir: Path, control_plane, kubeconfig: str,
    kv: KVClient, etcd_server, etcd_proxy_factory, tmp_path: Path,
) -> None:
    """The previous agent programmed a remote backend and a route; the remote's proxy freezes;
    the new agent keeps both (it programs other changes meanwhile) until the grace period,
    counted from its start, runs out, and takes the remote back once it answers."""
    apply_crds(kubeconfig)
    api = KubeAPI.for_control_plane(control_plane)
    tag = uuid.uuid4().hex[:8]
    ns, mesh = f"r-{tag}", f"mesh-{tag}"
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
    export_remote(kv, ns, {"10.245.1.10": {"http": PortConfig("TCP", 8080)}})
    apply_mesh(kubeconfig, mesh, [{"name": REMOTE, "id": REMOTE_ID, "endpoints": [proxy.url]}])
    echo = api.create(service(ns, "echo", {"service.cilium.io/global": "true"}))["spec"]["clusterIP"]
    topology.add_backends({"remote-b": "10.245.1.10", "local-c": "10.244.1.20"})
    grace = 15.0
    argv = [sys.executable, "-m", "clustermesh.cli", "agent", "--kubeconfig", kubeconfig, "--node", "test",
            "--cgroup", str(cgroup), "--pin-dir", str(pin_dir), "--clustermesh", mesh,
            "--grace-period", str(grace), "--metrics-port", "-1", "--routes", f"netns:{topology.client_ns}"]
    log_path = tmp_path / "agent.log"
    log = log_path.open("ab")
    agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    pid = proxy.process.pid
    assert pid is not None
    frozen = False
    try:
        eventually(lambda: _eq(names(topology, echo), {"remote-b"}), timeout=30)
        eventually(lambda: _eq(remote_routes(topology), ["10.246.0.0/24 via 10.250.0.2"]), timeout=10)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
        os.kill(pid, signal.SIGSTOP)  # the remote's store stops answering, its backend still serves
        frozen = True
        before = log_path.read_text()
        agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        # Proof that the new agent programs: a second global Service with a local backend.
        echo2 = api.create(service(ns, "echo2", {"service.cilium.io/global": "true"}))["spec"]["clusterIP"]
        api.create(endpoint_slice(ns, "echo2-local", "echo2", [("10.244.1.20", True)]))
        eventually(lambda: _eq(names(topology, echo2), {"local-c"}), timeout=30)
        assert names(topology, echo) == {"remote-b"}, "the restart withdrew a remote backend that serves"
        assert remote_routes(topology) == ["10.246.0.0/24 via 10.250.0.2"], "the restart removed a remote route"
        eventually(lambda: refused(topology, echo), timeout=grace + 20)  # the grace period ran out
        eventually(lambda: _eq(remote_routes(topology), []), timeout=10)
        os.kill(pid, signal.SIGCONT)
        frozen = False
        eventually(lambda: _eq(names(topology, echo), {"remote-b"}), timeout=60)
        restart_log = log_path.read_text()[len(before):]
        assert "routes: +0 ~0 -1" in restart_log and restart_log.count("routes: +") == 2, restart_log
    finally:
        if frozen:
            os.kill(pid, signal.SIGCONT)
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        hooks.destroy(cgroup, pin_dir)
        api.delete("Namespace", None, ns)
        subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "delete", "clustermesh", mesh], capture_output=True)


def test_membership_follows_the_clustermesh_without_a_restart(
    topology: Topology, cgroup: Path, pin_dir: Path, control_plane, kubeconfig: str,
    kv: KVClient, etcd_server, etcd_proxy_factory, tmp_path: Path,
) -> None:
    """Three clusters: a remote added to spec.clusters is used, a removed one leaves (and only
    it), and a remote whose endpoint changes moves to the new connection, all while the agent runs."""
    apply_crds(kubeconfig)
    api = KubeAPI.for_control_plane(control_plane)
    tag = uuid.uuid4().hex[:8]
    ns, mesh = f"m-{tag}", f"mesh-{tag}"
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    proxy2 = etcd_proxy_factory(etcd_server.url, namespace="c2/")
    proxy3 = etcd_proxy_factory(etcd_server.url, namespace="c3/")
    put_remote(kv, "c2/", "cluster-2", 2, ns, ["10.245.1.10"])
    put_remote(kv, "c3/", "cluster-3", 3, ns, ["10.245.2.10"])
    cluster2 = {"name": "cluster-2", "id": 2, "endpoints": [proxy2.url]}
    cluster3 = {"name": "cluster-3", "id": 3, "endpoints": [proxy3.url]}
    apply_mesh(kubeconfig, mesh, [cluster2])
    echo = api.create(service(ns, "echo", {"service.cilium.io/global": "true"}))["spec"]["clusterIP"]
    topology.add_backends({"b2": "10.245.1.10", "b3": "10.245.2.10", "b2-new": "10.245.1.11"})
    argv = [sys.executable, "-m", "clustermesh.cli", "agent", "--kubeconfig", kubeconfig, "--node", "test",
            "--cgroup", str(cgroup), "--pin-dir", str(pin_dir), "--clustermesh", mesh,
            "--grace-period", "2", "--metrics-port", "-1"]
    agent = subprocess.Popen(argv, stdout=(tmp_path / "agent.log").open("ab"), stderr=subprocess.STDOUT, cwd=REPO)
    try:
        eventually(lambda: _eq(names(topology, echo), {"b2"}), timeout=30)
        apply_mesh(kubeconfig, mesh, [cluster2, cluster3])  # cluster-3 joins
        eventually(lambda: _eq(names_many(topology, echo), {"b2", "b3"}), timeout=30)
        apply_mesh(kubeconfig, mesh, [cluster2])  # cluster-3 leaves: only its backend goes
        eventually(lambda: _eq(names_many(topology, echo), {"b2"}), timeout=30)

        # cluster-2 moves to another proxy (as with rotated credentials: new settings, new
        # connection); the old proxy stops: what is read afterwards comes through the new one.
        proxy2b = etcd_proxy_factory(etcd_server.url, namespace="c2/")
        apply_mesh(kubeconfig, mesh, [{**cluster2, "endpoints": [proxy2b.url]}])
        eventually(lambda: _eq("remote cluster-2: new settings" in (tmp_path / "agent.log").read_text(), True),
                   timeout=30)
        proxy2.stop()
        put_remote(kv, "c2/", "cluster-2", 2, ns, ["10.245.1.11"])
        eventually(lambda: _eq(names_many(topology, echo), {"b2-new"}), timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        hooks.destroy(cgroup, pin_dir)
        api.delete("Namespace", None, ns)
        subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "delete", "clustermesh", mesh], capture_output=True)


def names_many(topology: Topology, ip: str) -> set[str]:
    """Every backend the socket-LB picks for ``ip`` over 40 connects."""
    results = topology.client("tcp", ip, "80", "40")
    assert all(r["ok"] for r in results), results
    return {str(r["name"]) for r in results}


def remote_routes(topology: Topology) -> list[str]:
    out = subprocess.run(["ip", "-n", topology.client_ns, "route", "show", "proto", "177"],
                         capture_output=True, text=True, check=True).stdout
    return [" ".join(line.split()[:3]) for line in out.splitlines() if line.strip()]


def _eq(a: object, b: object) -> None:
    assert a == b
