"""The tracker's per-(source, destination) label cache: shared while nothing changes, never
stale once a workload, service or identity does (with or without the store's generation)."""

from __future__ import annotations

import dataclasses

import pytest
from test_telemetry_metrics import ECHO, ECHO_SVC, SHELL, outbound, samples, value

from ztunnel.model.identity import Identity
from ztunnel.state.store import StateStore
from ztunnel.telemetry import connections
from ztunnel.telemetry.connections import ConnectionTracker
from ztunnel.telemetry.metrics import Metrics

OPENED = "istio_tcp_connections_opened_total"


def test_connections_between_the_same_workloads_share_one_label_set() -> None:
    metrics = Metrics()
    tracker = ConnectionTracker(metrics)
    first, second = tracker.open(outbound()), tracker.open(outbound())
    assert first.labels() is second.labels()
    assert value(metrics, OPENED, source_workload="shell-1") == 2


def test_a_changed_workload_gets_new_labels_without_a_generation() -> None:
    """A new copy of a workload (same uid, new revision) is checked against the cached one."""
    metrics = Metrics()
    tracker = ConnectionTracker(metrics)
    tracker.open(outbound())
    v2 = dataclasses.replace(SHELL, canonical_revision="v2")
    tracker.open(outbound(src_workload=v2))
    revisions = sorted(lbl["source_canonical_revision"] for lbl, _ in samples(metrics, OPENED))
    assert revisions == ["v1", "v2"]


def test_an_equal_copy_reuses_the_cached_labels() -> None:
    """A worker's connection arrives as an unpickled copy: equal workloads hit the cache."""
    tracker = ConnectionTracker(Metrics())
    first = tracker.open(outbound())
    copy = dataclasses.replace(SHELL)
    assert copy is not SHELL
    assert tracker.open(outbound(src_workload=copy)).labels() is first.labels()


def test_identities_are_part_of_the_key() -> None:
    """source_principal is the verified identity of *this* connection, never a cached one."""
    metrics = Metrics()
    tracker = ConnectionTracker(metrics)
    tracker.open(outbound())
    other = Identity("cluster.local", "default", "impostor")
    tracker.open(outbound(src_identity=other))
    tracker.open(outbound(src_identity=None))
    principals = sorted(lbl["source_principal"] for lbl, _ in samples(metrics, OPENED))
    assert principals == sorted([str(SHELL.identity), str(other), "unknown"])


def test_a_store_change_starts_the_cache_over() -> None:
    store = StateStore()
    store.replace_all([SHELL, ECHO], [ECHO_SVC], [])
    metrics = Metrics()
    tracker = ConnectionTracker(metrics, generation=lambda: store.version)
    tracker.open(outbound())
    assert len(tracker._pairs) == 1
    # A workload update bumps the generation: the next connection rebuilds its pair, so a
    # removed or renamed workload's labels are not kept alive by the cache.
    store.upsert_workload(dataclasses.replace(ECHO, canonical_revision="v9"))
    current = store.workload_by_uid(ECHO.uid)
    conn = tracker.open(outbound(dst_workload=current))
    assert len(tracker._pairs) == 1
    assert value(metrics, OPENED, destination_canonical_revision="v9") == 1
    store.remove_workload(ECHO.uid)
    tracker.open(outbound(dst_workload=None, dst_identity=None))
    assert all(pair.dst is not current for pair in tracker._pairs.values())
    conn.close()


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "MAX_PAIRS", 3)
    tracker = ConnectionTracker(Metrics())
    for i in range(10):
        tracker.open(outbound(src_workload=dataclasses.replace(SHELL, uid=f"uid-{i}")))
    assert len(tracker._pairs) <= 3
