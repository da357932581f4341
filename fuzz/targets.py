"""The fuzz targets: each takes the fuzzer's bytes and returns whether the input reached
the deep end of its target (a CONNECT answered, a document parsed, a request decoded).

A target raises only for a bug: an exception outside the closed taxonomy its code
documents (those are caught here, one ``except`` per target), or a broken invariant
(``Finding``). Each target also has seeds: valid inputs the coverage-guided engine
starts from and the random engine mutates.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import h11
import hpack
import structlog
import trio
import trio.testing
import yaml
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from fuzz.cursor import Cursor
from fuzz.h2frames import (
    DATA,
    END_HEADERS,
    HEADERS,
    PREFACE,
    SETTINGS,
    Conversation,
    chunked,
    connect_headers,
    frame,
    grpc_headers,
    request_headers,
)

ROOT = Path(__file__).resolve().parent.parent


class Finding(AssertionError):
    """An invariant the target checks does not hold (a bug, like an unexpected exception)."""


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], bool]
    seeds: Callable[[], list[bytes]]
    # Modules atheris instruments for coverage feedback (prefixes); none may be imported
    # by fuzz.targets itself.
    instrument: tuple[str, ...] = ("ztunnel",)
    doc: str = ""


TARGETS: dict[str, Target] = {}


def target(
    name: str, seeds: Callable[[], list[bytes]], instrument: tuple[str, ...] = ("ztunnel",)
) -> Callable[[Callable[[bytes], bool]], Callable[[bytes], bool]]:
    def register(fn: Callable[[bytes], bool]) -> Callable[[bytes], bool]:
        TARGETS[name] = Target(name, fn, seeds, instrument, (fn.__doc__ or "").strip())
        return fn

    return register


def _cursor_seeds(n: int = 64) -> list[bytes]:
    """Structured targets: any bytes are a valid input; a spread of patterns to start."""
    return [bytes([i]) * 64 for i in range(0, 256, 256 // n)] + [bytes(range(256))]


# hpack, yaml, h11, trio and protobuf are imported by this module (or fuzz/h2frames.py),
# before atheris_main's instrumentation block, so they cannot be listed: a module is
# instrumented only when first imported inside the block (atheris_main checks this).
_H2 = ("ztunnel", "h2", "hyperframe")


# -- HBONE: the sans-IO engine -------------------------------------------------------------


def _check_authority(authority: str, status: int | None, host: str, port: int) -> None:
    if status is None:
        if not 1 <= port <= 65535:
            raise Finding(f"validate_connect accepted port {port} from {authority!r}")
        bad = any(ch.isspace() or not ch.isprintable() for ch in host)
        if not host or bad or "%" in host:  # "%": an IPv6 zone
            raise Finding(f"validate_connect accepted host {host!r} from {authority!r}")
    elif (status, host, port) != (400, "", 0):
        raise Finding(f"validate_connect returned {(status, host, port)!r}")


def _serve_engine(chunks: list[bytes]) -> bool:
    from ztunnel.hbone.engine import HboneEngine, validate_connect
    from ztunnel.hbone.errors import StreamClosedError
    from ztunnel.hbone.events import ConnectRequest, Data, StreamEnded

    engine = HboneEngine(client=False)
    engine.data_to_send()
    answered = False
    for chunk in chunks:
        for event in engine.receive_data(chunk):
            try:
                if isinstance(event, ConnectRequest):
                    status, host, port = validate_connect(event)
                    _check_authority(event.authority, status, host, port)
                    engine.respond(event.stream_id, status or 200, end_stream=status is not None)
                    answered = True
                elif isinstance(event, Data):
                    engine.acknowledge(event.stream_id, event.flow_controlled_length)
                    engine.send_data(event.stream_id, event.data)
                elif isinstance(event, StreamEnded):
                    engine.end_stream(event.stream_id)
            except StreamClosedError:
                pass  # the documented error of an operation on a finished stream
        out = engine.data_to_send()
        if not isinstance(out, bytes):
            raise Finding(f"data_to_send returned {type(out).__name__}")
        if engine.closed:
            break
    return answered


def _hbone_seeds() -> list[bytes]:
    return _cursor_seeds()


@target("hbone-raw", lambda: [_valid_connect_bytes(), PREFACE, b""], _H2)
def hbone_raw(data: bytes) -> bool:
    """Raw bytes after the TLS handshake into the server engine (HboneEngine + validate_connect)."""
    return _serve_engine([data])


@target("hbone-frames", _hbone_seeds, _H2)
def hbone_frames(data: bytes) -> bool:
    """Structured client conversations (preface, SETTINGS, CONNECT, any frames) into the engine."""
    c = Cursor(data)
    frames = Conversation(c, connect_headers).build()
    return _serve_engine(chunked(c, frames))


def _valid_connect_bytes() -> bytes:
    """Preface, empty SETTINGS, HEADERS(CONNECT 10.0.0.2:80), DATA: a well-formed client."""
    block = hpack.Encoder().encode([(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:80")])
    return (
        PREFACE
        + frame(SETTINGS, 0, 0, b"")
        + frame(HEADERS, END_HEADERS, 1, block)
        + frame(DATA, 0, 1, b"hello")
    )


# -- HBONE: the trio connection driver on an in-memory stream ---------------------------------


class _ErrorLog(logging.Handler):
    """ERROR records of the driver: its catch-all logs bugs instead of raising them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_driver_errors = _ErrorLog()
