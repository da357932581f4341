"""What every proxy of the agent shares: config, state, certificates, telemetry.

``WorkloadProxy`` turns this into the narrower ``FlowDeps`` its flows get.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ztunnel.config import Config
from ztunnel.hbone.settings import HboneSettings
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.identity.manager import CertCallback
from ztunnel.model.identity import Identity
from ztunnel.proxy.admission import PeerAdmission, PeerLimits
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import ConnectionTracker


class CertificateSource(Protocol):
    """Where proxies get certificates: the ``SecretManager`` itself, or (in a worker
    process) the control process's, through ``workers.certs.RemoteCertificates``."""

    async def fetch(self, identity: Identity) -> WorkloadCertificate: ...

    def subscribe(self, callback: CertCallback) -> Callable[[], None]: ...


@dataclass
class ProxyContext:
    config: Config
    store: StateStore
    secrets: CertificateSource
    tracker: ConnectionTracker
    rng: random.Random = field(default_factory=random.Random)
    # Data-plane processes sharing the limits per peer and per pod (ZTUNNEL_WORKER_THREADS):
    # each admits its share (``PeerLimits.share``).
    workers: int = 1
    # Built once from the config (raises ConfigError for values that cannot work).
    hbone: HboneSettings = field(init=False)
    peer_limits: PeerLimits = field(init=False)
    # Agent-wide: a peer's connections to every pod of the node count together.
    peers: PeerAdmission = field(init=False)

    def __post_init__(self) -> None:
        self.hbone = HboneSettings.from_config(self.config)
        self.peer_limits = PeerLimits.from_config(self.config).share(self.workers)
        self.peers = PeerAdmission(self.peer_limits)
