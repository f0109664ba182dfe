"""`clustermesh certs`: what it refuses, the names it certifies, and Secrets in the format the store
pod (deploy/base/store.sh) and the agents (agent/remote.py) read. Real certificates in a temp folder;
tests/integration/test_deploy.py runs them in etcd and grpc-proxy."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clustermesh.certs import (
    CertsConfig,
    CertsError,
    make_secrets,
    next_steps,
    proxy_sans,
    validate,
    write_yaml,
)
from clustermesh.cli import main
from clustermesh.store.remote_config import remote_config_from_spec


@pytest.mark.parametrize(("config", "message"), [
    (CertsConfig("Cluster_1"), "--cluster"),
    (CertsConfig("c1", leaf_lifetime=dt.timedelta(days=2000)), "never outlives"),
    (CertsConfig("c1", renew_before=dt.timedelta(days=400)), "every run"),
    (CertsConfig("c1", readers=("Bad_Name",)), "lowercase"),
    (CertsConfig("c1", readers=("root",)), "writer"),
    (CertsConfig("c1", readers=("a", "a")), "twice"),
    (CertsConfig("c1", ips=("store.example",)), "--dns"),
    (CertsConfig("c1", dns=("10.0.0.1/24",)), "--ip"),
])
def test_refuses_what_would_make_unusable_certificates(config: CertsConfig, message: str) -> None:
    with pytest.raises(CertsError, match=message):
        validate(config)


def test_valid_config_passes() -> None:
    validate(CertsConfig("cluster-1", readers=("remote", "cluster-2"), ips=("172.18.0.2", "fd00::1"),
                         dns=("store.example.com", "*.lb.example")))


def test_proxy_names_are_the_service_dns_names_and_the_extras() -> None:
    ips, dns = proxy_sans(CertsConfig("c1", ips=("172.18.0.2",), dns=("store.example",)))
    assert ips == ("127.0.0.1", "172.18.0.2")
    assert dns == ("clustermesh-store", "clustermesh-store.clustermesh-system",
                   "clustermesh-store.clustermesh-system.svc", "clustermesh-store.clustermesh-system.svc.cluster.local",
                   "localhost", "store.example")
    _, other = proxy_sans(CertsConfig("c1", namespace="mesh", cluster_domain="corp.local"))
    assert "clustermesh-store.mesh.svc.corp.local" in other


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _cn(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _secrets(tmp_path: Path, **kw: object) -> dict[str, dict[str, bytes]]:
    config = CertsConfig("cluster-1", **kw)  # type: ignore[arg-type]
    return {d.name: d.data for d in make_secrets(config, tmp_path / "pki")}


def test_secrets_have_the_keys_the_store_pod_and_the_agents_read(tmp_path: Path) -> None:
    secrets = _secrets(tmp_path, readers=("remote", "cluster-2"))
    assert set(secrets) == {"clustermesh-store-tls", "clustermesh-store-users", "clustermesh-access-remote",
                            "clustermesh-access-cluster-2", "clustermesh-access-local-agents"}
    assert set(secrets["clustermesh-store-tls"]) == {
        "ca.crt", "crl.pem", "etcd.crt", "etcd.key", "root.crt", "root.key", "proxy.crt", "proxy.key",
        "proxy-backend.crt", "proxy-backend.key"}
    users = secrets["clustermesh-store-users"]
    assert set(users) == {"remote", "cluster-2", "local-agents"}  # local-agents: the agents, with the cache
    for reader in ("remote", "cluster-2"):
        access = secrets[f"clustermesh-access-{reader}"]
        assert set(access) == {"ca.crt", "tls.crt", "tls.key", "username", "password"}
        assert access["username"] == reader.encode()
        assert access["password"] == users[reader] and len(access["password"]) >= 24
        assert b":" not in access["password"]  # etcdctl's user:password form
    assert users["remote"] != users["cluster-2"]


def test_every_certificate_is_signed_by_the_cluster_ca_for_its_role(tmp_path: Path) -> None:
    secrets = _secrets(tmp_path, ips=("172.18.0.2",), readers=("cluster-2",))
    tls = secrets["clustermesh-store-tls"]
    ca = _cert(tls["ca.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "cluster-1" in _cn(ca)[0]
    for name in ("etcd", "root", "proxy", "proxy-backend"):
        _cert(tls[f"{name}.crt"]).verify_directly_issued_by(ca)
    access = secrets["clustermesh-access-cluster-2"]
    _cert(access["tls.crt"]).verify_directly_issued_by(ca)
    assert access["ca.crt"] == tls["ca.crt"]

    assert _cn(_cert(tls["root.crt"])) == ["root"]  # the etcd user that writes
    # etcd 3.4's grpc-proxy refuses a backend certificate with a CN; readers are known by their login.
    assert _cn(_cert(tls["proxy-backend.crt"])) == []
    assert _cn(_cert(access["tls.crt"])) == []
    assert _usages(_cert(tls["root.crt"])) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _usages(_cert(access["tls.crt"])) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _usages(_cert(tls["proxy.crt"])) == {ExtendedKeyUsageOID.SERVER_AUTH}
    sans = _cert(tls["proxy.crt"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("172.18.0.2") in sans.get_values_for_type(x509.IPAddress)
    assert "clustermesh-store.clustermesh-system.svc" in sans.get_values_for_type(x509.DNSName)
    etcd_sans = _cert(tls["etcd.crt"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert etcd_sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_a_rerun_keeps_everything_and_rotate_keeps_only_the_ca(tmp_path: Path) -> None:
    first = _secrets(tmp_path, readers=("remote",))
    assert _secrets(tmp_path) == first  # a reader already in the PKI stays without --reader
    rotated = {d.name: d.data for d in make_secrets(CertsConfig("cluster-1"), tmp_path / "pki", rotate=True)}
    assert rotated["clustermesh-store-tls"]["ca.crt"] == first["clustermesh-store-tls"]["ca.crt"]
    for key in ("etcd.crt", "root.key", "proxy.crt", "proxy-backend.key"):
        assert rotated["clustermesh-store-tls"][key] != first["clustermesh-store-tls"][key], key
    for key in ("tls.crt", "tls.key", "password"):
        assert rotated["clustermesh-access-remote"][key] != first["clustermesh-access-remote"][key], key


def test_new_addresses_reissue_only_the_proxy_certificate(tmp_path: Path) -> None:
    first = _secrets(tmp_path)["clustermesh-store-tls"]
    again = _secrets(tmp_path, ips=("10.1.2.3",))["clustermesh-store-tls"]
    assert again["proxy.crt"] != first["proxy.crt"]
    assert {k: v for k, v in again.items() if not k.startswith("proxy.")} == {
        k: v for k, v in first.items() if not k.startswith("proxy.")}
    sans = _cert(again["proxy.crt"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in sans.get_values_for_type(x509.IPAddress)


def test_keys_stay_private_on_disk(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir(mode=0o755)  # an existing folder is tightened
    docs = make_secrets(CertsConfig("cluster-1", readers=("cluster-2",)), tmp_path / "pki")
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    for path in [*(tmp_path / "pki").glob("*.key"), *(tmp_path / "pki").glob("*.password"),
                 *write_yaml(docs, tmp_path / "out")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


class SecretsFromYaml:
    """What agent/remote.py needs of a Kubernetes client: get_secret, here served from the YAML
    files `certs --output-dir` writes (decoded as the API server would)."""

    def __init__(self, folder: Path) -> None:
        self.docs = [yaml.safe_load(p.read_text()) for p in folder.glob("*.yaml")]

    def get_secret(self, namespace: str, name: str) -> dict[str, bytes]:
        for doc in self.docs:
            if (doc["metadata"]["namespace"], doc["metadata"]["name"]) == (namespace, name):
                return {k: base64.b64decode(v) for k, v in doc["data"].items()}
        raise LookupError(name)


def test_the_command_writes_yaml_an_agent_reads_as_a_remote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["certs", "--cluster", "cluster-1", "--reader", "cluster-2", "--ip", "172.18.0.2",
                 "--pki-dir", str(tmp_path / "pki"), "--output-dir", str(out)]) == 0
    assert "wrote 4 Secrets" in capsys.readouterr().out
    assert (out / "clustermesh-access-cluster-2.yaml").exists()
    spec = {"name": "cluster-1", "id": 1, "endpoints": ["https://172.18.0.2:32379"],
            "tls": {"secretName": "clustermesh-access-cluster-2", "secretNamespace": "clustermesh-system"}}
    config = remote_config_from_spec(SecretsFromYaml(out), spec, tmp_path / "agent", "kube-system")
    assert (config.user, config.endpoint) == ("cluster-2", "https://172.18.0.2:32379")
    assert config.ca_cert and config.cert_file and config.key_file and config.password
    _cert(Path(config.cert_file).read_bytes()).verify_directly_issued_by(_cert(Path(config.ca_cert).read_bytes()))


def test_the_command_explains_a_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--cluster", "cluster-1", "--reader", "root", "--pki-dir", str(tmp_path),
                 "--output-dir", str(tmp_path / "out")]) == 1
    assert "pick another name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_next_steps_say_where_the_store_is_and_to_connect() -> None:
    text = next_steps(CertsConfig("cluster-1", ips=("172.18.0.2",)))
    assert "https://172.18.0.2:PORT" in text and "clustermesh connect" in text


def test_no_leaf_outlives_its_ca(tmp_path: Path) -> None:
    # A CA with 100 days left and leaves asked for a year: every leaf ends with the CA.
    config = CertsConfig("cluster-1", readers=("cluster-2",), ca_lifetime=dt.timedelta(days=100),
                         leaf_lifetime=dt.timedelta(days=100), renew_before=dt.timedelta(days=10))
    make_secrets(config, tmp_path / "pki")
    longer = CertsConfig("cluster-1", readers=("cluster-2",), renew_before=dt.timedelta(days=10))
    secrets = {d.name: d.data for d in make_secrets(longer, tmp_path / "pki", rotate=True)}
    ca = _cert(secrets["clustermesh-store-tls"]["ca.crt"])
    leaves = [secrets["clustermesh-store-tls"][f"{n}.crt"] for n in ("etcd", "root", "proxy", "proxy-backend")]
    leaves.append(secrets["clustermesh-access-cluster-2"]["tls.crt"])
    for pem in leaves:
        assert _cert(pem).not_valid_after_utc <= ca.not_valid_after_utc


def test_a_run_renews_only_what_expires_within_the_window(tmp_path: Path) -> None:
    short = CertsConfig("cluster-1", readers=("cluster-2",), leaf_lifetime=dt.timedelta(days=20),
                        renew_before=dt.timedelta(days=5))
    first = {d.name: d.data for d in make_secrets(short, tmp_path / "pki")}
    # The same run later with a window that covers the 20-day leaves: all of them, and only them, are new.
    due = CertsConfig("cluster-1", renew_before=dt.timedelta(days=30))
    again = {d.name: d.data for d in make_secrets(due, tmp_path / "pki")}
    tls0, tls1 = first["clustermesh-store-tls"], again["clustermesh-store-tls"]
    assert tls1["ca.crt"] == tls0["ca.crt"]
    for name in ("etcd", "root", "proxy", "proxy-backend"):
        assert tls1[f"{name}.crt"] != tls0[f"{name}.crt"], name
        assert _cert(tls1[f"{name}.crt"]).not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=300)
    assert again["clustermesh-access-cluster-2"]["tls.crt"] != first["clustermesh-access-cluster-2"]["tls.crt"]
    assert again["clustermesh-access-cluster-2"]["password"] == first["clustermesh-access-cluster-2"]["password"]
    assert {d.name: d.data for d in make_secrets(due, tmp_path / "pki")} == again  # then nothing is due


def test_keys_are_created_private_not_tightened_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clustermesh import pki

    modes: list[int] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if str(path).endswith(".tmp"):
            modes.append(mode)
        return real_open(path, flags, mode)

    monkeypatch.setattr(pki.os, "open", spy)
    monkeypatch.setattr(Path, "chmod", lambda *a, **k: pytest.fail("a key file was chmod'ed after writing"))
    pki.write_private(tmp_path / "x.key", b"secret")
    assert modes == [0o600]
    assert stat.S_IMODE((tmp_path / "x.key").stat().st_mode) == 0o600


def test_a_revocation_keeps_every_earlier_entry_of_the_crl(tmp_path: Path) -> None:
    from clustermesh.pki import CertificateAuthority

    ca = CertificateAuthority(tmp_path / "pki")
    assert ca.revoked_serials() == set()
    empty = x509.load_pem_x509_crl(ca.crl())
    assert empty.is_signature_valid(ca.cert.public_key()) and len(empty) == 0  # type: ignore[arg-type]
    a, b = ca.issue("a", "", server=False), ca.issue("b", "", server=False)
    sa, sb = _cert(a.cert.read_bytes()).serial_number, _cert(b.cert.read_bytes()).serial_number
    ca.revoke([sa])
    crl = x509.load_pem_x509_crl(ca.revoke([sb]))
    assert {e.serial_number for e in crl} == {sa, sb}
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    # A revoked leaf is never handed out again: the next issue makes a new one.
    assert _cert(ca.issue("a", "", server=False).cert.read_bytes()).serial_number != sa


def test_connect_and_certs_agree_on_the_namespace_of_the_store_secrets() -> None:
    from clustermesh import certs, connect
    from clustermesh.cli import build_parser

    assert connect.ACCESS_NAMESPACE == certs.NAMESPACE == "clustermesh-system"
    assert build_parser().parse_args(["certs", "--cluster", "c1"]).namespace == certs.NAMESPACE


def test_the_expiry_of_each_certificate_file_is_a_metric(tmp_path: Path) -> None:
    from clustermesh import metrics, pki

    ca = pki.CertificateAuthority(tmp_path / "pki")
    leaf = ca.issue("leaf", "", server=False, lifetime=dt.timedelta(days=10))
    found = pki.observe_files({"test ca": str(ca.cert_path), "test leaf": str(leaf.cert),
                               "missing": str(tmp_path / "nope.crt"), "none": None})
    assert [e.name for e in found] == ["test ca", "test leaf"]
    got = metrics.CERTIFICATE_EXPIRY.labels("test leaf")._value.get()
    assert got == pytest.approx(_cert(leaf.cert.read_bytes()).not_valid_after_utc.timestamp())
    assert got - dt.datetime.now(dt.UTC).timestamp() == pytest.approx(10 * 86400, abs=3600)


def test_a_leaf_of_another_ca_with_the_same_name_is_not_reused(tmp_path: Path) -> None:
    from clustermesh.pki import CertificateAuthority

    ours, theirs = CertificateAuthority(tmp_path / "a", name="same"), CertificateAuthority(tmp_path / "b", name="same")
    foreign = theirs.issue("leaf", "", server=False)
    assert not ours.signed(_cert(foreign.cert.read_bytes()))  # same issuer name, another key
    (tmp_path / "a" / "leaf.crt").write_bytes(foreign.cert.read_bytes())
    (tmp_path / "a" / "leaf.key").write_bytes(foreign.key.read_bytes())
    mine = ours.issue("leaf", "", server=False)
    assert ours.signed(_cert(mine.cert.read_bytes()))
