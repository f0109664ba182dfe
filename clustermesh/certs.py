"""``clustermesh certs``: a cluster's store PKI and its remote readers' identities, as Secrets.

One CA per cluster signs everything its store pod uses (deploy/ mounts these Secrets):

- ``clustermesh-store-tls``: ``ca.crt``; ``etcd.crt``/``etcd.key``, etcd's serving certificate (it
  listens on the pod's 127.0.0.1 only); ``root.crt``/``root.key``, the operator's client certificate
  (CN ``root``: the etcd user that writes); ``proxy.crt``/``proxy.key``, the grpc-proxy's serving
  certificate (the Service's DNS names, plus ``--ip``/``--dns`` for NodePort or load-balancer
  addresses); ``proxy-backend.crt``/``proxy-backend.key``, the proxy's certificate towards etcd, with
  no CN because etcd 3.4's proxy refuses one.
  ``crl.pem``: the CA's revocation list; the grpc-proxy refuses every certificate on it.
- ``clustermesh-store-users``: one key per remote reader, its etcd password; the store pod makes each
  one an etcd user that may only read ``cilium/``.
- ``clustermesh-access-<reader>``: what one remote cluster needs to read this store, in the format
  ``agent/remote.py`` reads (``ca.crt``, ``tls.crt``, ``tls.key``, ``username``, ``password``).
  ``clustermesh connect`` makes one per peer, named after it, and copies it to that peer only;
  ``revoke`` and ``disconnect`` put its certificate on the CRL and remove its user. The client
  certificate has no CN: the grpc-proxy asks for a certificate from this CA and not on its CRL, and
  the etcd identity that counts is the reader's login, which the proxy forwards.

The CA key stays in ``--pki-dir`` (one folder per cluster, 0700) unless ``--in-cluster-ca`` puts it
in the Secret ``clustermesh-store-ca`` for deploy/'s renewal CronJob. Runs are idempotent: existing
certificates and passwords are kept unless they expire within ``--renew-before`` or ``--rotate`` asks
for new ones (the CA stays; see deploy/README.md "Certificates").
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustermesh import schema
from clustermesh.pki import (
    CA_LIFETIME,
    LEAF_LIFETIME,
    RENEW_BEFORE,
    CertificateAuthority,
    PKIError,
    load_cert,
    parse_duration,
    private_dir,
    sans,
)
from clustermesh.private_files import write_private

NAMESPACE = "clustermesh-system"
STORE_SERVICE = "clustermesh-store"
TLS_SECRET = "clustermesh-store-tls"
USERS_SECRET = "clustermesh-store-users"
CA_SECRET = "clustermesh-store-ca"
ACCESS_PREFIX = "clustermesh-access-"
READER_LABEL = "clustermesh.io/reader"
# The local agents' reader: with the cache (ClusterMesh spec.cache) they read every remote from their
# own cluster's store, as this user. Always made; a peer cannot take the name.
LOCAL_READER = "local-agents"
CLUSTER_LABEL = "clustermesh.io/cluster"
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
    readers: tuple[str, ...] = ()
    """Readers made here; `connect` adds one per peer later, and every reader already in the PKI stays."""
    ips: tuple[str, ...] = ()
    """Extra IP SANs of the proxy's certificate: node addresses (NodePort) or the load balancer's."""
    dns: tuple[str, ...] = ()
    cluster_domain: str = "cluster.local"
    ca_lifetime: dt.timedelta = CA_LIFETIME
    leaf_lifetime: dt.timedelta = LEAF_LIFETIME
    renew_before: dt.timedelta = RENEW_BEFORE


def validate(config: CertsConfig) -> None:
    """Refuse what would make unusable certificates or Secrets, before anything is written. Pure."""
    try:
        schema.validate_cluster_name(config.cluster)
    except schema.SchemaError as exc:
        raise CertsError(f"--cluster: {exc}") from exc
    seen: set[str] = set()
    for reader in config.readers:
        validate_reader(reader)
        if reader in seen:
            raise CertsError(f"reader {reader!r} is named twice")
        seen.add(reader)
    if config.leaf_lifetime > config.ca_lifetime:
        raise CertsError("--leaf-lifetime is longer than --ca-lifetime: a leaf never outlives its CA")
    if config.renew_before >= config.leaf_lifetime:
        raise CertsError("--renew-before is not shorter than --leaf-lifetime: every run would renew everything")
    for ip in config.ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError as exc:
            raise CertsError(f"--ip {ip!r} is not an IP address; names go to --dns") from exc
    for name in config.dns:
        if not _DNS_NAME.match(name.lower()) or len(name) > 253:
            raise CertsError(f"--dns {name!r} is not a DNS name; addresses go to --ip")


def validate_reader(reader: str) -> None:
    if not _READER.match(reader) or len(ACCESS_PREFIX + reader) > 253:
        raise CertsError(f"reader {reader!r}: use lowercase letters, digits and '-' (it becomes an etcd "
                         "user and part of a Secret name)")
    if reader in RESERVED_USERS:
        raise CertsError(f"reader {reader!r} is the store's writer; pick another name")


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


def existing_readers(pki_dir: Path) -> list[str]:
    """The readers this PKI holds (``certs --reader`` and ``connect`` made them; ``revoke`` removes them)."""
    return sorted(p.name[len("reader-"):-len(".password")] for p in pki_dir.glob("reader-*.password"))


def _readers(config: CertsConfig, pki_dir: Path) -> list[str]:
    return list(dict.fromkeys([LOCAL_READER, *config.readers, *existing_readers(pki_dir)]))


def _leaf_names(config: CertsConfig, pki_dir: Path) -> list[str]:
    return ["etcd", "root", "proxy", "proxy-backend", *(f"reader-{r}" for r in _readers(config, pki_dir))]


def _forget(pki_dir: Path, names: Iterable[str]) -> None:
    for name in names:
        for suffix in (".crt", ".key", ".password"):
            (pki_dir / f"{name}{suffix}").unlink(missing_ok=True)


def _sans_differ(cert_path: Path, ips: Sequence[str], dns: Sequence[str]) -> bool:
    """Whether an existing certificate lacks (or has extra) names: new --ip/--dns re-issue the proxy's."""
    if not cert_path.exists():
        return False
    have_ips, have_dns = sans(load_cert(cert_path.read_bytes()))
    return have_ips != {str(ipaddress.ip_address(ip)) for ip in ips} or have_dns != set(dns)


