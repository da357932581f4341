"""SecretManager: single-flight issuance, the CSR limit, half-life renewal, backoff, the dump.

Time is trio's autojump MockClock; the manager and the CA read the same fake wall clock
(BASE + trio time), so certificates and timers agree.
"""

from __future__ import annotations

import base64
import datetime
import random

import pytest
import trio
import trio.lowlevel
import trio.testing

from ztunnel.identity.ca import FakeCA
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.identity.errors import CAError
from ztunnel.identity.manager import SecretManager
from ztunnel.model.identity import Identity

ALICE = Identity("cluster.local", "default", "alice")
BOB = Identity("cluster.local", "default", "bob")
BASE = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
TTL = datetime.timedelta(seconds=100)


def fake_now() -> datetime.datetime:
    return BASE + datetime.timedelta(seconds=trio.current_time())


class GatedCA:
    """A real FakeCA that counts CSRs, can be held at a gate, and can be made to fail."""

    def __init__(self) -> None:
        self.ca = FakeCA.ephemeral(clock=fake_now)
        self.calls = 0
        self.in_flight = 0
        self.peak = 0
        self.gate: trio.Event | None = None
        self.failure: Exception | None = None

    async def create_certificate(self, csr_pem: bytes, validity: datetime.timedelta) -> list[bytes]:
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await trio.lowlevel.checkpoint()
            if self.failure is not None:
                raise self.failure
            return await self.ca.create_certificate(csr_pem, validity)
        finally:
            self.in_flight -= 1


def manager(ca: GatedCA, **kw: object) -> SecretManager:
    return SecretManager(ca, ttl=TTL, clock=fake_now, rng=random.Random(7), **kw)  # type: ignore[arg-type]


@pytest.fixture
def ca() -> GatedCA:
    return GatedCA()


async def test_concurrent_fetches_send_one_csr(ca: GatedCA) -> None:
    sm = manager(ca)
    results: list[WorkloadCertificate] = []
    ca.gate = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(lambda: _append(results, sm.fetch(ALICE)))
            await trio.testing.wait_all_tasks_blocked()
            assert sm.states()[0].state == "Initializing"
            ca.gate.set()
        assert ca.calls == 1 and len({id(c) for c in results}) == 1
        assert await sm.fetch(ALICE) is results[0] and ca.calls == 1
        assert (await sm.fetch(BOB)).identity == BOB and ca.calls == 2


async def _append(out: list[WorkloadCertificate], fetch: object) -> None:
    out.append(await fetch)  # type: ignore[misc]


async def test_at_most_eight_csrs_in_flight(ca: GatedCA) -> None:
    sm = manager(ca)
    ca.gate = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(sm.fetch, Identity("cluster.local", "ns", f"sa{i}"))
            await trio.testing.wait_all_tasks_blocked()
            assert ca.in_flight == 8
            ca.gate.set()
    assert ca.calls == 20 and ca.peak == 8
    assert all(s.state == "Available" for s in sm.states())


async def test_renews_at_half_life_and_notifies(
    ca: GatedCA, autojump_clock: trio.testing.MockClock
) -> None:
    sm = manager(ca)
    seen: list[tuple[Identity, int]] = []
    sm.subscribe(lambda ident, cert: seen.append((ident, cert.serial)))
    with trio.fail_after(500):
        async with trio.open_nursery() as nursery:
            await nursery.start(sm.run)
            first = await sm.fetch(ALICE)
            assert first.refresh_at == fake_now() + TTL / 2
            await trio.sleep(49)
            assert sm.get(ALICE) is first and sm.version(ALICE) == 1
            await trio.sleep(2)
            second = sm.get(ALICE)
            assert second is not None and second is not first and sm.version(ALICE) == 2
            assert second.refresh_at > first.refresh_at
            assert seen == [(ALICE, first.serial), (ALICE, second.serial)]
            await trio.sleep(50)
            assert sm.version(ALICE) == 3 and ca.calls == 3
            nursery.cancel_scope.cancel()


