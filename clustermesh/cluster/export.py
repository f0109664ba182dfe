"""What the operator writes: pure functions from Kubernetes objects to store records.

Inputs are plain dicts as the API server returns them (kopf bodies or JSON),
outputs are schema records plus the problems found on the way. Nothing here
does I/O, so every rule is tested as a table (tests/unit/test_export.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clustermesh.schema import (
    KUBERNETES_PROTOCOLS,
    MAX_CLUSTER_ID,
    ClusterService,
    Node,
    NodeAddress,
    PortConfig,
    SchemaError,
    backend_zone,
    validate_cluster_id,
    validate_cluster_name,
)

GLOBAL_ANNOTATION = "service.cilium.io/global"
LEGACY_GLOBAL_ANNOTATION = "io.cilium/global-service"
SHARED_ANNOTATION = "service.cilium.io/shared"
LEGACY_SHARED_ANNOTATION = "io.cilium/shared-service"
AFFINITY_ANNOTATION = "service.cilium.io/affinity"
AFFINITY_VALUES = ("local", "remote", "none")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"

Body = Mapping[str, Any]


@dataclass(frozen=True)
class ClusterIdentity:
    name: str
    id: int
    # The mesh's max-connected-clusters (255 or 511): the upper bound of every cluster ID in it.
    max_connected_clusters: int = MAX_CLUSTER_ID

    def __post_init__(self) -> None:
        validate_cluster_name(self.name)
        validate_cluster_id(self.id, self.max_connected_clusters)


@dataclass
class Export:
    """The record to write (None: nothing, delete any old one) and what was wrong with the input."""

    record: ClusterService | None
    problems: list[str] = field(default_factory=list)


def _bool_annotation(annotations: Mapping[str, str], names: Iterable[str], default: bool) -> tuple[bool, str | None]:
    """The first annotation present among ``names``, read as Cilium reads it.

    Cilium compares the lowercased value with "true" and nothing else: "True"
    is true, while "yes", "1" or "true " (with a space) are false. Such a
    value is reported, because its author almost certainly meant true.
    """
    for name in names:
        if name in annotations:
            value = str(annotations[name])
            if value.lower() == "true":
                return True, None
            if value.lower() == "false":
                return False, None
            return False, (f"annotation {name}={annotations[name]!r} is neither 'true' nor 'false'; "
                           "read as false, as Cilium does")
    return default, None


def global_flag(service: Body) -> tuple[bool, str | None]:
    annotations = (service.get("metadata") or {}).get("annotations") or {}
    return _bool_annotation(annotations, (GLOBAL_ANNOTATION, LEGACY_GLOBAL_ANNOTATION), False)


def is_global(service: Body) -> bool:
    return global_flag(service)[0]


def shared_flag(service: Body) -> tuple[bool, str | None]:
    """``service.cilium.io/shared``: only read on a global Service, which is shared by default."""
    annotations = (service.get("metadata") or {}).get("annotations") or {}
    return _bool_annotation(annotations, (SHARED_ANNOTATION, LEGACY_SHARED_ANNOTATION), True)


def affinity(service: Body) -> tuple[str, str | None]:
    """``service.cilium.io/affinity``: local | remote | none, any case; empty or unset is none (Cilium's rule)."""
    annotations = (service.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(AFFINITY_ANNOTATION)
    if value is None:
        return "none", None
    normalized = str(value).lower()
    if normalized in AFFINITY_VALUES:
        return normalized, None
    if normalized == "":
        return "none", None
    return "none", f"annotation {AFFINITY_ANNOTATION}={value!r} is not one of {', '.join(AFFINITY_VALUES)}"


def _cluster_ips(spec: Body) -> list[str]:
    ips = list(spec.get("clusterIPs") or [])
    if not ips and spec.get("clusterIP"):
        ips = [spec["clusterIP"]]
    return [ip for ip in ips if ip and ip != "None"]


def _port_name(port: Body) -> str:
    return str(port.get("name") or "")


def _protocol(raw: object) -> str:
    return str(raw or "TCP").upper()


def endpoint_is_serving(endpoint: Body) -> bool:
    """Ready, or serving while terminating: what current Cilium exports.

    A terminating endpoint that still serves keeps its established and new
    connections until it stops serving (graceful termination); one that no
    longer serves is dropped. Unset ``ready`` means ready (the API's rule).
    Unset ``serving`` (Kubernetes before 1.22, or 1.20's v1beta1 without the
    feature gate) defers to ``ready`` as the API documents; Cilium reads it
    as serving, which would export not-ready endpoints of such clusters.
    """
    conditions = endpoint.get("conditions") or {}
    ready = conditions.get("ready") is not False
    serving = conditions.get("serving")
    return ready or serving is True


def slices_for(service_name: str, slices: Iterable[Body]) -> list[Body]:
    return [
        s for s in slices
        if ((s.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL) == service_name
    ]


def export_service(cluster: ClusterIdentity, service: Body, slices: Iterable[Body]) -> Export:
    """One Service (and its EndpointSlices) -> the ClusterService this cluster offers, or None.

    None when the Service is not global (then any old record must go).
    """
    meta = service.get("metadata") or {}
    namespace, name = meta.get("namespace") or "default", meta.get("name") or ""
    spec = service.get("spec") or {}
    problems: list[str] = []

    is_glob, problem = global_flag(service)
    if problem:
        problems.append(problem)
    if not is_glob:
        return Export(None, problems)
    shared, problem = shared_flag(service)
    if problem:
        problems.append(problem)
    _aff, problem = affinity(service)
    if problem:
        problems.append(problem)
    if spec.get("type") == "ExternalName":
        problems.append("ExternalName services have no endpoints to share; not exported")
        return Export(None, problems)

    frontends: dict[str, dict[str, PortConfig]] = {}
    service_ports: dict[str, PortConfig] = {}
    for port in spec.get("ports") or []:
        proto = _protocol(port.get("protocol"))
        if proto not in KUBERNETES_PROTOCOLS:
            problems.append(f"port {_port_name(port)!r}: protocol {proto} is not supported; skipped")
            continue
        try:
            service_ports[_port_name(port)] = PortConfig(proto, port.get("port")).validate()
        except SchemaError as exc:
            problems.append(f"port {_port_name(port)!r}: {exc}; skipped")
    for ip in _cluster_ips(spec):
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            problems.append(f"clusterIP {ip!r} does not parse; skipped")
            continue
        if service_ports:
            frontends[ip] = dict(service_ports)

    backends: dict[str, dict[str, PortConfig]] = {}
    hostnames: dict[str, str] = {}
    zones: dict[str, dict[str, Any]] = {}
    if shared:
        for es in slices_for(name, slices):
            _add_slice_backends(es, backends, hostnames, zones, problems)

    record = ClusterService(
        cluster=cluster.name,
        namespace=namespace,
        name=name,
        cluster_id=cluster.id,
        frontends=frontends,
        backends=backends,
        labels=dict(meta.get("labels") or {}),
        selector=dict(spec.get("selector") or {}),
        include_external=True,
        shared=shared,
        hostnames=hostnames,
        zones=zones,
    )
    try:
        record.validate(cluster.max_connected_clusters)
    except SchemaError as exc:
        problems.append(f"cannot be exported: {exc}")
        return Export(None, problems)
    return Export(record, problems)


def _endpoint_zone(endpoint: Body) -> tuple[str, list[str]]:
    """The endpoint's zone and topology hints, from either API version.

    discovery/v1 has ``zone`` (and ``deprecatedTopology`` from older writers);
    v1beta1 (Kubernetes 1.20) has only the ``topology`` map.
    """
    zone = endpoint.get("zone")
    if not isinstance(zone, str) or not zone:
        for legacy in ("deprecatedTopology", "topology"):
            value = (endpoint.get(legacy) or {}).get(ZONE_LABEL)
            if isinstance(value, str) and value:
                zone = value
                break
        else:
            zone = ""
    hints = (endpoint.get("hints") or {}).get("forZones") or []
    return zone, [h["name"] for h in hints if isinstance(h, Mapping) and isinstance(h.get("name"), str)]


def _add_slice_backends(
    es: Body,
    backends: dict[str, dict[str, PortConfig]],
    hostnames: dict[str, str],
    zones: dict[str, dict[str, Any]],
    problems: list[str],
) -> None:
    slice_name = (es.get("metadata") or {}).get("name", "?")
    family = es.get("addressType", "IPv4")
    if family not in ("IPv4", "IPv6"):
        problems.append(f"EndpointSlice {slice_name}: addressType {family} cannot be exported; skipped")
        return
    ports: dict[str, PortConfig] = {}
    for port in es.get("ports") or []:
        proto = _protocol(port.get("protocol"))
        number = port.get("port")
        if number is None:
            problems.append(f"EndpointSlice {slice_name}: port {_port_name(port)!r} has no number; skipped")
            continue
        if proto not in KUBERNETES_PROTOCOLS:
            problems.append(f"EndpointSlice {slice_name}: port {_port_name(port)!r}: protocol {proto} "
                            "is not supported; skipped")
            continue
        try:
            ports[_port_name(port)] = PortConfig(proto, number).validate()
        except SchemaError as exc:
            problems.append(f"EndpointSlice {slice_name}: port {_port_name(port)!r}: {exc}; skipped")
    if not ports:
        return
    for endpoint in es.get("endpoints") or []:
        if not endpoint_is_serving(endpoint):
            continue
        hostname = endpoint.get("hostname")
        zone, for_zones = _endpoint_zone(endpoint)
        for address in endpoint.get("addresses") or []:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                problems.append(f"EndpointSlice {slice_name}: address {address!r} does not parse; skipped")
                continue
            if (ip.version == 4) != (family == "IPv4"):
                problems.append(f"EndpointSlice {slice_name}: {address} is not {family}; skipped")
                continue
            backends.setdefault(str(ip), {}).update(ports)
            # Cilium writes both only when set (a zone entry needs a zone; hints alone are dropped).
            if isinstance(hostname, str) and hostname:
                hostnames[str(ip)] = hostname
            if zone:
                zones[str(ip)] = backend_zone(zone, for_zones)


def _node_addresses(node: Body) -> tuple[NodeAddress, ...]:
    out = []
    for addr in (node.get("status") or {}).get("addresses") or []:
        kind, value = addr.get("type"), addr.get("address")
        if kind not in ("InternalIP", "ExternalIP") or not value:
            continue
        try:
            ipaddress.ip_address(value)
        except ValueError:
            continue
        out.append(NodeAddress(kind, value))
    return tuple(out)


def export_node(cluster: ClusterIdentity, node: Body) -> NodeExport:
    """One Node -> its record (addresses and pod CIDRs)."""
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    problems: list[str] = []
    cidrs = list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))
    # The first CIDR of each family is the primary one, the rest secondary (Cilium's ParseCiliumNode rule).
    by_family: dict[int, list[str]] = {4: [], 6: []}
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            problems.append(f"pod CIDR {cidr!r} does not parse; skipped")
            continue
        if str(net) not in by_family[net.version]:
            by_family[net.version].append(str(net))
    v4 = by_family[4][0] if by_family[4] else None
    v6 = by_family[6][0] if by_family[6] else None
    record = Node(
        name=meta.get("name") or "",
        cluster=cluster.name,
        cluster_id=cluster.id,
        addresses=_node_addresses(node),
        ipv4_pod_cidr=v4,
        ipv6_pod_cidr=v6,
        ipv4_secondary_pod_cidrs=tuple(by_family[4][1:]),
        ipv6_secondary_pod_cidrs=tuple(by_family[6][1:]),
    )
    try:
        record.validate(cluster.max_connected_clusters)
    except SchemaError as exc:
        return NodeExport(None, [*problems, f"cannot be exported: {exc}"])
    return NodeExport(record, problems)


@dataclass
class NodeExport:
    record: Node | None
    problems: list[str] = field(default_factory=list)


def service_records(
    cluster: ClusterIdentity,
    services: Iterable[Body],
    slices_by_service: Mapping[tuple[str, str], Iterable[Body]],
) -> dict[tuple[str, str], Export]:
    """The full export of a cluster: one entry per Service, keyed by (namespace, name)."""
    out = {}
    for service in services:
        meta = service.get("metadata") or {}
        ref = (meta.get("namespace") or "default", meta.get("name") or "")
        out[ref] = export_service(cluster, service, slices_by_service.get(ref, ()))
    return out
