"""How long a graceful drain (SIGTERM or ``POST /quitquitquit``) may take (reference §2.6).

ztunnel's rule (``src/config.rs``): ``CONNECTION_TERMINATION_DEADLINE`` if set;
otherwise derived from ``TERMINATION_GRACE_PERIOD_SECONDS`` (g-5 when g > 10,
else g-1, at least 1 s) so the drain ends before the kubelet's SIGKILL;
otherwise 5 s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ztunnel.errors import ConfigError

DEFAULT_DEADLINE = 5.0
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str, field: str) -> float:
    """``500ms``, ``5s``, ``1m``, ``1h`` or bare seconds -> seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError("environment", field, f"{text!r} is not a duration like 5s or 500ms")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def termination_deadline(env: Mapping[str, str]) -> float:
    """Seconds to drain connections before force-closing them."""
    explicit = env.get("CONNECTION_TERMINATION_DEADLINE")
    if explicit:
        return parse_duration(explicit, "CONNECTION_TERMINATION_DEADLINE")
    grace = env.get("TERMINATION_GRACE_PERIOD_SECONDS")
    if not grace:
        return DEFAULT_DEADLINE
    try:
        g = int(grace)
    except ValueError as exc:
        raise ConfigError(
            "environment", "TERMINATION_GRACE_PERIOD_SECONDS", f"{grace!r} is not an integer"
        ) from exc
    return float(max(1, g - 5 if g > 10 else g - 1))
