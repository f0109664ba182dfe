"""The store pod's cache of its remotes (Cilium's KVStoreMesh layout): each remote's records mirrored
into this cluster's own etcd, so that local agents read one store instead of every remote's.

For remote ``R`` the cache holds, in the local etcd:

- ``cilium/cluster-config/R``: R's ID and maxConnectedClusters, with the capabilities
  ``syncedCanaries`` and ``cached`` (a reader then looks under ``cilium/cache/``);
- ``cilium/cache/services/v1/R/<ns>/<name>`` and ``cilium/cache/nodes/v1/R/<node>``: R's records;
- ``cilium/synced/R/cilium/cache/services/v1`` and ``.../nodes/v1``: written once R's records are
  all in (stale ones of an earlier run deleted first), removed when they are withdrawn.

The remote is read through a ``RemoteCluster`` (its readiness, liveness probe, relisting and grace
period); the records are written through the operator's ``SyncStore`` (its lease, coalescing and
retries). A remote unreachable past its grace period leaves the cache (records and markers go, so
agents withdraw its backends); when it answers again it is listed again and comes back.
``cache_entries`` and ``cached_config`` are pure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Protocol

from clustermesh import schema
from clustermesh.schema import ClusterConfig, ClusterService, Node

log = logging.getLogger(__name__)

CACHE_SYNCED_PREFIXES = (schema.CACHE_SERVICES_PREFIX, schema.CACHE_NODES_PREFIX)


def _service_key(remote: str, namespace: str, name: str) -> str:
    return f"{schema.CACHE_SERVICES_PREFIX}/{remote}/{namespace}/{name}"


def _node_key(remote: str, name: str) -> str:
    return f"{schema.CACHE_NODES_PREFIX}/{remote}/{name}"


def cache_entries(name: str, services: Iterable[ClusterService], nodes: Iterable[Node]) -> dict[str, str]:
    """The cache's keys and values for remote ``name``'s records. Pure."""
    out: dict[str, str] = {}
    for svc in services:
        out[_service_key(name, svc.namespace, svc.name)] = svc.encode()
    for node in nodes:
        out[_node_key(name, node.name)] = node.encode()
    return out


def cached_config(source: ClusterConfig) -> ClusterConfig:
    """What the cache says about a remote: its own identity, read from here, synced markers kept."""
    return ClusterConfig(cluster_id=source.cluster_id, synced_canaries=True,
                         max_connected_clusters=source.max_connected_clusters, cached=True,
                         service_exports_enabled=source.service_exports_enabled)


def remote_prefixes(name: str) -> tuple[str, str]:
    return f"{schema.CACHE_SERVICES_PREFIX}/{name}/", f"{schema.CACHE_NODES_PREFIX}/{name}/"


class Remote(Protocol):
    """What the cache needs of a RemoteCluster."""

    name: str

    def cluster_config(self) -> ClusterConfig | None: ...

    def service_records(self) -> list[ClusterService]: ...

    def node_records(self) -> list[Node]: ...

    def service_record(self, ref: tuple[str, str]) -> ClusterService | None: ...

    def take_changed(self) -> set[tuple[str, str]]: ...

    def usable(self, now: float | None = None) -> bool: ...

    @property
    def ready(self) -> bool: ...


class Writer(Protocol):
    """What the cache needs of the operator's SyncStore."""

    def set(self, key: str, value: str | None) -> None: ...

    def replace_prefix(self, prefix: str, values: dict[str, str]) -> None: ...

    async def sync_prefixes(self, prefixes: Iterable[str]) -> int: ...


