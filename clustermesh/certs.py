"""``clustermesh certs``: a cluster's store PKI and its remote readers' identities, as Secrets.

One CA per cluster signs everything its store pod uses (deploy/ mounts these Secrets):

- ``clustermesh-store-tls``: ``ca.crt``; ``etcd.crt``/``etcd.key``, etcd's serving certificate (it
  listens on the pod's 127.0.0.1 only); ``root.crt``/``root.key``, the operator's client certificate
  (CN ``root``: the etcd user that writes); ``proxy.crt``/``proxy.key``, the grpc-proxy's serving
  certificate (the Service's DNS names, plus ``--ip``/``--dns`` for NodePort or load-balancer
  addresses); ``proxy-backend.crt``/``proxy-backend.key``, the proxy's certificate towards etcd, with
  no CN because etcd 3.4's proxy refuses one.
- ``clustermesh-store-users``: one key per remote reader, its etcd password; the store pod makes each
  one an etcd user that may only read ``cilium/``.
- ``clustermesh-access-<reader>``: what a remote cluster needs to read this store, in the format
  ``agent/remote.py`` reads (``ca.crt``, ``tls.crt``, ``tls.key``, ``username``, ``password``). The
  ClusterMesh's ``spec.access.tls`` names it and ``clustermesh connect`` copies it to the other side.
  The client certificate has no CN either: the grpc-proxy asks for a certificate from this CA, and the
  etcd identity that counts is the reader's login, which the proxy forwards.

The CA key never goes into the cluster: it stays in ``--pki-dir`` (one folder per cluster), so that a
later run issues from the same CA. Runs are idempotent: existing certificates and passwords are kept
unless ``--rotate`` asks for new ones (the CA stays; see deploy/README.md "Rotating credentials").
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustermesh import schema

NAMESPACE = "clustermesh-system"
STORE_SERVICE = "clustermesh-store"
TLS_SECRET = "clustermesh-store-tls"
USERS_SECRET = "clustermesh-store-users"
ACCESS_PREFIX = "clustermesh-access-"
DEFAULT_READER = "remote"
# etcd's own users: a reader with one of these names would be the writer, or no one.
RESERVED_USERS = frozenset({"root"})
# A reader name is an etcd user, a Secret key and part of a Secret name: the intersection of the three.
_READER = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_NAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class CertsError(Exception):
    pass


@dataclass(frozen=True)
class CertsConfig:
    cluster: str
    namespace: str = NAMESPACE
    service: str = STORE_SERVICE
    readers: tuple[str, ...] = (DEFAULT_READER,)
    ips: tuple[str, ...] = ()
    """Extra IP SANs of the proxy's certificate: node addresses (NodePort) or the load balancer's."""
    dns: tuple[str, ...] = ()
    cluster_domain: str = "cluster.local"


def validate(config: CertsConfig) -> None:
    """Refuse what would make unusable certificates or Secrets, before anything is written. Pure."""
    try:
        schema.validate_cluster_name(config.cluster)
    except schema.SchemaError as exc:
        raise CertsError(f"--cluster: {exc}") from exc
    if not config.readers:
        raise CertsError("no reader: name at least one remote reader with --reader")
    seen: set[str] = set()
    for reader in config.readers:
        if not _READER.match(reader) or len(ACCESS_PREFIX + reader) > 253:
            raise CertsError(f"reader {reader!r}: use lowercase letters, digits and '-' (it becomes an etcd "
                             "user and part of a Secret name)")
        if reader in RESERVED_USERS:
            raise CertsError(f"reader {reader!r} is the store's writer; pick another name")
        if reader in seen:
            raise CertsError(f"reader {reader!r} is named twice")
        seen.add(reader)
    for ip in config.ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError as exc:
            raise CertsError(f"--ip {ip!r} is not an IP address; names go to --dns") from exc
    for name in config.dns:
        if not _DNS_NAME.match(name.lower()) or len(name) > 253:
            raise CertsError(f"--dns {name!r} is not a DNS name; addresses go to --ip")


def proxy_sans(config: CertsConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(IPs, DNS names) the grpc-proxy's certificate must carry: the Service's names inside the
    cluster, 127.0.0.1 and localhost (port-forwards, the pod itself), and the given extras. Pure."""
    svc, ns = config.service, config.namespace
    dns = [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.{config.cluster_domain}", "localhost",
           *config.dns]
    ips = ["127.0.0.1", *config.ips]
    return tuple(dict.fromkeys(ips)), tuple(dict.fromkeys(dns))


def access_secret_name(reader: str) -> str:
    return ACCESS_PREFIX + reader


@dataclass(frozen=True)
class SecretDoc:
    """A Secret to write: the same content whether it goes to the API server or to a YAML file."""

    name: str
    namespace: str
    data: dict[str, bytes] = field(repr=False)
    labels: dict[str, str] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": dict(self.labels)},
            "type": "Opaque",
            "data": {k: base64.b64encode(v).decode() for k, v in sorted(self.data.items())},
        }


def default_pki_dir(cluster: str) -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "clustermesh" / "pki" / cluster


def _leaf_names(config: CertsConfig) -> list[str]:
    return ["etcd", "root", "proxy", "proxy-backend", *(f"reader-{r}" for r in config.readers)]


def _forget(pki_dir: Path, names: Iterable[str]) -> None:
    for name in names:
        for suffix in (".crt", ".key", ".password"):
            (pki_dir / f"{name}{suffix}").unlink(missing_ok=True)


