"""Log injection (issue 14): values from the network never split or forge a plain-text log
line; JSON lines stay one valid object each. Hostile values go through the logging layer
(every kind of field) and through the access log of a connection."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from ztunnel.model.address import SocketAddr
from ztunnel.model.outcome import Failure, FailureKind
from ztunnel.telemetry import logging as zlog
from ztunnel.telemetry.connections import ConnectionTracker
from ztunnel.telemetry.metrics import Metrics

# A forged record: what an attacker would like to add as a line of its own.
FORGED = "2026-01-01T00:00:00Z\tinfo\taccess\tconnection complete src.addr=6.6.6.6:1"
HOSTILE = [
    f"x\n{FORGED}",
    f"x\r\n{FORGED}",
    f"x\r{FORGED}",
    "tab\there",
    "esc\x1b[31mred",
    "nul\x00byte",
    "del\x7f",
    "line\u2028separator",
    "next\x85line",
    "para\u2029graph",
    'quote" injected="yes',
    "back\\slash\\n",
]


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    zlog.unconfigure_logging()


def _records(out: io.StringIO) -> list[str]:
    # Every separator a log reader might split on: \n, \r, and Unicode line boundaries.
    text = out.getvalue()
    assert text.endswith("\n")
    return text[:-1].splitlines()


def _assert_plain_safe(line: str) -> None:
    assert all(ch.isprintable() or ch == "\t" for ch in line), repr(line)
    assert line.count("\t") == 3, repr(line)  # time, level, logger, message+fields


@pytest.mark.parametrize("value", HOSTILE)
def test_plain_text_fields_cannot_split_or_forge_a_line(stream: io.StringIO, value: str) -> None:
    zlog.configure_logging("info", "plain", stream)
    log = zlog.get_logger("access")
    log.info(
        value,  # the message
        **{"dst.hbone_addr": zlog.Bare(value), "error": value, value: "key"},  # type: ignore[arg-type]
    )
    [line] = _records(stream)
    _assert_plain_safe(line)
    _ts, level, logger, rest = line.split("\t")
    assert (level, logger) == ("info", "access")
    # The value is still there, escaped: a reader can recover it.
    assert json.dumps(value) in rest  # the str field, JSON-quoted
    assert f" dst.hbone_addr={json.dumps(value)}" in rest  # an unsafe Bare is quoted too


def test_safe_bare_values_stay_bare(stream: io.StringIO) -> None:
    zlog.configure_logging("info", "plain", stream)
    zlog.get_logger("access").info("m", **{"src.addr": zlog.Bare("[fd00::1]:8080")})
    [line] = _records(stream)
    assert line.endswith("\tm src.addr=[fd00::1]:8080")


@pytest.mark.parametrize("value", HOSTILE)
def test_json_lines_stay_one_object(stream: io.StringIO, value: str) -> None:
    zlog.configure_logging("info", "json", stream)
    zlog.get_logger("access").info(value, error=value, **{"dst.hbone_addr": zlog.Bare(value)})
    [line] = _records(stream)
    entry = json.loads(line)
    assert entry["message"] == entry["error"] == entry["dst.hbone_addr"] == value


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_a_peer_value_reaching_the_access_log(stream: io.StringIO, fmt: str) -> None:
    """A header value with a newline (as a peer's baggage or authority would carry it)
    ends in the access log's error of a refused connection: still one record."""
    zlog.configure_logging("info", fmt, stream)
    peer_value = f"k8s.pod.name=x\n{FORGED}"
    ConnectionTracker(Metrics()).connection_failed(
        SocketAddr.of("10.0.0.1", 5),
        SocketAddr.of("10.0.0.2", 15008),
        "inbound",
        Failure(FailureKind.IDENTITY_REJECTED, f"bad baggage: {peer_value}"),
    )
    [line] = _records(stream)
    if fmt == "json":
        assert json.loads(line)["error"] == f"bad baggage: {peer_value}"
    else:
        _assert_plain_safe(line)
        assert line.endswith(f" error={json.dumps('bad baggage: ' + peer_value)}")


def test_stdlib_records_with_hostile_arguments(stream: io.StringIO) -> None:
    """Third-party and %-style stdlib records (h2's errors quote peer bytes) too."""
    zlog.configure_logging("info", "plain", stream)
    logging.getLogger("ztunnel.hbone").warning("peer protocol error: %s", f"h\n{FORGED}")
    [line] = _records(stream)
    _assert_plain_safe(line)
    escaped = "h\\n" + FORGED.replace("\t", "\\t")
    assert line.split("\t")[3] == f"peer protocol error: {escaped}"


def test_a_traceback_cannot_forge_a_record(stream: io.StringIO) -> None:
    zlog.configure_logging("info", "plain", stream)
    try:
        raise ValueError(f"from the peer\n{FORGED}")
    except ValueError:
        zlog.get_logger("ztunnel.proxy").exception("handler failed")
    first, *rest = _records(stream)
    _assert_plain_safe(first)
    assert rest and all(ln.startswith("  ") for ln in rest)
    assert not any(ln.startswith("20") for ln in rest)
