"""One reader identity per peer in a cluster's store: issued by ``connect``, shut out by ``revoke``
and ``disconnect``.

A peer's identity is an etcd user named after the peer (read-only on ``cilium/``), its password and
a client certificate from the store's CA. It lives in the store's cluster as a key of
``clustermesh-store-users`` (the store pod makes the user) and the Secret
``clustermesh-access-<peer>`` (what ``connect`` copies to that peer and nowhere else).

Revoking puts every certificate the peer held on the CA's CRL, which the store's grpc-proxy reads
at each TLS handshake and restarts on (closing open connections), and removes the user. Both are
needed: etcd 3.4 checks no permission on LeaseGrant and LeaseTimeToLive, and the proxy answers
serializable ranges from its cache without asking etcd, so only the certificate check stops a
client that holds a certificate, whatever its password.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from clustermesh.certs import (
    CA_SECRET,
    LOCAL_READER,
    NAMESPACE,
    TLS_SECRET,
    USERS_SECRET,
    CertsConfig,
    CertsError,
    access_secret_name,
    default_pki_dir,
    reader_access,
    validate_reader,
)
from clustermesh.kube import KubeClient
from clustermesh.pki import CertificateAuthority, PKIError, load_cert
from clustermesh.private_files import write_private

log = logging.getLogger(__name__)

Undo = Callable[[], None]


@dataclass(frozen=True)
class StoreCA:
    """Where a cluster's store CA was found: a folder of the user's, or the cluster's CA Secret
    (copied into a private temporary folder for the command's lifetime)."""

    directory: Path
    where: str
    in_cluster: bool


@contextlib.contextmanager
def store_ca(kube: KubeClient, cluster: str, pki_dir: Path | None, namespace: str = NAMESPACE
             ) -> Iterator[StoreCA | None]:
    """The CA that signs ``cluster``'s store: ``pki_dir`` if given (it must hold the CA), else the
    default folder of ``clustermesh certs``, else the Secret ``clustermesh-store-ca``; None if none."""
    if pki_dir is not None:
        if not (pki_dir / "ca.key").exists():
            raise CertsError(f"{pki_dir} holds no CA key (ca.key): give the --pki-dir `clustermesh certs` used "
                             f"for {cluster}")
        yield StoreCA(pki_dir, str(pki_dir), False)
        return
    default = default_pki_dir(cluster)
    if (default / "ca.key").exists():
        yield StoreCA(default, str(default), False)
        return
    secret = kube.read_secret(namespace, CA_SECRET)
    if secret is None or "ca.key" not in secret.data:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="clustermesh-ca-"))  # 0700
    try:
        write_private(folder / "ca.key", secret.data["ca.key"])
        (folder / "ca.crt").write_bytes(secret.data["ca.crt"])
        tls = kube.read_secret(namespace, TLS_SECRET)
        if tls is not None and "crl.pem" in tls.data:
            (folder / "crl.pem").write_bytes(tls.data["crl.pem"])
        yield StoreCA(folder, f"Secret {namespace}/{CA_SECRET} of {cluster}", True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _keep_existing(ca_dir: Path, reader: str, access: dict[str, bytes]) -> None:
    """Put a reader's current credentials where ``reader_access`` looks, so a re-run keeps them
    (and renews only a certificate due for it)."""
    if {"tls.crt", "tls.key", "password"} <= set(access):
        (ca_dir / f"reader-{reader}.crt").write_bytes(access["tls.crt"])
        write_private(ca_dir / f"reader-{reader}.key", access["tls.key"])
        write_private(ca_dir / f"reader-{reader}.password", access["password"])


def add_reader(kube: KubeClient, cluster: str, ca: StoreCA, reader: str,
               config: CertsConfig | None = None, namespace: str = NAMESPACE) -> tuple[dict[str, bytes], Undo | None]:
    """Give ``reader`` (a peer's name) its own identity in ``cluster``'s store; returns its access
    Secret's content and how to undo what was written (None: nothing was)."""
    validate_reader(reader)
    if reader == LOCAL_READER:
        raise CertsError(f"a peer named {LOCAL_READER} would read as {cluster}'s own agents; rename that cluster")
    config = config or CertsConfig(cluster, namespace=namespace)
    name = access_secret_name(reader)
    before_access = kube.read_secret(namespace, name)
    if before_access is not None:
        _keep_existing(ca.directory, reader, before_access.data)
    try:
        doc = reader_access(config, ca.directory, CertificateAuthority(ca.directory), reader)
    except PKIError as exc:
        raise CertsError(str(exc)) from exc
    users = kube.read_secret(namespace, USERS_SECRET)
    if users is None:
        raise CertsError(f"{cluster} has no Secret {namespace}/{USERS_SECRET}: run `clustermesh certs` for it "
                         "and apply deploy/ first")
    undos: list[Undo] = []
    if users.data.get(reader) != doc.data["password"]:
        # The store pod makes the user from this key (deploy/base/store.sh sync).
        kube.put_secret(namespace, USERS_SECRET, {**users.data, reader: doc.data["password"]}, labels=users.labels)
        undos.append(lambda: _restore_user(kube, namespace, reader, users.data.get(reader)))
    if before_access is None or before_access.data != doc.data:
        kube.put_secret(namespace, name, doc.data, labels=doc.labels)
        if before_access is None:
            undos.append(lambda: _delete(kube, namespace, name))
        else:
            undos.append(lambda: kube.put_secret(namespace, name, before_access.data, labels=before_access.labels))
    if not undos:
        return doc.data, None

    def undo() -> None:
        for step in reversed(undos):
            step()

    return doc.data, undo


def _restore_user(kube: KubeClient, namespace: str, reader: str, password: bytes | None) -> None:
    now = kube.read_secret(namespace, USERS_SECRET)
    if now is None:
        return
    data = dict(now.data)
    if password is None:
        data.pop(reader, None)
    else:
        data[reader] = password
    kube.put_secret(namespace, USERS_SECRET, data, labels=now.labels)


def _delete(kube: KubeClient, namespace: str, name: str) -> None:
    now = kube.read_secret(namespace, name)
    if now is not None:
        kube.delete_secret(namespace, name, now.resource_version)


def revoke_reader(kube: KubeClient, cluster: str, ca: StoreCA | None, reader: str,
                  namespace: str = NAMESPACE) -> tuple[list[str], list[str]]:
    """Shut ``reader`` out of ``cluster``'s store: its certificates on the CRL (in the TLS Secret the
    proxy mounts), its user out of the users Secret, its access Secret deleted. Returns (what was
    changed, warnings). Safe to repeat."""
    changed: list[str] = []
    warnings: list[str] = []
    name = access_secret_name(reader)
    access = kube.read_secret(namespace, name)
    serials: set[int] = set()
    if access is not None and "tls.crt" in access.data:
        serials.add(load_cert(access.data["tls.crt"]).serial_number)
    if ca is not None and (ca.directory / f"reader-{reader}.crt").exists():
        serials.add(load_cert((ca.directory / f"reader-{reader}.crt").read_bytes()).serial_number)
    if serials:
        if ca is None:
            expiry = load_cert(access.data["tls.crt"]).not_valid_after_utc if access else None
            warnings.append(
                f"{cluster}'s store CA is not at hand (no --pki-dir, no default folder, no Secret {CA_SECRET}): "
                f"{reader}'s certificate stays valid until {expiry:%Y-%m-%d} and can still reach the proxy. Run "
                f"`clustermesh revoke --peer {reader} --pki-dir DIR` with the folder `clustermesh certs` used")
        else:
            authority = CertificateAuthority(ca.directory)
            if not serials <= authority.revoked_serials():
                crl = authority.revoke(serials)
                tls = kube.read_secret(namespace, TLS_SECRET)
                if tls is None:
                    raise CertsError(f"{cluster} has no Secret {namespace}/{TLS_SECRET}: nothing to put the CRL in")
                kube.put_secret(namespace, TLS_SECRET, {**tls.data, "crl.pem": crl}, labels=tls.labels)
                changed.append(f"{reader}'s certificate is on {cluster}'s CRL")
    users = kube.read_secret(namespace, USERS_SECRET)
    if users is not None and reader in users.data:
        kube.put_secret(namespace, USERS_SECRET, {k: v for k, v in users.data.items() if k != reader},
                        labels=users.labels)
        changed.append(f"removed reader {reader} from {cluster}'s store users")
    if access is not None:
        kube.delete_secret(namespace, name, access.resource_version)
        changed.append(f"deleted Secret {namespace}/{name} in {cluster}")
    if ca is not None and not ca.in_cluster:
        for suffix in (".crt", ".key", ".password"):
            (ca.directory / f"reader-{reader}{suffix}").unlink(missing_ok=True)
    return changed, warnings