def _password(path: Path) -> bytes:
    if not path.exists():
        write_private(path, secrets.token_urlsafe(24).encode())  # urlsafe: no ':' (etcdctl's user:password)
    return path.read_bytes().strip()


def _ca(config: CertsConfig, pki_dir: Path) -> CertificateAuthority:
    return CertificateAuthority(private_dir(pki_dir), name=f"clustermesh-{config.cluster}-store-ca",
                                lifetime=config.ca_lifetime)


def _labels(cluster: str) -> dict[str, str]:
    return {"app.kubernetes.io/part-of": "clustermesh", CLUSTER_LABEL: cluster}


def reader_access(config: CertsConfig, pki_dir: Path, ca: CertificateAuthority, reader: str) -> SecretDoc:
    """Issue (or keep) one reader's password and client certificate: its access Secret."""
    password = _password(pki_dir / f"reader-{reader}.password")
    pair = ca.issue(f"reader-{reader}", "", ips=(), dns=(), server=False, lifetime=config.leaf_lifetime,
                    renew_before=config.renew_before)
    return SecretDoc(access_secret_name(reader), config.namespace, {
        "ca.crt": ca.cert_path.read_bytes(), "tls.crt": pair.cert.read_bytes(), "tls.key": pair.key.read_bytes(),
        "username": reader.encode(), "password": password,
    }, {**_labels(config.cluster), READER_LABEL: reader})


def make_secrets(config: CertsConfig, pki_dir: Path, rotate: bool = False) -> list[SecretDoc]:
    """Issue (or reuse) everything under ``pki_dir`` and return the Secrets to write."""

    validate(config)
    private_dir(pki_dir)  # the CA key lives here: 0700, or refused when it is someone else's
    readers = _readers(config, pki_dir)
    if rotate:
        _forget(pki_dir, _leaf_names(config, pki_dir))
    try:
        ca = _ca(config, pki_dir)
        ips, dns = proxy_sans(config)
        if _sans_differ(pki_dir / "proxy.crt", ips, dns):
            _forget(pki_dir, ["proxy"])
        life = {"lifetime": config.leaf_lifetime, "renew_before": config.renew_before}
        pairs = {
            # Only the pod's containers talk to etcd itself, on the pod's loopback. Client use too: the
            # etcd container enables auth with it before any user exists (and it is no user after).
            "etcd": ca.issue("etcd", f"clustermesh-{config.cluster}-etcd", **life),  # type: ignore[arg-type]
            "root": ca.issue("root", "root", ips=(), dns=(), server=False, **life),  # type: ignore[arg-type]
            "proxy": ca.issue("proxy", f"{config.service}.{config.namespace}", ips=ips, dns=dns, client=False,
                              **life),  # type: ignore[arg-type]
            "proxy-backend": ca.issue("proxy-backend", "", ips=(), dns=(), server=False,
                                      **life),  # type: ignore[arg-type]
        }
        tls: dict[str, bytes] = {"ca.crt": ca.cert_path.read_bytes(), "crl.pem": ca.crl()}
        for name, pair in pairs.items():
            tls[f"{name}.crt"] = pair.cert.read_bytes()
            tls[f"{name}.key"] = pair.key.read_bytes()
        labels = _labels(config.cluster)
        out = [SecretDoc(TLS_SECRET, config.namespace, tls, labels)]
        access = [reader_access(config, pki_dir, ca, reader) for reader in readers]
    except PKIError as exc:
        raise CertsError(str(exc)) from exc
    users = {doc.data["username"].decode(): doc.data["password"] for doc in access}
    return [*out, SecretDoc(USERS_SECRET, config.namespace, users, labels), *access]