async def test_failed_renewal_backs_off_and_keeps_serving(
    ca: GatedCA, autojump_clock: trio.testing.MockClock
) -> None:
    sm = manager(ca)
    with trio.fail_after(500):
        async with trio.open_nursery() as nursery:
            await nursery.start(sm.run)
            first = await sm.fetch(ALICE)
            ca.failure = CAError("CA is down")
            await trio.sleep(50 + 8)
            # Due at 50 s, then retries at ~0.5, 1, 2, 4 s later: a handful, not a storm.
            assert 4 <= ca.calls - 1 <= 6
            assert sm.get(ALICE) is first and await sm.fetch(ALICE) is first
            assert sm.states()[0].state == "Available"
            await trio.sleep(50)  # past expiry: retries continue, nothing valid to serve
            assert sm.get(ALICE) is None
            assert sm.states()[0].state.startswith("Unavailable: CA is down")
            ca.failure = None
            await trio.sleep(BACKOFF_CAP_S + 1)
            renewed = sm.get(ALICE)
            assert renewed is not None and renewed is not first
            assert sm.states()[0].state == "Available"
            nursery.cancel_scope.cancel()


BACKOFF_CAP_S = 150


async def test_backoff_is_capped(ca: GatedCA, autojump_clock: trio.testing.MockClock) -> None:
    sm = SecretManager(ca, ttl=datetime.timedelta(days=2), clock=fake_now, rng=random.Random(1))
    with trio.fail_after(10**6):
        async with trio.open_nursery() as nursery:
            await nursery.start(sm.run)
            await sm.fetch(ALICE)
            ca.failure = CAError("down")
            await trio.sleep(86400 + 3600)  # an hour of failures after the half-life
            # Uncapped doubling would give ~13 attempts; a 150 s cap gives 24+.
            assert ca.calls - 1 >= 3600 // 150
            nursery.cancel_scope.cancel()


async def test_first_fetch_failure_reaches_every_waiter(ca: GatedCA) -> None:
    sm = manager(ca)
    ca.gate, ca.failure = trio.Event(), OSError("connection refused")
    errors: list[str] = []

    async def fetch() -> None:
        with pytest.raises(CAError) as info:
            await sm.fetch(ALICE)
        errors.append(str(info.value))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(fetch)
            await trio.testing.wait_all_tasks_blocked()
            ca.gate.set()
    assert ca.calls == 1 and len(errors) == 3 and "connection refused" in errors[0]
    assert sm.states()[0].state.startswith("Unavailable: certificate request for")


async def test_cancelled_issuer_does_not_strand_waiters(ca: GatedCA) -> None:
    sm = manager(ca)
    ca.gate = trio.Event()
    results: list[WorkloadCertificate] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            issuer = trio.CancelScope()

            async def first() -> None:
                with issuer:
                    await sm.fetch(ALICE)

            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(lambda: _append(results, sm.fetch(ALICE)))
            await trio.testing.wait_all_tasks_blocked()
            issuer.cancel()
            await trio.testing.wait_all_tasks_blocked()
            ca.gate.set()
    assert len(results) == 1 and ca.calls == 2


async def test_rotate_forces_a_new_certificate(ca: GatedCA) -> None:
    sm = manager(ca)
    with trio.fail_after(5):
        first = await sm.fetch(ALICE)
        second = await sm.rotate(ALICE)
    assert second.serial != first.serial and sm.version(ALICE) == 2
    assert sm.get(ALICE) is second


async def test_forget_stops_renewal(ca: GatedCA, autojump_clock: trio.testing.MockClock) -> None:
    sm = manager(ca)
    with trio.fail_after(500):
        async with trio.open_nursery() as nursery:
            await nursery.start(sm.run)
            await sm.fetch(ALICE)
            sm.forget(ALICE)
            await trio.sleep(120)
            assert ca.calls == 1 and sm.states() == [] and sm.version(ALICE) == 0
            nursery.cancel_scope.cancel()


async def test_dump_has_ztunnel_shape(ca: GatedCA) -> None:
    sm = manager(ca)
    with trio.fail_after(5):
        cert = await sm.fetch(ALICE)
    [entry] = sm.dump()
    assert entry["identity"] == "spiffe://cluster.local/ns/default/sa/alice"
    assert entry["state"] == "Available"
    chain, roots = entry["certChain"], entry["rootCerts"]
    assert isinstance(chain, list) and isinstance(roots, list) and len(chain) == len(roots) == 1
    assert base64.b64decode(chain[0]["pem"]) == cert.leaf_pem()
    assert base64.b64decode(roots[0]["pem"]) == cert.roots_pem()
    assert chain[0]["serialNumber"] == str(cert.serial)
    assert chain[0]["validFrom"] == cert.not_before.isoformat()
    assert datetime.datetime.fromisoformat(chain[0]["expirationTime"]) == cert.not_after
    assert chain[0]["expirationTime"].endswith("+00:00")
