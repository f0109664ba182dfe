"""The operator against a real kube-apiserver + controller-manager and a real etcd.

Each test runs `clustermesh operator` as a separate process (so it can be
killed) with its own cluster name, ClusterMesh object, namespace and store.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from clustermesh import schema
from clustermesh.kvstore import KVClient
from clustermesh.lab.servers import free_port
from tests.kubeapi import KubeAPI
from tests.kubectl import apply_crds, apply_object, apply_peering_crd, kubectl
from tests.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
GLOBAL = {"service.cilium.io/global": "true"}


class OperatorProcess:
    def __init__(self, kubeconfig: str, etcd_url: str, cluster: str, cluster_id: int | None, log: Path,
                 *extra: str):
        """``cluster_id`` None: no identity flags (the operator waits for its ClusterMesh object)."""
        self.metrics_port = free_port()
        identity = [] if cluster_id is None else ["--cluster-name", cluster, "--cluster-id", str(cluster_id)]
        self.argv = [
            sys.executable, "-m", "clustermesh.cli", "operator",
            "--kubeconfig", kubeconfig, "--etcd", etcd_url, "--clustermesh", f"mesh-{cluster}", *identity,
            "--metrics-port", str(self.metrics_port), *extra,
        ]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def healthz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def crds(kubeconfig: str) -> None:
    apply_crds(kubeconfig)


@pytest.fixture
def api(control_plane) -> KubeAPI:
    return KubeAPI.for_control_plane(control_plane)


@pytest.fixture
def namespace(api: KubeAPI):
    name = f"t-{uuid.uuid4().hex[:8]}"
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    api.delete("Namespace", None, name)


@pytest.fixture
def cluster() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def operators(kubeconfig: str, crds: None, etcd_server, tmp_path: Path, cluster: str):
    started: list[OperatorProcess] = []

    def start(*extra: str, cluster_id: int | None = 7, etcd_url: str | None = None) -> OperatorProcess:
        op = OperatorProcess(kubeconfig, etcd_url or etcd_server.url, cluster, cluster_id,
                             tmp_path / f"operator-{len(started)}.log", *extra)
        started.append(op.start())
        return op

    yield start
    for op in started:
        op.kill()
    if os.environ.get("CLUSTERMESH_TEST_SHOW_LOGS"):
        for log in tmp_path.glob("operator-*.log"):
            print(log.read_text())


def service(namespace: str, name: str, annotations: dict[str, str] | None = None, ports: Any = None,
            labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {},
                     "labels": labels or {}},
        "spec": {"ports": ports or [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }


def endpoint_slice(namespace: str, name: str, service_name: str, endpoints: list[tuple[str, bool]],
                   ports: Any = None, address_type: str = "IPv4") -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": address_type,
        "ports": ports or [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in endpoints],
    }


def records(kv: KVClient, cluster: str, namespace: str) -> dict[str, dict[str, Any]]:
    prefix = f"{schema.services_cluster_prefix(cluster)}{namespace}/"
    return {k.rsplit("/", 1)[1]: json.loads(v.value) for k, v in kv.list_prefix(prefix).items.items()}


def backends_of(kv: KVClient, cluster: str, namespace: str, name: str) -> dict[str, Any] | None:
    rec = records(kv, cluster, namespace).get(name)
    return None if rec is None else rec["backends"]


HTTP_8080 = {"http": {"Protocol": "TCP", "Port": 8080}}


def test_record_follows_every_step(api: KubeAPI, kv: KVClient, namespace: str, cluster: str, operators) -> None:
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
             {"name": "dns", "port": 53, "protocol": "UDP"}]
    svc = api.create(service(namespace, "echo", GLOBAL, ports, labels={"app": "echo"}))
    slice_ports = [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    api.create(endpoint_slice(namespace, "echo-a", "echo",
                              [("10.244.1.10", True), ("10.244.1.11", False)], slice_ports))
    api.create(service(namespace, "local-only"))  # not global: never exported
    op = operators()
    cluster_ip = svc["spec"]["clusterIP"]
    both = {"http": {"Protocol": "TCP", "Port": 8080}, "dns": {"Protocol": "UDP", "Port": 53}}
    expected = {
        "cluster": cluster, "clusterID": 7, "namespace": namespace, "name": "echo",
        "frontends": {cluster_ip: {"http": {"Protocol": "TCP", "Port": 80}, "dns": {"Protocol": "UDP", "Port": 53}}},
        "backends": {"10.244.1.10": both},
        "labels": {"app": "echo"}, "selector": {}, "includeExternal": True, "shared": True,
    }

    def exact() -> None:
        assert records(kv, cluster, namespace) == {"echo": expected}
    eventually(exact)
    raw = kv.get(schema.service_key(cluster, namespace, "echo"))
    assert raw == schema.encode(expected)  # canonical JSON, byte for byte

    # Scale up, then down; a second slice adds to the first.
    api.patch("EndpointSlice", namespace, "echo-a", {"endpoints": [
        {"addresses": ["10.244.1.10"], "conditions": {"ready": True}},
        {"addresses": ["10.244.1.11"], "conditions": {"ready": True}},
        {"addresses": ["10.244.1.12"], "conditions": {"ready": True}}]})
    eventually(lambda: _assert_eq(set(backends_of(kv, cluster, namespace, "echo") or {}),
                                  {"10.244.1.10", "10.244.1.11", "10.244.1.12"}))
    api.patch("EndpointSlice", namespace, "echo-a", {"endpoints": [
        {"addresses": ["10.244.1.12"], "conditions": {"ready": True}}]})
    api.create(endpoint_slice(namespace, "echo-b", "echo", [("10.244.2.20", True)], slice_ports))
    eventually(lambda: _assert_eq(backends_of(kv, cluster, namespace, "echo"),
                                  {"10.244.1.12": both, "10.244.2.20": both}))
    api.delete("EndpointSlice", namespace, "echo-b")
    eventually(lambda: _assert_eq(set(backends_of(kv, cluster, namespace, "echo") or {}), {"10.244.1.12"}))

    # Flip the annotation off and on, including the legacy name.
    api.patch("Service", namespace, "echo", {"metadata": {"annotations": {"service.cilium.io/global": "false"}}})
    eventually(lambda: _assert_eq(records(kv, cluster, namespace), {}))
    api.patch("Service", namespace, "echo", {"metadata": {"annotations": {
        "service.cilium.io/global": None, "io.cilium/global-service": "true"}}})
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"echo"}))

    # shared=false: exported with no backends.
    api.patch("Service", namespace, "echo", {"metadata": {"annotations": {"service.cilium.io/shared": "false"}}})
    def unshared() -> None:
        rec = records(kv, cluster, namespace)["echo"]
        assert rec["shared"] is False and rec["backends"] == {}
    eventually(unshared)

    api.delete("Service", namespace, "echo")
    eventually(lambda: _assert_eq(records(kv, cluster, namespace), {}))
    assert op.healthz()[0] == 200


def test_nodes_are_exported_and_removed(api: KubeAPI, kv: KVClient, cluster: str, operators) -> None:
    name = f"node-{cluster}"
    api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                "spec": {"podCIDR": "10.250.7.0/24", "podCIDRs": ["10.250.7.0/24"]}})
    api.request("PATCH", f"/api/v1/nodes/{name}/status",
                {"status": {"addresses": [{"type": "InternalIP", "address": "192.168.77.2"},
                                          {"type": "Hostname", "address": name}]}},
                "application/merge-patch+json")
    try:
        operators()

        def exported() -> None:
            raw = kv.get(schema.node_key(cluster, name))
            assert raw is not None
            node = schema.Node.decode(raw, key=schema.node_key(cluster, name))
            assert node.internal_ipv4() == "192.168.77.2"
            assert node.ipv4_pod_cidr == "10.250.7.0/24"
            assert node.cluster_id == 7
        eventually(exported)
    finally:
        api.delete("Node", None, name)
    eventually(lambda: _assert_eq(kv.get(schema.node_key(cluster, name)), None))


def test_bad_input_is_logged_counted_and_skipped(
    api: KubeAPI, kv: KVClient, namespace: str, cluster: str, operators
) -> None:
    api.create(service(namespace, "weird", {"service.cilium.io/global": "yes"}))
    api.create(service(namespace, "good", {**GLOBAL, "service.cilium.io/affinity": "sideways"}))
    api.create(endpoint_slice(namespace, "good-a", "good", [("10.244.3.3", True)]))
    api.create(endpoint_slice(namespace, "good-fqdn", "good", [("backend.example", True)],
                              address_type="FQDN"))
    op = operators()
    eventually(lambda: _assert_eq(backends_of(kv, cluster, namespace, "good"), {"10.244.3.3": HTTP_8080}))
    assert "weird" not in records(kv, cluster, namespace)

    def counted() -> None:
        lines = [ln for ln in op.metrics().splitlines()
                 if ln.startswith('clustermesh_errors_total{component="operator",kind="bad-input"}')]
        assert lines and float(lines[0].split()[-1]) >= 3  # bad annotation, bad affinity, FQDN slice
    eventually(counted)
    log = op.log.read_text()
    assert log.count("is neither 'true' nor 'false'") == 1, "a problem is logged once, not per event"


def test_restart_leaves_nothing_stale(api: KubeAPI, kv: KVClient, namespace: str, cluster: str, operators) -> None:
    """The default lease (15 minutes) outlives the test: what goes, the new operator's first
    full pass removed; what stays, it took over under its own lease."""
    for name in ("a", "b"):
        api.create(service(namespace, name, GLOBAL))
        api.create(endpoint_slice(namespace, f"{name}-1", name, [("10.244.4.1", True)]))
    op = operators()
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"a", "b"}))
    old_lease = kv.list_prefix(schema.service_key(cluster, namespace, "a")).items[
        schema.service_key(cluster, namespace, "a")].lease
    assert old_lease and kv.lease_ttl(old_lease) > 60
    op.kill()
    # While it is down: delete a, change b, add c.
    api.delete("Service", namespace, "a")
    api.patch("EndpointSlice", namespace, "b-1", {"endpoints": [
        {"addresses": ["10.244.4.2"], "conditions": {"ready": True}}]})
    api.create(service(namespace, "c", GLOBAL))
    assert set(records(kv, cluster, namespace)) == {"a", "b"}
    operators()
    eventually(lambda: _assert_eq(
        {k: set(v["backends"]) for k, v in records(kv, cluster, namespace).items()},
        {"b": {"10.244.4.2"}, "c": set()},
    ))
    assert kv.lease_ttl(old_lease) > 0, "a was deleted by the cleanup, not by its lease running out"
    marker = kv.get(schema.synced_key(cluster, schema.SERVICES_PREFIX))
    assert marker is not None and schema.parse_rfc3339(marker)

    def taken_over() -> None:  # every record of the cluster is on the new operator's lease
        mine = [kv_ for k, kv_ in kv.list_prefix("cilium/").items.items() if f"/{cluster}" in k]
        assert mine and all(item.lease not in (0, old_lease) for item in mine)
    eventually(taken_over)


def test_store_converges_after_etcd_outage(
    api: KubeAPI, kv: KVClient, etcd_server, namespace: str, cluster: str, operators, kubeconfig: str
) -> None:
    api.create(service(namespace, "a", GLOBAL))
    api.create(endpoint_slice(namespace, "a-1", "a", [("10.244.5.1", True)]))
    op = operators("--lease-ttl", "30")
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"a"}))
    etcd_server.stop()
    try:
        api.patch("EndpointSlice", namespace, "a-1", {"endpoints": [
            {"addresses": ["10.244.5.2"], "conditions": {"ready": True}}]})
        api.create(service(namespace, "b", GLOBAL))
        api.delete("Service", namespace, "a")

        def unreachable() -> None:
            out = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "clustermesh", f"mesh-{cluster}",
                                  "-o", "jsonpath={.status.conditions[?(@.type=='StoreReachable')].status}"],
                                 capture_output=True, text=True, check=True).stdout
            assert out == "False"
        eventually(unreachable, timeout=30)  # the operator noticed the outage (its writes failed) ...
        assert op.proc is not None and op.proc.poll() is None, "... and survives it"
    finally:
        etcd_server.start()
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"b"}), timeout=30)


def test_records_vanish_when_the_lease_expires(
    api: KubeAPI, kv: KVClient, namespace: str, cluster: str, operators
) -> None:
    api.create(service(namespace, "a", GLOBAL))
    op = operators("--lease-ttl", "5")
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"a"}))
    assert kv.get(schema.cluster_config_key(cluster)) is not None
    op.kill()
    killed = time.monotonic()
    eventually(lambda: _assert_eq(records(kv, cluster, namespace), {}), timeout=15)
    # Kept alive every ttl/3, the lease had about 2/3 of its 5 s left when the operator died: the records
    # outlived it by seconds (1.5 s leaves room for a keep-alive that a busy machine sent late), not
    # vanished with it.
    assert time.monotonic() - killed >= 1.5, "records outlive the operator until the lease ends"
    assert kv.get(schema.cluster_config_key(cluster)) is None
    assert kv.get(schema.synced_key(cluster, schema.SERVICES_PREFIX)) is None


def test_remote_reader_through_grpc_proxy_namespace(
    api: KubeAPI, etcd_server, etcd_proxy_factory, namespace: str, cluster: str, operators
) -> None:
    api.create(service(namespace, "a", GLOBAL))
    api.create(endpoint_slice(namespace, "a-1", "a", [("10.244.6.1", True)]))
    operators("--etcd-prefix", f"stores/{cluster}/")
    proxy = etcd_proxy_factory(etcd_server.url, namespace=f"stores/{cluster}/")
    with KVClient(proxy.url) as remote:
        def seen() -> None:
            key = schema.service_key(cluster, namespace, "a")
            raw = remote.get(key)
            assert raw is not None
            assert schema.ClusterService.decode(raw, key=key).backends == {
                "10.244.6.1": {"http": schema.PortConfig("TCP", 8080)}}
            assert remote.get(schema.cluster_config_key(cluster)) is not None
        eventually(seen)
        everything = remote.list_prefix("")
        assert all(k.startswith("cilium/") for k in everything.items), "the proxy shows only the namespace"


def test_status_reports_sync(api: KubeAPI, namespace: str, cluster: str, operators, kubeconfig: str) -> None:
    api.create(service(namespace, "a", GLOBAL))
    operators()

    def synced() -> None:
        res = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "clustermesh", f"mesh-{cluster}",
                              "-o", "json"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout).get("status") or {}
        conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
        assert conds == {"StoreReachable": "True", "Synced": "True"}
        assert status["exportedServices"] >= 1
        assert "lastSyncTime" in status
    eventually(synced, timeout=20)


def test_a_burst_of_endpoint_changes_becomes_a_few_writes(
    api: KubeAPI, kv: KVClient, namespace: str, cluster: str, operators
) -> None:
    api.create(service(namespace, "burst", GLOBAL))
    api.create(endpoint_slice(namespace, "burst-1", "burst", [("10.244.7.0", True)]))
    operators()
    eventually(lambda: _assert_eq(set(backends_of(kv, cluster, namespace, "burst") or {}), {"10.244.7.0"}))
    key = schema.service_key(cluster, namespace, "burst")
    watch = kv.watch_prefix(key, start_revision=kv.revision() + 1)
    writes: list[str] = []
    t = threading.Thread(target=lambda: [writes.append(ev.value or "") for ev in watch], daemon=True)
    t.start()
    changes = 500
    start = time.monotonic()
    for i in range(1, changes + 1):
        api.patch("EndpointSlice", namespace, "burst-1", {"endpoints": [
            {"addresses": [f"10.244.7.{i % 250}"], "conditions": {"ready": True}},
            {"addresses": [f"10.244.8.{i // 250}"], "conditions": {"ready": True}}]})
    duration = time.monotonic() - start
    final = {f"10.244.7.{changes % 250}", f"10.244.8.{changes // 250}"}
    eventually(lambda: _assert_eq(set(backends_of(kv, cluster, namespace, "burst") or {}), final))
    # The watch has delivered the final write too (the last event is the one asserted below).
    eventually(lambda: _assert_true(bool(writes) and set(json.loads(writes[-1])["backends"]) == final))
    watch.cancel()
    # Two writes per min-write-interval (0.25 s) at most, whatever the event rate.
    budget = 2 * int(duration / 0.25) + 4
    print(f"{changes} endpoint changes in {duration:.2f}s -> {len(writes)} writes (budget {budget})")
    assert 1 <= len(writes) <= budget
    assert set(json.loads(writes[-1])["backends"]) == final


def _assert_eq(actual: object, expected: object) -> None:
    assert actual == expected


def own_peering(kubeconfig: str, cluster: str) -> str:
    """A peering object for one test: peers of other tests (killed, but alive in the object
    for their lifetime) must not pause or outrank this test's operators."""
    apply_peering_crd(kubeconfig)
    name = f"peering-{cluster}"
    apply_object(kubeconfig, {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                              "metadata": {"name": name}})
    return name


