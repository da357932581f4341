"""The agent under istiod: ``ztunnel run`` started with ztunnel's own environment — only
XDS_ADDRESS, CA_ADDRESS, a token and the CA root besides its listeners — learns its
workloads over xDS and gets its certificates over the CA protocol from a fake istiod
written with grpcio (an independent peer: xDS and CA on one TLS port, as istiod's 15012),
and serves traffic. Also: how the agent wires the control-plane clients and which
combinations are refused before anything starts."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from mesh_apps import echo_roundtrip, serve_echo

from tests.grpc_peers import bidi, grpcio_server, make_tls, unary
from tests.test_cli import wait_for_log
from tests.xds_fakes import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    FakeStream,
    FakeXds,
    deny_port,
    service,
    workload,
)
from ztunnel.agent import Agent, attach_zds_source
from ztunnel.config import Config
from ztunnel.errors import ConfigError
from ztunnel.identity.ca import FakeCA
from ztunnel.identity.istio_ca import CREATE_CERTIFICATE, IstioCAClient
from ztunnel.proto import citadel_pb2
from ztunnel.redirect.base import NoRedirector
from ztunnel.sources.xds import DELTA_ADS
from ztunnel.testing.loopback import (
    APP_PORT,
    SERVICE_PORT,
    Socks5Refused,
    agent_env,
    random_base,
    socks5_connect,
)

ROOT = Path(__file__).resolve().parent.parent
ISTIOD_TLS = make_tls(dns=("istiod.istio-system.svc",), ips=("127.0.0.1",))
ECHO_KEY = "default/echo.default.svc.cluster.local"


@dataclass
class FakeIstiod:
    """xDS (FakeXds) and CreateCertificate on one port; certificates from a FakeCA."""

    xds: FakeXds = field(default_factory=FakeXds)
    ca: FakeCA = field(default_factory=FakeCA.ephemeral)
    csrs: list[tuple[citadel_pb2.IstioCertificateRequest, dict[str, str]]] = field(
        default_factory=list
    )
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def create_certificate(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = citadel_pb2.IstioCertificateRequest.FromString(raw)
        with self.lock:
            self.csrs.append((request, dict(context.invocation_metadata())))
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        validity = datetime.timedelta(seconds=request.validity_duration)
        chain = self.ca.sign(request.csr.encode(), not_before=now, not_after=now + validity)
        return citadel_pb2.IstioCertificateResponse(
            cert_chain=[c.decode() for c in chain]
        ).SerializeToString()


@contextmanager
def fake_istiod() -> Iterator[FakeIstiod]:
    fake = FakeIstiod()
    handlers = {
        DELTA_ADS: bidi(fake.xds.handle),
        CREATE_CERTIFICATE: unary(fake.create_certificate),
    }
    try:
        with grpcio_server(handlers, ISTIOD_TLS) as port:
            fake.port = port
            yield fake
    finally:
        fake.xds.stop_all()


def istio_env(tmp_path: Path, istiod: FakeIstiod, name: str) -> dict[str, str]:
    """ztunnel's control-plane environment: nothing about CA keys or local config."""
    root = tmp_path / "root-cert.pem"
    root.write_bytes(ISTIOD_TLS.root_pem)
    token = tmp_path / f"token-{name}"
    token.write_text(f"jwt-of-{name}\n")
    address = f"https://127.0.0.1:{istiod.port}"
    return {
        "XDS_ADDRESS": address,
        "CA_ADDRESS": address,
        "XDS_ROOT_CA": str(root),
        "CA_ROOT_CA": str(root),
        "AUTH_TOKEN": str(token),
        "POD_NAME": f"ztunnel-{name}",
        "POD_NAMESPACE": "istio-system",
        "SECRET_TTL": "60s",
    }


@dataclass
class AgentProc:
    proc: subprocess.Popen[str]
    ready: dict[str, str]

    def readiness(self) -> tuple[int, str]:
        return _http_get(self.ready["readiness"], "/healthz/ready")

    def config_dump(self) -> dict[str, Any]:
        status, body = _http_get(self.ready["admin"], "/config_dump")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)
        return data


