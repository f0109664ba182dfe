"""One object per remote cluster: its connection, its validated cache, its readiness.

The shape of Cilium's remote cluster handling, with our difference on purpose:
a remote whose store stops answering keeps serving its cached backends only for
a grace period, then is withdrawn (Cilium keeps them forever by default, and its
users see traffic sent to dead clusters). "Stops answering" is decided by a
probe with a deadline (a frozen grpc-proxy keeps TCP up and answers nothing) and
by the watch streams, never by the remote's operator: its records sit on a
15-minute lease, so a paused or restarting operator changes nothing here, and a
stale heartbeat only makes us list again. Records that expire with the remote
operator's lease are deleted from the store and so leave the cache at once.

A remote is *ready* (:func:`not_ready_reason`) once its cluster-config matches
what our ClusterMesh says and, when it announces the ``syncedCanaries``
capability, the "synced" markers of its services and nodes are in: before that
its store may hold a half-written export, and nothing of it is used. Without the
capability (cilium-operator in kvstore mode) it is trusted once listed, as Cilium
does. A store replaced behind its proxy (its revision goes back) and a
cluster-config whose ID changes make every prefix list again.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from clustermesh import metrics, schema, trace
from clustermesh.kvstore import KVClient, KVStoreError
from clustermesh.schema import ClusterConfig, ClusterService, Node, SchemaError, ServiceExportRecord
from clustermesh.store.readiness import NotReady, Unready, not_ready_reason
from clustermesh.store.remote_config import RemoteConfig
from clustermesh.store.watch import WatchStore

log = logging.getLogger(__name__)


class _Prefix:
    """Observer of one watched prefix: decode, validate, keep, tell the owner."""

    def __init__(self, owner: RemoteCluster, kind: str) -> None:
        self.owner = owner
        self.kind = kind

    def on_upsert(self, key: str, value: str) -> None:
        self.owner._upsert(self.kind, key, value)

    def on_delete(self, key: str) -> None:
        self.owner._delete(self.kind, key)

    def on_synced(self) -> None:
        self.owner._changed()


class RemoteCluster:
    """One remote cluster: five watched prefixes, a liveness probe, validated caches.

    Reachability is decided by the remote's store answering, never by its operator:
    a probe (one cheap read with its own deadline) every ``probe_interval`` seconds,
    plus the watch streams. A frozen grpc-proxy keeps its TCP connections up and
    answers nothing, so without the probe a watch would just wait. The grace period
    runs from the first failed probe (or broken watch); a stale heartbeat only makes
    us list again (its operator may be paused or restarting while its records, on a
    long lease, are still right)."""

    def __init__(
        self,
        config: RemoteConfig,
        on_change: Callable[[str], None] = lambda name: None,
        grace_period: float = 60.0,
        client: KVClient | None = None,
        heartbeat_timeout: float = 180.0,
        *,
        max_cluster_id: int = schema.MAX_CLUSTER_ID,
        probe_interval: float = 2.0,
        probe_timeout: float = 3.0,
        watch_exports: bool = False,
        role: str = "agent",
        watch_check_interval: float = 30.0,
    ) -> None:
        self.config = config
        self.role = role
        """Who reads the remote (agent, operator): the component label of its error metrics."""
        self.name = config.name
        self.grace_period = grace_period
        self.heartbeat_timeout = heartbeat_timeout
        self.max_cluster_id = max_cluster_id
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.watch_check_interval = watch_check_interval
        """Seconds between checks of each watch against the store (``WatchStore.verify``): a watch
        that fell silent is listed again within two of them."""
        self.on_change = on_change
        self.client = client or config.client()
        self.services: dict[tuple[str, str], ClusterService] = {}
        self._changed_refs: set[tuple[str, str]] = set()
        self.nodes: dict[str, Node] = {}
        self.watch_exports = watch_exports
        """Also read the remote's MCS-API ServiceExports (the operator does; agents do not)."""
        self.service_exports: dict[tuple[str, str], ServiceExportRecord] = {}
        self._exports_store: WatchStore | None = None
        self.config_error: str | None = None
        self._lock = threading.RLock()
        self._problems: dict[str, str] = {}
        self._synced: set[str] = set()
        self._config_value: str | None = None
        self._config_id: int | None = None
        self._stores: list[WatchStore] = []
        self._record_stores: list[WatchStore] = []
        self.cached: bool = False
        """Whether the records are to be read from a KVStoreMesh cache (its cluster-config says "cached")."""
        self._stores_cached = False  # the layout the record stores read now
        self._probe_ok: bool | None = None
        self._probe_error: str | None = None
        self._unreachable_since: float | None = None
        self._unreachable_wall: dt.datetime | None = None
        self._heartbeat_at = time.monotonic()
        self._resynced_stale = False
        self.heartbeat_relists = 0
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> RemoteCluster:
        self._record_stores = self._make_record_stores(self.cached)
        self._stores = [
            *self._record_stores,
            WatchStore(self.client, f"{schema.SYNCED_PREFIX}/{self.name}/", _Prefix(self, "synced"),
                       name=f"{self.name}/synced"),
            WatchStore(self.client, schema.cluster_config_key(self.name), _Prefix(self, "config"),
                       name=f"{self.name}/config"),
            WatchStore(self.client, schema.HEARTBEAT_KEY, _Prefix(self, "heartbeat"),
                       name=f"{self.name}/heartbeat"),
        ]
        if self.watch_exports:
            # Always the remote's own state: the operator reads each remote directly.
            self._exports_store = WatchStore(
                self.client, schema.service_exports_cluster_prefix(self.name), _Prefix(self, "export"),
                name=f"{self.name}/serviceexports")
            self._stores.append(self._exports_store)
        for store in self._stores:
            store.start()
        self._prober = threading.Thread(target=self._probe_loop, name=f"remote-probe-{self.name}", daemon=True)
        self._prober.start()
        return self

    def _make_record_stores(self, cached: bool) -> list[WatchStore]:
        services, nodes = schema.record_prefixes(cached)
        return [
            WatchStore(self.client, f"{services}/{self.name}/", _Prefix(self, "service"),
                       name=f"{self.name}/services"),
            WatchStore(self.client, f"{nodes}/{self.name}/", _Prefix(self, "node"), name=f"{self.name}/nodes"),
        ]

    def _switch_layout(self, cached: bool) -> None:
        """Read the records from the other layout (state or cache): the old stores stopped, what they
        held forgotten, new stores listed. Runs in a thread of its own: it joins the old stores'
        threads, one of which noticed the change. Not ready again until the new listing is done."""
        with self._lock:
            old = self._record_stores
        for store in old:
            store.stop()
        new = self._make_record_stores(cached)
        with self._lock:
            self._changed_refs.update(self.services)
            self.services.clear()
            self.nodes.clear()
            self._record_stores = new
            self._stores_cached = cached
            self._stores = [*new, *(s for s in self._stores if s not in old)]
        for store in new:
            store.start()
        self._changed()

    def stop(self) -> None:
        """Stop watching; keep the cache (an agent restart must not drain the datapath)."""
        self._stop.set()
        for store in self._stores:
            store.stop()
        if self._prober is not None:
            self._prober.join(timeout=self.probe_timeout + 5)
        self.client.close()

    def service_records(self) -> list[ClusterService]:
        with self._lock:
            return list(self.services.values())

    def service_record(self, ref: tuple[str, str]) -> ClusterService | None:
        """This remote's record of Service (namespace, name), if it has one."""
        with self._lock:
            return self.services.get(ref)

    def take_changed(self) -> set[tuple[str, str]]:
        """The Services whose record changed since the last call (the agent merges only those)."""
        with self._lock:
            changed, self._changed_refs = self._changed_refs, set()
            return changed

    def export_records(self) -> list[ServiceExportRecord] | None:
        """The remote's ServiceExports, or None while they are not known in full: the remote announces
        the capability and its first listing (or its synced marker) is not in yet. A remote that
        predates MCS (no capability) or turned it off exports nothing, at once (its silence is
        not a withdrawal to wait for)."""
        with self._lock:
            value = self._config_value
            records = list(self.service_exports.values())
            synced = set(self._synced)
        try:
            config = ClusterConfig.decode(value) if value is not None else None
        except SchemaError:
            config = None
        if config is None:
            return None
        if not config.service_exports_enabled:
            return []
        store = self._exports_store
        if store is None or not store.synced.is_set():
            return None
        if config.synced_canaries and schema.SERVICE_EXPORTS_PREFIX not in synced:
            return None
        return records

    def node_records(self) -> list[Node]:
        with self._lock:
            return list(self.nodes.values())

    def cluster_config(self) -> ClusterConfig | None:
        """The remote's cluster-config when it parses and names this remote's ID, else None."""
        with self._lock:
            value = self._config_value
        if value is None:
            return None
        try:
            config = ClusterConfig.decode(value)
        except SchemaError:
            return None
        return config if config.cluster_id == self.config.id else None

    def remove(self) -> None:
        """The remote left the mesh: stop, forget everything, tell the owner."""
        self.stop()
        with self._lock:
            self._changed_refs.update(self.services)
            self.services.clear()
            self.nodes.clear()
            self.service_exports.clear()
            self._synced.clear()
            self._config_value = None
        self._changed()

    # ------------------------------------------------------------ liveness

    def _probe_loop(self) -> None:
        try:
            wait = self.probe_interval
            next_check = time.monotonic() + self.watch_check_interval
            while not self._stop.wait(wait):
                # After a failure, ask again soon: the failed call ended its connection, and the
                # next one may reach another replica (or log in to a replaced store).
                answered = self.probe()
                wait = self.probe_interval if answered else min(self.probe_interval, self.RETRY_INTERVAL)
                if answered and time.monotonic() >= next_check:
                    self.verify_watches()
                    next_check = time.monotonic() + self.watch_check_interval
        except Exception:  # a bug here must be visible, not a silently dead thread
            log.exception("[remote %s] liveness probe stopped by an unexpected error", self.name)
            raise

    RETRY_INTERVAL = 0.5
    """Seconds between probes while the store does not answer."""

    def verify_watches(self) -> int:
        """Check every watch against the store; returns how many fell silent (each is listed
        again). A read that fails here is the probe's to notice, not this check's."""
        silent = 0
        for store in list(self._stores):
            try:
                silent += store.verify()
            except KVStoreError as exc:
                log.debug("[remote %s] checking the watch of %s: %s", self.name, store.prefix, exc)
                break
        return silent

    def probe(self) -> bool:
        """Ask the remote's store once, with a deadline. Returns whether it answered.

        Also catches a store that was replaced behind its proxy or Service (another etcd
        member answers, or its revision went backwards) and a stale heartbeat: both make
        the prefixes read from elsewhere list again, neither counts as unreachable."""
        seen = max((s.max_revision for s in self._stores), default=0)  # before asking: see WatchStore
        try:
            view = self.client.probe(schema.HEARTBEAT_KEY, self.probe_timeout)
        except KVStoreError as exc:
            first = self._probe_ok is not False
            if first:
                log.warning("[remote %s] store does not answer (%s); its backends serve for %.0fs more",
                            self.name, exc, self.grace_period)
                metrics.ERRORS.labels(self.role, "remote-unreachable").inc()
                # Watches on a frozen proxy wait forever: make them reconnect, and fail, now.
                for store in self._stores:
                    store.resync()
            self._probe_ok, self._probe_error = False, str(exc)
            self._track_reachability(time.monotonic())  # the grace period runs from the notice
            if first:
                self._changed()
            return False
        was = self._probe_ok
        self._probe_ok, self._probe_error = True, None
        if was is False:
            log.info("[remote %s] store answers again", self.name)
        if view.revision < seen:
            log.warning("[remote %s] store revision went back from %d to %d: the store behind the proxy "
                        "was replaced; listing everything again", self.name, seen, view.revision)
            metrics.ERRORS.labels(self.role, "store-replaced").inc()
            for store in self._stores:
                store.resync()
        else:
            elsewhere = [s for s in self._stores if s.store is not None and s.store != view.store]
            if elsewhere:
                log.warning("[remote %s] etcd %s answers, %d prefixes were read from %s; listing them again",
                            self.name, view.store, len(elsewhere), elsewhere[0].store)
                metrics.ERRORS.labels(self.role, "store-replaced").inc()
            # A prefix still backing off after the outage is listed now, not at its next retry.
            for store in self._stores:
                if store in elsewhere or not store.connected:
                    store.resync()
        self.check_heartbeat()
        if self._track_reachability(time.monotonic()) or was is False:
            self._changed()
        return True

    def _track_reachability(self, now: float) -> bool:
        """Start or end the unreachable period; returns whether it changed. The probe thread's alone."""
        ok = self.connected
        if ok and self._unreachable_since is not None:
            self._unreachable_since = self._unreachable_wall = None
            return True
        if not ok and self._unreachable_since is None:
            self._unreachable_since = now
            self._unreachable_wall = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=time.monotonic() - now)
            return True
        return False

    @property
    def heartbeat_stale(self) -> bool:
        """No heartbeat change for ``heartbeat_timeout``: the remote's operator is paused or
        gone, or we read a frozen view. Not a reason to withdraw anything by itself."""
        return time.monotonic() - self._heartbeat_at > self.heartbeat_timeout

    @property
    def connected(self) -> bool:
        return bool(self._stores) and self._probe_ok is not False and all(s.connected for s in self._stores)

    @property
    def unreachable_since(self) -> float | None:
        """``time.monotonic()`` when the remote's store stopped answering (None: it answers)."""
        return self._unreachable_since

    def check_heartbeat(self) -> None:
        """When the heartbeat is stale, list everything again once (a frozen view would show)."""
        if self.heartbeat_stale and not self._resynced_stale:
            log.warning("[remote %s] no heartbeat for %.0fs; listing again (its backends stay)", self.name,
                        self.heartbeat_timeout)
            metrics.ERRORS.labels(self.role, "stale-remote").inc()
            self._resynced_stale = True
            self.heartbeat_relists += 1
            for store in self._stores:
                store.resync()

    def not_ready_reason(self) -> NotReady | None:
        with self._lock:
            reason = not_ready_reason(self.name, self.config.id, self._config_value, self._synced,
                                      self.max_cluster_id)
        if reason is None and self._stores_cached != self.cached:
            # The records of the other layout are no answer (an empty listing would look ready).
            return NotReady(Unready.SWITCHING, "switching to the cache's layout" if self.cached
                            else "switching to the state layout")
        if reason is None and not all(s.synced.is_set() for s in self._record_stores):
            # A marker may arrive before our own first listing.
            return NotReady(Unready.LISTING, "listing services and nodes")
        return reason

    @property
    def ready(self) -> bool:
        return bool(self._stores) and self.not_ready_reason() is None

    def usable(self, now: float | None = None) -> bool:
        """Whether the merge may use this remote's backends right now (``now``: time.monotonic())."""
        if not self.ready:
            return False
        now = time.monotonic() if now is None else now
        # A query: the probe thread alone starts and ends the unreachable period (at most one probe
        # interval after a watch broke); until it has, a broken connection is within its grace.
        since = self._unreachable_since
        return since is None or now - since < self.grace_period

    def status(self) -> dict[str, Any]:
        last = self._probe_error or next((s.last_error for s in self._stores if s.last_error), None)
        reason = self.not_ready_reason() if self._stores else "not started"
        out: dict[str, Any] = {
            "name": self.name, "connected": self.connected, "ready": reason is None,
            "services": len(self.services), "nodes": len(self.nodes),
        }
        if self.config_error or last or reason:
            out["lastFailure"] = self.config_error or last or reason
        wall = self._unreachable_wall
        if wall is not None and not out["connected"]:
            out["unreachableSince"] = wall.strftime("%Y-%m-%dT%H:%M:%SZ")
        return out

    # ------------------------------------------------------------ records

    def _problem(self, key: str, problem: str | None) -> None:
        if problem is None:
            self._problems.pop(key, None)
            return
        if self._problems.get(key) != problem:
            self._problems[key] = problem
            log.warning("[remote %s] %s: %s; skipped", self.name, key, problem)
            metrics.ERRORS.labels(self.role, "bad-record").inc()

    def _upsert(self, kind: str, key: str, value: str) -> None:
        if kind == "service":
            trace.hop("watch-event", trace.service_ref(key))
        if kind == "config" and key != schema.cluster_config_key(self.name):
            return  # a prefix watch of "c1" also sees "c10"
        if kind == "heartbeat":
            if key == schema.HEARTBEAT_KEY:
                self._heartbeat_at = time.monotonic()
                self._resynced_stale = False
            return
        with self._lock:
            if kind == "config":
                self._check_config(value)
            elif kind == "synced":
                self._synced.add(key.removeprefix(f"{schema.SYNCED_PREFIX}/{self.name}/"))
            elif kind == "export":
                try:
                    record = ServiceExportRecord.decode(value, key=key)
                    if record.cluster != self.name:
                        raise SchemaError(f"cluster {record.cluster!r} is not {self.name!r}")
                except SchemaError as exc:
                    self._problem(key, str(exc))
                    self._drop_export(key)
                else:
                    self._problem(key, None)
                    self.service_exports[(record.namespace, record.name)] = record
            elif kind == "service":
                try:
                    svc = ClusterService.decode(value, key=key, max_cluster_id=self.max_cluster_id)
                    if svc.cluster_id != self.config.id:
                        raise SchemaError(f"clusterID {svc.cluster_id} is not {self.name}'s ID {self.config.id}")
                except SchemaError as exc:
                    self._problem(key, str(exc))
                    self._drop_service(key)
                else:
                    self._problem(key, None)
                    self.services[(svc.namespace, svc.name)] = svc
                    self._changed_refs.add((svc.namespace, svc.name))
            else:
                try:
                    node = Node.decode(value, key=key, max_cluster_id=self.max_cluster_id)
                    if node.cluster_id != self.config.id:
                        raise SchemaError(f"ClusterID {node.cluster_id} is not {self.name}'s ID {self.config.id}")
                except SchemaError as exc:
                    self._problem(key, str(exc))
                    self.nodes.pop(key.rsplit("/", 1)[-1], None)
                else:
                    self._problem(key, None)
                    self.nodes[node.name] = node
        self._changed()

    def _drop_export(self, key: str) -> None:
        try:
            ref = schema.parse_service_export_key(key)
        except SchemaError:
            return
        self.service_exports.pop((ref.namespace, ref.name), None)

    def _drop_service(self, key: str) -> None:
        try:
            ref = schema.parse_service_key(key)
        except SchemaError:
            return
        if self.services.pop((ref.namespace, ref.name), None) is not None:
            self._changed_refs.add((ref.namespace, ref.name))

    def _delete(self, kind: str, key: str) -> None:
        if kind == "service":
            trace.hop("watch-event", trace.service_ref(key))
        if kind == "heartbeat" or (kind == "config" and key != schema.cluster_config_key(self.name)):
            return
        with self._lock:
            self._problem(key, None)
            if kind == "config":
                self._config_value = None
                self.config_error = None
            elif kind == "synced":
                self._synced.discard(key.removeprefix(f"{schema.SYNCED_PREFIX}/{self.name}/"))
            elif kind == "service":
                self._drop_service(key)
            elif kind == "export":
                self._drop_export(key)
            else:
                self.nodes.pop(key.rsplit("/", 1)[-1], None)
        self._changed()

    def _check_config(self, value: str) -> None:
        self._config_value = value
        reason = not_ready_reason(self.name, self.config.id, value, self._synced, self.max_cluster_id)
        if reason is not None and reason.kind is Unready.ID_MISMATCH:
            self.config_error = f"{self.name} {reason}: fix one of them; the remote is not used until they agree"
        elif reason is not None and reason.kind.misconfigured:
            self.config_error = str(reason)
        else:
            self.config_error = None
        if self.config_error is not None:
            self._problem(schema.cluster_config_key(self.name), self.config_error)
        else:
            self._problem(schema.cluster_config_key(self.name), None)
        try:
            decoded = ClusterConfig.decode(value)
            new_id: int | None = decoded.cluster_id
        except SchemaError:
            decoded, new_id = None, None
        if decoded is not None and decoded.cached != self.cached and not self._stop.is_set():
            log.info("[remote %s] records are read from %s", self.name,
                     "a KVStoreMesh cache (cilium/cache/)" if decoded.cached else "its own state (cilium/state/)")
            self.cached = decoded.cached
            threading.Thread(target=self._switch_layout, args=(decoded.cached,), name=f"remote-layout-{self.name}",
                             daemon=True).start()
        if new_id is not None and self._config_id is not None and new_id != self._config_id:
            # Another cluster now answers at this address (or the store was rebuilt): what we
            # cached may be from the old one.
            log.warning("[remote %s] cluster ID changed from %d to %d; listing everything again",
                        self.name, self._config_id, new_id)
            for store in self._stores:
                if store.prefix != schema.cluster_config_key(self.name):
                    store.resync()
        if new_id is not None:
            self._config_id = new_id

    def _changed(self) -> None:
        try:
            self.on_change(self.name)
        except Exception:  # a consumer's bug must not kill the watch thread
            log.exception("[remote %s] change callback failed", self.name)