def test_peering_elects_one_writer_and_fails_over(
    api: KubeAPI, kv: KVClient, namespace: str, cluster: str, operators, kubeconfig: str
) -> None:
    peering = own_peering(kubeconfig, cluster)
    api.create(service(namespace, "a", GLOBAL))
    active = operators("--peering", peering, "--priority", "200")
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"a"}))
    standby = operators("--peering", peering, "--priority", "100")
    eventually(lambda: _assert_true("Initial authentication has finished" in standby.log.read_text()))
    # kopf starts paused and stays so while a higher-priority peer is alive. Proof that the
    # standby had its chance to write: its own peering entry is in, and a later change was
    # exported (by the active one) meanwhile.
    def joined() -> None:
        peers = json.loads(kubectl(kubeconfig, "get", "clusterkopfpeering", peering, "-o", "json"))
        assert len(peers.get("status") or {}) >= 2
    eventually(joined, timeout=30)
    api.create(service(namespace, "while-standing-by", GLOBAL))
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"a", "while-standing-by"}))
    assert "Resuming operations" not in standby.log.read_text()
    assert "exporting cluster" not in standby.log.read_text()
    active.kill()
    api.create(service(namespace, "b", GLOBAL))  # only the standby can export this one
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"a", "while-standing-by", "b"}),
               timeout=45)
    assert "Resuming operations" in standby.log.read_text()


