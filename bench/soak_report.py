"""The figures of bench/soak.py and how they are reported: verdict, table, PNG chart.

Pure functions over the samples a soak collected (no processes, no sockets), so the
verdict's arithmetic is unit-tested without running a soak (tests/test_bench_soak.py).

A sample is one reading of both agents every few seconds::

    {"t": 12.0, "phase": "load", "loadavg": [..3..],
     "agents": {"A": {"rss_kib": 61234, "fds": 10123, "cpu_s": 40.1}, "B": {...}}}

A latency interval is one ``loadgen rr --report`` line with ``t`` rebased to the soak's
clock: ``{"t": 17.0, "done": 5000, "latency_us": {"n": 5000, "p50": .., "p99": .., ...}}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PHASES = ("baseline", "open", "load", "close", "after")
AGENTS = ("A", "B")

Sample = dict[str, Any]


def phase_samples(samples: Sequence[Sample], phase: str) -> list[Sample]:
    return [s for s in samples if s["phase"] == phase]


def rss_mib(sample: Sample, agent: str) -> float:
    return float(sample["agents"][agent]["rss_kib"]) / 1024


def steady_rss_growth(samples: Sequence[Sample], agent: str, warm_fraction: float = 0.1) -> float:
    """RSS growth (MiB) of one agent over the load phase after its first ``warm_fraction``.

    The first minute of load fills buffers, pools and allocator arenas once; a leak is what
    keeps growing after that. Measured from the first load sample at or past the warm-up
    point to the last load sample; 0 when the load phase has fewer than two samples."""
    load = phase_samples(samples, "load")
    if len(load) < 2:
        return 0.0
    t0, t1 = load[0]["t"], load[-1]["t"]
    start = next(s for s in load if s["t"] >= t0 + warm_fraction * (t1 - t0))
    return rss_mib(load[-1], agent) - rss_mib(start, agent)


def agent_figures(samples: Sequence[Sample], agent: str, baseline_fds: int) -> dict[str, Any]:
    """RSS and fd figures of one agent across the phases."""

    def last(phase: str) -> Sample | None:
        found = phase_samples(samples, phase)
        return found[-1] if found else None

    def rss(sample: Sample | None) -> float | None:
        return None if sample is None else round(rss_mib(sample, agent), 1)

    def fds(sample: Sample | None) -> int | None:
        return None if sample is None else int(sample["agents"][agent]["fds"])

    load = phase_samples(samples, "load")
    cpu = [s["agents"][agent]["cpu_s"] for s in load]
    span = load[-1]["t"] - load[0]["t"] if len(load) > 1 else 0.0
    return {
        "rss_mib": {
            "baseline": rss(last("baseline")),
            "idle_open": rss(last("open")),
            "load_end": rss(last("load")),
            "peak": round(max(rss_mib(s, agent) for s in samples), 1) if samples else None,
            "after": rss(last("after")),
            "steady_growth": round(steady_rss_growth(samples, agent), 1),
        },
        "fds": {
            "baseline": baseline_fds,
            "idle_open": fds(last("open")),
            "peak": max(int(s["agents"][agent]["fds"]) for s in samples) if samples else None,
            "after": fds(last("after")),
        },
        "load_vcpu": round((cpu[-1] - cpu[0]) / span, 3) if span > 0 else None,
    }


def verdict(
    errors: Mapping[str, int], agents: Mapping[str, Mapping[str, Any]], max_growth_mib: float
) -> dict[str, Any]:
    """Pass only with zero errors of every kind, every agent's fds back to its baseline and
    no agent's steady RSS growth above ``max_growth_mib``; ``reasons`` says what failed."""
    reasons = [f"{n} {kind}" for kind, n in errors.items() if n]
    for name, fig in agents.items():
        after, base = fig["fds"]["after"], fig["fds"]["baseline"]
        if after is None or after > base:
            reasons.append(f"agent {name}: {after} fds after close, baseline {base}")
        growth = fig["rss_mib"]["steady_growth"]
        if growth > max_growth_mib:
            reasons.append(
                f"agent {name}: RSS grew {growth:.1f} MiB under steady load "
                f"(limit {max_growth_mib:g})"
            )
    return {"ok": not reasons, "reasons": reasons}


def latency_ms(intervals: Sequence[Mapping[str, Any]], q: str) -> list[float]:
    return [iv["latency_us"][q] / 1000 if iv["latency_us"]["n"] else math.nan for iv in intervals]


