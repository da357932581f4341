"""Workload certificates: the CSR we send and the chain the CA sends back.

A ``WorkloadCertificate`` is one SPIFFE identity's key, leaf, intermediates and
trust bundle. Like ztunnel's, it carries its *own* roots (every root in the
bundle the CA returned), used both to verify peers and to serve, so a root
rotation reaches the TLS layer together with the certificate that needs it.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztunnel.identity._x509 import (
    SigningKey,
    certs_pem,
    issued_by,
    load_pem_certs,
    spiffe_identities,
    spki,
)
from ztunnel.identity.errors import CertificateError
from ztunnel.model.identity import Identity


def new_csr(identity: Identity) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh ECDSA P-256 key and a CSR for ``identity`` (PEM).

    As ztunnel's: empty subject, a single URI SAN (critical, as RFC 5280 requires
    when the subject is empty), SHA-256 signature. A new key per request means a
    rotation never reuses a key.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(san, critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


# eq=False: certificates are compared (and cached against) by object identity;
# weakref_slot lets the TLS layer cache one context per certificate without keeping it alive.
@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class WorkloadCertificate:
    identity: Identity
    private_key: SigningKey
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # intermediates, leaf-side first; no leaf, no roots
    roots: tuple[x509.Certificate, ...]  # every root of the bundle; all are trusted

    @classmethod
    def from_chain(
        cls, identity: Identity, private_key: SigningKey, chain_pem: Sequence[bytes]
    ) -> WorkloadCertificate:
        """Build from the CA's answer: leaf first, intermediates, roots last.

        The last element may hold several concatenated roots. Raises
        CertificateError if the chain is malformed, is not for ``identity``, does
        not match ``private_key``, or does not link up to one of its roots.
        """
        if len(chain_pem) < 2:
            raise CertificateError(
                f"CA returned {len(chain_pem)} PEM element(s) for {identity}; "
                "expected the leaf and at least the root"
            )
        try:
            issued = [c for pem in chain_pem[:-1] for c in load_pem_certs(pem)]
            roots = load_pem_certs(chain_pem[-1])
        except ValueError as exc:
            raise CertificateError(
                f"CA returned an unparsable chain for {identity}: {exc}"
            ) from exc
        cert = cls(identity, private_key, issued[0], tuple(issued[1:]), tuple(roots))
        cert._validate()
        return cert

    def _validate(self) -> None:
        found = next(spiffe_identities(self.leaf), None)
        if found != self.identity:
            raise CertificateError(
                f"CA returned a certificate for {found}, but {self.identity} was requested"
            )
        if spki(self.leaf.public_key()) != spki(self.private_key.public_key()):
            raise CertificateError(f"certificate for {self.identity} does not match its key")
        self._validate_links()

    def _validate_links(self) -> None:
        path = [self.leaf, *self.chain]
        for child, parent in itertools.pairwise(path):
            if not issued_by(child, parent):
                raise CertificateError(f"chain for {self.identity} is broken at {child.issuer}")
        if not any(issued_by(path[-1], root) for root in self.roots):
            raise CertificateError(f"chain for {self.identity} does not end at a returned root")

    @property
    def not_before(self) -> datetime.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def refresh_at(self) -> datetime.datetime:
        """Half-life, when ztunnel renews: not_before + (not_after - not_before) / 2."""
        return self.not_before + (self.not_after - self.not_before) / 2

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    def is_valid_at(self, now: datetime.datetime) -> bool:
        return self.not_before <= now < self.not_after

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (ztunnel's storage format)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def leaf_pem(self) -> bytes:
        return certs_pem([self.leaf])

    def chain_pem(self) -> bytes:
        """What a TLS endpoint presents: the leaf then its intermediates."""
        return certs_pem([self.leaf, *self.chain])

    def roots_pem(self) -> bytes:
        return certs_pem(self.roots)
