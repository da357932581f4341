"""``ztunnel ca serve``: Istio's ``IstioCertificateService`` as a server, so nodes hold no CA key.

A Deployment next to the DaemonSet runs it (the simulated cluster runs it beside the
agents). Every request is checked before anything is signed, as istiod checks ztunnel:

1. the caller's bearer token is authenticated (``Authenticator``: a static token file in
   the simulated cluster, Kubernetes TokenReview in a cluster) into a ``Caller`` — the
   identity the token belongs to and the node it runs on;
2. the CSR names exactly one SPIFFE identity;
3. with ``ImpersonatedIdentity`` metadata (a node agent in shared mode): the caller must
   be a trusted node agent account, the impersonated identity must equal the CSR's, and
   a pod with that identity must be scheduled on the caller's node (``PodsOnNode``);
   without it, the CSR must be for the caller's own identity;
4. the requested validity is capped (``max_ttl``).

Every refusal is logged with its reason and counted in
``ztunnel_ca_refusals_total{reason}``; every issued certificate in
``ztunnel_ca_certificates_issued_total``.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import ssl
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog
import trio
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter

from ztunnel.errors import ConfigError, InvalidIdentity
from ztunnel.grpc.server import GrpcServer, ServerContext
from ztunnel.grpc.status import GrpcError, StatusCode
from ztunnel.identity._x509 import cert_pem, is_self_signed, load_pem_certs, uri_sans, utcnow
from ztunnel.identity.ca import CA_CERT, CA_KEY, CERT_CHAIN, CertificateAuthority, FileCA
from ztunnel.identity.errors import CAError
from ztunnel.identity.istio_ca import CREATE_CERTIFICATE, IMPERSONATED_IDENTITY
from ztunnel.model.identity import Identity
from ztunnel.proto import citadel_pb2

LOGGER = structlog.get_logger("ztunnel.ca")

DEFAULT_MAX_TTL = datetime.timedelta(hours=24)
DEFAULT_TTL = datetime.timedelta(hours=24)
CA_PORT = 15012  # istiod's
MAX_REQUEST = 64 * 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """Who called, as the token says: their own identity and the node they run on."""

    identity: Identity
    node: str


class AuthError(Exception):
    """A token could not be authenticated (the message says why; never the token)."""


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Caller:
        """The caller a bearer token belongs to; raises AuthError."""
        ...


# "Which identities have a pod scheduled on node N" (the Kubernetes pod list, or the
# simulated cluster file).
PodsOnNode = Callable[[str], Collection[Identity]]


class StaticTokens:
    """Tokens from a file (the simulated cluster): ``{tokens: [{token, node, identity}]}``.

    The file is re-read when it changes, so a test or the demo can add a node's token
    while the server runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._tokens: dict[str, Caller] = {}

    @staticmethod
    def parse(text: str, source: str) -> dict[str, Caller]:
        doc = yaml.safe_load(text) or {}
        entries = doc.get("tokens") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise ConfigError(source, "tokens", "expected a list of {token, node, identity}")
        out: dict[str, Caller] = {}
        for i, entry in enumerate(entries):
            where = f"tokens[{i}]"
            if not isinstance(entry, dict) or not all(
                isinstance(entry.get(k), str) and entry.get(k)
                for k in ("token", "node", "identity")
            ):
                raise ConfigError(source, where, "needs string token, node and identity")
            try:
                identity = Identity.parse(entry["identity"])
            except InvalidIdentity as exc:
                raise ConfigError(source, f"{where}.identity", str(exc)) from exc
            out[entry["token"]] = Caller(identity, entry["node"])
        return out

    def _load(self) -> dict[str, Caller]:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._tokens = self.parse(self.path.read_text(encoding="utf-8"), str(self.path))
            self._stamp = stamp
        return self._tokens

    async def authenticate(self, token: str) -> Caller:
        try:
            tokens = await trio.to_thread.run_sync(self._load)
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError) as exc:
            raise AuthError(f"token file {self.path} unusable: {exc}") from exc
        for known, caller in tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return caller
        raise AuthError("unknown token")


@dataclass(frozen=True, slots=True)
class TokenReviewResult:
    """The parts of a Kubernetes TokenReview status the CA needs."""

    authenticated: bool
    username: str = ""  # system:serviceaccount:<ns>:<sa>
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    error: str = ""


class TokenReviewer(Protocol):
    """POSTs a TokenReview (authentication.k8s.io/v1) for ``token``; the in-cluster HTTP
    client belongs to the Kubernetes source (phase 2), tests use a fake."""

    async def review(self, token: str, audiences: tuple[str, ...]) -> TokenReviewResult: ...


NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"


