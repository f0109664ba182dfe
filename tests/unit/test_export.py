"""The operator's export rules as tables: plain dicts in, records and problems out."""

from __future__ import annotations

from typing import Any

import pytest

from clustermesh.cluster.export import (
    ClusterIdentity,
    endpoint_is_serving,
    export_node,
    export_service,
    service_records,
)
from clustermesh.schema import ClusterService, PortConfig, SchemaError

C1 = ClusterIdentity("cluster-1", 1)
TCP80 = PortConfig("TCP", 80)
TCP8080 = PortConfig("TCP", 8080)


def svc(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    base = {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "selector": {"app": "echo"}}
    return {"metadata": {"name": "echo", "namespace": "ns", "annotations": annotations or {},
                         "labels": {"team": "a"}},
            "spec": {**base, **spec}}


def es(endpoints: list[dict[str, Any]], ports: list[dict[str, Any]] | None = None, service: str = "echo",
       family: str = "IPv4", name: str = "echo-x") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": family,
            "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}


def ep(ip: str, **conditions: bool) -> dict[str, Any]:
    return {"addresses": [ip], "conditions": conditions}


GLOBAL = {"service.cilium.io/global": "true"}


@pytest.mark.parametrize(
    ("annotations", "exported", "problems"),
    [
        ({}, False, 0),
        ({"service.cilium.io/global": "false"}, False, 0),
        ({"service.cilium.io/global": "true"}, True, 0),
        ({"service.cilium.io/global": "TRUE"}, True, 0),
        # Cilium compares the lowercased value with "true", without trimming: not global.
        ({"service.cilium.io/global": "True "}, False, 1),
        ({"io.cilium/global-service": "true"}, True, 0),
        ({"service.cilium.io/global": "yes"}, False, 1),
        ({"service.cilium.io/global": "1"}, False, 1),
        ({"service.cilium.io/global": "false", "io.cilium/global-service": "true"}, False, 0),
        ({**GLOBAL, "service.cilium.io/affinity": "local"}, True, 0),
        ({**GLOBAL, "service.cilium.io/affinity": "Remote"}, True, 0),
        ({**GLOBAL, "service.cilium.io/affinity": ""}, True, 0),
        ({**GLOBAL, "service.cilium.io/affinity": "closest"}, True, 1),
        ({**GLOBAL, "service.cilium.io/shared": "maybe"}, True, 1),
    ],
)
def test_annotations(annotations: dict[str, str], exported: bool, problems: int) -> None:
    result = export_service(C1, svc(annotations), [])
    assert (result.record is not None) == exported
    assert len(result.problems) == problems
    assert all("neither 'true' nor 'false'" in p or "affinity" in p for p in result.problems)


@pytest.mark.parametrize(
    ("annotations", "shared"),
    [
        (GLOBAL, True),  # a global Service is shared by default
        ({**GLOBAL, "service.cilium.io/shared": "false"}, False),
        ({**GLOBAL, "service.cilium.io/shared": "FALSE"}, False),
        ({**GLOBAL, "service.cilium.io/shared": "True"}, True),
        ({**GLOBAL, "io.cilium/shared-service": "false"}, False),
        ({**GLOBAL, "service.cilium.io/shared": "true", "io.cilium/shared-service": "false"}, True),
        # Cilium reads anything but "true" as false, so an unknown value unshares (and is reported).
        ({**GLOBAL, "service.cilium.io/shared": "maybe"}, False),
        ({**GLOBAL, "service.cilium.io/shared": "yes"}, False),
    ],
)
def test_shared_annotation_as_cilium_reads_it(annotations: dict[str, str], shared: bool) -> None:
    rec = export_service(C1, svc(annotations), [es([ep("10.0.0.1")])]).record
    assert rec is not None
    assert rec.shared is shared
    assert (rec.backends != {}) is shared


def test_full_record() -> None:
    result = export_service(C1, svc(GLOBAL), [es([ep("10.244.1.1", ready=True)])])
    rec = result.record
    assert rec is not None and not result.problems
    assert rec.to_json() == {
        "cluster": "cluster-1", "clusterID": 1, "namespace": "ns", "name": "echo",
        "frontends": {"10.96.0.10": {"http": {"Protocol": "TCP", "Port": 80}}},
        "backends": {"10.244.1.1": {"http": {"Protocol": "TCP", "Port": 8080}}},
        "labels": {"team": "a"}, "selector": {"app": "echo"}, "includeExternal": True, "shared": True,
    }


@pytest.mark.parametrize(
    ("endpoint", "serving"),
    [
        (ep("10.0.0.1", ready=True), True),
        (ep("10.0.0.1"), True),  # unset ready means ready
        (ep("10.0.0.1", ready=False), False),
        (ep("10.0.0.1", ready=False, serving=False, terminating=False), False),
        (ep("10.0.0.1", ready=True, serving=True, terminating=False), True),
        # Terminating but still serving: kept, as current Cilium does (graceful termination).
        (ep("10.0.0.1", ready=False, serving=True, terminating=True), True),
        # Terminating and no longer serving: dropped.
        (ep("10.0.0.1", ready=False, serving=False, terminating=True), False),
        # Ready while terminating (publishNotReadyAddresses): ready wins, as in Cilium.
        (ep("10.0.0.1", ready=True, terminating=True), True),
        # No serving condition (before 1.22, or v1beta1 on 1.20): defer to ready.
        (ep("10.0.0.1", ready=False, terminating=True), False),
    ],
)
def test_endpoint_conditions(endpoint: dict[str, Any], serving: bool) -> None:
    assert endpoint_is_serving(endpoint) is serving
    rec = export_service(C1, svc(GLOBAL), [es([endpoint])]).record
    assert rec is not None
    assert (("10.0.0.1" in rec.backends) is serving)


def test_multiple_slices_ports_and_protocols() -> None:
    spec_ports = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
    slice_ports = [{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5353}]
    rec = export_service(
        C1, svc(GLOBAL, ports=spec_ports),
        [es([ep("10.0.0.1", ready=True)], slice_ports, name="a"),
         es([ep("10.0.0.2", ready=True)], slice_ports, name="b"),
         es([ep("10.0.0.3", ready=True)], slice_ports, service="other", name="c")],
    ).record
    assert rec is not None
    assert rec.frontends == {"10.96.0.10": {"dns": PortConfig("UDP", 53), "dns-tcp": PortConfig("TCP", 53)}}
    both = {"dns": PortConfig("UDP", 5353), "dns-tcp": PortConfig("TCP", 5353)}
    assert rec.backends == {"10.0.0.1": both, "10.0.0.2": both}


def test_unnamed_port() -> None:
    rec = export_service(C1, svc(GLOBAL, ports=[{"port": 80}]),
                         [es([ep("10.0.0.1")], [{"port": 8080}])]).record
    assert rec is not None
    assert rec.frontends == {"10.96.0.10": {"": TCP80}}
    assert rec.backends == {"10.0.0.1": {"": TCP8080}}


def test_headless_service_has_no_frontends() -> None:
    rec = export_service(C1, svc(GLOBAL, clusterIP="None"), [es([ep("10.0.0.1")])]).record
    assert rec is not None
    assert rec.frontends == {}
    assert set(rec.backends) == {"10.0.0.1"}


def test_dual_stack_frontends() -> None:
    rec = export_service(C1, svc(GLOBAL, clusterIPs=["10.96.0.10", "fd00::10"]), []).record
    assert rec is not None
    assert set(rec.frontends) == {"10.96.0.10", "fd00::10"}


def test_not_shared_exports_without_backends() -> None:
    rec = export_service(C1, svc({**GLOBAL, "service.cilium.io/shared": "false"}), [es([ep("10.0.0.1")])]).record
    assert rec is not None
    assert rec.shared is False and rec.backends == {}


@pytest.mark.parametrize(
    ("slices", "problem"),
    [
        ([es([ep("backend.example")], family="FQDN")], "addressType FQDN"),
        ([es([ep("not-an-ip")])], "does not parse"),
        ([es([ep("fd00::1")])], "not IPv4"),
        ([es([ep("10.0.0.1")], [{"name": "http", "port": None}])], "no number"),
        ([es([ep("10.0.0.1")], [{"name": "http", "port": 8080, "protocol": "ICMP"}])], "protocol"),
    ],
)
def test_bad_slices_are_skipped_with_a_problem(slices: list[dict[str, Any]], problem: str) -> None:
    good = es([ep("10.0.0.9")], name="good")
    result = export_service(C1, svc(GLOBAL), [*slices, good])
    assert result.record is not None
    assert "10.0.0.9" in result.record.backends, "the rest keeps working"
    assert any(problem in p for p in result.problems), result.problems


def test_external_name_is_not_exported() -> None:
    result = export_service(C1, svc(GLOBAL, type="ExternalName"), [])
    assert result.record is None and result.problems


def test_bad_service_port_is_skipped() -> None:
    result = export_service(C1, svc(GLOBAL, ports=[{"name": "a", "port": 0}, {"name": "b", "port": 81}]), [])
    assert result.record is not None
    assert result.record.frontends == {"10.96.0.10": {"b": PortConfig("TCP", 81)}}
    assert result.problems


def test_service_records_covers_every_service() -> None:
    other = svc({})
    other["metadata"]["name"] = "plain"
    out = service_records(C1, [svc(GLOBAL), other], {("ns", "echo"): [es([ep("10.0.0.1")])]})
    assert set(out) == {("ns", "echo"), ("ns", "plain")}
    assert out[("ns", "plain")].record is None
    echo = out[("ns", "echo")].record
    assert echo is not None and set(echo.backends) == {"10.0.0.1"}


def test_node_export() -> None:
    node = {"metadata": {"name": "n1"},
            "spec": {"podCIDRs": ["10.244.3.0/24", "fd00:3::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.3"},
                                     {"type": "Hostname", "address": "n1"},
                                     {"type": "InternalIP", "address": "bogus"}]}}
    result = export_node(C1, node)
    assert result.record is not None
    assert result.record.ipv4_pod_cidr == "10.244.3.0/24"
    assert result.record.ipv6_pod_cidr == "fd00:3::/64"
    assert result.record.internal_ipv4() == "192.168.1.3"
    assert len(result.record.addresses) == 1


