"""What operators see: metrics, config_dump and readiness of running agents, over HTTP."""

from __future__ import annotations

import json
import urllib.request

import trio
from mesh_apps import echo_roundtrip, serve_echo
from prometheus_client.parser import text_string_to_metric_families

from ztunnel.testing.loopback import APP_PORT, LoopbackMesh, loopback_mesh, socks5_connect

SENT = b"x" * 12345
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVER = "spiffe://cluster.local/ns/default/sa/server"


async def get(addr: tuple[str, int], path: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await trio.to_thread.run_sync(fetch)


async def wait_ready(addr: tuple[str, int]) -> None:
    """Poll the readiness endpoint (as a kubelet would) until it answers 200."""
    with trio.fail_after(5):
        while (await get(addr, "/healthz/ready"))[0] != 200:  # noqa: ASYNC110 - polling HTTP
            await trio.sleep(0.02)


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out.append((sample.labels, sample.value))
    return out


async def one_connection(mesh: LoopbackMesh) -> None:
    stream = await socks5_connect(mesh.socks5, mesh.vip, 80, local_ip=mesh.client_ip)
    assert await echo_roundtrip(stream, SENT) == SENT
    await stream.aclose()
    # Both agents close their side asynchronously; wait until neither tracks it.
    with trio.fail_after(5):
        while (  # noqa: ASYNC110 - the tracker has no event to wait on; tests poll
            mesh.client_agent.tracker.open_connections()
            or mesh.server_agent.tracker.open_connections()
        ):
            await trio.sleep(0.01)


async def test_metrics_report_the_known_connection_from_both_sides() -> None:
    with trio.fail_after(30):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
            await one_connection(mesh)
            for agent, reporter in (
                (mesh.client_agent, "source"),
                (mesh.server_agent, "destination"),
            ):
                for path in ("/metrics", "/stats/prometheus"):
                    status, text = await get(agent.bound["stats"], path)
                    assert status == 200
                    (opened,) = samples(text, "istio_tcp_connections_opened_total")
                    labels, value = opened
                    assert value == 1
                    assert labels["reporter"] == reporter
                    assert labels["source_workload"] == "client"
                    assert labels["source_workload_namespace"] == "default"
                    assert labels["source_principal"] == CLIENT
                    assert labels["destination_workload"] == "server"
                    assert labels["destination_principal"] == SERVER
                    assert labels["destination_service"] == "echo.default.svc.cluster.local"
                    assert labels["request_protocol"] == "tcp"
                    assert labels["connection_security_policy"] == "mutual_tls"
                    (closed,) = samples(text, "istio_tcp_connections_closed_total")
                    assert closed[1] == 1 and closed[0]["response_flags"] == "-"
                    # Bytes equal what the app sent, in both directions.
                    (sent,) = samples(text, "istio_tcp_sent_bytes_total")
                    (received,) = samples(text, "istio_tcp_received_bytes_total")
                    assert sent[1] == received[1] == len(SENT)
                    assert samples(text, "istio_build")[0][0]["component"] == "ztunnel"
                    assert samples(text, "istio_tcp_sockets_open")[0][1] == 0
            nursery.cancel_scope.cancel()


async def test_config_dump_has_ztunnels_field_names() -> None:
    with trio.fail_after(30):
        async with loopback_mesh() as mesh:
            status, text = await get(mesh.client_agent.bound["admin"], "/config_dump")
            assert status == 200
            dump = json.loads(text)
            assert {
                "workloads",
                "services",
                "policies",
                "certificates",
                "staticConfig",
                "version",
                "config",
                "workloadState",
                "connections",
            } <= dump.keys()
            workload = next(w for w in dump["workloads"] if w["name"] == "server")
            assert {
                "uid",
                "name",
                "namespace",
                "serviceAccount",
                "workloadIps",
                "protocol",
                "trustDomain",
                "node",
                "status",
            } <= workload.keys()
            assert workload["protocol"] == "HBONE"
            service = dump["services"][0]
            assert {"name", "namespace", "hostname", "vips", "ports", "endpoints"} <= service.keys()
            assert service["vips"] == [f"/{mesh.vip}"]
            (endpoint,) = service["endpoints"].values()
            assert endpoint["workloadUid"] == workload["uid"]
            # The client's certificate is issued lazily: make one connection, then look.
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
                await one_connection(mesh)
                nursery.cancel_scope.cancel()
            dump = json.loads((await get(mesh.client_agent.bound["admin"], "/config_dump"))[1])
            (cert,) = dump["certificates"]
            assert cert["identity"] == CLIENT
            assert cert["state"] == "Available"
            leaf = cert["certChain"][0]
            assert {"pem", "serialNumber", "validFrom", "expirationTime"} <= leaf.keys()
            assert cert["rootCerts"]
            assert dump["config"]["proxyMode"] == "dedicated"


async def test_readiness_and_admin_methods() -> None:
    with trio.fail_after(30):
        async with loopback_mesh() as mesh:
            agent = mesh.client_agent
            await wait_ready(agent.bound["readiness"])  # the certificate comes right after start
            assert await get(agent.bound["readiness"], "/healthz/ready") == (200, "ready\n")
            agent.pending["pod default/x"] = "failure to start proxy: address in use"
            status, text = await get(agent.bound["readiness"], "/healthz/ready")
            assert status == 503 and "address in use" in text
            metrics = (await get(agent.bound["stats"], "/metrics"))[1]
            assert samples(metrics, "istio_pending_proxy_count")[0][1] == 1
            assert samples(metrics, "istio_active_proxy_count")[0][1] == 1
            del agent.pending["pod default/x"]
            metrics = (await get(agent.bound["stats"], "/metrics"))[1]
            assert samples(metrics, "istio_pending_proxy_count")[0][1] == 0
            assert (await get(agent.bound["readiness"], "/healthz/ready"))[0] == 200
            status, text = await get(agent.bound["admin"], "/quitquitquit")
            assert status == 405 and "POST" in text
            assert (await get(agent.bound["admin"], "/nope"))[0] == 404
            status, text = await get(agent.bound["admin"], "/")
            assert status == 200 and "/config_dump" in text


class GatedCA:
    """A CA that issues nothing until the test opens the gate (a slow or unreachable CA)."""

    def __init__(self) -> None:
        from ztunnel.identity.ca import FakeCA

        self.inner = FakeCA.ephemeral()
        self.gate = trio.Event()

    async def create_certificate(self, csr_pem: bytes, validity: object) -> list[bytes]:
        await self.gate.wait()
        return await self.inner.create_certificate(csr_pem, validity)  # type: ignore[arg-type]


async def test_readiness_waits_for_the_workload_certificate() -> None:
    ca = GatedCA()
    with trio.fail_after(30):
        async with loopback_mesh(ca=ca) as mesh:  # type: ignore[arg-type]
            agent = mesh.client_agent
            status, text = await get(agent.bound["readiness"], "/healthz/ready")
            assert status == 503
            assert "certificate" in text and "not yet issued" in text
            ca.gate.set()
            await wait_ready(agent.bound["readiness"])
            dump = json.loads((await get(agent.bound["admin"], "/config_dump"))[1])
            assert [c["state"] for c in dump["certificates"]] == ["Available"]
