"""L4 authorization policies (ztunnel's authorization.proto).

A policy's ``rules`` are OR'ed; a rule's clauses are AND'ed; a clause's matches
are OR'ed. Evaluation lives in ``ztunnel.policy``; this module is data only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ztunnel.model.workload import IPNetwork


class Scope(enum.Enum):
    GLOBAL = "Global"
    NAMESPACE = "Namespace"
    WORKLOAD_SELECTOR = "WorkloadSelector"


class Action(enum.Enum):
    ALLOW = "Allow"
    DENY = "Deny"


class MatchKind(enum.Enum):
    EXACT = "Exact"
    PREFIX = "Prefix"
    SUFFIX = "Suffix"
    PRESENCE = "Presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""

    def matches(self, candidate: str) -> bool:
        if self.kind is MatchKind.EXACT:
            return candidate == self.value
        if self.kind is MatchKind.PREFIX:
            return candidate.startswith(self.value)
        if self.kind is MatchKind.SUFFIX:
            return candidate.endswith(self.value)
        return candidate != ""


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class Match:
    """One set of conditions; field types are AND'ed, values within a field OR'ed."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in self.__slots__)


Clause = tuple[Match, ...]
Rule = tuple[Clause, ...]


@dataclass(frozen=True, slots=True)
class Authorization:
    name: str
    namespace: str
    scope: Scope
    action: Action
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False

    @property
    def key(self) -> str:
        """``namespace/name``, as workloads list selector-scoped policies."""
        return f"{self.namespace}/{self.name}"
