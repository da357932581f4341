"""The agent's own well-known ports (ztunnel's, reference §1.1): the one place they are named.

Listener addresses in ``Config`` default to these; the self-call check refuses a
connection whose destination is one of the agent's listeners (these defaults and
whatever the configuration moved them to).
"""

from __future__ import annotations

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
