"""`clustermesh connect` on a real API server (two ClusterMesh objects stand for two clusters)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid

import pytest

from clustermesh.connect import connect, load_side
from clustermesh.kube import KubeClient, KubeError
from tests.integration.test_operator import REPO
from tests.kubectl import apply_crds, apply_object, kubectl


def mesh(name: str, cluster: str, cid: int, access: bool = True) -> dict:
    spec: dict = {"localCluster": {"name": cluster, "id": cid}}
    if access:
        spec["access"] = {"endpoints": [f"https://127.0.0.1:{40000 + cid}"],
                          "tls": {"secretName": f"access-{cluster}", "secretNamespace": "kube-system"}}
    return {"apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh", "metadata": {"name": name}, "spec": spec}


def run(kubeconfig: str, a: str, b: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clustermesh.cli", "connect", "--kubeconfig", kubeconfig, "--clustermesh", a,
         "--destination-clustermesh", b, *extra], capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def test_connect_wires_both_sides_and_copies_credentials(kubeconfig: str) -> None:
    apply_crds(kubeconfig)
    tag = uuid.uuid4().hex[:6]
    a, b, c = f"east-{tag}", f"west-{tag}", f"clash-{tag}"
    kube = KubeClient(kubeconfig)
    for cluster, secret in ((a, b"pw-a"), (b, b"pw-b")):
        kube.put_secret("kube-system", f"access-{cluster}", {"ca.crt": b"CA", "username": b"remote",
                                                              "password": secret})
    apply_object(kubeconfig, mesh(a, a, 11))
    apply_object(kubeconfig, mesh(b, b, 12))
    res = run(kubeconfig, a, b)
    assert res.returncode == 0, res.stderr
    spec_a = json.loads(kubectl(kubeconfig, "get", "clustermesh", a, "-o", "json"))["spec"]
    spec_b = json.loads(kubectl(kubeconfig, "get", "clustermesh", b, "-o", "json"))["spec"]
    assert spec_a["clusters"] == [{"name": b, "id": 12, "endpoints": ["https://127.0.0.1:40012"],
                                   "tls": {"secretName": f"clustermesh-remote-{b}", "secretNamespace": "kube-system"}}]
    assert [c["name"] for c in spec_b["clusters"]] == [a]
    copied = json.loads(kubectl(kubeconfig, "get", "secret", "-n", "kube-system", f"clustermesh-remote-{b}",
                                "-o", "json"))["data"]
    assert base64.b64decode(copied["password"]) == b"pw-b"

    assert run(kubeconfig, a, b).returncode == 0, "connecting again changes nothing"
    spec_a = json.loads(kubectl(kubeconfig, "get", "clustermesh", a, "-o", "json"))["spec"]
    assert len(spec_a["clusters"]) == 1

    apply_object(kubeconfig, mesh(c, c, 12))  # the same ID as west
    res = run(kubeconfig, a, c)
    assert res.returncode == 1 and "already used by" in res.stderr
    apply_object(kubeconfig, mesh(c, c, 13, access=False))
    res = run(kubeconfig, a, c)
    assert res.returncode == 1 and "spec.access.endpoints" in res.stderr
    # A side read before someone else changed it: the write is refused, not lost in a merge.
    stale = load_side(kube, a)
    kubectl(kubeconfig, "annotate", "clustermesh", a, "touched=yes")
    with pytest.raises(KubeError, match="changed while connecting"):
        connect(stale, load_side(kube, b), both_ways=False)
    for name in (a, b, c):
        kubectl(kubeconfig, "delete", "clustermesh", name)
