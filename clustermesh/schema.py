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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STATE_PREFIX = "cilium/state"
SERVICES_PREFIX = "cilium/state/services/v1"
NODES_PREFIX = "cilium/state/nodes/v1"
CLUSTER_CONFIG_PREFIX = "cilium/cluster-config"
SYNCED_PREFIX = "cilium/synced"
HEARTBEAT_KEY = "cilium/.heartbeat"

MAX_CLUSTER_NAME_LEN = 32
MIN_CLUSTER_ID = 1
MAX_CLUSTER_ID = 255
PROTOCOLS = ("TCP", "UDP", "SCTP")

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


def validate_cluster_id(cluster_id: object) -> int:
    if isinstance(cluster_id, bool) or not isinstance(cluster_id, int):
        raise SchemaError(f"cluster ID must be an integer, got {cluster_id!r}")
    if not MIN_CLUSTER_ID <= cluster_id <= MAX_CLUSTER_ID:
        raise SchemaError(f"cluster ID {cluster_id} is outside {MIN_CLUSTER_ID}..{MAX_CLUSTER_ID}")
    return cluster_id


def _validate_object_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{kind} must be a non-empty string")
    if len(name) > 253 or not _OBJECT_NAME_RE.match(name):
        raise SchemaError(f"{kind} {name!r} is not a valid Kubernetes name")
    return name


def _validate_ip(ip: object) -> str:
    if not isinstance(ip, str):
        raise SchemaError(f"IP address must be a string, got {ip!r}")
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError as exc:
        raise SchemaError(f"{ip!r} is not an IP address") from exc


# ---------------------------------------------------------------- keys


def service_key(cluster: str, namespace: str, name: str) -> str:
    return f"{SERVICES_PREFIX}/{cluster}/{namespace}/{name}"


def services_cluster_prefix(cluster: str) -> str:
    return f"{SERVICES_PREFIX}/{cluster}/"


def node_key(cluster: str, node: str) -> str:
    return f"{NODES_PREFIX}/{cluster}/{node}"


def nodes_cluster_prefix(cluster: str) -> str:
    return f"{NODES_PREFIX}/{cluster}/"


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


def parse_service_key(key: str) -> ServiceKey:
    rest = key.removeprefix(SERVICES_PREFIX + "/")
    parts = rest.split("/")
    if rest == key or len(parts) != 3 or not all(parts):
        raise SchemaError(f"{key!r} is not a service key ({SERVICES_PREFIX}/<cluster>/<namespace>/<name>)")
    return ServiceKey(*parts)


def parse_node_key(key: str) -> tuple[str, str]:
    rest = key.removeprefix(NODES_PREFIX + "/")
    parts = rest.split("/")
    if rest == key or len(parts) != 2 or not all(parts):
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


@dataclass(frozen=True, order=True)
class PortConfig:
    """Cilium's L4Addr: ``{"Protocol": "TCP", "Port": 80}``."""

    protocol: str
    port: int

    def validate(self) -> PortConfig:
        if self.protocol not in PROTOCOLS:
            raise SchemaError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise SchemaError(f"port {self.port!r} is outside 1..65535")
        return self

    def to_json(self) -> dict[str, Any]:
        return {"Protocol": self.protocol, "Port": self.port}

    @classmethod
    def from_json(cls, data: object) -> PortConfig:
        if not isinstance(data, dict):
            raise SchemaError(f"port config must be an object, got {data!r}")
        return cls(protocol=data.get("Protocol"), port=data.get("Port")).validate()  # type: ignore[arg-type]


# IP -> port name -> PortConfig. The port name is "" for an unnamed port.
PortsByIP = Mapping[str, Mapping[str, PortConfig]]


def _ports_to_json(ports: PortsByIP) -> dict[str, dict[str, dict[str, Any]]]:
    return {ip: {name: pc.to_json() for name, pc in by_name.items()} for ip, by_name in ports.items()}


def _ports_from_json(what: str, data: object) -> dict[str, dict[str, PortConfig]]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SchemaError(f"{what} must be an object")
    out: dict[str, dict[str, PortConfig]] = {}
    for ip, by_name in data.items():
        ip_text = _validate_ip(ip)
        if not isinstance(by_name, dict):
            raise SchemaError(f"{what}[{ip}] must be an object")
        out[ip_text] = {str(name): PortConfig.from_json(pc) for name, pc in by_name.items()}
    return out


