"""The per-identity certificate cache with background rotation (ztunnel's SecretManager).

Theory of operation: one entry per SPIFFE identity (pods sharing a service
account share a certificate). ``fetch`` returns the cached certificate while it
is valid, otherwise issues one; concurrent fetches of one identity join a single
in-flight request (a "flight"), and at most ``max_in_flight`` CSRs are out at
once. If the task running a flight is cancelled, its waiters start a new one.

Once ``run`` is started, every entry holding a certificate gets a refresher task
that renews at half-life. A failed renewal retries with exponential backoff
(500 ms x2, +-20% jitter, capped at 150 s, never past expiry) while the
still-valid certificate keeps being served. Each new certificate bumps the
entry's version and is announced to subscribers, so proxies can drop pooled
connections that present the old one.
"""

from __future__ import annotations

import base64
import datetime
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio
from cryptography import x509

from ztunnel.identity._x509 import cert_pem, utcnow
from ztunnel.identity.ca import CertificateAuthority
from ztunnel.identity.certificate import WorkloadCertificate, new_csr
from ztunnel.identity.errors import CAError, CertificateError
from ztunnel.model.identity import Identity

log = structlog.get_logger("ztunnel.identity")

DEFAULT_TTL = datetime.timedelta(hours=24)
MAX_IN_FLIGHT = 8
INITIAL_BACKOFF = 0.5
BACKOFF_CAP = 150.0
JITTER = 0.2
# A floor on the wait before a scheduled renewal, so a tiny or clamped validity
# cannot turn the refresher into a CSR storm.
MIN_REFRESH_DELAY = 1.0

CertCallback = Callable[[Identity, WorkloadCertificate], None]
IssueError = CAError | CertificateError
_ISSUE_ERRORS = (CAError, CertificateError)


@dataclass(frozen=True, slots=True)
class CertState:
    """One identity's row in the config dump."""

    identity: Identity
    state: str  # "Available" | "Initializing" | "Unavailable: <error>"
    certificate: WorkloadCertificate | None

    def to_json(self) -> dict[str, object]:
        """ztunnel's config_dump ``certificates`` element."""
        cert = self.certificate
        return {
            "identity": str(self.identity),
            "state": self.state,
            "certChain": [_cert_json(c) for c in (cert.leaf, *cert.chain)] if cert else [],
            "rootCerts": [_cert_json(c) for c in cert.roots] if cert else [],
        }


def _cert_json(cert: x509.Certificate) -> dict[str, object]:
    return {
        "pem": base64.b64encode(cert_pem(cert)).decode("ascii"),
        "serialNumber": str(cert.serial_number),
        "validFrom": cert.not_valid_before_utc.isoformat(),
        "expirationTime": cert.not_valid_after_utc.isoformat(),
    }


