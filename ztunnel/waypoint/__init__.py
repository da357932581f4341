"""The waypoint: the optional L7 proxy (HBONE in, HTTP/1.1 + HTTP/2 aware, HBONE out).

Layout (docs/waypoint.md has the semantics):

* sans-IO: ``sniff`` (protocol detection), ``messages`` (heads), ``h2proto`` (HTTP/2),
  ``routes`` / ``routes_yaml`` / ``routing`` (Gateway API routes), ``backends`` (endpoint
  choice), ``state`` (routes + policies + mesh), ``explain`` (what would happen);
* trio drivers: ``h1server`` (h11), ``h2conn`` (HTTP/2 connections both ways),
  ``exchange`` (one request, either protocol), ``upstream`` (pooled calls to pods),
  ``proxy`` (the per-request pipeline), ``relay`` (raw bytes), ``server`` (the process core);
* ``telemetry``: request metrics and access logs.
"""

from __future__ import annotations

from ztunnel.waypoint.explain import config_dump, explain_request
from ztunnel.waypoint.server import Waypoint, WaypointConfig
from ztunnel.waypoint.state import L7Config, WaypointState
from ztunnel.waypoint.telemetry import WaypointMetrics

__all__ = [
    "L7Config",
    "Waypoint",
    "WaypointConfig",
    "WaypointMetrics",
    "WaypointState",
    "config_dump",
    "explain_request",
]
