"""The figures of bench/compare.py and how they are reported: table, JSON, PNG chart.

Pure functions over ``Results`` (group -> path kind -> figure key -> value), so the
ratios, the added latency and the layout are unit-tested without running anything
(tests/test_bench_compare.py). Every figure carries its ratio against ``direct`` and
against ``stunnel4`` of the same group (same topology, same run).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("direct", "stunnel4", "ztunnel-py")
RATES = (500, 1000, 2000)
QUANTILES = ("p50", "p90", "p99", "p99.9")
RR_CONNS = 4
CONN_WORKERS = 4

Results = dict[str, dict[str, dict[str, float | None]]]  # group -> kind -> key -> value


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    fmt: str = ".2f"


def _latency_figures() -> list[Figure]:
    out: list[Figure] = []
    for rate in RATES:
        for q in QUANTILES:
            label = f"1 KiB req/resp @{rate}/s, {RR_CONNS} conns, {q}"
            out.append(Figure(f"rr{rate}_{q}", label, "ms", ".3f"))
            out.append(Figure(f"rr{rate}_{q}_added", "  added vs direct", "ms", "+.3f"))
    return out


FIGURES: tuple[Figure, ...] = (
    Figure("tput1_oneway", "throughput, 1 conn, one way", "Gbit/s"),
    Figure("tput1_echo", "throughput, 1 conn, echoed both ways", "Gbit/s"),
    Figure("tput8_oneway", "throughput, 8 conns, one way", "Gbit/s"),
    *_latency_figures(),
    Figure("conn1_per_s", "new conns/s, 1 worker", "conn/s", ".0f"),
    Figure("conn1_p50", "  connect+1 KiB echo+close p50", "ms", ".3f"),
    Figure("conn1_p99", "  connect+1 KiB echo+close p99", "ms", ".3f"),
    Figure(f"conn{CONN_WORKERS}_per_s", f"new conns/s, {CONN_WORKERS} workers", "conn/s", ".0f"),
    Figure("cpu_per_1000_req", "proxies' CPU per 1000 req (@1000/s)", "CPU-s", ".3f"),
    Figure("cpu_per_gb", "proxies' CPU per GB (1 conn one way)", "CPU-s", ".2f"),
    Figure("cpu_per_1000_conn", f"proxies' CPU per 1000 new conns (x{CONN_WORKERS})", "CPU-s"),
    Figure("rss_idle", "RSS per proxy (all its processes), idle", "MiB", ".1f"),
    Figure("rss_open", "RSS per proxy (all its processes), N open conns", "MiB", ".1f"),
    Figure("bytes_per_conn", "  per open idle conn", "KiB", ".1f"),
)
FIGURE_BY_KEY = {f.key: f for f in FIGURES}


def add_derived(results: Results) -> None:
    """Added latency (path minus direct of the same group) for every rate and quantile."""
    for kinds in results.values():
        direct = kinds.get("direct", {})
        for values in kinds.values():
            for rate in RATES:
                for q in QUANTILES:
                    key = f"rr{rate}_{q}"
                    v, d = values.get(key), direct.get(key)
                    values[f"{key}_added"] = v - d if v is not None and d is not None else None


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0 or math.isnan(value) or math.isnan(base):
        return None
    return value / base


def _ratio_of(key: str, value: float | None, base: float | None) -> float | None:
    """An added latency compares only against a positive one (noise can make stunnel4's
    added latency zero or negative at a high quantile: no meaningful ratio then)."""
    if key.endswith("_added") and (base is None or base <= 0):
        return None
    return ratio(value, base)


def with_ratios(results: Results) -> dict[str, Any]:
    """group -> kind -> key -> {value, unit, vs_direct, vs_stunnel4} (the JSON layout)."""
    out: dict[str, Any] = {}
    for group, kinds in results.items():
        direct, stunnel = kinds.get("direct", {}), kinds.get("stunnel4", {})
        out[group] = {}
        for kind, values in kinds.items():
            entry: dict[str, Any] = {}
            for key, value in values.items():
                fig = FIGURE_BY_KEY.get(key)
                added = key.endswith("_added")
                entry[key] = {
                    "value": value,
                    "unit": fig.unit if fig else "",
                    "vs_direct": None if added else ratio(value, direct.get(key)),
                    "vs_stunnel4": _ratio_of(key, value, stunnel.get(key)),
                }
            out[group][kind] = entry
    return out


def _cell(fig: Figure, value: float | None, vs: Iterable[tuple[str, float | None]]) -> str:
    if value is None or math.isnan(value):
        return "-"
    text = format(value, fig.fmt)
    ratios = [f"{r:.2f}x{tag}" for tag, r in vs if r is not None]
    return f"{text} ({', '.join(ratios)})" if ratios else text


def table(results: Results, notes: Mapping[str, list[str]] | None = None) -> str:
    """One block per group: a row per figure, a column per path with its ratios.

    ``x d`` is the ratio to direct, ``x s`` to stunnel4 (value / reference)."""
    lines: list[str] = []
    for group, kinds in results.items():
        present = [k for k in KINDS if k in kinds]
        direct, stunnel = kinds.get("direct", {}), kinds.get("stunnel4", {})
        lines.append(f"== {group} ==")
        head = f"{'figure':44} {'unit':>6}"
        widths = {k: 14 if k == "direct" else 30 for k in present}
        for k in present:
            head += f"  {k:>{widths[k]}}"
        lines.append(head)
        for fig in FIGURES:
            if not any(kinds[k].get(fig.key) is not None for k in present):
                continue
            row = f"{fig.label:44} {fig.unit:>6}"
            for k in present:
                value = kinds[k].get(fig.key)
                if k == "direct" and fig.key.endswith("_added"):
                    value = None  # zero by definition
                vs: list[tuple[str, float | None]] = []
                if k != "direct" and not fig.key.endswith("_added"):
                    vs.append((" d", ratio(value, direct.get(fig.key))))
                if k == "ztunnel-py":
                    vs.append((" s", _ratio_of(fig.key, value, stunnel.get(fig.key))))
                row += f"  {_cell(fig, value, vs):>{widths[k]}}"
            lines.append(row.rstrip())
        for note in (notes or {}).get(group, []):
            lines.append(f"  {note}")
        lines.append("")
    lines.append("ratios: (value / direct 'x d', value / stunnel4 'x s') of the same group")
    return "\n".join(lines)


def chart(doc: Mapping[str, Any], path: Path) -> Path | None:
    """Latency percentiles at 1000 req/s, p99 by rate and throughput by path as one PNG.

    Returns None when matplotlib (the ``bench`` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups: dict[str, Any] = doc["groups"]
    paths = [(g, k) for g, kinds in groups.items() for k in KINDS if k in kinds]
    labels = [f"{g}\n{k}" for g, k in paths]

    def val(g: str, k: str, key: str) -> float:
        v = groups[g][k].get(key, {}).get("value")
        return float("nan") if v is None else float(v)

    fig, axes = plt.subplots(3, 1, figsize=(max(8, 1.3 * len(paths)), 13))
    width = 0.8 / len(QUANTILES)
    for i, q in enumerate(QUANTILES):
        xs = [j + (i - 1.5) * width for j in range(len(paths))]
        axes[0].bar(xs, [val(g, k, f"rr1000_{q}") for g, k in paths], width, label=q)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms (log)")
    axes[0].set_title(f"1 KiB request/response latency at 1000 req/s, {RR_CONNS} conns, open loop")
    axes[0].legend(ncol=4, fontsize=8)
    width = 0.8 / len(RATES)
    for i, rate in enumerate(RATES):
        xs = [j + (i - 1) * width for j in range(len(paths))]
        axes[1].bar(xs, [val(g, k, f"rr{rate}_p99") for g, k in paths], width, label=f"{rate}/s")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms (log)")
    axes[1].set_title("p99 latency by request rate")
    axes[1].legend(ncol=3, fontsize=8)
    keys = (
        ("tput1_oneway", "1 conn one way"),
        ("tput1_echo", "1 conn echoed"),
        ("tput8_oneway", "8 conns one way"),
    )
    width = 0.8 / len(keys)
    for i, (key, name) in enumerate(keys):
        xs = [j + (i - 1) * width for j in range(len(paths))]
        axes[2].bar(xs, [val(g, k, key) for g, k in paths], width, label=name)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("Gbit/s (log)")
    axes[2].set_title("throughput")
    axes[2].legend(ncol=3, fontsize=8)
    for ax in axes:
        ax.set_xticks(range(len(paths)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(doc.get("meta", {}).get("title", "bench/compare.py"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
