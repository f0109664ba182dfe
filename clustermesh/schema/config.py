"""``ClusterConfig`` at ``cilium/cluster-config/<cluster>``: the cluster's ID, maxConnectedClusters and
capabilities (syncedCanaries, cached, serviceExportsEnabled). Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clustermesh.schema.core import (
    MAX_CLUSTER_ID,
    SchemaError,
    _bool,
    _decode_object,
    _optional_bool,
    encode,
    validate_cluster_id,
    validate_max_connected_clusters,
)


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
