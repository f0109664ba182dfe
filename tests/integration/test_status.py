"""`clustermesh status` against a real API server and a real remote store."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from clustermesh import schema
from clustermesh.kvstore import KVClient
from clustermesh.lab.servers import free_port
from clustermesh.schema import ClusterConfig, ClusterService
from tests.integration.test_operator import REPO
from tests.kubectl import apply_crds


def test_status_reports_each_remote(kubeconfig: str, kv: KVClient, etcd_server, etcd_proxy_factory) -> None:
    apply_crds(kubeconfig)
    kv.put("c2/" + schema.cluster_config_key("cluster-2"), ClusterConfig(2).encode())
    kv.put("c2/" + schema.service_key("cluster-2", "ns", "echo"), ClusterService("cluster-2", "ns", "echo", 2).encode())
    for prefix in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
        kv.put("c2/" + schema.synced_key("cluster-2", prefix), schema.rfc3339_now())
    proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
    mesh = f"mesh-{uuid.uuid4().hex[:8]}"
    obj = {"apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh", "metadata": {"name": mesh},
           "spec": {"localCluster": {"name": "cluster-1", "id": 1},
                    "clusters": [{"name": "cluster-2", "id": 2, "endpoints": [proxy.url]},
                                 {"name": "cluster-3", "id": 3, "endpoints": [f"http://127.0.0.1:{free_port()}"]},
                                 {"name": "cluster-4", "id": 2, "endpoints": [proxy.url]}]}}
    subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "apply", "-f", "-"], input=json.dumps(obj).encode(),
                   check=True, capture_output=True)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "clustermesh.cli", "status", "--kubeconfig", kubeconfig, "--clustermesh", mesh,
             "--timeout", "6"], capture_output=True, text=True, timeout=60, cwd=REPO,
        )
        assert res.returncode == 1, res.stdout + res.stderr  # not every remote is ready
        lines = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.startswith("cluster-")}
        assert lines["cluster-2"][3:6] == ["yes", "yes", "1"]
        assert lines["cluster-3"][3:5] == ["no", "no"]
        assert "already used by cluster-2" in " ".join(lines["cluster-4"])
        assert res.stdout.startswith("cluster cluster-1 (id 1)")
    finally:
        subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "delete", "clustermesh", mesh], capture_output=True)
