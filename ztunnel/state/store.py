"""The indexed view of the mesh: workloads, services and policies (sans-IO).

Theory of operation: model objects are frozen, so the store never mutates one;
it swaps whole objects and keeps *keys* (uids, ``ns/hostname``, policy keys) in
its indexes, so an index can never point at a stale copy.

Service endpoints come only from the workloads' ``services`` maps, as with
ztunnel's xDS (a Service resource carries no endpoints): the store keeps
``service key -> uid -> Endpoint`` for every key a workload names, even for
services not (yet) known ("staged"), and materialises ``Service.endpoints``
from it whenever either side changes. Endpoints passed in on an upserted
Service are therefore ignored.

Every mutation bumps ``version`` and then calls the subscribers with the kinds
of objects that changed, synchronously, once the store is consistent (so a
subscriber may read it). A subscriber that raises propagates to the mutator.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable

from ztunnel.model.address import canonical_ip
from ztunnel.model.authorization import Authorization, Scope
from ztunnel.model.workload import (
    Endpoint,
    IPAddress,
    NamespacedHostname,
    NetworkMode,
    Service,
    TunnelProtocol,
    Visibility,
    Workload,
)


class Kind(enum.Enum):
    WORKLOAD = "workload"
    SERVICE = "service"
    POLICY = "policy"


Subscriber = Callable[[frozenset[Kind]], None]
AddrKey = tuple[str, IPAddress]


def _add(index: dict[object, set[str]], key: object, member: str) -> None:
    index.setdefault(key, set()).add(member)


def _discard(index: dict[object, set[str]], key: object, member: str) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]


def _workload_rank(w: Workload) -> tuple[bool, bool, str]:
    # Several workloads on one address: prefer pods (not spoofable), then HBONE (ztunnel's rule).
    return ("//Pod/" in w.uid, w.protocol is TunnelProtocol.HBONE, w.uid)


class StateStore:
    """Workloads, services and policies with the lookups the proxies need."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._version = 0
        self._clear()

    def _clear(self) -> None:
        self._workloads: dict[str, Workload] = {}
        self._by_addr: dict[object, set[str]] = {}  # (network, ip) -> uids
        self._by_name: dict[object, set[str]] = {}  # (namespace, name) -> uids
        self._base_services: dict[str, Service] = {}  # key -> as upserted
        self._services: dict[str, Service] = {}  # key -> with endpoints
        self._endpoints: dict[str, dict[str, Endpoint]] = {}  # svc key -> uid -> endpoint
        self._by_vip: dict[object, set[str]] = {}  # (network, ip) -> service keys
        self._by_host: dict[object, set[str]] = {}  # hostname -> service keys
        self._policies: dict[str, Authorization] = {}
        self._by_namespace: dict[object, set[str]] = {}  # namespace ("" = global) -> keys

    # --- change notification ---------------------------------------------------------

    @property
    def version(self) -> int:
        """Bumped on every change; lets readers cache derived data cheaply."""
        return self._version

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(kinds)`` after every change; returns an unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def _changed(self, kinds: Iterable[Kind]) -> None:
        changed = frozenset(kinds)
        if not changed:
            return
        self._version += 1
        for callback in list(self._subscribers):
            callback(changed)

    # --- bulk ------------------------------------------------------------------------

    def replace_all(
        self,
        workloads: Iterable[Workload],
        services: Iterable[Service],
        policies: Iterable[Authorization],
    ) -> None:
        """Swap the whole state at once (one version bump, one notification)."""
        self._clear()
        for w in workloads:
            self._insert_workload(w)
        for s in services:
            self._insert_service(s)
        for p in policies:
            self._insert_policy(p)
        for key in self._base_services:
            self._materialise(key)
        self._changed(Kind)

    def apply_changes(
        self,
        *,
        workloads: Iterable[Workload] = (),
        services: Iterable[Service] = (),
        policies: Iterable[Authorization] = (),
        removed_workloads: Iterable[str] = (),
        removed_services: Iterable[str] = (),
        removed_policies: Iterable[str] = (),
    ) -> None:
        """Many upserts and removals as one change (one version bump, one notification):
        how a worker process's replica follows the control process's store."""
        kinds: set[Kind] = set()
        touched: set[str] = set()
        for uid in removed_workloads:
            if (old := self._remove_workload(uid)) is not None:
                kinds.add(Kind.WORKLOAD)
                touched.update(old.services)
        for w in workloads:
            old = self._remove_workload(w.uid)
            self._insert_workload(w)
            kinds.add(Kind.WORKLOAD)
            touched.update(w.services, old.services if old else ())
        for key in removed_services:
            if self._remove_service(key) is not None:
                kinds.add(Kind.SERVICE)
        for svc in services:
            self._remove_service(svc.key)
            self._insert_service(svc)
            self._materialise(svc.key)
            kinds.add(Kind.SERVICE)
        for key in removed_policies:
            if self._remove_policy(key) is not None:
                kinds.add(Kind.POLICY)
        for p in policies:
            self._remove_policy(p.key)
            self._insert_policy(p)
            kinds.add(Kind.POLICY)
        kinds |= self._refresh_services(touched)
        self._changed(kinds)

    # --- workloads -------------------------------------------------------------------

    def upsert_workload(self, workload: Workload) -> None:
        old = self._remove_workload(workload.uid)
        self._insert_workload(workload)
        touched = set(workload.services) | set(old.services if old else ())
        self._changed({Kind.WORKLOAD, *self._refresh_services(touched)})

    def remove_workload(self, uid: str) -> bool:
        old = self._remove_workload(uid)
        if old is None:
            return False
        self._changed({Kind.WORKLOAD, *self._refresh_services(old.services)})
        return True

    def _insert_workload(self, w: Workload) -> None:
        self._workloads[w.uid] = w
        if w.network_mode is not NetworkMode.HOST_NETWORK:  # host IPs are shared: never by IP
            for ip in w.workload_ips:
                _add(self._by_addr, (w.network, ip), w.uid)
        _add(self._by_name, (w.namespace, w.name), w.uid)
        for key, ports in w.services.items():
            self._endpoints.setdefault(key, {})[w.uid] = Endpoint(w.uid, dict(ports), w.status)

    def _remove_workload(self, uid: str) -> Workload | None:
        w = self._workloads.pop(uid, None)
        if w is None:
            return None
        for ip in w.workload_ips:
            _discard(self._by_addr, (w.network, ip), uid)
        _discard(self._by_name, (w.namespace, w.name), uid)
        for key in w.services:
            endpoints = self._endpoints.get(key, {})
            endpoints.pop(uid, None)
            if not endpoints:
                self._endpoints.pop(key, None)
        return w

    def _refresh_services(self, keys: Iterable[str]) -> set[Kind]:
        refreshed = [key for key in keys if key in self._base_services]
        for key in refreshed:
            self._materialise(key)
        return {Kind.SERVICE} if refreshed else set()

    # --- services --------------------------------------------------------------------

    def upsert_service(self, service: Service) -> None:
        self._remove_service(service.key)
        self._insert_service(service)
        self._materialise(service.key)
        self._changed({Kind.SERVICE})

    def remove_service(self, key: str) -> bool:
        """Remove by ``namespace/hostname``; endpoints named by workloads stay staged."""
        if self._remove_service(key) is None:
            return False
        self._changed({Kind.SERVICE})
        return True

    def _insert_service(self, s: Service) -> None:
        self._base_services[s.key] = s
        for vip in s.vips:
            _add(self._by_vip, (vip.network, vip.address), s.key)
        _add(self._by_host, s.hostname, s.key)

    def _remove_service(self, key: str) -> Service | None:
        s = self._base_services.pop(key, None)
        if s is None:
            return None
        self._services.pop(key, None)
        for vip in s.vips:
            _discard(self._by_vip, (vip.network, vip.address), key)
        _discard(self._by_host, s.hostname, key)
        return s

    def _materialise(self, key: str) -> None:
        endpoints = dict(self._endpoints.get(key, {}))
        self._services[key] = dataclasses.replace(self._base_services[key], endpoints=endpoints)

    # --- policies --------------------------------------------------------------------

    def upsert_policy(self, policy: Authorization) -> None:
        self._remove_policy(policy.key)
        self._insert_policy(policy)
        self._changed({Kind.POLICY})

    def remove_policy(self, key: str) -> bool:
        """Remove by ``namespace/name``."""
        if self._remove_policy(key) is None:
            return False
        self._changed({Kind.POLICY})
        return True

    @staticmethod
    def _scope_key(p: Authorization) -> str | None:
        if p.scope is Scope.GLOBAL:
            return ""
        return p.namespace if p.scope is Scope.NAMESPACE else None

    def _insert_policy(self, p: Authorization) -> None:
        self._policies[p.key] = p
        if (ns := self._scope_key(p)) is not None:
            _add(self._by_namespace, ns, p.key)

    def _remove_policy(self, key: str) -> Authorization | None:
        p = self._policies.pop(key, None)
        if p is not None and (ns := self._scope_key(p)) is not None:
            _discard(self._by_namespace, ns, key)
        return p

    # --- workload lookups ------------------------------------------------------------

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._workloads.get(uid)

    def workload_by_ip(self, ip: IPAddress | str, network: str = "") -> Workload | None:
        """The workload at (network, ip); HOST_NETWORK workloads are never found by IP."""
        uids = self._by_addr.get((network, canonical_ip(ip)))
        if not uids:
            return None
        return max((self._workloads[u] for u in uids), key=_workload_rank)

    def find_workload(
        self, namespace: str, name: str, service_account: str | None = None
    ) -> Workload | None:
        """By (namespace, name), optionally also by service account (ZDS WorkloadInfo)."""
        for uid in sorted(self._by_name.get((namespace, name), ())):
            w = self._workloads[uid]
            if service_account is None or w.identity.service_account == service_account:
                return w
        return None

    # --- service lookups -------------------------------------------------------------

    def service_by_key(self, key: str) -> Service | None:
        """By ``namespace/hostname``."""
        return self._services.get(key)

    def service_by_vip(
        self, ip: IPAddress | str, network: str = "", prefer_namespace: str | None = None
    ) -> Service | None:
        return self._best(self._by_vip.get((network, canonical_ip(ip)), ()), prefer_namespace)

    def service_by_hostname(
        self, hostname: str, prefer_namespace: str | None = None
    ) -> Service | None:
        return self._best(self._by_host.get(hostname, ()), prefer_namespace)

    def _best(self, keys: Iterable[str], namespace: str | None) -> Service | None:
        """ztunnel's choice: visible to the client, then same namespace, then canonical."""
        candidates = [self._services[k] for k in sorted(keys)]
        if namespace is not None:
            candidates = [
                s
                for s in candidates
                if s.visibility is not Visibility.NAMESPACE or s.namespace == namespace
            ]
        if not candidates:
            return None
        return min(candidates, key=lambda s: (s.namespace != namespace, not s.canonical))

    def services_for_workload(self, workload: Workload) -> list[Service]:
        """The known services this workload is an endpoint of."""
        return [self._services[k] for k in sorted(workload.services) if k in self._services]

    # --- combined lookups ------------------------------------------------------------

    def find_address(
        self, ip: IPAddress | str, network: str = "", prefer_namespace: str | None = None
    ) -> Workload | Service | None:
        """Workload first, then service VIP (ztunnel's ``find_address``)."""
        return self.workload_by_ip(ip, network) or self.service_by_vip(
            ip, network, prefer_namespace
        )

    def find_hostname(self, name: NamespacedHostname) -> Service | Workload | None:
        """Service first, then a workload with that hostname in that namespace."""
        service = self._services.get(str(name))
        if service is not None:
            return service
        for uid in sorted(self._workloads):
            w = self._workloads[uid]
            if w.hostname == name.hostname and w.namespace == name.namespace:
                return w
        return None

    # --- policies --------------------------------------------------------------------

    def policy(self, key: str) -> Authorization | None:
        return self._policies.get(key)

    def policies_for(self, workload: Workload) -> list[Authorization]:
        """Namespace-scoped + global + the workload's selector policies; unknown keys skipped."""
        keys = sorted(self._by_namespace.get(workload.namespace, ()))
        keys += sorted(self._by_namespace.get("", ()))
        keys += list(workload.authorization_policies)
        seen: set[str] = set()
        found = []
        for key in keys:
            p = self._policies.get(key)
            if p is not None and key not in seen:
                seen.add(key)
                found.append(p)
        return found

    # --- dumps -----------------------------------------------------------------------

    def workloads(self) -> list[Workload]:
        return [self._workloads[uid] for uid in sorted(self._workloads)]

    def services(self) -> list[Service]:
        return [self._services[key] for key in sorted(self._services)]

    def policies(self) -> list[Authorization]:
        return [self._policies[key] for key in sorted(self._policies)]

    def staged_endpoints(self) -> dict[str, dict[str, Endpoint]]:
        """Endpoints named by workloads for services not known (config_dump's stagedServices)."""
        return {
            key: dict(eps)
            for key, eps in sorted(self._endpoints.items())
            if key not in self._base_services
        }