def test_node_with_bad_cidr_keeps_the_rest() -> None:
    result = export_node(C1, {"metadata": {"name": "n1"}, "spec": {"podCIDR": "nope"}, "status": {}})
    assert result.record is not None and result.record.ipv4_pod_cidr is None
    assert result.problems


@pytest.mark.parametrize(("name", "cid"), [("Bad", 1), ("ok", 0), ("ok", 256), ("x" * 33, 1)])
def test_identity_is_validated(name: str, cid: int) -> None:
    with pytest.raises(SchemaError):
        ClusterIdentity(name, cid)


def _zoned(ip: str, **fields: Any) -> dict[str, Any]:
    return {"addresses": [ip], "conditions": {"ready": True}, **fields}


def test_hostnames_and_zones_as_current_cilium_writes_them() -> None:
    endpoints = [
        _zoned("10.0.0.1", hostname="echo-0", zone="eu-1a", hints={"forZones": [{"name": "eu-1a"}]}),
        _zoned("10.0.0.2", zone="eu-1b"),  # no hints: forZones is [], not missing
        _zoned("10.0.0.3", hostname="echo-2"),  # no zone: no zone entry
        _zoned("10.0.0.4", hints={"forZones": [{"name": "eu-1c"}]}),  # hints without a zone are dropped
    ]
    rec = export_service(C1, svc(GLOBAL), [es(endpoints)]).record
    assert rec is not None
    data = rec.to_json()
    assert data["hostnames"] == {"10.0.0.1": "echo-0", "10.0.0.3": "echo-2"}
    assert data["zones"] == {
        "10.0.0.1": {"zone": "eu-1a", "forZones": [{"name": "eu-1a"}]},
        "10.0.0.2": {"zone": "eu-1b", "forZones": []},
    }
    assert set(rec.backends) == {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"}


def test_zone_from_discovery_v1beta1_topology_and_v1_deprecated_topology() -> None:
    zone_label = "topology.kubernetes.io/zone"
    endpoints = [
        _zoned("10.0.0.1", topology={zone_label: "z-old", "kubernetes.io/hostname": "node-1"}),  # 1.20
        _zoned("10.0.0.2", deprecatedTopology={zone_label: "z-dep"}),
        _zoned("10.0.0.3", zone="z-new", deprecatedTopology={zone_label: "ignored"}),
    ]
    rec = export_service(C1, svc(GLOBAL), [es(endpoints)]).record
    assert rec is not None
    assert {ip: z["zone"] for ip, z in rec.zones.items()} == {"10.0.0.1": "z-old", "10.0.0.2": "z-dep",
                                                              "10.0.0.3": "z-new"}


def test_without_hostnames_or_zones_the_record_omits_them() -> None:
    rec = export_service(C1, svc(GLOBAL), [es([ep("10.0.0.1")])]).record
    assert rec is not None
    assert "hostnames" not in rec.to_json() and "zones" not in rec.to_json()


def test_terminating_endpoint_keeps_its_hostname_and_zone() -> None:
    endpoint = {"addresses": ["10.0.0.1"], "conditions": {"ready": False, "serving": True, "terminating": True},
                "hostname": "echo-0", "zone": "eu-1a"}
    rec = export_service(C1, svc(GLOBAL), [es([endpoint])]).record
    assert rec is not None
    assert rec.hostnames == {"10.0.0.1": "echo-0"} and set(rec.zones) == {"10.0.0.1"}


def test_export_round_trips_through_the_schema() -> None:
    endpoints = [_zoned("10.0.0.1", hostname="echo-0", zone="eu-1a", hints={"forZones": [{"name": "eu-1b"}]})]
    rec = export_service(C1, svc(GLOBAL), [es(endpoints)]).record
    assert rec is not None
    assert ClusterService.decode(rec.encode(), key=rec.key) == rec


def test_a_511_mesh_exports_ids_above_255() -> None:
    wide = ClusterIdentity("cluster-300", 300, max_connected_clusters=511)
    rec = export_service(wide, svc(GLOBAL), [es([ep("10.0.0.1")])]).record
    assert rec is not None and rec.cluster_id == 300
    node = export_node(wide, {"metadata": {"name": "n1"}, "spec": {}, "status": {}}).record
    assert node is not None and node.cluster_id == 300
    with pytest.raises(SchemaError, match="outside"):
        ClusterIdentity("cluster-300", 300)
    with pytest.raises(SchemaError, match="255, 511"):
        ClusterIdentity("cluster-3", 3, max_connected_clusters=300)


def test_node_export_keeps_extra_pod_cidrs_as_secondary() -> None:
    node = {"metadata": {"name": "n1"},
            "spec": {"podCIDRs": ["10.244.3.0/24", "fd00:3::/64", "10.250.0.0/26"]}, "status": {}}
    rec = export_node(C1, node).record
    assert rec is not None
    assert (rec.ipv4_pod_cidr, rec.ipv4_secondary_pod_cidrs) == ("10.244.3.0/24", ("10.250.0.0/26",))
    assert rec.to_json()["IPv4SecondaryAllocCIDRs"] == [{"IP": "10.250.0.0", "Mask": "////wA=="}]
