"""kopf handlers: thin. Indices hold slim copies of the objects; event handlers
tell the :class:`~clustermesh.operator.controller.Operator` what changed.

kopf blocks every handler until all indexed resources are fully listed, so when
the ClusterMesh handler first runs, the indices hold the whole cluster: that is
when the first full export (and the stale-record cleanup) can safely happen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from clustermesh.operator.export import SERVICE_NAME_LABEL

registry = kopf.OperatorRegistry()

ENDPOINTSLICES = ("discovery.k8s.io", "endpointslices")  # no version: kopf takes the preferred one
CLUSTERMESHES = ("clustermesh.io", "clustermeshes")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _meta(body: Mapping[str, Any], *fields: str) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {f: _plain(meta.get(f)) for f in ("name", "namespace", *fields) if meta.get(f) is not None}


# ---------------------------------------------------------------- indices


@kopf.index("services", registry=registry)
def cm_services(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    spec = body.get("spec") or {}
    slim = {
        "metadata": _meta(body, "annotations", "labels"),
        "spec": {k: _plain(spec.get(k)) for k in ("type", "clusterIP", "clusterIPs", "ports", "selector")},
    }
    return {(namespace, name): slim}


@kopf.index(*ENDPOINTSLICES, registry=registry)
def cm_endpointslices(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
    service = labels.get(SERVICE_NAME_LABEL)
    if not service:
        return None
    slim = {
        "metadata": _meta(body, "labels"),
        "addressType": body.get("addressType"),
        "ports": _plain(body.get("ports")),
        "endpoints": [
            {"addresses": _plain(ep.get("addresses")), "conditions": _plain(ep.get("conditions"))}
            for ep in body.get("endpoints") or []
        ],
    }
    return {(namespace, service): slim}


@kopf.index("nodes", registry=registry)
def cm_nodes(name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    slim = {
        "metadata": _meta(body),
        "spec": {"podCIDR": spec.get("podCIDR"), "podCIDRs": _plain(spec.get("podCIDRs"))},
        "status": {"addresses": _plain(status.get("addresses"))},
    }
    return {name: slim}


# ---------------------------------------------------------------- events


@kopf.on.event("services", registry=registry)
async def service_event(
    namespace: str, name: str, memo: kopf.Memo, cm_services: kopf.Index, cm_endpointslices: kopf.Index, **_: Any
) -> None:
    memo.operator.service_changed(namespace, name, cm_services, cm_endpointslices)


@kopf.on.event(*ENDPOINTSLICES, registry=registry)
async def endpointslice_event(
    namespace: str, labels: kopf.Labels, memo: kopf.Memo,
    cm_services: kopf.Index, cm_endpointslices: kopf.Index, **_: Any,
) -> None:
    service = labels.get(SERVICE_NAME_LABEL)
    if service:
        memo.operator.service_changed(namespace, service, cm_services, cm_endpointslices)


@kopf.on.event("nodes", registry=registry)
async def node_event(name: str, memo: kopf.Memo, cm_nodes: kopf.Index, **_: Any) -> None:
    memo.operator.node_changed(name, cm_nodes)


def _is_our_mesh(name: str, memo: kopf.Memo, **_: Any) -> bool:
    return bool(name == memo.operator.config.mesh_name)


@kopf.on.event(*CLUSTERMESHES, when=_is_our_mesh, registry=registry)
async def clustermesh_event(
    type: str | None, body: kopf.Body, memo: kopf.Memo,
    cm_services: kopf.Index, cm_endpointslices: kopf.Index, cm_nodes: kopf.Index, **_: Any,
) -> None:
    if type == "DELETED":
        kopf.warn(body, reason="Deleted", message="ClusterMesh deleted; the operator keeps its last identity")
        return
    await memo.operator.mesh_seen(body, cm_services, cm_endpointslices, cm_nodes)


# ---------------------------------------------------------------- operator settings


@kopf.on.startup(registry=registry)
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # The operator only reads objects: no Kubernetes events per handler call,
    # no progress annotations written back to Services and Nodes.
    settings.posting.enabled = False
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="clustermesh.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="clustermesh.io")
    settings.batching.batch_window = memo.batch_window
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # A standby replica takes over this long after the active one stops refreshing its peering entry.
    settings.peering.lifetime = 15


@kopf.on.login(registry=registry)
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(**memo.connection)


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.operator.stop()
