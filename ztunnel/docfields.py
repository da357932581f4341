"""Typed reads of a configuration document's fields (YAML or JSON, already parsed), raising
a ``ConfigError`` subclass that names the document and the field path.

One reader serves the Istio policy translator (``policy._fields.Where``) and the Gateway API
route parser (``waypoint.routes_yaml``): each subclass only chooses its error class, so a
malformed field reads the same everywhere (``<source>: spec.rules[0].to: expected a list,
got dict``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ztunnel.errors import ConfigError


@dataclass(frozen=True, slots=True)
class FieldReader:
    """Which document is being read (``source``), and typed reads of its fields. Absent
    (None) mappings and lists read as empty: optional fields need no special case."""

    source: str
    error: ClassVar[type[ConfigError]] = ConfigError

    def fail(self, path: str, problem: str) -> ConfigError:
        return self.error(self.source, path, problem)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__}")
        return value

    def sequence(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {type(value).__name__}")
        return value

    def known_keys(self, value: Mapping[str, Any], path: str, known: Iterable[str]) -> None:
        allowed = known if isinstance(known, frozenset) else frozenset(known)
        for key in value:
            if key not in allowed:
                raise self.fail(f"{path}.{key}", "unknown field")