def table(doc: Mapping[str, Any]) -> str:
    meta, load, idle = doc["meta"], doc["load"], doc["idle"]
    lat = load.get("latency_us") or {}

    def ms(key: str) -> str:
        v = lat.get(key)
        return "-" if v is None or v < 0 else f"{v / 1000:.2f}"

    lines = [
        f"soak: {idle['opened']} idle connections (of {meta['idle_target']}) + "
        f"{meta['rate']:g} req/s of {meta['size']} B over {meta['conns']} conns for "
        f"{meta['duration_s']:g} s, through agents A -> B (loopback, dedicated mode)",
        f"  idle connections opened in {idle['open_s']:.1f} s, {idle['errors']} failed",
        f"  requests: {load.get('sent', 0)} sent, {load.get('done', 0)} answered, "
        f"{load.get('lost', 0)} lost, achieved {load.get('achieved', 0):.1f} req/s "
        f"(load generator send lag p99 {_lag_ms(load)} ms)",
        f"  latency ms over the whole run: p50 {ms('p50')}  p90 {ms('p90')}  p99 {ms('p99')}  "
        f"p99.9 {ms('p99.9')}  max {ms('max')}",
        f"  load average: start {_load(meta['loadavg_start'])}, end {_load(meta['loadavg_end'])}"
        f", 1-min average during the load {_load_during(doc['samples'])} ({meta['cpus']} CPUs)",
        "",
        f"{'agent':6} {'RSS MiB: base':>14} {'idle open':>10} {'load end':>9} {'peak':>7} "
        f"{'after':>7} {'growth':>7} | {'fds: base':>9} {'open':>6} {'peak':>6} {'after':>6}"
        f" | {'vCPU':>5}",
    ]
    for name, fig in doc["agents"].items():
        r, f = fig["rss_mib"], fig["fds"]
        lines.append(
            f"{name:6} {_n(r['baseline']):>14} {_n(r['idle_open']):>10} {_n(r['load_end']):>9} "
            f"{_n(r['peak']):>7} {_n(r['after']):>7} {_n(r['steady_growth']):>7} | "
            f"{_n(f['baseline']):>9} {_n(f['idle_open']):>6} {_n(f['peak']):>6} "
            f"{_n(f['after']):>6} | {_n(fig['load_vcpu']):>5}"
        )
    back = doc.get("fds_back_s")
    lines.append(
        "  fds back to baseline "
        + (f"{back:.1f} s after the connections closed" if back is not None else "NOT reached")
    )
    v = doc["verdict"]
    lines.append("PASS" if v["ok"] else "FAIL: " + "; ".join(v["reasons"]))
    return "\n".join(lines)


def _load_during(samples: Sequence[Sample]) -> str:
    ones = [s["loadavg"][0] for s in phase_samples(samples, "load")]
    return f"mean {sum(ones) / len(ones):.1f}, max {max(ones):.1f}" if ones else "-"


def _lag_ms(load: Mapping[str, Any]) -> str:
    lag = (load.get("send_lag_us") or {}).get("p99")
    return "-" if lag is None else f"{lag / 1000:.2f}"


def _n(v: float | int | None) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.1f}"


def _load(avg: Sequence[float]) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def chart(doc: Mapping[str, Any], path: Path) -> Path | None:
    """RSS, fds and interval p50/p99 latency of the run over time, one PNG; the load
    phase shaded. Returns None when matplotlib (the ``bench`` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    samples: list[Sample] = doc["samples"]
    intervals: list[dict[str, Any]] = doc["latency_intervals"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    ts = [s["t"] for s in samples]
    for agent in AGENTS:
        axes[0].plot(ts, [rss_mib(s, agent) for s in samples], label=f"agent {agent}")
        axes[1].plot(ts, [s["agents"][agent]["fds"] for s in samples], label=f"agent {agent}")
    its = [iv["t"] for iv in intervals]
    for q in ("p50", "p99"):
        axes[2].plot(its, latency_ms(intervals, q), label=q, marker=".", linewidth=1)
    axes[0].set_ylabel("RSS (MiB)")
    axes[1].set_ylabel("open fds")
    axes[2].set_ylabel("latency (ms, log)")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("seconds since start")
    load = phase_samples(samples, "load")
    for ax in axes:
        if load:
            ax.axvspan(load[0]["t"], load[-1]["t"], color="0.92", zorder=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    meta = doc["meta"]
    axes[0].set_title(
        f"soak: {doc['idle']['opened']} idle conns + {meta['rate']:g} req/s x "
        f"{meta['size']} B, {meta['duration_s']:g} s (shaded: load)\n{meta['title']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
