"""Istio ``PeerAuthentication`` for ztunnel (istiod ``convertPeerAuthentication`` and
``convertedSelectorPeerAuthentications``).

ztunnel has no mTLS mode: STRICT is expressed as authorization. When any
PeerAuthentication exists istiod sends one static DENY policy,
``<root>/istio_converted_static_strict`` (deny when there is no mTLS identity),
and each workload whose *effective* mode is STRICT references it. A workload
selector with ``portLevelMtls`` (outside the root namespace) becomes its own
DENY policy ``<ns>/converted_peer_authentication_<name>`` with port matches.
Precedence: workload over namespace over mesh (root namespace); UNSET inherits;
among several candidates at one level the oldest (``creationTimestamp``, else
document order) wins.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ztunnel.model.authorization import (
    Action,
    Authorization,
    Clause,
    Match,
    MatchKind,
    Rule,
    Scope,
    StringMatch,
)
from ztunnel.policy._fields import Where

STATIC_STRICT_NAME = "istio_converted_static_strict"
CONVERTED_PREFIX = "converted_peer_authentication_"

_NO_IDENTITY = Match(not_principals=(StringMatch(MatchKind.PRESENCE),))


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"

    @property
    def lax(self) -> bool:
        return self in (MtlsMode.PERMISSIVE, MtlsMode.DISABLE)


@dataclass(frozen=True, slots=True)
class PeerAuthn:
    """The parts of a PeerAuthentication that matter to ztunnel."""

    name: str
    namespace: str
    selector: Mapping[str, str] | None  # None or empty: namespace- or mesh-wide
    mode: MtlsMode
    port_modes: tuple[tuple[int, MtlsMode], ...]  # sorted by port
    age: tuple[str, int]  # (creationTimestamp or "", document order): smaller is older

    @property
    def key(self) -> str:
        return f"{self.namespace}/{CONVERTED_PREFIX}{self.name}"


def parse_peer_authentication(
    doc: Mapping[str, Any], name: str, namespace: str, order: int, where: Where
) -> PeerAuthn:
    spec = where.mapping(doc.get("spec"), "spec")
    where.known_keys(spec, "spec", frozenset({"selector", "mtls", "portLevelMtls"}))
    selector = where.mapping(spec.get("selector"), "spec.selector")
    labels = where.mapping(selector.get("matchLabels"), "spec.selector.matchLabels")
    ports = where.mapping(spec.get("portLevelMtls"), "spec.portLevelMtls")
    port_modes = []
    for raw_port, mtls in ports.items():
        path = f"spec.portLevelMtls.{raw_port}"
        (port,) = where.ports([raw_port], path)
        port_modes.append((port, _mode(mtls, path, where)))
    metadata = where.mapping(doc.get("metadata"), "metadata")
    created = str(metadata.get("creationTimestamp") or "")
    return PeerAuthn(
        name=name,
        namespace=namespace,
        selector={str(k): str(v) for k, v in labels.items()} or None,
        mode=_mode(spec.get("mtls"), "spec.mtls", where),
        port_modes=tuple(sorted(port_modes)),
        age=(created, order),
    )


def _mode(raw: Any, path: str, where: Where) -> MtlsMode:
    mtls = where.mapping(raw, path)
    value = mtls.get("mode") or "UNSET"
    try:
        return MtlsMode(value)
    except ValueError:
        raise where.fail(
            f"{path}.mode", f"{value!r} is not UNSET/DISABLE/PERMISSIVE/STRICT"
        ) from None


def static_strict_policy(root_namespace: str) -> Authorization:
    return Authorization(
        STATIC_STRICT_NAME,
        root_namespace,
        Scope.WORKLOAD_SELECTOR,
        Action.DENY,
        rules=(((_NO_IDENTITY,),),),
    )


def _oldest(candidates: Sequence[PeerAuthn]) -> PeerAuthn | None:
    return min(candidates, key=lambda p: p.age, default=None)


def _namespace_wide(pas: Sequence[PeerAuthn], namespace: str) -> PeerAuthn | None:
    return _oldest([p for p in pas if p.namespace == namespace and p.selector is None])


def convert_port_level(
    pa: PeerAuthn, all_pas: Sequence[PeerAuthn], root: str
) -> Authorization | None:
    """The DENY policy for a selector PeerAuthentication with portLevelMtls, or None."""
    if pa.namespace == root or pa.selector is None or not pa.port_modes:
        return None
    ns_mode = _mode_of(_namespace_wide(all_pas, pa.namespace))
    root_mode = _mode_of(_namespace_wide(all_pas, root))
    # Grouped as istiod's Go expression groups it: the mesh-wide clause is not
    # gated on the workload mode being UNSET.
    parent_strict = (
        pa.mode is MtlsMode.STRICT
        or (pa.mode is MtlsMode.UNSET and ns_mode is MtlsMode.STRICT)
        or (ns_mode in (None, MtlsMode.UNSET) and root_mode is MtlsMode.STRICT)
    )
    clauses: list[Clause] = [(_NO_IDENTITY,)] if pa.mode is MtlsMode.STRICT else []
    rules: list[Rule] = []
    found_lax = False
    for port, mode in pa.port_modes:
        if mode is MtlsMode.STRICT and not parent_strict:
            # One rule per STRICT port: rules are OR'ed.
            rules.append(
                ((Match(not_principals=_NO_IDENTITY.not_principals, destination_ports=(port,)),),)
            )
        elif mode.lax and _exempt_port_counts(pa.mode, ns_mode, root_mode):
            found_lax = True
            clauses.append((Match(not_destination_ports=(port,)),))
    if pa.mode is MtlsMode.STRICT and not found_lax:
        return None  # plain STRICT: the static policy covers it
    if not clauses and not rules:
        return None
    if found_lax and _merge_strict(ns_mode, root_mode):
        clauses.append((_NO_IDENTITY,))
    if clauses:
        rules.append(tuple(clauses))
    return Authorization(
        CONVERTED_PREFIX + pa.name, pa.namespace, Scope.WORKLOAD_SELECTOR, Action.DENY, tuple(rules)
    )


def _mode_of(pa: PeerAuthn | None) -> MtlsMode | None:
    return None if pa is None else pa.mode


def _exempt_port_counts(mode: MtlsMode, ns: MtlsMode | None, root: MtlsMode | None) -> bool:
    """A PERMISSIVE/DISABLE port only matters when the effective parent mode is STRICT."""
    if mode.lax:
        return False
    if mode is MtlsMode.UNSET:
        if ns is not None:
            return ns is MtlsMode.STRICT
        return root is MtlsMode.STRICT
    return True


def _merge_strict(ns: MtlsMode | None, root: MtlsMode | None) -> bool:
    if root is MtlsMode.STRICT and ns in (None, MtlsMode.UNSET, MtlsMode.STRICT):
        return True
    return ns is MtlsMode.STRICT


def applicable(
    pas: Sequence[PeerAuthn], namespace: str, labels: Mapping[str, str], root: str
) -> list[PeerAuthn]:
    """istiod ``fetchPeerAuthentications``: mesh-wide, namespace-wide and selecting policies."""
    return [pa for pa in pas if _applies(pa, namespace, labels, root)]


def _applies(pa: PeerAuthn, namespace: str, labels: Mapping[str, str], root: str) -> bool:
    if pa.selector is None:
        return pa.namespace in (root, namespace)
    return pa.namespace == namespace and _selects(pa.selector, labels)


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def workload_keys(pas: Sequence[PeerAuthn], root: str) -> list[str]:
    """istiod ``convertedSelectorPeerAuthentications`` for one workload's applicable policies."""
    mesh = _oldest([p for p in pas if p.selector is None and p.namespace == root])
    ns = _oldest([p for p in pas if p.selector is None and p.namespace != root])
    wl = _oldest([p for p in pas if p.selector is not None and p.namespace != root])
    strict = mesh is not None and mesh.mode is MtlsMode.STRICT
    if ns is not None and ns.mode is not MtlsMode.UNSET:
        strict = ns.mode is MtlsMode.STRICT
    port_key = ""
    if wl is not None:
        strict, port_key = _workload_level(wl, strict)
    keys = [f"{root}/{STATIC_STRICT_NAME}"] if strict else []
    if port_key:
        keys.append(port_key)
    return sorted(keys)


def _workload_level(wl: PeerAuthn, strict: bool) -> tuple[bool, str]:
    if wl.mode is MtlsMode.STRICT:
        strict = True
    elif wl.mode.lax:
        strict = False
    if not wl.port_modes:
        return strict, ""
    modes = [m for _, m in wl.port_modes]
    if wl.mode is MtlsMode.STRICT:
        if any(m.lax for m in modes):
            return False, wl.key  # the converted policy carries STRICT itself
        return strict, ""
    if wl.mode.lax:
        return strict, wl.key if MtlsMode.STRICT in modes else ""
    if strict:  # UNSET under a STRICT mesh or namespace
        if MtlsMode.PERMISSIVE in modes:
            return False, wl.key
        return strict, ""
    return False, wl.key if MtlsMode.STRICT in modes else ""
