"""``ca serve`` building blocks: the IstioCertificateService server with its checks —
called by a grpcio client (an independent peer) and by our own Istio CA client through
the SecretManager (an agent that holds no CA key)."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from cryptography import x509

from tests.grpc_peers import ServerTLS, grpcio_channel
from ztunnel.grpc.server import ServerContext
from ztunnel.grpc.status import GrpcError, StatusCode
from ztunnel.grpc.tls import server_context
from ztunnel.identity.ca import ROOT_CERT, FileCA, init_ca_dir, new_root
from ztunnel.identity.ca_server import (
    NODE_NAME_EXTRA,
    POD_NAME_EXTRA,
    AuthError,
    Caller,
    CAService,
    StaticTokens,
    TokenReviewAuthenticator,
    TokenReviewResult,
    default_trusted_agents,
    load_ca_dir,
    serve,
    serving_certificate,
)
from ztunnel.identity.certificate import new_csr
from ztunnel.identity.errors import CAError
from ztunnel.identity.istio_ca import CREATE_CERTIFICATE, IstioCAClient, IstioCAConfig
from ztunnel.identity.manager import SecretManager
from ztunnel.model.identity import Identity
from ztunnel.proto import citadel_pb2

TD = "cluster.local"
ZTUNNEL = Identity(TD, "istio-system", "ztunnel")
ECHO = Identity(TD, "default", "echo")  # runs on node1
SLEEP = Identity(TD, "default", "sleep")  # runs on node2
PODS = {"node1": {ECHO}, "node2": {SLEEP}}
TOKENS = """
tokens:
  - {token: node1-token, node: node1, identity: "spiffe://cluster.local/ns/istio-system/sa/ztunnel"}
  - {token: node2-token, node: node2, identity: "spiffe://cluster.local/ns/istio-system/sa/ztunnel"}
  - {token: echo-token, node: node1, identity: "spiffe://cluster.local/ns/default/sa/echo"}
