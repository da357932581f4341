"""Typed access to fields of Istio YAML documents, raising errors that name the field.

Every read goes through here so a bad document fails with
``PolicyTranslationError("<file>: <ns>/<name>", "spec.rules[0].to[1].operation.ports[2]", ...)``
instead of a ``KeyError`` deep inside the translation.
"""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

from ztunnel.docfields import FieldReader
from ztunnel.errors import ConfigError
from ztunnel.model.authorization import MatchKind, ServiceAccountMatch, StringMatch
from ztunnel.model.workload import IPNetwork


class PolicyTranslationError(ConfigError):
    """An Istio policy document cannot be translated (or, in strict mode, is unsupported)."""


class Where(FieldReader):
    """Which Istio policy document is being read, for error messages."""

    __slots__ = ()
    error = PolicyTranslationError

    def strings(self, value: Any, path: str) -> list[str]:
        items = self.sequence(value, path)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self.fail(f"{path}[{i}]", f"expected a string, got {item!r}")
        return items

    def ports(self, value: Any, path: str) -> tuple[int, ...]:
        out = []
        for i, item in enumerate(self.sequence(value, path)):
            text = str(item)
            if isinstance(item, bool) or not text.isdigit() or not 0 < int(text) <= 65535:
                raise self.fail(f"{path}[{i}]", f"{item!r} is not a port number (1-65535)")
            out.append(int(text))
        return tuple(out)

    def networks(self, value: Any, path: str) -> tuple[IPNetwork, ...]:
        out = []
        for i, item in enumerate(self.strings(value, path)):
            try:
                out.append(ip_network(item, strict=False))
            except ValueError as exc:
                raise self.fail(f"{path}[{i}]", f"{item!r} is not an IP or CIDR") from exc
        return tuple(out)


def string_matches(values: list[str]) -> tuple[StringMatch, ...]:
    """istiod's ``stringToMatch``: ``*`` presence, ``*x`` suffix, ``x*`` prefix, else exact."""
    return tuple(_string_match(v) for v in values)


def _string_match(value: str) -> StringMatch:
    if value == "*":
        return StringMatch(MatchKind.PRESENCE)
    if value.startswith("*"):
        return StringMatch(MatchKind.SUFFIX, value[1:])
    if value.endswith("*"):
        return StringMatch(MatchKind.PREFIX, value[:-1])
    return StringMatch(MatchKind.EXACT, value)


def service_account_matches(values: list[str], namespace: str) -> tuple[ServiceAccountMatch, ...]:
    """``ns/sa``, or a bare ``sa`` meaning the policy's own namespace (istiod)."""
    out = []
    for value in values:
        ns, sep, sa = value.partition("/")
        out.append(ServiceAccountMatch(ns, sa) if sep else ServiceAccountMatch(namespace, value))
    return tuple(out)


def parse_go_bool(value: str) -> bool | None:
    """Go's ``strconv.ParseBool`` (istiod parses ``istio.io/dry-run`` with it); None if invalid."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None
