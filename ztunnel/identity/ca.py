"""The certificate authority seam, and the embedded file CA behind it.

``CertificateAuthority`` is "CSR in, chain out", the shape of Istio's
``IstioCertificateService/CreateCertificate``, so a remote CA client can replace
``FileCA`` without touching the proxies. ``FileCA`` reads Istio's plugged-in CA
layout (an Istio ``cacerts`` secret works as is) and signs leaves like istiod:
empty subject, one SPIFFE URI SAN, serverAuth+clientAuth.

In production a node should not hold the CA key; the file CA serves standalone
mode, the demo and the tests.
"""

from __future__ import annotations

import datetime
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel.errors import InvalidIdentity
from ztunnel.identity._x509 import (
    SigningKey,
    cert_pem,
    certs_pem,
    is_self_signed,
    issued_by,
    load_pem_certs,
    spki,
    uri_sans,
    utcnow,
)
from ztunnel.identity.certificate import WorkloadCertificate, new_csr
from ztunnel.identity.errors import CAError
from ztunnel.model.identity import DEFAULT_TRUST_DOMAIN, Identity

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"
CA_FILES = (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN)

ROOT_VALIDITY = datetime.timedelta(days=3650)
_MIN_RSA_BITS = 2048
_CSR_CURVES = (ec.SECP256R1, ec.SECP384R1)


class CertificateAuthority(Protocol):
    async def create_certificate(self, csr_pem: bytes, validity: datetime.timedelta) -> list[bytes]:
        """Sign ``csr_pem``; return PEM leaf first, then intermediates, roots last.

        The last element may hold several concatenated PEM roots. Raises CAError.
        """
        ...


