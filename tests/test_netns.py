"""NetNamespace against the real kernel: sockets live where they were made, threads come back."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztunnel.errors import ZtunnelError
from ztunnel.redirect.netns import (
    NetNamespace,
    NetnsError,
    create_named,
    delete_named,
    list_named,
)
from ztunnel.redirect.routes import routes_state

pytestmark = pytest.mark.root


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    name = f"zt{secrets.token_hex(3)}-t"
    ns = create_named(name)
    try:
        yield ns
    finally:
        ns.close()
        delete_named(name)


def _current_ident() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return (st.st_dev, st.st_ino)


def test_listener_made_in_netns_is_reachable_only_there(netns: NetNamespace) -> None:
    listener = netns.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]

        inside = netns.socket()
        with inside:
            inside.settimeout(5)
            inside.connect(("127.0.0.1", port))
            conn, _ = listener.accept()
            conn.close()

        # The same port on the caller's own loopback is a different stack: refused.
        outside = socket.socket()
        with outside, pytest.raises(ConnectionRefusedError):
            outside.settimeout(5)
            outside.connect(("127.0.0.1", port))


def test_entered_restores_thread_netns_even_when_body_raises(netns: NetNamespace) -> None:
    before = _current_ident()
    with pytest.raises(RuntimeError, match="boom"), netns.entered():
        assert _current_ident() == netns.ident
        raise RuntimeError("boom")
    assert _current_ident() == before


def test_ident_tells_namespaces_apart_and_survives_reopen(netns: NetNamespace) -> None:
    with NetNamespace.current() as here:
        assert here.ident != netns.ident
        assert here.ident == _current_ident()
    with NetNamespace.open(netns.path) as again:
        assert again.ident == netns.ident


def test_recreated_namespace_has_a_new_ident() -> None:
    name = f"zt{secrets.token_hex(3)}-r"
    try:
        with create_named(name) as first:
            old = first.ident
        delete_named(name)
        with create_named(name) as second:
            assert second.ident != old
    finally:
        delete_named(name)


def test_run_executes_inside_the_namespace(netns: NetNamespace) -> None:
    netns.run(["ip", "addr", "add", "10.123.45.6/32", "dev", "lo"])
    out = netns.run(["ip", "-o", "addr", "show", "dev", "lo"]).stdout
    assert "10.123.45.6/32" in out


def test_lifecycle_and_errors() -> None:
    name = f"zt{secrets.token_hex(3)}-l"
    ns = create_named(name)
    try:
        assert name in list_named()
        ns.close()
        assert ns.closed
        with pytest.raises(NetnsError):
            _ = ns.fd
    finally:
        assert delete_named(name) is True
    assert delete_named(name) is False
    assert name not in list_named()
    with pytest.raises(ZtunnelError):
        NetNamespace.named(name)
    with pytest.raises(NetnsError):
        NetNamespace.named("../etc")


def test_run_failures_are_netns_errors(
    netns: NetNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Callers (the enrollment controller) handle NetnsError; anything else used to escape.
    with pytest.raises(NetnsError, match="timed out"):
        netns.run(["sleep", "5"], timeout=0.2)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nsenter to be found
    with pytest.raises(NetnsError, match="cannot run nsenter"):
        netns.run(["true"])


def test_unparseable_ip_json_is_a_netns_error(
    netns: NetNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "ip"
    fake.write_text("#!/bin/sh\necho 'Warning: not json'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")  # nsenter finds our ip
    with pytest.raises(NetnsError, match="not JSON"):
        routes_state(netns, fwmark=0x111, mask=0xFFF, table=100)
