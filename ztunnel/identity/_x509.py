"""Small X.509 helpers shared by the CA, the certificate cache and the TLS peer checks."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from ztunnel.errors import InvalidIdentity
from ztunnel.model.identity import Identity

# Keys we can sign with and accept in CSRs; Istio's plugged-in CAs are often RSA.
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_PEM_END = b"-----END CERTIFICATE-----"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def load_pem_certs(data: bytes) -> list[x509.Certificate]:
    """All certificates in a PEM blob, in order; raises ValueError if there are none."""
    if _PEM_END not in data:
        raise ValueError("no PEM certificate found")
    return x509.load_pem_x509_certificates(data)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_pem(certs: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(cert_pem(c) for c in certs)


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """The URI SANs of a certificate or CSR (empty when it has no SAN extension)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def spiffe_identities(cert: x509.Certificate) -> Iterator[Identity]:
    """The URI SANs that parse as SPIFFE identities, in certificate order (others skipped)."""
    for uri in uri_sans(cert):
        try:
            yield Identity.parse(uri)
        except InvalidIdentity:
            continue


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Whether ``parent`` signed ``child`` (issuer name and signature both match)."""
    try:
        child.verify_directly_issued_by(parent)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    return issued_by(cert, cert)


def spki(key: CertificatePublicKeyTypes) -> bytes:
    """DER SubjectPublicKeyInfo, to compare keys of any type."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
