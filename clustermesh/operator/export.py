"""Moved to clustermesh.cluster.export; kept for one import until it is updated."""

from clustermesh.cluster.export import (
    LEGACY_SHARED_ANNOTATION,
    SHARED_ANNOTATION,
    ClusterIdentity,
    affinity,
    export_service,
)

__all__ = ["LEGACY_SHARED_ANNOTATION", "SHARED_ANNOTATION", "ClusterIdentity", "affinity", "export_service"]
