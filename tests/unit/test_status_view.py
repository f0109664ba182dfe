"""What `clustermesh status` shows: the consistency rules, the JSON shape, the table."""

from __future__ import annotations

import json

import pytest

from clustermesh.agent.status_view import (
    RemoteFinding,
    not_ready,
    remote_view,
    render_text,
    status_document,
)

MESH = {
    "spec": {"localCluster": {"name": "cluster-1", "id": 1}},
    "status": {
        "conditions": [
            {"type": "StoreReachable", "status": "True", "reason": "Reachable", "message": "http://127.0.0.1:2379",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Synced", "status": "True", "reason": "Synced", "message": "3 services and 2 nodes"},
        ],
        "exportedServices": 3,
        "exportedNodes": 2,
        "lastSyncTime": "2026-01-01T00:00:01Z",
        "remoteClusters": "cluster-2",
    },
}


@pytest.mark.parametrize(
    ("finding", "connected", "ready", "reason", "services"),
    [
        # The store answered and nothing is missing: ready, with the store's counts.
        (RemoteFinding("c2", 2, "http://e", services=10_000, nodes=3), True, True, None, 10_000),
        # The store answered but the agent would not trust it yet.
        (RemoteFinding("c2", 2, "http://e", not_ready="waiting for synced markers of services", services=5,
                       nodes=0), True, False, "waiting for synced markers of services", 5),
        # Not reachable: never ready, whatever else the finding says, and no counts.
        (RemoteFinding("c2", 2, "http://e", error="etcd unreachable", not_ready=None, services=7_997, nodes=1),
         False, False, "etcd unreachable", None),
        (RemoteFinding("c2", 2, None, error="refused: cluster ID 2 is already used by c3"),
         False, False, "refused: cluster ID 2 is already used by c3", None),
    ],
)
def test_remote_view_never_contradicts_itself(
    finding: RemoteFinding, connected: bool, ready: bool, reason: str | None, services: int | None
) -> None:
    view = remote_view(finding)
    assert (view["connected"], view["ready"], view["reason"], view["services"]) == (
        connected, ready, reason, services)
    assert not (view["ready"] and not view["connected"])
    assert (view["reason"] is None) == view["ready"], "a reason exactly when not ready"


def test_document_has_the_documented_shape() -> None:
    doc = status_document(MESH, [
        RemoteFinding("cluster-3", 3, "http://127.0.0.1:3", error="etcd unreachable"),
        RemoteFinding("cluster-2", 2, "http://127.0.0.1:2", services=10_000, nodes=2),
    ])
    assert doc == {
        "format": 1,
        "localCluster": {"name": "cluster-1", "id": 1},
        "operator": {
            "conditions": [
                {"type": "StoreReachable", "status": "True", "reason": "Reachable",
                 "message": "http://127.0.0.1:2379"},
                {"type": "Synced", "status": "True", "reason": "Synced", "message": "3 services and 2 nodes"},
            ],
            "exportedServices": 3, "exportedNodes": 2, "lastSyncTime": "2026-01-01T00:00:01Z",
        },
        "remotes": [
            {"name": "cluster-2", "id": 2, "endpoint": "http://127.0.0.1:2", "connected": True, "ready": True,
             "reason": None, "services": 10_000, "nodes": 2},
            {"name": "cluster-3", "id": 3, "endpoint": "http://127.0.0.1:3", "connected": False, "ready": False,
             "reason": "etcd unreachable", "services": None, "nodes": None},
        ],
        "certificates": [],
        "ready": False,
    }
    assert json.loads(json.dumps(doc)) == doc


def test_ready_only_when_every_remote_is() -> None:
    ok = RemoteFinding("c2", 2, "e", services=1, nodes=1)
    assert status_document(MESH, [ok])["ready"] is True
    assert status_document(MESH, [ok, RemoteFinding("c3", 3, "e", not_ready="no cluster-config")])["ready"] is False
    assert status_document(MESH, [])["ready"] is True, "nothing to wait for"


def test_operator_view_tolerates_a_missing_or_odd_status() -> None:
    doc = status_document({"spec": {"localCluster": {"name": "c1", "id": "x"}},
                           "status": {"exportedServices": True, "conditions": [{"status": "True"}, "junk"]}}, [])
    assert doc["localCluster"] == {"name": "c1", "id": None}
    assert doc["operator"] == {"conditions": [], "exportedServices": None, "exportedNodes": None,
                               "lastSyncTime": None}
    assert status_document({}, [])["operator"]["conditions"] == []


def test_not_ready_names_each_remote_and_why() -> None:
    doc = status_document(MESH, [RemoteFinding("c2", 2, "e", services=1, nodes=1),
                                 RemoteFinding("c3", 3, "e", not_ready="no cluster-config"),
                                 RemoteFinding("c4", 4, "e", error="etcd unreachable")])
    assert not_ready(doc) == ["c3: no cluster-config", "c4: etcd unreachable"]


def test_text_is_the_headline_and_one_row_per_remote() -> None:
    doc = status_document(MESH, [
        RemoteFinding("cluster-2", 2, "http://127.0.0.1:2", services=10_000, nodes=2),
        RemoteFinding("cluster-3", 3, "http://127.0.0.1:3", error="GET failed:\n  connection refused"),
    ])
    lines = render_text(doc).splitlines()
    assert lines[0] == ("cluster cluster-1 (id 1): store reachable=True, synced=True, "
                        "exported 3 services and 2 nodes")
    assert lines[1].split() == ["REMOTE", "ID", "ENDPOINT", "CONNECTED", "READY", "SERVICES", "NODES", "REASON"]
    assert lines[2].split() == ["cluster-2", "2", "http://127.0.0.1:2", "yes", "yes", "10000", "2"]
    # A multi-line error stays on its row: nothing but rows below the header.
    assert lines[3].split() == ["cluster-3", "3", "http://127.0.0.1:3", "no", "no", "-", "-", "GET", "failed:",
                                "connection", "refused"]
    assert len(lines) == 4


def test_text_without_remotes_or_operator_status() -> None:
    text = render_text(status_document({"spec": {"localCluster": {"name": "c1", "id": 1}}}, []))
    assert text.splitlines() == [
        "cluster c1 (id 1): store reachable=Unknown, synced=Unknown, exported - services and - nodes",
        "no remote clusters in the ClusterMesh",
    ]


def test_status_never_dials_an_address_its_kubeconfig_marks_unroutable(tmp_path) -> None:
    """A lab's store endpoints live on its underlay, reachable only inside its node namespaces: from
    the host a connection would leave by the default route. The lab's kubeconfig says so (a cluster
    extension), and status dials nothing there; the product itself knows no lab address."""
    import json
    import socket

    from clustermesh.agent.status import probe_remote
    from clustermesh.kube import UNROUTABLE_EXTENSION, unroutable_networks
    from clustermesh.store.remote_config import RemoteConfig

    kubeconfig = tmp_path / "kubeconfig"
    cluster = {"server": "https://127.0.0.1:1", "extensions": [{"name": UNROUTABLE_EXTENSION, "extension": {
        "networks": ["192.168.100.0/24", "not-a-cidr"], "reason": "a lab address"}}]}
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "lab-1", "cluster": cluster}, {"name": "plain", "cluster": {"server": "https://x"}}],
        "contexts": [{"name": "lab-1", "context": {"cluster": "lab-1"}},
                     {"name": "other", "context": {"cluster": "plain"}}]}))
    marked = unroutable_networks(str(kubeconfig), "lab-1")
    assert [(str(n), r) for n, r in marked] == [("192.168.100.0/24", "a lab address")]
    assert unroutable_networks(str(kubeconfig), None) == []  # the current context's cluster has none
    assert unroutable_networks(str(tmp_path / "missing"), "lab-1") == []

    finding = probe_remote(RemoteConfig("lab-2", 2, ("http://192.168.100.21:32379",)), timeout=0.01,
                           unroutable=marked)
    assert finding.error is not None and "a lab address" in finding.error and "192.168.100.21" in finding.error
    # Outside the marked network it does dial: a listener on 127.0.0.1 sees the connection.
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(5)
        port = server.getsockname()[1]
        finding = probe_remote(RemoteConfig("lab-2", 2, (f"http://127.0.0.1:{port}",)), timeout=0.5,
                               unroutable=marked)
        conn, _ = server.accept()
        conn.close()
    assert finding.error is not None and "a lab address" not in finding.error


