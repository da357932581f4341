"""TLS contexts for HBONE and the peer identity checks done after the handshake.

Theory of operation: both sides speak TLS 1.3 only, ALPN ``h2``, and require a
certificate from the peer, verified against the *local* certificate's roots
(every root in its bundle). Names are not checked by OpenSSL (there is no SNI
and no hostname); instead, once the handshake completes, the caller reads the
peer's DER leaf and applies ztunnel's rules: a client checks that a URI SAN is
exactly one of the expected identities, a server checks the client's trust
domain. RBAC later uses the *first* SPIFFE SAN (``peer_identity``).

Python's ``ssl`` loads keys only from files, so the key and chain go through a
0600 temp file (on tmpfs when there is one) that is unlinked right after
loading. Contexts are cached per WorkloadCertificate: one context per connection
would double memory, and a rotated certificate is a new object, so it gets
fresh contexts while connections on the old one keep theirs.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import threading
import weakref
from collections.abc import Collection

from cryptography import x509

from ztunnel.identity._x509 import spiffe_identities
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.identity.errors import TLSIdentityError
from ztunnel.model.identity import Identity

ALPN_H2 = "h2"
_TMPFS = "/dev/shm"

_lock = threading.Lock()
_server_cache: weakref.WeakKeyDictionary[WorkloadCertificate, ssl.SSLContext] = (
    weakref.WeakKeyDictionary()
)
_client_cache: weakref.WeakKeyDictionary[WorkloadCertificate, ssl.SSLContext] = (
    weakref.WeakKeyDictionary()
)


def server_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """The (cached) server-side mTLS context presenting ``cert``; clients must present one too."""
    return _cached(_server_cache, cert, ssl.PROTOCOL_TLS_SERVER)


def client_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """The (cached) client-side mTLS context presenting ``cert``.

    Wrap sockets with ``server_hostname=None``: ztunnel sends no SNI.
    """
    return _cached(_client_cache, cert, ssl.PROTOCOL_TLS_CLIENT)


def _cached(
    cache: weakref.WeakKeyDictionary[WorkloadCertificate, ssl.SSLContext],
    cert: WorkloadCertificate,
    protocol: ssl._SSLMethod,
) -> ssl.SSLContext:
    with _lock:
        ctx = cache.get(cert)
        if ctx is None:
            ctx = cache[cert] = _build(cert, protocol)
        return ctx


def _build(cert: WorkloadCertificate, protocol: ssl._SSLMethod) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identities are checked on SANs after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN_H2])
    if protocol == ssl.PROTOCOL_TLS_SERVER:
        ctx.num_tickets = 0  # ztunnel clients never resume; tickets are wasted bytes
    ctx.load_verify_locations(cadata=cert.roots_pem().decode("ascii"))
    _load_key_and_chain(ctx, cert)
    return ctx


def _load_key_and_chain(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    tmpdir = _TMPFS if os.access(_TMPFS, os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="ztunnel-key-", suffix=".pem", dir=tmpdir)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cert.key_pem() + cert.chain_pem())
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


def peer_identity(der: bytes) -> Identity:
    """The first SPIFFE URI SAN of a peer certificate (what RBAC matches on).

    Raises TLSIdentityError if the certificate is unparsable or has none.
    """
    for identity in _identities(der):
        return identity
    raise TLSIdentityError("peer certificate has no SPIFFE URI SAN")


def verify_server_identity(der: bytes, expected: Collection[Identity]) -> Identity:
    """Client side: a URI SAN of the server must equal one expected identity; returns it."""
    for identity in _identities(der):
        if identity in expected:
            return identity
    want = ", ".join(sorted(str(i) for i in expected)) or "<none>"
    raise TLSIdentityError(f"server certificate identity is not one of: {want}")


def verify_client_trust_domain(der: bytes, own_trust_domain: str) -> Identity:
    """Server side: the client must have a SPIFFE SAN in our trust domain; returns it."""
    for identity in _identities(der):
        if identity.trust_domain == own_trust_domain:
            return identity
    raise TLSIdentityError(f"client certificate is not in trust domain {own_trust_domain!r}")


def _identities(der: bytes) -> list[Identity]:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise TLSIdentityError(f"peer certificate is not valid DER: {exc}") from exc
    return list(spiffe_identities(cert))
