"""kopf handlers: thin. Each event goes to the :class:`~clustermesh.operator.controller.Operator`.

No kopf indices: kopf holds back every handler until all indexed objects are
indexed, at a cost quadratic in the number of objects. The operator keeps its
own state and lists the cluster itself when it starts (see ``state.py``).
"""

from __future__ import annotations

from typing import Any

import kopf

registry = kopf.OperatorRegistry()

ENDPOINTSLICES = ("discovery.k8s.io", "endpointslices")  # no version: kopf takes the preferred one
CLUSTERMESHES = ("clustermesh.io", "clustermeshes")


@kopf.on.event("services", registry=registry)
async def service_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.operator.on_event("Service", type, body)


@kopf.on.event(*ENDPOINTSLICES, registry=registry)
async def endpointslice_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.operator.on_event("EndpointSlice", type, body)


@kopf.on.event("multicluster.x-k8s.io", "v1alpha1", "serviceexports", registry=registry)
async def serviceexport_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.operator.on_export_event(type, body)


@kopf.on.event("nodes", registry=registry)
async def node_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.operator.on_event("Node", type, body)


def _is_our_mesh(name: str, memo: kopf.Memo, **_: Any) -> bool:
    return bool(name == memo.operator.config.mesh_name)


@kopf.on.event(*CLUSTERMESHES, when=_is_our_mesh, registry=registry)
async def clustermesh_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        kopf.warn(body, reason="Deleted", message="ClusterMesh deleted; the operator keeps its last identity")
        return
    await memo.operator.mesh_seen(body)


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
