"""``clustermesh agent``: one per node. Local global Services + every usable remote
cluster -> the node's socket-LB maps.

Threads: one watch per local resource kind (Services, EndpointSlices), a watch of
the ClusterMesh object and a periodic read of the remotes' Secrets (membership and
credentials follow the object without a restart), the RemoteClusters' store
readers, and the main loop, which wakes on any change (debounced) and once a second
(a remote's grace period can run out with no event), merges, and reconciles the
datapath only when the desired state moved.

Stopping keeps the maps: traffic flows while the agent is down or restarting. A
starting agent reads what the previous one programmed and keeps each remote's
backends and routes until that remote has synced or its grace period (counted from
the start) has run out, so a restart never withdraws a remote that serves.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter

from clustermesh import metrics, trace
from clustermesh.agent.merge import LocalService, local_service
from clustermesh.agent.merger import ServiceMerger
from clustermesh.agent.route_plan import plan_routes
from clustermesh.agent.routes import RouteTable, RoutingError
from clustermesh.cluster.export import ClusterIdentity
from clustermesh.cluster.state import ClusterState, Kind, Ref, ServiceRef
from clustermesh.datapath.errors import CapacityError
from clustermesh.datapath.model import Backend, Frontend, ServiceSpec
from clustermesh.datapath.plan import specs_from_state
from clustermesh.heap import release_freed_heap
from clustermesh.kube import REMOTE_SECRETS_NAMESPACE, KubeClient, KubeError
from clustermesh.private_files import private_folder
from clustermesh.schema import ClusterService
from clustermesh.store.membership import RemoteSet, max_connected_clusters
from clustermesh.store.remote import RemoteCluster
from clustermesh.store.remote_config import RemoteConfig

log = logging.getLogger(__name__)


# deploy/'s store Service and the local agents' reader (clustermesh certs makes it).
CACHE_ENDPOINTS = ("https://clustermesh-store.clustermesh-system.svc:2379",)
CACHE_TLS = {"secretName": "clustermesh-access-local-agents", "secretNamespace": "clustermesh-system"}


def read_from(entry: dict[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """Where this agent reads remote ``entry``: its own store (``entry``), or, with ``spec.cache``
    enabled, this cluster's store, whose pods keep a copy of every remote (KVStoreMesh). Pure."""
    cache = spec.get("cache") or {}
    if not cache.get("enabled"):
        return entry
    return {**entry, "endpoints": list(cache.get("endpoints") or CACHE_ENDPOINTS),
            "tls": cache.get("tls") or CACHE_TLS}


@dataclass
class AgentConfig:
    node: str
    cgroup: str
    pin_dir: str
    mesh_name: str = "default"
    grace_period: float = 60.0
    """Seconds an unreachable remote's backends keep serving before they are withdrawn."""
    heartbeat_timeout: float = 180.0
    """Seconds without a remote heartbeat change before the remote counts as unreachable."""
    secret_refresh: float = 10.0
    """Seconds between two reads of the remotes' Secrets: new credentials are used without a restart."""
    debounce: float = 0.0
    """Seconds to wait after an event before merging (0: at once; events during a step are coalesced)."""
    tick: float = 1.0
    first_sync_wait: float = 5.0
    """A node's first programming (nothing in its maps yet) waits up to this many seconds from
    start for every remote's first listing, so the maps are written once with everything instead
    of once more per remote as each syncs (seconds of merging at 10,000 Services)."""
    mesh_poll: float = 2.0
    """Seconds between two looks for the ClusterMesh object while it does not exist yet."""
    secrets_namespace: str = REMOTE_SECRETS_NAMESPACE
    routes: str = "off"
    """Routes to remote pod CIDRs: "off", "host" (the agent's own netns) or "netns:NAME"."""
    route_drain: float = 5.0
    """Seconds a remote's route stays after its backends left the maps, so the connections
    already open to them finish instead of losing their path mid-request."""


