"""Certificates for the store and its readers: one CA per cluster, leaves it signs, a CRL of the
readers it shut out, and what a certificate's expiry is.

Rules that hold for every caller (``clustermesh certs``, ``connect``, ``revoke``, the renewal job
and the lab):

- a leaf never outlives its CA (its notAfter is capped at the CA's);
- an existing leaf is reused only if this CA signed it and it does not expire within
  ``renew_before``; otherwise a new key and certificate replace it;
- private keys are created with mode 0600 (a new file is written and renamed over the old one,
  never written first and tightened after);
- the CRL is the record of revoked serials: a new CRL keeps every earlier entry.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clustermesh.private_files import write_private

DAY = dt.timedelta(days=1)
CA_LIFETIME = 1095 * DAY  # Cilium's default for its clustermesh CA and certificates
LEAF_LIFETIME = 365 * DAY
RENEW_BEFORE = 30 * DAY  # what `clustermesh status` warns about, and what a renewal re-issues
_BACKDATE = dt.timedelta(minutes=5)  # clocks of other machines may be a little behind
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class PKIError(Exception):
    pass


def parse_duration(text: str) -> dt.timedelta:
    """``90d``, ``12h``, ``30m``, ``45s``: the lifetimes' flag syntax."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise PKIError(f"{text!r} is not a duration: use a positive number with s, m, h or d (e.g. 365d)")
    return dt.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def private_dir(path: Path) -> Path:
    """Make ``path`` (a folder that holds a CA key) 0700 and ours, or refuse it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise PKIError(f"{path} belongs to uid {st.st_uid}, not to you: use a folder of your own for the keys")
    if st.st_mode & 0o077:
        path.chmod(0o700)
    for child in path.iterdir():
        if child.suffix in (".key", ".password") and child.stat().st_mode & 0o077:
            child.chmod(0o600)
    return path


def load_cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def not_after(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc


def sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    """(IP addresses, DNS names) a certificate is valid for; empty sets without the extension."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}, set(ext.get_values_for_type(x509.DNSName))


def expires_within(cert: x509.Certificate, window: dt.timedelta, at: dt.datetime | None = None) -> bool:
    return not_after(cert) - (at or now()) <= window


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


class CertificateAuthority:
    """A CA kept in ``directory`` (``ca.crt``, ``ca.key``), made on first use."""

    def __init__(self, directory: Path, name: str = "clustermesh-ca", lifetime: dt.timedelta = CA_LIFETIME) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.cert_path = directory / "ca.crt"
        self.key_path = directory / "ca.key"
        self.crl_path = directory / "crl.pem"
        if self.cert_path.exists() and self.key_path.exists():
            self._key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
            self.cert = load_cert(self.cert_path.read_bytes())
            return
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        start = now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - _BACKDATE)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        write_private(self.key_path, _key_pem(key))
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._key = key

    @property
    def not_after(self) -> dt.datetime:
        return not_after(self.cert)

    def signed(self, cert: x509.Certificate) -> bool:
        if cert.issuer != self.cert.subject:
            return False
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def usable(self, pair: CertPair, renew_before: dt.timedelta) -> bool:
        """Whether an existing leaf can stay: ours, not revoked, and not due for renewal."""
        if not (pair.cert.exists() and pair.key.exists()):
            return False
        try:
            cert = load_cert(pair.cert.read_bytes())
        except ValueError:
            return False
        return (self.signed(cert) and not expires_within(cert, renew_before)
                and cert.serial_number not in self.revoked_serials())

    def issue(
        self,
        name: str,
        common_name: str,
        ips: tuple[str, ...] = ("127.0.0.1",),
        dns: tuple[str, ...] = ("localhost",),
        organizations: tuple[str, ...] = (),
        server: bool = True,
        client: bool = True,
        lifetime: dt.timedelta = LEAF_LIFETIME,
        renew_before: dt.timedelta = RENEW_BEFORE,
    ) -> CertPair:
        pair = CertPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        # A renewal window as long as the lifetime would renew at every run: certs refuses it.
        window = renew_before if renew_before < lifetime else lifetime / 2
        if self.usable(pair, window):
            return pair
        start = now()
        end = min(start + lifetime, self.not_after)
        if end - start <= window:
            raise PKIError(f"the CA in {self.directory} expires on {self.not_after:%Y-%m-%d}: too soon to issue "
                           f"{name}. Make a new CA (a new --pki-dir), then run certs and connect again")
        key = ec.generate_private_key(ec.SECP256R1())
        # An empty common name is for etcd grpc-proxy, which refuses a backend certificate with a CN
        # (it would make every proxied request that user), and for readers, whose login counts.
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
        attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        sans += [x509.DNSName(d) for d in dns]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - _BACKDATE)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())  # type: ignore[arg-type]
        write_private(pair.key, _key_pem(key))
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return pair

    # ------------------------------------------------------------ revocation

    def revoked_serials(self) -> set[int]:
        if not self.crl_path.exists():
            return set()
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        return {entry.serial_number for entry in crl}

    def revoke(self, serials: Iterable[int]) -> bytes:
        """Add ``serials`` to the CRL (every earlier entry stays) and return it, PEM."""
        done = self.revoked_serials()
        start = now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(start - _BACKDATE)
            # etcd checks serials only; the next update is the CA's end, past which nothing verifies.
            .next_update(max(self.not_after, start + DAY))
        )
        for serial in sorted(done | set(serials)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start - _BACKDATE).build())
        pem = builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]
        self.crl_path.write_bytes(pem)
        return pem

    def crl(self) -> bytes:
        """The current CRL (an empty one, signed, before any revocation)."""
        if not self.crl_path.exists():
            return self.revoke(())
        return self.crl_path.read_bytes()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Expiry:
    """One certificate's end of validity, as `status` and the metric report it."""

    name: str
    not_after: dt.datetime

    def left(self, at: dt.datetime | None = None) -> dt.timedelta:
        return self.not_after - (at or now())


def expiries(name: str, pem: bytes) -> list[Expiry]:
    """Every certificate in a PEM bundle (a CA file may hold several), named ``name`` or ``name[i]``."""
    certs = x509.load_pem_x509_certificates(pem)
    if len(certs) == 1:
        return [Expiry(name, not_after(certs[0]))]
    return [Expiry(f"{name}[{i}]", not_after(c)) for i, c in enumerate(certs)]


def observe_files(files: dict[str, str | None]) -> list[Expiry]:
    """Expiries of the certificate files this process uses (name -> path), also set as the metric
    ``clustermesh_certificate_expiry_timestamp_seconds``; a missing or unreadable file is skipped."""
    from clustermesh import metrics

    found: list[Expiry] = []
    for name, path in files.items():
        if not path:
            continue
        try:
            found += expiries(name, Path(path).read_bytes())
        except (OSError, ValueError):
            continue
    for e in found:
        metrics.CERTIFICATE_EXPIRY.labels(e.name).set(e.not_after.timestamp())
    return found