class FileCA:
    """Signs workload CSRs with a CA key held in memory (Istio's plugged-in CA files)."""

    def __init__(
        self,
        ca_cert_pem: bytes,
        ca_key_pem: bytes,
        cert_chain_pem: bytes,
        root_cert_pem: bytes,
        *,
        clock: Callable[[], datetime.datetime] = utcnow,
    ) -> None:
        self._clock = clock  # injectable so tests can move time for the CA and the cache together
        self._cert = _load_single_cert(ca_cert_pem, CA_CERT)
        self._key = _load_signing_key(ca_key_pem, self._cert)
        try:
            self._roots = tuple(load_pem_certs(root_cert_pem))
            chain = load_pem_certs(cert_chain_pem) if cert_chain_pem.strip() else []
        except ValueError as exc:
            raise CAError(f"{ROOT_CERT}/{CERT_CHAIN}: {exc}") from exc
        self._intermediates = _intermediates(self._cert, chain, self._roots)
        self._ca_not_after = min(c.not_valid_after_utc for c in (self._cert, *self._intermediates))
        self._roots_pem = certs_pem(self._roots)
        self.issued = 0  # leaves signed so far (tests count CSRs with it)

    @classmethod
    def load(cls, directory: Path | str) -> FileCA:
        """Read ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem from ``directory``.

        cert-chain.pem may be absent or empty when ca-cert.pem is the root itself.
        """
        d = Path(directory)
        try:
            chain = (d / CERT_CHAIN).read_bytes() if (d / CERT_CHAIN).exists() else b""
            return cls(
                (d / CA_CERT).read_bytes(),
                (d / CA_KEY).read_bytes(),
                chain,
                (d / ROOT_CERT).read_bytes(),
            )
        except OSError as exc:
            raise CAError(f"cannot read CA files in {d}: {exc}") from exc

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return self._roots

    @property
    def roots_pem(self) -> bytes:
        return self._roots_pem

    async def create_certificate(self, csr_pem: bytes, validity: datetime.timedelta) -> list[bytes]:
        # Signing one ECDSA leaf takes well under a millisecond: no thread needed.
        now = self._clock().replace(microsecond=0)
        return self.sign(csr_pem, not_before=now, not_after=min(now + validity, self._ca_not_after))

    def sign(
        self, csr_pem: bytes, *, not_before: datetime.datetime, not_after: datetime.datetime
    ) -> list[bytes]:
        """Sign with explicit validity, not clamped (a test hook: e.g. an expired leaf)."""
        if not_after <= not_before:
            raise CAError(f"validity ends ({not_after}) before it starts ({not_before})")
        csr, identity = _check_csr(csr_pem)
        leaf = self._leaf_builder(csr, identity, not_before, not_after).sign(
            self._key, hashes.SHA256()
        )
        self.issued += 1
        return [cert_pem(leaf), *(cert_pem(c) for c in self._intermediates), self._roots_pem]

    def _leaf_builder(
        self,
        csr: x509.CertificateSigningRequest,
        identity: Identity,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
    ) -> x509.CertificateBuilder:
        public_key = csr.public_key()
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))])
        eku = x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(san, critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(eku, critical=False)
            .add_extension(_authority_key_id(self._cert, self._key), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )


class FakeCA(FileCA):
    """An in-memory CA with a fresh root (FAKE_CA=true, tests, the demo)."""

    @classmethod
    def ephemeral(
        cls,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        clock: Callable[[], datetime.datetime] = utcnow,
    ) -> FakeCA:
        cert_pem_, key_pem = new_root(trust_domain)
        return cls(cert_pem_, key_pem, cert_pem_, cert_pem_, clock=clock)

    def workload_certificate(
        self,
        identity: Identity,
        validity: datetime.timedelta = datetime.timedelta(hours=24),
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> WorkloadCertificate:
        """Synchronously issue a certificate for ``identity`` (tests; custom times allowed)."""
        key, csr = new_csr(identity)
        start = not_before or self._clock().replace(microsecond=0)
        chain = self.sign(csr, not_before=start, not_after=not_after or start + validity)
        return WorkloadCertificate.from_chain(identity, key, chain)


def new_root(
    trust_domain: str = DEFAULT_TRUST_DOMAIN, validity: datetime.timedelta = ROOT_VALIDITY
) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 root CA: (certificate PEM, PKCS#8 key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "ztunnel-py root CA"),
        ]
    )
    now = utcnow().replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert_pem(cert), _key_pem(key)


def new_intermediate(
    parent_cert_pem: bytes,
    parent_key_pem: bytes,
    validity: datetime.timedelta = ROOT_VALIDITY / 2,
    *,
    name: str = "ztunnel-py intermediate CA",
) -> tuple[bytes, bytes]:
    """An ECDSA P-256 intermediate CA signed by the given CA: (certificate PEM, key PEM)."""
    parent = _load_single_cert(parent_cert_pem, "parent CA certificate")
    parent_key = _load_signing_key(parent_key_pem, parent)
    key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow().replace(microsecond=0)
    subject = x509.Name(
        [
            *parent.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(parent.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(min(now + validity, parent.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(parent, parent_key), critical=False)
        .sign(parent_key, hashes.SHA256())
    )
    return cert_pem(cert), _key_pem(key)


def init_ca_dir(
    directory: Path, *, trust_domain: str = DEFAULT_TRUST_DOMAIN, force: bool = False
) -> None:
    """Write a new root CA in Istio's plugged-in layout under ``directory``.

    ca-cert.pem = root-cert.pem = cert-chain.pem = the root; ca-key.pem is PKCS#8,
    mode 0600. Raises FileExistsError naming the files if any exists, unless ``force``.
    """
    existing = [name for name in CA_FILES if (directory / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{directory}: already holds {', '.join(existing)} (use --force)")
    directory.mkdir(parents=True, exist_ok=True)
    root, key = new_root(trust_domain)
    _write_file(directory / CA_KEY, key, 0o600)
    for name in (CA_CERT, ROOT_CERT, CERT_CHAIN):
        _write_file(directory / name, root, 0o644)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an overwritten file keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def _check_csr(csr_pem: bytes) -> tuple[x509.CertificateSigningRequest, Identity]:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CAError(f"CSR is not a valid PEM certificate request: {exc}") from exc
    if not csr.is_signature_valid:
        raise CAError("CSR signature does not verify")
    _check_csr_key(csr)
    uris = uri_sans(csr)
    if len(uris) != 1:
        raise CAError(f"CSR must carry exactly one URI SAN, found {len(uris)}")
    try:
        return csr, Identity.parse(uris[0])
    except InvalidIdentity as exc:
        raise CAError(f"CSR URI SAN is not a SPIFFE identity: {exc}") from exc


def _check_csr_key(csr: x509.CertificateSigningRequest) -> None:
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _CSR_CURVES):
        return
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS:
        return
    raise CAError(f"CSR key type not accepted: {type(key).__name__}")


def _load_single_cert(pem: bytes, name: str) -> x509.Certificate:
    try:
        certs = load_pem_certs(pem)
    except ValueError as exc:
        raise CAError(f"{name}: {exc}") from exc
    cert = certs[0]
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CAError(f"{name}: certificate is not a CA (BasicConstraints CA:true missing)")
    return cert


def _load_signing_key(pem: bytes, cert: x509.Certificate) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CAError(f"{CA_KEY}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"{CA_KEY}: unsupported key type {type(key).__name__}")
    if spki(key.public_key()) != spki(cert.public_key()):
        raise CAError(f"{CA_KEY} does not belong to {CA_CERT}")
    return key


def _intermediates(
    ca_cert: x509.Certificate,
    chain: list[x509.Certificate],
    roots: tuple[x509.Certificate, ...],
) -> tuple[x509.Certificate, ...]:
    """The certificates between a leaf and the roots: ca-cert and its chain, minus roots.

    Istio's cert-chain.pem may or may not end with the root; either works. The
    path must link up to one of the roots, or the CA's leaves would never verify.
    """
    root_ders = {c.public_bytes(serialization.Encoding.DER) for c in roots}

    def is_root(c: x509.Certificate) -> bool:
        return c.public_bytes(serialization.Encoding.DER) in root_ders or is_self_signed(c)

    path = [c for c in chain if not is_root(c)]
    if not is_root(ca_cert) and (not path or path[0] != ca_cert):
        path.insert(0, ca_cert)
    top = path[-1] if path else ca_cert
    for child, parent in itertools.pairwise(path):
        if not issued_by(child, parent):
            raise CAError(f"{CERT_CHAIN}: {child.subject} is not signed by {parent.subject}")
    if not any(issued_by(top, root) for root in roots):
        raise CAError(f"{ROOT_CERT}: no root signed {top.subject}")
    return tuple(path)


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_encipherment=True,
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_encipherment=False,
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(issuer: x509.Certificate, key: SigningKey) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