class Agent:
    def __init__(self, config: AgentConfig, kube: KubeClient, socket_lb_factory: Callable[[int], Any]) -> None:
        self.config = config
        self.kube = kube
        self.state = ClusterState()
        self.merger = ServiceMerger(0)  # the local cluster ID is known once start() read the ClusterMesh
        self._merged_from: frozenset[int] = frozenset()
        self._last_inheriting: frozenset[int] = frozenset()
        self.identity: ClusterIdentity | None = None
        self._secrets_dir = private_folder("agent")
        self._dirty = threading.Event()
        # spec.clusters followed as the store pods' cache and the operator's remote view follow it
        # (store/membership.py): a remote whose settings changed keeps serving through its old
        # connection until the new one is ready (or the grace period ends).
        self.members = RemoteSet("agent", kube, self._secrets_dir, config.secrets_namespace, self._start_remote,
                                 config.grace_period, entry_for=read_from,
                                 on_change=lambda _name: self._dirty.set())
        self._logged_refusals: set[str] = set()
        # What the previous agent programmed for remotes that have not been ready since we
        # started: kept until they are, or until the grace period from our start ends.
        self._inherited: dict[Frontend, frozenset[Backend]] = {}
        self._fresh_node = False  # the maps held nothing at start: no agent ran here before
        self._inherited_routes: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lb_factory = socket_lb_factory
        self.lb: Any = None
        self._programmed = False  # the maps hold what a step of this agent wrote
        # Frontends whose spec may have changed since the last write (None: compare them all).
        self._unwritten: set[Frontend] | None = None
        self.routes: RouteTable | None = None
        if config.routes == "host":
            self.routes = RouteTable(None)
        elif config.routes.startswith("netns:"):
            self.routes = RouteTable(config.routes.removeprefix("netns:"))
        elif config.routes != "off":
            raise ValueError(f"--routes {config.routes!r}: use off, host or netns:NAME")
        self._last_routes: dict[str, str] | None = None
        self._draining: dict[str, tuple[str, float]] = {}  # cidr -> (via, until)
        self._route_problems: set[str] = set()
        self._route_failures: set[str] = set()
        # A restarted agent must not program a half-listed cluster (Services without their
        # EndpointSlices would be written with no backends): wait for every first listing.
        self._listed: dict[str, threading.Event] = {}
        self._started_at = time.monotonic()
        self._merge_problems: set[str] = set()
        self._merged_refs: frozenset[tuple[str, str]] = frozenset()  # by the last desired(), for tracing

    # ------------------------------------------------------------ setup

    def start(self) -> None:
        mesh = self.kube.get_mesh(self.config.mesh_name)
        if mesh is None:
            # deploy/ is usually applied before the ClusterMesh object: wait for it rather than
            # exit and be restarted with a growing backoff.
            log.warning("no ClusterMesh %r yet; waiting for one (kubectl apply it, see README)",
                        self.config.mesh_name)
        while mesh is None:
            if self._stop.wait(self.config.mesh_poll):
                raise KubeError(f"stopped while waiting for ClusterMesh {self.config.mesh_name!r}")
            mesh = self.kube.get_mesh(self.config.mesh_name)
        spec = mesh.get("spec") or {}
        local = spec.get("localCluster") or {}
        self.identity = ClusterIdentity(str(local.get("name", "")), int(local.get("id", 0)),
                                        max_connected_clusters(spec))
        self._started_at = time.monotonic()
        self.merger = ServiceMerger(self.identity.id)
        self.lb = self._lb_factory(self.identity.id)
        # Compiling and attaching the programs takes seconds (clang): let the first listings of
        # the local cluster and the remotes run meanwhile. Nothing is programmed before run().
        load_failed: list[BaseException] = []

        def load() -> None:
            try:
                self.lb.load()
            except BaseException as exc:  # re-raised by start() below
                load_failed.append(exc)

        loader = threading.Thread(target=load, name="datapath-load", daemon=True)
        loader.start()
        self.members.apply(spec, time.monotonic(), first=True)
        kinds: tuple[Kind, ...] = ("Service", "EndpointSlice", "Node") if self.routes else ("Service", "EndpointSlice")
        self._listed = {kind: threading.Event() for kind in kinds}
        targets: list[tuple[str, Callable[..., None], tuple[Any, ...]]] = [
            (f"watch-{kind}", self._watch_local, (kind,)) for kind in kinds
        ]
        targets += [("watch-clustermesh", self._watch_mesh, (str((mesh.get("metadata") or {}).get(
                        "resourceVersion") or ""),)),
                    ("refresh-secrets", self._refresh_secrets, ())]
        for name, target, args in targets:
            t = threading.Thread(target=target, args=args, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        loader.join()
        if load_failed:
            self.stop()
            raise load_failed[0]
        self._inherit_previous()
        log.info("agent on node %s of cluster %s (id %d): %d remotes", self.config.node, self.identity.name,
                 self.identity.id, len(self.members.snapshot()))

    def _inherit_previous(self) -> None:
        """Read the remote backends and routes the previous agent left in the maps."""
        assert self.identity is not None
        local_id = self.identity.id
        previous = specs_from_state(self.lb.read())
        self._fresh_node = not previous
        for spec in previous:
            remote = frozenset(b for b in spec.backends if b.cluster_id != local_id)
            if remote:
                self._inherited[spec.frontend] = remote
        if self.routes is not None:
            try:
                self._inherited_routes = self.routes.current()
            except RoutingError as exc:
                log.warning("cannot read the routes of the previous agent: %s", exc)
        if self._inherited or self._inherited_routes:
            log.info("kept from the previous agent until the remotes sync: %d remote backends, %d routes",
                     sum(len(b) for b in self._inherited.values()), len(self._inherited_routes))

    # ------------------------------------------------------------ membership

    def _start_remote(self, config: RemoteConfig, max_cluster_id: int) -> RemoteCluster:
        return RemoteCluster(config, self._on_remote_change, self.config.grace_period,
                             heartbeat_timeout=self.config.heartbeat_timeout, max_cluster_id=max_cluster_id).start()

    def _apply_mesh(self, spec: dict[str, Any] | None) -> None:
        self.members.apply(spec, time.monotonic())
        self._dirty.set()

    def _refuse_once(self, name: str, why: str) -> None:
        if f"{name}: {why}" in self._logged_refusals:
            return
        self._logged_refusals.add(f"{name}: {why}")
        log.error("remote %s refused: %s", name, why)
        metrics.ERRORS.labels("agent", "bad-remote").inc()

    def _watch_mesh(self, resource_version: str) -> None:
        """Follow the ClusterMesh object: list (get) and watch, again after any break."""
        rv = resource_version
        while not self._stop.is_set():
            try:
                if not rv:
                    mesh = self.kube.get_mesh(self.config.mesh_name)
                    if mesh is None:
                        self._refuse_once("ClusterMesh", f"ClusterMesh {self.config.mesh_name} is gone; "
                                          "keeping the last membership")
                        self._stop.wait(5)
                        continue
                    self._apply_mesh(mesh.get("spec") or {})
                    rv = str((mesh.get("metadata") or {}).get("resourceVersion") or "")
                for event_type, obj in self.kube.watch_objects("ClusterMesh", rv, name=self.config.mesh_name):
                    if self._stop.is_set():
                        return
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if event_type in ("ADDED", "MODIFIED"):
                        self._apply_mesh(obj.get("spec") or {})
            except Exception as exc:  # the watch ends, breaks or expires: read the object again
                if self._stop.is_set():
                    return
                log.warning("watch of the ClusterMesh broke (%s); reading it again", exc)
                rv = ""
                self._stop.wait(1)

    def _refresh_secrets(self) -> None:
        """Read the remotes' Secrets again now and then: rotated credentials take effect."""
        while not self._stop.wait(self.config.secret_refresh):
            try:
                self._apply_mesh(None)
            except Exception:
                log.exception("re-reading the remotes' settings failed; trying again later")

    def _inheriting(self, now: float) -> frozenset[int]:
        """IDs of the remotes whose previous backends and routes are still kept."""
        if now - self._started_at >= self.config.grace_period:
            return frozenset()
        return self.members.awaiting_first_sync()

    def _on_remote_change(self, name: str) -> None:
        self._dirty.set()

    # ------------------------------------------------------------ local watches

    def _watch_local(self, kind: Kind) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(Exception),  # a bad event must not freeze the view for good
            wait=wait_exponential_jitter(multiplier=0.5, max=10, jitter=0.5),
            stop=lambda _state: self._stop.is_set(),
            sleep=self._sleep,
            reraise=True,
            before_sleep=lambda st: log.warning("watch of %ss failed, retrying: %s", kind,
                                                st.outcome.exception() if st.outcome else None),
        )
        while not self._stop.is_set():
            try:
                retrying(self._list_and_watch, kind)
            except Exception:
                if not self._stop.is_set():
                    log.exception("watch of %ss stopped unexpectedly; restarting it", kind)

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _list_and_watch(self, kind: Kind) -> None:
        items, rv = self.kube.list_objects(kind)
        with self._lock:
            self._touch(self.state.apply_listing(kind, items, rv))
        # The watch below runs for as long as this frame lives: the raw listing (80 MB at
        # 10,000 Services and their slices) must not live with it.
        del items
        self._listed[kind].set()
        self._dirty.set()
        for event_type, obj in self.kube.watch_objects(kind, rv):
            if self._stop.is_set():
                return
            if event_type == "BOOKMARK":
                continue
            with self._lock:
                if event_type == "DELETED":
                    self._touch(self.state.delete(kind, obj))
                else:
                    self._touch(self.state.upsert(kind, obj))
            self._dirty.set()

    def _touch(self, refs: list[Ref]) -> None:
        """Tell the merger what an event changed (under self._lock): a Service's own objects,
        or a Node (this cluster's pod CIDRs are an input of every Service)."""
        for ref in refs:
            if isinstance(ref, ServiceRef):
                self.merger.touch((ref.namespace, ref.name))
            else:
                self.merger.touch_all()

    # ------------------------------------------------------------ the loop

    def _usable_sources(self, now: float) -> list[RemoteCluster]:
        return [rc for rc in self.members.sources(now) if rc.usable(now)]

    def desired(self, now: float, sources: list[RemoteCluster]) -> tuple[
        Mapping[Frontend, ServiceSpec] | list[ServiceSpec], bool, frozenset[Frontend] | None
    ]:
        """The datapath's desired state: the merger's, merged again only for the Services touched
        since the last call, plus what is kept from the previous agent; whether it moved since the
        last call; and the frontends it moved at (None: anywhere). ``sources``: the usable remotes
        at ``now``."""
        identity = self.identity
        assert identity is not None
        everyone = self.members.everyone()
        with self._lock:
            for rc in everyone:
                for ref in rc.take_changed():
                    self.merger.touch(ref)
            # Which remotes' records count (usable ones, or the connection a remote is replacing)
            # is an input of every Service.
            merged_from = frozenset(id(rc) for rc in sources)
            if merged_from != self._merged_from:
                self._merged_from = merged_from
                self.merger.touch_all()

            def local_of(ref: tuple[str, str]) -> LocalService | None:
                svc = self.state.services.get(ref)
                return None if svc is None else local_service(identity, svc, self.state.slices_of(*ref))

            def records_of(ref: tuple[str, str]) -> list[ClusterService]:
                return [rec for rc in sources if (rec := rc.service_record(ref)) is not None]

            outcome = self.merger.update(lambda: list(self.state.services), local_of, records_of,
                                         self._local_pod_cidrs())
        self._merged_refs = outcome.refs
        if outcome.problems is not None:
            for problem in set(outcome.problems) - self._merge_problems:
                log.warning("merge: %s", problem)
                metrics.ERRORS.labels("agent", "merge").inc()
            self._merge_problems = set(outcome.problems)
        inheriting = self._inheriting(now)
        kept_moved = inheriting != self._last_inheriting
        self._last_inheriting = inheriting
        if not inheriting or not self._inherited:
            # The merger's own table, by frontend: the datapath looks only at what moved.
            return self.merger.by_frontend, outcome.changed or kept_moved, None if kept_moved else outcome.frontends
        with self._lock:
            specs = self.merger.specs()
        return [
            ServiceSpec(spec.frontend, spec.backends | {
                b for b in self._inherited.get(spec.frontend, ()) if b.cluster_id in inheriting
            }, spec.affinity)
            for spec in specs
        ], outcome.changed or kept_moved, None

    def _local_pod_cidrs(self) -> list[str]:
        cidrs: list[str] = []
        for node in self.state.nodes.values():
            spec = node.get("spec") or {}
            cidrs += spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
        return cidrs

    def ready_to_program(self) -> bool:
        if not self._listed or not all(e.is_set() for e in self._listed.values()):
            return False
        if not self._fresh_node or self._programmed:
            return True  # what an earlier agent or step wrote is served: follow changes at once
        if time.monotonic() - self._started_at >= self.config.first_sync_wait:
            return True
        return all(rc.ready for rc in self.members.snapshot().values())

    def step(self) -> bool:
        """Merge and reconcile if anything changed; True when the maps were written."""
        if not self.ready_to_program():
            return False  # the maps keep what the previous agent wrote until we know better
        # One judgement of which remotes are usable for both the maps and the routes, so a
        # backend is never written without the route to it.
        now = time.monotonic()
        sources = self._usable_sources(now)
        routes = self._route_plan(now, sources) if self.routes is not None else None
        if routes is not None:
            # A remote's routes go in before its backends and leave only after them: a connect()
            # the socket-LB sends to a remote backend always finds its route.
            self._apply_routes({**(self._last_routes or {}), **routes})
        specs, moved, hint = self.desired(now, sources)
        if hint is None:
            self._unwritten = None
        elif self._unwritten is not None:
            self._unwritten |= hint
        wrote = False
        if moved or not self._programmed:
            ops = self.lb.program(specs, self._unwritten)
            self._programmed, self._unwritten = True, set()
            wrote = True
            if trace.enabled():
                trace.hops("map-write", (f"{ns}/{name}" for ns, name in self._merged_refs))
            if ops:
                log.info("datapath: %d services, %d map operations", len(specs), len(ops))
            if len(ops) > 10_000:
                # A big step (the first, a resync) peaks far above the steady state: keep the steady state.
                release_freed_heap()
        if routes is not None:
            self._apply_routes(routes)
        return wrote

    def _route_plan(self, now: float, sources: list[RemoteCluster]) -> dict[str, str] | None:
        """The routes to the usable remotes' pod CIDRs (None if they cannot be planned now)."""
        try:
            with self._lock:
                local_cidrs = self._local_pod_cidrs()
            nodes = [node for rc in sources for node in rc.node_records()]
            plan = plan_routes(local_cidrs, nodes)
            if self._inheriting(now):
                # Which remote a kept route belongs to is unknown until it syncs: keep them all.
                for cidr, via in self._inherited_routes.items():
                    plan.routes.setdefault(cidr, via)
            for cidr, via in (self._last_routes or {}).items():
                if cidr not in plan.routes and cidr not in self._draining:
                    self._draining[cidr] = (via, now + self.config.route_drain)
            for cidr, (via, until) in list(self._draining.items()):
                if cidr in plan.routes or now >= until:
                    del self._draining[cidr]
                else:
                    plan.routes.setdefault(cidr, via)
        except Exception:  # routes must not hold the datapath back
            log.exception("route planning failed")
            metrics.ERRORS.labels("agent", "route").inc()
            return None
        for problem in set(plan.problems) - self._route_problems:
            log.warning("routes: %s", problem)
            metrics.ERRORS.labels("agent", "route").inc()
        self._route_problems = set(plan.problems)
        return plan.routes

    def _apply_routes(self, routes: dict[str, str]) -> None:
        assert self.routes is not None
        if routes == self._last_routes:
            return
        try:
            changes = self.routes.apply(routes)
        except RoutingError as exc:
            log.error("routes: %s", exc)
            metrics.ERRORS.labels("agent", "route").inc()
            self._last_routes = None
            return
        except Exception:  # routes must not hold the datapath back
            log.exception("route sync failed")
            metrics.ERRORS.labels("agent", "route").inc()
            self._last_routes = None
            return
        for why in set(changes.failed.values()) - self._route_failures:  # each once while it lasts
            log.error("routes: %s", why)
            metrics.ERRORS.labels("agent", "route").inc()
        self._route_failures = set(changes.failed.values())
        # With a failure, try again on the next change; the routes that went in stay.
        self._last_routes = None if changes.failed else dict(routes)
        if changes.added or changes.replaced or changes.removed:
            log.info("routes: +%d ~%d -%d", len(changes.added), len(changes.replaced), len(changes.removed))

    def run(self) -> None:
        last_usable: tuple[frozenset[str], frozenset[int], frozenset[str], frozenset[str]] | None = None
        while not self._stop.is_set():
            self._dirty.wait(self.config.tick)
            if self._stop.is_set():
                break
            changed = self._dirty.is_set()
            if changed:
                if self.config.debounce:
                    time.sleep(self.config.debounce)
                # Events that land while this step runs set the flag again: a burst is coalesced
                # by the next step, with no fixed delay before the first.
                self._dirty.clear()
            # The tick exists for grace periods running out: merge again only when an event
            # came in or the set of usable remotes moved, not every second.
            now = time.monotonic()
            self.members.retire(now)
            draining = frozenset(cidr for cidr, (_, until) in self._draining.items() if now < until)
            usable = (frozenset(rc.name for rc in self.members.sources(now) if rc.usable(now)),
                      self._inheriting(now), self.members.switching(), draining)
            if not changed and usable == last_usable and self._programmed:
                continue
            last_usable = usable
            try:
                self.step()
            except CapacityError:
                # Refused whole before any write, logged once and counted by the datapath: the
                # maps keep the previous state; the next change tries again.
                self._programmed = False
            except Exception:  # one bad reconcile must not stop the node's agent
                log.exception("reconcile failed; retrying on the next change")
                metrics.ERRORS.labels("agent", "datapath").inc()
                self._programmed, self._unwritten = False, None
                if self._stop.wait(1):
                    break

    def request_stop(self) -> None:
        """Safe from a signal handler: the loop finishes its step, then stop() runs."""
        self._stop.set()
        self._dirty.set()

    def stop(self) -> None:
        """Stop watching and leave the maps as they are (no drain on restart)."""
        self.request_stop()
        self.members.stop()
        if self.lb is not None:
            self.lb.close()
        shutil.rmtree(self._secrets_dir, ignore_errors=True)

    def ready(self) -> tuple[bool, str]:
        """Serving (a readiness probe): this agent has programmed the maps, and no longer keeps a
        previous agent's remote backends on faith (every remote synced, or its grace ran out). A
        remote that is down does not make the agent unready: the rest of the mesh is served."""
        if self.identity is None:
            return False, f"waiting for ClusterMesh {self.config.mesh_name}"
        if not self._programmed:
            return False, "the maps are not programmed yet"
        kept = self._inheriting(time.monotonic())
        if kept:
            return False, f"keeping the previous agent's backends of {len(kept)} remotes until they sync"
        return True, json.dumps(self.status())

    def status(self) -> dict[str, Any]:
        return {
            "node": self.config.node,
            "cluster": self.identity.name if self.identity else None,
            "waiting_for": None if self.identity else f"ClusterMesh {self.config.mesh_name}",
            "remotes": [rc.status() for rc in self.members.snapshot().values()],
            "refused": self.members.refused,
        }
