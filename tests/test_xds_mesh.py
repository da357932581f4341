"""Phase-1 composition: two agents whose state comes only from a fake istiod (xDS, grpcio)
and whose certificates come only over the CA protocol from ``ca serve``'s service (no CA
key in any agent): traffic flows, and a policy pushed over xDS is enforced."""

from __future__ import annotations

import datetime
from pathlib import Path

import trio
from mesh_apps import echo_roundtrip, serve_echo

from tests.xds_fakes import ADDRESS_TYPE, AUTHORIZATION_TYPE, fake_xds_server, service, workload
from ztunnel.agent import Agent
from ztunnel.grpc.tls import server_context
from ztunnel.identity.ca import ROOT_CERT, init_ca_dir
from ztunnel.identity.ca_server import CAService, StaticTokens, load_ca_dir, serve
from ztunnel.identity.ca_server import serving_certificate as serving_cert
from ztunnel.identity.istio_ca import IstioCAClient, IstioCAConfig
from ztunnel.model.identity import Identity
from ztunnel.proto import authorization_pb2 as apb
from ztunnel.sources.xds import XdsClient, XdsConfig
from ztunnel.sources.xds_protocol import build_node
from ztunnel.state.store import StateStore
from ztunnel.testing.loopback import (
    APP_PORT,
    SERVICE_PORT,
    Socks5Refused,
    agent_config,
    random_base,
    socks5_connect,
)

TD = "cluster.local"
CLIENT = Identity(TD, "default", "client")
SERVER = Identity(TD, "default", "server")
NODE_AGENT = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
ECHO_KEY = "default/echo.default.svc.cluster.local"


def _deny_client() -> apb.Authorization:
    match = apb.Match(principals=[apb.StringMatch(exact="cluster.local/ns/default/sa/client")])
    return apb.Authorization(
        name="deny-client", namespace="default", scope=apb.NAMESPACE, action=apb.DENY,
        rules=[apb.Rule(clauses=[apb.Clause(matches=[match])])],
    )  # fmt: skip


async def test_agents_on_xds_state_and_istio_ca_certificates(tmp_path: Path) -> None:
    base = random_base()
    ca_dir = tmp_path / "ca"
    init_ca_dir(ca_dir)
    (tmp_path / "tokens.yaml").write_text(
        "tokens:\n"
        f"  - {{token: node-a, node: node-a, identity: '{NODE_AGENT}'}}\n"
        f"  - {{token: node-b, node: node-b, identity: '{NODE_AGENT}'}}\n"
    )
    placement = {"node-a": {CLIENT}, "node-b": {SERVER}}
    service_ = CAService(
        load_ca_dir(ca_dir),
        StaticTokens(tmp_path / "tokens.yaml"),
        lambda node: placement.get(node, set()),
        trusted_node_agents={Identity(TD, "istio-system", "ztunnel")},
    )
    chain, key = serving_cert(ca_dir, ["istiod.istio-system.svc"], ["127.0.0.1"])
    (tmp_path / "ca.crt").write_bytes(chain)
    (tmp_path / "ca.key").write_bytes(key)
    ca_tls = server_context(str(tmp_path / "ca.crt"), str(tmp_path / "ca.key"))

    resources = [
        ("Kubernetes//Pod/default/client", "1",
         workload("client", f"{base}.1", sa="client", node="node-a")),
        ("Kubernetes//Pod/default/server", "1",
         workload("server", f"{base}.2", sa="server", node="node-b",
                  services={ECHO_KEY: {SERVICE_PORT: APP_PORT}})),
        (ECHO_KEY, "1", service("echo", f"{base}.100", ports={SERVICE_PORT: APP_PORT})),
    ]  # fmt: skip

    with trio.fail_after(60), fake_xds_server() as (fake, xds_port):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                lambda task_status: serve(service_, port=0, host="127.0.0.1",
                                          ssl_context=ca_tls, task_status=task_status)
            )  # fmt: skip
            ca_port = listeners[0].socket.getsockname()[1]

            stores, clients, streams = [], [], []
            for name in ("a", "b"):
                store = StateStore()
                xds = XdsClient(
                    XdsConfig(address=f"http://127.0.0.1:{xds_port}"),
                    store,
                    build_node(pod_name=f"ztunnel-{name}", pod_namespace="istio-system",
                               node_name=f"node-{name}"),
                )  # fmt: skip
                await nursery.start(xds.run)
                stream = await trio.to_thread.run_sync(fake.next_stream)
                for _ in range(2):
                    await trio.to_thread.run_sync(stream.next_request)
                stream.push(ADDRESS_TYPE, resources)
                stream.push(AUTHORIZATION_TYPE, [])
                stores.append(store)
                clients.append(xds)
                streams.append(stream)
            for xds in clients:
                await xds.synced.wait()

            agents = []
            for name, ip, info in (("a", f"{base}.1", "default/client/client"),
                                   ("b", f"{base}.2", "default/server/server")):  # fmt: skip
                (tmp_path / f"token-{name}").write_text(f"node-{name}")
                ca_client = IstioCAClient(
                    IstioCAConfig(
                        address=f"https://127.0.0.1:{ca_port}",
                        root_cert=ca_dir / ROOT_CERT,
                        alt_hostname="istiod.istio-system.svc",
                        token_path=tmp_path / f"token-{name}",
                    )
                )
                agent = Agent(agent_config(ip, info), ca=ca_client, store=stores.pop(0))
                await nursery.start(agent.run)
                agents.append(agent)
            await nursery.start(serve_echo, f"{base}.2", APP_PORT)

            socks = agents[0].bound["socks5"]
            stream = await socks5_connect(socks, f"{base}.100", SERVICE_PORT, local_ip=f"{base}.1")
            reply = await echo_roundtrip(stream, b"over xDS and the Istio CA")
            await stream.aclose()
            assert reply == b"over xDS and the Istio CA"
            # both certificates came over the CA protocol, for the right identities
            issued = service_.registry.get_sample_value("ztunnel_ca_certificates_issued_total")
            assert issued is not None and issued >= 2
            assert agents[0].secrets.get(CLIENT) is not None
            server_cert = agents[1].secrets.get(SERVER)
            assert server_cert is not None
            lifetime = server_cert.not_after - server_cert.not_before
            assert lifetime == datetime.timedelta(seconds=agents[1].config.secret_ttl)

            # a DENY pushed over xDS to the server's agent is enforced on new connections
            streams[1].push(AUTHORIZATION_TYPE, [("default/deny-client", "2", _deny_client())])
            await trio.to_thread.run_sync(streams[1].next_request)
            try:
                await socks5_connect(socks, f"{base}.2", APP_PORT, local_ip=f"{base}.1")
                raise AssertionError("connection was allowed")
            except Socks5Refused as exc:
                assert exc.reply == 2
            nursery.cancel_scope.cancel()
