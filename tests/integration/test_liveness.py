"""Liveness of a remote: its store frozen or dead is noticed within seconds and its backends
leave after the grace period; its writer paused longer than the old 15 s lease changes nothing;
a store replaced behind a running proxy is listed again. Real etcd, real grpc-proxy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clustermesh import schema
from clustermesh.kvstore import KVClient
from clustermesh.lab.servers import EtcdServer
from clustermesh.schema import ClusterConfig, ClusterService, Node, NodeAddress, PortConfig
from clustermesh.store.remote import RemoteCluster
from clustermesh.store.remote_config import RemoteConfig
from tests.waiting import eventually

NAME, ID = "cluster-2", 2
REPO = Path(__file__).resolve().parents[2]


def export(kv: KVClient, prefix: str, services: tuple[str, ...] = ("echo",), cluster_id: int = ID) -> None:
    kv.put(prefix + schema.cluster_config_key(NAME), ClusterConfig(cluster_id).encode())
    for name in services:
        svc = ClusterService(NAME, "ns", name, cluster_id, frontends={"10.97.0.1": {"http": PortConfig("TCP", 80)}},
                             backends={"10.245.0.1": {"http": PortConfig("TCP", 8080)}})
        kv.put(prefix + svc.key, svc.encode())
    node = Node("n1", NAME, cluster_id, (NodeAddress("InternalIP", "192.168.2.1"),), "10.245.0.0/24")
    kv.put(prefix + node.key, node.encode())
    for p in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
        kv.put(prefix + schema.synced_key(NAME, p), schema.rfc3339_now())


@pytest.fixture
def remotes() -> Iterator[list[RemoteCluster]]:
    made: list[RemoteCluster] = []
    yield made
    for rc in made:
        rc.stop()


def _eq(a: object, b: object) -> None:
    assert a == b


def usable_remote(kv: KVClient, etcd_server: Any, etcd_proxy_factory: Any, remotes: list[RemoteCluster],
                  grace_period: float) -> tuple[Any, RemoteCluster]:
    """cluster-2's export behind its own grpc-proxy, and a RemoteCluster reading it, in use."""
    export(kv, "c2/")
    proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
    rc = RemoteCluster(RemoteConfig(NAME, ID, (proxy.url,)), grace_period=grace_period)
    remotes.append(rc.start())
    eventually(lambda: _eq(rc.usable(), True))
    return proxy, rc


def test_a_frozen_proxy_is_noticed_within_10s_and_withdrawn_after_the_grace_period(
    kv: KVClient, etcd_server, etcd_proxy_factory, remotes: list[RemoteCluster]
) -> None:
    proxy, rc = usable_remote(kv, etcd_server, etcd_proxy_factory, remotes, grace_period=3.0)
    pid = proxy.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # TCP stays up, nothing answers
    frozen = time.monotonic()
    try:
        eventually(lambda: _eq(rc.connected, False), timeout=10)
        noticed = time.monotonic() - frozen
        # A watch may see the break first; the probe thread starts the unreachable period at its next turn.
        eventually(lambda: _eq(rc.unreachable_since is not None, True), timeout=10)
        since = rc.unreachable_since
        assert since is not None and since - frozen < 10
        assert "unreachableSince" in rc.status() and rc.status()["connected"] is False
        assert rc.usable(), "within the grace period the cached backends still serve"
        eventually(lambda: _eq(rc.usable(), False), timeout=10)
        withdrawn = time.monotonic() - frozen
        assert withdrawn >= since - frozen + 3.0 - 0.1, "the grace period counts from when it went unreachable"
        assert set(rc.services) == {("ns", "echo")}, "withdrawn from use, not forgotten"
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = time.monotonic()
    eventually(lambda: _eq((rc.connected, rc.usable()), (True, True)), timeout=20)
    assert "unreachableSince" not in rc.status()
    print(f"frozen proxy: noticed after {noticed:.1f}s, withdrawn after {withdrawn:.1f}s (grace 3s), "
          f"usable again {time.monotonic() - resumed:.1f}s after SIGCONT")


def test_a_dead_proxy_is_noticed_within_10s(
    kv: KVClient, etcd_server, etcd_proxy_factory, remotes: list[RemoteCluster]
) -> None:
    proxy, rc = usable_remote(kv, etcd_server, etcd_proxy_factory, remotes, grace_period=60.0)
    proxy.process.kill()
    dead = time.monotonic()
    eventually(lambda: _eq(rc.connected, False), timeout=10)
    print(f"dead proxy: noticed after {time.monotonic() - dead:.1f}s")
    assert rc.usable(), "grace period of 60s: still serving"


