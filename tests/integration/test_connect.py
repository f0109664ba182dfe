"""`clustermesh connect` on a real API server (two ClusterMesh objects stand for two clusters)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid

import pytest

from clustermesh.connect import ConnectError, connect, load_side
from clustermesh.kube import KubeClient
from tests.integration.test_operator import REPO
from tests.kubectl import apply_crds, apply_object, kubectl


def mesh(name: str, cluster: str, cid: int, access: bool = True) -> dict:
    spec: dict = {"localCluster": {"name": cluster, "id": cid}}
    if access:
        spec["access"] = {"endpoints": [f"https://127.0.0.1:{40000 + cid}"],
                          "tls": {"secretName": f"access-{cluster}", "secretNamespace": "kube-system"}}
    return {"apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh", "metadata": {"name": name}, "spec": spec}


def run(kubeconfig: str, a: str, b: str, *extra: str, command: str = "connect") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clustermesh.cli", command, "--kubeconfig", kubeconfig, "--clustermesh", a,
         "--destination-clustermesh", b, *extra], capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def test_connect_wires_both_sides_and_copies_credentials(kubeconfig: str) -> None:
    apply_crds(kubeconfig)
    tag = uuid.uuid4().hex[:6]
    a, b, c = f"east-{tag}", f"west-{tag}", f"clash-{tag}"
    kube = KubeClient(kubeconfig)
    for cluster, pw in ((a, b"pw-a"), (b, b"pw-b")):
        kube.put_secret("kube-system", f"access-{cluster}", {"ca.crt": b"CA", "username": b"remote",
                                                              "password": pw})
    apply_object(kubeconfig, mesh(a, a, 11))
    apply_object(kubeconfig, mesh(b, b, 12))
    res = run(kubeconfig, a, b)
    assert res.returncode == 0, res.stderr
    spec_a = json.loads(kubectl(kubeconfig, "get", "clustermesh", a, "-o", "json"))["spec"]
    spec_b = json.loads(kubectl(kubeconfig, "get", "clustermesh", b, "-o", "json"))["spec"]
    assert spec_a["clusters"] == [{"name": b, "id": 12, "endpoints": ["https://127.0.0.1:40012"],
                                   "tls": {"secretName": f"clustermesh-remote-{b}",
                                           "secretNamespace": "clustermesh-remotes"}}]
    assert [c["name"] for c in spec_b["clusters"]] == [a]
    copied = json.loads(kubectl(kubeconfig, "get", "secret", "-n", "clustermesh-remotes",
                                f"clustermesh-remote-{b}",
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
    # A side read before someone else changed its spec.clusters: the write is refused, not lost in a
    # merge, and the Secret already copied for it is taken back.
    d = f"north-{tag}"
    kube.put_secret("kube-system", f"access-{d}", {"ca.crt": b"CA", "password": b"pw-d"})
    apply_object(kubeconfig, mesh(d, d, 14))
    stale = load_side(kube, a)
    kubectl(kubeconfig, "patch", "clustermesh", a, "--type", "merge", "-p", json.dumps(
        {"spec": {"clusters": [*spec_a["clusters"], {"name": "hand-made", "id": 99,
                                                     "endpoints": ["https://127.0.0.1:40099"]}]}}))
    with pytest.raises(ConnectError, match="changed while connecting"):
        connect(stale, load_side(kube, d), both_ways=False)
    assert [c["name"] for c in spec(kubeconfig, a)["clusters"]] == [b, "hand-made"]
    assert secret(kubeconfig, f"clustermesh-remote-{d}") is None
    # A change elsewhere in the object (the operator's status updates do that all the time) only
    # moves resourceVersion: connect reads again and goes on.
    stale = load_side(kube, a)
    kubectl(kubeconfig, "annotate", "clustermesh", a, "touched=yes")
    connect(stale, load_side(kube, d), both_ways=False)
    assert [c["name"] for c in spec(kubeconfig, a)["clusters"]] == [b, "hand-made", d]
    for name in (a, b, c, d):
        kubectl(kubeconfig, "delete", "clustermesh", name)


def spec(kubeconfig: str, name: str) -> dict:
    return json.loads(kubectl(kubeconfig, "get", "clustermesh", name, "-o", "json"))["spec"]


def secret(kubeconfig: str, name: str) -> dict | None:
    """data and labels of a Secret in clustermesh-remotes, None when there is none."""
    res = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "secret", "-n", "clustermesh-remotes",
                          name,
                          "-o", "json", "--ignore-not-found"], capture_output=True, text=True, timeout=60, check=True)
    if not res.stdout.strip():
        return None
    obj = json.loads(res.stdout)
    return {"data": obj.get("data"), "labels": obj["metadata"].get("labels"), "immutable": obj.get("immutable")}


def two_sides(kubeconfig: str) -> tuple[str, str, KubeClient]:
    """Two clusters with access Secrets; the first already has a remote and a leftover copy of
    the second's Secret from an earlier connect, so "as before" is more than "empty"."""
    apply_crds(kubeconfig)
    tag = uuid.uuid4().hex[:6]
    a, b = f"east-{tag}", f"west-{tag}"
    kube = KubeClient(kubeconfig)
    for cluster, pw in ((a, b"pw-a"), (b, b"pw-b")):
        kube.put_secret("kube-system", f"access-{cluster}", {"ca.crt": b"CA", "password": pw})
    kube.ensure_namespace("clustermesh-remotes")
    kube.put_secret("clustermesh-remotes", f"clustermesh-remote-{b}", {"password": b"old"},
                    labels={"clustermesh.io/remote": b})
    first = mesh(a, a, 21)
    first["spec"]["clusters"] = [{"name": "elsewhere", "id": 30, "endpoints": ["https://127.0.0.1:40030"]}]
    apply_object(kubeconfig, first)
    apply_object(kubeconfig, mesh(b, b, 22))
    return a, b, kube


