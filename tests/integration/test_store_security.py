"""The store as remote clusters see it: TLS everywhere, and a grpc-proxy whose etcd
identity may only read cilium/ keys, so a remote reader cannot write or look elsewhere."""

from __future__ import annotations

import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from clustermesh import schema
from clustermesh.kvstore import Endpoint, KVClient, KVStoreError
from clustermesh.lab.pki import CertificateAuthority
from clustermesh.lab.servers import EtcdGrpcProxy, EtcdServer, ServerError
from clustermesh.store.remote import RemoteCluster
from clustermesh.store.remote_config import RemoteConfig
from tests.integration.test_liveness import ID, NAME, export
from tests.prereq import require_binary
from tests.waiting import eventually


@pytest.fixture
def secure_store(tmp_path: Path) -> Iterator[tuple[EtcdServer, EtcdGrpcProxy, CertificateAuthority]]:
    require_binary("etcd")
    require_binary("etcdctl", "run scripts/setup.sh (Debian package etcd-client)")
    pki = CertificateAuthority(tmp_path / "pki")
    store = EtcdServer(tmp_path / "store", name="store", pki=pki).start()
    proxy = None
    try:
        store.enable_auth({"cluster-2": (PASSWORD, ["cilium/"])})
        proxy = EtcdGrpcProxy(tmp_path / "store", store.url, namespace="", pki=pki,
                              backend_cert=pki.issue("proxy-backend", "", server=False)).start()
        yield store, proxy, pki
    finally:
        if proxy is not None:
            proxy.stop()
        store.stop()


PASSWORD = "s3cret-for-tests"


def client(url: str, pki: CertificateAuthority, user: str, password: str = PASSWORD) -> KVClient:
    pair = pki.issue(f"client-{user}", "", server=False)
    endpoint = Endpoint.parse(url, str(pki.cert_path), str(pair.cert), str(pair.key))
    return KVClient(endpoint, timeout=5, user=user, password=password)


def test_remote_reads_through_the_proxy_but_cannot_write(secure_store) -> None:
    store, proxy, pki = secure_store
    assert store.admin is not None
    key = schema.service_key("c1", "ns", "svc")
    with KVClient(Endpoint.parse(store.url, str(pki.cert_path), str(store.admin.cert), str(store.admin.key))) as w:
        lease = w.grant_lease(10)  # leases go to etcd itself, never through the proxy
        w.put(key, '{"x":1}', lease=lease)
        w.put("private/secret", "no")
    with client(proxy.url, pki, "cluster-2") as remote:
        assert remote.get(key) == '{"x":1}'
        assert set(remote.list_prefix("cilium/").items) == {key}
        with pytest.raises(KVStoreError, match=r"(?i)permission"):
            remote.put(key, "tampered")
        with pytest.raises(KVStoreError, match=r"(?i)permission"):
            remote.get("private/secret")


def tls_answer(url: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> str:
    """What the server says to a TLS client with this certificate (or none): "ok" when it answers
    an HTTP/2 preface with data, else the TLS error. A refusal for the certificate is a TLS alert
    ("certificate required", "bad certificate", "unknown ca"), which an unreachable or plain server
    cannot send."""
    parsed = urlparse(url)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection((parsed.hostname, parsed.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=parsed.hostname) as tls:
        try:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
            return "ok" if tls.recv(64) else "closed"
        except ssl.SSLError as exc:
            return str(exc)


def test_without_a_client_certificate_etcd_serves_nothing(secure_store) -> None:
    store, _proxy, pki = secure_store
    trusted = store.client_cert("root")
    assert tls_answer(store.url, pki.cert_path, trusted.cert, trusted.key) == "ok"  # the server is there
    refusal = tls_answer(store.url, pki.cert_path)
    assert "CERTIFICATE_REQUIRED" in refusal or "BAD_CERTIFICATE" in refusal, refusal
    with KVClient(Endpoint.parse(store.url, str(pki.cert_path)), timeout=3) as anonymous, \
            pytest.raises(KVStoreError):
        anonymous.get("cilium/.heartbeat")


def test_a_wrong_password_is_refused(secure_store) -> None:
    _store, proxy, pki = secure_store
    with client(proxy.url, pki, "cluster-2", password="wrong") as c, \
            pytest.raises(KVStoreError, match="authentication failed, invalid user ID or password"):
        c.get("cilium/.heartbeat")  # the login happens on first use


def test_a_certificate_from_another_ca_is_refused(secure_store, tmp_path: Path) -> None:
    store, _proxy, pki = secure_store
    other = CertificateAuthority(tmp_path / "other-pki")
    pair = other.issue("intruder", "root", server=False)
    trusted = store.client_cert("root")
    assert tls_answer(store.url, pki.cert_path, trusted.cert, trusted.key) == "ok"  # the server is there
    refusal = tls_answer(store.url, pki.cert_path, pair.cert, pair.key)
    assert "UNKNOWN_CA" in refusal or "BAD_CERTIFICATE" in refusal, refusal
    endpoint = Endpoint.parse(store.url, str(pki.cert_path), str(pair.cert), str(pair.key))
    with KVClient(endpoint, timeout=3) as c, pytest.raises(KVStoreError):
        c.get("cilium/.heartbeat")


def test_plain_store_has_no_client_certificates(tmp_path: Path) -> None:
    require_binary("etcd")
    with pytest.raises(ServerError):
        EtcdServer(tmp_path / "plain").client_cert("x")


def test_a_reader_logs_in_again_to_a_replaced_store(secure_store) -> None:
    """A store pod replaced behind the same address: the reader's login token names a raft
    index the new etcd has not reached, so etcd 3.4 holds every request until its deadline
    instead of refusing the token. The reader must log in again anyway, list the new store,
    and keep nothing of the old one."""
    store, proxy, pki = secure_store
    assert store.admin is not None
    admin_endpoint = Endpoint.parse(store.url, str(pki.cert_path), str(store.admin.cert), str(store.admin.key))
    with KVClient(admin_endpoint) as admin:
        export(admin, "", services=("echo", "old"))
        for i in range(300):  # the old store's raft index, and so the reader's token, far ahead
            admin.put("private/pad", str(i))
    pair = pki.issue("client-cluster-2", "", server=False)
    config = RemoteConfig(NAME, ID, (proxy.url,), str(pki.cert_path), str(pair.cert), str(pair.key),
                          "cluster-2", PASSWORD)
    rc = RemoteCluster(config, probe_interval=0.5).start()
    try:
        eventually(lambda: _eq((rc.ready, set(rc.services)), (True, {("ns", "echo"), ("ns", "old")})))
        sessions = rc.client.sessions
        store.stop()
        shutil.rmtree(store.directory / "data")
        store.start()
        store.enable_auth({"cluster-2": (PASSWORD, ["cilium/"])})
        with KVClient(admin_endpoint) as admin:
            export(admin, "", services=("echo", "new"))
        eventually(lambda: _eq(set(rc.services), {("ns", "echo"), ("ns", "new")}), timeout=15)
        assert rc.client.sessions > sessions, "read the new store without logging in again?"
        assert rc.usable()
    finally:
        rc.stop()


def _eq(got: object, want: object) -> None:
    assert got == want, got
