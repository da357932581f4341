"""Per-connection parsing done once: addresses, HBONE authorities and baggage are cached,
and a cache never changes an answer (same values, errors not cached, a changed workload
gets its own baggage, the caches stay bounded)."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from proxy_fakes import wl

from ztunnel.model import address
from ztunnel.model.address import HostPort, SocketAddr, canonical_ip, parse_authority
from ztunnel.proxy import headers


def test_a_parsed_address_is_reused_and_canonical() -> None:
    first = canonical_ip("::ffff:10.0.0.1")
    assert first == ipaddress.IPv4Address("10.0.0.1")
    assert canonical_ip("::ffff:10.0.0.1") is first
    assert SocketAddr.from_sockaddr(("::ffff:10.0.0.1", 80, 0, 0)) == SocketAddr.of("10.0.0.1", 80)
    assert canonical_ip("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1")


def test_bad_texts_still_raise_every_time() -> None:
    for _ in range(2):
        with pytest.raises(ValueError):
            canonical_ip("10.0.0.300")
        with pytest.raises(ValueError):
            parse_authority("::1:80")  # an IPv6 authority needs brackets
    assert "10.0.0.300" not in address._parsed_ips


def test_authorities_parse_the_same_from_the_cache() -> None:
    for _ in range(2):
        assert parse_authority("10.0.0.2:8080") == SocketAddr.of("10.0.0.2", 8080)
        assert parse_authority("[::ffff:10.0.0.2]:80") == SocketAddr.of("10.0.0.2", 80)
        assert parse_authority("echo.ns.svc.cluster.local:80") == HostPort(
            "echo.ns.svc.cluster.local", 80
        )


def test_the_parse_caches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(address, "MAX_PARSED", 4)
    for i in range(20):
        canonical_ip(f"10.1.0.{i}")
        parse_authority(f"10.1.0.{i}:80")
    assert len(address._parsed_ips) <= 4 and len(address._parsed_authorities) <= 4


def test_an_address_formats_once_and_stays_equal_to_a_fresh_one() -> None:
    addr = SocketAddr.of("2001:db8::1", 443)
    assert str(addr) == "[2001:db8::1]:443" and str(addr) is str(addr)
    fresh = SocketAddr.of("2001:db8::1", 443)
    assert addr == fresh and hash(addr) == hash(fresh) and not addr < fresh
    assert repr(addr) == repr(fresh)


def test_baggage_follows_a_changed_workload() -> None:
    pod = wl("client", "10.0.0.1", canonical_revision="v1")
    assert "service.version=v1" in headers.baggage(pod)
    assert headers.baggage(pod) is headers.baggage(pod)
    v2 = dataclasses.replace(pod, canonical_revision="v2")
    assert "service.version=v2" in headers.baggage(v2)
    unnamed = dataclasses.replace(v2, cluster_id="")  # the agent's cluster name fills in
    assert "k8s.cluster.name=Kubernetes" in headers.baggage(unnamed)
    assert "k8s.cluster.name=other" in headers.baggage(unnamed, "other")


def test_traceparent_is_fresh_per_connection() -> None:
    a, b = headers.traceparent(), headers.traceparent()
    assert a != b and len(a) == len("00-") + 32 + 1 + 16 + len("-00")