def _sans_differ(cert_path: Path, ips: Sequence[str], dns: Sequence[str]) -> bool:
    """Whether an existing certificate lacks (or has extra) names: new --ip/--dns re-issue the proxy's."""
    from cryptography import x509

    if not cert_path.exists():
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have_ips = {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    have_dns = set(ext.get_values_for_type(x509.DNSName))
    return have_ips != {str(ipaddress.ip_address(ip)) for ip in ips} or have_dns != set(dns)


def _password(path: Path) -> bytes:
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24))  # urlsafe: no ':' (etcdctl's user:password form)
        path.chmod(0o600)
    return path.read_bytes().strip()


def make_secrets(config: CertsConfig, pki_dir: Path, rotate: bool = False) -> list[SecretDoc]:
    """Issue (or reuse) everything under ``pki_dir`` and return the Secrets to write."""
    from clustermesh.lab.pki import CertificateAuthority  # cryptography only for this command

    validate(config)
    if rotate:
        _forget(pki_dir, _leaf_names(config))
    pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the CA key lives here
    ca = CertificateAuthority(pki_dir, name=f"clustermesh-{config.cluster}-store-ca")
    ips, dns = proxy_sans(config)
    if _sans_differ(pki_dir / "proxy.crt", ips, dns):
        _forget(pki_dir, ["proxy"])
    pairs = {
        # Only the pod's containers talk to etcd itself, on the pod's loopback.
        "etcd": ca.issue("etcd", f"clustermesh-{config.cluster}-etcd", client=False),
        "root": ca.issue("root", "root", ips=(), dns=(), server=False),
        "proxy": ca.issue("proxy", f"{config.service}.{config.namespace}", ips=ips, dns=dns, client=False),
        "proxy-backend": ca.issue("proxy-backend", "", ips=(), dns=(), server=False),
    }
    ca_pem = ca.cert_path.read_bytes()
    labels = {"app.kubernetes.io/part-of": "clustermesh", "clustermesh.io/cluster": config.cluster}
    tls: dict[str, bytes] = {"ca.crt": ca_pem}
    for name, pair in pairs.items():
        tls[f"{name}.crt"] = pair.cert.read_bytes()
        tls[f"{name}.key"] = pair.key.read_bytes()
    out = [SecretDoc(TLS_SECRET, config.namespace, tls, labels)]
    users: dict[str, bytes] = {}
    for reader in config.readers:
        password = _password(pki_dir / f"reader-{reader}.password")
        users[reader] = password
        pair = ca.issue(f"reader-{reader}", "", ips=(), dns=(), server=False)
        out.append(SecretDoc(access_secret_name(reader), config.namespace, {
            "ca.crt": ca_pem, "tls.crt": pair.cert.read_bytes(), "tls.key": pair.key.read_bytes(),
            "username": reader.encode(), "password": password,
        }, {**labels, "clustermesh.io/reader": reader}))
    out.insert(1, SecretDoc(USERS_SECRET, config.namespace, users, labels))
    return out


def write_yaml(docs: Sequence[SecretDoc], directory: Path) -> list[Path]:
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for doc in docs:
        path = directory / f"{doc.name}.yaml"
        # Created private before the key material goes in.
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(yaml.safe_dump(doc.manifest(), sort_keys=False))
        paths.append(path)
    return paths


def next_steps(config: CertsConfig) -> str:
    """What to do with the Secrets: the ClusterMesh's spec.access for the first reader."""
    hosts = [*config.dns, *config.ips] or ["<node or load-balancer address>"]
    port = "32379 (NodePort) or 2379 (LoadBalancer)"
    return (
        f"Set spec.access of ClusterMesh 'default' in cluster {config.cluster}:\n"
        f"  access:\n"
        f"    endpoints: [\"https://{hosts[0]}:PORT\"]   # PORT: {port}\n"
        f"    tls: {{secretName: {access_secret_name(config.readers[0])}, secretNamespace: {config.namespace}}}\n"
        "then run `clustermesh connect`. The store pod picks up new reader passwords within a minute; "
        "new certificates need `kubectl -n clustermesh-system rollout restart deployment/clustermesh-store`."
    )


def run_certs(args: argparse.Namespace) -> int:
    config = CertsConfig(
        cluster=args.cluster, namespace=args.namespace, readers=tuple(args.reader or (DEFAULT_READER,)),
        ips=tuple(args.ip or ()), dns=tuple(args.dns or ()), cluster_domain=args.cluster_domain,
    )
    pki_dir = Path(args.pki_dir) if args.pki_dir else default_pki_dir(config.cluster)
    try:
        docs = make_secrets(config, pki_dir, rotate=args.rotate)
    except (CertsError, OSError) as exc:
        print(f"clustermesh certs: {exc}", file=sys.stderr)
        return 1
    if args.output_dir:
        try:
            paths = write_yaml(docs, Path(args.output_dir))
        except OSError as exc:
            print(f"clustermesh certs: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {len(paths)} Secrets to {args.output_dir} (apply them with kubectl apply -f)")
    else:
        from clustermesh.kube import KubeClient, KubeError

        try:
            kube = KubeClient(args.kubeconfig, args.context)
            for doc in docs:
                kube.put_secret(doc.namespace, doc.name, doc.data, labels=doc.labels)
        except KubeError as exc:
            print(f"clustermesh certs: {exc}; is namespace {config.namespace} there "
                  "(kubectl apply -k deploy/), or write files with --output-dir?", file=sys.stderr)
            return 1
        print(f"wrote Secrets {', '.join(d.name for d in docs)} in namespace {config.namespace}")
    print(f"CA and keys kept in {pki_dir}")
    print(next_steps(config))
    return 0
