"""MCS-API's pure rules (cluster/mcs.py), after the mcs-api conformance suite's required cases:
what an export offers, how the exports of several clusters make one import (ports union, the oldest
export wins a conflict and the others say so), headless, session affinity, and the objects each
cluster gets (ServiceImport, derived Service, copied EndpointSlices)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from clustermesh.cluster import mcs
from clustermesh.schema import McsPort, ServiceExportRecord


def export(ns: str = "default", name: str = "web", created: str = "2025-01-01T00:00:00Z",
           **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name, "creationTimestamp": created}, "spec": spec}


def service(ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "default", "name": "web"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10",
                     "ports": ports if ports is not None else [{"name": "http", "port": 80, "protocol": "TCP"}],
                     **spec}}


def record(cluster: str, created: str, ports: tuple[McsPort, ...] = (McsPort(80, "TCP", "http"),),
           **kw: Any) -> ServiceExportRecord:
    return ServiceExportRecord(cluster, "default", "web", created, ports=ports, **kw).validate()


def test_derived_name_is_the_one_every_implementation_computes() -> None:
    # sha256("default/full"), base32hex, lowercased, first 10 characters (mcs-api's controller, Cilium)
    assert mcs.derived_name("default", "full") == "derived-9jo8ljlgl7"
    assert mcs.derived_name("default", "web") != mcs.derived_name("other", "web")


def test_an_export_without_its_service_is_not_valid() -> None:
    result = mcs.export_record("c1", export(), None)
    assert result.record is None
    assert (result.valid.status, result.valid.reason) == (False, "NoService")
    assert "default/web" in result.valid.message


def test_an_externalname_service_cannot_be_exported() -> None:
    result = mcs.export_record("c1", export(), service(type="ExternalName", externalName="example.org"))
    assert result.record is None and result.valid.reason == "InvalidServiceType"


def test_the_record_carries_what_the_import_needs() -> None:
    svc = service([{"name": "http", "port": 80, "protocol": "TCP", "appProtocol": "http", "targetPort": 8080}],
                  sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}},
                  ipFamilies=["IPv4"])
    result = mcs.export_record("c1", export(exportedLabels={"tier": "web"}), svc)
    assert result.valid.status and result.record is not None
    rec = result.record
    assert (rec.cluster, rec.namespace, rec.name) == ("c1", "default", "web")
    assert rec.export_created == "2025-01-01T00:00:00Z"
    assert rec.ports == (McsPort(80, "TCP", "http", "http"),)
    assert (rec.type, rec.session_affinity, rec.session_affinity_timeout) == ("ClusterSetIP", "ClientIP", 300)
    assert rec.labels == {"tier": "web"} and rec.ip_families == ("IPv4",)


def test_a_headless_service_exports_a_headless_import() -> None:
    result = mcs.export_record("c1", export(), service(clusterIP="None"))
    assert result.record is not None and result.record.type == "Headless"
    spec = mcs.merge_exports([result.record])
    assert mcs.service_import_spec(spec, "None")["ips"] == []  # never ["None"] (cilium#37053)
    assert mcs.derived_service(spec, "c1", True, None)["spec"]["clusterIP"] == "None"


def test_ports_are_the_union_of_every_export() -> None:
    a = record("c1", "2025-01-01T00:00:00Z", (McsPort(80, "TCP", "http"),))
    b = record("c2", "2025-01-02T00:00:00Z", (McsPort(80, "TCP", "http"), McsPort(9090, "TCP", "metrics")))
    spec = mcs.merge_exports([b, a])
    assert spec.ports == (McsPort(80, "TCP", "http"), McsPort(9090, "TCP", "metrics"))
    assert spec.clusters == ("c1", "c2") and not spec.conflicts


def test_a_port_conflict_goes_to_the_oldest_export_and_the_other_says_who_won() -> None:
    old = record("c2", "2025-01-01T00:00:00Z", (McsPort(80, "TCP", "http"),))
    new = record("c1", "2025-02-01T00:00:00Z", (McsPort(8080, "TCP", "http"),))
    spec = mcs.merge_exports([new, old])
    assert spec.winner == "c2" and spec.ports == (McsPort(80, "TCP", "http"),)
    assert "c1" in spec.conflicts and "c2" not in spec.conflicts
    (cond,) = spec.conflicts["c1"]
    assert cond.reason == "PortConflict" and "cluster c2" in cond.message


def test_the_same_creation_time_is_decided_by_the_cluster_name() -> None:
    a = record("c-a", "2025-01-01T00:00:00Z", type="Headless")
    b = record("c-b", "2025-01-01T00:00:00Z")
    spec = mcs.merge_exports([b, a])
    assert spec.winner == "c-a" and spec.type == "Headless"
    assert [c.reason for c in spec.conflicts["c-b"]] == ["TypeConflict"]


def test_session_affinity_is_the_oldest_exports_and_a_difference_is_a_conflict() -> None:
    old = record("c1", "2025-01-01T00:00:00Z", session_affinity="ClientIP", session_affinity_timeout=60)
    same = record("c2", "2025-01-02T00:00:00Z", session_affinity="ClientIP", session_affinity_timeout=60)
    other = record("c3", "2025-01-03T00:00:00Z")
    timeout = record("c4", "2025-01-04T00:00:00Z", session_affinity="ClientIP", session_affinity_timeout=30)
    spec = mcs.merge_exports([other, same, old, timeout])
    assert (spec.session_affinity, spec.session_affinity_timeout) == ("ClientIP", 60)
    assert set(spec.conflicts) == {"c3", "c4"}
    assert spec.conflicts["c3"][0].reason == "SessionAffinityConflict"
    assert spec.conflicts["c4"][0].reason == "SessionAffinityConfigConflict"
    body = mcs.service_import_spec(spec, "10.96.0.20")
    assert body["sessionAffinity"] == "ClientIP" and body["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] == 60
    assert mcs.derived_service(spec, "c1", False, None)["spec"]["sessionAffinity"] == "ClientIP"


def test_export_conditions() -> None:
    old = record("c1", "2025-01-01T00:00:00Z")
    new = record("c2", "2025-01-02T00:00:00Z", type="Headless")
    spec = mcs.merge_exports([old, new])
    ok = mcs.Condition("Valid", True, "Valid", "")
    winner = {c.type: c for c in mcs.export_conditions("c1", ok, spec)}
    loser = {c.type: c for c in mcs.export_conditions("c2", ok, spec)}
    assert winner["Ready"].status and not winner["Conflict"].status
    assert loser["Conflict"].status and loser["Conflict"].reason == "TypeConflict"
    assert "c1" in loser["Conflict"].message
    invalid = mcs.Condition("Valid", False, "NoService", "Service default/web not found")
    conds = {c.type: c for c in mcs.export_conditions("c1", invalid, None)}
    assert not conds["Valid"].status and not conds["Ready"].status


def test_the_import_and_the_derived_service() -> None:
    spec = mcs.merge_exports([record("c1", "2025-01-01T00:00:00Z")])
    imp = mcs.service_import(spec, "10.96.0.33")
    assert imp["spec"]["ips"] == ["10.96.0.33"] and imp["spec"]["type"] == "ClusterSetIP"
    assert imp["spec"]["ports"] == [{"name": "http", "port": 80, "protocol": "TCP"}]
    assert imp["status"] == {"clusters": [{"cluster": "c1"}]}
    assert imp["metadata"]["annotations"][mcs.DERIVED_SERVICE_ANNOTATION] == mcs.derived_name("default", "web")
    owner = {"apiVersion": mcs.API_VERSION, "kind": "ServiceImport", "metadata": {"name": "web", "uid": "u1"}}
    exporter = mcs.derived_service(spec, "c1", True, owner)
    other = mcs.derived_service(spec, "c2", False, owner)
    assert "selector" not in exporter["spec"]
    assert exporter["metadata"]["annotations"][mcs.GLOBAL_ANNOTATION] == "true"
    # Only a cluster that exports shares its endpoints with the set.
    assert exporter["metadata"]["annotations"][mcs.SHARED_ANNOTATION] == "true"
    assert other["metadata"]["annotations"][mcs.SHARED_ANNOTATION] == "false"
    assert exporter["metadata"]["labels"][mcs.LABEL_SERVICE_NAME] == "web"
    assert exporter["metadata"]["ownerReferences"][0]["uid"] == "u1"


def test_copied_slices_are_labelled_for_the_derived_service() -> None:
    source = {"metadata": {"name": "web-abcde"}, "addressType": "IPv4",
              "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
              "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}}]}
    out = mcs.mirrored_slices("c1", "default", "web", [source], "discovery.k8s.io/v1", None)
    (name, body), = out.items()
    derived = mcs.derived_name("default", "web")
    assert name.startswith(derived + "-")
    labels = body["metadata"]["labels"]
    assert labels[mcs.SERVICE_NAME_LABEL] == derived
    assert labels[mcs.LABEL_SOURCE_CLUSTER] == "c1" and labels[mcs.LABEL_SERVICE_NAME] == "web"
    assert labels[mcs.LABEL_MANAGED_BY] == mcs.MANAGED_BY
    assert body["endpoints"] == source["endpoints"] and body["ports"] == source["ports"]
    # The same source slice always gives the same copy's name (updates, not new slices).
    assert list(mcs.mirrored_slices("c1", "default", "web", [source], "discovery.k8s.io/v1", None)) == [name]


def test_same_content_ignores_what_the_api_server_adds() -> None:
    want = {"spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}, "metadata": {"labels": {"a": "1"}}}
    have = {"spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}],
                     "clusterIP": "10.96.0.1"}, "metadata": {"labels": {"a": "1", "b": "2"}}}
    assert mcs.same_content(have, want, ("metadata", "spec"))
    have["spec"]["ports"][0]["port"] = 81
    assert not mcs.same_content(have, want, ("metadata", "spec"))


def test_no_export_no_import() -> None:
    with pytest.raises(ValueError):
        mcs.merge_exports([])
    assert mcs.group_exports([]) == {}


# ---------------------------------------------------------------- the operator's snapshot of the set


class FakeRemote:
    def __init__(self, name: str, cid: int, usable: bool, exports: list[ServiceExportRecord] | None) -> None:
        self.name, self._usable, self._exports = name, usable, exports
        self.config = type("C", (), {"id": cid})()

    def usable(self, now: float) -> bool:
        return self._usable

    def export_records(self) -> list[ServiceExportRecord] | None:
        return self._exports

    def not_ready_reason(self) -> str | None:
        return None


class FakeMembers:
    def __init__(self, remotes: list[FakeRemote], awaiting: frozenset[int] = frozenset()) -> None:
        self.remotes, self.awaiting = remotes, awaiting

    def sources(self, now: float) -> list[FakeRemote]:
        return self.remotes

    def awaiting_first_sync(self) -> frozenset[int]:
        return self.awaiting


def controller(members: FakeMembers) -> Any:
    from clustermesh.cluster.state import ClusterState
    from clustermesh.operator.mcs import McsController

    c = McsController(None, ClusterState(), members, lambda: True)  # type: ignore[arg-type]
    c.cluster = "me"
    return c


def test_a_remote_whose_exports_are_unknown_holds_back_every_deletion() -> None:
    known = record("c2", "2025-01-01T00:00:00Z")
    snap = controller(FakeMembers([FakeRemote("c2", 2, True, [known]),
                                   FakeRemote("c3", 3, True, None)])).snapshot(0.0)
    assert set(snap.specs) == {("default", "web")} and snap.pending == frozenset({"c3"})
    # A remote of the first spec that has not been ready yet (a restarting operator) is unknown too.
    snap = controller(FakeMembers([FakeRemote("c2", 2, False, None)], awaiting=frozenset({2}))).snapshot(0.0)
    assert snap.pending == frozenset({"c2"}) and snap.specs == {}


def test_a_remote_past_its_grace_period_exports_nothing_and_holds_nothing_back() -> None:
    gone = record("c2", "2025-01-01T00:00:00Z")
    snap = controller(FakeMembers([FakeRemote("c2", 2, False, [gone])])).snapshot(0.0)
    assert snap.specs == {} and snap.pending == frozenset()


def test_how_each_remote_counts_is_logged_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    """Why an import lacks a cluster must be in the operator's log: each remote's state, when it changes."""
    known = record("c2", "2025-01-01T00:00:00Z")
    remote = FakeRemote("c2", 2, True, None)
    c = controller(FakeMembers([remote]))
    with caplog.at_level(logging.INFO, logger="clustermesh.operator.mcs"):
        c.snapshot(0.0)
        c.snapshot(0.5)
        remote._exports = [known]
        c.snapshot(1.0)
        remote._usable = False
        c.snapshot(1.5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["MCS-API: remote c2: not known yet: its ServiceExports are not listed in full (no synced marker)",
                     "MCS-API: remote c2: 1 exported",
                     "MCS-API: remote c2: not used: unreachable past its grace period"], lines
