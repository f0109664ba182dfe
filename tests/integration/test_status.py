"""`clustermesh status` against a real API server and real remote stores (etcd behind grpc-proxy)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from clustermesh import schema
from clustermesh.kvstore import KVClient
from clustermesh.lab.servers import free_port
from clustermesh.schema import ClusterConfig, ClusterService, Node
from tests.integration.test_operator import REPO
from tests.kubectl import apply_crds, apply_object, kubectl


def status(kubeconfig: str, mesh: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clustermesh.cli", "status", "--kubeconfig", kubeconfig, "--clustermesh", mesh,
         *extra], capture_output=True, text=True, timeout=120, cwd=REPO,
    )


def status_process(kubeconfig: str, mesh: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "clustermesh.cli", "status", "--kubeconfig", kubeconfig, "--clustermesh", mesh,
         *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )


def publish(kv: KVClient, prefix: str, cluster: str, cid: int, services: int = 1, nodes: int = 0,
            synced: bool = True) -> None:
    """What a remote operator writes, under the store prefix its grpc-proxy exposes."""
    puts = {prefix + schema.cluster_config_key(cluster): ClusterConfig(cid).encode()}
    for i in range(services):
        puts[prefix + schema.service_key(cluster, "ns", f"svc-{i}")] = ClusterService(
            cluster, "ns", f"svc-{i}", cid).encode()
    for i in range(nodes):
        puts[prefix + schema.node_key(cluster, f"node-{i}")] = Node(f"node-{i}", cluster, cid).encode()
    if synced:
        for p in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
            puts[prefix + schema.synced_key(cluster, p)] = schema.rfc3339_now()
    kv.apply(puts, [])


@pytest.fixture
def mesh_name(kubeconfig: str) -> Iterator[str]:
    apply_crds(kubeconfig)
    name = f"mesh-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "delete", "clustermesh", name, "--ignore-not-found"],
                       capture_output=True, timeout=60)


def apply_mesh(kubeconfig: str, name: str, clusters: list[dict]) -> None:
    apply_object(kubeconfig, {
        "apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh", "metadata": {"name": name},
        "spec": {"localCluster": {"name": "cluster-1", "id": 1}, "clusters": clusters}})


def test_status_reports_each_remote(kubeconfig: str, kv: KVClient, etcd_server, etcd_proxy_factory,
                                    mesh_name: str) -> None:
    publish(kv, "c2/", "cluster-2", 2)
    # A record an agent would refuse: its warning must not end up in the output.
    kv.put("c2/" + schema.service_key("cluster-2", "ns", "broken"), "{not json")
    proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
    apply_mesh(kubeconfig, mesh_name, [
        {"name": "cluster-2", "id": 2, "endpoints": [proxy.url]},
        {"name": "cluster-3", "id": 3, "endpoints": [f"http://127.0.0.1:{free_port()}"]},
        {"name": "cluster-4", "id": 2, "endpoints": [proxy.url]},
    ])
    kubectl(kubeconfig, "patch", "clustermesh", mesh_name, "--subresource", "status", "--type", "merge", "-p",
            json.dumps({"status": {"exportedServices": 5, "exportedNodes": 1, "conditions": [
                {"type": "Synced", "status": "True", "reason": "Synced", "message": "5 services"}]}}))

    res = status(kubeconfig, mesh_name)
    assert res.returncode == 1, res.stdout + res.stderr  # not every remote is ready
    lines = res.stdout.splitlines()
    assert lines[0] == "cluster cluster-1 (id 1): store reachable=Unknown, synced=True, exported 5 services and 1 nodes"
    assert lines[1].split()[0] == "REMOTE"
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert sorted(rows) == ["cluster-2", "cluster-3", "cluster-4"], "stdout holds the table only"
    # The store counts keys: the broken record is there too (the agent skips it).
    assert rows["cluster-2"][3:] == ["yes", "yes", "2", "0"]
    assert rows["cluster-3"][3:7] == ["no", "no", "-", "-"]
    assert "already used by cluster-2" in " ".join(rows["cluster-4"])
    assert "not ready: cluster-3:" in res.stderr and "cluster-4: refused" in res.stderr

    res = status(kubeconfig, mesh_name, "--output", "json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)  # nothing else on stdout
    assert doc["localCluster"] == {"name": "cluster-1", "id": 1}
    assert doc["operator"]["exportedServices"] == 5
    assert doc["operator"]["conditions"][0]["type"] == "Synced"
    by_name = {r["name"]: r for r in doc["remotes"]}
    assert by_name["cluster-2"] == {"name": "cluster-2", "id": 2, "endpoint": proxy.url, "connected": True,
                                    "ready": True, "reason": None, "services": 2, "nodes": 0}
    assert by_name["cluster-3"]["connected"] is False and by_name["cluster-3"]["ready"] is False
    assert by_name["cluster-3"]["reason"] and by_name["cluster-3"]["services"] is None
    assert doc["ready"] is False


def test_status_counts_a_large_remote_without_reading_it(kubeconfig: str, kv: KVClient, etcd_server,
                                                         etcd_proxy_factory, mesh_name: str) -> None:
    publish(kv, "big/", "cluster-2", 2, services=10_000, nodes=3)
    proxy = etcd_proxy_factory(etcd_server.url, namespace="big/")
    apply_mesh(kubeconfig, mesh_name, [{"name": "cluster-2", "id": 2, "endpoints": [proxy.url]}])
    started = time.monotonic()
    res = status(kubeconfig, mesh_name, "-o", "json")
    took = time.monotonic() - started
    print(f"clustermesh status against a remote with 10,000 services: {took:.2f}s (whole command)")
    assert res.returncode == 0, res.stdout + res.stderr
    (remote,) = json.loads(res.stdout)["remotes"]
    assert (remote["connected"], remote["ready"], remote["services"], remote["nodes"]) == (True, True, 10_000, 3)


def test_wait_until_ready_or_say_why_not(kubeconfig: str, kv: KVClient, etcd_server, etcd_proxy_factory,
                                         mesh_name: str) -> None:
    publish(kv, "w/", "cluster-2", 2, services=3, synced=False)
    proxy = etcd_proxy_factory(etcd_server.url, namespace="w/")
    apply_mesh(kubeconfig, mesh_name, [{"name": "cluster-2", "id": 2, "endpoints": [proxy.url]}])

    res = status(kubeconfig, mesh_name, "--wait", "--timeout", "1.5")
    assert res.returncode == 1
    assert "not ready after 1.5s: cluster-2: waiting for synced markers" in res.stderr, res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()[2:]}
    assert rows["cluster-2"][3:7] == ["yes", "no", "3", "0"], "connected, counted, not ready"

    waiting = status_process(kubeconfig, mesh_name, "--wait", "--timeout", "60", "-o", "json")
    try:
        # It found the remote not ready (and says so on stderr) ...
        assert waiting.stderr is not None
        line = waiting.stderr.readline()
        assert "waiting for cluster-2: waiting for synced markers" in line, line
        # ... keeps polling, and ends once the remote's operator writes its synced markers.
        publish(kv, "w/", "cluster-2", 2, services=3)
        out, err = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 0, err
    assert json.loads(out)["remotes"][0]["ready"] is True


def test_status_warns_about_a_store_certificate_near_its_end(kubeconfig: str, mesh_name: str, tmp_path) -> None:
    """Certificates issued for 20 days by `clustermesh certs`, in the cluster as deploy/ mounts them:
    status names each one within 30 days of its end, and still exits 0 (a warning, not a failure)."""
    import datetime as dt

    from clustermesh.certs import CertsConfig, make_secrets
    from clustermesh.kube import KubeClient

    kube = KubeClient(kubeconfig)
    kube.ensure_namespace("clustermesh-system")
    short = CertsConfig("cluster-1", readers=("cluster-2",), leaf_lifetime=dt.timedelta(days=20),
                        renew_before=dt.timedelta(days=5))
    docs = make_secrets(short, tmp_path / "pki")
    for doc in docs:
        kube.put_secret(doc.namespace, doc.name, doc.data, labels=doc.labels)
    try:
        apply_object(kubeconfig, {"apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh",
                                  "metadata": {"name": mesh_name},
                                  "spec": {"localCluster": {"name": "cluster-1", "id": 1}}})
        res = status(kubeconfig, mesh_name)
        assert res.returncode == 0, res.stderr
        for name in ("store etcd.crt", "store proxy.crt", "store root.crt", "reader cluster-2 tls.crt"):
            assert f"warning: certificate {name} expires in 19.9 days" in res.stdout \
                or f"warning: certificate {name} expires in 20 days" in res.stdout, res.stdout
        assert "store ca.crt" not in res.stdout  # 1095 days: nothing to say
        doc = json.loads(status(kubeconfig, mesh_name, "--output", "json").stdout)
        states = {c["name"]: c["state"] for c in doc["certificates"]}
        assert states["store ca.crt"] == "ok" and states["store proxy.crt"] == "expiring"
    finally:
        for doc in docs:
            kubectl(kubeconfig, "-n", doc.namespace, "delete", "secret", doc.name, "--ignore-not-found")
