"""eBPF redirection into an SO_REUSEPORT group: one listener per worker process on each port.

The tc programs pick "the agent's listener" with ``bpf_skc_lookup_tcp`` on the flow's own
tuple and ``bpf_sk_assign`` it. For a port with several listeners (ZTUNNEL_WORKER_THREADS >
1: each worker binds its own, SO_REUSEPORT), the kernel's lookup selects one member of the
group by the flow's hash, and the assignment keeps the group's choice: new connections
spread over the workers, and when a worker's listener closes (it died, or drained) the
rest of the group takes every new connection, none is dropped.
"""

from __future__ import annotations

import select
import socket
import time
from contextlib import ExitStack

import pytest
from test_ebpf_redirect import (  # noqa: F401 - fixtures
    POD,
    POD_IP,
    REMOTE,
    Net,
    agent_listener,
    connect,
    net,
    pin_root,
    redirector,
)

from ztunnel.redirect.ebpf import EbpfRedirector

pytestmark = pytest.mark.root


def accepted_by(listeners: list[socket.socket], n: int, timeout: float = 10) -> list[int]:
    """Accept ``n`` connections from whichever listener has one; how many each accepted."""
    counts = [0] * len(listeners)
    deadline = time.monotonic() + timeout
    while sum(counts) < n and time.monotonic() < deadline:
        ready, _, _ = select.select(listeners, [], [], 0.2)
        for sock in ready:
            conn, _ = sock.accept()
            conn.close()
            counts[listeners.index(sock)] += 1
    return counts


@pytest.mark.parametrize(
    ("port", "source", "dst"),
    [(15001, "pod", REMOTE), (15006, "peer", (POD_IP, 8080))],
    ids=["outbound-15001", "inbound-15006"],
)
def test_captured_connections_spread_over_the_group_and_survive_a_closed_member(
    net: Net,  # noqa: F811 - the fixture
    redirector: EbpfRedirector,  # noqa: F811
    port: int,
    source: str,
    dst: tuple[str, int],
) -> None:
    redirector.install(net.pod, POD)
    origin = net.pod if source == "pod" else net.peer
    with ExitStack() as stack:
        group = [stack.enter_context(agent_listener(net.pod, port)) for _ in range(2)]
        clients = [stack.enter_context(connect(origin, dst)) for _ in range(32)]
        counts = accepted_by(group, 32)
        assert sum(counts) == 32 and all(counts), counts  # every worker gets some
        for client in clients:
            client.close()

        group[0].close()  # a worker's listener goes away: the other takes everything
        clients = [stack.enter_context(connect(origin, dst)) for _ in range(16)]
        assert accepted_by(group[1:], 16) == [16]
