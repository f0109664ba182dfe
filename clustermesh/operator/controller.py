"""The operator's state machine, between kopf's handlers and the store writer.

kopf's thin handlers (``handlers.py``) report every Service, EndpointSlice and
Node event; this object keeps them in a :class:`ClusterState`, turns them into
records with the pure functions of ``export.py`` and hands them to the
:class:`~clustermesh.store.sync.SyncStore`. It also owns the cluster identity,
the first full pass (a full listing, then: delete stale, write "synced"), the
periodic resync that catches missed deletions, and the ClusterMesh status.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from clustermesh import metrics, pki, schema, trace
from clustermesh.cluster.export import ClusterIdentity, export_node, export_service
from clustermesh.cluster.state import ClusterState, Kind, NodeRef, Ref, ServiceRef
from clustermesh.kube import REMOTE_SECRETS_NAMESPACE, KubeClient, KubeError
from clustermesh.kvstore import KVClient, KVStoreError
from clustermesh.operator.leader import StatusLeader
from clustermesh.operator.mcs import McsController
from clustermesh.private_files import private_folder
from clustermesh.store.cache import CACHE_SYNCED_PREFIXES, RemoteCache
from clustermesh.store.membership import RemoteSet, max_connected_clusters
from clustermesh.store.remote import RemoteCluster
from clustermesh.store.remote_config import RemoteConfig
from clustermesh.store.sync import SyncStore, WriterSettings

log = logging.getLogger(__name__)

Body = Mapping[str, Any]
KINDS: tuple[Kind, ...] = ("Service", "EndpointSlice", "Node")


@dataclass
class OperatorConfig:
    mesh_name: str = "default"
    cluster_name: str | None = None
    cluster_id: int | None = None
    namespaces: Sequence[str] = ()
    """Watch only these namespaces (empty: all)."""
    writer: WriterSettings = field(default_factory=WriterSettings)
    status_interval: float = 2.0
    """Seconds between ClusterMesh status updates (only sent when something changed)."""
    resync_interval: float = 300.0
    """Seconds between full listings that remove objects whose deletion event was missed."""
    certificates: tuple[tuple[str, str], ...] = ()
    """(name, path) of the certificates this operator uses: their expiry is a metric, checked at each resync."""
    cache: bool = False
    """Mirror every remote's records into this store in Cilium's KVStoreMesh layout (store/cache.py),
    so that local agents read them here."""
    grace_period: float = 60.0
    """Seconds an unreachable remote stays usable (and, with the cache, cached)."""
    cache_tick: float = 1.0
    """Seconds between checks of the remotes' grace periods for the cache."""
    watch_remotes: bool = True
    """Connect to every remote of spec.clusters and report its readiness in status.remotes."""
    secret_refresh: float = 10.0
    """Seconds between two reads of the remotes' Secrets: a rotated Secret makes a new
    connection to that remote, without a restart."""
    peering: str | None = None
    """kopf peering name; with it, a replica that sees a higher-priority live peer stops."""
    priority: int = 0
    status_lease: str | None = None
    """A Lease name: HA replicas all export (each to its own etcd) and only its holder
    writes the ClusterMesh status. None: this operator writes it."""
    status_lease_namespace: str = "clustermesh-system"
    replica: str = "operator"
    ready_probe_timeout: float = 1.0
    """Seconds /readyz gives the local etcd to answer."""
    mesh_poll: float = 2.0
    """Seconds between two looks for the ClusterMesh object while there is none."""


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