class _Flight:
    """One CSR in flight; waiters read its outcome once ``done`` is set."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.cert: WorkloadCertificate | None = None
        self.error: IssueError | None = None


@dataclass(eq=False)
class _Entry:
    identity: Identity
    cert: WorkloadCertificate | None = None
    error: str | None = None
    flight: _Flight | None = None
    failures: int = 0
    version: int = 0
    changed: trio.Event = field(default_factory=trio.Event)
    refresher: trio.CancelScope | None = None


class SecretManager:
    """Issues, caches and rotates workload certificates through a CertificateAuthority."""

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        ttl: datetime.timedelta = DEFAULT_TTL,
        clock: Callable[[], datetime.datetime] = utcnow,
        max_in_flight: int = MAX_IN_FLIGHT,
        rng: random.Random | None = None,
    ) -> None:
        self._ca = ca
        self._ttl = ttl
        self._clock = clock
        self._limiter = trio.CapacityLimiter(max_in_flight)
        self._rng = rng or random.Random()
        self._entries: dict[Identity, _Entry] = {}
        self._subscribers: list[CertCallback] = []
        self._nursery: trio.Nursery | None = None

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        """The valid certificate for ``identity``, issuing one if needed.

        Raises CAError or CertificateError if issuance fails. Cancelling a fetch
        never strands other fetches of the same identity.
        """
        entry = self._entry(identity)
        cert = entry.cert
        if cert is not None and cert.is_valid_at(self._clock()):
            return cert
        return await self._issue(entry)

    async def rotate(self, identity: Identity) -> WorkloadCertificate:
        """Issue a new certificate now, even if the cached one is still fresh."""
        entry = self._entry(identity)
        if entry.flight is not None:
            await entry.flight.done.wait()  # that CSR predates this request
        return await self._issue(entry)

    def get(self, identity: Identity) -> WorkloadCertificate | None:
        """The cached certificate if it is valid now, without issuing."""
        entry = self._entries.get(identity)
        cert = entry.cert if entry else None
        return cert if cert is not None and cert.is_valid_at(self._clock()) else None

    def forget(self, identity: Identity) -> None:
        """Drop ``identity`` (no workload uses it any more) and stop renewing it."""
        entry = self._entries.pop(identity, None)
        if entry is not None and entry.refresher is not None:
            entry.refresher.cancel()

    def version(self, identity: Identity) -> int:
        """Bumped on every new certificate for ``identity``; 0 before the first."""
        entry = self._entries.get(identity)
        return entry.version if entry else 0

    def subscribe(self, callback: CertCallback) -> Callable[[], None]:
        """Call ``callback(identity, cert)`` on every new certificate; returns an unsubscribe."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def states(self) -> list[CertState]:
        now = self._clock()
        return [_state(self._entries[i], now) for i in sorted(self._entries)]

    def dump(self) -> list[dict[str, object]]:
        """The config_dump ``certificates`` list."""
        return [s.to_json() for s in self.states()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew cached certificates in the background until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for entry in self._entries.values():
                    self._ensure_refresher(entry)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for entry in self._entries.values():
                    entry.refresher = None

    def _entry(self, identity: Identity) -> _Entry:
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._entries[identity] = _Entry(identity)
        return entry

    async def _issue(self, entry: _Entry) -> WorkloadCertificate:
        while True:
            flight = entry.flight
            if flight is None:
                return await self._fly(entry)
            await flight.done.wait()
            if flight.cert is not None:
                return flight.cert
            if flight.error is not None:
                raise type(flight.error)(str(flight.error)) from flight.error
            # The issuing task was cancelled: go again, perhaps as the issuer.

    async def _fly(self, entry: _Entry) -> WorkloadCertificate:
        flight = entry.flight = _Flight()
        try:
            cert = await self._request(entry.identity)
        except Exception as exc:
            error = flight.error = _as_issue_error(entry.identity, exc)
            entry.error = str(error)
            if error is exc:
                raise
            raise error from exc
        finally:
            if entry.flight is flight:
                entry.flight = None
            flight.done.set()
        flight.cert = cert
        self._store(entry, cert)
        return cert

    async def _request(self, identity: Identity) -> WorkloadCertificate:
        key, csr = new_csr(identity)
        async with self._limiter:
            chain = await self._ca.create_certificate(csr, self._ttl)
        return WorkloadCertificate.from_chain(identity, key, chain)

    def _store(self, entry: _Entry, cert: WorkloadCertificate) -> None:
        entry.cert, entry.error, entry.failures = cert, None, 0
        entry.version += 1
        entry.changed.set()
        entry.changed = trio.Event()
        if self._entries.get(entry.identity) is not entry:
            return  # forgotten while the CSR was out
        log.info("certificate issued", identity=str(entry.identity), serial=str(cert.serial))
        self._ensure_refresher(entry)
        for callback in list(self._subscribers):
            try:
                callback(entry.identity, cert)
            except Exception:
                log.exception("certificate subscriber failed", identity=str(entry.identity))

    def _ensure_refresher(self, entry: _Entry) -> None:
        if self._nursery is None or entry.refresher is not None or entry.cert is None:
            return
        entry.refresher = trio.CancelScope()
        self._nursery.start_soon(self._refresh_loop, entry, entry.refresher)

    async def _refresh_loop(self, entry: _Entry, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await self._wait_due(entry)
                try:
                    await self._issue(entry)
                except _ISSUE_ERRORS as exc:
                    entry.failures += 1
                    log.warning(
                        "certificate refresh failed",
                        identity=str(entry.identity),
                        failures=entry.failures,
                        error=str(exc),
                    )

    async def _wait_due(self, entry: _Entry) -> None:
        """Sleep until the entry is due; restart the wait whenever its certificate changes."""
        while True:
            changed = entry.changed
            with trio.move_on_after(self._delay(entry)) as timer:
                await changed.wait()
            if timer.cancelled_caught:
                return

    def _delay(self, entry: _Entry) -> float:
        cert, now = entry.cert, self._clock()
        if entry.failures:
            base = INITIAL_BACKOFF * 2.0 ** min(entry.failures - 1, 16)
            backoff = min(base * self._rng.uniform(1 - JITTER, 1 + JITTER), BACKOFF_CAP)
            until_expiry = (cert.not_after - now).total_seconds() if cert else 0.0
            # Retry no later than expiry, when there is no longer a valid cert to serve.
            return min(backoff, until_expiry) if until_expiry > 0 else backoff
        if cert is None:
            return 0.0
        return max((cert.refresh_at - now).total_seconds(), MIN_REFRESH_DELAY)


def _state(entry: _Entry, now: datetime.datetime) -> CertState:
    cert = entry.cert
    if cert is not None and cert.is_valid_at(now):
        state = "Available"
    elif entry.error is not None:
        state = f"Unavailable: {entry.error}"
    elif cert is not None:
        state = "Unavailable: certificate expired"
    else:
        state = "Initializing"
    return CertState(entry.identity, state, cert)


def _as_issue_error(identity: Identity, exc: Exception) -> IssueError:
    if isinstance(exc, _ISSUE_ERRORS):
        return exc
    return CAError(f"certificate request for {identity} failed: {exc!r}")
