"""A bounded history of recent connections and their access-log lines (for the admin UI).

The tracker knows only *open* connections; a denied connection is closed within
milliseconds, so an operator looking for "who was refused" needs the recent
past. This ring buffer keeps the last ``capacity`` ended connections (closed
through the tracker, or refused before one could be opened) with the access-log
line each produced. Memory is bounded twice: by the number of entries and by the
length of every string kept (values can come from the network or from config).
Evictions are counted so a reader knows how much it is not seeing.

Each entry is kept as one ``marshal``-ed block of at least ``MIN_BLOCK`` bytes and
decoded when read (rarely: the admin UI). Why: the entries that outlive a burst of
connections are recorded while the burst's objects are being freed, so as ten small
Python objects each (dicts, strings, floats) they landed in a hundred different
pymalloc arenas and kept every one of them (pymalloc returns a 1 MiB arena only when
nothing in it is alive): +100 MiB of RSS after 5,000 connections for 1,000 entries of
~1 KiB (docs/reliability.md, "Memory after a burst"). One block above pymalloc's
512-byte small-object limit comes from the C heap instead, where ``malloc_trim`` gives
back the free pages around it.

Pure data structure: no I/O, no trio; the caller supplies the wall clock.
"""

from __future__ import annotations

import marshal
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from ztunnel.model.outcome import Failure, FailureKind

DEFAULT_CAPACITY = 1000
# Longest string kept per field; longer values are cut and marked (an error message
# quoting a peer's bytes must not let one entry hold megabytes).
MAX_FIELD_CHARS = 512
TRUNCATED = "…"
# Smallest stored entry in bytes: a bytes object this long (plus its 33-byte header) is
# above pymalloc's 512-byte limit, so it is malloc'd and never pins a pymalloc arena.
MIN_BLOCK = 512

# How a connection ended, as the UI colours it.
Outcome = Literal["mtls", "plaintext", "denied", "failed"]
OUTCOMES: tuple[Outcome, ...] = ("mtls", "plaintext", "denied", "failed")

# Decided by an authorization policy: this agent's, or (seen from the client's agent) the
# destination's, answered as HBONE 401.
_DENIALS = frozenset({FailureKind.DENIED, FailureKind.POLICY_CUT, FailureKind.UPSTREAM_DENIED})


def classify(security_policy: object, failure: Failure | None) -> Outcome:
    """Denied by policy (either side's view), failed otherwise, or how it was carried."""
    if failure is not None:
        return "denied" if failure.kind in _DENIALS else "failed"
    return "mtls" if security_policy == "mutual_tls" else "plaintext"


def _bounded(value: object) -> object:
    """The value as a plain bool, int, float, None or bounded str (exact types: marshal
    stores no subclasses, and a copy holds nothing of the caller's objects)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    text = str(value)  # also an exact copy of a str subclass (logging.Bare)
    if len(text) > MAX_FIELD_CHARS:
        return text[: MAX_FIELD_CHARS - 1] + TRUNCATED
    return text


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _bounded_map(values: Mapping[str, object]) -> dict[str, object]:
    return {str(k): _bounded(v) for k, v in values.items() if v is not None}


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One ended connection: its config-dump view and its access-log line."""

    seq: int  # 1, 2, ... in recording order; stable ids for the UI
    ended_at: float  # wall clock, seconds since the epoch
    outcome: Outcome
    connection: Mapping[str, object]  # the tracker's dump() keys (camelCase); {} if never opened
    log: Mapping[str, object]  # the access-log record's level, scope, message and fields

    def to_json(self) -> dict[str, object]:
        """With the log line as the JSON log format writes it (time formatted on read)."""
        return {
            "seq": self.seq,
            "endedAt": round(self.ended_at, 3),
            "outcome": self.outcome,
            **self.connection,
            # level first, then time, as the JSON log format orders them
            "log": {"level": self.log.get("level"), "time": _iso(self.ended_at), **self.log},
        }


def _pack(entry: HistoryEntry) -> bytes:
    block = marshal.dumps(
        (entry.seq, entry.ended_at, entry.outcome, dict(entry.connection), dict(entry.log))
    )
    # marshal.loads ignores trailing bytes: the padding only moves the block to malloc.
    return block + b"\0" * (MIN_BLOCK - len(block)) if len(block) < MIN_BLOCK else block


def _unpack(block: bytes) -> HistoryEntry:
    seq, ended_at, outcome, connection, log = marshal.loads(block)
    return HistoryEntry(seq, ended_at, outcome, connection, log)


class ConnectionHistory:
    """The last ``capacity`` ended connections, oldest first."""

    def __init__(
        self, capacity: int = DEFAULT_CAPACITY, *, clock: Callable[[], float] = time.time
    ) -> None:
        if capacity < 1:
            raise ValueError(f"history capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._clock = clock
        self._entries: deque[bytes] = deque(maxlen=capacity)  # _pack()ed entries
        self.recorded = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[HistoryEntry]:
        return map(_unpack, tuple(self._entries))

    @property
    def evicted(self) -> int:
        return self.recorded - len(self._entries)

    def closed(
        self,
        connection: Mapping[str, object],
        fields: Mapping[str, object],
        failure: Failure | None,
    ) -> None:
        """A tracked connection ended (``fields``: its "connection complete" log fields)."""
        level = "error" if failure is not None else "info"
        outcome = classify(connection.get("securityPolicy"), failure)
        self._add(outcome, connection, "connection complete", level, fields)

    def failed(self, fields: Mapping[str, object], failure: Failure) -> None:
        """A connection refused before it was tracked (``fields``: its WARN log fields)."""
        outcome = classify(None, failure)
        self._add(outcome, {}, "connection failed", "warn", fields)

    def _add(
        self,
        outcome: Outcome,
        connection: Mapping[str, object],
        message: str,
        level: str,
        fields: Mapping[str, object],
    ) -> None:
        now = self._clock()
        self.recorded += 1
        log: dict[str, object] = {
            "level": level,
            "scope": "access",
            "message": message,
            **_bounded_map(fields),
        }
        entry = HistoryEntry(self.recorded, now, outcome, _bounded_map(connection), log)
        self._entries.append(_pack(entry))

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "size": len(self._entries),
            "recorded": self.recorded,
            "evicted": self.evicted,
        }