def test_the_lab_kubeconfig_marks_its_underlay_unroutable(tmp_path) -> None:
    import json

    from clustermesh.kube import unroutable_networks
    from clustermesh.lab.mesh import merged_kubeconfig
    from clustermesh.lab.netns import UNDERLAY_CIDR

    def one(name: str) -> dict:
        return {"apiVersion": "v1", "kind": "Config", "current-context": name,
                "clusters": [{"name": name, "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": f"{name}-admin", "user": {"token": "t"}}],
                "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-admin"}}]}

    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(merged_kubeconfig([one("lab-1"), one("lab-2")])))
    for context in ("lab-1", "lab-2", None):
        assert [str(n) for n, _ in unroutable_networks(str(path), context)] == [UNDERLAY_CIDR], context


def test_certificates_warn_30_days_before_and_fail_once_expired() -> None:
    import datetime as dt

    from clustermesh.agent.status_view import CertificateFinding, certificate_lines

    at = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    certs = [CertificateFinding("remote c2 tls.crt", at + dt.timedelta(days=200)),
             CertificateFinding("store proxy.crt", at + dt.timedelta(days=29, hours=12)),
             CertificateFinding("store ca.crt", at + dt.timedelta(days=31))]
    doc = status_document(MESH, [], certs, at=at)
    assert [(c["name"], c["state"]) for c in doc["certificates"]] == [
        ("store proxy.crt", "expiring"), ("store ca.crt", "ok"), ("remote c2 tls.crt", "ok")]
    assert doc["ready"] is True, "a warning is not a failure"
    lines = certificate_lines(doc)
    assert len(lines) == 1 and lines[0].startswith("warning: certificate store proxy.crt expires in 29.5 days")
    assert "warning: certificate store proxy.crt" in render_text(doc)
    expired = status_document(MESH, [], [CertificateFinding("reader c2 tls.crt", at - dt.timedelta(hours=1))], at=at)
    assert expired["ready"] is False
    assert certificate_lines(expired)[0].startswith("error: certificate reader c2 tls.crt expired on 2026-12-31")
    assert not_ready(expired) == ["certificate reader c2 tls.crt expired"]


