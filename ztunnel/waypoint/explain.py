"""What the waypoint would do with one HTTP request, and what it is configured with (sans-IO).

``explain_request`` runs the same steps as the request path without sending
anything: the L7 decision (deciding policy and rule, or why every ALLOW policy
failed), then the route (rule, backends and their weights, retry and timeout)
when the request is allowed. ``config_dump`` lists routes, policies and the
warnings collected while parsing them. Both return JSON-ready dicts for the
admin endpoint (``/config_dump``, ``/explain_request``) and ``ztunnel ctl``.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from typing import Any

from ztunnel.model.identity import Identity
from ztunnel.model.workload import Service
from ztunnel.policy.l7 import decision_to_json, evaluate, explain
from ztunnel.policy.l7match import RequestAttrs
from ztunnel.waypoint.messages import RequestHead
from ztunnel.waypoint.routing import default_rule
from ztunnel.waypoint.state import WaypointState


class ExplainError(ValueError):
    """The query names no known Service (answered 400 by the admin endpoint)."""


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, tuple | list | frozenset | set):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, frozenset | set) else items
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def config_dump(state: WaypointState) -> dict[str, Any]:
    cfg = state.config
    return {
        "waypoint": f"{state.waypoint.namespace}/{state.waypoint.name}",
        "routes": [_jsonable(r) for r in cfg.routes.routes],
        "l7Policies": [_jsonable(p) for p in cfg.policies],
        "warnings": list(cfg.warnings),
    }


def find_service(state: WaypointState, target: str) -> tuple[Service, int]:
    """``VIP:port`` or ``hostname:port`` -> (service, port)."""
    host, sep, port_text = target.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ExplainError(f"{target!r}: expected <vip|hostname>:<port>")
    host = host.strip("[]")
    try:
        service = state.store.service_by_vip(ipaddress.ip_address(host))
    except ValueError:
        service = state.store.service_by_hostname(host)
    if service is None:
        raise ExplainError(f"{target!r}: no such service")
    return service, int(port_text)


def explain_request(
    state: WaypointState,
    target: str,
    method: str,
    path: str,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    source: Identity | None = None,
    source_ip: str = "0.0.0.0",
) -> dict[str, Any]:
    """The decision and route for ``method path`` sent to ``target`` by ``source``."""
    service, port = find_service(state, target)
    lower = tuple((k.lower(), v) for k, v in headers)
    head = RequestHead(method, path, service.hostname, lower)
    attrs = RequestAttrs(
        src_ip=ipaddress.ip_address(source_ip),
        dst_port=port,
        method=method,
        path=path,
        host=service.hostname,
        headers=lower,
        src_identity=source,
    )
    decision = evaluate(state.policies_for(service), attrs)
    out: dict[str, Any] = {
        "service": service.hostname,
        "port": port,
        "decision": decision_to_json(decision),
        "explanation": explain(decision),
    }
    if not decision.allowed:
        out["response"] = {"status": 403, "body": "RBAC: access denied"}
        return out
    routes = state.routes_for(service, port)
    selected = (
        default_rule(service.namespace, service.name, port)
        if routes is None
        else routes.select(head)
    )
    if selected is None:
        out["response"] = {"status": 404, "reason": "no route matched"}
        return out
    rule = selected.rule
    out["route"] = {
        "name": selected.name,
        "match": _jsonable(selected.match),
        "backends": [
            {"service": f"{b.namespace}/{b.name}", "port": b.port, "weight": b.weight}
            for b in rule.backends
        ],
        "redirect": _jsonable(rule.filters.redirect),
        "timeout": rule.timeout,
        "retry": _jsonable(rule.retry),
    }
    return out
