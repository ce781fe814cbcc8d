# -*- test-case-name: tests.test_proxy -*-
"""
Tests for L{aiproxy.proxy.Exchange}, without sockets.

Each test drives one real L{aiproxy.server.GatewayRequest} over a
L{StringTransport} (so the bytes the client would receive, HTTP chunks
included, can be parsed), with a fake upstream client whose Deferreds and
response bodies the test fires by hand, and a L{Clock} for every timer.

The helpers here (L{Gateway}, L{FakeResponse}, L{parse_response}, ...) are
also used by C{tests.test_server}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from aiproxy.accesslog import ACCESS_NAMESPACE
from aiproxy.config import PROXY_PLUGINS, parse_config
from aiproxy.context import RECORD_KEYS
from aiproxy.filters import Reject, Replace, Terminate
from aiproxy.interfaces import IBodyFilter, IBodyFilterFactory, IFilterPlugin, IRequestFilter
from aiproxy.routing.build import build_routes
from aiproxy.routing.routes import RouteTable
from aiproxy.schema import load_schema
from aiproxy.server import GatewayResource, GatewaySite
from tests.helpers import log_events

#: The route's upstream credential: it must never appear in a log event.
API_KEY = "sk-unit-test-secret-4242"


ENDPOINT = "http://upstream.test:7751/v1/chat/completions"

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
CHAT_STREAM = {**CHAT, "stream": True}


def sse(document: Any) -> bytes:
    """
    One SSE event carrying C{document} (JSON unless it is text).
    """
    data = document if isinstance(document, str) else json.dumps(document, separators=(",", ":"))
    return b"data: " + data.encode("utf-8") + b"\n\n"


def delta(text: str, model: str = "gpt-test-0") -> bytes:
    """
    An OpenAI chat completion chunk event carrying C{text}.
    """
    return sse({"model": model, "choices": [{"index": 0, "delta": {"content": text}}]})


USAGE = sse(
    {
        "model": "gpt-test-0",
        "choices": [],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }
)
DONE = sse("[DONE]")


# -- fake upstream ------------------------------------------------------------


@implementer(IPushProducer)
class FakeBodyTransport:
    """
    The transport an upstream body protocol is connected to: records the
    producer calls it gets.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")

    @property
    def stopped(self) -> bool:
        return "stop" in self.calls


class FakeResponse:
    """
    A treq-like upstream response whose body the test pushes by hand.
    """

    def __init__(
        self,
        code: int = 200,
        headers: Mapping[bytes, list[bytes]] | None = None,
        length: Any = UNKNOWN_LENGTH,
    ) -> None:
        self.code = code
        self.headers = Headers(dict(headers or {}))
        self.length = length
        self.protocol: Any = None
        self.transport = FakeBodyTransport()

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def data(self, *chunks: bytes) -> None:
        """
        Deliver each of C{chunks} as one C{dataReceived} call.
        """
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    def end(self, reason: Exception | None = None) -> None:
        """
        End the body: normally, or with C{reason}.
        """
        self.protocol.connectionLost(Failure(reason if reason is not None else ResponseDone()))


def stream_response(**headers: bytes) -> FakeResponse:
    """
    A 200 C{text/event-stream} response with the mock's identifying headers.
    """
    base = {
        b"content-type": [b"text/event-stream"],
        b"x-request-id": [b"req-1"],
        b"x-ratelimit-remaining-requests": [b"99"],
        b"set-cookie": [b"upstream=1"],
        b"content-length": [b"12345"],
    }
    base.update({name.replace("_", "-").encode(): [value] for name, value in headers.items()})
    return FakeResponse(200, base)


def json_response(
    body: bytes, code: int = 200, content_type: bytes = b"application/json", **kw: Any
) -> FakeResponse:
    """
    A non-streamed response whose headers say C{content_type}.
    """
    return FakeResponse(code, {b"content-type": [content_type], b"x-request-id": [b"req-2"]}, **kw)


@dataclass
class UpstreamCall:
    """
    One request the exchange sent upstream.
    """

    method: str
    url: str
    headers: Headers
    body: bytes
    deferred: Deferred[Any]
    cancelled: bool = False


class FakeUpstreamClient:
    """
    Stands in for L{aiproxy.upstream.client.UpstreamClient}: records each request
    and returns a Deferred the test fires through C{call.deferred}.

    Like treq over an Agent once the connection is made, the Deferred the
    exchange gets has already fired and waits on the inner request
    Deferred (C{called} is true): cancelling it must still reach the inner
    one.
    """

    def __init__(self) -> None:
        self.calls: list[UpstreamCall] = []

    def request(self, method: str, url: str, headers: Headers, body: bytes) -> Deferred[Any]:
        call: UpstreamCall

        def cancel(d: Deferred[Any]) -> None:
            call.cancelled = True
            d.errback(Failure(CancelledError()))

        call = UpstreamCall(method, url, headers, body, Deferred(cancel))
        self.calls.append(call)
        connected: Deferred[Any] = Deferred()
        connected.addCallback(lambda _: call.deferred)
        connected.callback(None)
        return connected

    @property
    def last(self) -> UpstreamCall:
        return self.calls[-1]

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(_nothing())


async def _nothing() -> None:
    return None


# -- building routes ------------------------------------------------------------


def make_table(
    proxy: Mapping[str, Any] | None = None,
    plugins: Mapping[str, Any] | None = None,
    filter_plugins: Iterable[Any] = (),
    routes: Iterable[Mapping[str, Any]] | None = None,
) -> RouteTable:
    """
    A route table built from config by the real loader, each route's
    upstream client replaced by a L{FakeUpstreamClient}.

    @param proxy: C{ai-proxy} fields over the defaults (provider openai,
        an C{Authorization} with L{API_KEY}, the test endpoint).
    @param plugins: the route's other plugins (name to config).
    @param filter_plugins: L{IFilterPlugin} providers the config may name.
    @param routes: whole route documents instead of the single default one.
    """
    available = {plugin.name: plugin for plugin in filter_plugins}
    if routes is None:
        conf: dict[str, Any] = {
            "provider": "openai",
            "auth": {"header": {"Authorization": f"Bearer {API_KEY}"}},
            "override": {"endpoint": ENDPOINT},
        }
        conf.update(proxy or {})
        routes = [
            {
                "id": "chat",
                "uri": "/v1/chat/completions",
                "plugins": {"ai-proxy": conf, **(plugins or {})},
            }
        ]
    document = {"routes": list(routes)}
    schemas: dict[str, Any] = {name: load_schema(name) for name in PROXY_PLUGINS}
    schemas.update({name: plugin.config_schema for name, plugin in available.items()})
    config = parse_config(json.dumps(document), environ={}, plugin_schemas=schemas)
    table = build_routes(config, MemoryReactorClock(), plugins=available)
    for route in table.routes:
        for instance in route.instances:
            instance.client = FakeUpstreamClient()  # type: ignore[assignment]
    return table


# -- parsing what the client received -------------------------------------------