def _str_map(what: str, data: object) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise SchemaError(f"{what} must be an object of strings")
    return dict(data)


def _bool(what: str, data: object) -> bool:
    # Strict as Go's decoder: "false" (a string) is not false, and must not read as true.
    if not isinstance(data, bool):
        raise SchemaError(f"{what} must be true or false, not {data!r}")
    return data


def _zones(data: object) -> dict[str, dict[str, Any]]:
    """Cilium's zones: backend IP -> {"zone": str, "forZones": [{"name": str}, ...]}."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SchemaError("zones must be an object of backend IP -> zone object")
    out: dict[str, dict[str, Any]] = {}
    for ip, zone in data.items():
        _validate_ip(ip)
        if not isinstance(zone, dict):
            raise SchemaError(f"zones[{ip}] must be an object like {{\"zone\": \"eu-1a\"}}")
        if not isinstance(zone.get("zone", ""), str):
            raise SchemaError(f"zones[{ip}].zone must be a string")
        hints = zone.get("forZones", [])
        if not isinstance(hints, list) or not all(isinstance(h, dict) and isinstance(h.get("name"), str)
                                                  for h in hints):
            raise SchemaError(f"zones[{ip}].forZones must be a list of {{\"name\": ...}}")
        out[ip] = {k: v for k, v in zone.items() if k in ("zone", "forZones")}
    return out


@dataclass(frozen=True)
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
    hostnames: Mapping[str, str] = field(default_factory=dict)
    # Cilium's per-backend zone: IP -> {"zone": "eu-1a", "forZones": [{"name": "eu-1b"}]} (both optional)
    zones: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return service_key(self.cluster, self.namespace, self.name)

    def validate(self) -> ClusterService:
        validate_cluster_name(self.cluster)
        validate_cluster_id(self.cluster_id)
        _validate_object_name("namespace", self.namespace)
        _validate_object_name("service name", self.name)
        for ports in (self.frontends, self.backends):
            for ip, by_name in ports.items():
                _validate_ip(ip)
                for pc in by_name.values():
                    pc.validate()
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
    def decode(cls, raw: str | bytes, key: str | None = None) -> ClusterService:
        """Parse and validate; with ``key``, the payload must name the same service."""
        data = _decode_object(raw)
        cluster_id = data.get("clusterID", 0)
        svc = cls(
            cluster=data.get("cluster"),  # type: ignore[arg-type]
            namespace=data.get("namespace"),  # type: ignore[arg-type]
            name=data.get("name"),  # type: ignore[arg-type]
            cluster_id=cluster_id,
            frontends=_ports_from_json("frontends", data.get("frontends")),
            backends=_ports_from_json("backends", data.get("backends")),
            labels=_str_map("labels", data.get("labels")),
            selector=_str_map("selector", data.get("selector")),
            include_external=_bool("includeExternal", data.get("includeExternal", False)),
            shared=_bool("shared", data.get("shared", False)),
            hostnames=_str_map("hostnames", data.get("hostnames")),
            zones=_zones(data.get("zones")),
        ).validate()
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


@dataclass(frozen=True)
class Node:
    """A node of a cluster: its addresses and pod CIDRs, in Cilium's Go field names."""

    name: str
    cluster: str
    cluster_id: int
    addresses: tuple[NodeAddress, ...] = ()
    ipv4_pod_cidr: str | None = None
    ipv6_pod_cidr: str | None = None

    @property
    def key(self) -> str:
        return node_key(self.cluster, self.name)

    def internal_ipv4(self) -> str | None:
        for addr in self.addresses:
            if addr.type == "InternalIP" and ipaddress.ip_address(addr.ip).version == 4:
                return addr.ip
        return None

    def validate(self) -> Node:
        validate_cluster_name(self.cluster)
        validate_cluster_id(self.cluster_id)
        _validate_object_name("node name", self.name)
        for addr in self.addresses:
            _validate_ip(addr.ip)
        for cidr, version in ((self.ipv4_pod_cidr, 4), (self.ipv6_pod_cidr, 6)):
            if cidr is None:
                continue
            try:
                net = ipaddress.ip_network(cidr)
            except ValueError as exc:
                raise SchemaError(f"pod CIDR {cidr!r} does not parse") from exc
            if net.version != version:
                raise SchemaError(f"pod CIDR {cidr!r} is not IPv{version}")
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "Name": self.name,
            "Cluster": self.cluster,
            "ClusterID": self.cluster_id,
            "IPAddresses": [{"Type": a.type, "IP": a.ip} for a in self.addresses],
            "IPv4AllocCIDR": _ipnet_to_go(self.ipv4_pod_cidr),
            "IPv6AllocCIDR": _ipnet_to_go(self.ipv6_pod_cidr),
        }

    def encode(self) -> str:
        return encode(self.to_json())

    @classmethod
    def decode(cls, raw: str | bytes, key: str | None = None) -> Node:
        data = _decode_object(raw)
        addrs = data.get("IPAddresses") or []
        if not isinstance(addrs, list):
            raise SchemaError("IPAddresses must be a list")
        addresses = []
        for a in addrs:
            if not isinstance(a, dict):
                raise SchemaError("IPAddresses entries must be objects")
            addresses.append(NodeAddress(type=str(a.get("Type", "")), ip=_validate_ip(a.get("IP"))))
        node = cls(
            name=data.get("Name"),  # type: ignore[arg-type]
            cluster=data.get("Cluster"),  # type: ignore[arg-type]
            cluster_id=data.get("ClusterID", 0),
            addresses=tuple(addresses),
            ipv4_pod_cidr=_ipnet_from_go(data.get("IPv4AllocCIDR")),
            ipv6_pod_cidr=_ipnet_from_go(data.get("IPv6AllocCIDR")),
        ).validate()
        if key is not None and parse_node_key(key) != (node.cluster, node.name):
            raise SchemaError(f"key {key!r} does not match payload {node.cluster}/{node.name}")
        return node


