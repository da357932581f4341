"""The per-request pipeline: L7 policy -> route -> backend -> endpoint -> forward -> respond.

For every request on a CONNECT stream (``Tunnel``), in this order:

1. request headers as Istio's waypoint (an Envoy HCM with ``use_remote_address:
   false``) handles them: ``x-forwarded-for`` is passed through unchanged and
   the client address policy sees as ``remote.ip`` is its entry
   ``xff_num_trusted_hops`` from the right (else the TCP peer);
   ``x-request-id`` is kept, or generated (UUID4) when absent;
   ``x-forwarded-proto`` is set to ``http`` when absent; the path is
   normalized (dot segments) before policy and routing and forwarded so;
2. L7 authorization (``policy.l7``): a denial answers ``403 RBAC: access denied``;
3. routing (``routing``): no match among attached routes -> ``404``; a
   redirect is answered here; an invalid or zero-weight backend -> ``500``;
4. an endpoint of the backend Service is chosen per request and attempt
   (``backends``); none healthy -> ``503 no healthy upstream``;
5. the request goes out over HBONE, its body streamed (and kept for a
   retry up to ``retry_buffer`` bytes); retries and timeouts follow the
   rule (Istio's defaults without a ``retry`` stanza): connect failures,
   refused streams, gRPC UNAVAILABLE/CANCELLED and the rule's status codes are
   retried with jittered backoff on another endpoint; a per-try timeout is
   retried when 504 is among the codes; the route timeout answers ``504
   upstream request timeout``; other upstream failures ``503`` with Envoy's
   reason text;
6. the response is streamed back with the rule's response header modifier.

Local replies to gRPC requests are gRPC trailers-only answers (HTTP 200,
``grpc-status`` from the HTTP status, as Envoy maps them). Each request ends
with one metrics update and one access-log line.
"""

from __future__ import annotations

import contextlib
import math
import random
import uuid
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address, ip_address

import trio

