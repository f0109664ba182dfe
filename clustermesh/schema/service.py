"""``ClusterService`` at ``cilium/state/services/v1/<cluster>/<namespace>/<name>``: frontends,
backends (with zones), ports, the shared/includeExternal flags, in Cilium's JSON shape. Pure."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from clustermesh.schema.core import (
    _EMPTY,
    MAX_CLUSTER_ID,
    PROTOCOLS,
    WILDCARD_PROTOCOLS,
    SchemaError,
    _decode_object,
    _optional_bool,
    _str,
    _str_map,
    _validate_ip,
    _validate_object_name,
    encode,
    parse_service_key,
    service_key,
    validate_cluster_id,
    validate_cluster_name,
)


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


def _ip_str_map(what: str, data: object) -> Mapping[str, str]:
    checked = _str_map(what, data)
    return {_validate_ip(ip): value for ip, value in checked.items()} if checked else _EMPTY


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