class TokenReviewAuthenticator:
    """Kubernetes service-account tokens, checked by the API server.

    The caller's node comes from the token's node binding (``node-name`` extra, bound
    tokens since Kubernetes 1.30), else from the pod it is bound to (``pod-name`` extra)
    through ``node_of_pod``. A token bound to neither cannot prove a node: refused.
    """

    def __init__(
        self,
        reviewer: TokenReviewer,
        *,
        trust_domain: str,
        audiences: tuple[str, ...] = ("istio-ca",),
        node_of_pod: Callable[[str, str], str | None] = lambda ns, name: None,
    ) -> None:
        self.reviewer = reviewer
        self.trust_domain = trust_domain
        self.audiences = audiences
        self.node_of_pod = node_of_pod

    async def authenticate(self, token: str) -> Caller:
        result = await self.reviewer.review(token, self.audiences)
        if not result.authenticated:
            raise AuthError(f"token review: not authenticated {result.error}".strip())
        parts = result.username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or not all(parts[2:]):
            raise AuthError(f"token review: {result.username!r} is not a service account")
        identity = Identity(self.trust_domain, parts[2], parts[3])
        extra = result.extra
        node = next(iter(extra.get(NODE_NAME_EXTRA, ())), "")
        if not node:
            pod = next(iter(extra.get(POD_NAME_EXTRA, ())), "")
            node = (self.node_of_pod(parts[2], pod) or "") if pod else ""
        if not node:
            raise AuthError("token review: token is not bound to a node or a pod on a node")
        return Caller(identity, node)


class CAService:
    """The checks and the signing of one CreateCertificate call (transport-free)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        authenticator: Authenticator,
        pods_on_node: PodsOnNode,
        *,
        trusted_node_agents: Collection[Identity],
        max_ttl: datetime.timedelta = DEFAULT_MAX_TTL,
        default_ttl: datetime.timedelta = DEFAULT_TTL,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.ca = ca
        self.authenticator = authenticator
        self.pods_on_node = pods_on_node
        self.trusted_node_agents = frozenset(trusted_node_agents)
        self.max_ttl = max_ttl
        self.default_ttl = default_ttl
        self.registry = registry or CollectorRegistry()
        self.refusals = Counter(
            "ztunnel_ca_refusals",
            "Certificate requests the CA refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.issued = Counter(
            "ztunnel_ca_certificates_issued",
            "Certificates the CA signed",
            registry=self.registry,
        )

    async def create_certificate(self, raw: bytes, ctx: ServerContext) -> bytes:
        """The gRPC handler: request bytes in, response bytes out; GrpcError on refusal."""
        caller = await self._authenticate(ctx)
        try:
            request = citadel_pb2.IstioCertificateRequest.FromString(raw)
        except DecodeError as exc:
            raise self._refuse("bad_request", StatusCode.INVALID_ARGUMENT, str(exc), ctx) from exc
        wanted = self._csr_identity(request.csr, ctx)
        self._authorize(caller, wanted, _impersonated(request), ctx)
        validity = self._validity(request.validity_duration, ctx)
        try:
            chain = await self.ca.create_certificate(request.csr.encode("ascii"), validity)
        except CAError as exc:
            raise self._refuse("bad_csr", StatusCode.INVALID_ARGUMENT, str(exc), ctx) from exc
        self.issued.inc()
        LOGGER.info(
            "certificate issued",
            identity=str(wanted),
            caller=str(caller.identity),
            node=caller.node,
            ttl_seconds=int(validity.total_seconds()),
        )
        response = citadel_pb2.IstioCertificateResponse(cert_chain=[c.decode() for c in chain])
        return response.SerializeToString()

    async def _authenticate(self, ctx: ServerContext) -> Caller:
        header = ctx.header("authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise self._refuse("no_token", StatusCode.UNAUTHENTICATED, "no bearer token", ctx)
        try:
            return await self.authenticator.authenticate(token.strip())
        except AuthError as exc:
            raise self._refuse("bad_token", StatusCode.UNAUTHENTICATED, str(exc), ctx) from exc

    def _csr_identity(self, csr_pem: str, ctx: ServerContext) -> Identity:
        try:
            uris = uri_sans(x509.load_pem_x509_csr(csr_pem.encode("ascii")))
            if len(uris) == 1:
                return Identity.parse(uris[0])
            problem = f"CSR must carry exactly one URI SAN, found {len(uris)}"
        except (ValueError, UnicodeEncodeError) as exc:
            problem = f"CSR unusable: {exc}"
        raise self._refuse("bad_csr", StatusCode.INVALID_ARGUMENT, problem, ctx)

    def _authorize(
        self, caller: Caller, wanted: Identity, impersonated: str | None, ctx: ServerContext
    ) -> None:
        if impersonated is None:
            if wanted != caller.identity:
                raise self._refuse(
                    "identity_mismatch",
                    StatusCode.PERMISSION_DENIED,
                    f"{caller.identity} may not request a certificate for {wanted}",
                    ctx,
                )
            return
        if caller.identity not in self.trusted_node_agents:
            raise self._refuse(
                "impersonation_not_allowed",
                StatusCode.PERMISSION_DENIED,
                f"{caller.identity} is not a trusted node agent and may not impersonate",
                ctx,
            )
        if impersonated != str(wanted):
            raise self._refuse(
                "identity_mismatch",
                StatusCode.PERMISSION_DENIED,
                f"ImpersonatedIdentity {impersonated} differs from the CSR's {wanted}",
                ctx,
            )
        if wanted not in self.pods_on_node(caller.node):
            raise self._refuse(
                "not_on_node",
                StatusCode.PERMISSION_DENIED,
                f"no pod with identity {wanted} is scheduled on node {caller.node}",
                ctx,
            )

    def _validity(self, seconds: int, ctx: ServerContext) -> datetime.timedelta:
        if seconds < 0:
            raise self._refuse(
                "bad_request", StatusCode.INVALID_ARGUMENT, "negative validity_duration", ctx
            )
        wanted = datetime.timedelta(seconds=seconds) if seconds else self.default_ttl
        return min(wanted, self.max_ttl)

    def _refuse(self, reason: str, code: StatusCode, message: str, ctx: ServerContext) -> GrpcError:
        self.refusals.labels(reason).inc()
        LOGGER.warning(
            "certificate request refused", peer=str(ctx.peer), reason=reason, message=message
        )
        return GrpcError(code, message)

    def server(self, ssl_context: ssl.SSLContext | None = None) -> GrpcServer:
        """A gRPC server carrying this service."""
        # A CSR request is about 1 KiB: a small limit bounds what a caller can make us hold.
        return GrpcServer(
            {CREATE_CERTIFICATE: self.create_certificate},
            ssl_context=ssl_context,
            max_message=MAX_REQUEST,
        )


def _impersonated(request: citadel_pb2.IstioCertificateRequest) -> str | None:
    if not request.HasField("metadata"):
        return None
    value = request.metadata.fields.get(IMPERSONATED_IDENTITY)
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    return value.string_value


async def serve(
    service: CAService,
    *,
    port: int = CA_PORT,
    host: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve IstioCertificateService on ``host:port`` until cancelled; reports the listeners."""
    await service.server(ssl_context).serve_tcp(port, host, task_status=task_status)


