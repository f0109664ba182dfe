"""One object per remote cluster: its connection, its validated cache, its readiness.

The shape of Cilium's remote cluster handling, with our difference on purpose:
a remote that becomes unreachable keeps serving its cached backends only for a
grace period, then is withdrawn (Cilium keeps them forever by default, and its
users see traffic sent to dead clusters). Records that expire with the remote
operator's lease are deleted from the store and so leave the cache at once.

A remote is *ready* once its cluster-config matches what our ClusterMesh says
(name and ID) and the "synced" markers of its services and nodes are in: before
that its store may hold a half-written export, and nothing of it is used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustermesh import metrics, schema
from clustermesh.kvstore import Endpoint, KVClient
from clustermesh.schema import ClusterConfig, ClusterService, Node, SchemaError
from clustermesh.store.watch import WatchStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteConfig:
    """A remote cluster as the local ClusterMesh object names it."""

    name: str
    id: int
    endpoint: str
    ca_cert: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)


def remote_config_from_spec(kube: Any, spec: dict[str, Any], secrets_dir: Path, default_namespace: str) -> RemoteConfig:
    """A ``spec.clusters[]`` entry of the ClusterMesh -> RemoteConfig. The TLS Secret
    (``ca.crt``, ``tls.crt``, ``tls.key``, optional ``username``/``password``) is read
    with ``kube.get_secret`` and its files written under ``secrets_dir``."""
    ca = cert = key = user = password = None
    tls = spec.get("tls") or {}
    if tls.get("secretName"):
        data = kube.get_secret(tls.get("secretNamespace") or default_namespace, tls["secretName"])
        folder = secrets_dir / spec["name"]
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths = {}
        for name in ("ca.crt", "tls.crt", "tls.key"):
            if name in data:
                (folder / name).write_bytes(data[name])
                (folder / name).chmod(0o600)
                paths[name] = str(folder / name)
        ca, cert, key = paths.get("ca.crt"), paths.get("tls.crt"), paths.get("tls.key")
        user = data["username"].decode() if "username" in data else None
        password = data["password"].decode() if "password" in data else None
    return RemoteConfig(spec["name"], int(spec["id"]), spec["endpoints"][0], ca, cert, key, user, password)


def mesh_problems(local_name: str, local_id: int, remotes: Iterable[RemoteConfig]) -> dict[str, str]:
    """Remotes that must be refused (name -> why): bad or colliding names and IDs. Pure."""
    refused: dict[str, str] = {}
    seen_ids: dict[int, str] = {local_id: local_name}
    seen_names = {local_name}
    for remote in remotes:
        try:
            schema.validate_cluster_name(remote.name)
            schema.validate_cluster_id(remote.id)
        except SchemaError as exc:
            refused[remote.name] = str(exc)
            continue
        if remote.name in seen_names:
            refused[remote.name] = f"cluster name {remote.name} is used twice in the mesh"
        elif remote.id in seen_ids:
            refused[remote.name] = f"cluster ID {remote.id} is already used by {seen_ids[remote.id]}"
        else:
            seen_ids[remote.id] = remote.name
            seen_names.add(remote.name)
    return refused


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
    def __init__(
        self,
        config: RemoteConfig,
        on_change: Callable[[str], None] = lambda name: None,
        grace_period: float = 60.0,
        client: KVClient | None = None,
        heartbeat_timeout: float = 180.0,
    ) -> None:
        self.config = config
        self.name = config.name
        self.grace_period = grace_period
        self.heartbeat_timeout = heartbeat_timeout
        self.on_change = on_change
        self.client = client or KVClient(
            Endpoint.parse(config.endpoint, config.ca_cert, config.cert_file, config.key_file),
            user=config.user, password=config.password,
        )
        self.services: dict[tuple[str, str], ClusterService] = {}
        self.nodes: dict[str, Node] = {}
        self.config_error: str | None = None
        self._lock = threading.RLock()
        self._problems: dict[str, str] = {}
        self._synced: dict[str, bool] = {}
        self._config_ok = False
        self._stores: list[WatchStore] = []
        self._disconnected_since: float | None = None
        self._heartbeat_at = time.monotonic()
        self._resynced_stale = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> RemoteCluster:
        self._stores = [
            WatchStore(self.client, schema.services_cluster_prefix(self.name), _Prefix(self, "service"),
                       name=f"{self.name}/services"),
            WatchStore(self.client, schema.nodes_cluster_prefix(self.name), _Prefix(self, "node"),
                       name=f"{self.name}/nodes"),
            WatchStore(self.client, f"{schema.SYNCED_PREFIX}/{self.name}/", _Prefix(self, "synced"),
                       name=f"{self.name}/synced"),
            WatchStore(self.client, schema.cluster_config_key(self.name), _Prefix(self, "config"),
                       name=f"{self.name}/config"),
            WatchStore(self.client, schema.HEARTBEAT_KEY, _Prefix(self, "heartbeat"),
                       name=f"{self.name}/heartbeat"),
        ]
        for store in self._stores:
            store.start()
        return self

    def stop(self) -> None:
        """Stop watching; keep the cache (an agent restart must not drain the datapath)."""
        for store in self._stores:
            store.stop()
        self.client.close()

    def service_records(self) -> list[ClusterService]:
        with self._lock:
            return list(self.services.values())

    def node_records(self) -> list[Node]:
        with self._lock:
            return list(self.nodes.values())

    def remove(self) -> None:
        """The remote left the mesh: stop, forget everything, tell the owner."""
        self.stop()
        with self._lock:
            self.services.clear()
            self.nodes.clear()
            self._synced.clear()
            self._config_ok = False
        self._changed()

    # ------------------------------------------------------------ state

    @property
    def heartbeat_stale(self) -> bool:
        """No heartbeat change for ``heartbeat_timeout``: the remote's operator is gone, or
        we read a frozen view (a grpc-proxy still watching an etcd that was wiped)."""
        return time.monotonic() - self._heartbeat_at > self.heartbeat_timeout

    @property
    def connected(self) -> bool:
        return bool(self._stores) and all(s.connected for s in self._stores) and not self.heartbeat_stale

    def check_heartbeat(self) -> None:
        """Called periodically: when the heartbeat is stale, list everything again once."""
        if self.heartbeat_stale and not self._resynced_stale:
            log.warning("[remote %s] no heartbeat for %.0fs; listing again", self.name, self.heartbeat_timeout)
            metrics.ERRORS.labels("agent", "stale-remote").inc()
            self._resynced_stale = True
            for store in self._stores:
                store.resync()

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._config_ok and self._synced.get(schema.SERVICES_PREFIX, False) and self._synced.get(
                schema.NODES_PREFIX, False
            )

    def usable(self, now: float | None = None) -> bool:
        """Whether the merge may use this remote's backends right now."""
        if not self.ready:
            return False
        self.check_heartbeat()
        now = time.monotonic() if now is None else now
        if self.connected:
            self._disconnected_since = None
            return True
        if self._disconnected_since is None:
            self._disconnected_since = now
        return now - self._disconnected_since < self.grace_period

    def status(self) -> dict[str, Any]:
        last = next((s.last_error for s in self._stores if s.last_error), None)
        out: dict[str, Any] = {
            "name": self.name, "connected": self.connected, "ready": self.ready,
            "services": len(self.services), "nodes": len(self.nodes),
        }
        if self.config_error or last:
            out["lastFailure"] = self.config_error or last
        return out

    # ------------------------------------------------------------ records

    def _problem(self, key: str, problem: str | None) -> None:
        if problem is None:
            self._problems.pop(key, None)
            return
        if self._problems.get(key) != problem:
            self._problems[key] = problem
            log.warning("[remote %s] %s: %s; skipped", self.name, key, problem)
            metrics.ERRORS.labels("agent", "bad-record").inc()

    def _upsert(self, kind: str, key: str, value: str) -> None:
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
                self._synced[key.removeprefix(f"{schema.SYNCED_PREFIX}/{self.name}/")] = True
            elif kind == "service":
                try:
                    svc = ClusterService.decode(value, key=key)
                    if svc.cluster_id != self.config.id:
                        raise SchemaError(f"clusterID {svc.cluster_id} is not {self.name}'s ID {self.config.id}")
                except SchemaError as exc:
                    self._problem(key, str(exc))
                    self._drop_service(key)
                else:
                    self._problem(key, None)
                    self.services[(svc.namespace, svc.name)] = svc
            else:
                try:
                    node = Node.decode(value, key=key)
                except SchemaError as exc:
                    self._problem(key, str(exc))
                    self.nodes.pop(key.rsplit("/", 1)[-1], None)
                else:
                    self._problem(key, None)
                    self.nodes[node.name] = node
        self._changed()

    def _drop_service(self, key: str) -> None:
        try:
            ref = schema.parse_service_key(key)
        except SchemaError:
            return
        self.services.pop((ref.namespace, ref.name), None)

    def _delete(self, kind: str, key: str) -> None:
        if kind == "heartbeat" or (kind == "config" and key != schema.cluster_config_key(self.name)):
            return
        with self._lock:
            self._problem(key, None)
            if kind == "config":
                self._config_ok = False
            elif kind == "synced":
                self._synced.pop(key.removeprefix(f"{schema.SYNCED_PREFIX}/{self.name}/"), None)
            elif kind == "service":
                self._drop_service(key)
            else:
                self.nodes.pop(key.rsplit("/", 1)[-1], None)
        self._changed()

    def _check_config(self, value: str) -> None:
        try:
            config = ClusterConfig.decode(value)
        except SchemaError as exc:
            self.config_error = f"cluster-config does not parse: {exc}"
        else:
            if config.cluster_id != self.config.id:
                self.config_error = (
                    f"{self.name} says its ID is {config.cluster_id}, the ClusterMesh says {self.config.id}: "
                    "fix one of them; the remote is not used until they agree"
                )
            else:
                self.config_error = None
        if self.config_error:
            self._problem(schema.cluster_config_key(self.name), self.config_error)
        self._config_ok = self.config_error is None

    def _changed(self) -> None:
        try:
            self.on_change(self.name)
        except Exception:  # a consumer's bug must not kill the watch thread
            log.exception("[remote %s] change callback failed", self.name)