class Operator:
    def __init__(self, config: OperatorConfig, kv: KVClient, kube: KubeClient) -> None:
        self.config = config
        self.kv = kv
        self.kube = kube
        self.state = ClusterState()
        self.identity: ClusterIdentity | None = None
        self.writer: SyncStore | None = None
        self.problems = ProblemLog("operator")
        self.remote_names: list[str] = []
        self.caches: dict[str, RemoteCache] = {}  # event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_secret_check = 0.0
        self._secrets_dir = private_folder("operator")
        # spec.clusters followed as the agents follow it (store/membership.py): the ClusterMesh
        # status's remotes and, with --cache, what the cache copies.
        self.members = RemoteSet("operator", kube, self._secrets_dir, REMOTE_SECRETS_NAMESPACE, self._start_remote,
                                 config.grace_period, on_change=self._remote_changed)
        self._mesh_seen = False
        self.failed: str | None = None
        self._starting = False
        self._tasks: list[asyncio.Task[None]] = []
        self._conditions: dict[str, dict[str, str]] = {}
        self._last_status: dict[str, Any] | None = None
        self.leader = (StatusLeader(kube, config.status_lease_namespace, config.status_lease, config.replica)
                       if config.status_lease else None)
        self._leading = self.leader is None
        # MCS-API: written to Kubernetes by the replica that writes the status, like the status.
        self.mcs = McsController(kube, self.state, self.members, lambda: self._leading)

    # ------------------------------------------------------------ identity

    def ensure_mesh(self) -> None:
        """Create the ClusterMesh object from flags on a first start, or wait for one to be applied
        (deploy/ usually goes in first: waiting beats exiting and a growing restart backoff); check
        the CRD is there. SIGTERM ends the wait (nothing is held yet)."""
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
        if self.config.cluster_name is None and self.config.cluster_id is None:
            log.warning("no ClusterMesh %r in the cluster yet; waiting for one (kubectl apply -f a ClusterMesh "
                        "manifest, see README) or pass --cluster-name and --cluster-id", self.config.mesh_name)
            while mesh is None:
                time.sleep(self.config.mesh_poll)
                mesh = self.kube.get_mesh(self.config.mesh_name)
            log.info("ClusterMesh %s appeared", self.config.mesh_name)
            return
        if not self.config.cluster_name or self.config.cluster_id is None:
            raise KubeError("pass both --cluster-name and --cluster-id, or neither and apply a ClusterMesh object")
        ClusterIdentity(self.config.cluster_name, self.config.cluster_id)  # validate before writing
        self.kube.create_mesh(self.config.mesh_name, self.config.cluster_name, self.config.cluster_id)
        log.info("created ClusterMesh %s for cluster %s (id %d)", self.config.mesh_name,
                 self.config.cluster_name, self.config.cluster_id)

    async def mesh_seen(self, body: Body) -> None:
        """The ClusterMesh object was listed or changed. The first time, start exporting.

        kopf only calls handlers while this replica is the active peer, so a standby
        replica never gets here and never writes."""
        spec = body.get("spec") or {}
        self._loop = asyncio.get_running_loop()
        self.remote_names = [c.get("name", "?") for c in spec.get("clusters") or []]
        if self.config.watch_remotes:
            await asyncio.to_thread(self._sync_remotes, spec)
        local = spec.get("localCluster") or {}
        try:
            identity = ClusterIdentity(
                local.get("name"), local.get("id"),  # type: ignore[arg-type]
                max_connected_clusters(spec),
            )
        except schema.SchemaError as exc:
            self.problems.report(f"clustermesh/{self.config.mesh_name}", [f"invalid localCluster: {exc}"])
            return
        if self.identity is None and not self._starting:
            self._starting = True
            await self._start(identity)
        elif self.identity is not None and identity != self.identity:
            self.problems.report(
                f"clustermesh/{self.config.mesh_name}",
                [f"localCluster changed to {identity.name}/{identity.id} (maxConnectedClusters "
                 f"{identity.max_connected_clusters}) while exporting as {self.identity.name}/{self.identity.id} "
                 f"(maxConnectedClusters {self.identity.max_connected_clusters}): restart the operator to apply it"],
            )

    def _sync_remotes(self, spec: Mapping[str, Any] | None) -> None:
        """The remotes of ``spec`` (None: the last one, its Secrets read again), in a thread."""
        self.members.apply(spec, time.monotonic())
        self._mesh_seen = True

    def _start_remote(self, config: RemoteConfig, max_cluster_id: int) -> RemoteCluster:
        return RemoteCluster(config, on_change=self._remote_changed, grace_period=self.config.grace_period,
                             max_cluster_id=max_cluster_id, watch_exports=True, role="operator").start()

    # ------------------------------------------------------------ the cache (KVStoreMesh)

    def _remote_changed(self, name: str) -> None:
        """From any thread: a remote's records, readiness or membership moved."""
        loop = self._loop
        if self.config.cache and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._refresh_cache, name)

    def _refresh_cache(self, name: str) -> None:
        """On the event loop: make remote ``name``'s part of the cache what it says now. A remote
        connected again (new settings) keeps its copy from the old connection until the new one
        is ready, or its grace period passes."""
        if self.writer is None:
            return  # _start refreshes every remote once the writer exists
        cache = self.caches.get(name)
        # The connection whose records count now (the old one while a new one connects).
        remote = self.members.source(name, time.monotonic())
        if remote is None:  # not (or no longer) a remote of the mesh
            if cache is not None:
                del self.caches[name]
                cache.forget()
            return
        if cache is None:
            cache = self.caches[name] = RemoteCache(remote, self.writer, self.config.grace_period)
        else:
            cache.replace(remote)
        cache.refresh()

    async def _cache_loop(self) -> None:
        """Grace periods end with time, not with an event: look at every remote each tick."""
        await self._cleanup_cache()
        while True:
            await asyncio.to_thread(self.members.retire, time.monotonic())  # stopping a reader joins
            for name in set(self.members.snapshot()) | set(self.caches):
                self._refresh_cache(name)
            await asyncio.sleep(self.config.cache_tick)

    async def _cleanup_cache(self) -> None:
        """Remove what an earlier run cached for remotes that are no longer in spec.clusters."""
        assert self.writer is not None and self.identity is not None
        keys: list[str] = []
        for prefix in (schema.CACHE_SERVICES_PREFIX + "/", schema.CACHE_NODES_PREFIX + "/"):
            try:
                keys += list((await asyncio.to_thread(self.kv.list_prefix, prefix)).items)
            except KVStoreError as exc:
                log.warning("listing the cache failed (%s); stale copies stay until the next start", exc)
                return
        gone = {k.split("/")[4] for k in keys if len(k.split("/")) > 4} - set(self.members.snapshot())
        stale = [k for k in keys if len(k.split("/")) > 4 and k.split("/")[4] in gone]
        for name in sorted(gone - {self.identity.name}):
            log.info("[cache %s] no longer in spec.clusters: removing what an earlier run cached", name)
            stale += [schema.synced_key(name, prefix) for prefix in CACHE_SYNCED_PREFIXES]
            stale.append(schema.cluster_config_key(name))
        self.writer.delete_found(stale)

    async def _refresh_secrets(self) -> None:
        now = asyncio.get_running_loop().time()
        if not self.config.watch_remotes or not self._mesh_seen or now < self._next_secret_check:
            return
        self._next_secret_check = now + self.config.secret_refresh
        await asyncio.to_thread(self._sync_remotes, None)

    # ------------------------------------------------------------ changes

    def on_event(self, kind: Kind, event_type: str | None, body: Body) -> None:
        """One watch event (kopf passes type None for its initial listing)."""
        refs = self.state.delete(kind, body) if event_type == "DELETED" else self.state.upsert(kind, body)
        if trace.enabled():
            trace.hops("k8s-event", (f"{r.namespace}/{r.name}" for r in refs if isinstance(r, ServiceRef)))
        self._export(refs)
        for ref in refs:
            if isinstance(ref, ServiceRef):
                self.mcs.service_changed((ref.namespace, ref.name))

    def on_export_event(self, event_type: str | None, body: Body) -> None:
        """A ServiceExport's watch event (MCS-API)."""
        self.mcs.on_export(event_type, body)

    def _export(self, refs: Iterable[Ref]) -> None:
        if self.identity is None or self.writer is None:
            return  # the first full pass exports everything
        for ref in refs:
            if isinstance(ref, ServiceRef):
                self._export_service(ref)
            else:
                self._export_node(ref)

    def _export_service(self, ref: ServiceRef) -> None:
        assert self.identity is not None and self.writer is not None
        key = schema.service_key(self.identity.name, ref.namespace, ref.name)
        service = self.state.service(ref.namespace, ref.name)
        what = f"service/{ref.namespace}/{ref.name}"
        if service is None:
            self.problems.forget(what)
            self.writer.set(key, None)
            return
        result = export_service(self.identity, service, self.state.slices_of(ref.namespace, ref.name))
        self.problems.report(what, result.problems)
        self.writer.set(key, result.record.encode() if result.record else None)

    def _export_node(self, ref: NodeRef) -> None:
        assert self.identity is not None and self.writer is not None
        key = schema.node_key(self.identity.name, ref.name)
        node = self.state.node(ref.name)
        if node is None:
            self.problems.forget(f"node/{ref.name}")
            self.writer.set(key, None)
            return
        result = export_node(self.identity, node)
        self.problems.report(f"node/{ref.name}", result.problems)
        self.writer.set(key, result.record.encode() if result.record else None)

    async def _list_everything(self) -> list[Ref]:
        """Full listings of the three kinds, with backoff while the API server is away."""
        refs: list[Ref] = []
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(KubeError),
            wait=wait_exponential_jitter(multiplier=0.5, max=10, jitter=0.5),
            before_sleep=self._on_api_retry,
        ):
            with attempt:
                listings = {
                    kind: await asyncio.to_thread(self.kube.list_objects, kind, self.config.namespaces)
                    for kind in KINDS
                }
        for kind, (items, rv) in listings.items():
            refs += self.state.apply_listing(kind, items, rv)
        return refs

    async def _start_mcs(self) -> None:
        """Whether this cluster serves ServiceExports, and its full listing of them."""
        if not await asyncio.to_thread(self.mcs.detect):
            return
        try:
            await asyncio.to_thread(self.mcs.list_exports)
        except KubeError as exc:
            log.warning("listing ServiceExports failed (%s): MCS-API off until the operator restarts", exc)
            self.mcs.enabled = False

    def _on_api_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("listing the cluster failed, retrying: %s", exc)
        metrics.ERRORS.labels("operator", "kube-api").inc()

    # ------------------------------------------------------------ lifecycle

    async def _start(self, identity: ClusterIdentity) -> None:
        started = asyncio.get_running_loop().time()
        await self._list_everything()
        await self._start_mcs()
        self.identity = identity
        log.info(
            "exporting cluster %s (id %d) to %s: listed %d services, %d endpoint slices, %d nodes in %.2fs",
            identity.name, identity.id, self.kv.endpoint, len(self.state.services), len(self.state.slices),
            len(self.state.nodes), asyncio.get_running_loop().time() - started,
        )
        self.writer = SyncStore(self.kv, identity.name, self.config.writer)
        # serviceExportsEnabled says whether peers may wait for our ServiceExports (and take their
        # absence as none): only with the CRDs here, so a missing CRD never reads as "nothing exported".
        config = schema.ClusterConfig(identity.id, max_connected_clusters=identity.max_connected_clusters,
                                      service_exports_enabled=self.mcs.enabled)
        self.writer.set(schema.cluster_config_key(identity.name), config.encode())
        # Cilium's promise that a cluster-config exists: its readers wait for it instead of
        # taking this store for one written before cluster-configs.
        self.writer.set(schema.HAS_CLUSTER_CONFIG_KEY, "true")
        self._export(self.state.refs())
        self.mcs.start(identity.name, self.writer)
        self._spawn("store-writer", self.writer.run())
        self._spawn("initial-sync", self._initial_sync())
        self._spawn("status", self._status_loop())
        self._spawn("resync", self._resync_loop())
        if self.config.cache:
            self._spawn("cache", self._cache_loop())
        if self.mcs.enabled:
            self._spawn("mcs", self.mcs.run())

    async def _initial_sync(self) -> None:
        assert self.identity is not None and self.writer is not None
        started = asyncio.get_running_loop().time()
        exports = self.mcs.enabled
        stale = await self.writer.initial_sync(
            prefixes=[schema.services_cluster_prefix(self.identity.name),
                      schema.nodes_cluster_prefix(self.identity.name)]
            + ([schema.service_exports_cluster_prefix(self.identity.name)] if exports else []),
            synced_prefixes=[schema.SERVICES_PREFIX, schema.NODES_PREFIX]
            + ([schema.SERVICE_EXPORTS_PREFIX] if exports else []),
        )
        log.info(
            "first full export in: %d services, %d nodes, %d stale records removed, %.2fs",
            self.exported("services"), self.exported("nodes"), stale,
            asyncio.get_running_loop().time() - started,
        )

    async def _resync_loop(self) -> None:
        while True:
            pki.observe_files(dict(self.config.certificates))
            await asyncio.sleep(self.config.resync_interval)
            refs = await self._list_everything()
            self._export(refs)
            assert self.identity is not None and self.writer is not None
            try:
                prefixes = [schema.services_cluster_prefix(self.identity.name),
                            schema.nodes_cluster_prefix(self.identity.name)]
                if self.mcs.enabled:
                    prefixes.append(schema.service_exports_cluster_prefix(self.identity.name))
                if self.config.cache:  # one listing for the whole cache, not one per key
                    prefixes += [schema.CACHE_SERVICES_PREFIX + "/", schema.CACHE_NODES_PREFIX + "/"]
                await self.writer.verify(prefixes)
            except KVStoreError as exc:  # the writer reports the store's state; try next time
                log.debug("verifying the store failed: %s", exc)

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
        await asyncio.to_thread(self.members.stop)
        shutil.rmtree(self._secrets_dir, ignore_errors=True)
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
        """Alive (a liveness probe): waiting and an unreachable store are not reasons to restart."""
        if self.failed:
            return False, self.failed
        if self.writer is None:
            return True, "waiting for the ClusterMesh object and the first listing"
        if self.writer.reachable is False:
            return True, f"state store unreachable: {self.writer.last_error}"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Serving (a readiness probe): the store holds the full export and answers now.
        In a store pod this keeps readers away from a replica that would show them an
        empty or half-written store, or none."""
        alive, why = self.health()
        if not alive:
            return False, why
        writer = self.writer
        if writer is None:
            return False, "waiting for the ClusterMesh object and the first listing"
        if not writer.synced:
            return False, f"first full export not in the store yet ({len(writer.dirty)} records to write)"
        try:
            self.kv.probe(schema.HEARTBEAT_KEY, self.config.ready_probe_timeout)
        except KVStoreError as exc:
            return False, f"state store does not answer: {exc}"
        return True, "ok: the full export is in the store"

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
        remotes = self.members.snapshot()
        if remotes:
            status["remotes"] = [
                {k: v for k, v in rc.status().items() if v != ""} for _, rc in sorted(remotes.items())
            ]
        if writer and writer.last_sync:
            status["lastSyncTime"] = writer.last_sync.strftime("%Y-%m-%dT%H:%M:%SZ")
        return status

    def outranked_by(self, peering: Mapping[str, Any] | None, now: dt.datetime | None = None) -> list[str]:
        """Live peers with a higher priority than ours in kopf's peering object."""
        now = now or dt.datetime.now(dt.UTC)
        out = []
        for peer_id, info in ((peering or {}).get("status") or {}).items():
            try:
                if not isinstance(info, dict) or int(info.get("priority", 0)) <= self.config.priority:
                    continue
                seen = dt.datetime.fromisoformat(str(info.get("lastseen")))
                lifetime = int(info.get("lifetime", 60))
            except (TypeError, ValueError):
                continue
            if seen.tzinfo is None:
                seen = seen.replace(tzinfo=dt.UTC)
            if seen + dt.timedelta(seconds=lifetime) > now:
                out.append(str(peer_id))
        return out

    async def _check_peering(self) -> None:
        """kopf pauses only its handlers when a higher-priority replica appears; our writer
        and lease would go on. Stop the whole process instead: it restarts as a standby."""
        if not self.config.peering or self.writer is None:
            return
        try:
            peering = await asyncio.to_thread(self.kube.get_peering, self.config.peering)
        except KubeError as exc:
            log.debug("peering check failed: %s", exc)
            return
        higher = self.outranked_by(peering)
        if higher:
            log.error("a higher-priority replica is active (%s): this one stops writing and exits",
                      ", ".join(higher))
            self.writer.pause()
            os.kill(os.getpid(), signal.SIGTERM)

    async def _status_loop(self) -> None:
        while True:
            await self._check_peering()
            await self._refresh_secrets()
            # Old connections end once their replacement is ready (the cache's loop does it each second).
            await asyncio.to_thread(self.members.retire, time.monotonic())
            status = self.status_payload()
            if self.leader is not None:
                self._leading = await asyncio.to_thread(self.leader.refresh)
            if not self._leading:
                self._last_status = None  # write it all when this replica leads again
            elif status != self._last_status:
                try:
                    await asyncio.to_thread(self.kube.patch_mesh_status, self.config.mesh_name, status)
                    self._last_status = status
                except KubeError as exc:
                    log.warning("%s", exc)
                    metrics.ERRORS.labels("operator", "kube-api").inc()
            await asyncio.sleep(self.config.status_interval)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
