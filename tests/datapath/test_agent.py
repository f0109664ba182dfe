"""`clustermesh agent` as a process: a real kube-apiserver for the local cluster, real remote
stores behind grpc-proxies, the real socket-LB, clients in a test netns."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clustermesh import schema
from clustermesh.datapath import hooks
from clustermesh.kvstore import KVClient
from clustermesh.schema import ClusterConfig, ClusterService, Node, NodeAddress, PortConfig
from tests.datapath.conftest import Topology
from tests.integration.test_operator import REPO, endpoint_slice, service
from tests.kubeapi import KubeAPI
from tests.kubectl import apply_crds
from tests.waiting import eventually

pytestmark = pytest.mark.datapath

REMOTE, REMOTE_ID = "cluster-2", 2
HTTP = {"http": PortConfig("TCP", 8080)}
GLOBAL = {"service.cilium.io/global": "true"}
REMOTE_ROUTE = ["10.246.0.0/24 via 10.250.0.2"]


def put_remote(kv: KVClient, prefix: str, cluster: str, cluster_id: int, ns: str, backends: list[str],
               node: Node | None = None) -> None:
    """A remote cluster's export of ``ns/echo`` under ``prefix`` (what its grpc-proxy serves)."""
    kv.put(prefix + schema.cluster_config_key(cluster), ClusterConfig(cluster_id).encode())
    rec = ClusterService(cluster, ns, "echo", cluster_id, frontends={"10.97.0.1": {"http": PortConfig("TCP", 80)}},
                         backends=dict.fromkeys(backends, HTTP))
    kv.put(prefix + rec.key, rec.encode())
    if node is not None:
        kv.put(prefix + node.key, node.encode())
    for synced in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
        kv.put(prefix + schema.synced_key(cluster, synced), schema.rfc3339_now())


def export_remote(kv: KVClient, ns: str, backends: list[str]) -> None:
    """cluster-2's export, with a node whose pod CIDR the agent routes via its InternalIP (the test veth)."""
    node = Node("n1", REMOTE, REMOTE_ID, (NodeAddress("InternalIP", "10.250.0.2"),), "10.246.0.0/24")
    put_remote(kv, "c2/", REMOTE, REMOTE_ID, ns, backends, node)


@dataclass
class World:
    """This test's namespace and ClusterMesh on the shared API server."""

    api: KubeAPI
    kubeconfig: str
    ns: str
    mesh: str

    def apply_mesh(self, clusters: list[dict[str, object]]) -> None:
        subprocess.run(["kubectl", "--kubeconfig", self.kubeconfig, "apply", "-f", "-"], check=True,
                       capture_output=True, input=json.dumps({
                           "apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh",
                           "metadata": {"name": self.mesh},
                           "spec": {"localCluster": {"name": "cluster-1", "id": 1}, "clusters": clusters},
                       }).encode())

    def global_service(self, name: str, annotations: dict[str, str] | None = None) -> str:
        return str(self.api.create(service(self.ns, name, {**GLOBAL, **(annotations or {})}))["spec"]["clusterIP"])


@contextlib.contextmanager
def world(control_plane, kubeconfig: str, cgroup: Path, pin_dir: Path, prefix: str) -> Iterator[World]:  # type: ignore[no-untyped-def]
    apply_crds(kubeconfig)
    api = KubeAPI.for_control_plane(control_plane)
    tag = uuid.uuid4().hex[:8]
    w = World(api, kubeconfig, f"{prefix}-{tag}", f"mesh-{tag}")
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": w.ns}})
    try:
        yield w
    finally:
        hooks.destroy(cgroup, pin_dir)
        api.delete("Namespace", None, w.ns)
        subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "delete", "clustermesh", w.mesh], capture_output=True)


