"""The simulated cluster behind a Kubernetes API: its objects served by the fake API server
on the pod network, and node agents that find it through a kubeconfig.

- ``cluster_objects``: the cluster file as the API would serve it: namespaces (labels),
  pods (node, ``metadata.uid`` as the kubelet's cgroups carry it, ``status.podIP``,
  service account, labels, container ports), services (cluster IP, selector, ports), one
  EndpointSlice per service (what the endpoint-slice controller writes) and the policies.
- ``ApiServerThread``: a ``FakeApiServer`` on its own trio loop in a thread, so a
  synchronous test changes objects (``call``) and stops/starts it (``run``) while agents
  watch it.
- ``start_api_server``: attaches ``<prefix>-apiserver`` at 10.244.0.3 to the pod network,
  serves the API there on :6443 over TLS with a bearer token, and writes the kubeconfig a
  node agent gets (``KUBECONFIG``).
- ``start_kube_agent``: ``ztunnel run`` in a node's netns with that kubeconfig and no
  cluster file: the agent's Kubernetes pod source.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import trio
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztunnel.cluster.net import ClusterNet
from ztunnel.redirect.netns import NetNamespace
from ztunnel.testing import k8s_fake as k
from ztunnel.testing.harness import AgentCA, AgentProcess, agent_env

T = TypeVar("T")
JSON = dict[str, Any]
API_IP = IPv4Address("10.244.0.3")
API_PORT = 6443


# --- objects ------------------------------------------------------------------------------


def cluster_objects(net: ClusterNet, uids: Mapping[str, str]) -> list[JSON]:
    """Every object of the cluster file, namespaces first (``uids`` by pod key)."""
    spec = net.spec
    out: list[JSON] = [k.namespace(ns.name, ns.labels) for ns in spec.namespaces.values()]
    for p in spec.pods:
        out.append(
            k.pod(
                p.name,
                p.namespace,
                node=p.node,
                ip=str(net.pods[p.key].ip),
                uid=uids[p.key],
                labels=p.labels,
                service_account=p.service_account,
                ports=[(f"tcp-{port}", port) for port in p.ports],
            )
        )
    for svc in spec.services:
        ports = [(f"tcp-{port}", port, target) for port, target in svc.ports.items()]
        out.append(
            k.service(
                svc.name, svc.namespace, selector=svc.selector, ports=ports, cluster_ip=str(svc.vip)
            )
        )
        endpoints = [
            k.slice_endpoint(str(net.pods[p.key].ip), pod_name=p.name, ns=p.namespace)
            for p in spec.selected_pods(svc)
        ]
        targets = sorted(set(svc.ports.values()))
        out.append(
            k.endpoint_slice(
                f"{svc.name}-{secrets.token_hex(3)}",
                svc.namespace,
                svc.name,
                endpoints,
                ports=[(f"tcp-{t}", t) for t in targets],
            )
        )
    out += [dict(policy) for policy in spec.policies]
    return out


# --- the API server in a thread -----------------------------------------------------------


class ApiServerThread:
    """A ``FakeApiServer`` served by its own trio loop in a daemon thread."""

    def __init__(self, server: k.FakeApiServer) -> None:
        self.server = server
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="fake-apiserver", daemon=True)

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported to the test thread by start()
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._cancel = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(self.server.serve)
                self._started.set()

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the fake API server did not start: {self._error!r}")

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a synchronous method of the server (``apply``, ``delete``...) on its loop."""
        assert self._token is not None
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def run(self, afn: Callable[..., Any], *args: Any) -> Any:
        """Run an async method of the server (``stop``, ``start``, ``drop_watches``)."""
        assert self._token is not None
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._cancel is not None and self._thread.is_alive():
            self.call(self._cancel.cancel)
        self._thread.join(10)


def listen_in(ns: NetNamespace) -> k.Listen:
    """Listeners whose sockets live in ``ns`` (created there, used from here)."""

    async def listen(host: str, port: int) -> list[trio.SocketListener]:
        sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]

    return listen