def _assert_true(value: bool) -> None:
    assert value


@pytest.mark.parametrize(("name", "cid"), [("Bad_Name", 3), ("ok", 0), ("ok", 256)])
def test_identity_the_crd_would_reject_is_refused(kubeconfig: str, crds: None, etcd_server, name: str, cid: int):
    res = subprocess.run(
        [sys.executable, "-m", "clustermesh.cli", "operator", "--kubeconfig", kubeconfig, "--etcd", etcd_server.url,
         "--clustermesh", f"mesh-bad-{uuid.uuid4().hex[:6]}", "--cluster-name", name, "--cluster-id", str(cid),
         "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert res.returncode == 1
    assert "cluster" in res.stderr and ("name" in res.stderr or "ID" in res.stderr), res.stderr
    assert KVClient(etcd_server.url).list_prefix("").items == {}, "nothing was written"


def test_a_replica_outranked_later_stops_writing_and_exits(
    api: KubeAPI, kv: KVClient, namespace: str, cluster: str, operators, kubeconfig: str
) -> None:
    peering = own_peering(kubeconfig, cluster)
    api.create(service(namespace, "a", GLOBAL))
    low = operators("--peering", peering, "--priority", "250")
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"a"}))
    operators("--peering", peering, "--priority", "300")
    assert low.proc is not None
    eventually(lambda: _assert_true(low.proc.poll() is not None), timeout=30)
    assert "higher-priority replica is active" in low.log.read_text()
    api.create(service(namespace, "b", GLOBAL))
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"a", "b"}), timeout=30)


