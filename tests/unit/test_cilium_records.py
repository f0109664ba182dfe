"""Records in Cilium's exact shapes (tests/fixtures/cilium), both ways.

Every fixture decodes into our types and re-encodes to the same JSON, so what
Cilium writes we read, and what we write back Cilium reads the same way. The
rejection table holds what a reader must refuse, each with its message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clustermesh import schema
from clustermesh.cluster.export import ClusterIdentity, export_service
from clustermesh.schema import ClusterConfig, ClusterService, Node, SchemaError, ServiceExportRecord

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cilium"
# Fixtures of a mesh configured with max-connected-clusters 511.
EXTENDED_MESH = {"extended-mesh-id.json"}


def fixtures(kind: str) -> list[Path]:
    return sorted(p for p in (FIXTURES / kind).glob("*.json") if not p.name.endswith(".reencoded.json"))


def expected_encoding(path: Path) -> Any:
    """What our writer gives back: the fixture itself, or the form named next to it."""
    other = path.with_name(path.stem + ".reencoded.json")
    return json.loads((other if other.exists() else path).read_text())


def decode(kind: str, path: Path) -> ClusterService | Node | ClusterConfig | ServiceExportRecord:
    raw = path.read_text()
    data = json.loads(raw)
    max_id = 511 if path.name in EXTENDED_MESH else 255
    if kind == "services":
        key = schema.service_key(data["cluster"], data["namespace"], data["name"])
        return ClusterService.decode(raw, key=key, max_cluster_id=max_id)
    if kind == "nodes":
        return Node.decode(raw, key=schema.node_key(data["Cluster"], data["Name"]), max_cluster_id=max_id)
    if kind == "serviceexports":
        return ServiceExportRecord.decode(
            raw, key=schema.service_export_key(data["cluster"], data["namespace"], data["name"]))
    return ClusterConfig.decode(raw)


@pytest.mark.parametrize(
    ("kind", "path"),
    [(kind, p) for kind in ("services", "nodes", "cluster-config", "serviceexports") for p in fixtures(kind)],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_cilium_record_round_trips(kind: str, path: Path) -> None:
    record = decode(kind, path)
    assert json.loads(record.encode()) == expected_encoding(path)
    again = type(record).decode(record.encode(),
                                **({"max_cluster_id": 511} if kind in ("services", "nodes") else {}))
    assert again == record
    assert again.encode() == record.encode()


def test_every_kind_has_fixtures() -> None:
    assert all(fixtures(kind) for kind in ("services", "nodes", "cluster-config", "serviceexports"))


def test_zones_and_hostnames_are_read() -> None:
    svc = decode("services", FIXTURES / "services" / "zones-and-hostnames.json")
    assert isinstance(svc, ClusterService)
    assert svc.hostnames == {"10.244.9.7": "cart-0", "10.244.10.3": "cart-1"}
    assert svc.zones["10.244.10.3"] == {"zone": "eu-1b", "forZones": [{"name": "eu-1b"}, {"name": "eu-1c"}]}
    assert svc.zones["10.244.11.5"]["forZones"] == []


def test_wildcard_protocols_are_read() -> None:
    svc = decode("services", FIXTURES / "services" / "wildcard-protocols.json")
    assert isinstance(svc, ClusterService)
    ports = svc.backends["10.246.3.4"]
    assert (ports["dns"].protocol, ports["metrics"].protocol, ports["sig"].protocol) == ("ANY", "NONE", "SCTP")
    assert ports["dns"].is_wildcard and ports["metrics"].is_wildcard and not ports["sig"].is_wildcard


def test_secondary_pod_cidrs_are_exposed() -> None:
    node = decode("nodes", FIXTURES / "nodes" / "secondary-cidrs.json")
    assert isinstance(node, Node)
    assert node.ipv4_pod_cidr == "10.246.3.0/24"
    assert node.ipv4_secondary_pod_cidrs == ("10.246.130.0/23", "100.64.8.0/21")
    assert node.ipv6_secondary_pod_cidrs == ("fd00:10:246:8300::/56",)
    assert node.ipv4_pod_cidrs() == ("10.246.3.0/24", "10.246.130.0/23", "100.64.8.0/21")
    assert node.internal_ipv4() == "172.31.7.9"


def test_string_cidrs_are_read() -> None:
    node = decode("nodes", FIXTURES / "nodes" / "string-cidrs.json")
    assert isinstance(node, Node)
    assert (node.ipv4_pod_cidr, node.ipv6_pod_cidr) == ("10.249.9.0/24", "fd00:10:249:9::/64")
    assert node.ipv4_secondary_pod_cidrs == ("10.249.200.0/26",)


def test_cluster_config_capabilities() -> None:
    without = decode("cluster-config", FIXTURES / "cluster-config" / "kvstore-without-canaries.json")
    assert without == ClusterConfig(12, synced_canaries=False, max_connected_clusters=255)
    cached = decode("cluster-config", FIXTURES / "cluster-config" / "kvstoremesh-cached-511.json")
    assert cached == ClusterConfig(300, synced_canaries=True, max_connected_clusters=511, cached=True)
    exports = decode("cluster-config", FIXTURES / "cluster-config" / "service-exports.json")
    assert isinstance(exports, ClusterConfig) and exports.service_exports_enabled is False


REJECTED = json.loads((FIXTURES / "rejected.json").read_text())


@pytest.mark.parametrize("case", REJECTED, ids=[c["why"] for c in REJECTED])
def test_rejected_records(case: dict[str, Any]) -> None:
    raw = json.dumps(case["record"])
    max_id = case.get("max_cluster_id", 255)
    with pytest.raises(SchemaError, match=case["error"]):
        if case["kind"] == "service":
            ClusterService.decode(raw, max_cluster_id=max_id)
        elif case["kind"] == "node":
            Node.decode(raw, max_cluster_id=max_id)
        elif case["kind"] == "serviceexport":
            ServiceExportRecord.decode(raw, key=case.get("key"))
        else:
            ClusterConfig.decode(raw)


def test_json_null_is_read_as_go_reads_it() -> None:
    # Go leaves a bool false and a map empty for null; it never coerces a wrong type.
    data = json.loads((FIXTURES / "services" / "design-example.json").read_text())
    data.update(shared=None, includeExternal=None, labels=None, hostnames=None, zones=None)
    svc = ClusterService.decode(json.dumps(data))
    assert (svc.shared, svc.include_external, svc.labels, svc.hostnames, svc.zones) == (False, False, {}, {}, {})
    assert ClusterConfig.decode('{"id": 3, "capabilities": null}') == ClusterConfig(3, synced_canaries=False)
    assert ClusterConfig.decode('{"id": 3, "capabilities": {"syncedCanaries": null}}').synced_canaries is False


def test_our_export_writes_the_record_cilium_writes() -> None:
    """The same Service and EndpointSlice give, through our operator, the fixture's exact JSON."""
    labels = {"app.kubernetes.io/name": "cart"}
    service = {
        "metadata": {"name": "cart", "namespace": "shop", "labels": labels,
                     "annotations": {"service.cilium.io/global": "true"}},
        "spec": {"clusterIP": "10.96.44.7", "clusterIPs": ["10.96.44.7"], "selector": labels,
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                           {"name": "grpc", "port": 9090, "protocol": "TCP"}]},
    }
    ready = {"ready": True, "serving": True, "terminating": False}
    endpoint_slice = {
        "metadata": {"name": "cart-abcde", "namespace": "shop", "labels": {"kubernetes.io/service-name": "cart"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "grpc", "port": 9090, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.9.7"], "conditions": ready, "hostname": "cart-0", "zone": "eu-1a",
             "hints": {"forZones": [{"name": "eu-1a"}]}},
            {"addresses": ["10.244.10.3"], "conditions": ready, "hostname": "cart-1", "zone": "eu-1b",
             "hints": {"forZones": [{"name": "eu-1b"}, {"name": "eu-1c"}]}},
            # Terminating but still serving: kept.
            {"addresses": ["10.244.11.5"], "conditions": {"ready": False, "serving": True, "terminating": True},
             "zone": "eu-1c"},
            # Not ready and not serving: left out, with its hostname and zone.
            {"addresses": ["10.244.12.9"], "conditions": {"ready": False, "serving": False, "terminating": False},
             "hostname": "cart-3", "zone": "eu-1a"},
        ],
    }
    result = export_service(ClusterIdentity("eu-west", 7), service, [endpoint_slice])
    assert result.record is not None and result.problems == []
    assert json.loads(result.record.encode()) == json.loads(
        (FIXTURES / "services" / "zones-and-hostnames.json").read_text())


