"""The operator's state machine, between kopf's handlers and the store writer.

kopf keeps indices of Services, EndpointSlices and Nodes and calls the thin
handlers in ``handlers.py``; they call this object, which turns objects into
records with the pure functions of ``export.py`` and hands them to the
:class:`~clustermesh.store.sync.SyncStore`. It also owns the cluster identity,
the first full pass (delete stale, write "synced"), and the ClusterMesh status.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clustermesh import metrics, schema
from clustermesh.kvstore import KVClient
from clustermesh.operator.export import ClusterIdentity, export_node, export_service
from clustermesh.operator.kube import KubeClient, KubeError
from clustermesh.store.sync import SyncStore, WriterSettings

log = logging.getLogger(__name__)

Body = Mapping[str, Any]
# kopf's indices: key -> collection of values; read-only here.
Index = Mapping[Any, Iterable[Body]]


@dataclass
class OperatorConfig:
    mesh_name: str = "default"
    cluster_name: str | None = None
    cluster_id: int | None = None
    writer: WriterSettings = field(default_factory=WriterSettings)
    status_interval: float = 2.0
    """Seconds between ClusterMesh status updates (only sent when something changed)."""


class ProblemLog:
    """Logs each problem of an object once (until it changes) and counts it."""

    def __init__(self, component: str) -> None:
        self.component = component
        self._seen: dict[str, frozenset[str]] = {}

    def report(self, obj: str, problems: Iterable[str]) -> None:
        new = frozenset(problems)
        for problem in sorted(new - self._seen.get(obj, frozenset())):
            log.warning("[%s] %s", obj, problem)
            metrics.ERRORS.labels(self.component, "bad-input").inc()
        if new:
            self._seen[obj] = new
        else:
            self._seen.pop(obj, None)

    def forget(self, obj: str) -> None:
        self._seen.pop(obj, None)


def _first(index: Index, key: Any) -> Body | None:
    for value in index.get(key, ()):
        return value
    return None


class Operator:
    def __init__(self, config: OperatorConfig, kv: KVClient, kube: KubeClient) -> None:
        self.config = config
        self.kv = kv
        self.kube = kube
        self.identity: ClusterIdentity | None = None
        self.writer: SyncStore | None = None
        self.problems = ProblemLog("operator")
        self.remote_names: list[str] = []
        self.failed: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._conditions: dict[str, dict[str, str]] = {}
        self._last_status: dict[str, Any] | None = None

    # ------------------------------------------------------------ identity

    def ensure_mesh(self) -> None:
        """Create the ClusterMesh object from flags on a first start; check the CRD is there."""
        mesh = self.kube.get_mesh(self.config.mesh_name)
        if mesh is not None:
            local = (mesh.get("spec") or {}).get("localCluster") or {}
            flags = (self.config.cluster_name, self.config.cluster_id)
            if any(flags) and flags != (local.get("name"), local.get("id")):
                log.warning(
                    "ClusterMesh %s says cluster %s (id %s); ignoring --cluster-name/--cluster-id %s/%s",
                    self.config.mesh_name, local.get("name"), local.get("id"), *flags,
                )
            return
        if not self.config.cluster_name or not self.config.cluster_id:
            raise KubeError(
                f"no ClusterMesh {self.config.mesh_name!r} in the cluster: create one "
                "(kubectl apply -f a ClusterMesh manifest) or pass --cluster-name and --cluster-id"
            )
        ClusterIdentity(self.config.cluster_name, self.config.cluster_id)  # validate before writing
        self.kube.create_mesh(self.config.mesh_name, self.config.cluster_name, self.config.cluster_id)
        log.info("created ClusterMesh %s for cluster %s (id %d)", self.config.mesh_name,
                 self.config.cluster_name, self.config.cluster_id)

    async def mesh_seen(self, body: Body, services: Index, slices: Index, nodes: Index) -> None:
        """The ClusterMesh object was listed or changed. The first time, start exporting."""
        spec = body.get("spec") or {}
        self.remote_names = [c.get("name", "?") for c in spec.get("clusters") or []]
        local = spec.get("localCluster") or {}
        try:
            identity = ClusterIdentity(local.get("name"), local.get("id"))  # type: ignore[arg-type]
        except schema.SchemaError as exc:
            self.problems.report(f"clustermesh/{self.config.mesh_name}", [f"invalid localCluster: {exc}"])
            return
        if self.identity is None:
            self.identity = identity
            await self._start(services, slices, nodes)
        elif identity != self.identity:
            self.problems.report(
                f"clustermesh/{self.config.mesh_name}",
                [f"localCluster changed to {identity.name}/{identity.id} while exporting as "
                 f"{self.identity.name}/{self.identity.id}: restart the operator to apply it"],
            )

    # ------------------------------------------------------------ changes

    def service_changed(self, namespace: str, name: str, services: Index, slices: Index) -> None:
        if self.identity is None or self.writer is None:
            return  # the first full pass will read the indices
        key = schema.service_key(self.identity.name, namespace, name)
        service = _first(services, (namespace, name))
        if service is None:
            self.problems.forget(f"service/{namespace}/{name}")
            self.writer.set(key, None)
            return
        result = export_service(self.identity, service, slices.get((namespace, name), ()))
        self.problems.report(f"service/{namespace}/{name}", result.problems)
        self.writer.set(key, result.record.encode() if result.record else None)

    def node_changed(self, name: str, nodes: Index) -> None:
        if self.identity is None or self.writer is None:
            return
        key = schema.node_key(self.identity.name, name)
        node = _first(nodes, name)
        if node is None:
            self.problems.forget(f"node/{name}")
            self.writer.set(key, None)
            return
        result = export_node(self.identity, node)
        self.problems.report(f"node/{name}", result.problems)
        self.writer.set(key, result.record.encode() if result.record else None)

    def _full_pass(self, services: Index, slices: Index, nodes: Index) -> None:
        assert self.identity is not None and self.writer is not None
        for ref in list(services):
            self.service_changed(ref[0], ref[1], services, slices)
        for name in list(nodes):
            self.node_changed(name, nodes)

    # ------------------------------------------------------------ lifecycle

    async def _start(self, services: Index, slices: Index, nodes: Index) -> None:
        assert self.identity is not None
        ident = self.identity
        log.info("exporting cluster %s (id %d) to %s", ident.name, ident.id, self.kv.endpoint)
        self.writer = SyncStore(self.kv, ident.name, self.config.writer)
        self.writer.set(schema.cluster_config_key(ident.name), schema.ClusterConfig(ident.id).encode())
        self._full_pass(services, slices, nodes)
        self._spawn("store-writer", self.writer.run())
        self._spawn("initial-sync", self._initial_sync())
        self._spawn("status", self._status_loop())

    async def _initial_sync(self) -> None:
        assert self.identity is not None and self.writer is not None
        started = asyncio.get_running_loop().time()
        stale = await self.writer.initial_sync(
            prefixes=[schema.services_cluster_prefix(self.identity.name),
                      schema.nodes_cluster_prefix(self.identity.name)],
            synced_prefixes=[schema.SERVICES_PREFIX, schema.NODES_PREFIX],
        )
        log.info(
            "first full export in: %d services, %d nodes, %d stale records removed, %.2fs",
            self.exported("services"), self.exported("nodes"), stale,
            asyncio.get_running_loop().time() - started,
        )

    def _spawn(self, name: str, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.failed = f"task {task.get_name()} died: {exc!r}"
            log.error("%s", self.failed, exc_info=exc)
        elif task.get_name() != "initial-sync":
            self.failed = f"task {task.get_name()} ended unexpectedly"
            log.error("%s", self.failed)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.writer is not None:
            await self.writer.close(revoke=False)

    # ------------------------------------------------------------ status

    def exported(self, kind: str) -> int:
        if self.writer is None or self.identity is None:
            return 0
        prefix = (schema.services_cluster_prefix if kind == "services" else schema.nodes_cluster_prefix)(
            self.identity.name
        )
        return self.writer.count(prefix)

    def health(self) -> tuple[bool, str]:
        if self.failed:
            return False, self.failed
        if self.writer is None:
            return True, "waiting for the ClusterMesh object and the first listing"
        if self.writer.reachable is False:
            return True, f"state store unreachable: {self.writer.last_error}"
        return True, "ok"

    def _condition(self, kind: str, ok: bool | None, reason: str, message: str) -> dict[str, str]:
        status = "Unknown" if ok is None else ("True" if ok else "False")
        old = self._conditions.get(kind)
        since = old["lastTransitionTime"] if old and old["status"] == status else _now()
        cond = {"type": kind, "status": status, "reason": reason, "lastTransitionTime": since}
        if message:  # the API client turns "" into null, which the schema rejects
            cond["message"] = message[:1000]
        self._conditions[kind] = cond
        return cond

    def status_payload(self) -> dict[str, Any]:
        writer = self.writer
        reachable = writer.reachable if writer else None
        synced = bool(writer and writer.synced and not writer.dirty)
        services, nodes = self.exported("services"), self.exported("nodes")
        metrics.EXPORTED.labels("service").set(services)
        metrics.EXPORTED.labels("node").set(nodes)
        status: dict[str, Any] = {
            "conditions": [
                self._condition(
                    "StoreReachable", reachable,
                    "Reachable" if reachable else ("Unreachable" if reachable is False else "NotStarted"),
                    (writer.last_error or "") if writer and reachable is False else str(self.kv.endpoint),
                ),
                self._condition(
                    "Synced", synced if writer else None,
                    "Synced" if synced else "Pending",
                    f"{services} services and {nodes} nodes in the store" if synced
                    else f"{len(writer.dirty) if writer else 0} records waiting to be written",
                ),
            ],
            "exportedServices": services,
            "exportedNodes": nodes,
            "remoteClusters": ",".join(self.remote_names),
        }
        if writer and writer.last_sync:
            status["lastSyncTime"] = writer.last_sync.strftime("%Y-%m-%dT%H:%M:%SZ")
        return status

    async def _status_loop(self) -> None:
        while True:
            status = self.status_payload()
            if status != self._last_status:
                try:
                    await asyncio.to_thread(self.kube.patch_mesh_status, self.config.mesh_name, status)
                    self._last_status = status
                except KubeError as exc:
                    log.warning("%s", exc)
                    metrics.ERRORS.labels("operator", "kube-api").inc()
            await asyncio.sleep(self.config.status_interval)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