def test_status_reports_each_remote(
    api: KubeAPI, kv: KVClient, etcd_server, etcd_proxy_factory, cluster: str, operators, kubeconfig: str
) -> None:
    # A remote cluster "far" whose store is behind a proxy (its records written by hand here).
    kv.put("far/" + schema.cluster_config_key("far"), schema.ClusterConfig(42).encode())
    kv.put("far/" + schema.service_key("far", "ns", "x"), schema.ClusterService("far", "ns", "x", 42).encode())
    for prefix in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
        kv.put("far/" + schema.synced_key("far", prefix), schema.rfc3339_now())
    proxy = etcd_proxy_factory(etcd_server.url, namespace="far/")
    operators()
    mesh = f"mesh-{cluster}"
    eventually(lambda: _assert_true(subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "clustermesh", mesh],
                                                   capture_output=True).returncode == 0))
    subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "patch", "clustermesh", mesh, "--type=merge", "-p",
                    json.dumps({"spec": {"clusters": [{"name": "far", "id": 42, "endpoints": [proxy.url]}]}})],
                   check=True, capture_output=True)

    def remote_ready() -> None:
        out = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "clustermesh", mesh, "-o", "json"],
                             capture_output=True, text=True, check=True).stdout
        status = json.loads(out).get("status") or {}
        assert status.get("remotes") == [
            {"name": "far", "connected": True, "ready": True, "services": 1, "nodes": 0}]
        assert status.get("remoteClusters") == "far"
    eventually(remote_ready, timeout=30)


