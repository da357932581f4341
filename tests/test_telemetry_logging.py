"""Access logs and runtime log-level changes, captured from the configured stream."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from test_telemetry_metrics import ECHO, ECHO_SVC, SHELL, outbound

from ztunnel.model.address import SocketAddr
from ztunnel.model.outcome import Failure, FailureKind
from ztunnel.telemetry import logging as zlog
from ztunnel.telemetry.connections import ConnectionInfo, ConnectionTracker
from ztunnel.telemetry.metrics import Metrics


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    zlog.unconfigure_logging()


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_access_log_has_ztunnel_fields(stream: io.StringIO) -> None:
    zlog.configure_logging("info", "plain", stream)
    clock = Clock()
    conn = ConnectionTracker(Metrics(), clock=clock).open(outbound())
    conn.add_sent(67)
    conn.add_received(490)
    clock.now += 0.013
    conn.close()
    [line] = lines(stream)  # "connection opened" is DEBUG: not shown at info
    ts, level, logger, rest = line.split("\t")
    assert ts.endswith("Z") and ts[:2] == "20"
    assert (level, logger) == ("info", "access")
    assert rest == (
        "connection complete src.addr=10.244.0.24:46238"
        f' src.workload="shell-1" src.namespace="default" src.identity="{SHELL.identity}"'
        " dst.addr=10.244.1.7:15008 dst.hbone_addr=10.244.1.7:8080"
        f' dst.service="{ECHO_SVC.hostname}" dst.workload="echo-1" dst.namespace="echo"'
        f' dst.identity="{ECHO.identity}" direction="outbound"'
        ' bytes_sent=67 bytes_recv=490 duration="13ms"'
    )


def test_json_access_log_and_error_level(stream: io.StringIO) -> None:
    zlog.configure_logging("debug", "json", stream)
    conn = ConnectionTracker(Metrics()).open(outbound(direction="inbound", reporter="destination"))
    conn.close(Failure(FailureKind.CLIENT_ABORTED, "connection reset by peer"))
    opened, complete = (json.loads(ln) for ln in lines(stream))
    assert (opened["level"], opened["scope"], opened["message"]) == (
        "debug",
        "access",
        "connection opened",
    )
    assert "bytes_sent" not in opened
    assert complete["level"] == "error"
    assert complete["message"] == "connection complete"
    assert complete["error"] == "connection reset by peer"
    assert complete["direction"] == "inbound"
    assert complete["src.addr"] == "10.244.0.24:46238"
    assert complete["bytes_recv"] == 0
    assert "time" in complete


def test_absent_fields_are_omitted(stream: io.StringIO) -> None:
    zlog.configure_logging("info", "json", stream)
    info = ConnectionInfo(
        "outbound", "source", SocketAddr.of("127.0.0.1", 1), SocketAddr.of("192.0.2.1", 80)
    )
    ConnectionTracker(Metrics()).open(info).close()
    [entry] = [json.loads(ln) for ln in lines(stream)]
    assert not any(k.startswith("src.w") or k.endswith("identity") for k in entry)
    assert "error" not in entry


def test_connection_failed_is_a_warning(stream: io.StringIO) -> None:
    zlog.configure_logging("info", "plain", stream)
    tracker = ConnectionTracker(Metrics())
    tracker.connection_failed(
        SocketAddr.of("10.0.0.1", 5),
        SocketAddr.of("10.0.0.2", 15008),
        "inbound",
        Failure(FailureKind.TLS_HANDSHAKE, "tls handshake"),
    )
    [line] = lines(stream)
    assert line.split("\t")[1:3] == ["warn", "access"]
    assert line.endswith(
        'connection failed src.addr=10.0.0.1:5 dst.addr=10.0.0.2:15008 direction="inbound"'
        ' error="tls handshake"'
    )
    assert tracker.open_connections() == []


def test_level_changes_apply_without_restart(stream: io.StringIO) -> None:
    zlog.configure_logging("info", "plain", stream)
    tracker = ConnectionTracker(Metrics())
    proxy_log = zlog.get_logger("ztunnel.proxy.outbound")
    tracker.open(outbound())
    proxy_log.debug("pool miss")
    assert lines(stream) == []

    assert zlog.set_filter("ztunnel::proxy=debug,info") == "ztunnel::proxy=debug,info"
    tracker.open(outbound())
    proxy_log.debug("pool miss")
    assert [ln.split("\t")[2:] for ln in lines(stream)] == [["ztunnel.proxy.outbound", "pool miss"]]

    zlog.set_filter("access=debug,error")  # replaces the whole filter
    proxy_log.info("not shown")
    tracker.open(outbound())
    assert "connection opened" in lines(stream)[-1]
    assert len(lines(stream)) == 2

    assert zlog.reset() == "info"
    tracker.open(outbound())
    proxy_log.debug("not shown")
    assert len(lines(stream)) == 2
    assert zlog.current_filter() == "info"


def test_off_silences_a_target(stream: io.StringIO) -> None:
    zlog.configure_logging("access=off,info", "plain", stream)
    ConnectionTracker(Metrics()).open(outbound()).close(Failure(FailureKind.INTERNAL, "boom"))
    logging.getLogger("ztunnel.other").warning("kept %d", 1)
    assert [ln.split("\t")[3] for ln in lines(stream)] == ["kept 1"]


def test_per_request_library_lines_stay_quiet_unless_named(stream: io.StringIO) -> None:
    """httpx2 logs every Kubernetes watch and patch at info: warnings only, by default."""
    http = logging.getLogger("httpx2")
    zlog.configure_logging("debug", "plain", stream)
    http.info("HTTP Request: GET /api/v1/pods?watch=1")
    http.warning("kept")
    zlog.set_filter("httpx2=info,info")
    http.info("HTTP Request: PATCH /api/v1/namespaces/a/pods/b/status")
    zlog.set_filter("error")
    http.warning("dropped: less than warn asked for")
    zlog.reset()
    http.info("HTTP Request: GET /api/v1/pods?watch=1")
    assert [ln.split("\t")[3] for ln in lines(stream)] == [
        "kept",
        "HTTP Request: PATCH /api/v1/namespaces/a/pods/b/status",
    ]


@pytest.mark.parametrize("spec", ["loud", "ztunnel::proxy:debug", "=debug", "", "a=b"])
def test_invalid_filters_are_rejected(stream: io.StringIO, spec: str) -> None:
    zlog.configure_logging("info", "plain", stream)
    with pytest.raises(ValueError):
        zlog.set_filter(spec)
    assert zlog.current_filter() == "info"


def test_filter_parse_roundtrip() -> None:
    f = zlog.LogFilter.parse(" ztunnel::proxy=DEBUG , access=warn,error ")
    assert f == zlog.LogFilter("error", (("ztunnel::proxy", "debug"), ("access", "warn")))
    assert str(f) == "ztunnel::proxy=debug,access=warn,error"
    assert zlog.LogFilter.parse("trace").default == "trace"
    assert zlog.logger_name("ztunnel::proxy::inbound") == "ztunnel.proxy.inbound"


def test_access_lines_follow_the_filter_as_it_changes(stream: io.StringIO) -> None:
    """The tracker asks the filter before it renders a line: off, nothing is written (the
    history still records the connection); back on, the next connection is logged."""
    zlog.configure_logging("access=warn,info", "plain", stream)
    tracker = ConnectionTracker(Metrics())
    tracker.open(outbound()).close()
    assert lines(stream) == []
    assert len(tracker.history) == 1
    tracker.open(outbound()).close(Failure(FailureKind.CLIENT_ABORTED, "reset"))
    assert [ln.split("\t")[1:3] for ln in lines(stream)] == [["error", "access"]]
    zlog.set_filter("access=debug")
    tracker.open(outbound()).close()
    assert [ln.split("\t")[1] for ln in lines(stream)[1:]] == ["debug", "info"]
