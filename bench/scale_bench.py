#!/usr/bin/env python3
"""Scale benchmark: what the agents of one cluster cost the stores, with and without the cache.

A mesh of C clusters (--clusters, default 2,5), each a real etcd on 127.0.0.1 filled as its operator
fills it (--services global Services, cluster-config, synced markers, nodes). cluster-1 gets A
simulated agents (--agents, default 10,100,1000). A simulated agent is what an agent's store side
asks of etcd, on the wire: per remote it reads from, one watch stream that lists and then watches the
remote's five prefixes (synced markers, cluster-config, heartbeat, services, nodes), as
``RemoteCluster`` does, and counts what arrives. Many of them share one process and one event loop
(grpc.aio; a channel per 100 agents and store: etcd still sees a stream per agent and remote). They read

- direct: every remote's store;
- cache:  cluster-1's own store, which the cache (``RemoteCache`` over one ``RemoteCluster`` per
          remote and the operator's ``SyncStore``, as one store replica's operator runs it) fills.

For each (mode, C, A) it prints, from etcd's own gauges and counters: the watch streams and watchers
each store serves to cluster-1 (``etcd_debugging_mvcc_watch_stream_total``, ``..._watcher_total``; in a
symmetric mesh each remote store serves C-1 times that), the bytes each store sends for one changed
Service until every agent has it (``etcd_network_client_grpc_sent_bytes_total``), the bootstrap of one
more agent (the real code: one ``RemoteCluster`` per remote, start -> every remote ready with all its
Services), and the cache's memory (it runs in a process of its own: that process's RSS growth from
before the cache started until it is synced, and the writer's own keys and values; 0 in direct mode).

usage: .venv/bin/python bench/scale_bench.py [--clusters 2,5] [--agents 10,100,1000] [--services 500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc  # noqa: E402

from clustermesh import schema  # noqa: E402
from clustermesh.kvstore import KVClient  # noqa: E402
from clustermesh.lab.servers import EtcdServer  # noqa: E402
from clustermesh.schema import ClusterConfig, ClusterService, Node, PortConfig  # noqa: E402
from clustermesh.store.cache import RemoteCache  # noqa: E402
from clustermesh.store.remote import RemoteCluster  # noqa: E402
from clustermesh.store.remote_config import RemoteConfig  # noqa: E402
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


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix"."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class LightFleet:
    """Simulated agents on an event loop of their own: per agent and remote, one Watch stream that
    first lists, then watches, the remote's five prefixes from the listing's revision."""

    PER_CHANNEL = 100

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet-loop", daemon=True)
        self.thread.start()
        self.channels: dict[tuple[str, int], grpc.aio.Channel] = {}
        self.streams: list[Any] = []
        self.agents = 0
        self.watches = 0  # watches asked for
        self.created = 0  # watches etcd confirmed
        self.seen: dict[tuple[int, str], int] = {}  # (agent, key) -> last mod revision seen of watched keys

    def _channel(self, url: str, agent: int) -> grpc.aio.Channel:
        slot = (url, agent // self.PER_CHANNEL)
        if slot not in self.channels:
            self.channels[slot] = grpc.aio.insecure_channel(url.removeprefix("http://"))
        return self.channels[slot]

    def add(self, count: int, reads: list[tuple[str, str, tuple[str, str]]]) -> None:
        """``count`` more agents; ``reads``: (store url, remote cluster name, (services, nodes) prefixes)."""
        first, self.agents = self.agents, self.agents + count
        futures = [asyncio.run_coroutine_threadsafe(self._agent(a, reads), self.loop)
                   for a in range(first, first + count)]
        for f in futures:
            f.result(600)
        wait(lambda: self.created == self.watches, "every watch created")

    async def _agent(self, agent: int, reads: list[tuple[str, str, tuple[str, str]]]) -> None:
        for url, name, (services, nodes) in reads:
            channel = self._channel(url, agent)
            kv = rpc_pb2_grpc.KVStub(channel)
            watch = rpc_pb2_grpc.WatchStub(channel)
            prefixes = [(f"{schema.SYNCED_PREFIX}/{name}/", True), (schema.cluster_config_key(name), False),
                        (schema.HEARTBEAT_KEY, False), (f"{services}/{name}/", True), (f"{nodes}/{name}/", True)]
            requests: asyncio.Queue[Any] = asyncio.Queue()
            for prefix, ranged in prefixes:
                key = prefix.encode()
                end = prefix_end(key) if ranged else b""
                listing = await kv.Range(rpc_pb2.RangeRequest(key=key, range_end=end))
                self.watches += 1
                await requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                    key=key, range_end=end, start_revision=listing.header.revision + 1)))

            async def outgoing(q: asyncio.Queue[Any] = requests) -> Any:
                while True:
                    yield await q.get()

            call = watch.Watch(outgoing())
            self.streams.append(call)
            self.loop.create_task(self._drain(agent, call))

    async def _drain(self, agent: int, call: Any) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            async for response in call:
                self.created += response.created
                for event in response.events:
                    self.seen[(agent, event.kv.key.decode())] = event.kv.mod_revision

    def all_saw(self, key: str, revision: int) -> bool:
        return all(self.seen.get((a, key), 0) >= revision for a in range(self.agents))

    def stop(self) -> None:
        async def close() -> None:
            for call in self.streams:
                call.cancel()
            for channel in self.channels.values():
                await channel.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


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


def start_cache(local_url: str, remotes: list[RemoteConfig]) -> tuple[subprocess.Popen[str], int, int]:
    """The cache in a process of its own, so that its memory is its own: (process, RSS growth from
    before the cache started to synced, the writer's own keys and values)."""
    spec = json.dumps({"local": local_url, "remotes": [[r.name, r.id, r.endpoints[0]] for r in remotes]})
    proc = subprocess.Popen([sys.executable, __file__, "--cache-child", spec], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "synced":
        raise SystemExit(f"the cache process did not sync: {line}")
    return proc, int(line[1]), int(line[2])


def cache_child(spec_text: str) -> int:
    spec = json.loads(spec_text)
    before = rss()
    cache = Cache(spec["local"], [RemoteConfig(n, i, (url,)) for n, i, url in spec["remotes"]])
    wait(cache.synced, "the cache to be synced")
    print(f"synced {rss() - before} {cache.held_bytes()}", flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    cache.stop()
    return 0


def run(clusters: int, agents: int, services: int, mode: str, stores: list[EtcdServer]) -> dict[str, float]:
    names = [f"cluster-{i}" for i in range(1, clusters + 1)]
    remotes = [RemoteConfig(n, i + 1, (stores[i].url,)) for i, n in enumerate(names)][1:]
    gauges = ("etcd_debugging_mvcc_watch_stream_total", "etcd_debugging_mvcc_watcher_total")
    base = {g: [metric(s.url, g) for s in stores] for g in gauges}
    cache = None
    cache_rss = cache_data = 0
    if mode == "cache":
        cache, cache_rss, cache_data = start_cache(stores[0].url, remotes)
        reads = [RemoteConfig(r.name, r.id, (stores[0].url,)) for r in remotes]
    else:
        reads = remotes
    layout = schema.record_prefixes(mode == "cache")
    fleet = LightFleet()
    newcomer: list[RemoteCluster] = []
    try:
        fleet.add(agents, [(r.endpoints[0], r.name, layout) for r in reads])
        now = {g: [metric(s.url, g) - b for s, b in zip(stores, base[g], strict=True)] for g in gauges}
        streams, watchers = now[gauges[0]], now[gauges[1]]
        # One Service of cluster-2 changes: the bytes every store sends until every agent has it.
        sent = [metric(s.url, "etcd_network_client_grpc_sent_bytes_total") for s in stores]
        key = schema.service_key("cluster-2", "bench", "svc-0")
        with KVClient(stores[1].url) as kv:
            kv.put(key, service("cluster-2", 2, 0, backend=7).encode())
        with KVClient(stores[0].url if mode == "cache" else stores[1].url) as kv:
            read_key = schema.state_to_cache(key) if mode == "cache" else key
            wait(lambda: kv.get(read_key) == service("cluster-2", 2, 0, backend=7).encode(), "the cache's copy")
            revision = kv.revision()
        wait(lambda: fleet.all_saw(read_key, revision), "the change at every agent")
        time.sleep(0.5)  # the last stream writes flushed into the counter
        per_change = [metric(s.url, "etcd_network_client_grpc_sent_bytes_total") - b
                      for s, b in zip(stores, sent, strict=True)]
        # One more agent joins: the real code.
        start = time.monotonic()
        newcomer = [RemoteCluster(c).start() for c in reads]
        wait(lambda: all(rc.ready and len(rc.services) == services for rc in newcomer), "a new agent")
        bootstrap = time.monotonic() - start
        with KVClient(stores[1].url) as kv:  # back as it was for the next run
            kv.put(key, service("cluster-2", 2, 0).encode())
    finally:
        for rc in newcomer:
            rc.stop()
        fleet.stop()
        if cache is not None:
            cache.stdin.close()  # type: ignore[union-attr]
            cache.wait(60)
    return {"local_streams": streams[0], "remote_streams": max(streams[1:]),
            "local_watchers": watchers[0], "remote_watchers": max(watchers[1:]),
            "local_bytes": per_change[0], "remote_bytes": max(per_change[1:]),
            "bootstrap": bootstrap, "cache_rss": cache_rss, "cache_data": cache_data}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", default="2,5")
    parser.add_argument("--agents", default="10,100,1000")
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--cache-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cache_child:
        return cache_child(args.cache_child)
    # SIGTERM (timeout, kill) ends through the finally blocks: no etcd left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"{args.services} global Services in each cluster; cluster-1's agents only "
          "(in a symmetric mesh each remote store serves C-1 times the remote figures)\n")
    print("| mode | clusters | agents in cluster-1 | streams / watchers on each remote store "
          "| streams / watchers on cluster-1's store | bytes a remote store sends per change "
          "| bytes cluster-1's store sends per change | new agent bootstrap | cache's memory (RSS / own data) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    with tempfile.TemporaryDirectory(prefix="clustermesh-scale-") as tmp:
        for clusters in (int(x) for x in args.clusters.split(",")):
            stores = [EtcdServer(Path(tmp) / f"c{clusters}-{i}", name=f"store-{i}").start()
                      for i in range(1, clusters + 1)]
            try:
                for i, store in enumerate(stores, start=1):
                    with KVClient(store.url) as kv:
                        fill(kv, f"cluster-{i}", i, args.services, 10)
                for mode in ("direct", "cache"):
                    for agents in (int(x) for x in args.agents.split(",")):
                        say(f"{mode}: {clusters} clusters, {agents} agents in cluster-1, {args.services} services each")
                        r = run(clusters, agents, args.services, mode, stores)
                        print(f"| {mode} | {clusters} | {agents} "
                              f"| {r['remote_streams']:.0f} / {r['remote_watchers']:.0f} "
                              f"| {r['local_streams']:.0f} / {r['local_watchers']:.0f} "
                              f"| {r['remote_bytes'] / 1024:.1f} KiB | {r['local_bytes'] / 1024:.1f} KiB "
                              f"| {r['bootstrap'] * 1000:.0f} ms "
                              f"| {r['cache_rss'] / 2**20:.0f} / {r['cache_data'] / 2**20:.1f} MiB |", flush=True)
            finally:
                for store in stores:
                    store.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