def test_with_the_cache_a_remote_is_what_the_store_pods_report_and_agents_count() -> None:
    from clustermesh.agent.status_view import agent_views, cached_finding

    ok = cached_finding("lab-2", 2, {"name": "lab-2", "connected": True, "ready": True, "services": 3, "nodes": 2})
    waiting = cached_finding("lab-3", 3, {"name": "lab-3", "connected": True, "ready": False,
                                          "lastFailure": "waiting for synced markers of nodes"})
    down = cached_finding("lab-4", 4, {"name": "lab-4", "connected": False, "lastFailure": "etcd unreachable"})
    unknown = cached_finding("lab-5", 5, None)
    pods = [{"spec": {"nodeName": "n2"}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}},
            {"spec": {"nodeName": "n1"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}]
    agents = agent_views(pods)
    assert agents == [{"node": "n1", "ready": True}, {"node": "n2", "ready": False}]
    doc = status_document(MESH, [ok, waiting, down, unknown], agents=agents)
    assert [(r["name"], r["ready"], r["reason"]) for r in doc["remotes"]] == [
        ("lab-2", True, None), ("lab-3", False, "waiting for synced markers of nodes"),
        ("lab-4", False, "etcd unreachable"), ("lab-5", False, "the store pods have not reported it yet")]
    assert doc["remotes"][0]["services"] == 3 and doc["remotes"][2]["services"] is None
    assert doc["ready"] is False and "agent on n2: not Ready" in not_ready(doc)
    assert "agents: 1/2 Ready (not: n2)" in render_text(doc)
    assert status_document(MESH, [ok], agents=agents[:1])["ready"] is True
