"""The xDS client against a fake istiod written with grpcio: subscriptions with ztunnel's
node, ACK/NACK, workloads added/updated/removed in the StateStore, the last good state
kept on a malformed resource, initial_resource_versions on reconnect, readiness."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.grpc_peers import make_tls
from tests.xds_fakes import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    FakeStream,
    FakeXds,
    deny_port,
    fake_xds_server,
    service,
    workload,
)
from ztunnel.config import Config
from ztunnel.errors import ConfigError
from ztunnel.model.authorization import Action
from ztunnel.model.workload import TunnelProtocol
from ztunnel.sources.xds import XdsClient, XdsConfig, xds_config, xds_node
from ztunnel.sources.xds_protocol import build_node
from ztunnel.state.store import StateStore

TLS = make_tls(dns=("istiod.istio-system.svc",), ips=())
ECHO_KEY = "default/echo.default.svc.cluster.local"


@dataclass
class Env:
    fake: FakeXds
    client: XdsClient
    store: StateStore

    async def stream(self) -> FakeStream:
        return await trio.to_thread.run_sync(self.fake.next_stream)

    async def request(self, stream: FakeStream):  # type: ignore[no-untyped-def]
        return await trio.to_thread.run_sync(stream.next_request)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    (tmp_path / "root.pem").write_bytes(TLS.root_pem)
    (tmp_path / "token").write_text("ztunnel-token")
    store = StateStore()
    with fake_xds_server(TLS) as (fake, port):
        config = XdsConfig(
            address=f"https://127.0.0.1:{port}",
            root_cert=tmp_path / "root.pem",
            alt_hostname="istiod.istio-system.svc",
            token_path=tmp_path / "token",
            cluster_id="c1",
            headers=(("x-xds", "1"),),
        )
        node = build_node(
            instance_ip="10.0.0.5", pod_name="ztunnel-x", pod_namespace="istio-system",
            node_name="node1",
        )  # fmt: skip
        client = XdsClient(config, store, node)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            yield Env(fake, client, store)
            nursery.cancel_scope.cancel()
            fake.stop_all()


async def _subscribed(env: Env) -> FakeStream:
    stream = await env.stream()
    first = await env.request(stream)
    second = await env.request(stream)
    assert {first.type_url, second.type_url} == {ADDRESS_TYPE, AUTHORIZATION_TYPE}
    return stream


async def test_subscribes_with_ztunnels_node_and_headers(env: Env) -> None:
    stream = await env.stream()
    first = await env.request(stream)
    assert first.node.id == "ztunnel~10.0.0.5~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    meta = first.node.metadata.fields
    assert meta["NODE_NAME"].string_value == "node1"
    assert meta["INSTANCE_IPS"].string_value == "10.0.0.5"
    assert first.type_url == ADDRESS_TYPE and not first.initial_resource_versions
    assert stream.metadata["authorization"] == "Bearer ztunnel-token"
    assert stream.metadata["clusterid"] == "c1"
    assert stream.metadata["x-xds"] == "1"


async def test_workload_added_updated_removed_and_ready_after_sync(env: Env) -> None:
    stream = await _subscribed(env)
    assert not env.client.synced.is_set()
    nonce = stream.push(
        ADDRESS_TYPE,
        [
            ("Kubernetes//Pod/default/echo", "v1",
             workload("echo", "10.1.0.7", sa="echo", services={ECHO_KEY: {80: 8080}})),
            (ECHO_KEY, "v1", service("echo", "10.96.0.10")),
        ],
    )  # fmt: skip
    ack = await env.request(stream)
    assert ack.response_nonce == nonce and not ack.HasField("error_detail")
    w = env.store.workload_by_ip("10.1.0.7")
    assert w is not None and w.service_account == "echo" and w.protocol is TunnelProtocol.HBONE
    svc = env.store.service_by_vip("10.96.0.10")
    assert svc is not None and set(svc.endpoints) == {"Kubernetes//Pod/default/echo"}
    assert not env.client.synced.is_set()  # policies not synced yet
    stream.push(AUTHORIZATION_TYPE, [("default/deny-9999", "v1", deny_port("deny-9999", 9999))])
    await env.request(stream)
    with trio.fail_after(5):
        await env.client.synced.wait()
    policy = env.store.policy("default/deny-9999")
    assert policy is not None and policy.action is Action.DENY

    # update: a new IP
    stream.push(ADDRESS_TYPE, [("Kubernetes//Pod/default/echo", "v2",
                                workload("echo", "10.1.0.8", sa="echo"))])  # fmt: skip
    await env.request(stream)
    assert env.store.workload_by_ip("10.1.0.7") is None
    assert env.store.workload_by_ip("10.1.0.8") is not None
    # remove the workload and the policy
    stream.push(ADDRESS_TYPE, removed=["Kubernetes//Pod/default/echo"])
    await env.request(stream)
    stream.push(AUTHORIZATION_TYPE, removed=["default/deny-9999"])
    await env.request(stream)
    assert env.store.workload_by_uid("Kubernetes//Pod/default/echo") is None
    assert env.store.policy("default/deny-9999") is None
    assert env.client.nacks == 0


async def test_malformed_resource_is_nacked_and_last_good_state_kept(env: Env) -> None:
    stream = await _subscribed(env)
    stream.push(
        ADDRESS_TYPE, [("Kubernetes//Pod/default/echo", "v1", workload("echo", "10.1.0.7"))]
    )
    await env.request(stream)
    bad = workload("echo", "10.1.0.9")
    bad.workload.addresses[0] = b"\x01\x02\x03"  # not an IP
    nonce = stream.push(
        ADDRESS_TYPE,
        [
            ("Kubernetes//Pod/default/echo", "v2", bad),
            ("Kubernetes//Pod/default/other", "v1", workload("other", "10.1.0.20")),
            ("garbage", "v1", b"\xff\xff\xff"),
        ],
    )
    nack = await env.request(stream)
    assert nack.response_nonce == nonce
    assert nack.HasField("error_detail")
    assert "Kubernetes//Pod/default/echo: addresses" in nack.error_detail.message
    assert "garbage: cannot decode" in nack.error_detail.message
    # the bad update was not applied; the good resource in the same response was
    assert env.store.workload_by_ip("10.1.0.7") is not None
    assert env.store.workload_by_ip("10.1.0.9") is None
    assert env.store.workload_by_ip("10.1.0.20") is not None
    assert env.client.nacks == 1
    assert env.client.protocol.versions[ADDRESS_TYPE]["Kubernetes//Pod/default/echo"] == "v1"
    assert not env.client.synced.is_set()  # a NACK is not a sync


async def test_wrong_any_type_is_nacked(env: Env) -> None:
    stream = await _subscribed(env)
    stream.push(ADDRESS_TYPE, [("x", "v1", workload("x", "10.1.0.3"))], any_type=AUTHORIZATION_TYPE)
    nack = await env.request(stream)
    assert "expected 'type.googleapis.com/istio.workload.Address'" in nack.error_detail.message
    assert env.store.workloads() == []


async def test_reconnect_sends_initial_resource_versions(env: Env) -> None:
    stream = await _subscribed(env)
    stream.push(
        ADDRESS_TYPE,
        [("Kubernetes//Pod/default/echo", "v7", workload("echo", "10.1.0.7")),
         (ECHO_KEY, "v3", service("echo", "10.96.0.10"))],
    )  # fmt: skip
    await env.request(stream)
    stream.push(AUTHORIZATION_TYPE, [("default/p", "v1", deny_port("p", 1))])
    await env.request(stream)
    stream.end()  # istiod closes the stream (e.g. max connection age)
    again = await env.stream()
    first = await env.request(again)
    second = await env.request(again)
    by_type = {r.type_url: dict(r.initial_resource_versions) for r in (first, second)}
    assert by_type[ADDRESS_TYPE] == {"Kubernetes//Pod/default/echo": "v7", ECHO_KEY: "v3"}
    assert by_type[AUTHORIZATION_TYPE] == {"default/p": "v1"}
    assert first.node.id.startswith("ztunnel~")
    # the state survived the reconnect
    assert env.store.workload_by_ip("10.1.0.7") is not None
    assert env.client.connections == 2


async def test_backoff_between_refused_streams(tmp_path: Path) -> None:
    store = StateStore()
    with fake_xds_server() as (fake, port):
        fake.abort_next = 1000
        client = XdsClient(XdsConfig(address=f"http://127.0.0.1:{port}"), store, build_node())
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    attempts = 1000 - fake.abort_next
    # 10 ms doubling: 10+20+...+640 ms = 1.27 s, so at most 8 tries in the first second
    assert 3 <= attempts <= 8
    assert client.last_error is not None and "UNAVAILABLE" in client.last_error
    assert not client.synced.is_set()


def test_node_and_settings_from_ztunnels_environment() -> None:
    config = Config.from_sources(
        {
            "INSTANCE_IP": "10.0.0.9",
            "POD_NAME": "ztunnel-1",
            "POD_NAMESPACE": "istio-system",
            "NODE_NAME": "n1",
            "ISTIO_METAJSON_LABELS": '{"app": "ztunnel"}',
            "XDS_ADDRESS": "istiod.istio-system.svc:15012",
            "XDS_ROOT_CA": "SYSTEM",
            "XDS_HEADER_X_TENANT": "t1",
            "CLUSTER_ID": "c1",
            "INPOD_UDS": "/tmp/zds.sock",
        }
    )
    node = xds_node(config)
    assert node.id == "ztunnel~10.0.0.9~ztunnel-1.istio-system~istio-system.svc.cluster.local"
    assert node.metadata.fields["LABELS"].struct_value.fields["app"].string_value == "ztunnel"
    assert ipaddress.ip_address(node.metadata.fields["INSTANCE_IPS"].string_value)
    settings = xds_config(config)
    assert settings.address == "istiod.istio-system.svc:15012"
    assert settings.root_cert is None  # SYSTEM: the OS roots
    assert settings.headers == (("x-tenant", "t1"),)
    assert settings.cluster_id == "c1"
    assert str(settings.token_path) == "var/run/secrets/tokens/istio-token"
    with pytest.raises(ConfigError, match="ISTIO_METAJSON_BAD"):
        Config.from_sources({"ISTIO_METAJSON_BAD": "{not json"})
