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

One package, cut by record: core.py (key layout, names, IDs, codec, times), service.py, node.py,
config.py, exports.py. Callers import the package: ``from clustermesh import schema``.
"""

from __future__ import annotations

from clustermesh.schema.config import (
    ClusterConfig,
)
from clustermesh.schema.core import (
    CACHE_NODES_PREFIX,
    CACHE_PREFIX,
    CACHE_SERVICES_PREFIX,
    CLUSTER_CONFIG_PREFIX,
    HAS_CLUSTER_CONFIG_KEY,
    HEARTBEAT_KEY,
    KUBERNETES_PROTOCOLS,
    MAX_CLUSTER_ID,
    MAX_CLUSTER_ID_EXTENDED,
    MAX_CLUSTER_NAME_LEN,
    MAX_CONNECTED_CLUSTERS_CHOICES,
    MIN_CLUSTER_ID,
    NODES_PREFIX,
    PROTOCOLS,
    SERVICE_EXPORTS_PREFIX,
    SERVICES_PREFIX,
    STATE_PREFIX,
    SYNCED_PREFIX,
    WILDCARD_PROTOCOLS,
    SchemaError,
    ServiceKey,
    cluster_config_key,
    encode,
    node_key,
    nodes_cluster_prefix,
    parse_node_key,
    parse_rfc3339,
    parse_service_export_key,
    parse_service_key,
    record_prefixes,
    rfc3339_now,
    service_export_key,
    service_exports_cluster_prefix,
    service_key,
    services_cluster_prefix,
    state_to_cache,
    synced_key,
    validate_cluster_id,
    validate_cluster_name,
    validate_max_connected_clusters,
)
from clustermesh.schema.exports import (
    INTERNAL_TRAFFIC_POLICIES,
    IP_FAMILIES,
    SERVICE_IMPORT_TYPES,
    SESSION_AFFINITIES,
    TRAFFIC_DISTRIBUTIONS,
    McsPort,
    ServiceExportRecord,
)
from clustermesh.schema.node import (
    Node,
    NodeAddress,
)
from clustermesh.schema.service import (
    ClusterService,
    PortConfig,
    PortsByIP,
    backend_zone,
)

__all__ = [
    "CACHE_NODES_PREFIX",
    "CACHE_PREFIX",
    "CACHE_SERVICES_PREFIX",
    "CLUSTER_CONFIG_PREFIX",
    "HAS_CLUSTER_CONFIG_KEY",
    "HEARTBEAT_KEY",
    "INTERNAL_TRAFFIC_POLICIES",
    "IP_FAMILIES",
    "KUBERNETES_PROTOCOLS",
    "MAX_CLUSTER_ID",
    "MAX_CLUSTER_ID_EXTENDED",
    "MAX_CLUSTER_NAME_LEN",
    "MAX_CONNECTED_CLUSTERS_CHOICES",
    "MIN_CLUSTER_ID",
    "NODES_PREFIX",
    "PROTOCOLS",
    "SERVICES_PREFIX",
    "SERVICE_EXPORTS_PREFIX",
    "SERVICE_IMPORT_TYPES",
    "SESSION_AFFINITIES",
    "STATE_PREFIX",
    "SYNCED_PREFIX",
    "TRAFFIC_DISTRIBUTIONS",
    "WILDCARD_PROTOCOLS",
    "ClusterConfig",
    "ClusterService",
    "McsPort",
    "Node",
    "NodeAddress",
    "PortConfig",
    "PortsByIP",
    "SchemaError",
    "ServiceExportRecord",
    "ServiceKey",
    "backend_zone",
    "cluster_config_key",
    "encode",
    "node_key",
    "nodes_cluster_prefix",
    "parse_node_key",
    "parse_rfc3339",
    "parse_service_export_key",
    "parse_service_key",
    "record_prefixes",
    "rfc3339_now",
    "service_export_key",
    "service_exports_cluster_prefix",
    "service_key",
    "services_cluster_prefix",
    "state_to_cache",
    "synced_key",
    "validate_cluster_id",
    "validate_cluster_name",
    "validate_max_connected_clusters",
]
