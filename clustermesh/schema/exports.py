"""``ServiceExportRecord`` at ``cilium/state/serviceexports/v1/<cluster>/<namespace>/<name>``: an MCS-API
ServiceExport as Cilium writes it (ports, type, session affinity, IP families, labels). Pure."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clustermesh.schema.core import (
    KUBERNETES_PROTOCOLS,
    SchemaError,
    _decode_object,
    _str,
    _str_map,
    _validate_object_name,
    encode,
    parse_rfc3339,
    parse_service_export_key,
    service_export_key,
    validate_cluster_name,
)

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