def test_an_operator_started_before_its_clustermesh_waits_for_it_alive_and_not_ready(
    kv: KVClient, cluster: str, operators, kubeconfig: str, crds: None, tmp_path: Path
) -> None:
    """deploy/ goes in before the ClusterMesh object: the operator says what it waits for, answers
    its probes (alive, not ready) instead of exiting into a restart backoff, and exports once the
    object is applied."""
    op = operators(cluster_id=None)

    def waiting() -> None:
        assert "no ClusterMesh" in (tmp_path / "operator-0.log").read_text()
        assert op.healthz() == (200, "waiting for the ClusterMesh object and the first listing\n")
    eventually(waiting, timeout=30)
    assert op.proc is not None and op.proc.poll() is None
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/readyz", timeout=5)
    assert not_ready.value.code == 503
    assert kv.get(schema.cluster_config_key(cluster)) is None
    apply_object(kubeconfig, {"apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh",
                              "metadata": {"name": f"mesh-{cluster}"},
                              "spec": {"localCluster": {"name": cluster, "id": 31}}})
    eventually(lambda: _assert_eq(kv.get(schema.cluster_config_key(cluster)) is not None, True), timeout=30)
    assert op.proc.poll() is None


def test_cluster_config_follows_the_mesh_as_cilium_writes_it(
    kv: KVClient, cluster: str, operators, kubeconfig: str, crds: None
) -> None:
    """An ID above 255 with maxConnectedClusters 511, and Cilium's has-cluster-config key."""
    apply_object(kubeconfig, {"apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh",
                              "metadata": {"name": f"mesh-{cluster}"},
                              "spec": {"localCluster": {"name": cluster, "id": 300}, "maxConnectedClusters": 511}})
    operators(cluster_id=300)

    def written() -> None:
        raw = kv.get(schema.cluster_config_key(cluster))
        assert raw is not None
        # The MCS-API CRDs are installed (crds/): peers may wait for this cluster's ServiceExports.
        assert json.loads(raw) == {"id": 300, "capabilities": {"syncedCanaries": True, "maxConnectedClusters": 511,
                                                               "serviceExportsEnabled": True}}
        assert kv.get(schema.HAS_CLUSTER_CONFIG_KEY) == "true"
    eventually(written, timeout=30)


