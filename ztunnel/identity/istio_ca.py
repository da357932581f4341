"""The Istio CA client: ``IstioCertificateService/CreateCertificate`` behind our CA seam.

Plugs into ``SecretManager`` exactly like ``FileCA`` ("CSR in, chain out"), so the
cache, single flight, half-life refresh and backoff are the manager's. What this adds
is ztunnel's wire behaviour (reference §7, ZT src/identity/caclient.rs):

- gRPC over TLS to ``CA_ADDRESS``, the server verified with the roots in ``CA_ROOT_CA``
  against the address's host or ``ALT_CA_HOSTNAME``; the root file is re-read when it
  changes (root rotation), so the next call uses the new roots;
- ``authorization: Bearer <token>`` re-read from ``AUTH_TOKEN`` on every call (projected
  tokens rotate), ``clusterid: <CLUSTER_ID>``, and every ``CA_HEADER_<NAME>`` as ``<name>``;
- in shared (in-pod) mode, ``metadata = {"ImpersonatedIdentity": <spiffe id>}``: the
  node agent asks for its pods' identities with its own token;
- ``validity_duration = SECRET_TTL`` seconds;
- the leaf's SPIFFE identity must be the one requested, or the answer is rejected.

Each call opens its own connection: certificates are requested rarely (per identity,
at half-life), so nothing is gained from a kept-open channel and nothing can go stale.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from google.protobuf.message import DecodeError

from ztunnel.config import SYSTEM_ROOTS, Config
from ztunnel.errors import ConfigError, InvalidIdentity
from ztunnel.grpc.client import ChannelOptions, Target, connect
from ztunnel.grpc.credentials import CredentialError, RootsFile, token_metadata
from ztunnel.grpc.status import GrpcError, StatusCode
from ztunnel.identity._x509 import load_pem_certs, spiffe_identities, uri_sans
from ztunnel.identity.errors import CAError, CertificateError
from ztunnel.model.identity import DEFAULT_CLUSTER_ID, Identity
from ztunnel.proto import citadel_pb2

CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
DEFAULT_TIME_LIMIT = 30.0


class CARequestError(CAError):
    """The CA answered with a gRPC error status (kept, so callers can tell refusals apart)."""

    def __init__(self, code: StatusCode, message: str) -> None:
        self.code = code
        super().__init__(f"CA refused: {code.name}: {message}")


@dataclass(frozen=True, slots=True)
class IstioCAConfig:
    address: str  # CA_ADDRESS, e.g. https://istiod.istio-system.svc:15012
    root_cert: Path | None = None  # CA_ROOT_CA; None = the system roots
    alt_hostname: str | None = None  # ALT_CA_HOSTNAME
    token_path: Path | None = None  # AUTH_TOKEN; None = send no credentials
    cluster_id: str = DEFAULT_CLUSTER_ID
    headers: tuple[tuple[str, str], ...] = ()  # CA_HEADER_*
    impersonate: bool = True  # shared (in-pod) mode
    time_limit: float = DEFAULT_TIME_LIMIT
    options: ChannelOptions = field(default_factory=ChannelOptions)

    def target(self) -> Target:
        try:
            return Target.parse(self.address)
        except ValueError as exc:
            raise ConfigError("CA_ADDRESS", "", str(exc)) from exc


class IstioCAClient:
    """A ``CertificateAuthority`` that asks Istio's CA (istiod, or ``ztunnel ca serve``)."""

    def __init__(self, config: IstioCAConfig) -> None:
        self.config = config
        self._target = config.target()
        self._roots = RootsFile(config.root_cert)
        self.requests = 0  # calls made (tests count CSRs with it)
        self.failures = 0
        self.last_error: str | None = None

    async def create_certificate(self, csr_pem: bytes, validity: datetime.timedelta) -> list[bytes]:
        identity = _csr_identity(csr_pem)
        request = citadel_pb2.IstioCertificateRequest(
            csr=csr_pem.decode("ascii"), validity_duration=int(validity.total_seconds())
        )
        if self.config.impersonate:
            request.metadata.fields[IMPERSONATED_IDENTITY].string_value = str(identity)
        metadata, context = await self._credentials()
        self.requests += 1
        try:
            async with connect(
                self._target,
                ssl_context=context,
                verify_names=self._names(),
                options=self.config.options,
            ) as conn:
                raw = await conn.unary(
                    CREATE_CERTIFICATE,
                    request.SerializeToString(),
                    metadata=metadata,
                    time_limit=self.config.time_limit,
                )
        except GrpcError as exc:
            self._failed(exc)
            raise CARequestError(exc.code, exc.message) from exc
        try:
            return _chain(identity, raw)
        except (CAError, CertificateError) as exc:
            self._failed(exc)
            raise

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.last_error = str(exc)

    def dump(self) -> dict[str, object]:
        """The client's state for config_dump."""
        return {
            "address": str(self._target),
            "impersonate": self.config.impersonate,
            "requests": self.requests,
            "failures": self.failures,
            "lastError": self.last_error,
        }

    def _names(self) -> Sequence[str]:
        alt = self.config.alt_hostname
        return (self._target.host, alt) if alt else (self._target.host,)

    async def _credentials(self) -> tuple[list[tuple[str, str]], ssl.SSLContext | None]:
        try:
            metadata = await token_metadata(self.config.token_path, self.config.cluster_id)
            context = await self._roots.context() if self._target.tls else None
        except CredentialError as exc:
            self._failed(exc)
            raise CAError(str(exc)) from exc
        return [*metadata, *self.config.headers], context


def _csr_identity(csr_pem: bytes) -> Identity:
    try:
        uris = uri_sans(x509.load_pem_x509_csr(csr_pem))
        if len(uris) != 1:
            raise CAError(f"CSR must carry exactly one URI SAN, found {len(uris)}")
        return Identity.parse(uris[0])
    except (ValueError, InvalidIdentity) as exc:
        raise CAError(f"not a workload CSR: {exc}") from exc


def _chain(identity: Identity, raw: bytes) -> list[bytes]:
    try:
        response = citadel_pb2.IstioCertificateResponse.FromString(raw)
    except DecodeError as exc:
        raise CAError(f"CA answer for {identity} is not an IstioCertificateResponse") from exc
    chain = [pem.encode("utf-8") for pem in response.cert_chain]
    if not chain:
        raise CAError(f"CA returned an empty chain for {identity}")
    try:
        leaf = load_pem_certs(chain[0])[0]
    except ValueError as exc:
        raise CertificateError(f"CA returned an unparsable leaf for {identity}: {exc}") from exc
    found = next(spiffe_identities(leaf), None)
    if found != identity:
        raise CertificateError(
            f"CA returned a certificate for {found}, but {identity} was requested"
        )
    return chain


def ca_config(config: Config, address: str, *, shared: bool) -> IstioCAConfig:
    """The client's settings from the agent's (CA_ROOT_CA, ALT_CA_HOSTNAME, AUTH_TOKEN,
    CLUSTER_ID, CA_HEADER_*); ``address`` is ``Config.ca_target``. ``shared`` (in-pod
    mode) asks for pods' identities with ImpersonatedIdentity."""
    root = config.ca_root_ca
    return IstioCAConfig(
        address=address,
        root_cert=None if root == SYSTEM_ROOTS else Path(root),
        alt_hostname=config.alt_ca_hostname,
        token_path=Path(config.auth_token),
        cluster_id=config.cluster_id,
        headers=config.ca_headers,
        impersonate=shared,
    )
