"""L4 authorization enforced by the destination agent, live updates, and explain."""

from __future__ import annotations

import io
import json

import trio
from mesh_apps import echo_roundtrip, serve_echo

from ztunnel.admin.ctl import main as ctl_main
from ztunnel.model.authorization import Action, Authorization, Match, MatchKind, Scope, StringMatch
from ztunnel.testing.loopback import (
    APP_PORT,
    LoopbackMesh,
    Socks5Refused,
    loopback_mesh,
    socks5_connect,
)

DENY_CLIENT = Authorization(
    name="deny-client",
    namespace="default",
    scope=Scope.NAMESPACE,
    action=Action.DENY,
    rules=(
        (
            (
                Match(
                    principals=(StringMatch(MatchKind.EXACT, "cluster.local/ns/default/sa/client"),)
                ),
            ),
        ),
    ),
)
ALLOW_OTHER = Authorization(
    name="allow-other",
    namespace="default",
    scope=Scope.NAMESPACE,
    action=Action.ALLOW,
    rules=(
        (
            (
                Match(
                    principals=(StringMatch(MatchKind.EXACT, "cluster.local/ns/default/sa/other"),)
                ),
            ),
        ),
    ),
)


def closed_with(mesh: LoopbackMesh, flag: str) -> float:
    total = 0.0
    for family in mesh.server_agent.metrics.connections_closed.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["response_flags"] == flag:
                total += sample.value
    return total


async def test_denied_connection_never_reaches_the_app() -> None:
    reached = []

    async def app(stream: trio.SocketStream) -> None:
        reached.append(1)
        await stream.aclose()

    with trio.fail_after(30):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            mesh.server_agent.store.upsert_policy(ALLOW_OTHER)
            listeners = await trio.open_tcp_listeners(APP_PORT, host=mesh.server_ip)
            nursery.start_soon(trio.serve_listeners, app, listeners)
            try:
                await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
                raise AssertionError("connection was allowed")
            except Socks5Refused as exc:
                assert exc.reply == 2  # "connection not allowed by ruleset" (the HBONE 401)
            assert reached == []
            assert closed_with(mesh, "DENY") == 1
            nursery.cancel_scope.cancel()


async def test_live_policy_change_closes_open_connection_and_refuses_new_ones() -> None:
    with trio.fail_after(30):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
            stream = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            await stream.send_all(b"hello")
            assert await stream.receive_some(100) == b"hello"

            mesh.server_agent.store.upsert_policy(DENY_CLIENT)

            # The open connection is cut: the client sees EOF (or a reset).
            with trio.fail_after(5):
                try:
                    rest = await stream.receive_some(100)
                except trio.BrokenResourceError:
                    rest = b""
            assert rest == b""
            await stream.aclose()
            assert closed_with(mesh, "DENY") == 1
            try:
                await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
                raise AssertionError("new connection was allowed")
            except Socks5Refused:
                pass

            # Removing the policy lets new connections through again.
            mesh.server_agent.store.remove_policy(DENY_CLIENT.key)
            again = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            assert await echo_roundtrip(again, b"back") == b"back"
            await again.aclose()
            nursery.cancel_scope.cancel()


async def test_ctl_explain_names_the_deciding_policy() -> None:
    with trio.fail_after(30):
        async with loopback_mesh() as mesh:
            mesh.server_agent.store.upsert_policy(DENY_CLIENT)
            host, port = mesh.server_agent.bound["admin"]
            admin = f"http://{host}:{port}"

            def ctl(*args: str) -> tuple[int, str, str]:
                out, err = io.StringIO(), io.StringIO()
                code = ctl_main(["--admin", admin, *args], out=out, err=err)
                return code, out.getvalue(), err.getvalue()

            code, text, _ = await trio.to_thread.run_sync(
                ctl, "explain", "--from", "default/client", "--to", f"{mesh.server_ip}:{APP_PORT}"
            )
            assert code == 0
            assert "DENY" in text and "default/deny-client" in text
            assert "spiffe://cluster.local/ns/default/sa/client" in text

            code, text, _ = await trio.to_thread.run_sync(
                ctl,
                "explain",
                "-o",
                "json",
                "--from",
                "spiffe://cluster.local/ns/default/sa/other",
                "--to",
                "echo.default.svc.cluster.local:80",
            )
            result = json.loads(text)
            assert code == 0
            assert result["results"][0]["decision"]["allowed"] is True
            assert result["results"][0]["destination"]["address"].endswith(f":{APP_PORT}")

            code, _, err = await trio.to_thread.run_sync(
                ctl, "explain", "--from", "nobody", "--to", f"{mesh.server_ip}:{APP_PORT}"
            )
            assert code == 1
            assert "no such pod" in err


async def test_selector_policy_attached_later_applies_to_streams_on_a_pooled_connection() -> None:
    """A pooled HBONE connection must not keep the destination's policy list of its handshake."""
    import dataclasses

    selector_policy = dataclasses.replace(
        ALLOW_OTHER, name="only-other", scope=Scope.WORKLOAD_SELECTOR
    )
    with trio.fail_after(30):
        async with loopback_mesh() as mesh, trio.open_nursery() as nursery:
            await nursery.start(serve_echo, mesh.server_ip, APP_PORT)
            first = await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
            assert await echo_roundtrip(first, b"one") == b"one"
            await first.aclose()
            store = mesh.server_agent.store
            server = store.find_workload("default", "server")
            assert server is not None
            store.upsert_policy(selector_policy)
            store.upsert_workload(
                dataclasses.replace(server, authorization_policies=(selector_policy.key,))
            )
            proxy = next(iter(mesh.client_agent.proxies.values()))
            assert proxy.pool.connection_count() == 1  # the next stream reuses it
            try:
                await socks5_connect(mesh.socks5, mesh.server_ip, APP_PORT)
                raise AssertionError("stream on the pooled connection was allowed")
            except Socks5Refused as exc:
                assert exc.reply == 2
            nursery.cancel_scope.cancel()
