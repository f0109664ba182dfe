"""Records in the state store: key layout, types, validation and the JSON codec.

The layout and field names follow Cilium's ClusterMesh store ("STABLE API" on
their side) so that the two can read each other's records:

- ``cilium/state/services/v1/<cluster>/<namespace>/<name>``  ClusterService
- ``cilium/state/nodes/v1/<cluster>/<node>``                 Node (Go field names)
- ``cilium/cluster-config/<cluster>``                        ClusterConfig
- ``cilium/synced/<cluster>/<prefix>``                       RFC3339 time
- ``cilium/.heartbeat``                                      RFC3339 time

Everything here is pure: no I/O, only values and validation. Decoders check
what a reader must be able to trust (names set and equal to the key, IPs that
parse, the cluster that the key says) and raise :class:`SchemaError` otherwise.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

STATE_PREFIX = "cilium/state"
SERVICES_PREFIX = "cilium/state/services/v1"
NODES_PREFIX = "cilium/state/nodes/v1"
CLUSTER_CONFIG_PREFIX = "cilium/cluster-config"
SYNCED_PREFIX = "cilium/synced"
HEARTBEAT_KEY = "cilium/.heartbeat"
# Cilium's KVStoreMesh layout: a store pod's cache of a remote cluster's records, read by the local
# agents instead of the remote's store. Its cluster-config says "cached"; its synced markers are
# cilium/synced/<remote>/cilium/cache/<kind>/v1.
CACHE_PREFIX = "cilium/cache"
CACHE_SERVICES_PREFIX = "cilium/cache/services/v1"
CACHE_NODES_PREFIX = "cilium/cache/nodes/v1"
# MCS-API: one record per ServiceExport (Cilium's MCSAPIServiceSpec), Cilium's stable layout.
SERVICE_EXPORTS_PREFIX = "cilium/state/serviceexports/v1"
# Cilium writes this key next to the cluster-config so that a reader knows a
# cluster-config exists and can wait for it instead of assuming an old writer.
HAS_CLUSTER_CONFIG_KEY = "cilium/.has-cluster-config"

MAX_CLUSTER_NAME_LEN = 32
MIN_CLUSTER_ID = 1
MAX_CLUSTER_ID = 255
# Cilium's max-connected-clusters: 255 (default) or 511 (fewer identity bits per cluster).
MAX_CLUSTER_ID_EXTENDED = 511
MAX_CONNECTED_CLUSTERS_CHOICES = (MAX_CLUSTER_ID, MAX_CLUSTER_ID_EXTENDED)
KUBERNETES_PROTOCOLS = ("TCP", "UDP", "SCTP")
# Cilium's L4Type wildcards (pkg/loadbalancer): both become protocol 0 in its maps, matching any protocol.
WILDCARD_PROTOCOLS = ("ANY", "NONE")
PROTOCOLS = (*KUBERNETES_PROTOCOLS, *WILDCARD_PROTOCOLS)

_CLUSTER_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes object names: namespaces are DNS labels, Services DNS-1035 labels,
# Nodes DNS subdomains. One permissive check keeps keys parseable.
_OBJECT_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class SchemaError(ValueError):
    """A record or name that the schema cannot hold."""


# ---------------------------------------------------------------- names and ids


def validate_cluster_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise SchemaError("cluster name must be a non-empty string")
    if len(name) > MAX_CLUSTER_NAME_LEN:
        raise SchemaError(f"cluster name {name!r} is longer than {MAX_CLUSTER_NAME_LEN} characters")
    if not _CLUSTER_NAME_RE.match(name):
        raise SchemaError(
            f"cluster name {name!r} must be lowercase alphanumerics and '-', "
            "starting and ending with an alphanumeric"
        )
    return name


def validate_max_connected_clusters(value: object) -> int:
    if isinstance(value, bool) or value not in MAX_CONNECTED_CLUSTERS_CHOICES:
        raise SchemaError(
            f"max connected clusters must be one of {', '.join(map(str, MAX_CONNECTED_CLUSTERS_CHOICES))}, "
            f"got {value!r}"
        )
    assert isinstance(value, int)
    return value


def validate_cluster_id(cluster_id: object, max_id: int = MAX_CLUSTER_ID) -> int:
    """A cluster ID in 1..max_id; max_id is the mesh's max-connected-clusters (255 or 511)."""
    validate_max_connected_clusters(max_id)
    if isinstance(cluster_id, bool) or not isinstance(cluster_id, int):
        raise SchemaError(f"cluster ID must be an integer, got {cluster_id!r}")
    if not MIN_CLUSTER_ID <= cluster_id <= max_id:
        raise SchemaError(f"cluster ID {cluster_id} is outside {MIN_CLUSTER_ID}..{max_id}")
    return cluster_id


