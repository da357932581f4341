"""Bugs the fuzz runs found, kept as regression tests.

hbone-connection (fuzz/run.py, atheris) stopped on a libFuzzer timeout: a peer that lowers
SETTINGS_INITIAL_WINDOW_SIZE after we sent data makes the stream's send window negative
(RFC 9113 §6.9.2 allows that). ``HboneEngine.send_data`` then returns the negative window
as "bytes taken", and ``HboneStream.send_all`` loops on ``view = view[sent:]`` without ever
awaiting: the agent's event loop spins, every connection of the process stops. Any HBONE
peer could do it (a client of our 15008, or a server our pool dials). Fixed in hbone/
(the window is clamped at 0 and send_all waits for WINDOW_UPDATE).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h2.config
import h2.connection
import h2.settings
import pytest

from ztunnel.hbone.engine import HboneEngine


def _stream_with_negative_window() -> HboneEngine:
    server = HboneEngine(client=False)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    peer.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
    server.receive_data(peer.data_to_send())
    peer.receive_data(server.data_to_send())
    server.respond(1, 200)
    assert server.send_data(1, b"x" * 100_000) == 65_535  # the whole initial window
    peer.receive_data(server.data_to_send())
    peer.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    server.receive_data(peer.data_to_send())
    return server


def test_send_data_never_reports_negative_bytes() -> None:
    server = _stream_with_negative_window()
    assert server.send_data(1, b"y" * 10) >= 0


def test_send_window_is_never_negative() -> None:
    assert _stream_with_negative_window().send_window(1) >= 0


# The same through the real driver, in a child process (a frozen event loop cannot be
# interrupted from inside): a handler writes the whole window, the peer lowers
# INITIAL_WINDOW_SIZE to 0, the handler writes again. Virtual time: a fixed agent ends at once.
FREEZE = textwrap.dedent(
    """\
    import trio, trio.testing, h2.connection, h2.config, h2.settings, h2.events
    from ztunnel.hbone.connection import serve_hbone

    async def handler(req, stream):
        await stream.respond(200)
        await stream.send_all(b"x" * 65535)
        await trio.sleep(1)
        await stream.send_all(b"y" * 10)

    async def main():
        client, server = trio.testing.memory_stream_pair()
        peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        peer.initiate_connection()
        peer.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_hbone, server, handler)
            await client.send_all(peer.data_to_send())
            got = 0
            while got < 65535:
                for ev in peer.receive_data(await client.receive_some(1 << 20)):
                    if isinstance(ev, h2.events.DataReceived):
                        got += len(ev.data)
                await client.send_all(peer.data_to_send())
            peer.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            await client.send_all(peer.data_to_send())
            await trio.sleep(5)
            print("event loop still alive", flush=True)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    """
)


def test_a_peer_lowering_the_window_cannot_freeze_the_event_loop() -> None:
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run(
            [sys.executable, "-c", FREEZE], cwd=root, capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the event loop froze (no progress in 15 s)")
    assert "event loop still alive" in proc.stdout, proc.stdout + proc.stderr


# -- found by the fuzz runs, fixed in the policy translator and the local config -------------------


@pytest.mark.parametrize(
    "doc",
    [
        "apiVersion: security.istio.io/v1beta1\nkind: {mtls: {mICT}}\n",  # fuzz: istio-policy
        "apiVersion: [security.istio.io/v1]\nkind: AuthorizationPolicy\n",
        "apiVersion: security.istio.io/v1\nkind: [AuthorizationPolicy]\n",
    ],
)
def test_policy_documents_with_non_string_kind_or_version(doc: str) -> None:
    """A mapping as ``kind`` raised TypeError (unhashable) out of the translator."""
    import yaml

    from ztunnel.errors import ConfigError
    from ztunnel.policy.istio import translate_documents

    try:
        result = translate_documents(yaml.safe_load_all(doc))
    except ConfigError as exc:
        assert "not supported" in str(exc)
    else:
        assert result.policies == [] and result.warnings


def test_an_unhashable_mapping_key_in_the_local_config_is_a_config_error() -> None:
    """``{[22]}`` as a key raised TypeError from the duplicate-key check (fuzz: localconfig)."""
    from ztunnel.errors import ConfigError
    from ztunnel.sources.localconfig import load_local_config

    with pytest.raises(ConfigError, match="unhashable key"):
        load_local_config("policies: [{rules: [[{matches: [{[22]}]}]]}]", "LOCAL_XDS")
