"""List+watch of one resource into a local store (client-go's reflector, for trio).

1. List (paged, consistent) and replace the store in one step once every page is in: a
   relist never shows a half-filled store, so an object that still exists never vanishes.
2. Watch from the list's resourceVersion with bookmarks; apply each event; remember the
   newest version (bookmarks move it even when nothing we watch changes).
3. The watch ends (server timeout) → watch again from the last version. The connection
   breaks or the server is down → back off (exponential, jittered) and watch again from
   the last version; the store keeps what it had. 410 Gone (the version is compacted) →
   relist. A CRD that is not installed (404 for every served version) is an empty,
   synced store, checked again later.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import structlog
import trio

from ztunnel.sources.kubernetes.client import ApiClient
from ztunnel.sources.kubernetes.errors import (
    KubeApiError,
    KubeError,
    KubeGone,
    KubeNotFound,
    KubeProtocolError,
    KubeUnavailable,
)
from ztunnel.sources.kubernetes.protocol import (
    JSON,
    ResourceKind,
    WatchEvent,
    list_params,
    object_key,
    watch_params,
)

log = structlog.get_logger("ztunnel.sources.kubernetes")

Trim = Callable[[ResourceKind, JSON], JSON]


def keep_all(kind: ResourceKind, obj: JSON) -> JSON:
    """The object minus what changes on every write (resourceVersion, managedFields), so
    equal objects compare equal; kind and apiVersion set (list items may lack them)."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in _VOLATILE}
    return {**obj, "apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta}


_VOLATILE = frozenset({"resourceVersion", "managedFields", "generation"})


class Store:
    """The objects of one resource by ``namespace/name``; sans I/O."""

    def __init__(self, kind: ResourceKind, trim: Trim = keep_all) -> None:
        self.kind = kind
        self.trim = trim
        self.objects: dict[str, JSON] = {}
        self.resource_version = ""
        self.synced = False

    def replace(self, items: Sequence[JSON], resource_version: str) -> bool:
        """A full list; True when the contents changed."""
        fresh = {object_key(o): self.trim(self.kind, o) for o in items}
        changed = fresh != self.objects or not self.synced
        self.objects, self.resource_version, self.synced = fresh, resource_version, True
        return changed

    def apply(self, event: WatchEvent) -> bool:
        """One watch event; True when the contents changed."""
        self.resource_version = event.resource_version
        if event.type == "BOOKMARK":
            return False
        key = object_key(event.object)
        if event.type == "DELETED":
            return self.objects.pop(key, None) is not None
        obj = self.trim(self.kind, event.object)
        if self.objects.get(key) == obj:
            return False
        self.objects[key] = obj
        return True


class Backoff:
    """Exponential backoff with jitter: ``initial·factor^n`` capped at ``cap``, each delay
    drawn uniformly from [delay/2, delay] so agents restarted together spread out."""

    def __init__(
        self,
        initial: float = 0.8,
        cap: float = 30.0,
        factor: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self.initial, self.cap, self.factor = initial, cap, factor
        self.rng = rng or random.Random()
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay * (0.5 + 0.5 * self.rng.random())

    def reset(self) -> None:
        self._next = self.initial


class Reflector:
    """Keeps ``store`` equal to the server's view of one resource; ``on_change`` is called
    after every change (from the reflector's task)."""

    def __init__(
        self,
        client: ApiClient,
        kinds: Sequence[ResourceKind],
        on_change: Callable[[], None],
        *,
        optional: bool = False,
        trim: Trim = keep_all,
        field_selector: str = "",
        page_size: int = 500,
        watch_timeout: tuple[int, int] = (300, 600),
        read_slack: float = 60.0,
        backoff: Backoff | None = None,
        absent_recheck: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        if not kinds:
            raise ValueError("a reflector needs at least one resource kind")
        self.client = client
        self.kinds = tuple(kinds)
        self.kind = self.kinds[0]  # the served one, once a list found it
        self.on_change = on_change
        self.optional = optional
        self.field_selector = field_selector
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.read_slack = read_slack
        self.rng = rng or random.Random()
        self.backoff = backoff or Backoff(rng=self.rng)
        self.absent_recheck = absent_recheck
        self.store = Store(self.kind, trim)
        self.absent = False  # the resource type is not served (CRD not installed)
        self.synced_event = trio.Event()
        # Counters for tests and logs.
        self.lists = 0
        self.watches = 0
        self.errors = 0
        self.last_error: str | None = None  # the newest failure (readiness, config_dump)

    @property
    def name(self) -> str:
        return str(self.kind)

    async def run(self) -> None:
        """Forever: list when needed, then watch; never raises a ``KubeError``."""
        relist = True
        gone_streak = 0
        while True:
            try:
                if relist:
                    await self._relist()
                    relist = False
                    # The server answered: a later failure starts from the first delay, not
                    # from where an outage at start-up left it (up to the 30 s cap).
                    self.backoff.reset()
                    if self.absent:
                        await trio.sleep(self.absent_recheck)
                        relist = True
                        continue
                await self._watch()
                self.backoff.reset()
                gone_streak = 0
            except KubeGone as exc:
                # The version was compacted: relist at once, but not in a tight loop.
                log.info("watch expired; relisting", resource=self.name, error=str(exc))
                relist = True
                gone_streak += 1
                if gone_streak > 1:
                    await trio.sleep(self.backoff.next())
            except KubeNotFound as exc:
                # The resource type went away (CRD deleted) mid-watch: relist finds out.
                self._failed(exc)
                relist = True
                await trio.sleep(self.backoff.next())
            except (KubeUnavailable, KubeProtocolError, KubeApiError) as exc:
                self._failed(exc)
                await trio.sleep(self.backoff.next())

    def _failed(self, exc: KubeError) -> None:
        self.errors += 1
        self.last_error = str(exc)
        log.warning(
            "kubernetes list/watch failed; retrying",
            resource=self.name,
            resource_version=self.store.resource_version,
            error=str(exc),
        )

    async def _relist(self) -> None:
        for kind in self.kinds:
            try:
                items, rv = await self._list(kind)
            except KubeNotFound:
                if self.optional:
                    continue  # try the next served version
                raise
            self.kind = self.store.kind = kind
            self._replace(items, rv, absent=False)
            return
        # No version is served: the CRD is not installed. Its objects cannot exist.
        if not self.absent:
            log.info("resource not served; treated as empty", resource=self.name)
        self._replace([], "", absent=True)

    def _replace(self, items: Sequence[JSON], rv: str, *, absent: bool) -> None:
        self.absent = absent
        self.lists += 1
        if self.store.replace(items, rv):
            self.on_change()
        self.synced_event.set()

    async def _list(self, kind: ResourceKind) -> tuple[list[JSON], str]:
        items: list[JSON] = []
        token = ""
        while True:
            page = await self.client.list_page(
                kind,
                list_params(
                    limit=self.page_size,
                    continue_token=token,
                    field_selector=self.field_selector,
                ),
            )
            items.extend(page.items)
            token = page.continue_token
            if not token:
                return items, page.resource_version

    async def _watch(self) -> None:
        timeout = self.rng.randint(*self.watch_timeout)
        params = watch_params(
            resource_version=self.store.resource_version,
            timeout_seconds=timeout,
            field_selector=self.field_selector,
        )
        self.watches += 1
        async with self.client.watch(
            self.kind, params, read_timeout=timeout + self.read_slack
        ) as events:
            self.backoff.reset()  # the watch is established: the server is back
            async for event in events:
                if self.store.apply(event):
                    self.on_change()