def _validate_object_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{kind} must be a non-empty string, got {name!r}")
    if len(name) > 253 or not _OBJECT_NAME_RE.match(name):
        raise SchemaError(f"{kind} {name!r} is not a valid Kubernetes name")
    return name


def _validate_ip(ip: object) -> str:
    """An IP address in its canonical text form; zoned IPv6 (fe80::1%eth0) is refused as Cilium does."""
    if not isinstance(ip, str):
        raise SchemaError(f"IP address must be a string, got {ip!r}")
    if "%" in ip:
        # Python parses a scope ID; Go's net.IP cannot hold one and Cilium refuses zones.
        raise SchemaError(f"{ip!r}: IPv6 zones are not supported in records")
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError as exc:
        raise SchemaError(f"{ip!r} is not an IP address") from exc


def _str(what: str, data: object) -> str:
    if not isinstance(data, str):
        raise SchemaError(f"{what} must be a string, got {data!r}")
    return data


# ---------------------------------------------------------------- keys


def service_key(cluster: str, namespace: str, name: str) -> str:
    return f"{SERVICES_PREFIX}/{cluster}/{namespace}/{name}"


def services_cluster_prefix(cluster: str) -> str:
    return f"{SERVICES_PREFIX}/{cluster}/"


def node_key(cluster: str, node: str) -> str:
    return f"{NODES_PREFIX}/{cluster}/{node}"


def nodes_cluster_prefix(cluster: str) -> str:
    return f"{NODES_PREFIX}/{cluster}/"


def service_export_key(cluster: str, namespace: str, name: str) -> str:
    return f"{SERVICE_EXPORTS_PREFIX}/{cluster}/{namespace}/{name}"


def service_exports_cluster_prefix(cluster: str) -> str:
    return f"{SERVICE_EXPORTS_PREFIX}/{cluster}/"


def parse_service_export_key(key: str) -> ServiceKey:
    """A ServiceExport key of a cluster's state or of a KVStoreMesh cache."""
    parts = _key_rest(key, (SERVICE_EXPORTS_PREFIX, state_to_cache(SERVICE_EXPORTS_PREFIX))).split("/")
    if len(parts) != 3 or not all(parts):
        raise SchemaError(
            f"{key!r} is not a ServiceExport key ({SERVICE_EXPORTS_PREFIX}/<cluster>/<namespace>/<name>)")
    return ServiceKey(*parts)


def state_to_cache(prefix: str) -> str:
    """``cilium/state/...`` -> ``cilium/cache/...`` (Cilium's StateToCachePrefix); others unchanged."""
    if prefix == STATE_PREFIX or prefix.startswith(STATE_PREFIX + "/"):
        return CACHE_PREFIX + prefix[len(STATE_PREFIX):]
    return prefix


def record_prefixes(cached: bool) -> tuple[str, str]:
    """(services, nodes) prefixes of a cluster's records: its own state, or a KVStoreMesh cache."""
    if cached:
        return CACHE_SERVICES_PREFIX, CACHE_NODES_PREFIX
    return SERVICES_PREFIX, NODES_PREFIX


def cluster_config_key(cluster: str) -> str:
    return f"{CLUSTER_CONFIG_PREFIX}/{cluster}"


def synced_key(cluster: str, prefix: str) -> str:
    """Marker written once the first full export of ``prefix`` by ``cluster`` is in."""
    return f"{SYNCED_PREFIX}/{cluster}/{prefix}"


@dataclass(frozen=True)
class ServiceKey:
    cluster: str
    namespace: str
    name: str


def _key_rest(key: str, prefixes: tuple[str, str]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix + "/"):
            return key[len(prefix) + 1:]
    return ""


def parse_service_key(key: str) -> ServiceKey:
    """A service key of a cluster's state or of a KVStoreMesh cache."""
    parts = _key_rest(key, (SERVICES_PREFIX, CACHE_SERVICES_PREFIX)).split("/")
    if len(parts) != 3 or not all(parts):
        raise SchemaError(f"{key!r} is not a service key ({SERVICES_PREFIX}/<cluster>/<namespace>/<name>)")
    return ServiceKey(*parts)


def parse_node_key(key: str) -> tuple[str, str]:
    """A node key of a cluster's state or of a KVStoreMesh cache."""
    parts = _key_rest(key, (NODES_PREFIX, CACHE_NODES_PREFIX)).split("/")
    if len(parts) != 2 or not all(parts):
        raise SchemaError(f"{key!r} is not a node key ({NODES_PREFIX}/<cluster>/<node>)")
    return parts[0], parts[1]