class AgentProcess:
    """`clustermesh agent` for the test's cgroup and pins, logging to one file across restarts."""

    def __init__(self, w: World, cgroup: Path, pin_dir: Path, log_path: Path, *extra: str) -> None:
        self.argv = [sys.executable, "-m", "clustermesh.cli", "agent", "--kubeconfig", w.kubeconfig,
                     "--node", "test", "--cgroup", str(cgroup), "--pin-dir", str(pin_dir), "--clustermesh", w.mesh,
                     "--metrics-port", "-1", *extra]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def stop(self) -> None:
        """SIGTERM, as a rollout or a node drain stops it; the maps stay."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(15) == 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text()


def names(topology: Topology, ip: str, connects: int = 6) -> set[str]:
    """The backends the socket-LB picked for ``ip`` over ``connects`` connects (all must work)."""
    results = topology.client("tcp", ip, "80", str(connects))
    assert all(r["ok"] for r in results), results
    return {str(r["name"]) for r in results}


def refused(topology: Topology, ip: str) -> None:
    result = topology.client("tcp", ip, "80", "1")[0]
    assert result["ok"] is False and result["errno"] == errno.ECONNREFUSED, result


def remote_routes(topology: Topology) -> list[str]:
    out = subprocess.run(["ip", "-n", topology.client_ns, "route", "show", "proto", "177"],
                         capture_output=True, text=True, check=True).stdout
    return [" ".join(line.split()[:3]) for line in out.splitlines() if line.strip()]


def _eq(a: object, b: object) -> None:
    assert a == b


def test_agent_merges_remote_backends_and_fails_over(
    topology: Topology, cgroup: Path, pin_dir: Path, control_plane, kubeconfig: str,
    kv: KVClient, etcd_server, etcd_proxy_factory, tmp_path: Path,
) -> None:
    with world(control_plane, kubeconfig, cgroup, pin_dir, "a") as w:
        proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
        export_remote(kv, w.ns, ["10.245.1.10"])
        cluster_ip = w.global_service("echo", {"service.cilium.io/affinity": "local"})
        w.api.create(endpoint_slice(w.ns, "echo-local", "echo", [("10.244.1.10", True)]))
        topology.add_backends({"local-a": "10.244.1.10", "remote-b": "10.245.1.10"})
        agent = AgentProcess(w, cgroup, pin_dir, tmp_path / "agent.log", "--grace-period", "2",
                             "--routes", f"netns:{topology.client_ns}").start()
        try:
            # Started before its ClusterMesh exists (deploy/ applied first): it waits, it does not exit.
            eventually(lambda: _eq("waiting for one" in agent.log(), True), timeout=30)
            assert agent.proc is not None and agent.proc.poll() is None, agent.log()
            w.apply_mesh([{"name": REMOTE, "id": REMOTE_ID, "endpoints": [proxy.url]}])
            eventually(lambda: _eq(names(topology, cluster_ip), {"local-a"}), timeout=30)
            eventually(lambda: _eq(remote_routes(topology), REMOTE_ROUTE), timeout=10)

            w.api.delete("EndpointSlice", w.ns, "echo-local")  # the local backends die
            eventually(lambda: _eq(names(topology, cluster_ip), {"remote-b"}), timeout=15)

            proxy.stop()  # the remote becomes unreachable: after the 2 s grace period it is withdrawn
            eventually(lambda: refused(topology, cluster_ip), timeout=30)
            eventually(lambda: _eq(remote_routes(topology), []), timeout=10)  # withdrawn with the remote

            agent.stop()
            proxy.process.start()
            refused(topology, cluster_ip)  # maps kept as they were while no agent runs
            agent.start()
            eventually(lambda: _eq(names(topology, cluster_ip), {"remote-b"}), timeout=30)
        finally:
            agent.kill()


def test_a_restarted_agent_keeps_what_a_frozen_remote_served_until_its_grace_period(
    topology: Topology, cgroup: Path, pin_dir: Path, control_plane, kubeconfig: str,
    kv: KVClient, etcd_server, etcd_proxy_factory, tmp_path: Path,
) -> None:
    """The previous agent programmed a remote backend and a route; the remote's proxy freezes;
    the new agent keeps both (it programs other changes meanwhile) until the grace period,
    counted from its start, runs out, and takes the remote back once it answers."""
    with world(control_plane, kubeconfig, cgroup, pin_dir, "r") as w:
        proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
        export_remote(kv, w.ns, ["10.245.1.10"])
        w.apply_mesh([{"name": REMOTE, "id": REMOTE_ID, "endpoints": [proxy.url]}])
        echo = w.global_service("echo")
        topology.add_backends({"remote-b": "10.245.1.10", "local-c": "10.244.1.20"})
        grace = 15.0
        agent = AgentProcess(w, cgroup, pin_dir, tmp_path / "agent.log", "--grace-period", str(grace),
                             "--routes", f"netns:{topology.client_ns}").start()
        pid = proxy.process.pid
        assert pid is not None
        frozen = False
        try:
            eventually(lambda: _eq(names(topology, echo), {"remote-b"}), timeout=30)
            eventually(lambda: _eq(remote_routes(topology), REMOTE_ROUTE), timeout=10)
            agent.stop()
            os.kill(pid, signal.SIGSTOP)  # the remote's store stops answering, its backend still serves
            frozen = True
            before = agent.log()
            agent.start()
            # Proof that the new agent programs: a second global Service with a local backend.
            echo2 = w.global_service("echo2")
            w.api.create(endpoint_slice(w.ns, "echo2-local", "echo2", [("10.244.1.20", True)]))
            eventually(lambda: _eq(names(topology, echo2), {"local-c"}), timeout=30)
            assert names(topology, echo) == {"remote-b"}, "the restart withdrew a remote backend that serves"
            assert remote_routes(topology) == REMOTE_ROUTE, "the restart removed a remote route"
            eventually(lambda: refused(topology, echo), timeout=grace + 20)  # the grace period ran out
            eventually(lambda: _eq(remote_routes(topology), []), timeout=10)
            os.kill(pid, signal.SIGCONT)
            frozen = False
            eventually(lambda: _eq(names(topology, echo), {"remote-b"}), timeout=60)
            restart_log = agent.log()[len(before):]
            assert "routes: +0 ~0 -1" in restart_log and restart_log.count("routes: +") == 2, restart_log
        finally:
            if frozen:
                os.kill(pid, signal.SIGCONT)
            agent.kill()


def test_membership_follows_the_clustermesh_without_a_restart(
    topology: Topology, cgroup: Path, pin_dir: Path, control_plane, kubeconfig: str,
    kv: KVClient, etcd_server, etcd_proxy_factory, tmp_path: Path,
) -> None:
    """Three clusters: a remote added to spec.clusters is used, a removed one leaves (and only
    it), and a remote whose endpoint changes moves to the new connection, all while the agent runs."""
    with world(control_plane, kubeconfig, cgroup, pin_dir, "m") as w:
        proxy2 = etcd_proxy_factory(etcd_server.url, namespace="c2/")
        proxy3 = etcd_proxy_factory(etcd_server.url, namespace="c3/")
        put_remote(kv, "c2/", "cluster-2", 2, w.ns, ["10.245.1.10"])
        put_remote(kv, "c3/", "cluster-3", 3, w.ns, ["10.245.2.10"])
        cluster2 = {"name": "cluster-2", "id": 2, "endpoints": [proxy2.url]}
        cluster3 = {"name": "cluster-3", "id": 3, "endpoints": [proxy3.url]}
        w.apply_mesh([cluster2])
        echo = w.global_service("echo")
        topology.add_backends({"b2": "10.245.1.10", "b3": "10.245.2.10", "b2-new": "10.245.1.11"})
        agent = AgentProcess(w, cgroup, pin_dir, tmp_path / "agent.log", "--grace-period", "2").start()
        try:
            eventually(lambda: _eq(names(topology, echo), {"b2"}), timeout=30)
            w.apply_mesh([cluster2, cluster3])  # cluster-3 joins
            eventually(lambda: _eq(names(topology, echo, 40), {"b2", "b3"}), timeout=30)
            w.apply_mesh([cluster2])  # cluster-3 leaves: only its backend goes
            eventually(lambda: _eq(names(topology, echo, 40), {"b2"}), timeout=30)

            # cluster-2 moves to another proxy (as with rotated credentials: new settings, new
            # connection); the old proxy stops: what is read afterwards comes through the new one.
            proxy2b = etcd_proxy_factory(etcd_server.url, namespace="c2/")
            w.apply_mesh([{**cluster2, "endpoints": [proxy2b.url]}])
            eventually(lambda: _eq("remote cluster-2: new settings" in agent.log(), True), timeout=30)
            proxy2.stop()
            put_remote(kv, "c2/", "cluster-2", 2, w.ns, ["10.245.1.11"])
            eventually(lambda: _eq(names(topology, echo, 40), {"b2-new"}), timeout=30)
        finally:
            agent.kill()


class RecordingLB:
    """The real socket-LB, remembering what each reconcile was asked to write."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls: list[set[str]] = []  # per reconcile: the backend IPs of every service

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def program(self, specs: object, changed_hint: object = None) -> object:
        listed = list(specs.values() if isinstance(specs, Mapping) else specs)  # type: ignore[call-overload]
        self.calls.append({str(b.ip) for s in listed for b in s.backends})
        return self.inner.program(specs, changed_hint)  # type: ignore[attr-defined]


