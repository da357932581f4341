"""The Istio CA client against a fake istiod written with grpcio: what goes on the wire
(token re-read per call, clusterid, CA_HEADER_*, ImpersonatedIdentity, SECRET_TTL), what
comes back (identity check, multi-root bundle), and issuance + half-life rotation with a
60 s TTL through the SecretManager, on an injected clock."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from tests.grpc_peers import ServerTLS, grpcio_server, make_tls, unary
from ztunnel.config import Config
from ztunnel.identity.ca import FakeCA
from ztunnel.identity.certificate import new_csr
from ztunnel.identity.errors import CAError, CertificateError
from ztunnel.identity.istio_ca import (
    CREATE_CERTIFICATE,
    CARequestError,
    IstioCAClient,
    IstioCAConfig,
    ca_config,
)
from ztunnel.identity.manager import SecretManager
from ztunnel.model.identity import Identity
from ztunnel.proto import citadel_pb2

POD = Identity("cluster.local", "default", "echo")
T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
TTL = datetime.timedelta(seconds=60)
ISTIOD = make_tls(dns=("istiod.istio-system.svc",), ips=())


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now


class FakeIstiod:
    """CreateCertificate as istiod answers it, signing with a FakeCA on the test clock."""

    def __init__(self, clock: Clock) -> None:
        self.ca = FakeCA.ephemeral(clock=clock)
        self.clock = clock
        self.requests: list[tuple[citadel_pb2.IstioCertificateRequest, dict[str, str]]] = []
        self.tamper: Callable[[list[str]], list[str]] = lambda chain: chain
        self.refuse: tuple[grpc.StatusCode, str] | None = None

    def handle(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = citadel_pb2.IstioCertificateRequest.FromString(raw)
        self.requests.append((request, dict(context.invocation_metadata())))
        if self.refuse is not None:
            context.abort(*self.refuse)
        now = self.clock()
        validity = datetime.timedelta(seconds=request.validity_duration)
        chain = self.ca.sign(request.csr.encode(), not_before=now, not_after=now + validity)
        pems = self.tamper([c.decode() for c in chain])
        return citadel_pb2.IstioCertificateResponse(cert_chain=pems).SerializeToString()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def istiod(clock: Clock) -> Any:
    fake = FakeIstiod(clock)
    with grpcio_server({CREATE_CERTIFICATE: unary(fake.handle)}, ISTIOD) as port:
        fake.port = port  # type: ignore[attr-defined]
        yield fake


def _client(tmp_path: Path, port: int, tls: ServerTLS = ISTIOD, **kw: Any) -> IstioCAClient:
    root = tmp_path / "root-cert.pem"
    root.write_bytes(tls.root_pem)
    token = tmp_path / "istio-token"
    if not token.exists():
        token.write_text("token-1\n")
    config = IstioCAConfig(
        address=f"https://127.0.0.1:{port}",
        root_cert=root,
        alt_hostname="istiod.istio-system.svc",
        token_path=token,
        cluster_id="cluster-a",
        headers=(("x-extra", "yes"),),
        **kw,
    )
    return IstioCAClient(config)


async def test_issue_sends_what_ztunnel_sends(tmp_path: Path, istiod: Any, clock: Clock) -> None:
    manager = SecretManager(_client(tmp_path, istiod.port), ttl=TTL, clock=clock)
    cert = await manager.fetch(POD)
    assert cert.identity == POD
    assert cert.not_before == T0 and cert.not_after == T0 + TTL
    request, headers = istiod.requests[0]
    assert request.validity_duration == 60
    assert request.metadata.fields["ImpersonatedIdentity"].string_value == str(POD)
    assert headers["authorization"] == "Bearer token-1"
    assert headers["clusterid"] == "cluster-a"
    assert headers["x-extra"] == "yes"


async def test_token_is_reread_on_every_call(tmp_path: Path, istiod: Any, clock: Clock) -> None:
    client = _client(tmp_path, istiod.port)
    _key, csr = new_csr(POD)
    await client.create_certificate(csr, TTL)
    (tmp_path / "istio-token").write_text("token-2")
    await client.create_certificate(csr, TTL)
    assert [h["authorization"] for _, h in istiod.requests] == ["Bearer token-1", "Bearer token-2"]


async def test_dedicated_mode_sends_no_impersonation(tmp_path: Path, istiod: Any) -> None:
    client = _client(tmp_path, istiod.port, impersonate=False)
    await client.create_certificate(new_csr(POD)[1], TTL)
    request, _ = istiod.requests[0]
    assert not request.HasField("metadata")


async def test_rotation_at_half_life_with_60s_ttl(
    tmp_path: Path, istiod: Any, clock: Clock
) -> None:
    manager = SecretManager(_client(tmp_path, istiod.port), ttl=TTL, clock=clock)
    first = await manager.fetch(POD)
    assert first.refresh_at == T0 + datetime.timedelta(seconds=30)
    rotated = trio.Event()
    manager.subscribe(lambda identity, cert: rotated.set())
    clock.now = T0 + datetime.timedelta(seconds=31)  # past half-life, still valid
    assert manager.get(POD) is first
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        with trio.fail_after(10):
            await rotated.wait()
        nursery.cancel_scope.cancel()
    second = manager.get(POD)
    assert second is not None and second is not first
    assert second.not_before == clock.now and second.not_after == clock.now + TTL
    assert len(istiod.requests) == 2
    # expired without a refresher: the next fetch issues a new one
    clock.now = T0 + datetime.timedelta(seconds=200)
    third = await manager.fetch(POD)
    assert third.not_before == clock.now and len(istiod.requests) == 3


async def test_refusal_is_a_ca_error_with_the_status(tmp_path: Path, istiod: Any) -> None:
    istiod.refuse = (grpc.StatusCode.PERMISSION_DENIED, "not on your node")
    manager = SecretManager(_client(tmp_path, istiod.port), ttl=TTL)
    with pytest.raises(CAError) as info:
        await manager.fetch(POD)
    assert isinstance(info.value, CARequestError)
    assert info.value.code.name == "PERMISSION_DENIED"
    assert "not on your node" in str(info.value)


async def test_leaf_for_another_identity_is_rejected(tmp_path: Path, istiod: Any) -> None:
    _other_key, other_csr = new_csr(Identity("cluster.local", "default", "other"))
    other_chain = istiod.ca.sign(other_csr, not_before=T0, not_after=T0 + TTL)
    istiod.tamper = lambda chain: [other_chain[0].decode(), *chain[1:]]
    client = _client(tmp_path, istiod.port)
    with pytest.raises(CertificateError, match="but spiffe://cluster\\.local/ns/default/sa/echo"):
        await client.create_certificate(new_csr(POD)[1], TTL)


async def test_several_roots_in_the_last_element_are_all_trusted(
    tmp_path: Path, istiod: Any, clock: Clock
) -> None:
    extra_root = FakeCA.ephemeral().roots_pem.decode()
    istiod.tamper = lambda chain: [*chain[:-1], chain[-1] + extra_root]
    manager = SecretManager(_client(tmp_path, istiod.port), ttl=TTL, clock=clock)
    cert = await manager.fetch(POD)
    assert len(cert.roots) == 2


async def test_empty_token_fails_before_calling(tmp_path: Path, istiod: Any) -> None:
    (tmp_path / "istio-token").write_text("")
    client = _client(tmp_path, istiod.port)
    with pytest.raises(CAError, match="empty"):
        await client.create_certificate(new_csr(POD)[1], TTL)
    assert istiod.requests == []


async def test_server_name_must_match_host_or_alt_name(tmp_path: Path, istiod: Any) -> None:
    client = _client(tmp_path, istiod.port)
    object.__setattr__(client.config, "alt_hostname", "other.example")
    with pytest.raises(CARequestError) as info:
        await client.create_certificate(new_csr(POD)[1], TTL)
    assert info.value.code.name == "UNAVAILABLE"
    assert istiod.requests == []


async def test_rotated_root_file_is_picked_up(tmp_path: Path, clock: Clock) -> None:
    new_tls = make_tls(dns=("istiod.istio-system.svc",), ips=())
    fake = FakeIstiod(clock)
    with grpcio_server({CREATE_CERTIFICATE: unary(fake.handle)}, ISTIOD) as port:
        client = _client(tmp_path, port)
        await client.create_certificate(new_csr(POD)[1], TTL)
    # istiod comes back with a certificate from a new root; the root file is updated
    with grpcio_server({CREATE_CERTIFICATE: unary(fake.handle)}, new_tls, port=port):
        with pytest.raises(CARequestError):  # still the old roots
            await client.create_certificate(new_csr(POD)[1], TTL)
        (tmp_path / "root-cert.pem").write_bytes(ISTIOD.root_pem + new_tls.root_pem)
        await client.create_certificate(new_csr(POD)[1], TTL)
    assert len(fake.requests) == 2


def test_ca_config_from_ztunnels_environment() -> None:
    env = {
        "CA_ADDRESS": "https://istiod.istio-system.svc:15012",
        "CA_ROOT_CA": "/etc/roots.pem",
        "ALT_CA_HOSTNAME": "istiod.example",
        "AUTH_TOKEN": "/tok",
        "ISTIO_META_CLUSTER_ID": "c1",
        "CA_HEADER_X_TENANT": "t1",
        "CA_HEADER_": "ignored: no name",
    }
    cfg = Config.from_sources(env)
    config = ca_config(cfg, cfg.ca_target or "", shared=True)
    assert config.address == "https://istiod.istio-system.svc:15012"
    assert config.root_cert == Path("/etc/roots.pem")
    assert config.alt_hostname == "istiod.example"
    assert config.token_path == Path("/tok")
    assert config.cluster_id == "c1"
    assert config.headers == (("x-tenant", "t1"),)
    assert config.impersonate
    system = Config.from_sources({**env, "CA_ROOT_CA": "SYSTEM"})
    assert ca_config(system, "a:1", shared=False).root_cert is None
    assert not ca_config(system, "a:1", shared=False).impersonate
