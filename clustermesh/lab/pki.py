"""A throwaway PKI for local control planes and stores: the product's CA (clustermesh.pki), SA keys."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from clustermesh.pki import CertificateAuthority, CertPair
from clustermesh.private_files import write_private

__all__ = ["CertPair", "CertificateAuthority", "service_account_keys"]


def service_account_keys(directory: Path) -> CertPair:
    """RSA key pair for signing service-account tokens (``cert`` holds the public key)."""
    pair = CertPair(directory / "sa.pub", directory / "sa.key")
    if pair.cert.exists() and pair.key.exists():
        return pair
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_private(pair.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    pair.cert.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pair