def test_a_rotated_secret_reconnects_the_remote(
    kv: KVClient, etcd_server, etcd_proxy_factory, cluster: str, operators, kubeconfig: str
) -> None:
    """The remote's Secret first holds a CA the (plain-text) proxy cannot satisfy; rotating it
    makes the operator connect again, without a restart."""
    kv.put("rot/" + schema.cluster_config_key("rot"), schema.ClusterConfig(43).encode())
    for prefix in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
        kv.put("rot/" + schema.synced_key("rot", prefix), schema.rfc3339_now())
    proxy = etcd_proxy_factory(etcd_server.url, namespace="rot/")
    secret = f"access-{cluster}"
    apply_object(kubeconfig, {"apiVersion": "v1", "kind": "Secret",
                              "metadata": {"name": secret, "namespace": "default"},
                              "data": {"ca.crt": base64.b64encode(b"not a certificate").decode()}})
    try:
        operators()
        mesh = f"mesh-{cluster}"
        eventually(lambda: _assert_true(subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "clustermesh",
                                                        mesh], capture_output=True).returncode == 0))
        entry = {"name": "rot", "id": 43, "endpoints": [proxy.url],
                 "tls": {"secretName": secret, "secretNamespace": "default"}}
        kubectl(kubeconfig, "patch", "clustermesh", mesh, "--type=merge", "-p",
                json.dumps({"spec": {"clusters": [entry]}}))

        def remote_status() -> dict[str, Any]:
            out = kubectl(kubeconfig, "get", "clustermesh", mesh, "-o", "json")
            remotes = (json.loads(out).get("status") or {}).get("remotes") or []
            assert len(remotes) == 1
            return dict(remotes[0])

        eventually(lambda: _assert_eq({k: remote_status()[k] for k in ("connected", "ready")},
                                      {"connected": False, "ready": False}), timeout=30)
        kubectl(kubeconfig, "patch", "secret", secret, "-n", "default", "--type=json", "-p",
                json.dumps([{"op": "remove", "path": "/data/ca.crt"}]))
        eventually(lambda: _assert_eq(remote_status(), {"name": "rot", "connected": True, "ready": True,
                                                        "services": 0, "nodes": 0}), timeout=40)
    finally:
        kubectl(kubeconfig, "delete", "secret", secret, "-n", "default", "--ignore-not-found")