@dataclass
class ParsedResponse:
    """
    An HTTP/1.1 response as the client received it.

    @ivar chunks: the body's HTTP chunks (one per C{request.write}), or the
        whole body as one element when it had a C{Content-Length}.
    @ivar complete: the body ended properly (terminating chunk, or all of
        C{Content-Length}).
    """

    status: int
    headers: dict[str, list[str]]
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes) -> ParsedResponse | None:
    """
    Parse one HTTP/1.1 response; L{None} when its head is not complete yet.
    """
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    parsed = ParsedResponse(status, headers)
    if "content-length" in headers:
        length = int(headers["content-length"][0])
        parsed.chunks = [rest[:length]] if length else []
        parsed.complete = len(rest) >= length
        return parsed
    if "chunked" not in headers.get("transfer-encoding", []):
        parsed.chunks = [rest] if rest else []
        return parsed
    while rest:
        size_line, sep, after = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            parsed.complete = after.startswith(b"\r\n")
            break
        if len(after) < size + 2:
            break
        parsed.chunks.append(after[:size])
        rest = after[size + 2 :]
    return parsed


def request_bytes(
    body: Any = CHAT,
    path: bytes = b"/v1/chat/completions",
    headers: Mapping[bytes, bytes] | None = None,
    method: bytes = b"POST",
) -> bytes:
    """
    A complete HTTP/1.1 request; a C{dict} body is sent as JSON.
    """
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    all_headers = {
        b"host": b"gateway.test",
        b"content-type": b"application/json",
        b"content-length": b"%d" % len(raw),
    }
    all_headers.update(headers or {})
    lines = [method + b" " + path + b" HTTP/1.1"] + [
        name + b": " + value for name, value in all_headers.items()
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + raw


# -- the gateway under test -------------------------------------------------------


class ClientTransport(StringTransport):
    """
    A client connection's transport: a L{StringTransport} whose
    C{unregisterProducer} tolerates having none, as TCP transports do.
    """

    def unregisterProducer(self) -> None:
        self.producer = None


class Gateway:
    """
    A L{GatewaySite} over a route table, one client connection on a
    L{StringTransport}, a L{Clock} for the exchanges and a log capture.
    """

    def __init__(self, testcase: SynchronousTestCase, table: RouteTable) -> None:
        self.table = table
        self.clock = Clock()
        self.site_reactor = MemoryReactorClock()
        self.resource = GatewayResource(table, self.clock)
        self.site = GatewaySite(self.resource, reactor=self.site_reactor)
        self.events = log_events(testcase)
        self.connect()

    def connect(self) -> None:
        """
        Open a new client connection (the previous one is left alone).
        """
        self.transport = ClientTransport()
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    @property
    def client(self) -> FakeUpstreamClient:
        return self.table.routes[0].instances[0].client  # type: ignore[return-value]

    @property
    def upstream(self) -> UpstreamCall:
        return self.client.last

    def send(self, body: Any = CHAT, **kw: Any) -> None:
        """
        Send a request on the connection.
        """
        self.channel.dataReceived(request_bytes(body, **kw))

    def answer(self, response: FakeResponse) -> FakeResponse:
        """
        The upstream's status and headers arrive.
        """
        self.upstream.deferred.callback(response)
        return response

    def stream(self, body: Any = CHAT_STREAM, **headers: bytes) -> FakeResponse:
        """
        Send a streamed request and answer it with a stream response.
        """
        self.send(body)
        return self.answer(stream_response(**headers))

    def pause(self) -> None:
        """
        The client's socket buffer is full: its transport pauses the channel.
        """
        producer = self.transport.producer
        assert producer is not None
        producer.pauseProducing()

    def resume(self) -> None:
        """
        The client's socket buffer drained.
        """
        producer = self.transport.producer
        assert producer is not None
        producer.resumeProducing()

    def disconnect(self) -> None:
        """
        The client goes away.
        """
        self.channel.connectionLost(Failure(ConnectionDone("client left")))

    @property
    def raw(self) -> bytes:
        return self.transport.value()

    def response(self) -> ParsedResponse:
        parsed = parse_response(self.raw)
        assert parsed is not None, f"no response yet: {self.raw!r}"
        return parsed

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def access_records(self) -> list[dict[str, Any]]:
        return [
            e["access_record"] for e in self.events if e.get("log_namespace") == ACCESS_NAMESPACE
        ]

    @property
    def record(self) -> dict[str, Any]:
        records = self.access_records()
        assert len(records) == 1, records
        return records[0]

    def messages(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def pending_timers(self) -> list[Any]:
        return [call for call in self.clock.getDelayedCalls() if call.active()]


# -- body filters defined for the tests ------------------------------------------


@implementer(IBodyFilter)
class ScriptedFilter:
    """
    A body filter whose answers come from functions, recording what it saw.
    """

    def __init__(
        self,
        on_chunk: Callable[[bytes, Any], Any] = lambda chunk, context: None,
        on_finish: Callable[[Any], Any] = lambda context: None,
    ) -> None:
        self.on_chunk = on_chunk
        self.on_finish = on_finish
        self.seen: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = []

    @staticmethod
    def snapshot(chunk: bytes | None, context: Any) -> dict[str, Any]:
        return {
            "chunk": chunk,
            "events": [(e.event, e.data) for e in context.events],
            "text": context.text,
            "usage": dict(context.usage) if context.usage else None,
            "done": context.done,
            "ttft_ms": context.ttft_ms,
        }

    def filter_chunk(self, chunk: bytes, context: Any) -> Any:
        self.seen.append(self.snapshot(chunk, context))
        return self.on_chunk(chunk, context)

    def finish(self, context: Any) -> Any:
        self.finished.append(self.snapshot(None, context))
        return self.on_finish(context)


@implementer(IBodyFilterFactory)
class FilterFactory:
    """
    Hands out one prepared filter per request.
    """

    def __init__(self, *filters: ScriptedFilter) -> None:
        self.filters = list(filters)

    def body_filter(self, context: Any) -> IBodyFilter | None:
        return self.filters.pop(0) if self.filters else None


@implementer(IFilterPlugin)
class TaggingPlugin:
    """
    A filter plugin (request and body side) that appends C{|<name>} to every
    chunk, so the order filters ran in shows in the output.
    """

    config_schema = {"type": "object"}

    def __init__(self, name: str, priority: int) -> None:
        self.name = name
        self.priority = priority

    def configure(self, config: dict) -> Any:
        tag = f"|{self.name}".encode()

        @implementer(IBodyFilterFactory)
        class Factory:
            def body_filter(self, context: Any) -> Any:
                return ScriptedFilter(lambda chunk, context: Replace(chunk + tag))

        return Factory()


@implementer(IFilterPlugin)
class RequestPlugin:
    """
    A request-filter plugin running C{action(context)}.
    """

    config_schema = {"type": "object"}
    priority = 500

    def __init__(self, name: str, action: Callable[[Any], Any]) -> None:
        self.name = name
        self.action = action

    def configure(self, config: dict) -> Any:
        action = self.action

        @implementer(IRequestFilter)
        class Filter:
            def filter_request(self, context: Any) -> Any:
                return action(context)

        return Filter()


def with_body_filters(table: RouteTable, *filters: ScriptedFilter) -> RouteTable:
    """
    Give the table's first route one body-filter factory per filter.
    """
    table.routes[0].body_filters = [FilterFactory(f) for f in filters]
    return table


# ==============================================================================


class UpstreamRequestTests(SynchronousTestCase):
    """
    What the exchange sends upstream.
    """

    def test_untouched_bytes(self) -> None:
        """
        With nothing to change, the client's body bytes go upstream as they
        are, POSTed to the endpoint with the route's credentials.
        """
        gateway = Gateway(self, make_table())
        raw = b'{ "messages" : [{"role":"user","content":"h\\u00e9"}],  "model":"x" }'
        gateway.send(raw, headers={b"authorization": b"Bearer client-key", b"x-custom": b"1"})
        call = gateway.upstream
        self.assertEqual(call.method, "POST")
        self.assertEqual(call.url, ENDPOINT)
        self.assertEqual(call.body, raw)
        self.assertEqual(
            call.headers.getRawHeaders(b"authorization"), [f"Bearer {API_KEY}".encode()]
        )
        self.assertEqual(call.headers.getRawHeaders(b"x-custom"), [b"1"])
        self.assertEqual(call.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertIsNone(call.headers.getRawHeaders(b"host"))
        self.assertIsNone(call.headers.getRawHeaders(b"content-length"))

    def test_stream_include_usage(self) -> None:
        """
        A streamed OpenAI chat request gets C{stream_options.include_usage}.
        """
        gateway = Gateway(self, make_table())
        gateway.send(CHAT_STREAM)
        body = json.loads(gateway.upstream.body)
        self.assertEqual(body["stream_options"], {"include_usage": True})
        self.assertEqual(body["messages"], CHAT["messages"])

    def test_request_filter_reject(self) -> None:
        """
        A request filter's L{Reject} answers the client; nothing goes upstream.
        """
        plugin = RequestPlugin("deny", lambda context: Reject(403, {"message": "denied"}))
        gateway = Gateway(self, make_table(plugins={"deny": {}}, filter_plugins=[plugin]))
        gateway.send()
        self.assertEqual(gateway.client.calls, [])
        response = gateway.response()
        self.assertEqual(response.status, 403)
        self.assertEqual(response.json(), {"message": "denied"})
        self.assertEqual(gateway.record["status"], 403)

    def test_request_filter_raises(self) -> None:
        """
        A request filter that raises gets the client a JSON 500, nothing goes
        upstream, and the access record says so.
        """

        def broken(context: Any) -> None:
            raise RuntimeError("broken filter")

        plugin = RequestPlugin("broken", broken)
        gateway = Gateway(self, make_table(plugins={"broken": {}}, filter_plugins=[plugin]))
        gateway.send()
        self.assertEqual(gateway.client.calls, [])
        response = gateway.response()
        self.assertEqual(response.status, 500)
        self.assertEqual(response.json(), {"message": "internal error"})
        self.assertEqual(gateway.record["status"], 500)
        self.assertEqual(gateway.record["abort_reason"], "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_request_filter_rewrite(self) -> None:
        """
        A request filter that changes the body and says so sends the new
        body upstream.
        """

        def rewrite(context: Any) -> None:
            context.body["messages"].insert(0, {"role": "system", "content": "be brief"})
            context.mark_body_changed()

        plugin = RequestPlugin("decorate", rewrite)
        gateway = Gateway(self, make_table(plugins={"decorate": {}}, filter_plugins=[plugin]))
        gateway.send()
        body = json.loads(gateway.upstream.body)
        self.assertEqual(body["messages"][0], {"role": "system", "content": "be brief"})


class ResponseStartTests(SynchronousTestCase):
    """
    The status and headers reach the client with the first body bytes.
    """

    def test_nothing_before_first_byte(self) -> None:
        """
        The upstream's headers alone send nothing to the client.
        """
        gateway = Gateway(self, make_table())
        gateway.stream()
        self.assertEqual(gateway.raw, b"")

    def test_headers_with_first_chunk(self) -> None:
        """
        The first chunk carries the upstream's status, content type,
        request id and rate-limit headers, plus the stream headers; the
        upstream's length and cookies are not relayed.
        """
        gateway = Gateway(self, make_table())
        upstream = gateway.stream()
        upstream.data(delta("Hi"))
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "text/event-stream")
        self.assertEqual(response.header("x-request-id"), "req-1")
        self.assertEqual(response.header("x-ratelimit-remaining-requests"), "99")
        self.assertEqual(response.header("cache-control"), "no-cache")
        self.assertEqual(response.header("x-accel-buffering"), "no")
        self.assertEqual(response.header("transfer-encoding"), "chunked")
        self.assertIsNone(response.header("content-length"))
        self.assertIsNone(response.header("set-cookie"))
        self.assertEqual(response.chunks, [delta("Hi")])

    def test_status_passthrough(self) -> None:
        """
        A streamed 2xx status other than 200 is relayed.
        """
        gateway = Gateway(self, make_table())
        gateway.send(CHAT_STREAM)
        upstream = gateway.answer(
            FakeResponse(203, {b"content-type": [b"text/event-stream; charset=utf-8"]})
        )
        upstream.data(DONE)
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 203)
        self.assertEqual(response.header("content-type"), "text/event-stream; charset=utf-8")
        self.assertTrue(response.complete)

    def test_complete_stream(self) -> None:
        """
        The upstream bytes reach the client unchanged, and the response ends
        with the terminating chunk; the producer is unregistered first.
        """
        gateway = Gateway(self, make_table({"streaming_flush_interval_ms": 0}))
        upstream = gateway.stream()
        chunks = [delta("Hel"), delta("lo") + USAGE[:10], USAGE[10:] + DONE]
        upstream.data(*chunks)
        upstream.end()
        response = gateway.response()
        self.assertTrue(response.complete)
        self.assertEqual(response.chunks, chunks)
        self.assertIsNone(gateway.transport.producer._requestProducer)  # type: ignore[attr-defined]
        self.assertFalse(upstream.transport.stopped)
        self.assertEqual(gateway.pending_timers(), [])

    def test_non_stream(self) -> None:
        """
        A non-streamed body is sent whole with its length.
        """
        gateway = Gateway(self, make_table())
        gateway.send()
        body = (
            b'{"model":"gpt-test-0","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}'
        )
        upstream = gateway.answer(json_response(body))
        upstream.data(body[:20], body[20:])
        self.assertEqual(gateway.raw, b"")
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, body)
        self.assertEqual(response.header("content-length"), str(len(body)))
        self.assertEqual(response.header("x-request-id"), "req-2")
        self.assertTrue(response.complete)


class FlushModeTests(SynchronousTestCase):
    """
    C{streaming_flush_interval_ms}: 0 writes each chunk at once; N > 0
    coalesces chunks arriving within N ms.
    """

    def test_sync_one_write_per_chunk(self) -> None:
        """
        In sync mode every upstream chunk is one HTTP chunk, written at once
        without the clock moving.
        """
        gateway = Gateway(self, make_table({"streaming_flush_interval_ms": 0}))
        upstream = gateway.stream()
        for index in range(3):
            upstream.data(delta(str(index)))
            self.assertEqual(gateway.response().chunks[-1], delta(str(index)))
        self.assertEqual(len(gateway.response().chunks), 3)

    def test_interval_coalesces(self) -> None:
        """
        In interval mode the first chunk goes out at once, the next ones
        within the interval are written together by the next tick, and the
        loop stops once a tick finds nothing pending.
        """
        gateway = Gateway(self, make_table({"streaming_flush_interval_ms": 50, "timeout": 600000}))
        upstream = gateway.stream()
        upstream.data(delta("a"))
        self.assertEqual(gateway.response().chunks, [delta("a")])
        upstream.data(delta("b"), delta("c"))
        self.assertEqual(gateway.response().chunks, [delta("a")])
        gateway.clock.advance(0.05)
        self.assertEqual(gateway.response().chunks, [delta("a"), delta("b") + delta("c")])
        timers_while_active = len(gateway.pending_timers())
        gateway.clock.advance(0.05)
        self.assertEqual(len(gateway.pending_timers()), timers_while_active - 1)
        upstream.data(delta("d"))
        self.assertEqual(gateway.response().chunks[-1], delta("d"))

    def test_interval_flushes_at_end(self) -> None:
        """
        What is pending when the stream ends is written before the
        terminating chunk, and no timer is left.
        """
        gateway = Gateway(self, make_table({"streaming_flush_interval_ms": 100}))
        upstream = gateway.stream()
        upstream.data(delta("a"), delta("b"), DONE)
        upstream.end()
        response = gateway.response()
        self.assertTrue(response.complete)
        self.assertEqual(response.chunks, [delta("a"), delta("b") + DONE])
        self.assertEqual(gateway.pending_timers(), [])
        self.assertEqual(gateway.record["flushes"], 2)


class DisconnectTests(SynchronousTestCase):
    """
    A client leaving at any time stops the upstream transfer at once and is
    logged as 499 C{client_disconnect}.
    """

    def assert_client_disconnect(self, gateway: Gateway) -> None:
        record = gateway.record
        self.assertEqual(record["status"], 499)
        self.assertEqual(record["abort_reason"], "client_disconnect")
        self.assertIn(
            "client disconnected during AI streaming, aborting upstream read",
            gateway.messages(),
        )
        self.assertEqual(gateway.pending_timers(), [])

    def test_before_upstream_answered(self) -> None:
        """
        Leaving while the upstream has not answered cancels the upstream
        request's Deferred.
        """
        gateway = Gateway(self, make_table({"max_stream_duration_ms": 5000}))
        gateway.send(CHAT_STREAM)
        gateway.disconnect()
        self.assertTrue(gateway.upstream.cancelled)
        self.assert_client_disconnect(gateway)

    def test_response_after_client_left(self) -> None:
        """
        An upstream response that arrives after the client left (the
        cancellation came too late) is discarded: its transfer is stopped.
        """
        gateway = Gateway(self, make_table())
        gateway.send(CHAT_STREAM)
        call = gateway.upstream
        # The upstream answered in the same turn as the disconnect: the
        # Deferred has its result, so cancel() does nothing.
        call.deferred.cancel = lambda: None  # type: ignore[method-assign]
        gateway.disconnect()
        response = gateway.answer(stream_response())
        self.assertTrue(response.transport.stopped)
        self.assert_client_disconnect(gateway)

    def test_mid_stream(self) -> None:
        """
        Leaving mid-stream stops the upstream body transport; later upstream
        events are ignored.
        """
        gateway = Gateway(self, make_table({"streaming_flush_interval_ms": 0}))
        upstream = gateway.stream()
        upstream.data(delta("a"))
        gateway.disconnect()
        self.assertEqual(upstream.transport.calls, ["stop"])
        upstream.data(delta("late"))
        upstream.end(ResponseFailed([Failure(ConnectionLost())]))
        self.assert_client_disconnect(gateway)
        self.assertEqual(gateway.record["bytes_out"], len(delta("a")))

    def test_mid_stream_interval(self) -> None:
        """
        In interval mode too; pending bytes are dropped and the flush loop
        stops.
        """
        gateway = Gateway(self, make_table({"streaming_flush_interval_ms": 50}))
        upstream = gateway.stream()
        upstream.data(delta("a"), delta("b"))
        gateway.disconnect()
        self.assertTrue(upstream.transport.stopped)
        gateway.clock.advance(1)
        self.assert_client_disconnect(gateway)

    def test_non_stream(self) -> None:
        """
        Leaving while a non-streamed body is being read stops it too.
        """
        gateway = Gateway(self, make_table())
        gateway.send()
        upstream = gateway.answer(json_response(b""))
        upstream.data(b'{"choices":')
        gateway.disconnect()
        self.assertTrue(upstream.transport.stopped)
        upstream.end(ResponseFailed([Failure(ConnectionLost())]))
        self.assert_client_disconnect(gateway)
        self.assertEqual(gateway.record["request_type"], "ai_chat")

    def test_after_complete_response(self) -> None:
        """
        A connection closed after the response was complete is not an abort.
        """
        gateway = Gateway(self, make_table())
        upstream = gateway.stream()
        upstream.data(delta("a"), DONE)
        upstream.end()
        gateway.disconnect()
        self.assertEqual(gateway.record["status"], 200)
        self.assertIsNone(gateway.record["abort_reason"])


class BackpressureTests(SynchronousTestCase):
    """
    The client's connection pauses and resumes the upstream body transfer.
    """

    def test_pause_resume_reach_upstream(self) -> None:
        """
        The upstream body transport is the request's streaming producer:
        the client transport pausing the channel (a full socket buffer)
        pauses it, and resuming resumes it.
        """
        gateway = Gateway(self, make_table())
        upstream = gateway.stream()
        upstream.data(delta("a"))
        gateway.pause()
        self.assertEqual(upstream.transport.calls, ["pause"])
        gateway.resume()
        self.assertEqual(upstream.transport.calls, ["pause", "resume"])

    def test_non_stream_body(self) -> None:
        """
        A non-streamed body is paced by the client's connection too.
        """
        gateway = Gateway(self, make_table())
        gateway.send()
        upstream = gateway.answer(json_response(b""))
        gateway.pause()
        self.assertEqual(upstream.transport.calls, ["pause"])

    def test_unregistered_at_end(self) -> None:
        """
        Once the response is complete the upstream transport no longer
        follows the client's connection.
        """
        gateway = Gateway(self, make_table())
        upstream = gateway.stream()
        upstream.data(DONE)
        upstream.end()
        gateway.pause()
        self.assertEqual(upstream.transport.calls, [])


class DurationLimitTests(SynchronousTestCase):
    """
    C{max_stream_duration_ms} is enforced by a timer.
    """

    def test_silent_upstream_before_output(self) -> None:
        """
        An upstream that never answers is cut at the limit: 504 with a JSON
        body naming it, and the upstream request cancelled.
        """
        gateway = Gateway(self, make_table({"max_stream_duration_ms": 1500}))
        gateway.send(CHAT_STREAM)
        gateway.clock.advance(1.4)
        self.assertEqual(gateway.raw, b"")
        gateway.clock.advance(0.1)
        response = gateway.response()
        self.assertEqual(response.status, 504)
        self.assertEqual(response.json(), {"message": "max_stream_duration_ms exceeded"})
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertTrue(gateway.upstream.cancelled)
        self.assertEqual(gateway.record["abort_reason"], "max_stream_duration_ms")
        self.assertEqual(gateway.record["status"], 504)

    def test_headers_but_no_body(self) -> None:
        """
        An upstream that sent its headers but no event is cut at the limit
        with 504, and its body transfer stopped.
        """
        gateway = Gateway(self, make_table({"max_stream_duration_ms": 1000}))
        upstream = gateway.stream()
        gateway.clock.advance(1)
        self.assertEqual(gateway.response().status, 504)
        self.assertTrue(upstream.transport.stopped)

    def test_after_output(self) -> None:
        """
        After output the stream ends with an error event, never C{[DONE]},
        and the connection is closed without the terminating chunk, even
        though the upstream stays silent.
        """
        gateway = Gateway(
            self, make_table({"max_stream_duration_ms": 1000, "streaming_flush_interval_ms": 0})
        )
        upstream = gateway.stream()
        upstream.data(delta("a"))
        gateway.clock.advance(1)
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete)
        self.assertTrue(gateway.closed)
        last = json.loads(response.chunks[-1].removeprefix(b"data: "))
        self.assertEqual(last["error"]["code"], "max_stream_duration_ms")
        self.assertEqual(last["error"]["message"], "max_stream_duration_ms exceeded")
        self.assertNotIn(b"[DONE]", response.body)
        self.assertTrue(upstream.transport.stopped)
        self.assertEqual(gateway.record["abort_reason"], "max_stream_duration_ms")
        self.assertEqual(gateway.pending_timers(), [])
        gateway.disconnect()
        self.assertEqual(len(gateway.access_records()), 1)

    def test_client_that_does_not_read(self) -> None:
        """
        A client that does not take the end of a cut stream (its buffers are
        full) has its connection timed out and then aborted, instead of
        keeping it open for good.
        """
        gateway = Gateway(
            self, make_table({"max_stream_duration_ms": 1000, "streaming_flush_interval_ms": 0})
        )
        upstream = gateway.stream()
        upstream.data(delta("a"))
        gateway.pause()
        gateway.clock.advance(1)
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.pending_timers(), [])
        gateway.site_reactor.advance(14)
        self.assertFalse(gateway.transport.disconnected)
        gateway.site_reactor.advance(1)
        self.assertFalse(gateway.transport.disconnected)
        gateway.site_reactor.advance(15)
        self.assertTrue(gateway.transport.disconnected)

    def test_pending_interval_bytes_before_error(self) -> None:
        """
        In interval mode what was pending is written before the error event.
        """
        gateway = Gateway(
            self, make_table({"max_stream_duration_ms": 1000, "streaming_flush_interval_ms": 2000})
        )
        upstream = gateway.stream()
        upstream.data(delta("a"), delta("b"))
        gateway.clock.advance(1)
        chunks = gateway.response().chunks
        self.assertEqual(chunks[:2], [delta("a"), delta("b")])
        self.assertIn(b'"error"', chunks[2])

    def test_measured_from_request_start(self) -> None:
        """
        The limit counts from the request, not from the upstream's headers.
        """
        gateway = Gateway(self, make_table({"max_stream_duration_ms": 1000}))
        gateway.send(CHAT_STREAM)
        gateway.clock.advance(0.8)
        gateway.answer(stream_response()).data(delta("a"))
        gateway.clock.advance(0.2)
        self.assertTrue(gateway.closed)

    def test_not_for_non_stream(self) -> None:
        """
        A non-streamed request is not bound by the stream duration.
        """
        gateway = Gateway(self, make_table({"max_stream_duration_ms": 1000}))
        gateway.send()
        gateway.clock.advance(5)
        self.assertEqual(gateway.raw, b"")
        self.assertFalse(gateway.upstream.cancelled)

    def test_upstream_stream_for_non_stream_request(self) -> None:
        """
        A stream the client did not ask for (C{options.stream}) is bound
        from the moment it is known to be one.
        """
        gateway = Gateway(self, make_table({"max_stream_duration_ms": 1000}))
        gateway.send()
        gateway.answer(stream_response()).data(delta("a"))
        gateway.clock.advance(1)
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.record["abort_reason"], "max_stream_duration_ms")