class RemoteCache:
    """One remote's part of the cache. Runs on the operator's event loop only."""

    def __init__(self, remote: Remote, writer: Writer, grace_period: float = 60.0) -> None:
        self.remote = remote
        self.name = remote.name
        self.writer = writer
        self.grace_period = grace_period
        self.synced = False
        self._marking: asyncio.Task[None] | None = None
        self._config: str | None = None
        self._next: Remote | None = None
        self._next_since = 0.0
        # What was handed to the writer, by record object: a refresh re-encodes only what changed
        # (records are immutable; a change is a new object), so a tick over 10,000 services is cheap.
        self._services: dict[tuple[str, str], ClusterService] = {}
        self._nodes: dict[str, Node] = {}
        # The connection _services was last copied from in full: from then on, a change copies
        # only the Services that connection says changed (an event costs the same at 10,000).
        self._copied_from: Remote | None = None

    def replace(self, remote: Remote, now: float | None = None) -> None:
        """A new connection to the same remote (new settings): the copy keeps coming from the old
        one until the new one is ready, or for at most the grace period."""
        if remote is self.remote or remote is self._next:
            return
        if not self.synced:
            self.remote, self._next = remote, None
            return
        self._next = remote
        self._next_since = time.monotonic() if now is None else now

    def refresh(self, now: float | None = None) -> None:
        """Make the cache what the remote says now: its records while it is usable, nothing once
        it is past its grace period, and the synced markers after the first complete copy."""
        now = time.monotonic() if now is None else now
        if self._next is not None and (self._next.ready or now - self._next_since >= self.grace_period):
            self.remote, self._next = self._next, None
        config = self.remote.cluster_config()
        if config is not None:
            value = cached_config(config).encode()
            if value != self._config:
                self._config = value
                self.writer.set(schema.cluster_config_key(self.name), value)
        if self.remote.usable(now):
            self._copy()
            if not self.synced and self._marking is None:
                self._marking = asyncio.get_running_loop().create_task(self._mark_synced(),
                                                                       name=f"cache-synced-{self.name}")
        elif self.synced or self._marking is not None:
            # Not ready any more, or unreachable past its grace period (within it, usable() holds and
            # the copy stays as it was).
            self.withdraw()

    def _copy(self) -> None:
        if self._copied_from is self.remote:
            for ref in self.remote.take_changed():
                svc = self.remote.service_record(ref)
                if svc is None:
                    if self._services.pop(ref, None) is not None:
                        self.writer.set(_service_key(self.name, *ref), None)
                elif self._services.get(ref) is not svc:
                    self._services[ref] = svc
                    self.writer.set(_service_key(self.name, *ref), svc.encode())
        else:
            self.remote.take_changed()  # before the walk: what changes after it comes next time
            services = {(s.namespace, s.name): s for s in self.remote.service_records()}
            for ref, svc in services.items():
                if self._services.get(ref) is not svc:
                    self.writer.set(_service_key(self.name, *ref), svc.encode())
            for ref in self._services.keys() - services.keys():
                self.writer.set(_service_key(self.name, *ref), None)
            self._services, self._copied_from = services, self.remote
        nodes = {n.name: n for n in self.remote.node_records()}  # a few per cluster: walked whole
        for name, node in nodes.items():
            if self._nodes.get(name) is not node:
                self.writer.set(_node_key(self.name, name), node.encode())
        for name in self._nodes.keys() - nodes.keys():
            self.writer.set(_node_key(self.name, name), None)
        self._nodes = nodes

    async def _mark_synced(self) -> None:
        try:
            stale = await self.writer.sync_prefixes(remote_prefixes(self.name))
            if stale:
                log.info("[cache %s] removed %d records an earlier copy left", self.name, stale)
            stamp = schema.rfc3339_now()
            for prefix in CACHE_SYNCED_PREFIXES:
                self.writer.set(schema.synced_key(self.name, prefix), stamp)
            self.synced = True
            log.info("[cache %s] copy complete: local agents may use it", self.name)
        finally:
            self._marking = None

    def withdraw(self) -> None:
        """Take the remote's records and markers out (its agents withdraw its backends)."""
        if self._marking is not None:
            self._marking.cancel()
            self._marking = None
        for prefix in CACHE_SYNCED_PREFIXES:
            self.writer.set(schema.synced_key(self.name, prefix), None)
        for prefix in remote_prefixes(self.name):
            self.writer.replace_prefix(prefix, {})
        self._services, self._nodes, self._copied_from = {}, {}, None
        if self.synced:
            log.warning("[cache %s] withdrawn: the remote is past its grace period or not ready", self.name)
        self.synced = False

    def forget(self) -> None:
        """The remote left the mesh: everything of it leaves the cache, its cluster-config too."""
        self.withdraw()
        self.writer.set(schema.cluster_config_key(self.name), None)
        self._config = None