@pytest.mark.parametrize("remote_comes", [True, False], ids=["remote-syncs-late", "remote-never-syncs"])
def test_a_fresh_node_is_programmed_once_with_its_remotes_or_after_the_first_sync_wait(
    cgroup: Path, pin_dir: Path, control_plane, kubeconfig: str, kv: KVClient, etcd_server, etcd_proxy_factory,
    remote_comes: bool,
) -> None:
    from clustermesh.agent.agent import Agent, AgentConfig
    from clustermesh.datapath import SocketLB
    from clustermesh.kube import KubeClient

    with world(control_plane, kubeconfig, cgroup, pin_dir, "f") as w:
        proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
        export_remote(kv, w.ns, ["10.245.1.10"])
        proxy.stop()  # not reachable while the agent starts and lists its own cluster
        w.apply_mesh([{"name": REMOTE, "id": REMOTE_ID, "endpoints": [proxy.url]}])
        w.global_service("echo")
        w.api.create(endpoint_slice(w.ns, "echo-local", "echo", [("10.244.1.10", True)]))
        lbs: list[RecordingLB] = []

        def factory(local_id: int) -> RecordingLB:
            lbs.append(RecordingLB(SocketLB(cgroup, pin_dir, local_id)))
            return lbs[-1]

        agent = Agent(AgentConfig(node="test", cgroup=str(cgroup), pin_dir=str(pin_dir), mesh_name=w.mesh,
                                  first_sync_wait=8.0), KubeClient(kubeconfig), factory)
        agent.start()
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()
        try:
            eventually(lambda: _eq(all(e.is_set() for e in agent._listed.values()), True), timeout=15)
            time.sleep(1)  # a negative: with everything local listed, the agent would have written by now
            if remote_comes:
                assert lbs[0].calls == []
                proxy.process.start()
                eventually(lambda: _eq(bool(lbs[0].calls), True), timeout=20)
                # Written once with everything, not first without the remote.
                assert lbs[0].calls[0] == {"10.244.1.10", "10.245.1.10"}, lbs[0].calls
            else:
                eventually(lambda: _eq(bool(lbs[0].calls), True), timeout=20)
                # The wait is bounded: the local backends are programmed without the remote.
                assert lbs[0].calls[0] == {"10.244.1.10"}, lbs[0].calls
                assert time.monotonic() - agent._started_at >= 8
        finally:
            agent.request_stop()
            runner.join(15)
            agent.stop()
            proxy.process.start()


