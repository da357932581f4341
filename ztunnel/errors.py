"""The agent's error taxonomy, shared by every layer.

Kept small on purpose: each boundary translates foreign exceptions into one of
these with ``raise ... from exc`` so callers can tell *who* broke a connection.
"""

from __future__ import annotations


class ZtunnelError(Exception):
    """Base class of every error the agent raises on purpose."""


class ConfigError(ZtunnelError):
    """Bad configuration input: names the source, the field and what was expected."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {problem}")


class InvalidIdentity(ZtunnelError, ValueError):
    """A string is not a valid SPIFFE identity ``spiffe://<td>/ns/<ns>/sa/<sa>``."""
