"""What every proxy of the agent shares: config, state, certificates, telemetry."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import structlog

from ztunnel.config import Config
from ztunnel.identity.manager import SecretManager
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import ConnectionTracker

OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_PORT, SOCKS5_PORT = 15001, 15006, 15008, 15080


@dataclass
class ProxyContext:
    config: Config
    store: StateStore
    secrets: SecretManager
    tracker: ConnectionTracker
    rng: random.Random = field(default_factory=random.Random)
    log: structlog.stdlib.BoundLogger = field(
        default_factory=lambda: structlog.get_logger("ztunnel.proxy")
    )

    @property
    def illegal_ports(self) -> frozenset[int]:
        """Ports a connection may never target on loopback (self-calls), as ztunnel's."""
        ports = {OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_PORT}
        for addr in (
            self.config.outbound_addr,
            self.config.inbound_addr,
            self.config.inbound_plaintext_addr,
        ):
            ports.add(addr[1])
        if self.config.socks5_enabled:
            ports.update({SOCKS5_PORT, self.config.socks5_addr[1]})
        return frozenset(ports)
