"""Membership: the remotes a ClusterMesh's ``spec.clusters`` names, followed one way by everyone who
reads them (the agent in direct mode, the store pods' cache and the operator's remote view).

``RemoteSet.apply(spec)`` makes one ``RemoteCluster`` per entry, with the same rules for all:

- an entry whose settings (endpoints, Secret contents) changed gets a new connection; the old one
  keeps serving (``sources``) until the new one is ready or the grace period ends, so rotating
  credentials drops nothing;
- an entry that leaves the spec is removed at once (its records are withdrawn);
- an entry whose Secret cannot be read right now keeps the connection it has;
- colliding or invalid names and IDs, and IDs above the mesh's ``maxConnectedClusters`` (read once,
  at the first spec: a change needs a restart, as Cilium's), are refused and logged once each.

Queries (``snapshot``, ``sources``, ``awaiting_first_sync``) change nothing; ``retire(now)`` is the one
call that ends the old connections whose time is over. Every method is safe from any thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from clustermesh import metrics, pki
from clustermesh.kube import KubeError
from clustermesh.kvstore import KVStoreError
from clustermesh.schema import MAX_CLUSTER_ID, SchemaError, validate_max_connected_clusters
from clustermesh.store.remote import RemoteCluster
from clustermesh.store.remote_config import RemoteConfig, mesh_problems, remote_config_from_spec

log = logging.getLogger(__name__)

EntryFor = Callable[[dict[str, Any], Mapping[str, Any]], dict[str, Any]]


def direct_entry(entry: dict[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """Read each remote where its entry says (its own store)."""
    return entry


def max_connected_clusters(spec: Mapping[str, Any]) -> int:
    """spec.maxConnectedClusters, the bound of every cluster ID in the mesh (255 when absent;
    SchemaError for a value Cilium does not allow)."""
    value = spec.get("maxConnectedClusters")
    return MAX_CLUSTER_ID if value is None else validate_max_connected_clusters(value)


class RemoteSet:
    def __init__(
        self,
        component: str,
        kube: Any,
        secrets_dir: Path,
        secrets_namespace: str,
        start: Callable[[RemoteConfig, int], RemoteCluster],
        grace_period: float,
        entry_for: EntryFor = direct_entry,
        on_change: Callable[[str], None] = lambda name: None,
    ) -> None:
        """``start(config, max_cluster_id)`` makes and starts a RemoteCluster; ``entry_for(entry, spec)``
        says where this component reads the remote (the agent with the cache: its own store);
        ``on_change(name)`` hears of every connection made, switched or removed."""
        self.component = component
        self.kube = kube
        self.secrets_dir = secrets_dir
        self.secrets_namespace = secrets_namespace
        self._start = start
        self.grace_period = grace_period
        self._entry_for = entry_for
        self._on_change = on_change
        self._lock = threading.RLock()
        self._remotes: dict[str, RemoteCluster] = {}
        self._fingerprints: dict[str, str] = {}
        self._retiring: dict[str, tuple[RemoteCluster, float]] = {}
        self._first_sync: dict[str, int] = {}  # joined with the first spec, not ready since: name -> id
        self._spec: Mapping[str, Any] = {}
        self._local: tuple[str, int] | None = None
        self._max_id: int | None = None
        self._generation = itertools.count()
        self._logged: set[str] = set()
        self.refused: dict[str, str] = {}  # replaced whole by each apply()

    # ------------------------------------------------------------ changes

    def apply(self, spec: Mapping[str, Any] | None, now: float, first: bool = False) -> None:
        """Make the connections what ``spec`` says (None: the last spec, its Secrets read again).
        Taken under the lock that applies it: a refresh that read the spec before an event and
        applied it after would undo the event."""
        changed: list[str] = []
        # Readers are stopped after the lock is released: stopping one joins its threads.
        to_stop: list[RemoteCluster] = []
        to_remove: list[RemoteCluster] = []
        with self._lock:
            if spec is None:
                spec = self._spec
            self._spec = spec
            local = spec.get("localCluster") or {}
            identity = (str(local.get("name", "")), int(local.get("id", 0) or 0))
            if self._local is None:
                self._local = identity
            elif identity != self._local:
                self._refuse_once("localCluster", f"localCluster changed to {dict(local)}; restart the "
                                  f"{self.component} to use it")
            try:
                max_id = max_connected_clusters(spec)
            except SchemaError as exc:
                self._refuse_once("maxConnectedClusters", f"{exc}; IDs up to {MAX_CLUSTER_ID} are accepted")
                max_id = MAX_CLUSTER_ID
            if self._max_id is None:
                self._max_id = max_id
            elif max_id != self._max_id:
                self._refuse_once("maxConnectedClusters",
                                  f"maxConnectedClusters changed; restart the {self.component} to use it")
            folder = self.secrets_dir / str(next(self._generation))
            configs: dict[str, RemoteConfig] = {}
            refused: dict[str, str] = {}
            unreadable: set[str] = set()
            for entry in spec.get("clusters") or []:
                name = str(entry.get("name"))
                try:
                    configs[name] = remote_config_from_spec(self.kube, self._entry_for(dict(entry), spec), folder,
                                                            self.secrets_namespace)
                except (KubeError, KeyError, ValueError, IndexError, TypeError) as exc:
                    refused[name] = f"cannot read its settings: {exc}"
                    unreadable.add(name)
            pki.observe_files({f"remote {c.name} {label}": path for c in configs.values()
                               for label, path in (("ca.crt", c.ca_cert), ("tls.crt", c.cert_file))})
            refused.update(mesh_problems(self._local[0], self._local[1], configs.values(), self._max_id))
            for name in list(self._remotes):
                if name in unreadable:
                    continue  # a Secret we cannot read right now: keep the connection we have
                if name not in configs or name in refused:
                    log.info("remote %s left the mesh: withdrawing its records", name)
                    self._fingerprints.pop(name, None)
                    self._first_sync.pop(name, None)
                    retiring = self._retiring.pop(name, None)
                    if retiring is not None:
                        to_stop.append(retiring[0])
                    to_remove.append(self._remotes.pop(name))
                    changed.append(name)
            for name, config in configs.items():
                if name in refused:
                    continue
                fingerprint = _fingerprint(config)
                if name in self._remotes and fingerprint == self._fingerprints.get(name):
                    shutil.rmtree(folder / name, ignore_errors=True)  # the files in use stay
                    continue
                try:
                    rc = self._start(config, self._max_id)
                except KVStoreError as exc:  # e.g. https without a CA: refuse this remote only
                    refused[name] = str(exc)
                    continue
                old = self._remotes.get(name)
                if old is not None:
                    log.info("remote %s: new settings (endpoint or credentials); switching once connected", name)
                    previous = self._retiring.pop(name, None)
                    if previous is not None:
                        to_stop.append(previous[0])
                    self._retiring[name] = (old, now + self.grace_period)
                elif not first:
                    log.info("remote %s joined the mesh", name)
                if first:
                    self._first_sync[name] = config.id
                self._remotes[name] = rc
                self._fingerprints[name] = fingerprint
                changed.append(name)
            for name, why in refused.items():
                self._refuse_once(name, why)
            self.refused = refused
            with contextlib.suppress(OSError):
                folder.rmdir()  # nothing new in it: every remote kept its settings
        for rc in to_stop:
            rc.stop()
        for rc in to_remove:
            rc.remove()
        for name in changed:
            self._on_change(name)

    def _refuse_once(self, name: str, why: str) -> None:
        if f"{name}: {why}" in self._logged:
            return
        self._logged.add(f"{name}: {why}")
        log.error("remote %s refused: %s", name, why)
        metrics.ERRORS.labels(self.component, "bad-remote").inc()

    def retire(self, now: float) -> None:
        """End what is over: old connections whose replacement is ready or whose grace period ended,
        and the first-sync wait of remotes that became ready."""
        done: list[RemoteCluster] = []
        with self._lock:
            for name, rc in self._remotes.items():
                if rc.ready:
                    self._first_sync.pop(name, None)
            for name, (old, until) in list(self._retiring.items()):
                if self._remotes[name].ready or now >= until:
                    del self._retiring[name]
                    done.append(old)
        for old in done:
            old.stop()
            self._on_change(old.name)

    def stop(self) -> None:
        """Stop every reader; keep what they hold (a restart must not drain the datapath)."""
        with self._lock:
            everyone = [*self._remotes.values(), *(old for old, _ in self._retiring.values())]
        for rc in everyone:
            rc.stop()

    # ------------------------------------------------------------ queries (they change nothing)

    def snapshot(self) -> dict[str, RemoteCluster]:
        """The newest connection of each remote."""
        with self._lock:
            return dict(self._remotes)

    def everyone(self) -> list[RemoteCluster]:
        """Every connection, old ones still serving included."""
        with self._lock:
            return [*self._remotes.values(), *(old for old, _ in self._retiring.values())]

    def sources(self, now: float) -> list[RemoteCluster]:
        """The connection whose records count now, per remote: the old one while the new one is
        not ready and its grace period lasts."""
        with self._lock:
            return [self._source(name, rc, now) for name, rc in self._remotes.items()]

    def source(self, name: str, now: float) -> RemoteCluster | None:
        with self._lock:
            rc = self._remotes.get(name)
            return None if rc is None else self._source(name, rc, now)

    def _source(self, name: str, rc: RemoteCluster, now: float) -> RemoteCluster:
        retiring = self._retiring.get(name)
        if retiring is None or rc.ready or now >= retiring[1]:
            return rc
        return retiring[0]

    def switching(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._retiring)

    def awaiting_first_sync(self) -> frozenset[int]:
        """IDs of the remotes of the first spec that have not been ready yet."""
        with self._lock:
            return frozenset(self._first_sync.values())


def _fingerprint(config: RemoteConfig) -> str:
    """What identifies a remote's settings, Secret contents included (the file paths change
    with every read)."""
    digest = hashlib.sha256(repr((config.name, config.id, config.endpoints, config.user, config.password)).encode())
    for path in (config.ca_cert, config.cert_file, config.key_file):
        digest.update(Path(path).read_bytes() if path else b"-")
    return digest.hexdigest()
