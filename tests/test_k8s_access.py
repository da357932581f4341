"""Cluster access as Kubernetes clients find it: kubeconfig variants and in-cluster, each
proven by a real request to the fake API server (TLS, tokens, client certificates)."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
import trio
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztunnel.errors import ConfigError
from ztunnel.sources.kubernetes.access import load_access, open_http
from ztunnel.sources.kubernetes.client import ApiClient
from ztunnel.sources.kubernetes.errors import KubeApiError, KubeUnavailable
from ztunnel.sources.kubernetes.protocol import NAMESPACES, list_params
from ztunnel.testing.k8s_fake import FakeApiServer, namespace, running


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    def __init__(self, base: Path) -> None:
        self.base = base
        now = datetime.datetime.now(datetime.UTC)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(_name("test-ca"))
            .issuer_name(_name("test-ca"))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_file = self._write("ca.crt", self.ca.public_bytes(serialization.Encoding.PEM))
        self.server_cert, self.server_key = self._leaf("apiserver", server=True)
        self.client_cert, self.client_key = self._leaf("system:node:node1", server=False)

    def _write(self, name: str, data: bytes) -> Path:
        path = self.base / name
        path.write_bytes(data)
        return path

    def _leaf(self, cn: str, *, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if server:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        tag = "server" if server else "client"
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return (
            self._write(f"{tag}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            self._write(f"{tag}.key", key_pem),
        )

    def server_context(self, *, require_client_cert: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca_file)
        return ctx


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig(path: Path, cluster: dict[str, object], user: dict[str, object]) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


async def list_namespaces(env: dict[str, str], **kw: object) -> list[str]:
    access = load_access(env, **kw)  # type: ignore[arg-type]
    client = ApiClient(open_http(access))
    try:
        page = await client.list_page(NAMESPACES, list_params(limit=10))
    finally:
        await client.aclose()
    return [i["metadata"]["name"] for i in page.items]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def test_token_and_ca_file(pki: Pki, tmp_path: Path) -> None:
    server = FakeApiServer(
        token="s3cret", ssl_context=pki.server_context(require_client_cert=False)
    )
    server.apply(namespace("default"))
    async with running(server):
        cfg = kubeconfig(
            tmp_path / "kc",
            {"server": server.url, "certificate-authority": str(pki.ca_file)},
            {"token": "s3cret"},
        )
        assert await list_namespaces({"KUBECONFIG": str(cfg)}) == ["default"]
        assert server.requests[-1].headers["authorization"] == "Bearer s3cret"
        wrong = kubeconfig(
            tmp_path / "kc2",
            {"server": server.url, "certificate-authority": str(pki.ca_file)},
            {"token": "nope"},
        )
        with pytest.raises(KubeApiError) as info:
            await list_namespaces({"KUBECONFIG": str(wrong)})
        assert info.value.code == 401


async def test_client_certificate_files_relative_to_the_kubeconfig(
    pki: Pki, tmp_path: Path
) -> None:
    server = FakeApiServer(ssl_context=pki.server_context(require_client_cert=True))
    async with running(server):
        # Relative paths resolve against the kubeconfig's own directory, as kubectl does.
        cfg = kubeconfig(
            tmp_path / "kc",
            {"server": server.url, "certificate-authority": "ca.crt"},
            {"client-certificate": "client.crt", "client-key": "client.key"},
        )
        assert await list_namespaces({"KUBECONFIG": str(cfg)}) == []
        cert = server.requests[-1].client_cert
        assert cert is not None and cert["subject"] == ((("commonName", "system:node:node1"),),)


async def test_client_certificate_and_ca_as_data(pki: Pki, tmp_path: Path) -> None:
    server = FakeApiServer(ssl_context=pki.server_context(require_client_cert=True))
    async with running(server):
        cfg = kubeconfig(
            tmp_path / "kc",
            {"server": server.url, "certificate-authority-data": b64(pki.ca_file)},
            {
                "client-certificate-data": b64(pki.client_cert),
                "client-key-data": b64(pki.client_key),
            },
        )
        assert await list_namespaces({"KUBECONFIG": str(cfg)}) == []
        assert server.requests[-1].client_cert is not None


async def test_server_certificate_is_verified_unless_insecure(pki: Pki, tmp_path: Path) -> None:
    server = FakeApiServer(token="t", ssl_context=pki.server_context(require_client_cert=False))
    async with running(server):
        untrusted = kubeconfig(tmp_path / "kc", {"server": server.url}, {"token": "t"})
        with pytest.raises(KubeUnavailable):
            await list_namespaces({"KUBECONFIG": str(untrusted)})
        insecure = kubeconfig(
            tmp_path / "kc2",
            {"server": server.url, "insecure-skip-tls-verify": True},
            {"token": "t"},
        )
        assert await list_namespaces({"KUBECONFIG": str(insecure)}) == []


async def test_token_file_is_reread_when_rotated(tmp_path: Path) -> None:
    server = FakeApiServer(token="one")
    token = tmp_path / "token"
    token.write_text("one\n")
    async with running(server):
        cfg = kubeconfig(tmp_path / "kc", {"server": server.url}, {"tokenFile": str(token)})
        client = ApiClient(open_http(load_access({"KUBECONFIG": str(cfg)})))
        try:
            await client.list_page(NAMESPACES, list_params(limit=1))
            # The kubelet swaps the file (new inode); the server accepts only the new token.
            new = tmp_path / "token.new"
            new.write_text("two")
            new.replace(token)
            server.token = "two"
            await client.list_page(NAMESPACES, list_params(limit=1))
            assert server.requests[-1].headers["authorization"] == "Bearer two"
        finally:
            await client.aclose()


async def test_in_cluster_service_account(pki: Pki, tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("in-cluster-token")
    (sa / "ca.crt").write_bytes(pki.ca_file.read_bytes())
    (sa / "namespace").write_text("istio-system")
    server = FakeApiServer(
        token="in-cluster-token", ssl_context=pki.server_context(require_client_cert=False)
    )
    async with running(server):
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)}
        access = load_access(env, service_account_dir=sa)
        assert access.source == "in-cluster" and access.server == f"https://127.0.0.1:{server.port}"
        assert await list_namespaces(env, service_account_dir=sa) == []


async def test_merged_kubeconfig_files(tmp_path: Path) -> None:
    server = FakeApiServer(token="t")
    async with running(server):
        first = tmp_path / "a"
        first.write_text(
            yaml.safe_dump(
                {
                    "current-context": "ctx",
                    "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                }
            )
        )
        second = kubeconfig(tmp_path / "b", {"server": server.url}, {"token": "t"})
        env = {"KUBECONFIG": f"{first}:{tmp_path / 'missing'}:{second}"}
        assert load_access(env).server == server.url
        assert await list_namespaces(env) == []


def test_in_cluster_needs_the_token_file(tmp_path: Path) -> None:
    env = {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "HOME": str(tmp_path),
    }
    with pytest.raises(ConfigError, match="no cluster access"):
        load_access(env, service_account_dir=tmp_path / "none")


def test_home_kubeconfig_is_the_fallback(tmp_path: Path) -> None:
    (tmp_path / ".kube").mkdir()
    kubeconfig(tmp_path / ".kube" / "config", {"server": "https://192.0.2.1:6443"}, {"token": "t"})
    assert (
        load_access({"HOME": str(tmp_path)}, service_account_dir=tmp_path / "none").server
        == "https://192.0.2.1:6443"
    )


@pytest.mark.parametrize(
    ("cluster", "user", "match"),
    [
        (
            {"server": "https://192.0.2.1"},
            {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "aws"}},
            "credential plugins",
        ),
        (
            {"server": "https://192.0.2.1", "certificate-authority-data": "%%%not-base64"},
            {},
            "unusable credentials",
        ),
        (
            {"server": "https://192.0.2.1", "certificate-authority": "/nonexistent/ca.crt"},
            {},
            "unusable credentials",
        ),
    ],
)
def test_unusable_configurations_are_config_errors(
    tmp_path: Path, cluster: dict[str, object], user: dict[str, object], match: str
) -> None:
    cfg = kubeconfig(tmp_path / "kc", cluster, user)
    with pytest.raises(ConfigError, match=match):
        open_http(load_access({"KUBECONFIG": str(cfg)}))


@pytest.mark.parametrize(
    "text", ["[1, 2]", "clusters: 3", "current-context: nope\ncontexts: []\nclusters: []"]
)
def test_malformed_kubeconfig_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "kc"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_access({"KUBECONFIG": str(path)})


def test_missing_kubeconfig_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such kubeconfig"):
        load_access({"KUBECONFIG": str(tmp_path / "nope")})


async def test_server_down_is_unavailable(tmp_path: Path) -> None:
    # A port nothing listens on: bind, learn the port, close.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cfg = kubeconfig(tmp_path / "kc", {"server": f"http://127.0.0.1:{port}"}, {})
    with pytest.raises(KubeUnavailable):
        await list_namespaces({"KUBECONFIG": str(cfg)})
