"""What every proxy of the agent shares: config, state, certificates, telemetry.

``WorkloadProxy`` turns this into the narrower ``FlowDeps`` its flows get.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ztunnel.config import Config
from ztunnel.identity.manager import SecretManager
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import ConnectionTracker


@dataclass
class ProxyContext:
    config: Config
    store: StateStore
    secrets: SecretManager
    tracker: ConnectionTracker
    rng: random.Random = field(default_factory=random.Random)
