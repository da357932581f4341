"""Server-rendered HTML pages of the admin UI: the ``ztunnel ctl`` views as tables.

Readable without JavaScript. Every value is escaped here, at the one place text
becomes HTML (``html.escape`` with quotes), whatever its origin: workload names
and policies come from config, addresses, identities and errors from the network.
The columns are ``ztunnel ctl``'s own (its row builders are reused), so the page
and the CLI cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape

from ztunnel.admin import ctl

Dump = Mapping[str, object]

# (path, title) of the pages, in navigation order.
PAGES: tuple[tuple[str, str], ...] = (
    ("/", "graph"),
    ("/ui/graph", "edges"),
    ("/ui/workloads", "workloads"),
    ("/ui/services", "services"),
    ("/ui/policies", "policies"),
    ("/ui/certificates", "certificates"),
    ("/ui/connections", "connections"),
)

RECENT_HEADER = [
    "ENDED",
    "OUTCOME",
    "DIRECTION",
    "SRC",
    "DST",
    "SRC-IDENTITY",
    "DST-IDENTITY",
    "BYTES-SENT",
    "BYTES-RECV",
    "ERROR",
]


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def nav(current: str) -> str:
    links = []
    for path, title in PAGES:
        mark = ' aria-current="page"' if path == current else ""
        links.append(f'<a href="{path}"{mark}>{_e(title)}</a>')
    return '<nav class="top"><span class="brand">ztunnel</span> ' + " ".join(links) + "</nav>"


def page(current: str, title: str, body: str, node: str = "") -> str:
    """A complete document; ``body`` must already be escaped HTML."""
    where = f" on {_e(node)}" if node else ""
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>ztunnel {_e(title)}{where}</title>"
        '<link rel="stylesheet" href="/ui/ui.css"></head>\n<body>'
        f"{nav(current)}\n<main><h1>{_e(title)}{where}</h1>\n{body}\n</main></body></html>\n"
    )


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, empty: str) -> str:
    rows = list(rows)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    out = f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"
    return out if rows else out + f'\n<p class="empty">{_e(empty)}</p>'


def node_name(dump: Dump) -> str:
    config = dump.get("config")
    return str(config.get("nodeName") or "") if isinstance(config, Mapping) else ""


def view_page(view: str, dump: Dump) -> str:
    """One of ``ztunnel ctl``'s table views (workloads, services, ...) as an HTML table."""
    key, header, row = ctl.VIEWS[view]
    rows = sorted((row(i) for i in ctl.section(dump, key)), key=lambda r: r[:2])
    return page(f"/ui/{view}", view, table(header, rows, empty=f"no {view}"), node_name(dump))


def connections_page(dump: Dump, recent: Sequence[Mapping[str, object]], stats: Dump) -> str:
    """Open connections (``ztunnel ctl connections``) and the recent history, newest first."""
    _, header, row = ctl.VIEWS["connections"]
    open_rows = [row(c) for c in ctl.section(dump, "connections")]
    body = "<h2>open</h2>\n" + table(header, open_rows, empty="no open connections")
    body += (
        f"<h2>recent</h2>\n<p>last {_e(stats.get('size', 0))} of {_e(stats.get('recorded', 0))}"
        f" ended connections (capacity {_e(stats.get('capacity', 0))})</p>\n"
    )
    body += table(RECENT_HEADER, map(_recent_row, recent), empty="no ended connections yet")
    return page("/ui/connections", "connections", body, node_name(dump))


def _ended(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%H:%M:%S")


def _recent_row(entry: Mapping[str, object]) -> list[str]:
    log = entry.get("log")
    log = log if isinstance(log, Mapping) else {}
    s = ctl.cell
    return [
        _ended(entry.get("endedAt")),
        s(entry.get("outcome")),
        s(log.get("direction")),
        s(log.get("src.addr")),
        s(log.get("dst.hbone_addr") or log.get("dst.addr")),
        s(log.get("src.identity")),
        s(log.get("dst.identity")),
        s(log.get("bytes_sent", 0)),
        s(log.get("bytes_recv", 0)),
        s(log.get("error")),
    ]


def graph_page(graph: Mapping[str, object]) -> str:
    body = (
        "<p>Who talked to whom through this agent: open and recent connections, by outcome. "
        'The <a href="/">graph</a> draws the same data; '
        '<a href="/api/graph">/api/graph</a> is its JSON.</p>\n'
    )
    body += table(ctl.GRAPH_HEADER, ctl.graph_rows(graph), empty="no connections yet")
    return page("/ui/graph", "edges", body, str(graph.get("node") or ""))