def test_a_kvstoremesh_cache_round_trips() -> None:
    """A cache as Cilium's KVStoreMesh writes it is read as the remote's (ready, records under the cache
    prefixes), and ours writes the same keys and values from those records."""
    from clustermesh.store.cache import CACHE_SYNCED_PREFIXES, cache_entries, cached_config
    from clustermesh.store.readiness import not_ready_reason

    cache = json.loads((FIXTURES / "cache" / "cluster-2.json").read_text())
    config_key = schema.cluster_config_key("cluster-2")
    raw_config = json.dumps(cache[config_key])
    services = [schema.ClusterService.decode(json.dumps(v), key=k) for k, v in cache.items()
                if k.startswith(schema.CACHE_SERVICES_PREFIX)]
    nodes = [schema.Node.decode(json.dumps(v), key=k) for k, v in cache.items()
             if k.startswith(schema.CACHE_NODES_PREFIX)]
    assert [s.name for s in services] == ["rebel-base"] and [n.name for n in nodes] == ["worker-1"]
    synced = [k.removeprefix(f"{schema.SYNCED_PREFIX}/cluster-2/") for k in cache if k.startswith(schema.SYNCED_PREFIX)]
    assert not_ready_reason("cluster-2", 2, raw_config, synced) is None
    assert not_ready_reason("cluster-2", 2, raw_config, synced[:1]) == "waiting for synced markers of nodes"
    assert schema.ClusterConfig.decode(raw_config).cached

    ours = cache_entries("cluster-2", services, nodes)
    ours[config_key] = cached_config(schema.ClusterConfig(2)).encode()
    expected = {k: v for k, v in cache.items() if not k.startswith(schema.SYNCED_PREFIX)}
    assert {k: json.loads(v) for k, v in ours.items()} == expected
    assert sorted(schema.synced_key("cluster-2", p) for p in CACHE_SYNCED_PREFIXES) == sorted(
        k for k in cache if k.startswith(schema.SYNCED_PREFIX))
