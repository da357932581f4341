"""What the agent holds for one proxied workload, in one process or spread over workers.

``RunningProxy`` is what the agent needs of a proxy: a ``WorkloadProxy`` (one process)
is one, and so is a ``ProxyGroup``: the same workload proxied by every worker process,
each with its own SO_REUSEPORT listeners in the pod's netns (the kernel spreads new
connections over them). The group binds in every running worker before it counts as
started (a bind failure in any worker fails the start, as with one process), and its
drain drains every worker. Readiness waits for the workload's certificate, fetched here
in the control process, which issues every certificate the workers use.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import trio

from ztunnel.config import Address, WorkloadInfo
from ztunnel.errors import ZtunnelError
from ztunnel.identity.manager import SecretManager
from ztunnel.proxy.deps import wait_for_workload
from ztunnel.proxy.workload_proxy import ProxyAddresses
from ztunnel.redirect.netns import NetNamespace
from ztunnel.state.store import StateStore

CERTIFICATE_RETRY = 1.0


class RunningProxy(Protocol):
    """A workload proxy as the agent runs and inspects it."""

    uid: str
    info: WorkloadInfo
    bound: dict[str, Address]
    transparent: bool
    certificate_ready: trio.Event
    certificate_error: str

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    async def drain(self, deadline: float) -> None: ...


class GroupHost(Protocol):
    """Starts and drains a group in the workers (``WorkerPool``)."""

    async def start_group(self, group: ProxyGroup) -> None: ...

    async def drain_group(self, group: ProxyGroup, deadline: float) -> None: ...


class ProxyGroup:
    def __init__(
        self,
        pool: GroupHost,
        info: WorkloadInfo,
        addresses: ProxyAddresses,
        *,
        store: StateStore,
        secrets: SecretManager,
        netns: NetNamespace | None = None,
        uid: str = "",
        orig_src: bool | None = None,
        agent_services: Iterable[int] = (),
    ) -> None:
        self.pool = pool
        self.info = info
        self.uid = uid or f"{info.namespace}/{info.name}"
        self.addresses = addresses
        self.netns = netns
        self.orig_src = orig_src
        self.agent_services = tuple(agent_services)  # the control process's admin ports
        self.bound: dict[str, Address] = {}
        self.transparent = False
        self.certificate_ready = trio.Event()
        self.certificate_error = ""
        self.errors: dict[int, str] = {}  # by worker slot: why it does not run there
        self._store = store
        self._secrets = secrets
        self._stopped = trio.Event()

    def restart_addresses(self) -> ProxyAddresses:
        """Where a restarted worker binds: what the first worker bound (port 0 resolved)."""
        a, b = self.addresses, self.bound
        return ProxyAddresses(
            b.get("outbound", a.outbound),
            b.get("inbound", a.inbound),
            b.get("inbound_plaintext", a.inbound_plaintext),
            b.get("socks5", a.socks5) if a.socks5 is not None else None,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start in every worker (raises OSError if any cannot bind), then wait for the drain."""
        await self.pool.start_group(self)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._warm_certificate)
            task_status.started()
            await self._stopped.wait()
            nursery.cancel_scope.cancel()

    async def drain(self, deadline: float) -> None:
        try:
            await self.pool.drain_group(self, deadline)
        finally:
            self._stopped.set()

    async def _warm_certificate(self) -> None:
        while True:
            try:
                workload = await wait_for_workload(self._store, self.info)
                await self._secrets.fetch(workload.identity)
            except ZtunnelError as exc:  # unknown workload yet, CA down: retry, stay not-ready
                self.certificate_error = str(exc) or type(exc).__name__
                await trio.sleep(CERTIFICATE_RETRY)
                continue
            self.certificate_error = ""
            self.certificate_ready.set()
            return
