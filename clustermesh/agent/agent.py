"""``clustermesh agent``: one per node. Local global Services + every usable remote
cluster -> the node's socket-LB maps.

Threads: one watch per local resource kind (Services, EndpointSlices), the
RemoteClusters' store readers, and the main loop, which wakes on any change
(debounced) and once a second (a remote's grace period can run out with no
event), merges, and reconciles the datapath only when the desired state moved.
Stopping keeps the maps: traffic flows while the agent is down or restarting.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter

from clustermesh import metrics
from clustermesh.agent.merge import LocalService, local_service, merge
from clustermesh.agent.remote import RemoteCluster, RemoteConfig, mesh_problems, remote_config_from_spec
from clustermesh.agent.routes import RouteTable, RoutingError
from clustermesh.agent.routing import plan_routes
from clustermesh.datapath.model import ServiceSpec
from clustermesh.kube import KubeClient, KubeError
from clustermesh.kvstore import KVStoreError
from clustermesh.operator.export import ClusterIdentity
from clustermesh.operator.state import ClusterState, Kind

log = logging.getLogger(__name__)


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
    remote_sync_timeout: float = 10.0
    """Seconds a starting agent waits for every remote to be ready before it programs without
    the ones that are not; meanwhile the maps keep what the previous agent wrote, so a restart
    does not drop remote backends that were serving."""
    debounce: float = 0.05
    tick: float = 1.0
    secrets_namespace: str = "kube-system"
    routes: str = "off"
    """Routes to remote pod CIDRs: "off", "host" (the agent's own netns) or "netns:NAME"."""


class Agent:
    def __init__(self, config: AgentConfig, kube: KubeClient, socket_lb_factory: Callable[[int], Any]) -> None:
        self.config = config
        self.kube = kube
        self.state = ClusterState()
        self.identity: ClusterIdentity | None = None
        self.remotes: dict[str, RemoteCluster] = {}
        self.refused: dict[str, str] = {}
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lb_factory = socket_lb_factory
        self.lb: Any = None
        self._last_specs: frozenset[ServiceSpec] | None = None
        self._secrets_dir = Path(tempfile.mkdtemp(prefix="clustermesh-agent-"))
        self.routes: RouteTable | None = None
        if config.routes == "host":
            self.routes = RouteTable(None)
        elif config.routes.startswith("netns:"):
            self.routes = RouteTable(config.routes.removeprefix("netns:"))
        elif config.routes != "off":
            raise ValueError(f"--routes {config.routes!r}: use off, host or netns:NAME")
        self._last_routes: dict[str, str] | None = None
        self._route_problems: set[str] = set()
        self._route_failures: set[str] = set()
        # A restarted agent must not program a half-listed cluster (Services without their
        # EndpointSlices would be written with no backends): wait for every first listing.
        self._listed: dict[str, threading.Event] = {}
        self._started_at = time.monotonic()
        self._remotes_awaited = True  # until the first programming
        self._merge_problems: set[str] = set()

    # ------------------------------------------------------------ setup

    def _remote_config(self, spec: dict[str, Any]) -> RemoteConfig:
        return remote_config_from_spec(self.kube, spec, self._secrets_dir, self.config.secrets_namespace)

    def start(self) -> None:
        mesh = self.kube.get_mesh(self.config.mesh_name)
        if mesh is None:
            raise KubeError(f"no ClusterMesh {self.config.mesh_name!r}: apply one (see README) before the agent")
        spec = mesh.get("spec") or {}
        local = spec.get("localCluster") or {}
        self.identity = ClusterIdentity(str(local.get("name", "")), int(local.get("id", 0)))
        remotes = []
        for entry in spec.get("clusters") or []:
            try:
                remotes.append(self._remote_config(entry))
            except (KubeError, KeyError, ValueError, IndexError) as exc:
                self.refused[str(entry.get("name"))] = f"cannot read its settings: {exc}"
        self.refused.update(mesh_problems(self.identity.name, self.identity.id, remotes))
        for name, why in self.refused.items():
            log.error("remote %s refused: %s", name, why)
            metrics.ERRORS.labels("agent", "bad-remote").inc()
        self._started_at = time.monotonic()
        self.lb = self._lb_factory(self.identity.id)
        self.lb.load()
        for rc in remotes:
            if rc.name in self.refused:
                continue
            try:
                self.remotes[rc.name] = RemoteCluster(
                    rc, self._on_remote_change, self.config.grace_period,
                    heartbeat_timeout=self.config.heartbeat_timeout,
                ).start()
            except KVStoreError as exc:  # e.g. https without a CA: refuse this remote only
                self.refused[rc.name] = str(exc)
                log.error("remote %s refused: %s", rc.name, exc)
                metrics.ERRORS.labels("agent", "bad-remote").inc()
        kinds: tuple[Kind, ...] = ("Service", "EndpointSlice", "Node") if self.routes else ("Service", "EndpointSlice")
        self._listed = {kind: threading.Event() for kind in kinds}
        for kind in kinds:
            t = threading.Thread(target=self._watch_local, args=(kind,), name=f"watch-{kind}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("agent on node %s of cluster %s (id %d): %d remotes", self.config.node, self.identity.name,
                 self.identity.id, len(self.remotes))

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
            self.state.apply_listing(kind, items, rv)
        self._listed[kind].set()
        self._dirty.set()
        for event_type, obj in self.kube.watch_objects(kind, rv):
            if self._stop.is_set():
                return
            if event_type == "BOOKMARK":
                continue
            with self._lock:
                if event_type == "DELETED":
                    self.state.delete(kind, obj)
                else:
                    self.state.upsert(kind, obj)
            self._dirty.set()

    # ------------------------------------------------------------ the loop

    def desired(self) -> list[ServiceSpec]:
        assert self.identity is not None
        with self._lock:
            locals_: dict[tuple[str, str], LocalService] = {}
            for (ns, name), svc in self.state.services.items():
                ls = local_service(self.identity, svc, self.state.slices_of(ns, name))
                if ls is not None:
                    locals_[(ns, name)] = ls
            local_cidrs = self._local_pod_cidrs()
        now = time.monotonic()
        records = [svc for rc in self.remotes.values() if rc.usable(now) for svc in rc.service_records()]
        result = merge(self.identity.id, locals_, records, exclude_remote_cidrs=local_cidrs)
        for problem in set(result.problems) - self._merge_problems:
            log.warning("merge: %s", problem)
            metrics.ERRORS.labels("agent", "merge").inc()
        self._merge_problems = set(result.problems)
        return result.specs

    def _local_pod_cidrs(self) -> list[str]:
        cidrs: list[str] = []
        for node in self.state.nodes.values():
            spec = node.get("spec") or {}
            cidrs += spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
        return cidrs

    def ready_to_program(self) -> bool:
        if not (self._listed and all(e.is_set() for e in self._listed.values())):
            return False
        if self._remotes_awaited:
            waiting = [name for name, rc in self.remotes.items() if not rc.ready]
            if waiting and time.monotonic() - self._started_at < self.config.remote_sync_timeout:
                return False
            if waiting:
                log.warning("programming without remotes that are not ready after %.0fs: %s",
                            self.config.remote_sync_timeout, ", ".join(sorted(waiting)))
            self._remotes_awaited = False
        return True

    def step(self) -> bool:
        """Merge and reconcile if anything changed; True when the maps were written."""
        if not self.ready_to_program():
            return False  # the maps keep what the previous agent wrote until we know better
        if self.routes is not None:
            try:
                self._sync_routes()
            except Exception:  # routes must not hold the datapath back
                log.exception("route sync failed")
                metrics.ERRORS.labels("agent", "route").inc()
        specs = frozenset(self.desired())
        if specs == self._last_specs:
            return False
        ops = self.lb.reconcile(specs)
        self._last_specs = specs
        if ops:
            log.info("datapath: %d services, %d map operations", len(specs), len(ops))
        return True

    def _sync_routes(self) -> None:
        assert self.routes is not None
        with self._lock:
            local_cidrs = self._local_pod_cidrs()
        now = time.monotonic()
        nodes = [node for rc in self.remotes.values() if rc.usable(now) for node in rc.node_records()]
        plan = plan_routes(local_cidrs, nodes)
        for problem in set(plan.problems) - self._route_problems:
            log.warning("routes: %s", problem)
            metrics.ERRORS.labels("agent", "route").inc()
        self._route_problems = set(plan.problems)
        if plan.routes == self._last_routes:
            return
        try:
            changes = self.routes.apply(plan.routes)
        except RoutingError as exc:
            log.error("routes: %s", exc)
            metrics.ERRORS.labels("agent", "route").inc()
            self._last_routes = None
            return
        for why in set(changes.failed.values()) - self._route_failures:  # each once while it lasts
            log.error("routes: %s", why)
            metrics.ERRORS.labels("agent", "route").inc()
        self._route_failures = set(changes.failed.values())
        # With a failure, try again on the next change; the routes that went in stay.
        self._last_routes = None if changes.failed else dict(plan.routes)
        if changes.added or changes.replaced or changes.removed:
            log.info("routes: +%d ~%d -%d", len(changes.added), len(changes.replaced), len(changes.removed))

    def run(self) -> None:
        last_usable: frozenset[str] | None = None
        while not self._stop.is_set():
            self._dirty.wait(self.config.tick)
            if self._stop.is_set():
                break
            changed = self._dirty.is_set()
            if changed:
                time.sleep(self.config.debounce)  # let a burst of events land first
                self._dirty.clear()
            # The tick exists for grace periods running out: merge again only when an event
            # came in or the set of usable remotes moved, not every second.
            usable = frozenset(name for name, rc in self.remotes.items() if rc.usable())
            if not changed and usable == last_usable and self._last_specs is not None:
                continue
            last_usable = usable
            try:
                self.step()
            except Exception:  # one bad reconcile must not stop the node's agent
                log.exception("reconcile failed; retrying on the next change")
                metrics.ERRORS.labels("agent", "datapath").inc()
                self._last_specs = None
                if self._stop.wait(1):
                    break

    def request_stop(self) -> None:
        """Safe from a signal handler: the loop finishes its step, then stop() runs."""
        self._stop.set()
        self._dirty.set()

    def stop(self) -> None:
        """Stop watching and leave the maps as they are (no drain on restart)."""
        self.request_stop()
        for rc in self.remotes.values():
            rc.stop()
        if self.lb is not None:
            self.lb.close()
        shutil.rmtree(self._secrets_dir, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        return {
            "node": self.config.node,
            "cluster": self.identity.name if self.identity else None,
            "remotes": [rc.status() for rc in self.remotes.values()],
            "refused": self.refused,
        }