def _http_get(hostport: str, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{hostport}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextmanager
def ztunnel_run(env: dict[str, str]) -> Iterator[AgentProc]:
    """``python -m ztunnel.cli run`` with exactly ``env`` (plus PATH and PYTHONPATH)."""
    full = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "LOG_FORMAT": "json",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztunnel.cli", "run"],
        env=full,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        yield AgentProc(proc, wait_for_log(proc, "agent ready", timeout=30))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


async def _subscribed(istiod: FakeIstiod) -> FakeStream:
    stream = await trio.to_thread.run_sync(istiod.xds.next_stream)
    for _ in range(2):  # one subscription per type
        await trio.to_thread.run_sync(stream.next_request)
    return stream


async def _until_ready(agent: AgentProc, limit: float = 20) -> None:
    with trio.move_on_after(limit):
        while (status := await trio.to_thread.run_sync(agent.readiness))[0] != 200:  # noqa: ASYNC110 - another process
            await trio.sleep(0.1)
        return
    raise AssertionError(f"agent not ready: {status}")


async def test_ztunnel_run_with_only_istiods_environment_serves_xds_workloads(
    tmp_path: Path,
) -> None:
    """The issue's done-when, with agents as processes: the client's agent and the
    server's agent know nothing but istiod's address, a token and istiod's root."""
    base = random_base()
    client_ip, server_ip, vip = f"{base}.1", f"{base}.2", f"{base}.100"
    resources = [
        ("Kubernetes//Pod/default/client", "1", workload("client", client_ip, sa="client")),
        ("Kubernetes//Pod/default/server", "1",
         workload("server", server_ip, sa="server",
                  services={ECHO_KEY: {SERVICE_PORT: APP_PORT}})),
        (ECHO_KEY, "1", service("echo", vip, ports={SERVICE_PORT: APP_PORT})),
    ]  # fmt: skip
    with fake_istiod() as istiod, trio.fail_after(90):
        envs = {
            "client": {
                **agent_env(client_ip, "default/client/client"),
                **istio_env(tmp_path, istiod, "client"),
            },
            "server": {
                **agent_env(server_ip, "default/server/server"),
                **istio_env(tmp_path, istiod, "server"),
            },
        }
        for env in envs.values():
            assert not {"CA_DIR", "FAKE_CA", "LOCAL_XDS_PATH", "LOCAL_XDS"} & env.keys()
        with ztunnel_run(envs["client"]) as client, ztunnel_run(envs["server"]) as server:
            streams: dict[str, FakeStream] = {}
            agents = {"client": client, "server": server}
            for _ in agents:
                stream = await _subscribed(istiod)
                token = stream.metadata.get("authorization", "")
                assert token.startswith("Bearer jwt-of-")
                name = token.removeprefix("Bearer jwt-of-")
                # Not ready before istiod's first push (ztunnel's "state manager").
                status, body = await trio.to_thread.run_sync(agents[name].readiness)
                assert status == 503 and "xDS: waiting for the initial sync" in body
                stream.push(ADDRESS_TYPE, resources)
                stream.push(AUTHORIZATION_TYPE, [])
                streams[name] = stream
            await _until_ready(client)
            await _until_ready(server)

            async with trio.open_nursery() as nursery:
                await nursery.start(serve_echo, server_ip, APP_PORT)
                socks = (client_ip, int(client.ready["socks5"].rsplit(":", 1)[1]))
                conn = await socks5_connect(socks, vip, SERVICE_PORT, local_ip=client_ip)
                assert await echo_roundtrip(conn, b"via istiod") == b"via istiod"
                await conn.aclose()

                # Both certificates came over the CA protocol, for the xDS identities,
                # with the agents' own tokens and without impersonation (dedicated mode).
                asked = {
                    (r.csr != "", h["authorization"], h["clusterid"],
                     "ImpersonatedIdentity" in r.metadata.fields, r.validity_duration)
                    for r, h in istiod.csrs
                }  # fmt: skip
                assert asked == {
                    (True, "Bearer jwt-of-client", "Kubernetes", False, 60),
                    (True, "Bearer jwt-of-server", "Kubernetes", False, 60),
                }
                dump = await trio.to_thread.run_sync(server.config_dump)
                certs = {c["identity"]: c for c in dump["certificates"]}
                assert certs["spiffe://cluster.local/ns/default/sa/server"]["state"] == "Available"
                control = dump["controlPlane"]
                assert control["xds"]["synced"] and control["xds"]["acks"] >= 2
                assert control["xds"]["nacks"] == 0 and control["xds"]["connections"] == 1
                assert control["ca"]["requests"] >= 1 and control["ca"]["failures"] == 0
                assert dump["config"]["caDir"] is None and not dump["config"]["fakeCa"]

                # A policy pushed over xDS to the server's agent is enforced.
                nonce = streams["server"].push(
                    AUTHORIZATION_TYPE, [("default/deny-app", "2", deny_port("deny-app", APP_PORT))]
                )
                # The ACK of *this* push (earlier ACKs may still be queued on a slow machine).
                while (
                    await trio.to_thread.run_sync(streams["server"].next_request)
                ).response_nonce != nonce:
                    pass
                with pytest.raises(Socks5Refused):
                    await socks5_connect(socks, server_ip, APP_PORT, local_ip=client_ip)
                nursery.cancel_scope.cancel()


# -- wiring, without processes ---------------------------------------------------------------


def _config(**env: str) -> Config:
    base = {
        "ZTUNNEL_ADMIN_ADDR": "127.0.0.1:0",
        "ZTUNNEL_STATS_ADDR": "127.0.0.1:0",
        "ZTUNNEL_READINESS_ADDR": "127.0.0.1:0",
    }
    return Config.from_sources({**base, **env})


def test_shared_mode_under_istiod_takes_pods_from_istio_cni_and_impersonates() -> None:
    agent = Agent.from_config(_config(XDS_ADDRESS="istiod.istio-system.svc:15012"))
    assert isinstance(agent.ca, IstioCAClient)
    assert agent.ca.config.impersonate  # pods' identities, asked for by the node
    assert agent.ca.config.address == "istiod.istio-system.svc:15012"  # as ztunnel
    assert set(agent.dump_sections) == {"ca", "xds", "zds"}
    zds = agent.config_dump()["controlPlane"]["zds"]
    assert zds["path"] == "/var/run/ztunnel/ztunnel.sock"  # ztunnel's default INPOD_UDS
    reasons = agent.readiness()
    assert any(r.startswith("xDS: waiting for the initial sync") for r in reasons)
    assert any(r.startswith("istio-cni: not connected") for r in reasons)


def test_dedicated_mode_asks_for_its_own_identity() -> None:
    agent = Agent.from_config(
        _config(
            PROXY_MODE="dedicated",
            PROXY_WORKLOAD_INFO="default/a/sa",
            CA_ADDRESS="https://ca.example:15012",
            LOCAL_XDS="workloads: []",
        )
    )
    assert isinstance(agent.ca, IstioCAClient)
    assert not agent.ca.config.impersonate
    assert set(agent.dump_sections) == {"ca"}


def test_istio_cni_installs_the_rules_so_the_agent_uses_no_redirector() -> None:
    agent = Agent(_config(FAKE_CA="true"), ca=FakeCA.ephemeral())
    zds, controller = attach_zds_source(agent, "/run/cni.sock")
    assert isinstance(controller.redirector, NoRedirector)
    assert controller.source is zds
    assert zds.run in agent.extra_services and controller.run in agent.extra_services
    assert zds.report_starts and controller.on_start is not None


FAKE = {"FAKE_CA": "true"}
UDS = {"INPOD_UDS": "/run/cni.sock"}


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({"CA_ADDRESS": "ca:1", "CA_DIR": "/x"}, {}, "CA_ADDRESS: a remote CA and CA_DIR"),
        ({"CA_ADDRESS": "ca:1", **FAKE}, {}, "CA_ADDRESS: a remote CA and FAKE_CA"),
        ({"XDS_ADDRESS": "i:1", "LOCAL_XDS": "workloads: []"}, {}, "XDS_ADDRESS.*LOCAL_XDS"),
        ({**UDS, **FAKE, "PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "a/b/c"}, {},
         "INPOD_UDS: istio-cni's pods need PROXY_MODE=shared"),
        ({"XDS_ADDRESS": "i:1", "REDIRECT_MODE": "iptables"}, {}, "REDIRECT_MODE: iptables"),
        ({"XDS_ADDRESS": "i:1"}, {"cluster_file": "c.yaml", "cluster_prefix": "zt000000"},
         "cannot be combined with XDS_ADDRESS"),
        ({**UDS, **FAKE}, {"cluster_file": "c.yaml", "cluster_prefix": "zt000000"},
         "cannot be combined with INPOD_UDS"),
        ({**UDS, **FAKE}, {"policy_dir": "/p"}, "--policies"),
        ({"XDS_ADDRESS": "i:1", "PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "a/b/c"},
         {"policy_dir": "/p"}, "--policies: /p: policies come from istiod"),
        ({"XDS_ADDRESS": "not an address"}, {}, "^XDS_ADDRESS: expected"),
        ({"CA_ADDRESS": "https://ca", **UDS}, {}, "^CA_ADDRESS: expected"),
        ({**FAKE}, {}, "needs a pod source"),
        ({"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "a/b/c"}, {}, "CA_ADDRESS"),
    ],
)  # fmt: skip
def test_inconsistent_control_plane_settings_are_refused(
    env: dict[str, str], args: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        Agent.from_config(_config(**env), **args)


async def test_readiness_waits_for_the_first_xds_sync(tmp_path: Path) -> None:
    from tests.xds_fakes import fake_xds_server

    (tmp_path / "token").write_text("jwt")
    with fake_xds_server() as (fake, port), trio.fail_after(20):
        agent = Agent.from_config(
            _config(
                AUTH_TOKEN=str(tmp_path / "token"),
                PROXY_MODE="dedicated",
                PROXY_WORKLOAD_INFO="default/a/sa",
                XDS_ADDRESS=f"http://127.0.0.1:{port}",
                FAKE_CA="true",
                ZTUNNEL_OUTBOUND_ADDR="127.0.0.1:0",
                ZTUNNEL_INBOUND_ADDR="127.0.0.1:0",
                ZTUNNEL_INBOUND_PLAINTEXT_ADDR="127.0.0.1:0",
            )
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            stream = await trio.to_thread.run_sync(fake.next_stream)
            assert any(r.startswith("xDS: waiting") for r in agent.readiness())
            stream.push(
                ADDRESS_TYPE,
                [("Kubernetes//Pod/default/a", "1", workload("a", "127.0.0.9", sa="sa"))],
            )
            stream.push(AUTHORIZATION_TYPE, [])
            with trio.fail_after(10):
                while any(r.startswith("xDS") for r in agent.readiness()):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert agent.store.workload_by_uid("Kubernetes//Pod/default/a") is not None
            nursery.cancel_scope.cancel()