def encode(payload: Mapping[str, Any]) -> str:
    """Canonical JSON: equal records give equal bytes, so writers can skip no-op puts."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def _decode_object(raw: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SchemaError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SchemaError("record must be a JSON object")
    return data


# ---------------------------------------------------------------- ClusterService


@dataclass(frozen=True, order=True, slots=True)
class PortConfig:
    """Cilium's L4Addr: ``{"Protocol": "TCP", "Port": 80}``.

    ``ANY`` and ``NONE`` are Cilium's protocol wildcards: its datapath stores
    both as protocol 0, which matches every L4 protocol (pkg/u8proto).
    """

    protocol: str
    port: int

    def validate(self) -> PortConfig:
        if not isinstance(self.protocol, str) or self.protocol not in PROTOCOLS:
            raise SchemaError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise SchemaError(f"port {self.port!r} is outside 1..65535")
        return self

    @property
    def is_wildcard(self) -> bool:
        return self.protocol in WILDCARD_PROTOCOLS

    def to_json(self) -> dict[str, Any]:
        return {"Protocol": self.protocol, "Port": self.port}

    @classmethod
    def from_json(cls, data: object) -> PortConfig:
        if not isinstance(data, dict):
            raise SchemaError(f"port config must be an object like {{\"Protocol\": \"TCP\", \"Port\": 80}}, "
                              f"got {data!r}")
        protocol, port = data.get("Protocol"), data.get("Port")
        if not isinstance(protocol, str):
            raise SchemaError(f"Protocol must be a string, got {protocol!r}")
        if isinstance(port, bool) or not isinstance(port, int):
            raise SchemaError(f"Port must be an integer, got {port!r}")
        shared = _PORT_CONFIGS.get((protocol, port))
        if shared is None:
            shared = cls(protocol=protocol, port=port).validate()
            if len(_PORT_CONFIGS) < _SHARED_MAX:
                _PORT_CONFIGS[(protocol, port)] = shared
        return shared


# A mesh of 10,000 Services holds tens of thousands of records, most with the same few
# ports: decoded records share equal port configs and port maps (both immutable in use)
# instead of each holding its own copies. Bounded, so odd input cannot grow them forever.
_SHARED_MAX = 65536
_PORT_CONFIGS: dict[tuple[str, int], PortConfig] = {}
_PORT_MAPS: dict[tuple[tuple[str, PortConfig], ...], Mapping[str, PortConfig]] = {}
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _shared_port_map(by_name: dict[str, PortConfig]) -> Mapping[str, PortConfig]:
    key = tuple(by_name.items())
    shared = _PORT_MAPS.get(key)
    if shared is None:
        shared = MappingProxyType(by_name)
        if len(_PORT_MAPS) < _SHARED_MAX:
            _PORT_MAPS[key] = shared
    return shared


# IP -> port name -> PortConfig. The port name is "" for an unnamed port.
PortsByIP = Mapping[str, Mapping[str, PortConfig]]


def _ports_to_json(ports: PortsByIP) -> dict[str, dict[str, dict[str, Any]]]:
    return {ip: {name: pc.to_json() for name, pc in by_name.items()} for ip, by_name in ports.items()}


def _ports_from_json(what: str, data: object) -> PortsByIP:
    if data is None:
        return _EMPTY
    if not isinstance(data, dict):
        raise SchemaError(f"{what} must be an object of IP -> port name -> port config, got {data!r}")
    out: dict[str, Mapping[str, PortConfig]] = {}
    for ip, by_name in data.items():
        ip_text = _validate_ip(ip)
        if not isinstance(by_name, dict):
            raise SchemaError(f"{what}[{ip}] must be an object of port name -> port config, got {by_name!r}")
        try:
            out[ip_text] = _shared_port_map({sys.intern(name): PortConfig.from_json(pc)
                                             for name, pc in by_name.items()})
        except SchemaError as exc:
            raise SchemaError(f"{what}[{ip}]: {exc}") from exc
    return out


def _str_map(what: str, data: object) -> Mapping[str, str]:
    if data is None or data == {}:
        return _EMPTY
    if not isinstance(data, dict):
        raise SchemaError(f"{what} must be an object of strings, got {data!r}")
    for k, v in data.items():
        if not isinstance(v, str):
            raise SchemaError(f"{what} must be an object of strings: {what}[{k}] is {v!r}")
    return dict(data)


def _ip_str_map(what: str, data: object) -> Mapping[str, str]:
    checked = _str_map(what, data)
    return {_validate_ip(ip): value for ip, value in checked.items()} if checked else _EMPTY


def _bool(what: str, data: object) -> bool:
    # Strict as Go's decoder: "false" (a string) is not false, and must not read as true.
    if not isinstance(data, bool):
        raise SchemaError(f"{what} must be true or false, not {data!r}")
    return data


def _optional_bool(what: str, data: Mapping[str, Any], name: str) -> bool:
    """A Go bool field: absent or null leaves it false (Go ignores a JSON null for a bool)."""
    value = data.get(name)
    return False if value is None else _bool(what, value)


def _zones(data: object) -> Mapping[str, Mapping[str, Any]]:
    """Cilium's zones: backend IP -> {"zone": str, "forZones": [{"name": str}, ...]}.

    Kept as Cilium's JSON objects so a record re-encodes to the same bytes;
    Go writes ``null`` for a missing forZones list, so that is accepted too.
    """
    if data is None or data == {}:
        return _EMPTY
    if not isinstance(data, dict):
        raise SchemaError(f"zones must be an object of backend IP -> zone object, got {data!r}")
    out: dict[str, dict[str, Any]] = {}
    for ip, zone in data.items():
        ip_text = _validate_ip(ip)
        if not isinstance(zone, dict):
            raise SchemaError(f"zones[{ip}] must be an object like {{\"zone\": \"eu-1a\"}}, got {zone!r}")
        if zone.get("zone") is not None and not isinstance(zone["zone"], str):
            raise SchemaError(f"zones[{ip}].zone must be a string, got {zone.get('zone')!r}")
        hints = zone.get("forZones", [])
        if hints is not None and (
            not isinstance(hints, list)
            or not all(isinstance(h, dict) and isinstance(h.get("name"), str) for h in hints)
        ):
            raise SchemaError(f"zones[{ip}].forZones must be a list of {{\"name\": ...}}, got {hints!r}")
        out[ip_text] = {k: v for k, v in zone.items() if k in ("zone", "forZones")}
    return out


def backend_zone(zone: str, for_zones: Iterable[str] = ()) -> dict[str, Any]:
    """One entry of ``zones`` as Cilium writes it: both keys, forZones ``[]`` when there are no hints."""
    return {"zone": zone, "forZones": [{"name": name} for name in for_zones]}


@dataclass(frozen=True, slots=True)
class ClusterService:
    """One global Service as one cluster offers it (Cilium's ClusterService)."""

    cluster: str
    namespace: str
    name: str
    cluster_id: int
    frontends: PortsByIP = field(default_factory=dict)
    backends: PortsByIP = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    selector: Mapping[str, str] = field(default_factory=dict)
    include_external: bool = True
    shared: bool = True
    # backend IP -> the endpoint's hostname (EndpointSlice ``hostname``); Cilium omits it when empty
    hostnames: Mapping[str, str] = field(default_factory=dict)
    # Cilium's per-backend zone: IP -> {"zone": "eu-1a", "forZones": [{"name": "eu-1b"}]}
    zones: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return service_key(self.cluster, self.namespace, self.name)

    def validate(self, max_cluster_id: int = MAX_CLUSTER_ID) -> ClusterService:
        validate_cluster_name(self.cluster)
        validate_cluster_id(self.cluster_id, max_cluster_id)
        _validate_object_name("namespace", self.namespace)
        _validate_object_name("service name", self.name)
        for ports in (self.frontends, self.backends):
            for ip, by_name in ports.items():
                _validate_ip(ip)
                for pc in by_name.values():
                    pc.validate()
        for ip in (*self.hostnames, *self.zones):
            _validate_ip(ip)
        return self

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "cluster": self.cluster,
            "namespace": self.namespace,
            "name": self.name,
            "frontends": _ports_to_json(self.frontends),
            "backends": _ports_to_json(self.backends),
            "labels": dict(self.labels),
            "selector": dict(self.selector),
            "includeExternal": self.include_external,
            "shared": self.shared,
            "clusterID": self.cluster_id,
        }
        # Cilium omits these when empty.
        if self.hostnames:
            data["hostnames"] = dict(self.hostnames)
        if self.zones:
            data["zones"] = {ip: dict(z) for ip, z in self.zones.items()}
        return data

    def encode(self) -> str:
        return encode(self.to_json())

    @classmethod
    def decode(
        cls, raw: str | bytes, key: str | None = None, *, max_cluster_id: int = MAX_CLUSTER_ID
    ) -> ClusterService:
        """Parse and validate; with ``key``, the payload must name the same service.

        ``max_cluster_id`` is the mesh's max-connected-clusters (255 or 511).
        Types are as strict as Go's decoder: a number where a string belongs
        is refused, never coerced.
        """
        data = _decode_object(raw)
        svc = cls(
            cluster=sys.intern(_str("cluster name", data.get("cluster", ""))),
            namespace=sys.intern(_str("namespace", data.get("namespace", ""))),
            name=_str("service name", data.get("name", "")),
            # Go writes 0 for an unset ID; validate() refuses it with the range in the message.
            cluster_id=data.get("clusterID", 0),
            frontends=_ports_from_json("frontends", data.get("frontends")),
            backends=_ports_from_json("backends", data.get("backends")),
            labels=_str_map("labels", data.get("labels")),
            selector=_str_map("selector", data.get("selector")),
            include_external=_optional_bool("includeExternal", data, "includeExternal"),
            shared=_optional_bool("shared", data, "shared"),
            hostnames=_ip_str_map("hostnames", data.get("hostnames")),
            zones=_zones(data.get("zones")),
        ).validate(max_cluster_id)
        if key is not None:
            parsed = parse_service_key(key)
            if (parsed.cluster, parsed.namespace, parsed.name) != (svc.cluster, svc.namespace, svc.name):
                raise SchemaError(
                    f"key {key!r} does not match payload {svc.cluster}/{svc.namespace}/{svc.name}"
                )
        return svc


