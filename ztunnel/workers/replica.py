"""The workers' copies of the mesh state: deltas out of the control's store, into theirs.

The control process owns the one ``StateStore`` every source writes. Workers hold a
replica: a snapshot when they start, then deltas. A delta is found by object identity
(the store never mutates a model object, it swaps whole ones), then equality (a source
that re-parses its input hands over equal new objects). Only changed objects are
pickled, and every worker gets the same delta (computed once per change).
"""

from __future__ import annotations

from typing import TypeVar

from ztunnel.model.authorization import Authorization
from ztunnel.model.workload import Service, Workload
from ztunnel.state.store import StateStore
from ztunnel.workers.protocol import StateDelta, StateSnapshot

T = TypeVar("T", Workload, Service, Authorization)


class StateMirror:
    """Control side: what the workers hold, and the delta to the store's current state."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._workloads: dict[str, Workload] = {}
        self._services: dict[str, Service] = {}
        self._policies: dict[str, Authorization] = {}
        self._version = -1

    def delta(self) -> StateDelta:
        """Changes since the last call (empty when the store has not changed)."""
        if self.store.version == self._version:
            return StateDelta()
        self._version = self.store.version
        workloads, gone_w = _diff(self._workloads, {w.uid: w for w in self.store.workloads()})
        services, gone_s = _diff(self._services, {s.key: s for s in self.store.services()})
        policies, gone_p = _diff(self._policies, {p.key: p for p in self.store.policies()})
        return StateDelta(workloads, services, policies, gone_w, gone_s, gone_p)

    def snapshot(self) -> StateSnapshot:
        """Everything the workers hold (what a new worker starts from)."""
        return StateSnapshot(
            tuple(self._workloads.values()),
            tuple(self._services.values()),
            tuple(self._policies.values()),
        )


def _diff(held: dict[str, T], current: dict[str, T]) -> tuple[tuple[T, ...], tuple[str, ...]]:
    """(changed or new objects, removed keys); ``held`` becomes ``current``."""
    changed = tuple(obj for key, obj in current.items() if not _same(held.get(key), obj))
    removed = tuple(key for key in held if key not in current)
    held.clear()
    held.update(current)
    return changed, removed


def _same(old: object, new: object) -> bool:
    # Identity first (cheap, the common case); equality for sources that re-parse their
    # input and hand over equal but new objects (the cluster file, on every edit).
    return old is new or (old is not None and old == new)


def apply(store: StateStore, message: StateSnapshot | StateDelta) -> None:
    """Worker side: bring the replica up to date (one store notification per message)."""
    if isinstance(message, StateSnapshot):
        store.replace_all(message.workloads, message.services, message.policies)
        return
    store.apply_changes(
        workloads=message.workloads,
        services=message.services,
        policies=message.policies,
        removed_workloads=message.removed_workloads,
        removed_services=message.removed_services,
        removed_policies=message.removed_policies,
    )