class ResponseBytesTests(SynchronousTestCase):
    """
    C{max_response_bytes}.
    """

    def test_stream_before_output(self) -> None:
        """
        A first chunk over the limit: 502 C{max_response_bytes exceeded}.
        """
        gateway = Gateway(self, make_table({"max_response_bytes": 100}))
        upstream = gateway.stream()
        upstream.data(delta("x" * 200))
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json(), {"message": "max_response_bytes exceeded"})
        self.assertTrue(upstream.transport.stopped)
        self.assertEqual(gateway.record["abort_reason"], "max_response_bytes")

    def test_stream_after_output(self) -> None:
        """
        Crossing the limit after output: error event, closed connection.
        """
        gateway = Gateway(
            self, make_table({"max_response_bytes": 300, "streaming_flush_interval_ms": 0})
        )
        upstream = gateway.stream()
        first = delta("x" * 150)
        upstream.data(first, delta("y" * 150))
        response = gateway.response()
        self.assertEqual(response.chunks[0], first)
        self.assertIn(b'"max_response_bytes"', response.chunks[-1])
        self.assertNotIn(b"yyy", response.body)
        self.assertFalse(response.complete)
        self.assertTrue(gateway.closed)
        self.assertTrue(upstream.transport.stopped)

    def test_non_stream_content_length(self) -> None:
        """
        A non-streamed response whose Content-Length is over the limit is
        refused without reading it.
        """
        gateway = Gateway(self, make_table({"max_response_bytes": 100}))
        gateway.send()
        upstream = gateway.answer(json_response(b"", length=1000))
        self.assertTrue(upstream.transport.stopped)
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json(), {"message": "max_response_bytes exceeded"})

    def test_non_stream_running_total(self) -> None:
        """
        A non-streamed response without a length (chunked upstream) is cut
        when the bytes read pass the limit.
        """
        gateway = Gateway(self, make_table({"max_response_bytes": 100}))
        gateway.send()
        upstream = gateway.answer(json_response(b""))
        upstream.data(b"x" * 60)
        self.assertEqual(gateway.raw, b"")
        upstream.data(b"x" * 60)
        self.assertTrue(upstream.transport.stopped)
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json(), {"message": "max_response_bytes exceeded"})
        self.assertEqual(gateway.record["abort_reason"], "max_response_bytes")

    def test_non_stream_within_limit(self) -> None:
        """
        A body of exactly the limit passes.
        """
        gateway = Gateway(self, make_table({"max_response_bytes": 100}))
        gateway.send()
        upstream = gateway.answer(json_response(b"", length=100))
        upstream.data(b"{" + b" " * 98 + b"}")
        upstream.end()
        self.assertEqual(gateway.response().status, 200)