# ---------------------------------------------------------------- Node


@dataclass(frozen=True)
class NodeAddress:
    type: str  # "InternalIP", "ExternalIP", "CiliumInternalIP"
    ip: str


# Node fields this module reads; every other field of Cilium's Node (health and
# ingress IPs, Source, EncryptionKey, Labels, NodeIdentity, ...) is kept as is.
_NODE_FIELDS = (
    "Name", "Cluster", "ClusterID", "IPAddresses",
    "IPv4AllocCIDR", "IPv6AllocCIDR", "IPv4SecondaryAllocCIDRs", "IPv6SecondaryAllocCIDRs",
)


@dataclass(frozen=True)
class Node:
    """A node of a cluster: its addresses and pod CIDRs, in Cilium's Go field names."""

    name: str
    cluster: str
    cluster_id: int
    addresses: tuple[NodeAddress, ...] = ()
    ipv4_pod_cidr: str | None = None
    ipv6_pod_cidr: str | None = None
    # Cilium's IPv4SecondaryAllocCIDRs / IPv6SecondaryAllocCIDRs (multi-pool IPAM, ENI, ...)
    ipv4_secondary_pod_cidrs: tuple[str, ...] = ()
    ipv6_secondary_pod_cidrs: tuple[str, ...] = ()
    # The rest of a Cilium-written record, verbatim, so that it re-encodes unchanged.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        return node_key(self.cluster, self.name)

    def internal_ipv4(self) -> str | None:
        for addr in self.addresses:
            if addr.type == "InternalIP" and ipaddress.ip_address(addr.ip).version == 4:
                return addr.ip
        return None

    def ipv4_pod_cidrs(self) -> tuple[str, ...]:
        """Primary first, then the secondary ones."""
        primary = (self.ipv4_pod_cidr,) if self.ipv4_pod_cidr else ()
        return (*primary, *self.ipv4_secondary_pod_cidrs)

    def validate(self, max_cluster_id: int = MAX_CLUSTER_ID) -> Node:
        validate_cluster_name(self.cluster)
        validate_cluster_id(self.cluster_id, max_cluster_id)
        _validate_object_name("node name", self.name)
        for addr in self.addresses:
            _str("address type", addr.type)
            _validate_ip(addr.ip)
        cidrs = [(self.ipv4_pod_cidr, 4), (self.ipv6_pod_cidr, 6)]
        cidrs += [(c, 4) for c in self.ipv4_secondary_pod_cidrs] + [(c, 6) for c in self.ipv6_secondary_pod_cidrs]
        for cidr, version in cidrs:
            if cidr is not None:
                _canonical_cidr(cidr, version)
        return self

    def to_json(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.update({
            "Name": self.name,
            "Cluster": self.cluster,
            "ClusterID": self.cluster_id,
            "IPAddresses": [{"Type": a.type, "IP": a.ip} for a in self.addresses],
            "IPv4AllocCIDR": _ipnet_to_go(self.ipv4_pod_cidr),
            "IPv6AllocCIDR": _ipnet_to_go(self.ipv6_pod_cidr),
        })
        # Go writes null for a nil slice; keep an empty list written by a Cilium agent as it was.
        for name, cidrs in (("IPv4SecondaryAllocCIDRs", self.ipv4_secondary_pod_cidrs),
                            ("IPv6SecondaryAllocCIDRs", self.ipv6_secondary_pod_cidrs)):
            if cidrs:
                data[name] = [_ipnet_to_go(c) for c in cidrs]
        return data

    def encode(self) -> str:
        return encode(self.to_json())

    @classmethod
    def decode(cls, raw: str | bytes, key: str | None = None, *, max_cluster_id: int = MAX_CLUSTER_ID) -> Node:
        data = _decode_object(raw)
        addrs = data.get("IPAddresses")
        if addrs is None:
            addrs = []
        if not isinstance(addrs, list):
            raise SchemaError(f"IPAddresses must be a list, got {addrs!r}")
        addresses = []
        for a in addrs:
            if not isinstance(a, dict):
                raise SchemaError(f"IPAddresses entries must be objects like {{\"Type\": ..., \"IP\": ...}}, got {a!r}")
            addresses.append(NodeAddress(type=_str("IPAddresses[].Type", a.get("Type", "")),
                                         ip=_validate_ip(a.get("IP"))))
        extra = {k: v for k, v in data.items() if k not in _NODE_FIELDS}
        for name in ("IPv4SecondaryAllocCIDRs", "IPv6SecondaryAllocCIDRs"):
            if name in data and not data[name]:
                extra[name] = data[name]  # null or [] as written; to_json writes non-empty lists itself
        node = cls(
            name=_str("node name", data.get("Name", "")),
            cluster=_str("cluster name", data.get("Cluster", "")),
            cluster_id=data.get("ClusterID", 0),
            addresses=tuple(addresses),
            ipv4_pod_cidr=_ipnet_from_go("IPv4AllocCIDR", data.get("IPv4AllocCIDR")),
            ipv6_pod_cidr=_ipnet_from_go("IPv6AllocCIDR", data.get("IPv6AllocCIDR")),
            ipv4_secondary_pod_cidrs=_ipnets_from_go("IPv4SecondaryAllocCIDRs", data.get("IPv4SecondaryAllocCIDRs")),
            ipv6_secondary_pod_cidrs=_ipnets_from_go("IPv6SecondaryAllocCIDRs", data.get("IPv6SecondaryAllocCIDRs")),
            extra=extra,
        ).validate(max_cluster_id)
        if key is not None and parse_node_key(key) != (node.cluster, node.name):
            raise SchemaError(f"key {key!r} does not match payload {node.cluster}/{node.name}")
        return node


def _canonical_cidr(cidr: str, version: int) -> str:
    """A CIDR with no host bits set, of the given IP version, in canonical text."""
    if not isinstance(cidr, str):
        raise SchemaError(f"pod CIDR must be a string, got {cidr!r}")
    if "%" in cidr:
        raise SchemaError(f"pod CIDR {cidr!r}: IPv6 zones are not supported in records")
    try:
        net = ipaddress.ip_network(cidr)
    except ValueError as exc:
        raise SchemaError(f"pod CIDR {cidr!r} is not a canonical CIDR (no host bits set): {exc}") from exc
    if net.version != version:
        raise SchemaError(f"pod CIDR {cidr!r} is not IPv{version}")
    return str(net)


def _ipnet_to_go(cidr: str | None) -> dict[str, str] | None:
    """Go's net.IPNet marshals as {"IP": "...", "Mask": base64(mask bytes)}; Cilium still writes this form."""
    if cidr is None:
        return None
    net = ipaddress.ip_network(cidr)
    return {
        "IP": str(net.network_address),
        "Mask": base64.b64encode(net.netmask.packed).decode("ascii"),
    }


def _ipnet_from_go(what: str, data: object) -> str | None:
    """Both forms Cilium reads: the string "10.244.1.0/24" and Go's {"IP", "Mask"} object.

    Stricter than Cilium on one point: a CIDR with host bits set is refused
    rather than silently masked, since it means the writer is confused.
    """
    if data is None:
        return None
    if isinstance(data, str):
        try:
            net = ipaddress.ip_network(data)
        except ValueError as exc:
            raise SchemaError(f"{what} {data!r} is not a canonical CIDR (no host bits set): {exc}") from exc
        return str(net)
    if not isinstance(data, dict):
        raise SchemaError(f"{what} must be a CIDR string or an object with IP and Mask, got {data!r}")
    ip_text, mask_text = data.get("IP"), data.get("Mask")
    if not isinstance(ip_text, str) or not isinstance(mask_text, str):
        raise SchemaError(f"{what}: IP and Mask must be strings (Mask is base64), got {data!r}")
    ip = ipaddress.ip_address(_validate_ip(ip_text))
    try:
        mask = base64.b64decode(mask_text, validate=True)
    except ValueError as exc:
        raise SchemaError(f"{what}: Mask {mask_text!r} is not base64") from exc
    width = 4 if ip.version == 4 else 16
    if len(mask) != width:
        raise SchemaError(f"{what}: a {len(mask)}-byte Mask does not fit IPv{ip.version} {ip} (want {width} bytes)")
    bits = int.from_bytes(mask, "big")
    prefix = bits.bit_count()
    # Canonical masks are ones then zeros, which is what Go's IPMask.Size() requires too.
    if bits != ((1 << (8 * width)) - 1) ^ ((1 << (8 * width - prefix)) - 1):
        raise SchemaError(f"{what}: Mask {mask_text!r} is not a canonical (contiguous) mask")
    try:
        return str(ipaddress.ip_network(f"{ip}/{prefix}"))
    except ValueError as exc:
        raise SchemaError(f"{what} {ip}/{prefix} has host bits set; want the network address") from exc


def _ipnets_from_go(what: str, data: object) -> tuple[str, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise SchemaError(f"{what} must be a list of CIDRs, got {data!r}")
    out = []
    for item in data:
        cidr = _ipnet_from_go(f"{what}[]", item)
        if cidr is not None:
            out.append(cidr)
    return tuple(out)


# ---------------------------------------------------------------- ClusterConfig


@dataclass(frozen=True)
class ClusterConfig:
    """Cilium's CiliumClusterConfig at ``cilium/cluster-config/<cluster>``.

    Go writes it with ``omitempty`` on every field, so a false capability is
    absent: ``synced_canaries`` False means the writer has no synced markers and
    a reader trusts its records at once (as Cilium does) instead of waiting.
    """

    cluster_id: int
    synced_canaries: bool = True
    max_connected_clusters: int = MAX_CLUSTER_ID
    # Records are cached by a kvstoremesh under cilium/cache/; kept for round trips.
    cached: bool = False
    # MCS-API ServiceExports: None when the writer does not know the capability.
    service_exports_enabled: bool | None = None

    def validate(self) -> ClusterConfig:
        validate_max_connected_clusters(self.max_connected_clusters)
        validate_cluster_id(self.cluster_id, self.max_connected_clusters)
        for what, value in (("syncedCanaries", self.synced_canaries), ("cached", self.cached)):
            _bool(f"capabilities.{what}", value)
        if self.service_exports_enabled is not None:
            _bool("capabilities.serviceExportsEnabled", self.service_exports_enabled)
        return self

    def to_json(self) -> dict[str, Any]:
        caps: dict[str, Any] = {}
        if self.synced_canaries:
            caps["syncedCanaries"] = True
        if self.cached:
            caps["cached"] = True
        caps["maxConnectedClusters"] = self.max_connected_clusters
        if self.service_exports_enabled is not None:
            caps["serviceExportsEnabled"] = self.service_exports_enabled
        return {"id": self.cluster_id, "capabilities": caps}

    def encode(self) -> str:
        return encode(self.to_json())

    @classmethod
    def decode(cls, raw: str | bytes) -> ClusterConfig:
        data = _decode_object(raw)
        caps = data.get("capabilities")
        if caps is None:
            caps = {}
        if not isinstance(caps, dict):
            raise SchemaError(f"capabilities must be an object, got {caps!r}")
        max_connected = caps.get("maxConnectedClusters")
        if max_connected is None or (max_connected == 0 and not isinstance(max_connected, bool)):
            max_connected = MAX_CLUSTER_ID  # absent (omitempty) or from writers older than it: Cilium's default
        exports = caps.get("serviceExportsEnabled")
        return cls(
            # Go's omitempty drops a zero ID; 0 is reserved, so validate() refuses it with the range.
            cluster_id=data.get("id", 0),
            synced_canaries=_optional_bool("capabilities.syncedCanaries", caps, "syncedCanaries"),
            max_connected_clusters=validate_max_connected_clusters(max_connected),
            cached=_optional_bool("capabilities.cached", caps, "cached"),
            service_exports_enabled=(
                None if exports is None else _bool("capabilities.serviceExportsEnabled", exports)
            ),
        ).validate()


# ---------------------------------------------------------------- ServiceExport (MCS-API)

SERVICE_IMPORT_TYPES = ("ClusterSetIP", "Headless")
SESSION_AFFINITIES = ("None", "ClientIP")
INTERNAL_TRAFFIC_POLICIES = ("Cluster", "Local")
TRAFFIC_DISTRIBUTIONS = ("PreferClose", "PreferSameZone", "PreferSameNode")
IP_FAMILIES = ("IPv4", "IPv6")


@dataclass(frozen=True, order=True, slots=True)
class McsPort:
    """mcs-api's ServicePort: ``{"name", "protocol", "appProtocol", "port"}`` (all but port omitempty)."""

    port: int
    protocol: str = "TCP"
    name: str = ""
    app_protocol: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"port": self.port}
        if self.name:
            out["name"] = self.name
        if self.protocol:
            out["protocol"] = self.protocol
        if self.app_protocol is not None:
            out["appProtocol"] = self.app_protocol
        return out

    @classmethod
    def from_json(cls, what: str, data: object) -> McsPort:
        if not isinstance(data, dict):
            raise SchemaError(f"{what} must be an object like {{\"port\": 80, \"protocol\": \"TCP\"}}, got {data!r}")
        port = data.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise SchemaError(f"{what}.port must be a number from 1 to 65535, got {port!r}")
        protocol = _str(f"{what}.protocol", data.get("protocol") or "")
        if protocol and protocol not in KUBERNETES_PROTOCOLS:
            raise SchemaError(f"{what}.protocol must be one of {', '.join(KUBERNETES_PROTOCOLS)}, got {protocol!r}")
        app = data.get("appProtocol")
        return cls(port=port, protocol=protocol, name=_str(f"{what}.name", data.get("name") or ""),
                   app_protocol=None if app is None else _str(f"{what}.appProtocol", app))


def _choice(what: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise SchemaError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ServiceExportRecord:
    """One exported Service as its cluster offers it to the set (Cilium's MCSAPIServiceSpec) at
    ``cilium/state/serviceexports/v1/<cluster>/<namespace>/<name>``. Conflicts between clusters are
    resolved by ``export_created`` (the ServiceExport's creationTimestamp), then the cluster name."""

    cluster: str
    namespace: str
    name: str
    export_created: str
    ports: tuple[McsPort, ...] = ()
    type: str = "ClusterSetIP"
    session_affinity: str = "None"
    session_affinity_timeout: int | None = None
    ip_families: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    internal_traffic_policy: str | None = None
    traffic_distribution: str | None = None

    @property
    def key(self) -> str:
        return service_export_key(self.cluster, self.namespace, self.name)

    @property
    def created(self) -> dt.datetime:
        return parse_rfc3339(self.export_created)

    def validate(self) -> ServiceExportRecord:
        validate_cluster_name(self.cluster)
        _validate_object_name("namespace", self.namespace)
        _validate_object_name("name", self.name)
        if not self.export_created:
            raise SchemaError("exportCreationTimestamp is unset")
        parse_rfc3339(self.export_created)
        _choice("type", self.type, SERVICE_IMPORT_TYPES)
        _choice("sessionAffinity", self.session_affinity, SESSION_AFFINITIES)
        for family in self.ip_families:
            _choice("ipFamilies[]", family, IP_FAMILIES)
        if self.internal_traffic_policy is not None:
            _choice("internalTrafficPolicy", self.internal_traffic_policy, INTERNAL_TRAFFIC_POLICIES)
        if self.traffic_distribution is not None:
            _choice("trafficDistribution", self.traffic_distribution, TRAFFIC_DISTRIBUTIONS)
        return self

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "cluster": self.cluster, "name": self.name, "namespace": self.namespace,
            "exportCreationTimestamp": self.export_created,
            "ports": [p.to_json() for p in self.ports],
            "type": self.type, "sessionAffinity": self.session_affinity,
        }
        if self.labels:  # Cilium also writes the capitalised legacy copies, for its older readers
            data["labels"] = data["Labels"] = dict(self.labels)
        if self.annotations:
            data["annotations"] = data["Annotations"] = dict(self.annotations)
        if self.session_affinity_timeout is not None:
            data["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": self.session_affinity_timeout}}
        if self.ip_families:
            data["ipFamilies"] = list(self.ip_families)
        if self.internal_traffic_policy is not None:
            data["internalTrafficPolicy"] = self.internal_traffic_policy
        if self.traffic_distribution is not None:
            data["trafficDistribution"] = self.traffic_distribution
        return data

    def encode(self) -> str:
        return encode(self.to_json())

    @classmethod
    def decode(cls, raw: str | bytes, key: str | None = None) -> ServiceExportRecord:
        """Parse and validate as Cilium does (every field its reader checks); with ``key``, the payload
        must name the same cluster, namespace and name."""
        data = _decode_object(raw)
        created = data.get("exportCreationTimestamp")
        ports = data.get("ports")
        if ports is not None and not isinstance(ports, list):
            raise SchemaError(f"ports must be a list, got {ports!r}")
        timeout: int | None = None
        config = data.get("sessionAffinityConfig")
        if config is not None:
            client_ip = config.get("clientIP") if isinstance(config, dict) else None
            value = client_ip.get("timeoutSeconds") if isinstance(client_ip, dict) else None
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise SchemaError(f"sessionAffinityConfig.clientIP.timeoutSeconds must be a number, got {value!r}")
            timeout = value
        families = data.get("ipFamilies") or []
        if not isinstance(families, list):
            raise SchemaError(f"ipFamilies must be a list, got {families!r}")
        record = cls(
            cluster=_str("cluster", data.get("cluster", "")),
            namespace=_str("namespace", data.get("namespace", "")),
            name=_str("name", data.get("name", "")),
            export_created="" if created is None else _str("exportCreationTimestamp", created),
            ports=tuple(McsPort.from_json(f"ports[{i}]", p) for i, p in enumerate(ports or [])),
            type=data.get("type", ""),
            session_affinity=data.get("sessionAffinity", ""),
            session_affinity_timeout=timeout,
            ip_families=tuple(families),
            labels=_str_map("labels", data.get("labels") or data.get("Labels")),
            annotations=_str_map("annotations", data.get("annotations") or data.get("Annotations")),
            internal_traffic_policy=data.get("internalTrafficPolicy"),
            traffic_distribution=data.get("trafficDistribution"),
        ).validate()
        if key is not None:
            parsed = parse_service_export_key(key)
            if (parsed.cluster, parsed.namespace, parsed.name) != (record.cluster, record.namespace, record.name):
                raise SchemaError(
                    f"key {key!r} does not match payload {record.cluster}/{record.namespace}/{record.name}")
        return record


# ---------------------------------------------------------------- times


def rfc3339_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SchemaError(f"{text!r} is not an RFC3339 time") from exc
