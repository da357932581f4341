"""Istio security CRDs → ztunnel authorization, as istiod translates them for ztunnel.

Entry points: ``translate_documents`` (parsed YAML documents), ``read_policy_dir``
(the one reader of a policy directory: every ``*.yaml``/``*.yml`` under it,
multi-document), ``translate_sources`` (several sources as one set),
``load_policy_dir`` (both) and
``attach_policies`` (fill each workload's ``authorization_policies`` with the
keys of the selector-scoped policies that select it, as istiod does when it
builds Workload resources). Valid-but-unsupported input (AUDIT/CUSTOM actions,
``targetRefs``, unknown kinds) is skipped with a warning, or raises
``PolicyTranslationError`` when ``strict=True``; malformed input always raises
(a ``ConfigError`` naming the file, the policy and the field).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ztunnel.model.authorization import Authorization, Scope
from ztunnel.model.workload import Workload
from ztunnel.policy._fields import PolicyTranslationError, Where
from ztunnel.policy.authz import ConvertedAuthz, Unsupported, convert_authorization_policy
from ztunnel.policy.peerauth import (
    PeerAuthn,
    applicable,
    convert_port_level,
    parse_peer_authentication,
    static_strict_policy,
    workload_keys,
)

__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "PolicyDocuments",
    "PolicyTranslationError",
    "TranslatedPolicy",
    "TranslationResult",
    "attach_policies",
    "load_policy_dir",
    "read_policy_dir",
    "translate_documents",
    "translate_sources",
]

DEFAULT_ROOT_NAMESPACE = "istio-system"
_API_VERSIONS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})
_KINDS = frozenset({"AuthorizationPolicy", "PeerAuthentication"})


@dataclass(frozen=True, slots=True)
class TranslatedPolicy:
    """One ztunnel policy and where it applies.

    ``selector`` is the workload selector (None for namespace/global scope);
    ``applies_to_namespace`` is the namespace whose workloads it can apply to,
    or None for every namespace (policies in the root namespace).
    """

    authorization: Authorization
    selector: Mapping[str, str] | None
    applies_to_namespace: str | None


@dataclass
class TranslationResult:
    policies: list[TranslatedPolicy] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    peer_authentications: list[PeerAuthn] = field(default_factory=list)
    root_namespace: str = DEFAULT_ROOT_NAMESPACE

    def extend(self, other: TranslationResult) -> None:
        self.policies.extend(other.policies)
        self.warnings.extend(other.warnings)
        self.peer_authentications.extend(other.peer_authentications)


def translate_documents(
    docs: Iterable[Any],
    *,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    source: str = "<documents>",
    strict: bool = False,
) -> TranslationResult:
    """Translate parsed Istio YAML documents (``None`` documents are ignored)."""
    result = _translate(docs, root_namespace, source, strict, order_base=0)
    _add_peer_auth_policies(result)
    return result


@dataclass(frozen=True, slots=True)
class PolicyDocuments:
    """The documents of one source (a file, a cluster file's ``policies``), in order."""

    source: str
    documents: tuple[Any, ...]


def read_policy_dir(path: str | Path) -> list[PolicyDocuments]:
    """Every ``*.yaml``/``*.yml`` file under ``path`` (recursively, sorted), parsed.

    The one reader of ``--policies`` for every mode. A file that cannot be read or
    parsed is a ``PolicyTranslationError`` naming it; so is a missing directory.
    """
    base = Path(path)
    if not base.is_dir():
        raise PolicyTranslationError(str(base), "", "not a directory")
    files = sorted(p for p in base.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    out = []
    for file in files:
        try:
            docs = tuple(yaml.safe_load_all(file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise PolicyTranslationError(str(file), "", f"cannot read policies: {exc}") from exc
        except RecursionError as exc:  # PyYAML recurses once per nesting level
            raise PolicyTranslationError(str(file), "", "YAML nested too deeply") from exc
        out.append(PolicyDocuments(str(file), docs))
    return out


def translate_sources(
    sources: Iterable[PolicyDocuments],
    *,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    strict: bool = False,
) -> TranslationResult:
    """Translate several sources as one set (errors name the source of the bad document;
    document order across sources breaks PeerAuthentication age ties)."""
    result = TranslationResult(root_namespace=root_namespace)
    order = 0
    for src in sources:
        result.extend(_translate(src.documents, root_namespace, src.source, strict, order))
        order += len(src.documents)
    _add_peer_auth_policies(result)
    return result


def load_policy_dir(
    path: str | Path, *, root_namespace: str = DEFAULT_ROOT_NAMESPACE, strict: bool = False
) -> TranslationResult:
    """Translate every ``*.yaml``/``*.yml`` file under ``path`` (recursively, sorted)."""
    return translate_sources(read_policy_dir(path), root_namespace=root_namespace, strict=strict)


def _translate(
    docs: Iterable[Any], root: str, source: str, strict: bool, order_base: int
) -> TranslationResult:
    result = TranslationResult(root_namespace=root)
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        where = Where(f"{source}: document {index}")
        if not isinstance(doc, Mapping):
            raise where.fail("", "a policy document must be a mapping")
        kind, api = doc.get("kind"), doc.get("apiVersion")
        # Not str: a mapping or list would not even be hashable for the set lookups.
        known = isinstance(kind, str) and isinstance(api, str)
        if not known or kind not in _KINDS or api not in _API_VERSIONS:
            if str(api).startswith("security.istio.io/"):
                # A security document we cannot read must not silently vanish: skipping a
                # DENY (or a STRICT) would open what its author meant to close.
                raise where.fail(
                    "apiVersion",
                    f"{api}/{kind} is not supported (kinds: {', '.join(sorted(_KINDS))}; "
                    f"versions: {', '.join(sorted(_API_VERSIONS))})",
                )
            _unsupported(result, where.source, f"kind {api}/{kind} is not handled; skipped", strict)
            continue
        name, namespace = _identify(doc, where)
        where = Where(f"{source}: {kind} {namespace}/{name}")
        if kind == "PeerAuthentication":
            pa = parse_peer_authentication(doc, name, namespace, order_base + index, where)
            result.peer_authentications.append(pa)
            continue
        converted = convert_authorization_policy(doc, name, namespace, root, where)
        if isinstance(converted, Unsupported):
            _unsupported(result, where.source, converted.message, strict)
            continue
        result.policies.append(_placed(converted, root))
        result.warnings.extend(f"{where.source}: {w}" for w in converted.warnings)
    return result


def _unsupported(result: TranslationResult, source: str, message: str, strict: bool) -> None:
    if strict:
        raise PolicyTranslationError(source, "", message)
    result.warnings.append(f"{source}: {message}")


def _identify(doc: Mapping[str, Any], where: Where) -> tuple[str, str]:
    metadata = where.mapping(doc.get("metadata"), "metadata")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise where.fail("metadata.name", "must be a non-empty string")
    namespace = metadata.get("namespace", "default")  # kubectl's default namespace
    if not isinstance(namespace, str) or not namespace:
        raise where.fail("metadata.namespace", "must be a non-empty string")
    return name, namespace


def _placed(converted: ConvertedAuthz, root: str) -> TranslatedPolicy:
    authz = converted.authorization
    everywhere = authz.namespace == root
    return TranslatedPolicy(authz, converted.selector, None if everywhere else authz.namespace)


def _add_peer_auth_policies(result: TranslationResult) -> None:
    pas = result.peer_authentications
    if not pas:
        return
    root = result.root_namespace
    # Sent whenever any PeerAuthentication exists; workloads opt in by key.
    result.policies.append(TranslatedPolicy(static_strict_policy(root), None, None))
    for pa in pas:
        converted = convert_port_level(pa, pas, root)
        if converted is not None:
            result.policies.append(TranslatedPolicy(converted, pa.selector, pa.namespace))


def attach_policies(
    workloads: Sequence[Workload],
    labels_by_uid: Mapping[str, Mapping[str, str]],
    translated: TranslationResult,
) -> tuple[list[Workload], list[Authorization]]:
    """Workloads with ``authorization_policies`` filled, and every translated policy.

    A selector policy applies to workloads of its own namespace whose labels
    include its matchLabels; one in the root namespace, to matching workloads
    of every namespace. Keys already on a workload are kept first. Namespace
    and global policies are never listed per workload (ztunnel finds them by
    namespace).
    """
    root = translated.root_namespace
    selector_policies = [
        tp
        for tp in translated.policies
        if tp.selector is not None and tp.authorization.scope is Scope.WORKLOAD_SELECTOR
    ]
    out = []
    for wl in workloads:
        labels = labels_by_uid.get(wl.uid, {})
        keys = _selected_keys(selector_policies, wl.namespace, labels, root)
        pas = applicable(translated.peer_authentications, wl.namespace, labels, root)
        keys += workload_keys(pas, root) if translated.peer_authentications else []
        merged = tuple(dict.fromkeys((*wl.authorization_policies, *keys)))
        out.append(dataclasses.replace(wl, authorization_policies=merged))
    return out, [tp.authorization for tp in translated.policies]


def _selected_keys(
    policies: Sequence[TranslatedPolicy], namespace: str, labels: Mapping[str, str], root: str
) -> list[str]:
    keys = []
    for tp in policies:
        authz, selector = tp.authorization, tp.selector or {}
        if authz.namespace not in (root, namespace):
            continue
        if all(labels.get(k) == v for k, v in selector.items()):
            keys.append(authz.key)
    return sorted(keys)