logging.getLogger("ztunnel.hbone").addHandler(_driver_errors)

_ERROR_METHODS = frozenset({"error", "exception", "critical", "fatal"})


@contextlib.contextmanager
def _structlog_errors() -> Iterator[list[str]]:
    """The driver's structlog error entries while the block runs, rendered; every entry
    is dropped, none printed.

    Why: the driver logs with structlog, which (unconfigured, as in the fuzzer process)
    prints and never reaches the stdlib handler above, so its catch-all errors went
    unseen (and each info line was rendered and printed).
    The processor list is swapped in place as structlog.testing.capture_logs does.
    """
    errors: list[str] = []

    def keep_errors(_logger: object, method: str, event: MutableMapping[str, object]) -> NoReturn:
        if method in _ERROR_METHODS:
            errors.append(repr(dict(event)))
        raise structlog.DropEvent

    processors = structlog.get_config()["processors"]
    saved = list(processors)
    processors[:] = [structlog.processors.format_exc_info, keep_errors]
    structlog.configure(processors=processors)
    try:
        yield errors
    finally:
        processors[:] = saved
        structlog.configure(processors=processors)


async def _echo(request: object, stream: object) -> None:
    from ztunnel.hbone.connection import HboneServerStream

    assert isinstance(stream, HboneServerStream)
    await stream.respond(200)
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.send_eof()


async def _drive_connection(chunks: list[bytes]) -> bool:
    from ztunnel.hbone.connection import serve_hbone
    from ztunnel.hbone.errors import ConnectionGoneError
    from ztunnel.hbone.settings import HboneSettings

    client, server = trio.testing.memory_stream_pair()
    answered = False
    ended = trio.Event()

    async def serve() -> None:
        with contextlib.suppress(ConnectionGoneError):  # a broken HTTP/2 handshake: documented
            await serve_hbone(server, _echo, settings=HboneSettings(drain_timeout=5.0))
        ended.set()

    async def read_all() -> None:
        nonlocal answered
        buf = b""
        while True:
            try:
                got = await client.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not got:
                return
            buf += got
            answered = answered or _has_response(buf)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        nursery.start_soon(read_all)
        try:
            for chunk in chunks:
                await client.send_all(chunk)
            await trio.sleep(1)
            await client.send_stream.aclose()  # EOF: the server must wind down
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.move_on_after(50):  # virtual time (autojump clock)
            await ended.wait()
        if not ended.is_set():
            raise Finding("the connection did not end 50 s (virtual) after the peer's EOF")
        nursery.cancel_scope.cancel()
    return answered


def _has_response(buf: bytes) -> bool:
    """Whether the server's bytes hold a HEADERS frame on a stream (a CONNECT answer)."""
    pos = 0
    while pos + 9 <= len(buf):
        length = int.from_bytes(buf[pos : pos + 3], "big")
        kind = buf[pos + 3]
        sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        if kind == 1 and sid:
            return True
        pos += 9 + length
    return False


