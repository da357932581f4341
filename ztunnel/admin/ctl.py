"""``ztunnel ctl``: read a running agent's admin endpoint (like ``istioctl ztunnel-config``).

Everything comes from ``/config_dump`` (ztunnel's camelCase shape, plus our
``connections`` list) except ``log``, which POSTs to ``/logging``, ``explain``
(``/explain``) and ``graph`` (``/api/graph``, the admin UI's data). Blocking
urllib is fine here: this is a short-lived CLI, not part of the agent.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

import yaml

from ztunnel.model import ports

DEFAULT_ADMIN = f"http://127.0.0.1:{ports.ADMIN}"
TIMEOUT = 5.0

# The admin endpoint is dialled directly, whatever http_proxy says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

Row = list[str]
Dump = Mapping[str, object]


class AdminError(Exception):
    """The admin endpoint could not be reached (exit 2) or refused the request (exit 1)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _http(admin: str, path: str, method: str = "GET") -> str:
    req = urllib.request.Request(admin.rstrip("/") + path, method=method)
    try:
        with _OPENER.open(req, timeout=TIMEOUT) as resp:
            body: bytes = resp.read()
            return body.decode()
    except urllib.error.HTTPError as exc:
        raise AdminError(
            f"{method} {path}: HTTP {exc.code}: {exc.read().decode().strip()}", 1
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach ztunnel admin at {admin}: {reason}", 2) from exc


def cell(value: object) -> str:
    return "-" if value in (None, "", [], {}) else str(value)


def section(dump: Dump, key: str) -> list[Mapping[str, object]]:
    items = dump.get(key) or []
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def _vip(vip: object) -> str:
    network, _, ip = str(vip).rpartition("/")
    return f"{network}/{ip}" if network else ip


def _identity(w: Mapping[str, object]) -> str:
    td = w.get("trustDomain") or "cluster.local"
    return f"spiffe://{td}/ns/{w.get('namespace')}/sa/{w.get('serviceAccount') or 'default'}"


def _workload_row(w: Mapping[str, object]) -> Row:
    ips = w.get("workloadIps") or []
    address = ",".join(map(str, ips)) if isinstance(ips, list) else str(ips)
    return [
        cell(w.get("namespace")),
        cell(w.get("name")),
        cell(address or w.get("hostname")),
        cell(w.get("node")),
        cell(w.get("protocol") or "TCP"),
        _identity(w),
    ]


def _service_row(svc: Mapping[str, object]) -> Row:
    vips = svc.get("vips") or []
    endpoints = svc.get("endpoints") or {}
    eps = list(endpoints.values()) if isinstance(endpoints, Mapping) else []
    healthy = sum(
        1 for e in eps if not isinstance(e, Mapping) or e.get("status", "Healthy") == "Healthy"
    )
    return [
        cell(svc.get("namespace")),
        cell(svc.get("name") or svc.get("hostname")),
        cell(",".join(_vip(v) for v in vips) if isinstance(vips, list) else vips),
        f"{healthy}/{len(eps)}",
    ]


def _policy_row(p: Mapping[str, object]) -> Row:
    rules = p.get("rules") or []
    return [
        cell(p.get("namespace")),
        cell(p.get("name")),
        cell(p.get("scope")),
        cell(p.get("action")),
        str(len(rules) if isinstance(rules, list) else 0),
    ]


def _cert_row(c: Mapping[str, object]) -> Row:
    chain = c.get("certChain") or []
    leaf = chain[0] if isinstance(chain, list) and chain and isinstance(chain[0], Mapping) else {}
    return [
        cell(c.get("identity")),
        cell(c.get("state")),
        cell(leaf.get("serialNumber")),
        cell(leaf.get("expirationTime")),
    ]


def _connection_row(c: Mapping[str, object]) -> Row:
    return [
        cell(c.get("direction")),
        cell(c.get("src")),
        cell(c.get("originalDst") or c.get("actualDst")),
        cell(c.get("srcIdentity")),
        cell(c.get("dstIdentity")),
        cell(c.get("bytesSent", 0)),
        cell(c.get("bytesRecv", 0)),
    ]


def _route_row(r: Mapping[str, object]) -> Row:
    """A waypoint's HTTPRoute/GRPCRoute: parents, rule count, backends with weights."""
    parents = r.get("parents") or []
    rules = r.get("rules") or []
    backends: list[str] = []
    for rule in rules if isinstance(rules, list) else []:
        for b in rule.get("backends") or [] if isinstance(rule, Mapping) else []:
            if isinstance(b, Mapping):
                backends.append(f"{b.get('name')}:{b.get('port')}={b.get('weight')}")
    return [
        cell(r.get("namespace")),
        cell(r.get("name")),
        cell(r.get("kind")),
        cell(
            ",".join(
                f"{p.get('name')}" + (f":{p['port']}" if p.get("port") else "")
                for p in parents
                if isinstance(p, Mapping)
            )
            if isinstance(parents, list)
            else parents
        ),
        str(len(rules) if isinstance(rules, list) else 0),
        cell(" ".join(dict.fromkeys(backends))),
    ]


def _l7_policy_row(p: Mapping[str, object]) -> Row:
    """A waypoint's L7 AuthorizationPolicy: action, targets, rule count."""
    targets = p.get("targets") or []
    rules = p.get("rules") or []
    return [
        cell(p.get("namespace")),
        cell(p.get("name")),
        cell(p.get("action")) + (" (dry-run)" if p.get("dry_run") else ""),
        cell(
            ",".join(f"{t.get('kind')}/{t.get('name')}" for t in targets if isinstance(t, Mapping))
            if isinstance(targets, list)
            else targets
        ),
        str(len(rules) if isinstance(rules, list) else 0),
    ]


# subcommand -> (config_dump key, table header, row builder)
VIEWS: Mapping[str, tuple[str, Row, Callable[[Mapping[str, object]], Row]]] = {
    "workloads": (
        "workloads",
        ["NAMESPACE", "NAME", "ADDRESS", "NODE", "PROTOCOL", "IDENTITY"],
        _workload_row,
    ),
    "services": ("services", ["NAMESPACE", "NAME", "VIPS", "ENDPOINTS"], _service_row),
    "policies": ("policies", ["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES"], _policy_row),
    "certificates": ("certificates", ["IDENTITY", "STATE", "SERIAL", "EXPIRES"], _cert_row),
    "connections": (
        "connections",
        ["DIRECTION", "SRC", "DST", "SRC-IDENTITY", "DST-IDENTITY", "BYTES-SENT", "BYTES-RECV"],
        _connection_row,
    ),
    # A waypoint's admin (``ztunnel waypoint``): its routes and L7 policies.
    "routes": (
        "routes",
        ["NAMESPACE", "NAME", "KIND", "PARENTS", "RULES", "BACKENDS"],
        _route_row,
    ),
    "l7-policies": (
        "l7Policies",
        ["NAMESPACE", "NAME", "ACTION", "TARGETS", "RULES"],
        _l7_policy_row,
    ),
}


GRAPH_HEADER: Row = [
    "SRC",
    "DST",
    "SERVICE",
    "OUTCOME",
    "OPEN",
    "CONNECTIONS",
    "BYTES-SENT",
    "BYTES-RECV",
    "SRC-IDENTITY",
    "DST-IDENTITY",
]


def node_label(node: Mapping[str, object]) -> str:
    """A graph node as people name it: ``namespace/name``, or the bare address."""
    if node.get("kind") == "address":
        return str(node.get("name"))
    return f"{node.get('namespace')}/{node.get('name')}"


def graph_rows(graph: Mapping[str, object]) -> list[Row]:
    """``/api/graph``'s edges as rows of GRAPH_HEADER (also the UI's page without JS)."""
    nodes = graph.get("nodes")
    names = {
        str(n.get("id")): node_label(n)
        for n in (nodes if isinstance(nodes, list) else [])
        if isinstance(n, Mapping)
    }
    edges = graph.get("edges")
    rows: list[Row] = []
    for e in edges if isinstance(edges, list) else []:
        if not isinstance(e, Mapping):
            continue
        services = e.get("services")
        rows.append(
            [
                names.get(str(e.get("source")), str(e.get("source"))),
                names.get(str(e.get("target")), str(e.get("target"))),
                cell(",".join(map(str, services)) if isinstance(services, list) else ""),
                cell(e.get("outcome")),
                cell(e.get("open", 0)),
                cell(e.get("connections", 0)),
                cell(e.get("bytesSent", 0)),
                cell(e.get("bytesRecv", 0)),
                cell(e.get("srcIdentity")),
                cell(e.get("dstIdentity")),
            ]
        )
    return rows


def render_graph(graph: Mapping[str, object], output: str) -> str:
    if output == "json":
        return json.dumps(graph, indent=2) + "\n"
    if output == "yaml":
        return str(yaml.safe_dump(dict(graph), sort_keys=False))
    table = format_table(GRAPH_HEADER, sorted(graph_rows(graph)))
    stats = graph.get("history")
    if isinstance(stats, Mapping):
        table += (
            f"(history: last {stats.get('size')} of {stats.get('recorded')} ended connections,"
            f" capacity {stats.get('capacity')})\n"
        )
    return table


REDIRECTION_HEADER: Row = ["NAMESPACE", "NAME", "MODE", "INSTALLED", "DETAIL"]


def redirection_pods(dump: Dump) -> list[dict[str, object]]:
    """Each proxied pod's redirection as the agent reported it when installing it."""
    state = dump.get("workloadState")
    out: list[dict[str, object]] = []
    for uid, entry in state.items() if isinstance(state, Mapping) else ():
        red = entry.get("redirection") if isinstance(entry, Mapping) else None
        if not isinstance(red, Mapping):
            continue  # not an enrolled pod (dedicated mode, or connections of a gone proxy)
        info = entry.get("info")
        info = info if isinstance(info, Mapping) else {}
        out.append(
            {
                "uid": uid,
                "namespace": info.get("namespace"),
                "name": info.get("name"),
                "redirection": dict(red),
            }
        )
    return out


def _redirection_detail(red: Mapping[str, object]) -> str:
    if red.get("error"):
        return f"error: {red['error']}"
    programs = red.get("programs")
    if isinstance(programs, list):
        hooks = [
            f"{p.get('device')}/{p.get('direction')}={p.get('name')}#{p.get('id')}"
            for p in programs
            if isinstance(p, Mapping)
        ]
        link = red.get("sk_lookup")
        if isinstance(link, Mapping):
            hooks.append(f"sk_lookup=link#{link.get('link_id')}")
        return " ".join(hooks)
    chains = red.get("chains")
    if isinstance(chains, Mapping):
        return " ".join(f"{t}:{','.join(map(str, c))}" for t, c in chains.items() if c)
    return ""


def _redirection_summary(summary: Mapping[str, object]) -> str:
    parts = [f"mode {summary.get('mode')}"]
    if summary.get("build"):
        parts.append(f"build {summary['build']} pinned in {summary.get('pin_dir')}")
    maps = summary.get("maps")
    if isinstance(maps, list):
        sizes = [
            f"{m.get('name')} {m.get('type')} {m.get('max_entries')} entries"
            for m in maps
            if isinstance(m, Mapping)
        ]
        parts.append("maps: " + ", ".join(sizes))
    counters = summary.get("counters")
    if isinstance(counters, Mapping):
        parts.append("counters: " + ", ".join(f"{k}={v}" for k, v in counters.items()))
    return "(" + "; ".join(parts) + ")\n"


def render_redirection(dump: Dump, output: str) -> str:
    """``ctl redirection``: per pod the active redirection (eBPF: the attached programs and
    the sk_lookup link; iptables: our chains), then the agent-wide part (eBPF: maps, counters)."""
    summary = dump.get("redirection")
    summary = summary if isinstance(summary, Mapping) else {}
    pods = redirection_pods(dump)
    if output in ("json", "yaml"):
        data = {"redirection": dict(summary), "pods": pods}
        if output == "json":
            return json.dumps(data, indent=2) + "\n"
        return str(yaml.safe_dump(data, sort_keys=False))
    rows = []
    for pod in pods:
        red = pod["redirection"]
        red = red if isinstance(red, Mapping) else {}
        rows.append(
            [
                cell(pod["namespace"]),
                cell(pod["name"]),
                cell(red.get("mode")),
                cell(red.get("installed")),
                cell(_redirection_detail(red)),
            ]
        )
    table = format_table(REDIRECTION_HEADER, sorted(rows))
    return table + (_redirection_summary(summary) if summary else "(no pod redirection)\n")


def format_table(header: Row, rows: Sequence[Row]) -> str:
    """Left-aligned columns separated by three spaces, kubectl style."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        "   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in (header, *rows)
    ]
    return "\n".join(lines) + "\n"


def render(view: str, dump: Dump, output: str) -> str:
    key, header, row = VIEWS[view]
    items = section(dump, key)
    if output == "json":
        return json.dumps(items, indent=2) + "\n"
    if output == "yaml":
        return yaml.safe_dump(items, sort_keys=False)
    return format_table(header, sorted((row(i) for i in items), key=lambda r: r[:2]))


def _common(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # Accepted before and after the subcommand. Separate action objects per parser:
    # argparse's ``parents=`` shares them, and subparser defaults would then clobber
    # values given before the subcommand.
    keep = argparse.SUPPRESS
    parser.add_argument(
        "--admin", default=DEFAULT_ADMIN if defaults else keep, help=f"admin URL ({DEFAULT_ADMIN})"
    )
    parser.add_argument(
        "-o", "--output", choices=("table", "json", "yaml"), default="table" if defaults else keep
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ztunnel ctl")
    _common(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in VIEWS:
        _common(sub.add_parser(name, help=f"list {name}"), defaults=False)
    graph = sub.add_parser(
        "graph", help="who talked to whom: open and recent connections by outcome (/api/graph)"
    )
    _common(graph, defaults=False)
    redirection = sub.add_parser(
        "redirection",
        help="per pod: iptables or eBPF, the attached programs; the eBPF maps and counters",
    )
    _common(redirection, defaults=False)
    log = sub.add_parser("log", help="show or change the log level")
    _common(log, defaults=False)
    log.add_argument("--level", help="filter, e.g. debug or ztunnel::proxy=debug,info")
    log.add_argument("--reset", action="store_true", help="back to the startup level")
    explain = sub.add_parser(
        "explain",
        help="would a connection (or, at a waypoint, an HTTP request) be allowed, and why",
        description="Evaluate the L4 authorization policies of the destination for a "
        "connection (agent admin), or with --method/--path/--header the L7 policies and "
        "routes of a waypoint for one HTTP request (waypoint admin).",
    )
    _common(explain, defaults=False)
    explain.add_argument(
        "--from", dest="source", help="pod (ns/name), SPIFFE identity, or IP (HTTP: identity)"
    )
    explain.add_argument(
        "--to", dest="destination", required=True, help="pod:port, ip:port, or service:port"
    )
    explain.add_argument("--method", help="HTTP method (explains an HTTP request at a waypoint)")
    explain.add_argument("--path", help="HTTP path (default /)")
    explain.add_argument(
        "-H", "--header", action="append", default=[], help="HTTP header 'name: value'"
    )
    return parser


def _run(args: argparse.Namespace) -> str:
    if args.command == "log":
        query = {"reset": ""} if args.reset else {}
        if args.level:
            query["level"] = args.level
        path = "/logging" + ("?" + urllib.parse.urlencode(query) if query else "")
        return _http(args.admin, path, "POST")
    if args.command == "explain" and (args.method or args.path or args.header):
        http_query: list[tuple[str, str]] = [
            ("to", args.destination),
            ("method", args.method or "GET"),
            ("path", args.path or "/"),
        ]
        http_query += [("header", h) for h in args.header]
        if args.source:
            http_query.append(("from", args.source))
        target = "/explain_request?" + urllib.parse.urlencode(http_query)
        result = json.loads(_http(args.admin, target))
        return render_http_explain(result, args.output)
    if args.command == "explain":
        if not args.source:
            raise AdminError("explain: --from is required for a connection (L4)", 1)
        params = urllib.parse.urlencode({"from": args.source, "to": args.destination})
        result = json.loads(_http(args.admin, "/explain?" + params))
        return render_explain(result, args.output)
    if args.command == "graph":
        graph = json.loads(_http(args.admin, "/api/graph"))
        return render_graph(graph if isinstance(graph, Mapping) else {}, args.output)
    dump = json.loads(_http(args.admin, "/config_dump"))
    if args.command == "redirection":
        return render_redirection(dump if isinstance(dump, Mapping) else {}, args.output)
    return render(args.command, dump if isinstance(dump, Mapping) else {}, args.output)


def render_explain(result: Mapping[str, object], output: str) -> str:
    if output == "json":
        return json.dumps(result, indent=2) + "\n"
    if output == "yaml":
        return str(yaml.safe_dump(dict(result), sort_keys=False))
    src = result.get("source")
    src = src if isinstance(src, Mapping) else {}
    who = src.get("workload") or src.get("ip")
    mtls = f"mTLS as {src.get('identity')}" if src.get("mtls") else "plaintext (no identity)"
    lines = [f"from {who}: {mtls}"]
    results = result.get("results")
    for item in results if isinstance(results, list) else []:
        dst = item.get("destination", {})
        svc = f" (service {dst['service']})" if dst.get("service") else ""
        lines.append(f"to {dst.get('workload')} at {dst.get('address')}{svc}:")
        lines.extend("  " + line for line in str(item.get("explanation", "")).splitlines())
    return "\n".join(lines) + "\n"


def render_http_explain(result: Mapping[str, object], output: str) -> str:
    """One HTTP request at a waypoint: the L7 decision, then the route or the local answer."""
    if output == "json":
        return json.dumps(result, indent=2) + "\n"
    if output == "yaml":
        return str(yaml.safe_dump(dict(result), sort_keys=False))
    lines = [f"to {result.get('service')}:{result.get('port')}:"]
    lines.extend("  " + line for line in str(result.get("explanation", "")).splitlines())
    response = result.get("response")
    route = result.get("route")
    if isinstance(response, Mapping):
        why = response.get("body") or response.get("reason") or ""
        lines.append(f"answer: {response.get('status')} {why}".rstrip())
    if isinstance(route, Mapping):
        backends = route.get("backends") or []
        shares = ", ".join(
            f"{b.get('service')}:{b.get('port')} weight {b.get('weight')}"
            for b in backends
            if isinstance(b, Mapping)
        )
        lines.append(f"route {route.get('name')}: {shares or 'no backends'}")
        if route.get("timeout") is not None:
            lines.append(f"  timeout {route.get('timeout')} s")
    return "\n".join(lines) + "\n"


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run ``ztunnel ctl``; returns the exit code (2 when the admin endpoint is unreachable)."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    try:
        out.write(_run(args))
    except AdminError as exc:
        err.write(f"error: {exc}\n")
        return exc.code
    except json.JSONDecodeError as exc:
        err.write(f"error: admin returned invalid JSON: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
