"""Metrics produced by the connection tracker, read back through a real exposition parse."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ztunnel.model.address import HostPort, SocketAddr
from ztunnel.model.identity import Identity
from ztunnel.model.outcome import Failure, FailureKind, ResponseFlag
from ztunnel.model.workload import Locality, Service, TunnelProtocol, Workload
from ztunnel.telemetry.connections import ConnectionInfo, ConnectionTracker
from ztunnel.telemetry.metrics import FAILURE_FLAGS, TRAFFIC_LABELS, Metrics

SHELL = Workload(
    uid="Kubernetes//Pod/default/shell-1",
    name="shell-1",
    namespace="default",
    workload_ips=(ip_address("10.244.0.24"),),
    service_account="sleep",
    protocol=TunnelProtocol.HBONE,
    canonical_name="shell",
    canonical_revision="v1",
    locality=Locality(region="eu", zone="eu-a"),
)
ECHO = Workload(
    uid="Kubernetes//Pod/echo/echo-1",
    name="echo-1",
    namespace="echo",
    workload_ips=(ip_address("10.244.1.7"),),
    service_account="echo",
    protocol=TunnelProtocol.HBONE,
    workload_name="echo",
    cluster_id="c2",
)
ECHO_SVC = Service(name="echo", namespace="echo", hostname="echo.echo.svc.cluster.local")


def samples(metrics: Metrics, name: str) -> list[tuple[dict[str, str], float]]:
    text = metrics.exposition().decode()
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = [v for lbl, v in samples(metrics, name) if labels.items() <= lbl.items()]
    assert len(found) <= 1, found
    return found[0] if found else 0.0


def outbound(**kw: object) -> ConnectionInfo:
    fields: dict[str, object] = dict(
        direction="outbound",
        reporter="source",
        src_addr=SocketAddr.of("10.244.0.24", 46238),
        dst_addr=SocketAddr.of("10.244.1.7", 15008),
        hbone_addr=SocketAddr.of("10.244.1.7", 8080),
        src_workload=SHELL,
        dst_workload=ECHO,
        dst_service=ECHO_SVC,
        src_identity=SHELL.identity,
        dst_identity=ECHO.identity,
        security_policy="mutual_tls",
        proxy_uid=SHELL.uid,
    )
    fields.update(kw)
    return ConnectionInfo(**fields)  # type: ignore[arg-type]


def test_outbound_labels_follow_istio_names_and_values() -> None:
    metrics = Metrics()
    ConnectionTracker(metrics).open(outbound())
    [(labels, count)] = samples(metrics, "istio_tcp_connections_opened_total")
    assert count == 1
    assert labels == {
        "reporter": "source",
        "source_workload": "shell-1",
        "source_canonical_service": "shell",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
        "source_app": "shell",
        "source_version": "v1",
        "source_cluster": "Kubernetes",
        "destination_service": "echo.echo.svc.cluster.local",
        "destination_service_namespace": "echo",
        "destination_service_name": "echo",
        "destination_workload": "echo",
        "destination_canonical_service": "echo",
        "destination_canonical_revision": "unknown",
        "destination_workload_namespace": "echo",
        "destination_principal": "spiffe://cluster.local/ns/echo/sa/echo",
        "destination_app": "echo",
        "destination_version": "unknown",
        "destination_cluster": "c2",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
        "source_region": "eu",
        "source_zone": "eu-a",
        "destination_region": "unknown",
        "destination_zone": "unknown",
    }


def test_label_order_is_istios() -> None:
    # The text exposition sorts labels (order carries no meaning there); the declared
    # order, which the collected samples keep, is Istio's.
    metrics = Metrics()
    ConnectionTracker(metrics).open(outbound())
    [sample] = [
        s
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "istio_tcp_connections_opened_total"
    ]
    assert tuple(sample.labels) == TRAFFIC_LABELS


def test_bytes_are_counted_live_and_sockets_tracked() -> None:
    metrics = Metrics()
    conn = ConnectionTracker(metrics).open(outbound())
    conn.add_sent(67)
    conn.add_received(490)
    conn.add_received(10)
    # Visible before close: long-lived connections must show up in scrapes.
    assert value(metrics, "istio_tcp_sent_bytes_total", reporter="source") == 67
    assert value(metrics, "istio_tcp_received_bytes_total", reporter="source") == 500
    assert value(metrics, "istio_tcp_sockets_open", reporter="source") == 1
    assert value(metrics, "istio_tcp_connections_closed_total") == 0
    conn.close()
    assert (conn.bytes_sent, conn.bytes_received) == (67, 500)
    assert value(metrics, "istio_tcp_connections_closed_total", response_flags="-") == 1
    assert value(metrics, "istio_tcp_sockets_open", reporter="source") == 0


def test_inbound_denied_counts_failure_with_flag() -> None:
    metrics = Metrics()
    tracker = ConnectionTracker(metrics)
    info = outbound(
        direction="inbound", reporter="destination", dst_addr=SocketAddr.of("10.244.1.7", 8080)
    )
    conn = tracker.open(info)
    conn.close(Failure(FailureKind.DENIED, "RBAC: denied"))
    conn.close(Failure(FailureKind.CONNECT_REFUSED, "again"))  # idempotent
    assert value(metrics, "istio_tcp_connections_opened_total", reporter="destination") == 1
    assert value(metrics, "istio_tcp_connections_opened_total", response_flags="-") == 1
    assert value(metrics, "istio_tcp_connections_closed_total", response_flags="DENY") == 1
    assert value(metrics, "istio_tcp_connections_failed_total", response_flags="DENY") == 1
    assert value(metrics, "istio_tcp_connections_closed_total", response_flags="CONNECT") == 0
    assert value(metrics, "istio_tcp_sockets_open", reporter="destination") == 0


def test_non_failure_flag_does_not_count_as_failed() -> None:
    metrics = Metrics()
    tracker = ConnectionTracker(metrics)
    tracker.open(outbound()).close()
    tracker.open(outbound()).close(Failure(FailureKind.CLIENT_ABORTED, "connection reset by peer"))
    assert value(metrics, "istio_tcp_connections_closed_total", response_flags="-") == 2
    assert samples(metrics, "istio_tcp_connections_failed_total") == []


@pytest.mark.parametrize(
    ("kind", "flag"),
    [
        (FailureKind.DENIED, "DENY"),
        (FailureKind.POLICY_CUT, "DENY"),
        (FailureKind.UPSTREAM_DENIED, "CONNECT"),
        (FailureKind.CONNECT_TIMEOUT, "CONNECT"),
        (FailureKind.INTERRUPTED, "-"),
        (FailureKind.INTERNAL, "-"),
    ],
)
def test_failure_kind_sets_the_response_flag(kind: FailureKind, flag: str) -> None:
    metrics = Metrics()
    ConnectionTracker(metrics).open(outbound()).close(Failure(kind, "why"))
    assert value(metrics, "istio_tcp_connections_closed_total", response_flags=flag) == 1
    failed = value(metrics, "istio_tcp_connections_failed_total", response_flags=flag)
    assert failed == (0 if flag == "-" else 1)


def test_failure_flags_are_istios() -> None:
    assert {
        "CONNECT",
        "DENY",
        "TLS_FAILURE",
        "H2_HANDSHAKE_FAILURE",
        "NETWORK_POLICY",
        "IDENTITY_ERROR",
        "CERT_REVOKED",
    } == FAILURE_FLAGS
    assert ResponseFlag.NONE.value == "-" and ResponseFlag.NONE not in FAILURE_FLAGS


def test_unknown_everything_renders_unknown() -> None:
    metrics = Metrics()
    info = ConnectionInfo(
        direction="outbound",
        reporter="source",
        src_addr=SocketAddr.of("127.0.0.1", 1),
        dst_addr=SocketAddr.of("192.0.2.1", 80),
    )
    ConnectionTracker(metrics).open(info)
    [(labels, _)] = samples(metrics, "istio_tcp_connections_opened_total")
    fixed = {"reporter", "request_protocol", "response_flags", "connection_security_policy"}
    assert {k: v for k, v in labels.items() if k not in fixed} == {
        k: "unknown" for k in TRAFFIC_LABELS if k not in fixed
    }
    assert labels["connection_security_policy"] == "unknown"


def test_source_principal_only_from_verified_identity() -> None:
    metrics = Metrics()
    ConnectionTracker(metrics).open(outbound(src_identity=None))
    [(labels, _)] = samples(metrics, "istio_tcp_connections_opened_total")
    assert labels["source_principal"] == "unknown"
    assert labels["source_workload"] == "shell-1"


def test_other_metric_names_and_registries_are_separate() -> None:
    a, b = Metrics(tag="1.2.3"), Metrics()
    a.proxies_started.inc()
    a.active_proxies.set(3)
    names = {
        s.name for f in text_string_to_metric_families(a.exposition().decode()) for s in f.samples
    }
    assert {
        "istio_build",
        "istio_active_proxy_count",
        "istio_pending_proxy_count",
        "istio_proxies_started_total",
        "istio_proxies_stopped_total",
        "istio_process_open_fds",
        "istio_process_max_fds",
        "process_resident_memory_bytes",
    } <= names
    assert not any(n.endswith("_created") or "_total_total" in n for n in names)
    assert value(a, "istio_build", component="ztunnel", tag="1.2.3") == 1
    assert value(a, "istio_active_proxy_count") == 3
    assert value(a, "istio_process_open_fds") > 0
    assert value(b, "istio_proxies_started_total") == 0


def test_registry_lookup_and_cancel() -> None:
    tracker = ConnectionTracker(Metrics())
    cancelled: list[str] = []
    mine = tracker.open(outbound(direction="inbound", reporter="destination", proxy_uid=ECHO.uid))
    mine.cancel = lambda: cancelled.append("echo")
    other = tracker.open(outbound())
    assert tracker.connections_for(ECHO.uid) == [mine]
    for conn in tracker.connections_for(ECHO.uid):
        assert conn.cancel is not None
        conn.cancel()
    assert cancelled == ["echo"]
    mine.close()
    assert tracker.open_connections() == [other]
    [entry] = tracker.dump()
    assert entry["src"] == "10.244.0.24:46238"
    assert entry["actualDst"] == "10.244.1.7:15008"
    assert entry["originalDst"] == "10.244.1.7:8080"
    assert entry["protocol"] == "HBONE"
    assert entry["srcIdentity"] == str(Identity("cluster.local", "default", "sleep"))


def test_ipv6_addresses_are_bracketed() -> None:
    tracker = ConnectionTracker(Metrics())
    conn = tracker.open(outbound(src_addr=SocketAddr.of("fd00::1", 5000)))
    assert conn.dump()["src"] == "[fd00::1]:5000"


def test_addresses_are_formatted_at_the_edge() -> None:
    tracker = ConnectionTracker(Metrics())
    info = outbound(
        src_addr=SocketAddr.of("::ffff:10.244.0.24", 46238),  # a dual-stack listener's view
        hbone_addr=HostPort("echo.echo.svc.cluster.local", 80),
    )
    fields = tracker.open(info).log_fields()
    assert (fields["src.addr"], fields["dst.hbone_addr"]) == (
        "10.244.0.24:46238",
        "echo.echo.svc.cluster.local:80",
    )


def test_the_tracker_counts_ended_connections_for_the_memory_reclaim() -> None:
    """Proxied connections end seconds after their HBONE connection; the agent's reclaim
    (ztunnel/hbone/reclaim.py) adds ``tracker.ended`` so it runs after those too."""
    tracker = ConnectionTracker(Metrics())
    conns = [tracker.open(outbound(src_addr=SocketAddr.of("10.244.0.24", p))) for p in (1, 2, 3)]
    assert tracker.ended == 0
    for conn in conns:
        conn.close()
    conns[0].close()  # a second close records nothing
    assert tracker.ended == 3
