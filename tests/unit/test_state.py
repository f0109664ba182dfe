"""ClusterState: events and listings, including the deletions a watch can miss."""

from __future__ import annotations

from typing import Any

from clustermesh.cluster.export import ClusterIdentity, export_service
from clustermesh.cluster.state import ClusterState, NodeRef, ServiceRef


def svc(name: str, rv: int, ns: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv)},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}


def es(name: str, service: str, rv: int, ip: str = "10.0.0.1", ns: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv),
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]}


def node(name: str, rv: int) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": str(rv)}, "spec": {"podCIDR": "10.244.1.0/24"}}


def test_events_return_what_to_export() -> None:
    st = ClusterState()
    assert st.upsert("Service", svc("a", 1)) == [ServiceRef("ns", "a")]
    assert st.upsert("EndpointSlice", es("a-1", "a", 2)) == [ServiceRef("ns", "a")]
    assert st.upsert("Node", node("n1", 3)) == [NodeRef("n1")]
    assert [s["metadata"]["name"] for s in st.slices_of("ns", "a")] == ["a-1"]
    assert st.delete("EndpointSlice", es("a-1", "a", 4)) == [ServiceRef("ns", "a")]
    assert st.slices_of("ns", "a") == []
    assert st.delete("Service", svc("a", 5)) == [ServiceRef("ns", "a")]
    assert st.delete("Service", svc("a", 5)) == []


def test_a_node_update_that_keeps_its_cidrs_and_addresses_is_no_news() -> None:
    """Nodes are updated every few seconds (status, conditions); an agent merges every Service again
    for each NodeRef, so only a change of what is kept (pod CIDRs, addresses) may return one."""
    st = ClusterState()
    assert st.upsert("Node", node("n1", 3)) == [NodeRef("n1")]
    heartbeat = node("n1", 4)
    heartbeat["status"] = {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "now"}]}
    assert st.upsert("Node", heartbeat) == []
    assert st.node("n1")["metadata"]["resourceVersion"] == "4"  # the newest copy is kept all the same
    assert st.upsert("Node", node("n1", 3)) == []  # and an older one still never replaces it
    moved = node("n1", 5)
    moved["spec"]["podCIDR"] = "10.244.9.0/24"
    assert st.upsert("Node", moved) == [NodeRef("n1")]
    addressed = node("n1", 6)
    addressed["spec"]["podCIDR"] = "10.244.9.0/24"
    addressed["status"] = {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}
    assert st.upsert("Node", addressed) == [NodeRef("n1")]


def test_a_slice_that_changes_service_updates_both() -> None:
    st = ClusterState()
    st.upsert("EndpointSlice", es("x", "a", 1))
    assert st.upsert("EndpointSlice", es("x", "b", 2)) == [ServiceRef("ns", "a"), ServiceRef("ns", "b")]
    assert st.slices_of("ns", "a") == []
    assert len(st.slices_of("ns", "b")) == 1


def test_an_older_copy_never_replaces_a_newer_one() -> None:
    st = ClusterState()
    st.upsert("EndpointSlice", es("x", "a", 10, ip="10.0.0.2"))
    assert st.upsert("EndpointSlice", es("x", "a", 9, ip="10.0.0.1")) == []
    assert st.slices_of("ns", "a")[0]["endpoints"][0]["addresses"] == ["10.0.0.2"]


def test_listing_removes_what_a_missed_delete_left_behind() -> None:
    st = ClusterState()
    st.upsert("Service", svc("gone", 5))
    st.upsert("Service", svc("kept", 6))
    st.upsert("Service", svc("newer", 30))  # arrived by an event after the list was taken
    refs = st.apply_listing("Service", [svc("kept", 6), svc("added", 7)], "20")
    assert set(refs) == {ServiceRef("ns", "gone"), ServiceRef("ns", "added")}
    assert set(st.services) == {("ns", "kept"), ("ns", "added"), ("ns", "newer")}