@target("hbone-connection", _hbone_seeds, _H2)
def hbone_connection(data: bytes) -> bool:
    """The same conversations through the real driver (serve_hbone) over an in-memory stream."""
    c = Cursor(data)
    frames = Conversation(c, connect_headers).build()
    _driver_errors.records.clear()
    clock = trio.testing.MockClock(autojump_threshold=0)
    with _structlog_errors() as errors:
        answered = _run_trio(_drive_connection, chunked(c, frames), clock)
    if errors:
        raise Finding(f"driver logged an error: {errors[0]}")
    if _driver_errors.records:
        record = _driver_errors.records[0]
        raise Finding(f"driver logged an error: {record.getMessage()} {record.exc_info!r}")
    return answered


def _run_trio(fn: Callable[..., Awaitable[object]], arg: object, clock: trio.abc.Clock) -> bool:
    # One trio.run per input. One long-lived run in a thread for all inputs was tried:
    # the same Python calls per input (~4,300) and no CPU gain beyond the noise.
    try:
        return bool(trio.run(fn, arg, clock=clock))
    except BaseExceptionGroup as group:  # one exception inside: report it as itself
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            group = group.exceptions[0]
        raise group from None


# -- configuration parsers --------------------------------------------------------------------


def _files(*patterns: str) -> list[bytes]:
    return [p.read_bytes() for pattern in patterns for p in sorted(ROOT.glob(pattern))]


_LOCAL_CONFIG = (
    b"workloads:\n- uid: a\n  name: a\n  namespace: ns\n  serviceAccount: sa\n"
    b"  workloadIps: [10.0.0.1]\n  services: {ns/s.ns.svc.cluster.local: {80: 8080}}\n"
    b"services:\n- name: s\n  namespace: ns\n  hostname: s.ns.svc.cluster.local\n"
    b"  vips: [/10.96.0.1]\n  ports: {80: 8080}\npolicies:\n- name: p\n  namespace: ns\n"
    b"  scope: Namespace\n  action: Deny\n  rules: [[{matches: [{destinationPorts: [22]}]}]]\n"
)


def _local_config_seeds() -> list[bytes]:
    return [*_files("examples/*.yaml"), _LOCAL_CONFIG, b"[" * 200, b"&a [*a]"]


@target("localconfig", _local_config_seeds)
def localconfig(data: bytes) -> bool:
    """ztunnel local-config YAML (LOCAL_XDS / LOCAL_XDS_PATH): ConfigError or a config."""
    from ztunnel.errors import ConfigError
    from ztunnel.sources.localconfig import load_local_config

    try:
        load_local_config(data.decode("utf-8", "replace"), "fuzz")
    except ConfigError:
        return False
    return True


def _cluster_seeds() -> list[bytes]:
    """The cluster files, and one small file per section (namespaces and nodes, plus two
    items of the section): the whole demo file (4.4 KB, cut at the 4 KB input limit)
    mutated into a valid spec almost never, and each input cost its full YAML parse."""
    files = _files("ztunnel/cluster/*.yaml")
    sections: list[bytes] = []
    for text in files:
        spec = yaml.safe_load(text)
        base = {key: spec[key] for key in ("namespaces", "nodes") if key in spec}
        for key, value in spec.items():
            if key not in base:
                part = {**base, key: value[:2] if isinstance(value, list) else value}
                sections.append(yaml.safe_dump(part, sort_keys=False, width=1000).encode())
    return [*files, *sections, b"{" * 100]


@target("clusterfile", _cluster_seeds)
def clusterfile(data: bytes) -> bool:
    """The simulated-cluster file (--cluster): ConfigError or a spec."""
    from ztunnel.errors import ConfigError
    from ztunnel.sources.clusterfile.spec import loads_spec

    try:
        loads_spec(data.decode("utf-8", "replace"), "fuzz")
    except ConfigError:
        return False
    return True


_POLICIES = (
    b"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    b"metadata: {name: p, namespace: ns}\nspec:\n  action: DENY\n"
    b"  selector: {matchLabels: {app: echo}}\n  rules:\n"
    b"  - from: [{source: {principals: [cluster.local/ns/a/sa/b], ipBlocks: [10.0.0.0/8]}}]\n"
    b"    to: [{operation: {ports: ['80'], notPorts: ['22']}}]\n"
    b"    when: [{key: source.ip, values: [1.2.3.4]}]\n",
    b"apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n"
    b"metadata: {name: d, namespace: istio-system}\nspec: {mtls: {mode: STRICT},"
    b" portLevelMtls: {'8080': {mode: PERMISSIVE}}}\n",
)