def test_connect_rolls_back_the_first_side_when_the_second_side_refuses_a_secret(kubeconfig: str) -> None:
    a, b, _kube = two_sides(kubeconfig)
    # The second side cannot take a's Secret: an immutable Secret of that name is in the way.
    kubectl(kubeconfig, "apply", "-f", "-", stdin=json.dumps({
        "apiVersion": "v1", "kind": "Secret", "immutable": True, "type": "Opaque",
        "metadata": {"name": f"clustermesh-remote-{a}", "namespace": "clustermesh-remotes"},
        "data": {"password": base64.b64encode(b"hand").decode()}}))
    before = {"a": spec(kubeconfig, a), "b": spec(kubeconfig, b),
              "a-copy": secret(kubeconfig, f"clustermesh-remote-{b}"),
              "b-copy": secret(kubeconfig, f"clustermesh-remote-{a}")}
    res = run(kubeconfig, a, b)
    assert res.returncode == 1, res.stdout
    assert f"clustermesh-remote-{a} in {b}" in res.stderr and "both sides are as before" in res.stderr, res.stderr
    after = {"a": spec(kubeconfig, a), "b": spec(kubeconfig, b),
             "a-copy": secret(kubeconfig, f"clustermesh-remote-{b}"),
             "b-copy": secret(kubeconfig, f"clustermesh-remote-{a}")}
    assert after == before
    assert base64.b64decode(after["a-copy"]["data"]["password"]) == b"old"
    for name in (a, b):
        kubectl(kubeconfig, "delete", "clustermesh", name)
    kubectl(kubeconfig, "delete", "secret", "-n", "clustermesh-remotes", f"clustermesh-remote-{a}",
            f"clustermesh-remote-{b}")