def ca_secret(config: CertsConfig, pki_dir: Path) -> SecretDoc:
    """The CA as a Secret, for the renewal CronJob (``--in-cluster-ca``)."""
    return SecretDoc(CA_SECRET, config.namespace, {
        "ca.crt": (pki_dir / "ca.crt").read_bytes(), "ca.key": (pki_dir / "ca.key").read_bytes(),
    }, _labels(config.cluster))


def write_yaml(docs: Sequence[SecretDoc], directory: Path) -> list[Path]:
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for doc in docs:
        path = directory / f"{doc.name}.yaml"
        write_private(path, yaml.safe_dump(doc.manifest(), sort_keys=False).encode())  # keys inside: 0600
        paths.append(path)
    return paths


def next_steps(config: CertsConfig) -> str:
    """What to do with the Secrets: the ClusterMesh's spec.access, then connect."""
    hosts = [*config.dns, *config.ips] or ["<node or load-balancer address>"]
    port = "32391 (NodePort) or 2379 (LoadBalancer)"
    return (
        f"Set spec.access of ClusterMesh 'default' in cluster {config.cluster}:\n"
        f"  access:\n"
        f"    endpoints: [\"https://{hosts[0]}:PORT\"]   # PORT: {port}\n"
        "then run `clustermesh connect`: it gives each peer its own reader, from this CA. The store pods apply "
        "new readers and renewed certificates live (within about a minute)."
    )


def load_from_cluster(kube: Any, namespace: str, into: Path) -> CertsConfig:
    """Copy the CA (Secret clustermesh-store-ca) and every current certificate, key and password of
    the store into ``into``, so a run renews what is due and keeps the rest; returns the config they
    were made with (the cluster from the Secrets' label, the proxy's extra names from its certificate)."""
    ca = kube.read_secret(namespace, CA_SECRET)
    if ca is None or "ca.key" not in ca.data:
        raise CertsError(f"no CA in Secret {namespace}/{CA_SECRET}: make it with `clustermesh certs --in-cluster-ca`")
    tls = kube.read_secret(namespace, TLS_SECRET)
    users = kube.read_secret(namespace, USERS_SECRET)
    if tls is None or users is None:
        raise CertsError(f"no Secret {namespace}/{TLS_SECRET} or {USERS_SECRET}: run `clustermesh certs` first")
    cluster = tls.labels.get(CLUSTER_LABEL) or ""
    private_dir(into)
    write_private(into / "ca.key", ca.data["ca.key"])
    (into / "ca.crt").write_bytes(ca.data["ca.crt"])
    for key, value in tls.data.items():
        if key.endswith(".key"):
            write_private(into / key, value)
        elif key != "ca.crt":
            (into / key).write_bytes(value)
    for reader, password in users.data.items():
        write_private(into / f"reader-{reader}.password", password)
        access = kube.read_secret(namespace, access_secret_name(reader))
        if access is not None and {"tls.crt", "tls.key"} <= set(access.data):
            (into / f"reader-{reader}.crt").write_bytes(access.data["tls.crt"])
            write_private(into / f"reader-{reader}.key", access.data["tls.key"])
    base = CertsConfig(cluster or "unknown", namespace=namespace)
    ips: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    if "proxy.crt" in tls.data:
        have_ips, have_dns = sans(load_cert(tls.data["proxy.crt"]))
        default_ips, default_dns = proxy_sans(base)
        ips = tuple(sorted(ip for ip in have_ips if ip not in default_ips))
        dns = tuple(sorted(d for d in have_dns if d not in default_dns))
    return CertsConfig(cluster, namespace=namespace, ips=ips, dns=dns)


