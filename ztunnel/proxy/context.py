"""What every proxy of the agent shares: config, state, certificates, telemetry.

``WorkloadProxy`` turns this into the narrower ``FlowDeps`` its flows get.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ztunnel.config import Config
from ztunnel.hbone.settings import HboneSettings
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
    # Built once from the config (raises ConfigError for values that cannot work).
    hbone: HboneSettings = field(init=False)

    def __post_init__(self) -> None:
        self.hbone = HboneSettings.from_config(self.config)