def test_connect_rolls_back_the_first_side_when_the_second_side_changed(kubeconfig: str) -> None:
    a, b, kube = two_sides(kubeconfig)
    first, second = load_side(kube, a), load_side(kube, b)
    # Someone edits the second side's clusters after connect read it: its patch is refused
    # (after both Secrets and the first side's entry were written).
    kubectl(kubeconfig, "patch", "clustermesh", b, "--type", "merge", "-p", json.dumps(
        {"spec": {"clusters": [{"name": "hand-made", "id": 99, "endpoints": ["https://127.0.0.1:40099"]}]}}))
    before = {"a": spec(kubeconfig, a), "b": spec(kubeconfig, b),
              "a-copy": secret(kubeconfig, f"clustermesh-remote-{b}"),
              "b-copy": secret(kubeconfig, f"clustermesh-remote-{a}")}
    with pytest.raises(ConnectError, match=r"changed while connecting.*both sides are as before"):
        connect(first, second)
    after = {"a": spec(kubeconfig, a), "b": spec(kubeconfig, b),
             "a-copy": secret(kubeconfig, f"clustermesh-remote-{b}"),
             "b-copy": secret(kubeconfig, f"clustermesh-remote-{a}")}
    assert after == before
    assert before["b-copy"] is None and before["a-copy"] is not None
    for name in (a, b):
        kubectl(kubeconfig, "delete", "clustermesh", name)
    kubectl(kubeconfig, "delete", "secret", "-n", "clustermesh-remotes", f"clustermesh-remote-{b}")


def test_disconnect_undoes_connect_on_both_sides_and_is_idempotent(kubeconfig: str) -> None:
    a, b, _kube = two_sides(kubeconfig)
    kubectl(kubeconfig, "delete", "secret", "-n", "clustermesh-remotes", f"clustermesh-remote-{b}")
    before = {"a": spec(kubeconfig, a), "b": spec(kubeconfig, b)}
    assert run(kubeconfig, a, b).returncode == 0
    assert secret(kubeconfig, f"clustermesh-remote-{b}") is not None

    res = run(kubeconfig, a, b, "--one-way", command="disconnect")
    assert res.returncode == 0, res.stderr
    assert spec(kubeconfig, a) == before["a"], "only b left a's spec.clusters; elsewhere stays"
    assert secret(kubeconfig, f"clustermesh-remote-{b}") is None
    assert [c["name"] for c in spec(kubeconfig, b)["clusters"]] == [a], "--one-way leaves the destination"

    res = run(kubeconfig, a, b, command="disconnect")
    assert res.returncode == 0, res.stderr
    assert f"removed {a} from {b}'s spec.clusters" in res.stdout
    assert spec(kubeconfig, a) == before["a"] and spec(kubeconfig, b).get("clusters") == []
    assert secret(kubeconfig, f"clustermesh-remote-{a}") is None

    res = run(kubeconfig, a, b, command="disconnect")
    assert res.returncode == 0, res.stderr
    assert "not connected; nothing to do" in res.stdout
    for name in (a, b):
        kubectl(kubeconfig, "delete", "clustermesh", name)


def test_connect_refuses_meshes_that_allow_different_cluster_ids(kubeconfig: str) -> None:
    """Cilium refuses a remote whose max-connected-clusters differs: IDs above 255 would mean
    different things on the two sides."""
    apply_crds(kubeconfig)
    tag = uuid.uuid4().hex[:6]
    a, b = f"wide-{tag}", f"narrow-{tag}"
    wide = mesh(a, a, 300)
    wide["spec"]["maxConnectedClusters"] = 511
    apply_object(kubeconfig, wide)
    apply_object(kubeconfig, mesh(b, b, 41))
    try:
        res = run(kubeconfig, a, b)
        assert res.returncode == 1
        assert "maxConnectedClusters" in res.stderr, res.stderr
        assert "clusters" not in spec(kubeconfig, a) and "clusters" not in spec(kubeconfig, b)
    finally:
        for name in (a, b):
            kubectl(kubeconfig, "delete", "clustermesh", name)
