"""The ClusterMesh CRD on a real kube-apiserver, and kubectl against the fixture."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "clustermesh.yaml"


def kubectl(kubeconfig: str, *args: str, stdin: str | None = None, check: bool = True):
    return subprocess.run(
        ["kubectl", "--kubeconfig", kubeconfig, *args],
        input=stdin, capture_output=True, text=True, check=check, timeout=60,
    )


def test_kubectl_get_ns(kubeconfig: str) -> None:
    out = kubectl(kubeconfig, "get", "ns", "-o", "name").stdout.split()
    assert "namespace/default" in out
    assert "namespace/kube-system" in out


@pytest.fixture(scope="module")
def crd(kubeconfig: str) -> str:
    kubectl(kubeconfig, "apply", "-f", str(CRD))
    kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/clustermeshes.clustermesh.io",
            "--timeout=60s")
    return kubeconfig


def mesh(name: str = "default", local: dict | None = None, clusters: list | None = None) -> dict:
    spec: dict = {"localCluster": local if local is not None else {"name": "cluster-1", "id": 1}}
    if clusters is not None:
        spec["clusters"] = clusters
    return {"apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh",
            "metadata": {"name": name}, "spec": spec}


def test_valid_clustermesh_round_trips(crd: str) -> None:
    obj = mesh("valid", clusters=[
        {"name": "cluster-2", "id": 2, "endpoints": ["https://127.0.0.1:32379"],
         "tls": {"secretName": "cluster-2-tls", "secretNamespace": "kube-system"}},
        {"name": "c3", "id": 255, "endpoints": ["http://10.0.0.3:2379"]},
    ])
    kubectl(crd, "apply", "-f", "-", stdin=json.dumps(obj))
    got = json.loads(kubectl(crd, "get", "clustermesh", "valid", "-o", "json").stdout)
    assert got["spec"] == obj["spec"]
    table = kubectl(crd, "get", "clustermesh", "valid").stdout
    header = table.splitlines()[0].split()
    assert header[:3] == ["NAME", "CLUSTER", "ID"]
    row = table.splitlines()[1].split()
    assert row[:3] == ["valid", "cluster-1", "1"]
    kubectl(crd, "delete", "clustermesh", "valid")


INVALID = {
    "id 0": mesh("bad", local={"name": "cluster-1", "id": 0}),
    "id 512": mesh("bad", local={"name": "cluster-1", "id": 512}),
    "uppercase name": mesh("bad", local={"name": "Cluster1", "id": 1}),
    "name ends with dash": mesh("bad", local={"name": "cluster-", "id": 1}),
    "name too long": mesh("bad", local={"name": "c" * 33, "id": 1}),
    "missing id": mesh("bad", local={"name": "cluster-1"}),
    "missing localCluster": {**mesh("bad"), "spec": {}},
    "missing spec": {k: v for k, v in mesh("bad").items() if k != "spec"},
    "remote without endpoints": mesh("bad", clusters=[{"name": "c2", "id": 2}]),
    "remote with empty endpoints": mesh("bad", clusters=[{"name": "c2", "id": 2, "endpoints": []}]),
    "remote with bad endpoint": mesh("bad", clusters=[{"name": "c2", "id": 2, "endpoints": ["etcd:2379"]}]),
    "remote id 600": mesh("bad", clusters=[{"name": "c2", "id": 600, "endpoints": ["http://a:1"]}]),
    "duplicate remote name": mesh("bad", clusters=[
        {"name": "c2", "id": 2, "endpoints": ["http://a:1"]},
        {"name": "c2", "id": 3, "endpoints": ["http://b:1"]},
    ]),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_clustermesh_is_rejected_by_the_server(crd: str, case: str) -> None:
    result = kubectl(crd, "create", "-f", "-", stdin=json.dumps(INVALID[case]), check=False)
    assert result.returncode != 0, f"{case} was accepted"
    assert "invalid" in result.stderr.lower() or "required" in result.stderr.lower(), result.stderr
    assert kubectl(crd, "get", "clustermesh", "bad", check=False).returncode != 0


def test_crd_file_is_a_structural_v1_crd() -> None:
    doc = yaml.safe_load(CRD.read_text())
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["spec"]["scope"] == "Cluster"