# --- TLS: the API server's certificate, as a cluster CA issues it ---------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def serving_tls(workdir: Path, ip: IPv4Address) -> tuple[ssl.SSLContext, Path]:
    """A cluster CA (its certificate written to ``workdir/ca.crt``) and the server's TLS
    context for ``ip`` and ``kubernetes.default.svc``."""
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("kubernetes-ca"))
        .issuer_name(_name("kubernetes-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address(ip)), x509.DNSName("kubernetes.default.svc")]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("kube-apiserver"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = workdir / "ca.crt"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file, key_file = workdir / "apiserver.crt", workdir / "apiserver.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(_pem_key(key))
    key_file.chmod(0o600)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, ca_file


# --- the whole thing ------------------------------------------------------------------------


@dataclass
class KubeApi:
    """The fake API server of one simulated cluster, as node agents reach it."""

    thread: ApiServerThread
    kubeconfig: Path

    @property
    def server(self) -> k.FakeApiServer:
        return self.thread.server

    def apply(self, obj: Mapping[str, Any]) -> JSON:
        return self.thread.call(self.server.apply, obj)

    def delete(self, kind: Any, namespace: str, name: str) -> bool:
        return bool(self.thread.call(self.server.delete, kind, namespace, name))

    def get(self, kind: Any, namespace: str, name: str) -> JSON | None:
        found: JSON | None = self.thread.call(self.server.get, kind, namespace, name)
        return found

    def patches(self) -> list[k.RequestRecord]:
        """PATCH requests the server received so far."""
        requests: list[k.RequestRecord] = self.thread.call(list, self.server.requests)
        return [r for r in requests if r.method == "PATCH"]


@contextmanager
def running_api_server(
    net: ClusterNet, workdir: Path, objects: list[JSON], **server_options: Any
) -> Iterator[KubeApi]:
    """The API server at 10.244.0.3:6443 (TLS, a bearer token) holding ``objects``."""
    workdir.mkdir(parents=True, exist_ok=True)
    host = net.attach_host("apiserver", API_IP)
    context, ca_file = serving_tls(workdir, API_IP)
    token = secrets.token_urlsafe(24)
    ns = NetNamespace.open(host.netns_path)
    server = k.FakeApiServer(
        token=token, ssl_context=context, host=str(API_IP), listen=listen_in(ns), **server_options
    )
    server.port = API_PORT
    for obj in objects:
        server.apply(obj)
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(_kubeconfig(server.url, token, ca_file))
    thread = ApiServerThread(server)
    try:
        thread.start()
        yield KubeApi(thread, kubeconfig)
    finally:
        thread.stop()
        ns.close()


def _kubeconfig(url: str, token: str, ca_file: Path) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "sim", "cluster": {"server": url, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": "ztunnel", "user": {"token": token}}],
        "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": "ztunnel"}}],
        "current-context": "sim",
    }
    return yaml.safe_dump(doc)


def start_kube_agent(
    net: ClusterNet,
    node: str,
    kubeconfig: Path,
    ca: AgentCA,
    *,
    extra_env: Mapping[str, str] | None = None,
) -> AgentProcess:
    """``ztunnel run`` on ``node`` with ``KUBECONFIG`` (no cluster file); JSON log in
    the cluster's log directory."""
    nn = net.nodes[node]
    log_path = net.log_dir / f"agent-{node}.log"
    pins = {"ZTUNNEL_BPF_PIN_DIR": str(net.bpf_pin_dir(node))}
    env = agent_env(node, ca, {"KUBECONFIG": str(kubeconfig), **pins, **(extra_env or {})})
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "INPOD_UDS", "XDS_ADDRESS"):
        env.pop(name, None)
    # nsenter, not `ip netns exec`: that remounts /sys, hiding bpffs (eBPF mode's pins)
    argv = ["nsenter", f"--net={nn.netns_path}", "--", sys.executable, "-m", "ztunnel.cli", "run"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    return AgentProcess(nn, proc, log_path, env)


__all__ = [
    "API_IP",
    "API_PORT",
    "ApiServerThread",
    "KubeApi",
    "cluster_objects",
    "listen_in",
    "running_api_server",
    "serving_tls",
    "start_kube_agent",
]
