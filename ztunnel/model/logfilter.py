"""``RUST_LOG``-style log filters (``level`` or ``target=level,...``), parsed without logging.

Here, not in telemetry/logging.py, so config.py (whose layer is above telemetry's: it may not
import it) can refuse a bad filter at start; telemetry/logging.py maps the names to numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

LEVEL_NAMES = ("trace", "debug", "info", "warn", "warning", "error", "off")


@dataclass(frozen=True, slots=True)
class LogFilter:
    """A parsed filter: a default level and per-target overrides (``(spec target, level)``)."""

    default: str
    targets: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> LogFilter:
        """Parse ``level`` / ``target=level,...,level``; raises ValueError on anything else."""
        default: str | None = None
        targets: list[tuple[str, str]] = []
        for raw in spec.split(","):
            directive = raw.strip()
            if not directive:
                continue
            target, sep, level = directive.partition("=")
            if not sep:
                target, level = "", target
            level = level.strip().lower()
            if level not in LEVEL_NAMES:
                raise ValueError(f"invalid log level {level!r} in {directive!r}")
            if not sep:
                default = level
            elif not target.strip():
                raise ValueError(f"empty target in {directive!r}")
            else:
                targets.append((target.strip(), level))
        if default is None and not targets:
            raise ValueError(f"empty log filter {spec!r}")
        return cls(default or "info", tuple(targets))

    def __str__(self) -> str:
        return ",".join([*(f"{t}={lvl}" for t, lvl in self.targets), self.default])