# The translator's input is the documents, not their text: libyaml's parser (when built)
# gives the same safe types as PyYAML's pure-Python one, several times faster.
_SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _policy_seeds() -> list[bytes]:
    return [*_files("tests/**/policies/*.yaml", "deploy/**/*policy*.yaml"), *_POLICIES]


@target("istio-policy", _policy_seeds)
def istio_policy(data: bytes) -> bool:
    """Istio AuthorizationPolicy/PeerAuthentication YAML into L4 policies (policy/istio.py)."""
    from ztunnel.policy._fields import PolicyTranslationError
    from ztunnel.policy.istio import translate_documents

    try:
        docs = list(yaml.load_all(data.decode("utf-8", "replace"), Loader=_SAFE_LOADER))
    except (yaml.YAMLError, RecursionError):
        return False  # not the translator's input; the YAML layer is the parsers' target
    for strict in (False, True):
        try:
            translate_documents(docs, source="fuzz", strict=strict)
        except PolicyTranslationError:
            return False
    return True


# -- SOCKS5 -------------------------------------------------------------------------------------


def _socks_seeds() -> list[bytes]:
    return [
        b"\x05\x01\x00" + b"\x05\x01\x00\x01\x0a\x00\x00\x02\x00\x50",
        b"\x05\x02\x00\x02" + b"\x05\x01\x00\x03\x04echo\x1f\x90",
        b"\x05\x01\x00" + b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x50",
    ]


@target("socks5", _socks_seeds)
def socks5(data: bytes) -> bool:
    """SOCKS5 greeting + request (sans-IO): every prefix is 'need more', an error, or the
    same answer as the whole input (a request is judged the same however it is split)."""
    from ztunnel.proxy.socks5_proto import Socks5Error, parse_greeting, parse_request

    try:
        greeting = parse_greeting(data)
    except Socks5Error:
        return False
    if greeting is None:
        return False
    rest = data[greeting[1] :]
    try:
        full = parse_request(rest)
    except Socks5Error:
        full = None
    for cut in range(len(rest)):
        try:
            partial = parse_request(rest[:cut])
        except Socks5Error:
            if full is not None:
                raise Finding(f"prefix {rest[:cut]!r} refused, whole request accepted") from None
            continue
        if partial is not None and partial != full:
            raise Finding(f"prefix {rest[:cut]!r} parsed as {partial}, whole as {full}")
    if full is not None and not 0 <= full[0].target.port <= 65535:
        raise Finding(f"port {full[0].target.port}")
    return full is not None


# -- waypoint HTTP ------------------------------------------------------------------------------


_H1_SEEDS = [
    b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: echo:80\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: e\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
]


@target("waypoint-sniff", lambda: [*_H1_SEEDS, PREFACE, b"\x16\x03\x01"])
def waypoint_sniff(data: bytes) -> bool:
    """Protocol sniffing of a connection's first bytes (waypoint/sniff.py): every prefix,
    with and without EOF; once decided, more bytes never change the decision."""
    from ztunnel.waypoint.messages import Protocol
    from ztunnel.waypoint.sniff import sniff

    decision: tuple[bytes, Protocol] | None = None
    for cut in range(len(data) + 1):
        for eof in (False, True):
            got = sniff(data[:cut], eof=eof)
            if got is None and eof and cut:
                raise Finding(f"sniff({data[:cut]!r}, eof=True) is undecided")
            if got is not None and not isinstance(got, Protocol):
                raise Finding(f"sniff returned {got!r}")
            # The waypoint acts on the first decision: a later prefix deciding otherwise
            # would mean the protocol depends on how the bytes were split into reads.
            if decision is not None and got is not decision[1]:
                raise Finding(
                    f"sniff decided {decision[1]} at {decision[0]!r}, "
                    f"{got} at {data[:cut]!r} (eof={eof})"
                )
            if decision is None and got is not None and not eof:
                decision = (data[:cut], got)
    return sniff(data, eof=True) is not Protocol.TCP