class ReadTimeoutTests(SynchronousTestCase):
    """
    C{timeout} applies to each upstream read.
    """

    def test_before_output(self) -> None:
        """
        No body byte within C{timeout} of the headers: 504.
        """
        gateway = Gateway(self, make_table({"timeout": 1000}))
        upstream = gateway.stream()
        gateway.clock.advance(1)
        response = gateway.response()
        self.assertEqual(response.status, 504)
        self.assertTrue(upstream.transport.stopped)
        self.assertEqual(gateway.record["abort_reason"], "timeout")

    def test_each_read(self) -> None:
        """
        Each chunk restarts the wait; a gap of C{timeout} after output ends
        the stream with an error event.
        """
        gateway = Gateway(self, make_table({"timeout": 1000, "streaming_flush_interval_ms": 0}))
        upstream = gateway.stream()
        for _ in range(3):
            gateway.clock.advance(0.9)
            upstream.data(delta("a"))
        gateway.clock.advance(0.9)
        self.assertFalse(gateway.closed)
        gateway.clock.advance(0.1)
        self.assertTrue(gateway.closed)
        self.assertIn(b'"timeout"', gateway.response().chunks[-1])
        self.assertTrue(upstream.transport.stopped)

    def test_non_stream(self) -> None:
        """
        A non-streamed body stalled for C{timeout}: 504.
        """
        gateway = Gateway(self, make_table({"timeout": 1000}))
        gateway.send()
        upstream = gateway.answer(json_response(b""))
        upstream.data(b'{"a":')
        gateway.clock.advance(1)
        self.assertEqual(gateway.response().status, 504)
        self.assertTrue(upstream.transport.stopped)

    def test_paused_by_client(self) -> None:
        """
        Time during which the client's connection paused the upstream is not
        upstream silence: a slow reader does not get its stream cut as an
        upstream timeout.
        """
        gateway = Gateway(self, make_table({"timeout": 1000, "streaming_flush_interval_ms": 0}))
        upstream = gateway.stream()
        upstream.data(delta("a"))
        gateway.pause()
        gateway.clock.advance(5)
        self.assertFalse(gateway.closed)
        self.assertFalse(upstream.transport.stopped)
        gateway.resume()
        gateway.clock.advance(0.9)
        self.assertFalse(gateway.closed)
        gateway.clock.advance(0.1)
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.record["abort_reason"], "timeout")


