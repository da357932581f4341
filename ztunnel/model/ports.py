"""The agent's own well-known ports (ztunnel's, reference §1.1): the one place they are named.

Listener addresses in ``Config`` default to these; ``AgentPorts`` is the set the
self-call checks use: these defaults plus whatever the configuration moved the
listeners to (``Config.agent_ports``), plus the ports a proxy actually bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ztunnel.model.address import IPAddress, SocketAddr

OUTBOUND = 15001
INBOUND_PLAINTEXT = 15006
INBOUND = 15008  # HBONE
DNS = 15053
SOCKS5 = 15080
ADMIN = 15000
STATS = 15020
READINESS = 15021

HBONE = INBOUND
# The proxy ports a captured connection could loop into (ztunnel's illegal_ports).
DATA_PLANE = frozenset({OUTBOUND, INBOUND_PLAINTEXT, INBOUND})
SERVICES = frozenset({ADMIN, STATS, READINESS})


def _ports(ports: Iterable[int]) -> frozenset[int]:
    return frozenset(p for p in ports if p)  # 0 = "any free port": not a port of ours


@dataclass(frozen=True, slots=True)
class AgentPorts:
    """The ports a connection must never be proxied back into.

    ``proxy``: the listeners of a workload proxy (outbound, inbound, inbound
    plaintext, SOCKS5 when enabled); they live where the workload's traffic
    arrives, so an inbound target port among them would loop (ztunnel's
    ``illegal_ports``). ``services``: admin, stats and readiness.
    """

    proxy: frozenset[int] = DATA_PLANE
    services: frozenset[int] = SERVICES

    @classmethod
    def of(cls, proxy: Iterable[int], services: Iterable[int] = SERVICES) -> AgentPorts:
        return cls(_ports(proxy), _ports(services))

    @property
    def all(self) -> frozenset[int]:
        return self.proxy | self.services

    def with_proxy(self, ports: Iterable[int]) -> AgentPorts:
        """These ports plus ``ports`` (e.g. what the listeners actually bound)."""
        return AgentPorts(self.proxy | _ports(ports), self.services)

    def is_self_call(
        self, dst: SocketAddr, is_local: Callable[[IPAddress], bool] | None = None
    ) -> bool:
        """An outbound destination that is this host on one of the agent's ports.

        ``dst`` is canonical, so ``::ffff:127.0.0.1`` is 127.0.0.1 here. The
        unspecified address counts as local: connecting to ``0.0.0.0`` / ``::``
        reaches this host's listeners on Linux. ``is_local`` tells whether an address
        belongs to the netns the connection would leave from (its pod or node IPs):
        there a proxy port is one of our own listeners (wildcard binds answer on every
        local address), a loop at the first hop.
        """
        ip = dst.ip
        if (ip.is_loopback or ip.is_unspecified) and dst.port in self.all:
            return True
        return dst.port in self.proxy and is_local is not None and is_local(ip)

    def is_proxy_port(self, port: int) -> bool:
        """An inbound target port that is one of the proxy's own listeners (a loop)."""
        return port in self.proxy