def default_trusted_agents(
    trust_domain: str, env: Mapping[str, str] | None = None
) -> set[Identity]:
    """istiod's CA_TRUSTED_NODE_ACCOUNTS (``ns/sa,ns/sa``), default istio-system/ztunnel."""
    env = os.environ if env is None else env
    raw = env.get("CA_TRUSTED_NODE_ACCOUNTS", "istio-system/ztunnel")
    out = set()
    for item in filter(None, (s.strip() for s in raw.split(","))):
        ns, _, sa = item.partition("/")
        if not ns or not sa:
            raise ConfigError("environment", "CA_TRUSTED_NODE_ACCOUNTS", f"bad entry {item!r}")
        out.add(Identity(trust_domain, ns, sa))
    return out


# --- CA material --------------------------------------------------------------------------

TLS_CERT, TLS_KEY, TLS_CA = "tls.crt", "tls.key", "ca.crt"


def load_ca_dir(directory: Path) -> FileCA:
    """The signing CA from ``ztunnel ca init``'s directory or a mounted Secret.

    Istio's plugged-in layout (``cacerts``: ca-cert.pem, ca-key.pem, root-cert.pem,
    cert-chain.pem; the ``ca init`` output) or a ``kubernetes.io/tls`` Secret
    (tls.crt, tls.key, ca.crt = the root; cert-manager's CA issuers write these).
    """
    if (directory / CA_KEY).exists():
        return FileCA.load(directory)
    if (directory / TLS_KEY).exists():
        try:
            cert = (directory / TLS_CERT).read_bytes()
            key = (directory / TLS_KEY).read_bytes()
            root_path = directory / TLS_CA
            root = root_path.read_bytes() if root_path.exists() else cert
        except OSError as exc:
            raise CAError(f"cannot read CA files in {directory}: {exc}") from exc
        return FileCA(cert, key, cert, root)
    raise CAError(f"{directory}: neither {CA_KEY} (Istio cacerts / ca init) nor {TLS_KEY} found")


def serving_certificate(
    directory: Path,
    dns_names: Collection[str],
    ips: Collection[str] = (),
    validity: datetime.timedelta = datetime.timedelta(days=365),
) -> tuple[bytes, bytes]:
    """A TLS server certificate for the CA service itself, signed by the CA key in
    ``directory`` (so clients verify it with CA_ROOT_CA = root-cert.pem, as istiod's):
    (chain PEM, PKCS#8 key PEM)."""
    if (directory / CA_KEY).exists():
        names = (CA_CERT, CA_KEY, CERT_CHAIN)
    else:
        names = (TLS_CERT, TLS_KEY, TLS_CERT)
    try:
        ca_cert_pem, ca_key_pem, chain_pem = ((directory / n).read_bytes() for n in names)
    except OSError as exc:
        raise CAError(f"cannot read CA files in {directory}: {exc}") from exc
    issuer = x509.load_pem_x509_certificate(ca_cert_pem)
    issuer_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(issuer_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"{directory}: unsupported CA key type")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    now = utcnow().replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + validity, issuer.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    intermediates = [c for c in load_pem_certs(chain_pem) if not is_self_signed(c)]
    chain = cert_pem(cert) + b"".join(cert_pem(c) for c in intermediates if c != cert)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key_pem