def _keep_other_readers(kube: Any, doc: SecretDoc) -> SecretDoc:
    """The users Secret to write, with the readers already in the cluster that this PKI folder does
    not know (connect made them from another copy of the CA): certs never removes a reader; revoke
    does, and puts its certificate on the CRL too."""
    now = kube.read_secret(doc.namespace, doc.name)
    others = {k: v for k, v in (now.data if now else {}).items() if k not in doc.data}
    for reader in sorted(others):
        print(f"kept reader {reader}: it is in the cluster but not in this --pki-dir "
              f"(`clustermesh revoke --peer {reader}` removes it)", file=sys.stderr)
    return SecretDoc(doc.name, doc.namespace, {**others, **doc.data}, doc.labels) if others else doc


def _changed(kube: Any, doc: SecretDoc) -> bool:
    now = kube.read_secret(doc.namespace, doc.name)
    return now is None or now.data != doc.data


def run_certs(args: argparse.Namespace) -> int:
    try:
        ca_lifetime, leaf_lifetime = parse_duration(args.ca_lifetime), parse_duration(args.leaf_lifetime)
        renew_before = parse_duration(args.renew_before)
    except PKIError as exc:
        print(f"clustermesh certs: {exc}", file=sys.stderr)
        return 2
    from clustermesh.kube import KubeClient, KubeError  # the command's only; make_secrets needs no client

    kube = None
    scratch = None
    try:
        if args.from_cluster:
            kube = KubeClient(args.kubeconfig, args.context)
            scratch = tempfile.TemporaryDirectory(prefix="clustermesh-certs-")
            pki_dir = Path(scratch.name) / "pki"
            found = load_from_cluster(kube, args.namespace, pki_dir)
            config = CertsConfig(cluster=args.cluster or found.cluster, namespace=args.namespace,
                                 readers=tuple(args.reader or ()), ips=tuple(args.ip or found.ips),
                                 dns=tuple(args.dns or found.dns), cluster_domain=args.cluster_domain,
                                 ca_lifetime=ca_lifetime, leaf_lifetime=leaf_lifetime, renew_before=renew_before)
        else:
            if not args.cluster:
                print("clustermesh certs: --cluster is required (or --from-cluster)", file=sys.stderr)
                return 2
            config = CertsConfig(
                cluster=args.cluster, namespace=args.namespace, readers=tuple(args.reader or ()),
                ips=tuple(args.ip or ()), dns=tuple(args.dns or ()), cluster_domain=args.cluster_domain,
                ca_lifetime=ca_lifetime, leaf_lifetime=leaf_lifetime, renew_before=renew_before,
            )
            pki_dir = Path(args.pki_dir) if args.pki_dir else default_pki_dir(config.cluster)
            if args.renew and not (pki_dir / "ca.key").exists():
                raise CertsError(f"--renew: no CA in {pki_dir}; give the --pki-dir of the first run")
        docs = make_secrets(config, pki_dir, rotate=args.rotate)
        if args.in_cluster_ca or args.from_cluster:
            docs.insert(0, ca_secret(config, pki_dir))
        ca_end = load_cert((pki_dir / "ca.crt").read_bytes()).not_valid_after_utc
    except (CertsError, OSError, KubeError) as exc:
        if scratch is not None:
            scratch.cleanup()
        print(f"clustermesh certs: {exc}", file=sys.stderr)
        return 1
    try:
        if args.output_dir:
            try:
                paths = write_yaml(docs, Path(args.output_dir))
            except OSError as exc:
                print(f"clustermesh certs: {exc}", file=sys.stderr)
                return 1
            print(f"wrote {len(paths)} Secrets to {args.output_dir} (apply them with kubectl apply -f)")
        else:
            written = []
            try:
                kube = kube or KubeClient(args.kubeconfig, args.context)
                for doc in docs:
                    if doc.name == USERS_SECRET:
                        doc = _keep_other_readers(kube, doc)
                    # Only what changed: every write makes the store pods' volumes update.
                    if _changed(kube, doc):
                        kube.put_secret(doc.namespace, doc.name, doc.data, labels=doc.labels)
                        written.append(doc.name)
            except KubeError as exc:
                print(f"clustermesh certs: {exc}; is namespace {config.namespace} there "
                      "(kubectl apply -k deploy/), or write files with --output-dir?", file=sys.stderr)
                return 1
            if written:
                print(f"wrote Secrets {', '.join(written)} in namespace {config.namespace}")
            else:
                print(f"every Secret in namespace {config.namespace} is up to date; nothing written")
    finally:
        if scratch is not None:
            scratch.cleanup()
    left = ca_end - dt.datetime.now(dt.UTC)
    if left <= config.renew_before:
        print(f"warning: the CA expires on {ca_end:%Y-%m-%d}; leaves cannot outlive it. Make a new CA "
              "(a new --pki-dir), then run certs and connect again", file=sys.stderr)
    if not args.from_cluster:
        print(f"CA and keys kept in {pki_dir}")
        print(next_steps(config))
    return 0