@target("waypoint-h1", lambda: list(_H1_SEEDS))
def waypoint_h1(data: bytes) -> bool:
    """HTTP/1.1 request heads as the waypoint reads them (h11 + request_head, split_authority)."""
    from ztunnel.waypoint.h1server import _ambiguous_length, _head_size, request_head
    from ztunnel.waypoint.messages import split_authority

    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=60 * 1024)
    conn.receive_data(data)
    conn.receive_data(b"")
    reached = False
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed | h11.EndOfMessage):
                break
            if isinstance(event, h11.Request):
                head, _body, _upgrade = request_head(event)
                _ambiguous_length(event)
                _head_size(event)
                split_authority(head.authority)
                _ = (head.path, head.query, head.host, head.grpc)
                reached = True
    except h11.RemoteProtocolError:
        return reached
    return reached


@target("waypoint-h2", _cursor_seeds, _H2)
def waypoint_h2(data: bytes) -> bool:
    """HTTP/2 requests into the waypoint's sans-IO server protocol (waypoint/h2proto.py)."""
    from ztunnel.waypoint.h2proto import H2Protocol, RequestReceived, StreamGone
    from ztunnel.waypoint.messages import ResponseHead

    c = Cursor(data)
    proto = H2Protocol(client=False)
    proto.data_to_send()
    reached = False
    for chunk in chunked(c, Conversation(c, request_headers).build()):
        for event in proto.receive_data(chunk):
            if isinstance(event, RequestReceived):
                reached = True
                _ = (event.head.path, event.head.query, event.head.host)
                with contextlib.suppress(StreamGone):
                    proto.send_response(event.stream_id, ResponseHead(200, ()), end_stream=True)
        proto.data_to_send()
    return reached


# -- gRPC ---------------------------------------------------------------------------------------


@target("grpc-framing", lambda: [b"\x00\x00\x00\x00\x03abc\x00\x00\x00\x00\x00", b"\x01" * 5])
def grpc_framing(data: bytes) -> bool:
    """gRPC length-prefixed message reassembly: any split gives the same messages."""
    from ztunnel.grpc.framing import MessageReader
    from ztunnel.grpc.status import GrpcError

    c = Cursor(data[:8])
    body = data[8:]
    limit = c.pick((0, 1, 16, 4 * 1024 * 1024))
    try:
        whole = MessageReader(limit).feed(body)
    except GrpcError:
        return False
    reader = MessageReader(limit)
    pieces: list[bytes] = []
    step = c.int(1, 7)
    for start in range(0, len(body), step):
        pieces.extend(reader.feed(body[start : start + step]))
    if pieces != whole:
        raise Finding(f"split feed gave {pieces!r}, whole gave {whole!r}")
    return bool(whole)


@target("grpc-engine", _cursor_seeds, _H2)
def grpc_engine(data: bytes) -> bool:
    """gRPC calls (HTTP/2 requests, messages, trailers) into the server GrpcEngine."""
    from ztunnel.grpc.engine import CallStarted, GrpcEngine, MessageReceived
    from ztunnel.grpc.status import GrpcError

    c = Cursor(data)
    engine = GrpcEngine(client=False, max_message=c.pick((1024, 4 * 1024 * 1024)))
    engine.data_to_send()
    reached = False
    frames = Conversation(c, grpc_headers, grpc=True).build()
    for chunk in chunked(c, frames):
        for event in engine.receive_data(chunk):
            try:
                if isinstance(event, CallStarted):
                    engine.send_headers(event.stream_id)
                elif isinstance(event, MessageReceived):
                    reached = True
                    engine.send_message(event.stream_id, event.message)
            except GrpcError:
                pass  # the engine's documented error for a call that is gone
        engine.data_to_send()
    return reached


# -- xDS and ZDS decoders -----------------------------------------------------------------------