"""


@dataclass
class Running:
    port: int
    service: CAService
    ca_dir: Path
    tls: ServerTLS

    def refusals(self, reason: str) -> float:
        value = self.service.registry.get_sample_value(
            "ztunnel_ca_refusals_total", {"reason": reason}
        )
        return value or 0.0


def _pods_on_node(node: str) -> Collection[Identity]:
    return PODS.get(node, set())


@pytest.fixture
async def ca_server(tmp_path: Path) -> AsyncIterator[Running]:
    ca_dir = tmp_path / "ca"
    init_ca_dir(ca_dir)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(TOKENS)
    service = CAService(
        load_ca_dir(ca_dir),
        StaticTokens(tokens),
        _pods_on_node,
        trusted_node_agents=default_trusted_agents(TD, {}),
        max_ttl=datetime.timedelta(hours=1),
    )
    chain, key = serving_certificate(ca_dir, ["istiod.istio-system.svc"], ["127.0.0.1"])
    (tmp_path / "serve.pem").write_bytes(chain)
    (tmp_path / "serve.key").write_bytes(key)
    ctx = server_context(str(tmp_path / "serve.pem"), str(tmp_path / "serve.key"))
    root = (ca_dir / ROOT_CERT).read_bytes()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: serve(
                service, port=0, host="127.0.0.1", ssl_context=ctx, task_status=task_status
            )
        )
        port = listeners[0].socket.getsockname()[1]
        yield Running(port, service, ca_dir, ServerTLS(root, chain, key))
        nursery.cancel_scope.cancel()


def _request(identity: Identity, impersonate: Identity | None, ttl: int = 60) -> bytes:
    request = citadel_pb2.IstioCertificateRequest(csr=new_csr(identity)[1].decode(),
                                                  validity_duration=ttl)  # fmt: skip
    if impersonate is not None:
        request.metadata.fields["ImpersonatedIdentity"].string_value = str(impersonate)
    return request.SerializeToString()


async def _grpcio_call(running: Running, raw: bytes, token: str | None) -> Any:
    def call() -> Any:
        metadata = [("authorization", f"Bearer {token}")] if token else []
        with grpcio_channel(running.port, running.tls, name="istiod.istio-system.svc") as ch:
            try:
                answer = ch.unary_unary(CREATE_CERTIFICATE)(raw, metadata=metadata, timeout=10)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
            return citadel_pb2.IstioCertificateResponse.FromString(answer)

    return await trio.to_thread.run_sync(call)


async def test_node_agent_gets_a_pod_of_its_node(ca_server: Running) -> None:
    answer = await _grpcio_call(ca_server, _request(ECHO, ECHO, ttl=7200), "node1-token")
    assert isinstance(answer, citadel_pb2.IstioCertificateResponse)
    leaf = x509.load_pem_x509_certificate(answer.cert_chain[0].encode())
    uri = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uri.get_values_for_type(x509.UniformResourceIdentifier) == [str(ECHO)]
    # the requested 2 h are capped at max_ttl (1 h)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == datetime.timedelta(hours=1)
    assert answer.cert_chain[-1].encode() == (ca_server.ca_dir / ROOT_CERT).read_bytes()


async def test_impersonating_a_pod_of_another_node_is_refused(ca_server: Running) -> None:
    answer = await _grpcio_call(ca_server, _request(SLEEP, SLEEP), "node1-token")
    assert answer[0] == grpc.StatusCode.PERMISSION_DENIED
    assert "scheduled on node node1" in answer[1]
    assert ca_server.refusals("not_on_node") == 1
    assert ca_server.service.registry.get_sample_value("ztunnel_ca_certificates_issued_total") == 0


@pytest.mark.parametrize(
    ("token", "reason", "code"),
    [
        (None, "no_token", grpc.StatusCode.UNAUTHENTICATED),
        ("forged", "bad_token", grpc.StatusCode.UNAUTHENTICATED),
    ],
)
async def test_bad_tokens_are_refused(
    ca_server: Running, token: str | None, reason: str, code: grpc.StatusCode
) -> None:
    answer = await _grpcio_call(ca_server, _request(ECHO, ECHO), token)
    assert answer[0] == code
    assert ca_server.refusals(reason) == 1


@pytest.mark.parametrize(
    ("token", "csr_for", "impersonate", "reason"),
    [
        # a workload's own token may not impersonate, even a pod on its node
        ("echo-token", ECHO, ECHO, "impersonation_not_allowed"),
        # the metadata must name the CSR's identity
        ("node1-token", SLEEP, ECHO, "identity_mismatch"),
        # without impersonation, only the caller's own identity
        ("echo-token", SLEEP, None, "identity_mismatch"),
    ],
)
async def test_identity_rules(
    ca_server: Running, token: str, csr_for: Identity, impersonate: Identity | None, reason: str
) -> None:
    answer = await _grpcio_call(ca_server, _request(csr_for, impersonate), token)
    assert answer[0] == grpc.StatusCode.PERMISSION_DENIED
    assert ca_server.refusals(reason) == 1


async def test_own_identity_without_impersonation(ca_server: Running) -> None:
    answer = await _grpcio_call(ca_server, _request(ECHO, None), "echo-token")
    assert isinstance(answer, citadel_pb2.IstioCertificateResponse)


async def test_garbage_csr_is_invalid_argument(ca_server: Running) -> None:
    raw = citadel_pb2.IstioCertificateRequest(csr="not a csr").SerializeToString()
    answer = await _grpcio_call(ca_server, raw, "node1-token")
    assert answer[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert ca_server.refusals("bad_csr") == 1


async def test_agent_without_ca_key_gets_certificates(ca_server: Running, tmp_path: Path) -> None:
    """End to end: our Istio CA client + SecretManager against our CA server."""
    token = tmp_path / "node1.token"
    token.write_text("node1-token")
    client = IstioCAClient(
        IstioCAConfig(
            address=f"https://127.0.0.1:{ca_server.port}",
            root_cert=ca_server.ca_dir / ROOT_CERT,
            alt_hostname="istiod.istio-system.svc",
            token_path=token,
        )
    )
    manager = SecretManager(client, ttl=datetime.timedelta(seconds=60))
    cert = await manager.fetch(ECHO)
    assert cert.identity == ECHO
    assert cert.not_after - cert.not_before == datetime.timedelta(seconds=60)
    with pytest.raises(CAError, match="PERMISSION_DENIED"):
        await manager.fetch(SLEEP)  # on node2


# --- authenticators ----------------------------------------------------------------------


@dataclass
class FakeReviewer:
    result: TokenReviewResult
    seen: list[tuple[str, tuple[str, ...]]]

    async def review(self, token: str, audiences: tuple[str, ...]) -> TokenReviewResult:
        self.seen.append((token, audiences))
        return self.result


def _reviewer(result: TokenReviewResult) -> FakeReviewer:
    return FakeReviewer(result, [])


async def test_token_review_node_from_bound_token() -> None:
    reviewer = _reviewer(
        TokenReviewResult(
            True, "system:serviceaccount:istio-system:ztunnel", {NODE_NAME_EXTRA: ("node1",)}
        )
    )
    auth = TokenReviewAuthenticator(reviewer, trust_domain=TD)
    assert await auth.authenticate("t") == Caller(ZTUNNEL, "node1")
    assert reviewer.seen == [("t", ("istio-ca",))]


async def test_token_review_node_from_pod() -> None:
    result = TokenReviewResult(
        True, "system:serviceaccount:istio-system:ztunnel", {POD_NAME_EXTRA: ("ztunnel-abc",)}
    )
    nodes = {("istio-system", "ztunnel-abc"): "node2"}
    auth = TokenReviewAuthenticator(
        _reviewer(result), trust_domain=TD, node_of_pod=lambda ns, name: nodes.get((ns, name))
    )
    assert await auth.authenticate("t") == Caller(ZTUNNEL, "node2")


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        (TokenReviewResult(False, error="expired"), "not authenticated expired"),
        (TokenReviewResult(True, "admin", {NODE_NAME_EXTRA: ("n",)}), "not a service account"),
        (TokenReviewResult(True, "system:serviceaccount:istio-system:ztunnel"), "not bound"),
    ],
)
async def test_token_review_refusals(result: TokenReviewResult, problem: str) -> None:
    auth = TokenReviewAuthenticator(_reviewer(result), trust_domain=TD)
    with pytest.raises(AuthError, match=problem):
        await auth.authenticate("t")


async def test_service_with_token_review_refuses_other_nodes() -> None:
    result = TokenReviewResult(
        True, "system:serviceaccount:istio-system:ztunnel", {NODE_NAME_EXTRA: ("node2",)}
    )
    service = CAService(
        FileCA(*_root_files()),
        TokenReviewAuthenticator(_reviewer(result), trust_domain=TD),
        _pods_on_node,
        trusted_node_agents={ZTUNNEL},
    )
    ctx = ServerContext(CREATE_CERTIFICATE, (("authorization", "Bearer x"),), "peer", None)
    with pytest.raises(GrpcError) as info:
        await service.create_certificate(_request(ECHO, ECHO), ctx)
    assert info.value.code is StatusCode.PERMISSION_DENIED
    raw = await service.create_certificate(_request(SLEEP, SLEEP), ctx)
    assert citadel_pb2.IstioCertificateResponse.FromString(raw).cert_chain


def _root_files() -> tuple[bytes, bytes, bytes, bytes]:
    cert, key = new_root(TD)
    return cert, key, cert, cert


def test_load_ca_dir_from_a_tls_secret(tmp_path: Path) -> None:
    cert, key = new_root(TD)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    ca = load_ca_dir(tmp_path)
    assert ca.roots_pem == cert
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CAError, match="neither"):
        load_ca_dir(empty)


def test_static_tokens_file_errors(tmp_path: Path) -> None:
    from ztunnel.errors import ConfigError

    with pytest.raises(ConfigError, match="tokens"):
        StaticTokens.parse("tokens: 3", "f")
    with pytest.raises(ConfigError, match=r"tokens\[0\].identity"):
        StaticTokens.parse("tokens: [{token: a, node: n, identity: nope}]", "f")
