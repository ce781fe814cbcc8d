# -*- test-case-name: tests.test_fuzz -*-
"""
Fuzzing and property tests (hypothesis, derandomized so that every run
tries the same examples):

  - the SSE and EventStream decoders never raise on arbitrary bytes, keep
    their carry-over bounded, and are chunking-invariant;
  - near-valid config documents (real field names, random values, random
    plugin configs) through L{parse_config} and L{build_routes} validate or
    give path-named problems;
  - random requests (methods, targets, headers, bodies) through the real
    exchange get a 4xx or a proxied answer, never a 5xx or a logged failure;
  - random upstream answers (statuses, content types, bytes, chunkings,
    endings) through the real exchange give the client a well-formed
    answer, and streams that did not end properly end with an error event;
  - a smaller number of random requests through the real daemon.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed

from aiproxy.config import Config, ConfigError, parse_config
from aiproxy.routing.build import build_routes
from aiproxy.server import GatewayResource, GatewaySite
from aiproxy.stream.eventstream import EventStreamDecoder, encode_message
from aiproxy.stream.sse import SSEDecoder
from tests.daemon import RawHTTPClient, in_thread, proxy_route, start_daemon, start_mock
from tests.helpers import feed_all, log_events
from tests.test_config import PROBLEM_LINE
from tests.test_proxy import FakeResponse, FakeUpstreamClient, make_table, parse_response


def fuzz(examples: int) -> settings:
    """
    Hypothesis settings for C{examples} examples, the same on every run
    (derandomized), nothing written to the tree.
    """
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


CRASH_WORDS = ("Traceback", "Unhandled Error", "Unhandled error")


# -- strategies -----------------------------------------------------------------------

#: Pieces SSE streams are made of, so random streams have structure.
_SSE_TOKENS = st.sampled_from(
    [
        b"data:",
        b"data: ",
        b"event: ",
        b"id: ",
        b"retry: 10",
        b":",
        b": ping",
        b"x",
        b"{}",
        b"[DONE]",
        b"\n",
        b"\r",
        b"\r\n",
        b"\n\n",
        b"\r\n\r\n",
        b" ",
        b"\xff",
        b"\x00",
        b"\xe2\x82",
    ]
)
sse_streams = st.lists(_SSE_TOKENS, max_size=200).map(b"".join) | st.binary(max_size=2000)


@st.composite
def chunkings(draw: Any, data: bytes) -> list[bytes]:
    """
    C{data} cut at random points (empty chunks included).
    """
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@st.composite
def chunked_streams(draw: Any, streams: Any = sse_streams) -> tuple[bytes, list[bytes]]:
    data = draw(streams)
    return data, draw(chunkings(data))


class DecoderFuzzTests(SynchronousTestCase):
    """
    The stream decoders on whatever an upstream may send.
    """

    @fuzz(400)
    @given(chunked_streams(), st.integers(1, 64))
    def test_sse_bounded(self, case: tuple[bytes, list[bytes]], cap: int) -> None:
        """
        Arbitrary bytes in arbitrary chunks never make the SSE decoder
        raise, and what it carries over never passes its cap (an event
        growing beyond it is dropped, only its last 3 bytes kept to find
        its end).
        """
        _, chunks = case
        decoder = SSEDecoder(max_remainder=cap)
        for chunk in chunks:
            decoder.feed(chunk)
            self.assertLessEqual(decoder.pending, max(cap, 3))
        self.assertEqual(decoder.close(), [])
        self.assertEqual(decoder.pending, 0)
        self.flushWarnings()

    @fuzz(400)
    @given(chunked_streams())
    def test_sse_chunking_invariant(self, case: tuple[bytes, list[bytes]]) -> None:
        """
        Below the cap, any split of the same bytes gives the same events as
        feeding them whole.
        """
        data, chunks = case
        self.assertEqual(feed_all(SSEDecoder(), chunks), feed_all(SSEDecoder(), [data]))

    @fuzz(300)
    @given(
        st.lists(
            st.tuples(
                st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=20), max_size=3),
                st.binary(max_size=300),
            ),
            max_size=6,
        ),
        st.binary(max_size=40),
        st.data(),
    )
    def test_eventstream(
        self, messages: list[tuple[dict[str, str], bytes]], tail: bytes, data: Any
    ) -> None:
        """
        Valid messages in any chunking decode to themselves; random bytes
        after them never make the decoder raise, and after a framing error
        it holds nothing.
        """
        stream = b"".join(encode_message(headers, payload) for headers, payload in messages)
        chunks = data.draw(chunkings(stream + tail))
        decoder = EventStreamDecoder()
        decoded = []
        for chunk in chunks:
            decoded += decoder.feed(chunk)
            if decoder.error is not None:
                self.assertEqual(decoder.pending, 0)
        decoder.close()
        self.assertEqual([(m.headers, m.payload) for m in decoded[: len(messages)]], messages)
        self.flushWarnings()

    @fuzz(300)
    @given(chunked_streams(st.binary(max_size=3000)))
    def test_eventstream_arbitrary_bytes(self, case: tuple[bytes, list[bytes]]) -> None:
        """
        Random bytes never make the EventStream decoder raise.
        """
        _, chunks = case
        decoder = EventStreamDecoder()
        for chunk in chunks:
            decoder.feed(chunk)
        decoder.close()
        self.flushWarnings()


# -- configs ----------------------------------------------------------------------------

_ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**33), 2**33)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
_PROXY_VALUES: dict[str, Any] = {
    "provider": st.sampled_from(
        ["openai", "anthropic", "deepseek", "openai-compatible", "azure-openai", "bedrock", "nope"]
    ),
    "auth": st.sampled_from(
        [
            {"header": {"Authorization": "Bearer k"}},
            {"query": {"key": "k"}},
            {"header": {"bad header": "x"}},
            {"header": {"X": "line\nbreak"}},
            {},
            {"aws": {"access_key_id": "a"}},
        ]
    ),
    "override": st.sampled_from(
        [
            {"endpoint": "http://127.0.0.1:1/v1/chat/completions"},
            {"endpoint": "ftp://x"},
            {"endpoint": "https://h"},
            {"request_body": {"openai-chat": {"a": 1}}},
            {"llm_options": {"max_tokens": 0}},
        ]
    ),
    "timeout": st.integers(-5, 700000),
    "max_stream_duration_ms": st.integers(-1, 10**6),
    "max_response_bytes": st.integers(-1, 10**6),
    "first_token_timeout_ms": st.integers(-1, 10**6),
    "stream_idle_timeout_ms": st.integers(-1, 10**6),
    "stream_idle_timeout_counts_comments": st.booleans() | st.integers(0, 1),
    "keepalive_comment_interval_ms": st.integers(-1, 10**6),
    "streaming_flush_interval_ms": st.integers(-1, 1000),
    "keepalive_timeout": st.integers(0, 10**5),
    "ssl_verify": st.booleans() | st.sampled_from(["yes", 1]),
    "ssl_ca_file": st.sampled_from(["/nonexistent/ca.pem", "/etc/hostname", "", "/dev/null"]),
    "max_req_body_size": st.integers(-1, 10**9),
    "logging": st.sampled_from([{"summaries": True}, {"payloads": "x"}, {}]),
}
_PLUGIN_CONFIGS = st.sampled_from(
    [
        ("ai-prompt-guard", {"deny_patterns": ["("]}),
        ("ai-prompt-guard", {"allow_patterns": ["^a", "b+"], "match_all_roles": True}),
        ("ai-response-guard", {"deny_patterns": ["[z-a]"]}),
        ("ai-response-guard", {"deny_patterns": ["secret"], "deny_code": 451}),
        ("ai-response-redact", {"rules": [{"pattern": "sk-\\w+", "replacement": "***"}]}),
        (
            "ai-response-redact",
            {"rules": [{"pattern": "(?<=a+)b", "replacement": "x"}], "hold_back_chars": -1},
        ),
        ("ai-prompt-decorator", {"prepend": [{"role": "system", "content": "be brief"}]}),
        ("ai-prompt-decorator", {"append": "nope"}),
        ("no-such-plugin", {}),
    ]
)


@st.composite
def near_valid_documents(draw: Any) -> dict[str, Any]:
    """
    A config with one to three routes built from real field names, each
    field's value drawn from values that are valid, invalid or anything.
    """
    routes = []
    for index in range(draw(st.integers(1, 3))):
        proxy: dict[str, Any] = {
            "provider": "openai",
            "auth": {"header": {"Authorization": "Bearer k"}},
            "override": {"endpoint": "http://127.0.0.1:1/v1/chat/completions"},
        }
        for name in draw(st.lists(st.sampled_from(sorted(_PROXY_VALUES)), max_size=5, unique=True)):
            proxy[name] = (
                draw(_PROXY_VALUES[name] | _ANY)
                if draw(st.booleans())
                else draw(_PROXY_VALUES[name])
            )
        if draw(st.booleans()):
            proxy.pop(draw(st.sampled_from(["provider", "auth"])))
        plugins: dict[str, Any] = {"ai-proxy": proxy}
        for name, conf in draw(st.lists(_PLUGIN_CONFIGS, max_size=2)):
            plugins[name] = conf
        route: dict[str, Any] = {
            "uri": draw(st.sampled_from(["/v1/chat/completions", "/v1/*", "nope", "/a", ""])),
            "plugins": plugins,
        }
        if draw(st.booleans()):
            route["id"] = draw(st.sampled_from([f"r{index}", "dup", 7]))
        routes.append(route)
    document: dict[str, Any] = {"routes": routes}
    if draw(st.booleans()):
        document["listen"] = draw(
            st.sampled_from(["tcp:0", "nonsense:x", ["tcp:0", "unix:/tmp/x"], 12, ""])
        )
    if draw(st.booleans()):
        document[draw(st.sampled_from(["shutdown_grace_s", "metrics_listen", "unknown_key"]))] = (
            draw(_ANY)
        )
    return document


class ConfigFuzzTests(SynchronousTestCase):
    """
    Near-valid configs through the loader and the route builder.
    """

    def assert_problems(self, error: ConfigError) -> None:
        self.assertTrue(error.problems)
        for line in error.problems:
            self.assertIsNotNone(PROBLEM_LINE.fullmatch(line), line)
        self.assertEqual(str(error).splitlines(), error.problems)

    @fuzz(300)
    @given(near_valid_documents())
    def test_load_and_build(self, document: dict[str, Any]) -> None:
        """
        A document validates and its routes build, or every problem is one
        C{<json path>: <reason>} line; nothing else escapes.
        """
        try:
            config = parse_config(yaml.safe_dump(document), environ={})
        except ConfigError as e:
            self.assert_problems(e)
            return
        self.assertIsInstance(config, Config)
        try:
            table = build_routes(config, MemoryReactorClock())
        except ConfigError as e:
            self.assert_problems(e)
            return
        self.assertEqual(len(table.routes), len(document["routes"]))


# -- requests through the exchange ------------------------------------------------------

_ROUTES = [
    {
        "id": "chat",
        "uri": "/v1/chat/completions",
        "plugins": {
            "ai-proxy": {
                "provider": "openai",
                "auth": {"header": {"Authorization": "Bearer k"}},
                "override": {"endpoint": "http://upstream.test/v1/chat/completions"},
                "max_req_body_size": 4000,
                "streaming_flush_interval_ms": 0,
            }
        },
    },
    {
        "id": "messages",
        "uri": "/v1/messages",
        "plugins": {
            "ai-proxy": {
                "provider": "anthropic",
                "auth": {"header": {"x-api-key": "k"}},
                "override": {"endpoint": "http://upstream.test/v1/messages"},
            }
        },
    },
    {
        "id": "prefix",
        "uri": "/v1/*",
        "plugins": {
            "ai-proxy": {
                "provider": "openai",
                "auth": {"query": {"key": "k"}},
                "override": {"endpoint": "http://upstream.test/base"},
            }
        },
    },
]

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_MESSAGES = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", 3]), "content": _JSON}
        ),
        max_size=3,
    )
    | _JSON
)
_BODY_DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "messages": _MESSAGES,
        "input": _JSON,
        "model": _JSON,
        "stream": st.booleans() | _JSON,
        "stream_options": _JSON,
        "max_tokens": _JSON,
        "system": _JSON,
        "tools": _JSON,
    },
)
_VALID_CHAT = st.fixed_dictionaries(
    {
        "model": st.text(max_size=8),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=20)}
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={
        "stream": st.booleans(),
        "temperature": st.floats(0, 2),
        "max_tokens": st.integers(1, 100),
    },
).map(lambda d: json.dumps(d).encode())
_BODIES = (
    _VALID_CHAT
    | _VALID_CHAT
    | _BODY_DOCUMENTS.map(lambda d: json.dumps(d).encode())
    | _JSON.map(lambda d: json.dumps(d).encode())
    | st.binary(max_size=300)
    | st.sampled_from(
        [
            b"",
            b"{",
            b'{"messages": [NaN]}',
            b'{"a": 1e999}',
            b'{"a": "\\ud800"}',
            b"[" * 3000,
            b"\xef\xbb\xbf{}",
            b'{"messages": []}' + b" " * 5000,
        ]
    )
)
_TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789ABCDEFXYZ", min_size=1, max_size=12
)
_HEADER_VALUES = st.binary(max_size=40).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b""))
_HEADERS = st.lists(
    st.tuples(
        _TOKEN.map(str.encode)
        | st.sampled_from(
            [
                b"content-type",
                b"authorization",
                b"cookie",
                b"host",
                b"connection",
                b"te",
                b"expect",
                b"transfer-encoding",
                b"content-encoding",
                b"x-mock-status",
                b"content-length",
            ]
        ),
        _HEADER_VALUES
        | st.sampled_from(
            [
                b"application/json",
                b"text/plain",
                b"application/json; charset=utf-8",
                b"close",
                b"100-continue",
                b"chunked",
                b"gzip",
                b"-1",
                b"99999999999999999999",
            ]
        ),
    ),
    max_size=6,
)
_TARGETS = (
    st.just(b"/v1/chat/completions")
    | st.sampled_from(
        [
            b"/v1/chat/completions",
            b"/v1/messages",
            b"/v1/responses",
            b"/v1/embeddings",
            b"/v1/x/converse",
            b"/v1/",
            b"/v1/chat/completions?stream=1&key=x",
            b"/v1/%2e%2e/x",
            b"//evil/x",
            b"http://evil/v1/chat/completions",
            b"/nowhere",
            b"*",
            b"/v1/chat/completions#x",
        ]
    )
    | _TOKEN.map(lambda t: b"/v1/" + t.encode())
)
_METHODS = (
    st.just(b"POST")
    | st.sampled_from([b"POST", b"GET", b"PUT", b"DELETE", b"OPTIONS", b"HEAD", b"PATCH"])
    | _TOKEN.map(str.encode)
)


def raw_request(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    """
    A request with C{headers} as given plus a correct C{Content-Length}
    (unless the headers already hold one).
    """
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: gateway.test"]
    lines += [name + b": " + value for name, value in headers]
    if not any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in headers):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class ExchangeHarness:
    """
    The real site and exchanges over a table whose upstream clients are
    fakes, a fresh connection per example, and the log events of each.
    """

    def __init__(
        self, testcase: SynchronousTestCase, routes: list[dict[str, Any]] = _ROUTES
    ) -> None:
        self.table = make_table(routes=routes)
        self.events = log_events(testcase)

    def connect(self) -> None:
        """
        A new site, clock and client connection.
        """
        for route in self.table.routes:
            for instance in route.instances:
                instance.client = FakeUpstreamClient()  # type: ignore[assignment]
        self.events.clear()
        self.clock = Clock()
        self.site = GatewaySite(
            GatewayResource(self.table, self.clock), reactor=MemoryReactorClock()
        )
        self.transport = StringTransport()
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def calls(self) -> list[Any]:
        return [
            call
            for route in self.table.routes
            for instance in route.instances
            for call in instance.client.calls  # type: ignore[attr-defined]
        ]

    def failures(self) -> list[dict[str, Any]]:
        """
        Log events of bugs: failures logged, or critical/error events.
        """
        return [e for e in self.events if "log_failure" in e or e.get("isError")]


class RequestFuzzTests(SynchronousTestCase):
    """
    Random requests through the real site and exchange.
    """

    @fuzz(500)
    @given(_METHODS, _TARGETS, _HEADERS, _BODIES, st.booleans())
    def test_requests(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        stream_answer: bool,
    ) -> None:
        """
        Whatever the client sends, it gets a 4xx or the upstream's answer
        (here 200), never a 5xx; nothing is logged as a failure; a request
        that reached the upstream went to the route's host.
        """
        harness = self.harness
        harness.connect()
        harness.channel.dataReceived(raw_request(method, target, headers, body))
        for call in harness.calls():
            self.assertTrue(call.url.startswith("http://upstream.test/"), call.url)
            if stream_answer:
                response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
                call.deferred.callback(response)
                response.data(b'data: {"choices": []}\n\n', b"data: [DONE]\n\n")
            else:
                response = FakeResponse(200, {b"content-type": [b"application/json"]})
                call.deferred.callback(response)
                response.data(b'{"choices": []}')
            response.end()
        harness.clock.advance(60)
        raw = harness.transport.value()
        while raw.startswith(b"HTTP/1.1 1"):
            # An interim answer (100 Continue) before the final one.
            raw = raw.partition(b"\r\n\r\n")[2]
        if raw:
            parsed = parse_response(raw)
            self.assertIsNotNone(parsed, raw)
            assert parsed is not None
            self.assertTrue(parsed.status == 200 or 400 <= parsed.status < 500, raw[:300])
            if parsed.status != 200:
                self.assertFalse(harness.calls() and parsed.status >= 500)
        else:
            # Only a request whose body the server still waits for (a
            # chunked or over-long declared body) gets no answer yet.
            declared = [name.lower() for name, _ in headers]
            self.assertTrue(
                b"transfer-encoding" in declared
                or b"content-length" in declared
                or b"expect" in declared,
                (method, target, headers, body[:100]),
            )
        self.assertEqual(harness.failures(), [])
        self.flushWarnings()

    def setUp(self) -> None:
        self.harness = ExchangeHarness(self)


# -- upstream answers through the exchange ------------------------------------------------

_CONTENT_TYPES = st.sampled_from(
    [
        b"text/event-stream",
        b"text/event-stream; charset=utf-8",
        b"application/json",
        b"text/html",
        b"application/vnd.amazon.eventstream",
        b"",
        b"application/octet-stream",
        b"TEXT/EVENT-STREAM",
    ]
)
_GOOD_STREAM = (
    b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)
_UPSTREAM_BODIES = (
    sse_streams
    | st.binary(max_size=1500)
    | st.integers(0, len(_GOOD_STREAM)).map(lambda n: _GOOD_STREAM[:n])
    | st.just(_GOOD_STREAM)
    | st.just(b'{"error": {"message": "nope"}}')
)
_ENDINGS = st.sampled_from(["done", "data-loss", "lost"])


class UpstreamFuzzTests(SynchronousTestCase):
    """
    Random upstream answers through the real exchange.
    """

    @fuzz(400)
    @given(
        st.sampled_from([200, 200, 200, 201, 204, 400, 404, 429, 500, 503]),
        _CONTENT_TYPES,
        st.data(),
        _ENDINGS,
        st.booleans(),
        st.sampled_from([0, 10]),
        st.sampled_from([None, 500]),
    )
    def test_answers(
        self,
        status: int,
        content_type: bytes,
        data: Any,
        ending: str,
        stream: bool,
        flush_ms: int,
        limit: Any,
    ) -> None:
        """
        Whatever the upstream answers, the client gets one well-formed
        HTTP response: a complete one, or a stream cut after its 200 whose
        last event is an error event (and no C{[DONE]} after it); nothing
        is logged as a failure and no timer is left behind.
        """
        body = data.draw(_UPSTREAM_BODIES)
        chunks = data.draw(chunkings(body))
        proxy: dict[str, Any] = {
            "streaming_flush_interval_ms": flush_ms,
            "stream_idle_timeout_ms": 5000,
        }
        if limit is not None:
            proxy["max_response_bytes"] = limit
        harness = ExchangeHarness(
            self,
            routes=[
                {
                    "id": "chat",
                    "uri": "/v1/chat/completions",
                    "plugins": {
                        "ai-proxy": {
                            "provider": "openai",
                            "auth": {"header": {"Authorization": "Bearer k"}},
                            "override": {"endpoint": "http://upstream.test/v1/chat/completions"},
                            **proxy,
                        }
                    },
                }
            ],
        )
        harness.connect()
        request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        harness.channel.dataReceived(
            raw_request(
                b"POST",
                b"/v1/chat/completions",
                [(b"Content-Type", b"application/json")],
                json.dumps(request).encode(),
            )
        )
        (call,) = harness.calls()
        headers = {b"content-type": [content_type]} if content_type else {}
        response = FakeResponse(status, headers)
        call.deferred.callback(response)
        for chunk in chunks:
            if response.protocol is not None and not response.transport.stopped:
                response.protocol.dataReceived(chunk)
        if response.protocol is not None and not response.transport.stopped:
            reason = {
                "done": ResponseDone(),
                "data-loss": PotentialDataLoss(),
                "lost": ResponseFailed([Failure(ConnectionLost())]),
            }[ending]
            response.protocol.connectionLost(Failure(reason))
        harness.clock.advance(10)
        raw = harness.transport.value()
        parsed = parse_response(raw)
        self.assertIsNotNone(parsed, raw[:300])
        assert parsed is not None
        self.assertEqual(raw.count(b"HTTP/1.1 "), 1)
        if parsed.status == 204:
            # No body at all, by definition (Twisted drops any write).
            self.assertEqual(parsed.body, b"")
        elif not parsed.complete:
            self.assertEqual(parsed.status, status)
            self.assertTrue(harness.transport.disconnecting)
            last = parsed.chunks[-1]
            self.assertRegex(last, rb'^(\n\n)?data: \{"error": \{')
            self.assertNotIn(b"[DONE]", last)
        if parsed.status != status:
            # aiproxy's own answer: never an internal error.
            self.assertIn(parsed.status, (502, 504), parsed.body[:200])
        self.assertNotIn(b"internal error", parsed.body)
        self.assertEqual(harness.failures(), [])
        self.assertEqual([c for c in harness.clock.getDelayedCalls() if c.active()], [])
        self.flushWarnings()


# -- through the daemon -------------------------------------------------------------------


class DaemonFuzzTests(TestCase):
    """
    Random requests through the real daemon.
    """

    async def test_requests(self) -> None:
        """
        A smaller number of random requests (methods, targets, headers,
        bodies) over real sockets: each gets a 4xx or a proxied answer,
        never a 5xx; the daemon prints no traceback, and the upstream only
        ever sees the route's path.
        """
        mock = await start_mock(self)
        routes = [
            proxy_route(
                mock,
                "chat",
                "/v1/chat/completions",
                max_req_body_size=4000,
                streaming_flush_interval_ms=0,
            ),
            proxy_route(mock, "prefix", "/v1/*"),
        ]
        daemon = await start_daemon(self, routes)
        port = daemon.port
        assert port is not None
        statuses: list[int] = []

        @fuzz(60)
        @given(_METHODS, _TARGETS, _HEADERS, _BODIES)
        def check(
            method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
        ) -> None:
            headers = [
                (name, value)
                for name, value in headers
                if name.lower() not in (b"content-length", b"transfer-encoding", b"expect")
            ]
            client = RawHTTPClient(port, timeout=10)
            try:
                client.sock.sendall(
                    raw_request(method, target, headers + [(b"Connection", b"close")], body)
                )
                head = client.read_head()
                response = client.read_body(head)
            finally:
                client.close()
            statuses.append(head.status)
            assert head.status == 200 or 400 <= head.status < 500, (
                head.status,
                response.body[:200],
            )

        await in_thread(check)
        self.assertEqual(len(statuses), 60)
        self.assertTrue(set(statuses) & {400, 404, 405})
        self.assertFalse(
            [line for line in daemon.lines if any(word in line for word in CRASH_WORDS)]
        )
        for record in mock.requests():
            # The route's path, or the client's for a passthrough body; the
            # route's host either way.
            self.assertTrue(record["path"].startswith("/v1/"), record["path"])
            self.assertEqual(record["headers"]["host"], [f"127.0.0.1:{mock.port}"])
        self.assertTrue(daemon.running)