def _xds_seeds() -> list[bytes]:
    from ztunnel.proto import authorization_pb2 as apb
    from ztunnel.proto import workload_pb2 as wpb
    from ztunnel.proto import xds_pb2
    from ztunnel.sources.xds_convert import ADDRESS_TYPE, AUTHORIZATION_TYPE

    workload = wpb.Address(
        workload=wpb.Workload(
            uid="Kubernetes//Pod/ns/a", name="a", namespace="ns", service_account="sa",
            addresses=[ipaddress.ip_address("10.0.0.1").packed], tunnel_protocol=wpb.HBONE,
        )
    )  # fmt: skip
    workload.workload.services["ns/s.ns.svc.cluster.local"].ports.append(
        wpb.Port(service_port=80, target_port=8080)
    )
    service = wpb.Address(
        service=wpb.Service(
            name="s", namespace="ns", hostname="s.ns.svc.cluster.local",
            addresses=[wpb.NetworkAddress(address=ipaddress.ip_address("10.96.0.1").packed)],
            ports=[wpb.Port(service_port=80, target_port=8080)],
        )
    )  # fmt: skip
    policy = apb.Authorization(
        name="p", namespace="ns", scope=apb.NAMESPACE, action=apb.DENY,
        rules=[apb.Rule(clauses=[apb.Clause(matches=[apb.Match(destination_ports=[22])])])],
    )  # fmt: skip
    out = []
    for type_url, messages in ((ADDRESS_TYPE, [workload, service]), (AUTHORIZATION_TYPE, [policy])):
        resources = []
        for i, msg in enumerate(messages):
            body = any_pb2.Any()
            body.Pack(msg)
            resources.append(xds_pb2.Resource(name=f"r{i}", version="1", resource=body))
        response = xds_pb2.DeltaDiscoveryResponse(type_url=type_url, nonce="n", resources=resources)
        out.append(response.SerializeToString())
    return out


@target("xds", _xds_seeds)
def xds(data: bytes) -> bool:
    """Delta ADS responses into the state (DeltaXds.handle, xds_convert): ACK or NACK."""
    from ztunnel.proto import xds_pb2
    from ztunnel.sources.xds_protocol import DeltaXds
    from ztunnel.state.store import StateStore

    try:
        response = xds_pb2.DeltaDiscoveryResponse.FromString(data)
    except DecodeError:
        return False
    outcome = DeltaXds(xds_pb2.Node(id="fuzz"), StateStore()).handle(response)
    return outcome.applied > 0


def _zds_del(uid: str) -> bytes:
    from ztunnel.proto import zds_pb2

    request = zds_pb2.WorkloadRequest()
    getattr(request, "del").CopyFrom(zds_pb2.DelWorkload(uid=uid))  # `del` is a keyword
    return request.SerializeToString()


def _zds_seeds() -> list[bytes]:
    from ztunnel.proto import zds_pb2

    add = zds_pb2.AddWorkload(
        uid="u1", workload_info=zds_pb2.WorkloadInfo(name="a", namespace="ns", service_account="sa")
    )
    messages = [
        zds_pb2.WorkloadRequest(add=add).SerializeToString(),
        zds_pb2.WorkloadRequest(keep=zds_pb2.KeepWorkload(uid="u1")).SerializeToString(),
        _zds_del("u1"),
        zds_pb2.WorkloadRequest(snapshot_sent=zds_pb2.SnapshotSent()).SerializeToString(),
    ]
    framed = [bytes([len(m)]) + m for m in messages]
    return [*framed, b"".join(framed)]


@target("zds", _zds_seeds)
def zds(data: bytes) -> bool:
    """ZDS WorkloadRequests from istio-cni (decode_request, then ZdsState) over a sequence."""
    from ztunnel.sources.zds_protocol import ProtocolError, ReadError, ZdsState, decode_request

    state = ZdsState(node="n")
    reached = False
    for message in _length_prefixed(data):
        try:
            request = decode_request(message)
            kind = request.WhichOneof("payload")
            if kind == "add":
                state.add(request.add, fd=-1, ident=(1, len(message)))
            elif kind == "keep":
                state.keep(request.keep)
            elif kind == "del":
                state.delete(getattr(request, "del").uid)
            elif kind == "snapshot_sent":
                state.snapshot_sent()
            reached = True
        except (ReadError, ProtocolError):
            continue
        state.closable(state.version)
    return reached


def _length_prefixed(data: bytes) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        n = data[pos] % 128
        yield data[pos + 1 : pos + 1 + n]
        pos += 1 + n


@dataclass
class Stats:
    inputs: int = 0
    reached: int = 0
    findings: list[str] = field(default_factory=list)


def imported(prefixes: tuple[str, ...]) -> list[str]:
    """Modules under ``prefixes`` imported already: atheris instruments a module only
    when it is first imported inside ``instrument_imports``, silently skipping the rest
    (yaml, h11 and hpack were listed and never instrumented)."""
    return sorted(m for m in sys.modules for p in prefixes if m == p or m.startswith(p + "."))


def names() -> list[str]:
    return sorted(TARGETS)


__all__ = ["TARGETS", "Finding", "Target", "imported", "names", "struct"]