def test_a_paused_operator_keeps_its_records(api: KubeAPI, kv: KVClient, namespace: str, cluster: str,
                                             operators) -> None:
    """SIGSTOP (a long GC pause, a frozen node) for longer than the old 15 s lease, with the
    default settings: the records stay, and the operator carries on when it resumes."""
    api.create(service(namespace, "a", GLOBAL))
    api.create(endpoint_slice(namespace, "a-1", "a", [("10.244.9.1", True)]))
    op = operators()
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"a"}))
    assert op.proc is not None
    op.proc.send_signal(signal.SIGSTOP)
    paused = time.monotonic()
    try:
        while time.monotonic() - paused < 17:
            assert set(records(kv, cluster, namespace)) == {"a"}, f"gone {time.monotonic() - paused:.1f}s in"
            assert kv.get(schema.cluster_config_key(cluster)) is not None
            time.sleep(0.5)
    finally:
        op.proc.send_signal(signal.SIGCONT)
    api.create(service(namespace, "b", GLOBAL))
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"a", "b"}))


def test_sigterm_leaves_the_records_to_the_lease_and_the_next_operator_takes_them_over(
        api: KubeAPI, kv: KVClient, namespace: str, cluster: str, operators) -> None:
    """A rolling update: SIGTERM ends the operator cleanly (exit 0) without revoking its lease, so
    the records stay for the next one, which writes them under a lease of its own."""
    api.create(service(namespace, "a", GLOBAL))
    api.create(endpoint_slice(namespace, "a-1", "a", [("10.244.9.1", True)]))
    first = operators()
    eventually(lambda: _assert_eq(set(records(kv, cluster, namespace)), {"a"}))
    key = schema.service_key(cluster, namespace, "a")
    lease = kv.list_prefix(key).items[key].lease
    assert first.proc is not None
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0, "a clean stop"
    assert set(records(kv, cluster, namespace)) == {"a"}, "records left to the lease"
    assert kv.lease_ttl(lease) > 0, "the lease was not revoked"
    operators()
    eventually(lambda: _assert_eq(kv.list_prefix(key).items[key].lease != lease, True), timeout=30)
    assert set(records(kv, cluster, namespace)) == {"a"}
