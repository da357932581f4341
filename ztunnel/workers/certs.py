"""Certificates in worker processes: issued and rotated by the control process only.

The control process's ``SecretManager`` stays the one place that talks to the CA, caches
and renews. A worker asks it for an identity's certificate the first time it needs one
(``CertificateRequest`` -> ``CertificateReply``) and is pushed every later one
(``CertificateUpdate``), which its proxies take as a rotation (the pool retires
connections that present the old certificate), exactly as with the control's own
subscribers. Keys travel only over the private socketpair to the node's own processes.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.identity.errors import CAError, CertificateError
from ztunnel.identity.manager import CertCallback
from ztunnel.model.identity import Identity
from ztunnel.workers.protocol import CertificateMaterial

Ask = Callable[[Identity], Awaitable[CertificateMaterial]]


def material_of(cert: WorkloadCertificate) -> CertificateMaterial:
    return CertificateMaterial(cert.identity, cert.key_pem(), cert.chain_pem(), cert.roots_pem())


def certificate_of(material: CertificateMaterial) -> WorkloadCertificate:
    """Rebuild (and check, as when the CA answered) a certificate; raises CertificateError."""
    try:
        key = serialization.load_pem_private_key(material.key_pem, password=None)
    except ValueError as exc:
        raise CertificateError(f"unusable key for {material.identity}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(f"unsupported key type for {material.identity}")
    return WorkloadCertificate.from_chain(
        material.identity, key, [material.chain_pem, material.roots_pem]
    )


class RemoteCertificates:
    """A worker's certificate source (``fetch`` / ``subscribe``, as ``SecretManager``)."""

    def __init__(self, ask: Ask, clock: Callable[[], datetime.datetime] | None = None) -> None:
        self._ask = ask
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self._certs: dict[Identity, WorkloadCertificate] = {}
        self._asking: dict[Identity, trio.Event] = {}
        self._subscribers: list[CertCallback] = []

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        """The current certificate; raises CAError or CertificateError as issuance would."""
        while True:
            cert = self._certs.get(identity)
            if cert is not None and cert.is_valid_at(self._clock()):
                return cert
            asking = self._asking.get(identity)
            if asking is None:
                return await self._fetch_from_control(identity)
            await asking.wait()  # someone else asked: use their answer (or ask again)

    async def _fetch_from_control(self, identity: Identity) -> WorkloadCertificate:
        done = self._asking[identity] = trio.Event()
        try:
            return self.update(await self._ask(identity))
        finally:
            del self._asking[identity]
            done.set()

    def update(self, material: CertificateMaterial) -> WorkloadCertificate:
        """Take a certificate the control process sent; subscribers hear of a new one."""
        held = self._certs.get(material.identity)
        cert = certificate_of(material)
        if held is not None and (held.serial == cert.serial or held.not_before > cert.not_before):
            return held  # the same, or older than what we hold (a push overtook a reply)
        self._certs[material.identity] = cert
        for callback in list(self._subscribers):
            callback(material.identity, cert)
        return cert

    def forget(self, identity: Identity) -> None:
        self._certs.pop(identity, None)

    def subscribe(self, callback: CertCallback) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def held(self) -> list[Identity]:
        return sorted(self._certs)


def ask_error(identity: Identity, error: str) -> CAError:
    return CAError(error or f"certificate for {identity} not issued")
