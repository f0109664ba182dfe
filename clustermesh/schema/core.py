"""The store's key layout (Cilium's prefixes, versioned: ``cilium/state/<kind>/v1/...``), what a name,
ID or IP must be, keys built and parsed, the canonical JSON codec, strict JSON field readers and RFC3339
times. Pure."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
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


_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _str_map(what: str, data: object) -> Mapping[str, str]:
    if data is None or data == {}:
        return _EMPTY
    if not isinstance(data, dict):
        raise SchemaError(f"{what} must be an object of strings, got {data!r}")
    for k, v in data.items():
        if not isinstance(v, str):
            raise SchemaError(f"{what} must be an object of strings: {what}[{k}] is {v!r}")
    return dict(data)


def _bool(what: str, data: object) -> bool:
    # Strict as Go's decoder: "false" (a string) is not false, and must not read as true.
    if not isinstance(data, bool):
        raise SchemaError(f"{what} must be true or false, not {data!r}")
    return data


def _optional_bool(what: str, data: Mapping[str, Any], name: str) -> bool:
    """A Go bool field: absent or null leaves it false (Go ignores a JSON null for a bool)."""
    value = data.get(name)
    return False if value is None else _bool(what, value)


def rfc3339_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SchemaError(f"{text!r} is not an RFC3339 time") from exc