def test_listing_of_slices_and_nodes() -> None:
    st = ClusterState()
    st.upsert("EndpointSlice", es("a-1", "a", 1))
    st.upsert("EndpointSlice", es("a-2", "a", 2))
    st.upsert("Node", node("n1", 3))
    assert st.apply_listing("EndpointSlice", [es("a-2", "a", 2)], "10") == [ServiceRef("ns", "a")]
    assert [s["metadata"]["name"] for s in st.slices_of("ns", "a")] == ["a-2"]
    assert st.apply_listing("Node", [], "10") == [NodeRef("n1")]
    assert st.nodes == {}


def test_listing_without_a_usable_version_still_removes_absent_objects() -> None:
    st = ClusterState()
    st.upsert("Service", svc("gone", 5))
    assert st.apply_listing("Service", [], None) == [ServiceRef("ns", "gone")]


def test_slim_copies_keep_only_what_export_reads() -> None:
    st = ClusterState()
    body = svc("a", 1)
    body["metadata"]["managedFields"] = [{"big": "x" * 1000}]
    body["status"] = {"loadBalancer": {}}
    st.upsert("Service", body)
    kept = st.service("ns", "a")
    assert kept is not None
    assert "managedFields" not in kept["metadata"] and "status" not in kept


def test_a_listing_taken_before_a_deletion_does_not_bring_it_back() -> None:
    st = ClusterState()
    st.upsert("Service", svc("a", 90))
    assert st.delete("Service", svc("a", 105)) == [ServiceRef("ns", "a")]  # the event, while listing
    assert st.apply_listing("Service", [svc("a", 90)], "100") == []  # the listing from before
    assert st.services == {}
    assert st.upsert("Service", svc("a", 120)) == [ServiceRef("ns", "a")]  # created again later


def test_outranked_by_counts_only_live_higher_peers() -> None:
    import datetime as dt

    from clustermesh.operator.controller import Operator, OperatorConfig

    op = Operator(OperatorConfig(peering="p", priority=100), None, None)  # type: ignore[arg-type]
    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    fresh, stale = "2026-01-01T11:59:55+00:00", "2026-01-01T11:00:00+00:00"
    peering = {"status": {
        "higher-live": {"priority": 200, "lastseen": fresh, "lifetime": 15},
        "higher-dead": {"priority": 300, "lastseen": stale, "lifetime": 15},
        "lower-live": {"priority": 50, "lastseen": fresh, "lifetime": 15},
        "self": {"priority": 100, "lastseen": fresh, "lifetime": 15},
    }}
    assert op.outranked_by(peering, now) == ["higher-live"]
    assert op.outranked_by(None, now) == []


def test_slim_slices_keep_what_export_copies_into_records() -> None:
    body = es("a-1", "a", 1)
    body["endpoints"] = [
        {"addresses": ["10.0.0.1"], "conditions": {"ready": False, "serving": True, "terminating": True},
         "hostname": "a-0", "zone": "eu-1a", "hints": {"forZones": [{"name": "eu-1a"}]},
         "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "a-0", "uid": "x" * 36}},
        {"addresses": ["10.0.0.2"], "conditions": {"ready": True},
         "topology": {"topology.kubernetes.io/zone": "eu-1b"}},  # discovery/v1beta1 (Kubernetes 1.20)
    ]
    st = ClusterState()
    st.upsert("EndpointSlice", body)
    kept = st.slices_of("ns", "a")[0]["endpoints"]
    assert "targetRef" not in kept[0] and "nodeName" not in kept[0]
    service = svc("a", 2)
    service["metadata"]["annotations"] = {"service.cilium.io/global": "true"}
    rec = export_service(ClusterIdentity("c1", 1), service, st.slices_of("ns", "a")).record
    assert rec is not None
    assert rec.hostnames == {"10.0.0.1": "a-0"}
    assert rec.to_json()["zones"] == {"10.0.0.1": {"zone": "eu-1a", "forZones": [{"name": "eu-1a"}]},
                                      "10.0.0.2": {"zone": "eu-1b", "forZones": []}}
