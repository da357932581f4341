"""Real TLS 1.3 handshakes over socketpairs with the HBONE contexts, and peer identity checks."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from ztunnel.identity.ca import FakeCA, FileCA, new_intermediate, new_root
from ztunnel.identity.certificate import WorkloadCertificate, new_csr
from ztunnel.identity.errors import TLSIdentityError
from ztunnel.identity.tls import (
    client_context,
    peer_identity,
    server_context,
    verify_client_trust_domain,
    verify_server_identity,
)
from ztunnel.model.identity import Identity

ALICE = Identity("cluster.local", "default", "alice")
BOB = Identity("cluster.local", "default", "bob")
TIMEOUT = 5.0


@dataclass
class Outcome:
    peer_der: bytes | None = None
    alpn: str | None = None
    version: str | None = None
    error: BaseException | None = None


def _run_side(ctx: ssl.SSLContext, sock: socket.socket, server: bool, out: Outcome) -> None:
    sock.settimeout(TIMEOUT)  # the absolute bound of these blocking tests
    try:
        with ctx.wrap_socket(sock, server_side=server, server_hostname=None) as tls:
            out.peer_der = tls.getpeercert(binary_form=True)
            out.alpn, out.version = tls.selected_alpn_protocol(), tls.version()
            # One byte each way: in TLS 1.3 the client learns of a rejected cert only here.
            if server:
                tls.sendall(tls.recv(1))
            else:
                tls.sendall(b"x")
                if tls.recv(1) != b"x":
                    raise ConnectionError("no echo")
    except (OSError, ssl.SSLError) as exc:
        out.error = exc


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[Outcome, Outcome]:
    s_sock, c_sock = socket.socketpair()
    srv, cli = Outcome(), Outcome()
    thread = threading.Thread(target=_run_side, args=(server_ctx, s_sock, True, srv))
    thread.start()
    _run_side(client_ctx, c_sock, False, cli)
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    return srv, cli


def test_mutual_tls_works_and_exposes_identities() -> None:
    ca = FakeCA.ephemeral()
    srv, cli = handshake(
        server_context(ca.workload_certificate(BOB)), client_context(ca.workload_certificate(ALICE))
    )
    assert srv.error is None and cli.error is None
    assert srv.version == cli.version == "TLSv1.3" and srv.alpn == cli.alpn == "h2"
    assert srv.peer_der is not None and cli.peer_der is not None
    assert peer_identity(srv.peer_der) == ALICE
    assert verify_server_identity(cli.peer_der, {BOB}) == BOB
    assert verify_client_trust_domain(srv.peer_der, "cluster.local") == ALICE


def test_client_without_certificate_is_rejected() -> None:
    ca = FakeCA.ephemeral()
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.roots_pem.decode())
    srv, cli = handshake(server_context(ca.workload_certificate(BOB)), bare)
    assert isinstance(srv.error, ssl.SSLError) and cli.error is not None


def test_tls12_only_client_is_rejected() -> None:
    ca = FakeCA.ephemeral()
    # Everything right but the version (a valid certificate of the trust domain, the roots,
    # h2): only the TLS 1.3 minimum can refuse it. The context is this test's own (a fresh
    # certificate is a fresh cache key).
    old = client_context(ca.workload_certificate(ALICE))
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
    srv, cli = handshake(server_context(ca.workload_certificate(BOB)), old)
    assert isinstance(srv.error, ssl.SSLError) and isinstance(cli.error, ssl.SSLError)
    assert "UNSUPPORTED_PROTOCOL" in str(srv.error), srv.error


def test_tls12_only_server_is_rejected() -> None:
    ca = FakeCA.ephemeral()
    old = server_context(ca.workload_certificate(BOB))
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
    srv, cli = handshake(old, client_context(ca.workload_certificate(ALICE)))
    assert isinstance(cli.error, ssl.SSLError) and srv.error is not None


def test_expired_client_certificate_is_rejected() -> None:
    ca = FakeCA.ephemeral()
    now = datetime.datetime.now(datetime.UTC)
    expired = ca.workload_certificate(
        ALICE,
        not_before=now - datetime.timedelta(hours=2),
        not_after=now - datetime.timedelta(hours=1),
    )
    srv, cli = handshake(server_context(ca.workload_certificate(BOB)), client_context(expired))
    assert isinstance(srv.error, ssl.SSLCertVerificationError)
    assert "expired" in str(srv.error) and cli.error is not None


@pytest.mark.parametrize("untrusted_side", ["client", "server"])
def test_certificate_from_another_root_is_rejected(untrusted_side: str) -> None:
    root_ours, key_ours = new_root()
    root_theirs, key_theirs = new_root()
    ours = FileCA(root_ours, key_ours, root_ours, root_ours)
    # The stranger trusts us, so only our side's verification can fail.
    theirs = FileCA(root_theirs, key_theirs, root_theirs, root_theirs + root_ours)
    server_ca, client_ca = (ours, theirs) if untrusted_side == "client" else (theirs, ours)
    srv, cli = handshake(
        server_context(_issue(server_ca, BOB)), client_context(_issue(client_ca, ALICE))
    )
    rejecting = srv if untrusted_side == "client" else cli
    assert isinstance(rejecting.error, ssl.SSLCertVerificationError)


def test_every_root_in_the_bundle_is_trusted() -> None:
    root_a, key_a = new_root()
    root_b, key_b = new_root()
    # Mid-rotation: the server's CA still signs with A, the client's with B; both bundles hold A+B.
    ca_a = FileCA(root_a, key_a, root_a, root_a + root_b)
    ca_b = FileCA(root_b, key_b, root_b, root_a + root_b)
    server_cert = _issue(ca_a, BOB)
    client_cert = _issue(ca_b, ALICE)
    assert len(client_cert.roots) == 2
    srv, cli = handshake(server_context(server_cert), client_context(client_cert))
    assert srv.error is None and cli.error is None


def _issue(ca: FileCA, identity: Identity) -> WorkloadCertificate:
    key, csr = new_csr(identity)
    now = datetime.datetime.now(datetime.UTC)
    chain = ca.sign(csr, not_before=now, not_after=now + datetime.timedelta(hours=1))
    return WorkloadCertificate.from_chain(identity, key, chain)


def test_contexts_are_cached_per_certificate() -> None:
    ca = FakeCA.ephemeral()
    cert = ca.workload_certificate(ALICE)
    assert server_context(cert) is server_context(cert)
    assert client_context(cert) is client_context(cert)
    assert client_context(cert) is not client_context(ca.workload_certificate(ALICE))


def test_server_identity_must_match_exactly() -> None:
    der = _der(FakeCA.ephemeral().workload_certificate(BOB))
    with pytest.raises(TLSIdentityError, match="not one of"):
        verify_server_identity(der, {ALICE, Identity("other.td", "default", "bob")})
    with pytest.raises(TLSIdentityError):
        verify_server_identity(der, set())


def test_client_trust_domain_must_match() -> None:
    der = _der(FakeCA.ephemeral("other.td").workload_certificate(Identity("other.td", "ns", "sa")))
    with pytest.raises(TLSIdentityError, match=r"cluster\.local"):
        verify_client_trust_domain(der, "cluster.local")
    assert verify_client_trust_domain(der, "other.td").service_account == "sa"


def test_garbage_peer_certificate_is_an_identity_error() -> None:
    with pytest.raises(TLSIdentityError):
        peer_identity(b"\x30\x03garbage")


def _der(cert: WorkloadCertificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.leaf.public_bytes(Encoding.DER)


def test_intermediate_ca_chain_is_presented_and_verified() -> None:
    root, root_key = new_root()
    inter, inter_key = new_intermediate(root, root_key)
    ca = FileCA(inter, inter_key, inter + root, root)
    server_cert, client_cert = _issue(ca, BOB), _issue(ca, ALICE)
    assert len(server_cert.chain) == 1 and len(server_cert.roots) == 1
    srv, cli = handshake(server_context(server_cert), client_context(client_cert))
    assert srv.error is None and cli.error is None
    assert cli.peer_der is not None and peer_identity(cli.peer_der) == BOB


def test_key_file_does_not_outlive_loading() -> None:
    before = set(os.listdir(tempfile.gettempdir())) | _shm()
    client_context(FakeCA.ephemeral().workload_certificate(ALICE))
    assert (set(os.listdir(tempfile.gettempdir())) | _shm()) <= before


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


async def test_contexts_work_with_trio_ssl_streams() -> None:
    ca = FakeCA.ephemeral()
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_context(ca.workload_certificate(ALICE)))
    server = trio.SSLStream(
        server_raw, server_context(ca.workload_certificate(BOB)), server_side=True
    )
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        await client.send_all(b"ping")
        assert await server.receive_some(4) == b"ping"
    assert client.selected_alpn_protocol() == "h2"
    assert peer_identity(server.getpeercert(binary_form=True)) == ALICE
