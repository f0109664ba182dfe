"""Fixtures that start real servers: etcd, etcd grpc-proxy, a Kubernetes control plane.

Servers listen on free ports on 127.0.0.1, keep their files in pytest's temp
folders and are stopped after use. Under CI=true a missing binary fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prereq import require


def _servers():  # imported late: unit tests must not need cryptography or etcd3 at collection
    from clustermesh.lab import servers

    return servers


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator:
    servers = _servers()
    try:
        servers.find_etcd()
    except servers.ServerError as exc:
        require(False, "etcd", str(exc))
    server = servers.EtcdServer(tmp_path / "etcd").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kv(etcd_server) -> Iterator:
    from clustermesh.kvstore import KVClient

    client = KVClient(etcd_server.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def etcd_proxy_factory(tmp_path: Path) -> Iterator:
    """Start ``etcd grpc-proxy --namespace=NS`` in front of an etcd URL."""
    servers = _servers()
    started = []

    def start(backend_url: str, namespace: str):
        proxy = servers.EtcdGrpcProxy(tmp_path / f"proxy-{len(started)}", backend_url, namespace)
        started.append(proxy)
        return proxy.start()

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One kube-apiserver (+ its etcd and a controller-manager) for the whole session."""
    servers = _servers()
    for name in ("kube-apiserver", "kube-controller-manager"):
        try:
            servers.find_binary(name)
        except servers.ServerError as exc:
            require(False, name, str(exc))
    directory = tmp_path_factory.mktemp("control-plane")
    cp = servers.ControlPlane(directory, name="test")
    try:
        cp.start()
    except servers.ServerError:
        cp.stop()
        raise
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane) -> str:
    return str(control_plane.kubeconfig)


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Clients must reach 127.0.0.1 directly, never through a configured proxy.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "GRPC_PROXY", "grpc_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