class UpstreamErrorTests(SynchronousTestCase):
    """
    Upstream failures and error statuses.
    """

    def test_429_passthrough(self) -> None:
        """
        A 429's status, body, content type and retry headers reach the
        client byte for byte.
        """
        gateway = Gateway(self, make_table())
        gateway.send(CHAT_STREAM)
        body = b'{"error": {"message": "slow down", "type": "rate_limit"}}\n'
        upstream = gateway.answer(
            FakeResponse(
                429,
                {
                    b"content-type": [b"application/json; charset=UTF-8"],
                    b"retry-after": [b"7"],
                    b"x-ratelimit-reset-requests": [b"1s"],
                },
            )
        )
        upstream.data(body)
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 429)
        self.assertEqual(response.body, body)
        self.assertEqual(response.header("content-type"), "application/json; charset=UTF-8")
        self.assertEqual(response.header("retry-after"), "7")
        self.assertEqual(response.header("x-ratelimit-reset-requests"), "1s")
        self.assertEqual(gateway.record["status"], 429)

    def test_500_passthrough(self) -> None:
        """
        A 5xx with a text body is relayed as it is, even with an event-stream
        content type.
        """
        gateway = Gateway(self, make_table())
        gateway.send(CHAT_STREAM)
        upstream = gateway.answer(FakeResponse(503, {b"content-type": [b"text/event-stream"]}))
        upstream.data(b"overloaded")
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.body, b"overloaded")
        self.assertEqual(response.header("content-type"), "text/event-stream")

    def test_connection_refused(self) -> None:
        """
        An upstream that cannot be reached: 502 with a JSON error.
        """
        gateway = Gateway(self, make_table())
        gateway.send()
        gateway.upstream.deferred.errback(Failure(ConnectionRefusedError("upstream.test")))
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertIn("failed to connect to upstream", response.json()["message"])
        self.assertEqual(gateway.record["abort_reason"], "upstream_error")

    def test_timeouts(self) -> None:
        """
        treq's timeout cancels the request: every shape the cancellation
        takes gives 504.
        """
        for failure in [
            CancelledError(),
            ConnectingCancelledError(None),
            ResponseNeverReceived([Failure(CancelledError())]),
        ]:
            gateway = Gateway(self, make_table())
            gateway.send()
            gateway.upstream.deferred.errback(Failure(failure))
            response = gateway.response()
            self.assertEqual(response.status, 504, failure)
            self.assertEqual(response.json(), {"message": "upstream timed out"})
            self.assertEqual(gateway.record["abort_reason"], "timeout")

    def test_no_response(self) -> None:
        """
        The connection closed before a complete response head: 502.
        """
        gateway = Gateway(self, make_table())
        gateway.send()
        gateway.upstream.deferred.errback(
            Failure(ResponseNeverReceived([Failure(ConnectionLost())]))
        )
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertIn("message", response.json())

    def test_truncated_non_stream(self) -> None:
        """
        A non-streamed body cut short: 502 with a JSON error, not the partial
        body.
        """
        gateway = Gateway(self, make_table())
        gateway.send()
        upstream = gateway.answer(json_response(b""))
        upstream.data(b'{"choices":')
        upstream.end(ResponseFailed([Failure(ConnectionLost())]))
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertNotIn(b"choices", response.body)
        self.assertEqual(gateway.record["abort_reason"], "upstream_error")

    def test_stream_cut_after_output(self) -> None:
        """
        A stream cut after output ends with an error event and a closed
        connection, keeping the status.
        """
        gateway = Gateway(self, make_table({"streaming_flush_interval_ms": 0}))
        upstream = gateway.stream()
        upstream.data(delta("a"))
        upstream.end(ResponseFailed([Failure(ConnectionLost())]))
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete)
        self.assertTrue(gateway.closed)
        self.assertIn(b'"upstream_error"', response.chunks[-1])
        self.assertEqual(gateway.record["abort_reason"], "upstream_error")
        self.assertEqual(gateway.record["status"], 200)

    def test_stream_cut_before_output(self) -> None:
        """
        A stream cut before any byte: 502 JSON.
        """
        gateway = Gateway(self, make_table())
        upstream = gateway.stream()
        upstream.end(ResponseFailed([Failure(ConnectionLost())]))
        self.assertEqual(gateway.response().status, 502)

    def test_potential_data_loss(self) -> None:
        """
        A stream without framing that closes after its terminator ended
        cleanly; one that closes before it was cut.
        """
        gateway = Gateway(self, make_table())
        upstream = gateway.stream()
        upstream.data(delta("a"), DONE)
        upstream.end(PotentialDataLoss())
        self.assertTrue(gateway.response().complete)

        gateway = Gateway(self, make_table())
        upstream = gateway.stream()
        upstream.data(delta("a"))
        upstream.end(PotentialDataLoss())
        self.assertFalse(gateway.response().complete)
        self.assertTrue(gateway.closed)

    def test_empty_stream(self) -> None:
        """
        A stream that ends without a byte: 502.
        """
        gateway = Gateway(self, make_table())
        upstream = gateway.stream()
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json(), {"message": "upstream returned an empty stream"})