def test_a_remote_route_is_there_whenever_its_backends_are(
    topology: Topology, cgroup: Path, pin_dir: Path, control_plane, kubeconfig: str, kv: KVClient,
    etcd_server, etcd_proxy_factory,
) -> None:
    """A remote's route goes in before its backends are written and leaves only after they are
    gone, and a drain period later (withdrawn past the grace period, then back): a connect() the
    socket-LB sends to a remote backend never finds no route, and a request under way finishes."""
    from clustermesh.agent.agent import Agent, AgentConfig
    from clustermesh.datapath import SocketLB
    from clustermesh.kube import KubeClient

    remote_backend, remote_cidr = "10.245.1.10", REMOTE_ROUTE[0].split()[0]
    history: list[tuple[str, bool, float]] = []  # ("lb" | "routes", whether the remote's part is in, when)
    lock = threading.Lock()

    class RecordingRoutes:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def apply(self, desired: dict[str, str]) -> object:
            changes = self.inner.apply(desired)
            with lock:
                history.append(("routes", remote_cidr in desired, time.monotonic()))
            return changes

    class OrderedLB(RecordingLB):
        def program(self, specs: object, changed_hint: object = None) -> object:
            ops = self.inner.program(specs, changed_hint)  # type: ignore[attr-defined]
            listed = list(specs.values() if isinstance(specs, Mapping) else specs)  # type: ignore[call-overload]
            with lock:
                history.append(("lb", any(str(b.ip) == remote_backend for s in listed for b in s.backends),
                                time.monotonic()))
            return ops

    def invariant_held() -> None:
        served = {"lb": False, "routes": False}
        with lock:
            for what, remote_in, _ in history:
                served[what] = remote_in
                assert served["routes"] or not served["lb"], f"remote backends served without their route: {history}"

    def last(what: str) -> bool | None:
        with lock:
            return next((r for w, r, _ in reversed(history) if w == what), None)

    def when(what: str, remote_in: bool) -> float:
        with lock:
            return next(t for w, r, t in reversed(history) if w == what and r == remote_in)

    with world(control_plane, kubeconfig, cgroup, pin_dir, "r") as w:
        proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
        export_remote(kv, w.ns, [remote_backend])
        w.apply_mesh([{"name": REMOTE, "id": REMOTE_ID, "endpoints": [proxy.url]}])
        w.global_service("echo")
        agent = Agent(AgentConfig(node="test", cgroup=str(cgroup), pin_dir=str(pin_dir), mesh_name=w.mesh,
                                  grace_period=2.0, routes=f"netns:{topology.client_ns}", route_drain=3.0),
                      KubeClient(kubeconfig), lambda local_id: OrderedLB(SocketLB(cgroup, pin_dir, local_id)))
        assert agent.routes is not None
        agent.routes = RecordingRoutes(agent.routes)  # type: ignore[assignment]
        agent.start()
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()
        try:
            eventually(lambda: _eq((last("lb"), last("routes")), (True, True)), timeout=30)
            proxy.stop()  # withdrawn after the 2 s grace period: backends first, then the route
            eventually(lambda: _eq((last("lb"), last("routes")), (False, False)), timeout=30)
            drained = when("routes", False) - when("lb", False)
            assert drained >= 3.0 - 0.5, f"the route left {drained:.2f}s after the backends, not after the drain"
            proxy.process.start()  # back: the route first, then the backends
            eventually(lambda: _eq((last("lb"), last("routes")), (True, True)), timeout=30)
            invariant_held()
        finally:
            agent.request_stop()
            runner.join(15)
            agent.stop()
            proxy.process.start()
