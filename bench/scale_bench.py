#!/usr/bin/env python3
"""Scale benchmark: what the agents of one cluster cost the stores, with and without the cache.

A mesh of C clusters (--clusters, default 2,5), each a real etcd on 127.0.0.1 filled as its operator
fills it (--services global Services, one node record per agent, cluster-config, synced markers).
cluster-1 gets A simulated agents (--agents, default 10,50): each is what an agent's store side
is, one ``RemoteCluster`` per remote, reading

- direct: every remote's store;
- cache:  cluster-1's own store, which the cache (``RemoteCache`` over one ``RemoteCluster`` per
          remote and the operator's ``SyncStore``, as one store replica's operator runs it) fills.

For each (mode, C, A) it prints: the watchers each store serves to cluster-1 (etcd's own gauge,
``etcd_debugging_mvcc_watcher_total``; in a symmetric mesh each remote store serves C-1 times that),
the bytes each store sends for one changed Service until every agent has it
(``etcd_network_client_grpc_sent_bytes_total``), the bootstrap of one more agent (start -> every
remote ready with all its Services), and the cache's own data (the writer's keys and values; its
readers hold the remotes' records as every reader does; 0 in direct mode). Agents run in this
process (threads), so a thousand do not fit on a small machine: the watcher and byte figures grow
by the same amount per agent, which the two sizes show.

usage: .venv/bin/python bench/scale_bench.py [--clusters 2,5] [--agents 10,50] [--services 500]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clustermesh import schema  # noqa: E402
from clustermesh.kvstore import KVClient  # noqa: E402
from clustermesh.lab.servers import EtcdServer  # noqa: E402
from clustermesh.schema import ClusterConfig, ClusterService, Node, PortConfig  # noqa: E402
from clustermesh.store.cache import RemoteCache  # noqa: E402
from clustermesh.store.remote import RemoteCluster, RemoteConfig  # noqa: E402
from clustermesh.store.sync import SyncStore, WriterSettings  # noqa: E402


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def service(cluster: str, cid: int, i: int, backend: int = 0) -> ClusterService:
    port = {"http": PortConfig("TCP", 80)}
    return ClusterService(cluster, "bench", f"svc-{i}", cid, frontends={f"10.96.{i // 250}.{i % 250 + 1}": port},
                          backends={f"10.{cid}.{backend % 250}.{i % 250 + 1}": port}, shared=True)


def fill(kv: KVClient, cluster: str, cid: int, services: int, nodes: int) -> None:
    puts = {schema.cluster_config_key(cluster): ClusterConfig(cid).encode()}
    for i in range(services):
        puts[schema.service_key(cluster, "bench", f"svc-{i}")] = service(cluster, cid, i).encode()
    for i in range(nodes):
        puts[schema.node_key(cluster, f"node-{i}")] = Node(f"node-{i}", cluster, cid).encode()
    for prefix in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
        puts[schema.synced_key(cluster, prefix)] = schema.rfc3339_now()
    items = list(puts.items())
    for start in range(0, len(items), 100):  # etcd's default limit of operations per transaction
        kv.apply(dict(items[start:start + 100]), [])


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def wait(check: Callable[[], bool], what: str, timeout: float = 300) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


class Cache:
    """One store replica's cache of cluster-1's remotes, on an event loop of its own."""

    def __init__(self, local_url: str, remotes: list[RemoteConfig]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cache-loop", daemon=True)
        self.thread.start()
        self.kv = KVClient(local_url)
        self.writer = SyncStore(self.kv, "cluster-1", WriterSettings(heartbeat_interval=3600))
        self.remotes = [RemoteCluster(c, on_change=self._changed) for c in remotes]
        self.caches: dict[str, RemoteCache] = {}
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        for rc in self.remotes:
            rc.start()

    async def _start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.writer.run())
        self.caches = {rc.name: RemoteCache(rc, self.writer) for rc in self.remotes}

    def _changed(self, name: str) -> None:
        self.loop.call_soon_threadsafe(lambda: self.caches[name].refresh() if name in self.caches else None)

    def synced(self) -> bool:
        return all(c.synced for c in self.caches.values())

    def held_bytes(self) -> int:
        """What the cache keeps in memory besides the readers' records: the writer's copy of every
        key and value it owns (what it wrote, and what it wants written)."""
        return sum(len(k) + len(v) for k, v in {**self.writer.written, **self.writer.desired}.items())

    def stop(self) -> None:
        for rc in self.remotes:
            rc.stop()

        async def close() -> None:
            self.task.cancel()
            await self.writer.close(revoke=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.kv.close()


def run(clusters: int, agents: int, services: int, mode: str, stores: list[EtcdServer]) -> dict[str, float]:
    names = [f"cluster-{i}" for i in range(1, clusters + 1)]
    remotes = [RemoteConfig(n, i + 1, (stores[i].url,)) for i, n in enumerate(names)][1:]
    base = [metric(s.url, "etcd_debugging_mvcc_watcher_total") for s in stores]
    cache = None
    cache_mem = 0
    if mode == "cache":
        cache = Cache(stores[0].url, remotes)
        wait(cache.synced, "the cache to be synced")
        cache_mem = cache.held_bytes()
        reads = [RemoteConfig(r.name, r.id, (stores[0].url,)) for r in remotes]
    else:
        reads = remotes
    fleet: list[list[RemoteCluster]] = []
    try:
        for _ in range(agents):
            fleet.append([RemoteCluster(c).start() for c in reads])
        wait(lambda: all(rc.ready and len(rc.services) == services for agent in fleet for rc in agent),
             f"{agents} agents to be ready")
        watchers = [metric(s.url, "etcd_debugging_mvcc_watcher_total") - b for s, b in zip(stores, base, strict=True)]
        # One Service of cluster-2 changes: the bytes every store sends until every agent has it.
        sent = [metric(s.url, "etcd_network_client_grpc_sent_bytes_total") for s in stores]
        with KVClient(stores[1].url) as kv:
            kv.put(schema.service_key("cluster-2", "bench", "svc-0"), service("cluster-2", 2, 0, backend=7).encode())
        wanted = next(iter(service("cluster-2", 2, 0, backend=7).backends))
        wait(lambda: all(wanted in (rc.service_record(("bench", "svc-0")) or service("x", 2, 0)).backends
                         for agent in fleet for rc in agent if rc.name == "cluster-2"), "the change everywhere")
        time.sleep(0.5)  # the last stream writes flushed into the counter
        per_change = [metric(s.url, "etcd_network_client_grpc_sent_bytes_total") - b
                      for s, b in zip(stores, sent, strict=True)]
        # One more agent joins.
        start = time.monotonic()
        newcomer = [RemoteCluster(c).start() for c in reads]
        wait(lambda: all(rc.ready and len(rc.services) == services for rc in newcomer), "a new agent")
        bootstrap = time.monotonic() - start
        fleet.append(newcomer)
        with KVClient(stores[1].url) as kv:  # back as it was for the next run
            kv.put(schema.service_key("cluster-2", "bench", "svc-0"), service("cluster-2", 2, 0).encode())
    finally:
        for agent in fleet:
            for rc in agent:
                rc.stop()
        if cache is not None:
            cache.stop()
    return {"local_watchers": watchers[0], "remote_watchers": max(watchers[1:]),
            "local_bytes": per_change[0], "remote_bytes": max(per_change[1:]),
            "bootstrap": bootstrap, "cache_mem": cache_mem}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", default="2,5")
    parser.add_argument("--agents", default="10,50")
    parser.add_argument("--services", type=int, default=500)
    args = parser.parse_args()
    # SIGTERM (timeout, kill) ends through the finally blocks: no etcd left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"{args.services} global Services and one node per agent in each cluster; cluster-1's agents only "
          "(in a symmetric mesh each remote store serves C-1 times the remote figures)\n")
    print("| mode | clusters | agents in cluster-1 | watchers on each remote store | watchers on cluster-1's store "
          "| bytes a remote store sends per change | bytes cluster-1's store sends per change "
          "| new agent bootstrap | cache's own data |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    with tempfile.TemporaryDirectory(prefix="clustermesh-scale-") as tmp:
        for clusters in (int(x) for x in args.clusters.split(",")):
            stores = [EtcdServer(Path(tmp) / f"c{clusters}-{i}", name=f"store-{i}").start()
                      for i in range(1, clusters + 1)]
            try:
                for i, store in enumerate(stores, start=1):
                    with KVClient(store.url) as kv:
                        fill(kv, f"cluster-{i}", i, args.services, max(int(x) for x in args.agents.split(",")))
                for mode in ("direct", "cache"):
                    for agents in (int(x) for x in args.agents.split(",")):
                        say(f"{mode}: {clusters} clusters, {agents} agents in cluster-1, {args.services} services each")
                        r = run(clusters, agents, args.services, mode, stores)
                        print(f"| {mode} | {clusters} | {agents} | {r['remote_watchers']:.0f} "
                              f"| {r['local_watchers']:.0f} | {r['remote_bytes'] / 1024:.1f} KiB "
                              f"| {r['local_bytes'] / 1024:.1f} KiB | {r['bootstrap'] * 1000:.0f} ms "
                              f"| {r['cache_mem'] / 2**20:.1f} MiB |", flush=True)
            finally:
                for store in stores:
                    store.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