class BodyFilterTests(SynchronousTestCase):
    """
    Body filters see every chunk with the request context.
    """

    def test_pass(self) -> None:
        """
        A filter returning L{None} leaves the chunk alone.
        """
        observer = ScriptedFilter()
        gateway = Gateway(
            self, with_body_filters(make_table({"streaming_flush_interval_ms": 0}), observer)
        )
        upstream = gateway.stream()
        upstream.data(delta("a"), DONE)
        upstream.end()
        self.assertEqual(gateway.response().chunks, [delta("a"), DONE])
        self.assertEqual([seen["chunk"] for seen in observer.seen], [delta("a"), DONE])

    def test_replace(self) -> None:
        """
        A L{Replace} is sent instead; C{Replace(b"")} holds the chunk back.
        """
        replacing = ScriptedFilter(
            lambda chunk, context: Replace(b"" if b"hide" in chunk else chunk.upper())
        )
        gateway = Gateway(
            self, with_body_filters(make_table({"streaming_flush_interval_ms": 0}), replacing)
        )
        upstream = gateway.stream()
        upstream.data(delta("a"), delta("hide"), DONE)
        upstream.end()
        self.assertEqual(gateway.response().chunks, [delta("a").upper(), DONE.upper()])

    def test_terminate_before_output(self) -> None:
        """
        A L{Terminate} before any output gives its status and body; the
        upstream is stopped.
        """
        stop = ScriptedFilter(
            lambda chunk, context: Terminate(
                b'{"message":"no"}', 451, "application/json", "moderated"
            )
        )
        gateway = Gateway(self, with_body_filters(make_table(), stop))
        upstream = gateway.stream()
        upstream.data(delta("bad"))
        response = gateway.response()
        self.assertEqual(response.status, 451)
        self.assertEqual(response.body, b'{"message":"no"}')
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertTrue(upstream.transport.stopped)
        self.assertEqual(gateway.record["abort_reason"], "moderated")

    def test_terminate_after_output(self) -> None:
        """
        A L{Terminate} after output sends its bytes last and ends the
        response; the upstream is stopped and no filter runs again.
        """
        stop = ScriptedFilter(
            lambda chunk, context: Terminate(b"data: refused\n\n") if b"bad" in chunk else None
        )
        gateway = Gateway(
            self, with_body_filters(make_table({"streaming_flush_interval_ms": 0}), stop)
        )
        upstream = gateway.stream()
        upstream.data(delta("ok"), delta("bad"))
        upstream.data(delta("after"))
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.chunks, [delta("ok"), b"data: refused\n\n"])
        self.assertTrue(response.complete)
        self.assertTrue(upstream.transport.stopped)
        self.assertEqual(len(stop.seen), 2)
        self.assertEqual(stop.finished, [])

    def test_final_call(self) -> None:
        """
        At the end of the stream every filter's C{finish} runs; bytes it
        returns are sent before the end.
        """
        tail = ScriptedFilter(on_finish=lambda context: Replace(b": held back\n\n"))
        gateway = Gateway(
            self, with_body_filters(make_table({"streaming_flush_interval_ms": 0}), tail)
        )
        upstream = gateway.stream()
        upstream.data(delta("a"), DONE)
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.chunks, [delta("a"), DONE, b": held back\n\n"])
        self.assertTrue(response.complete)
        self.assertEqual(len(tail.finished), 1)
        self.assertTrue(tail.finished[0]["done"])

    def test_terminate_at_finish_before_output(self) -> None:
        """
        A filter that held everything back can still answer with a status
        at the final call.
        """
        holder = ScriptedFilter(
            lambda chunk, context: Replace(b""),
            lambda context: Terminate(b"nope", 400, "text/plain"),
        )
        gateway = Gateway(self, with_body_filters(make_table(), holder))
        upstream = gateway.stream()
        upstream.data(delta("a"), DONE)
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 400)
        self.assertEqual(response.body, b"nope")

    def test_priority_order(self) -> None:
        """
        Filters run highest priority first, whatever their order in the
        route's config; each sees the previous one's output.
        """
        plugins = [TaggingPlugin("low", 10), TaggingPlugin("high", 100)]
        table = make_table(
            {"streaming_flush_interval_ms": 0},
            plugins={"low": {}, "high": {}},
            filter_plugins=plugins,
        )
        gateway = Gateway(self, table)
        upstream = gateway.stream()
        upstream.data(b"data: x\n\n")
        self.assertEqual(gateway.response().chunks, [b"data: x\n\n|high|low"])

    def test_context(self) -> None:
        """
        Each call sees the events of this chunk, the text so far, the usage,
        the done flag and the time to first token.
        """
        observer = ScriptedFilter()
        gateway = Gateway(
            self, with_body_filters(make_table({"streaming_flush_interval_ms": 0}), observer)
        )
        gateway.send(CHAT_STREAM)
        gateway.clock.advance(0.25)
        upstream = gateway.answer(stream_response())
        upstream.data(delta("Hel") + delta("lo"), delta(" world")[:10])
        upstream.data(delta(" world")[10:] + USAGE, DONE)
        upstream.end()
        seen = observer.seen
        self.assertEqual(len(seen), 4)
        self.assertEqual([len(s["events"]) for s in seen], [2, 0, 2, 1])
        self.assertEqual(seen[0]["events"][0], ("message", delta("Hel")[6:-2]))
        self.assertEqual(
            [s["text"] for s in seen], ["Hello", "Hello", "Hello world", "Hello world"]
        )
        self.assertEqual([s["usage"] is not None for s in seen], [False, False, True, True])
        self.assertEqual(seen[2]["usage"]["total_tokens"], 10)
        self.assertEqual([s["done"] for s in seen], [False, False, False, True])
        self.assertEqual({s["ttft_ms"] for s in seen}, {250})
        self.assertEqual(observer.finished[0]["events"], [])
        self.assertEqual(observer.finished[0]["text"], "Hello world")

    def test_non_stream(self) -> None:
        """
        A non-streamed body is one chunk, seen whole with its text and usage,
        then the final call; a replacement gets the right length.
        """
        body = json.dumps(
            {
                "model": "m",
                "choices": [{"message": {"role": "assistant", "content": "Hi!"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            }
        ).encode()
        observer = ScriptedFilter(lambda chunk, context: Replace(chunk + b"  "))
        gateway = Gateway(self, with_body_filters(make_table(), observer))
        gateway.send()
        upstream = gateway.answer(json_response(b""))
        upstream.data(body[:10], body[10:])
        upstream.end()
        self.assertEqual(len(observer.seen), 1)
        self.assertEqual(observer.seen[0]["chunk"], body)
        self.assertEqual(observer.seen[0]["text"], "Hi!")
        self.assertTrue(observer.seen[0]["done"])
        self.assertEqual(observer.seen[0]["usage"]["completion_tokens"], 2)
        self.assertEqual(len(observer.finished), 1)
        response = gateway.response()
        self.assertEqual(response.body, body + b"  ")
        self.assertEqual(response.header("content-length"), str(len(body) + 2))

    def test_error_status_not_filtered(self) -> None:
        """
        An upstream error body is relayed without running the filters.
        """
        observer = ScriptedFilter(lambda chunk, context: Replace(b"changed"))
        gateway = Gateway(self, with_body_filters(make_table(), observer))
        gateway.send()
        upstream = gateway.answer(json_response(b"", code=500))
        upstream.data(b"boom")
        upstream.end()
        self.assertEqual(gateway.response().body, b"boom")
        self.assertEqual(observer.seen, [])

    def test_filter_exception(self) -> None:
        """
        A filter raising mid-stream is logged and ends the stream with an
        error event, not a silent hang.
        """

        def explode(chunk: bytes, context: Any) -> None:
            if b"boom" in chunk:
                raise ValueError("filter bug")

        gateway = Gateway(
            self,
            with_body_filters(
                make_table({"streaming_flush_interval_ms": 0}), ScriptedFilter(explode)
            ),
        )
        upstream = gateway.stream()
        upstream.data(delta("a"), delta("boom"))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertTrue(gateway.closed)
        self.assertTrue(upstream.transport.stopped)
        self.assertEqual(gateway.record["abort_reason"], "internal_error")


class AccessRecordTests(SynchronousTestCase):
    """
    One access record per request with the docs/operations.md fields.
    """

    def test_stream_record(self) -> None:
        """
        A streamed request's record: type, models, tokens, times, bytes.
        """
        gateway = Gateway(self, make_table())
        request = json.dumps(CHAT_STREAM).encode()
        gateway.send(request)
        gateway.clock.advance(0.1)
        upstream = gateway.answer(stream_response())
        gateway.clock.advance(0.2)
        chunks = [delta("Hi"), USAGE, DONE]
        upstream.data(*chunks)
        gateway.clock.advance(0.5)
        upstream.end()
        record = gateway.record
        self.assertTrue(RECORD_KEYS <= set(record), RECORD_KEYS - set(record))
        self.assertEqual(record["route_id"], "chat")
        self.assertEqual(record["instance"], "ai-proxy-openai")
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["request_type"], "ai_stream")
        self.assertEqual(record["request_llm_model"], "gpt-test")
        # As APISIX: the model sent upstream, not the one the stream names.
        self.assertEqual(record["llm_model"], "gpt-test")
        self.assertEqual(record["llm_time_to_first_token"], 300)
        # APISIX's $upstream_response_time: until the upstream's answer ended.
        self.assertEqual(record["upstream_response_time"], 800)
        self.assertEqual(
            (record["prompt_tokens"], record["completion_tokens"], record["total_tokens"]),
            (7, 3, 10),
        )
        self.assertEqual(record["bytes_in"], len(request))
        self.assertEqual(record["bytes_out"], sum(map(len, chunks)))
        self.assertFalse(record["llm_has_tool_calls"])
        self.assertIsNone(record["abort_reason"])
        json.dumps(record)

    def test_non_stream_record(self) -> None:
        """
        A non-streamed request's record, with cache and reasoning tokens.
        """
        gateway = Gateway(self, make_table({"options": {"model": "forced"}}))
        gateway.send()
        gateway.clock.advance(0.05)
        body = json.dumps(
            {
                "model": "forced-2024",
                "choices": [
                    {"message": {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}}
                ],
                "usage": {
                    "prompt_tokens": 20,
                    "completion_tokens": 5,
                    "total_tokens": 25,
                    "prompt_tokens_details": {"cached_tokens": 4},
                    "completion_tokens_details": {"reasoning_tokens": 2},
                },
            }
        ).encode()
        upstream = gateway.answer(json_response(b""))
        upstream.data(body)
        gateway.clock.advance(0.05)
        upstream.end()
        record = gateway.record
        self.assertTrue(RECORD_KEYS <= set(record))
        self.assertEqual(record["request_type"], "ai_chat")
        self.assertEqual(record["request_llm_model"], "gpt-test")
        self.assertEqual(record["llm_time_to_first_token"], 100)
        self.assertEqual(record["upstream_response_time"], 100)
        self.assertEqual(record["total_tokens"], 25)
        self.assertEqual(record["cache_read_input_tokens"], 4)
        self.assertEqual(record["reasoning_tokens"], 2)
        self.assertTrue(record["llm_has_tool_calls"])
        self.assertEqual(record["bytes_out"], len(body))

    def test_llm_model_non_stream(self) -> None:
        """
        C{llm_model} is the model sent upstream (C{options.model} over the
        client's), for a non-streamed response as for a stream.
        """
        gateway = Gateway(self, make_table({"options": {"model": "forced"}}))
        gateway.send()
        upstream = gateway.answer(json_response(b""))
        upstream.data(b'{"model":"forced-2024","choices":[]}')
        upstream.end()
        self.assertEqual(gateway.record["llm_model"], "forced")

    def test_llm_model_stream(self) -> None:
        """
        For a stream too, C{llm_model} is the model sent upstream.
        """
        gateway = Gateway(self, make_table({"options": {"model": "forced"}}))
        upstream = gateway.stream()
        upstream.data(delta("a", model="forced-2024"), DONE)
        upstream.end()
        self.assertEqual(gateway.record["llm_model"], "forced")

    def test_one_record(self) -> None:
        """
        A cut stream whose connection then closes is recorded once.
        """
        gateway = Gateway(
            self, make_table({"max_response_bytes": 50, "streaming_flush_interval_ms": 0})
        )
        upstream = gateway.stream()
        upstream.data(delta("a"), delta("b"))
        gateway.disconnect()
        self.assertEqual(len(gateway.access_records()), 1)
        self.assertEqual(gateway.record["abort_reason"], "max_response_bytes")

    def test_no_api_key_in_logs(self) -> None:
        """
        Neither the route's header key nor its query key appears in any log
        event, whatever happened to the request.
        """
        proxy = {
            "auth": {"header": {"Authorization": f"Bearer {API_KEY}"}, "query": {"key": API_KEY}}
        }
        gateway = Gateway(self, make_table(proxy))
        scenarios: list[Callable[[], None]] = [
            lambda: gateway.answer(stream_response()).data(delta("a"), USAGE, DONE),
            lambda: gateway.upstream.deferred.errback(
                Failure(ConnectionRefusedError("upstream.test"))
            ),
            lambda: gateway.answer(stream_response()).end(
                ResponseFailed([Failure(ConnectionLost())])
            ),
            lambda: gateway.disconnect(),
        ]
        for scenario in scenarios:
            gateway.connect()
            gateway.send(CHAT_STREAM, headers={b"authorization": b"Bearer client-key"})
            self.assertIn(f"key={API_KEY}", gateway.upstream.url)
            scenario()
        gateway.clock.advance(60)
        self.assertGreaterEqual(len(gateway.access_records()), 4)
        for event in gateway.events:
            text = formatEvent(event) + repr(event)
            self.assertNotIn(API_KEY, text)