WRITER = """
import asyncio, sys
from clustermesh import schema
from clustermesh.kvstore import KVClient
from clustermesh.store.sync import SyncStore, WriterSettings

async def main() -> None:
    writer = SyncStore(KVClient(sys.argv[1], prefix="c2/"), "cluster-2", WriterSettings(heartbeat_interval=1.0))
    writer.set(schema.cluster_config_key("cluster-2"), schema.ClusterConfig(2).encode())
    svc = schema.ClusterService("cluster-2", "ns", "echo", 2,
                                backends={"10.245.0.1": {"http": schema.PortConfig("TCP", 8080)}})
    writer.set(svc.key, svc.encode())
    task = asyncio.create_task(writer.run())
    await writer.initial_sync([schema.services_cluster_prefix("cluster-2")], [schema.SERVICES_PREFIX,
                                                                               schema.NODES_PREFIX])
    print("synced", flush=True)
    await task

asyncio.run(main())
"""


def test_a_writer_paused_longer_than_the_old_15s_lease_withdraws_nothing(
    kv: KVClient, etcd_server, etcd_proxy_factory, remotes: list[RemoteCluster], tmp_path: Path
) -> None:
    """The writer runs with the default settings (the lease is the point); SIGSTOP is what a
    long GC pause, a frozen node or a stuck operator pod looks like from outside."""
    proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, etcd_server.url], stdout=subprocess.PIPE,
                              stderr=(tmp_path / "writer.log").open("wb"), cwd=REPO)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"synced"
        # A short heartbeat timeout: a stale heartbeat must not withdraw anything either.
        rc = RemoteCluster(RemoteConfig(NAME, ID, (proxy.url,)), grace_period=1.0, heartbeat_timeout=3.0)
        remotes.append(rc.start())
        eventually(lambda: _eq(rc.usable(), True))
        key = schema.service_key(NAME, "ns", "echo")
        os.kill(writer.pid, signal.SIGSTOP)
        paused = time.monotonic()
        try:
            while time.monotonic() - paused < 17:  # longer than the old 15 s lease
                assert kv.get("c2/" + key) is not None, f"record gone {time.monotonic() - paused:.1f}s into the pause"
                assert rc.usable(), f"withdrawn {time.monotonic() - paused:.1f}s into the writer's pause"
                time.sleep(0.2)
            assert rc.heartbeat_relists >= 1, "the stale heartbeat was noticed (and only listed again)"
        finally:
            os.kill(writer.pid, signal.SIGCONT)
        assert set(rc.services) == {("ns", "echo")}
    finally:
        writer.kill()
        writer.wait(10)


def test_a_store_replaced_behind_a_running_proxy_is_listed_again(
    etcd_server: EtcdServer, etcd_proxy_factory, remotes: list[RemoteCluster]
) -> None:
    with KVClient(etcd_server.url) as kv:
        export(kv, "c2/", services=("echo", "old-1", "old-2", "old-3"))
    proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
    rc = RemoteCluster(RemoteConfig(NAME, ID, (proxy.url,)), probe_interval=0.5)
    remotes.append(rc.start())
    eventually(lambda: _eq((rc.ready, len(rc.services)), (True, 4)))
    # The store is wiped and restarted on the same port; the proxy keeps running and its
    # watches wait for revisions the new store has not reached: a frozen view.
    etcd_server.stop()
    shutil.rmtree(etcd_server.directory / "data")
    etcd_server.start()
    with KVClient(etcd_server.url) as kv:
        export(kv, "c2/", services=("echo", "new"))
        # Listed again and usable (every prefix relisted: the services' listing may end first).
        eventually(lambda: _eq((set(rc.services), rc.usable()), ({("ns", "echo"), ("ns", "new")}, True)),
                   timeout=15)
        # The watches work again on the new store.
        extra = ClusterService(NAME, "ns", "later", ID)
        kv.put("c2/" + extra.key, extra.encode())
        eventually(lambda: _eq(("ns", "later") in rc.services, True), timeout=10)


def test_a_cluster_id_change_lists_the_remote_again(
    kv: KVClient, etcd_server, etcd_proxy_factory, remotes: list[RemoteCluster]
) -> None:
    export(kv, "c2/")
    proxy = etcd_proxy_factory(etcd_server.url, namespace="c2/")
    rc = RemoteCluster(RemoteConfig(NAME, ID, (proxy.url,)))
    remotes.append(rc.start())
    eventually(lambda: _eq(rc.usable(), True))
    listings = [s.listings for s in rc._stores]
    kv.put("c2/" + schema.cluster_config_key(NAME), ClusterConfig(9).encode())
    eventually(lambda: _eq(rc.ready, False))
    # Every prefix but the config's own is listed again.
    eventually(lambda: _eq([s.listings > n for s, n in zip(rc._stores, listings, strict=True)],
                           [True, True, True, False, True]))