def _ipnet_to_go(cidr: str | None) -> dict[str, str] | None:
    """Go's net.IPNet marshals as {"IP": "...", "Mask": base64(mask bytes)}."""
    if cidr is None:
        return None
    net = ipaddress.ip_network(cidr, strict=False)
    return {
        "IP": str(net.network_address),
        "Mask": base64.b64encode(net.netmask.packed).decode("ascii"),
    }


def _ipnet_from_go(data: object) -> str | None:
    if data is None:
        return None
    if isinstance(data, str):  # the string form Cilium also reads (and plans to write)
        try:
            net = ipaddress.ip_network(data)
        except ValueError as exc:
            raise SchemaError(f"pod CIDR {data!r} does not parse (want a canonical CIDR)") from exc
        return str(net)
    if not isinstance(data, dict):
        raise SchemaError("pod CIDR must be a CIDR string or an object with IP and Mask")
    try:
        ip = ipaddress.ip_address(data["IP"])
        mask = base64.b64decode(data["Mask"], validate=True)
        prefix = int.from_bytes(mask, "big").bit_count()
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
    except (KeyError, ValueError, TypeError) as exc:
        raise SchemaError(f"pod CIDR {data!r} does not parse") from exc


# ---------------------------------------------------------------- ClusterConfig


@dataclass(frozen=True)
class ClusterConfig:
    cluster_id: int
    synced_canaries: bool = True
    max_connected_clusters: int = 255

    def validate(self) -> ClusterConfig:
        validate_cluster_id(self.cluster_id)
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.cluster_id,
            "capabilities": {
                "syncedCanaries": self.synced_canaries,
                "maxConnectedClusters": self.max_connected_clusters,
            },
        }

    def encode(self) -> str:
        return encode(self.to_json())

    @classmethod
    def decode(cls, raw: str | bytes) -> ClusterConfig:
        data = _decode_object(raw)
        caps = data.get("capabilities") or {}
        if not isinstance(caps, dict):
            raise SchemaError("capabilities must be an object")
        return cls(
            cluster_id=data.get("id"),  # type: ignore[arg-type]
            synced_canaries=bool(caps.get("syncedCanaries", False)),
            max_connected_clusters=int(caps.get("maxConnectedClusters", 255)),
        ).validate()


# ---------------------------------------------------------------- times


def rfc3339_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SchemaError(f"{text!r} is not an RFC3339 time") from exc