from ztunnel.model.identity import Identity
from ztunnel.model.workload import Service, Workload
from ztunnel.policy.l7 import DENY_BODY, DENY_STATUS, L7Decision, evaluate
from ztunnel.policy.l7match import RequestAttrs
from ztunnel.waypoint.backends import Balancer, service_endpoints, workload_endpoint
from ztunnel.waypoint.errors import (
    NoHealthyUpstreamError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from ztunnel.waypoint.exchange import DownstreamGone, DownstreamProtocolError, Exchange
from ztunnel.waypoint.messages import Headers, Protocol, RequestHead, ResponseHead
from ztunnel.waypoint.relay import relay
from ztunnel.waypoint.routes import BackendRef, Filters, RetryPolicy, RouteRule
from ztunnel.waypoint.routing import (
    Selected,
    apply_request_filters,
    apply_response_filters,
    default_rule,
    pick_backend,
    redirect_response,
)
from ztunnel.waypoint.state import WaypointState
from ztunnel.waypoint.telemetry import RequestRecord, WaypointMetrics, log_request
from ztunnel.waypoint.upstream import Endpoint, UpstreamCall, UpstreamPool

IPAddress = IPv4Address | IPv6Address
SERVER = "istio-envoy"
# Envoy's Grpc::Utility::httpToGrpcStatus for local replies.
_GRPC_FROM_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


@dataclass(frozen=True, slots=True)
class Tunnel:
    """One CONNECT stream into the waypoint: who sent it and what it addressed."""

    src_ip: IPAddress
    src_port: int
    src_identity: Identity | None
    src_workload: Workload | None
    authority: str  # the CONNECT :authority (VIP:port, pod ip:port)
    port: int
    service: Service | None
    workload: Workload | None = None  # a directly addressed workload (no service)
    dst_ip: IPAddress | None = None


@dataclass(frozen=True, slots=True)
class ProxySettings:
    retry_buffer: int = 1024 * 1024  # request bytes kept for retries (Envoy's buffer limit)
    xff_num_trusted_hops: int = 0
    max_backoff_factor: int = 10  # Envoy: the backoff cap is 10x the base interval


class ProxyContext:
    """Everything requests share: state, connections, balancer, telemetry, randomness."""

    def __init__(
        self,
        state: WaypointState,
        pool: UpstreamPool,
        *,
        rng: random.Random | None = None,
        metrics: WaypointMetrics | None = None,
        settings: ProxySettings | None = None,
        access_log: bool = True,
    ) -> None:
        self.state = state
        self.pool = pool
        self.rng = rng or random.Random()
        self.balancer = Balancer(state.store, self.rng)
        self.metrics = metrics
        self.settings = settings or ProxySettings()
        self.access_log = access_log
        self.records: list[RequestRecord] | None = None  # tests may collect records here

    def finish(self, record: RequestRecord) -> None:
        if self.metrics is not None:
            self.metrics.record(record)
        if self.access_log:
            log_request(record)
        if self.records is not None:
            self.records.append(record)


@dataclass
class _Pump:
    """A running request-body pump: cancel ``scope``, then wait for ``done``."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class _Retry(Exception):
    """This attempt's outcome is retryable and a retry is possible."""


class RequestBody:
    """The downstream request body: streamed to the current attempt, kept for a retry
    while it fits ``limit``; once it does not, retries are off for this request."""

    def __init__(self, exchange: Exchange, limit: int) -> None:
        self._ex = exchange
        self._limit = limit
        self._chunks: list[bytes] = []
        self._kept = 0
        self.overflowed = False
        self.done = not exchange.has_body
        self.trailers: Headers = ()
        self.received = 0

    @property
    def replayable(self) -> bool:
        return not self.overflowed

    async def pump(self, call: UpstreamCall) -> None:
        for chunk in list(self._chunks):
            await call.send_data(chunk)
        while not self.done:
            chunk = await self._ex.receive_data()
            if not chunk:
                self.done = True
                self.trailers = self._ex.request_trailers
                break
            self.received += len(chunk)
            if not self.overflowed:
                if self._kept + len(chunk) > self._limit:
                    self.overflowed = True
                    self._chunks.clear()
                else:
                    self._chunks.append(chunk)
                    self._kept += len(chunk)
            await call.send_data(chunk)
        if self._ex.has_body:
            await call.send_end(self.trailers)


def forwarded_client(headers: Headers, trusted_hops: int) -> IPAddress | None:
    """Envoy's trusted client address with use_remote_address=false: the XFF entry
    ``trusted_hops`` from the right; None (the peer) when there is no such entry."""
    entries = [e.strip() for k, v in headers if k == "x-forwarded-for" for e in v.split(",")]
    entries = [e for e in entries if e]
    if len(entries) <= trusted_hops:
        return None
    try:
        return ip_address(entries[-(trusted_hops + 1)])
    except ValueError:
        return None


def local_reply(status: int, body: bytes, *, grpc: bool) -> tuple[ResponseHead, bytes]:
    """Envoy's local reply; for gRPC a trailers-only answer carrying the mapped status."""
    if grpc:
        code = _GRPC_FROM_HTTP.get(status, 2)
        headers: Headers = (
            ("content-type", "application/grpc"),
            ("grpc-status", str(code)),
            ("grpc-message", body.decode("latin-1")),
            ("server", SERVER),
        )
        return ResponseHead(200, headers), b""
    headers = (
        ("content-type", "text/plain"),
        ("content-length", str(len(body))),
        ("server", SERVER),
    )
    return ResponseHead(status, headers), body


class RequestFlow:
    """One request through the waypoint."""

    def __init__(self, ctx: ProxyContext, tunnel: Tunnel, exchange: Exchange) -> None:
        self.ctx = ctx
        self.tunnel = tunnel
        self.ex = exchange
        head = exchange.head
        self.record = RequestRecord(
            start=trio.current_time(),
            method=head.method,
            path=head.target,
            authority=head.authority,
            protocol="HTTP/2" if exchange.protocol is Protocol.HTTP2 else f"HTTP/{head.version}",
            grpc=head.grpc,
            src_addr=(tunnel.src_ip, tunnel.src_port),
            src_identity=tunnel.src_identity,
            src_workload=tunnel.src_workload,
            service=tunnel.service,
            dst_workload=tunnel.workload,
        )
        self._pump_gone: DownstreamGone | None = None

    # -- entry -----------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except DownstreamProtocolError as exc:
            self.record.details = f"downstream_protocol_error: {exc}"
            self.ex.abort()
            if not self.ex.responded:
                with contextlib.suppress(DownstreamGone):
                    await self._reply(exc.status, f"{exc}\n".encode(), self.record.details)
        except DownstreamGone as exc:
            self.record.flags = "DC"  # downstream connection termination
            self.record.details = self.record.details or f"downstream_gone: {exc}"
            self.ex.abort()
        finally:
            rec = self.record
            rec.duration_ms = (trio.current_time() - rec.start) * 1000.0
            self.ctx.finish(rec)

    async def _run(self) -> None:
        head = self._prepare(self.ex.head)
        self.record.request_id = head.header("x-request-id") or ""
        decision = self._authorize(head)
        self.record.decision = decision
        if not decision.allowed:
            await self._reply(
                DENY_STATUS,
                DENY_BODY,
                f"rbac_access_denied_matched_policy[{decision.policy or 'none'}]",
            )
            return
        if head.method == "CONNECT":
            await self._reply(405, b"CONNECT is not proxied by the waypoint", "connect_not_allowed")
            return
        selected = self._select(head)
        if selected is None:
            await self._reply(404, b"", "route_not_found", flag="NR")
            return
        self.record.route = selected.name
        await self._route(selected, head)

    # -- steps -----------------------------------------------------------------------------------

    def _prepare(self, head: RequestHead) -> RequestHead:
        headers = list(head.headers)
        if head.header("x-request-id") is None:
            rid = uuid.UUID(int=self.ctx.rng.getrandbits(128), version=4)
            headers.append(("x-request-id", str(rid)))
        if head.header("x-forwarded-proto") is None:
            headers.append(("x-forwarded-proto", head.scheme))
        target = head.target
        if target.startswith("/"):
            query = head.query
            target = head.path + (f"?{query}" if query else "")
        return replace(head, target=target, headers=tuple(headers))

    def _attrs(self, head: RequestHead) -> RequestAttrs:
        t = self.tunnel
        return RequestAttrs(
            src_ip=t.src_ip,
            dst_port=t.port,
            method=head.method,
            path=head.target,
            host=head.authority,
            headers=head.headers,
            src_identity=t.src_identity,
            remote_ip=forwarded_client(head.headers, self.ctx.settings.xff_num_trusted_hops),
            dst_ip=t.dst_ip,
        )

    def _authorize(self, head: RequestHead) -> L7Decision:
        policies = self.ctx.state.policies_for(self.tunnel.service)
        return evaluate(policies, self._attrs(head))

    def _select(self, head: RequestHead) -> Selected | None:
        svc = self.tunnel.service
        if svc is None:
            return default_rule("", "", self.tunnel.port)
        routes = self.ctx.state.routes_for(svc, self.tunnel.port)
        if routes is None:
            return default_rule(svc.namespace, svc.name, self.tunnel.port)
        return routes.select(head)

    async def _route(self, selected: Selected, head: RequestHead) -> None:
        rule = selected.rule
        redirect = rule.filters.redirect
        if redirect is not None:
            resp = redirect_response(redirect, selected.match, head, self.tunnel.port)
            await self._send_local(resp, b"", 0)
            return
        backend = pick_backend(rule, self.ctx.rng)
        if backend is None or backend.invalid:
            why = backend.invalid if backend is not None else "no backend with weight > 0"
            await self._reply(500, b"", f"invalid_backend: {why}")
            return
        head = apply_request_filters(rule.filters, selected.match, head)
        head = apply_request_filters(backend.filters, selected.match, head)
        candidates = self._candidates(backend)
        if candidates is None:
            await self._reply(500, b"", f"backend_not_found: {backend.namespace}/{backend.name}")
            return
        protocol = self._upstream_protocol(backend)
        if self.ex.can_upgrade and protocol is Protocol.HTTP1:
            await self._upgrade(head, candidates)
            return
        await self._forward(selected, backend, head, candidates, protocol)

    def _candidates(self, backend: BackendRef) -> list[Endpoint] | None:
        """Endpoints for the backend; None when it names nothing known."""
        t = self.tunnel
        if not backend.name:  # a directly addressed workload (no service)
            if t.workload is None:
                return None
            ep = workload_endpoint(t.workload, t.port)
            return [ep] if ep is not None else []
        svc = self.ctx.state.service(backend.namespace, backend.name)
        if svc is None:
            return None
        self.record.service = svc  # Istio reports the backend Service the request went to
        return service_endpoints(self.ctx.state.store, svc, backend.port)

    def _upstream_protocol(self, backend: BackendRef) -> Protocol:
        svc = self.ctx.state.service(backend.namespace, backend.name) if backend.name else None
        declared = self.ctx.state.declared_protocol(svc, backend.port)
        if declared in (Protocol.HTTP1, Protocol.HTTP2):
            return declared
        return self.ex.protocol  # Istio: USE_DOWNSTREAM_PROTOCOL for sniffed ports

    # -- forwarding with retries and timeouts ------------------------------------------------

    async def _forward(
        self,
        selected: Selected,
        backend: BackendRef,
        head: RequestHead,
        candidates: list[Endpoint],
        protocol: Protocol,
    ) -> None:
        rule = selected.rule
        body = RequestBody(self.ex, self.ctx.settings.retry_buffer)
        deadline = trio.current_time() + rule.timeout if rule.timeout else math.inf
        failure: UpstreamError | None = None
        gone: DownstreamGone | None = None
        async with trio.open_nursery() as nursery:
            with trio.move_on_at(deadline) as overall:
                try:
                    call, resp = await self._attempts(
                        nursery, rule, head, candidates, protocol, body
                    )
                    await self._respond(call, resp, rule.filters, backend.filters)
                except UpstreamError as exc:
                    failure = exc
                except DownstreamGone as exc:
                    gone = exc
            nursery.cancel_scope.cancel()  # a body pump still running (early answer)
        self.record.bytes_received = body.received
        gone = gone or self._pump_gone
        if gone is not None:
            raise gone
        if overall.cancelled_caught:
            failure = UpstreamTimeoutError("route timeout")
        if failure is not None:
            await self._fail(failure)

    async def _fail(self, failure: UpstreamError) -> None:
        flag = f"URX,{failure.flag}" if self.record.attempts > 1 else failure.flag
        if self.ex.responded:
            self.record.details = self.record.details or failure.detail
            self.record.flags = flag
            self.ex.abort()
            return
        await self._reply(failure.status, failure.body, failure.detail, flag=flag)

    async def _attempts(
        self,
        nursery: trio.Nursery,
        rule: RouteRule,
        head: RequestHead,
        candidates: list[Endpoint],
        protocol: Protocol,
        body: RequestBody,
    ) -> tuple[UpstreamCall, ResponseHead]:
        policy = rule.retry
        tried: list[Endpoint] = []
        attempt = 0
        while True:
            endpoint = self.ctx.balancer.pick(candidates, tried)
            if endpoint is None:
                raise NoHealthyUpstreamError("no healthy upstream")
            tried.append(endpoint)
            self.record.attempts = attempt + 1
            self.record.upstream = endpoint.authority
            store = self.ctx.state.store
            self.record.dst_workload = (
                store.workload_by_uid(endpoint.uid) or self.record.dst_workload
            )
            may_retry = attempt < policy.attempts
            try:
                return await self._attempt(
                    nursery, policy, head, endpoint, protocol, body, may_retry
                )
            except _Retry:
                pass
            attempt += 1
            await self._backoff(policy, attempt)

    async def _backoff(self, policy: RetryPolicy, attempt: int) -> None:
        cap = policy.backoff * self.ctx.settings.max_backoff_factor
        await trio.sleep(self.ctx.rng.uniform(0, min(policy.backoff * (2**attempt - 1), cap)))

    async def _attempt(
        self,
        nursery: trio.Nursery,
        policy: RetryPolicy,
        head: RequestHead,
        endpoint: Endpoint,
        protocol: Protocol,
        body: RequestBody,
        may_retry: bool,
    ) -> tuple[UpstreamCall, ResponseHead]:
        """One try; raises _Retry when its outcome is retryable and a retry is possible."""
        per_try = policy.per_try_timeout or math.inf
        pump: _Pump | None = None
        call: UpstreamCall | None = None
        with self.ctx.balancer.track(endpoint):
            try:
                with trio.fail_after(per_try):
                    call = await self.ctx.pool.open(
                        endpoint, protocol, head, has_body=self.ex.has_body
                    )
                    if self.ex.has_body:
                        pump = await nursery.start(self._pump, body, call, nursery)
                    resp = await call.receive_response()
            except trio.TooSlowError:
                await self._drop(call, pump)
                if 504 in policy.codes and may_retry and body.replayable:
                    raise _Retry() from None
                raise UpstreamTimeoutError("per-try timeout") from None
            except UpstreamError as exc:
                await self._drop(call, pump)
                if exc.retry_on in policy.retry_on and may_retry and body.replayable:
                    raise _Retry() from exc
                raise
            except BaseException:  # cancelled (route timeout, client gone): release the call
                await self._drop(call, pump)
                raise
        if may_retry and body.replayable and self._retryable_response(resp, policy):
            await self._drop(call, pump)
            raise _Retry()
        return call, resp

    def _retryable_response(self, resp: ResponseHead, policy: RetryPolicy) -> bool:
        if resp.status in policy.codes:
            return True
        status = resp.header("grpc-status")
        if status is None or not self.record.grpc:
            return False
        return (status == "14" and "unavailable" in policy.retry_on) or (
            status == "1" and "cancelled" in policy.retry_on
        )

    async def _pump(
        self,
        body: RequestBody,
        call: UpstreamCall,
        nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[_Pump] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        handle = _Pump()
        try:
            with handle.scope:
                task_status.started(handle)
                try:
                    await body.pump(call)
                except UpstreamError:
                    pass  # the response side reports the upstream's failure
                except DownstreamGone as exc:
                    self._pump_gone = exc  # the client left mid-body: stop the whole exchange
                    nursery.cancel_scope.cancel()
        finally:
            handle.done.set()

    async def _drop(self, call: UpstreamCall | None, pump: _Pump | None) -> None:
        """Abandon an attempt: stop its body pump (and wait for it: the next attempt's
        pump reads the same request body) and release its upstream call."""
        with trio.CancelScope(shield=True):
            if pump is not None:
                pump.scope.cancel()
                await pump.done.wait()
            if call is not None:
                await call.close()

    # -- the response ----------------------------------------------------------------------------

    async def _respond(self, call: UpstreamCall, resp: ResponseHead, *filters: Filters) -> None:
        if resp.status == 101:  # only an Upgrade request may switch protocols
            await call.close()
            raise UpstreamProtocolError(f"{call.endpoint.authority}: unsolicited 101")
        for f in filters:
            resp = apply_response_filters(f, resp)
        self.record.status = resp.status
        self.record.grpc_status = resp.header("grpc-status") or ""
        try:
            await self.ex.send_response(resp)
            while chunk := await call.receive_data():
                self.record.bytes_sent += len(chunk)
                await self.ex.send_data(chunk)
            trailers = dict(call.trailers)
            self.record.grpc_status = trailers.get("grpc-status", self.record.grpc_status)
            await self.ex.send_end(call.trailers)
        finally:
            with trio.CancelScope(shield=True):
                await call.close()

    async def _upgrade(self, head: RequestHead, candidates: list[Endpoint]) -> None:
        """HTTP/1.1 Upgrade (WebSocket): one attempt; after 101 the bytes flow raw."""
        endpoint = self.ctx.balancer.pick(candidates)
        if endpoint is None:
            err = NoHealthyUpstreamError("no healthy upstream")
            await self._reply(err.status, err.body, err.detail, flag=err.flag)
            return
        self.record.attempts, self.record.upstream = 1, endpoint.authority
        self.record.dst_workload = self.ctx.state.store.workload_by_uid(endpoint.uid)
        try:
            call = await self.ctx.pool.open(endpoint, Protocol.HTTP1, head, has_body=False)
            resp = await call.receive_response()
        except UpstreamError as exc:
            await self._reply(exc.status, exc.body, exc.detail, flag=exc.flag)
            return
        if resp.status != 101:
            await self._respond(call, resp)
            return
        self.record.status = 101
        up, up_left = await call.take_upgraded()
        down, down_left = await self.ex.switch_protocols(resp)
        try:
            sent, received = await relay(down, up, a_first=down_left, b_first=up_left)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(up)
        self.record.bytes_received, self.record.bytes_sent = sent, received

    # -- local replies ---------------------------------------------------------------------------

    async def _reply(self, status: int, body: bytes, details: str, *, flag: str = "-") -> None:
        self.record.details = details
        self.record.flags = flag
        head, payload = local_reply(status, body, grpc=self.record.grpc)
        await self._send_local(head, payload, status)

    async def _send_local(self, head: ResponseHead, body: bytes, status: int) -> None:
        self.record.status = head.status
        if self.record.grpc:
            self.record.grpc_status = head.header("grpc-status") or ""
        if body and self.ex.head.method != "HEAD":
            await self.ex.send_response(head)
            await self.ex.send_data(body)
            await self.ex.send_end()
            self.record.bytes_sent = len(body)
        else:
            await self.ex.send_response(head, end_stream=True)
