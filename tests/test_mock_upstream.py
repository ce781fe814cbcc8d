"""
Tests for L{aiproxy.testing.upstream}, over real loopback sockets.
"""

from __future__ import annotations

import json
import os
import sys
from base64 import b64decode
from collections.abc import Callable
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, Response, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

import aiproxy
from aiproxy.testing.upstream import (
    CREATED,
    DEFAULT_LISTEN,
    MockControls,
    MockStats,
    Options,
    _Delivery,
    _Reply,
    start_mock_upstream,
)

SSEEvent = tuple[str | None, str]


def parse_sse(raw: bytes) -> list[SSEEvent]:
    """
    @param raw: A complete Server-Sent Events body.
    @return: Its events as C{(event name, data)}; comment blocks are skipped.
    """
    text = raw.decode("utf-8").replace("\r\n", "\n")
    events: list[SSEEvent] = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        events.append((fields.get("event"), fields["data"]))
    return events


class BodyCollector(Protocol):
    """
    Collects a response body, one entry per C{dataReceived} call (one per
    HTTP chunk); L{done} fires when the body ends, L{reason} says why.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.reason = reason
        self.done.callback(None)

    @property
    def body_transport(self) -> IPushProducer:
        """
        The response body's transport: pause, resume or stop reading.
        """
        return IPushProducer(self.transport)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class LineWatcher(ProcessProtocol):
    """
    Fires L{first_line} with the first line a child process prints, and
    L{ended} when it exits.
    """

    def __init__(self) -> None:
        self.first_line: Deferred[bytes] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._out = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if b"\n" in self._out and not self.first_line.called:
            self.first_line.callback(self._out.split(b"\n", 1)[0])

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class MockUpstreamTests(TestCase):
    """
    The mock upstream over HTTP.
    """

    async def setUp(self) -> None:  # type: ignore[override]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.addCleanup(pool.closeCachedConnections)
        self.running = await start_mock_upstream(reactor)
        self.addCleanup(self.running.listening_port.stopListening)

    async def post(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[Response, BodyCollector, Failure]:
        """
        POST C{body} as JSON and read the whole answer.

        @return: The response, its body and the reason it ended.
        """
        sent: dict[str | bytes, str | bytes] = {"content-type": "application/json"}
        sent.update(headers or {})
        response = await self.http.post(
            self.running.url(path),
            data=json.dumps(body).encode("utf-8"),
            headers=sent,
            unbuffered=True,
        )
        collector = BodyCollector()
        response.deliverBody(collector)
        await collector.done
        assert collector.reason is not None
        return response, collector, collector.reason

    async def stream(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> list[SSEEvent]:
        """
        POST a streaming request and parse its complete answer.
        """
        response, collector, reason = await self.post(path, {"stream": True, **body}, headers)
        self.assertTrue(reason.check(ResponseDone), reason)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        return parse_sse(collector.body)

    async def get_json(self, path: str) -> Any:
        response = await self.http.get(self.running.url(path))
        return json.loads(await response.content())

    async def stats_when(self, ready: Any) -> dict[str, int]:
        """
        Poll C{/_mock/stats} until C{ready(stats)} holds, for up to 2 s.
        """
        for _ in range(200):
            stats = self.running.upstream.stats.as_dict()
            if ready(stats):
                return stats
            await deferLater(reactor, 0.01)
        self.fail(f"stats never got ready: {stats}")

    async def test_chat_stream_shape(self) -> None:
        """
        A streamed chat completion is a role chunk, one chunk per content
        piece, a finish chunk and C{[DONE]}; every chunk carries the id,
        object, created, echoed model and C{usage: null}.
        """
        events = await self.stream("/v1/chat/completions", {"model": "m1"})
        self.assertEqual(events[-1], (None, "[DONE]"))
        chunks = [json.loads(data) for _, data in events[:-1]]
        self.assertEqual(len(chunks), 7)
        for chunk in chunks:
            self.assertEqual(chunk["id"], "chatcmpl-mock-1")
            self.assertEqual(chunk["object"], "chat.completion.chunk")
            self.assertEqual(chunk["created"], CREATED)
            self.assertEqual(chunk["model"], "m1")
            self.assertIsNone(chunk["usage"])
        deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
        self.assertEqual(deltas[0], {"role": "assistant", "content": ""})
        self.assertEqual([d["content"] for d in deltas[1:6]], [f"tok{i} " for i in range(5)])
        self.assertEqual(deltas[6], {})
        self.assertEqual(chunks[6]["choices"][0]["finish_reason"], "stop")

    async def test_chat_stream_usage_when_asked(self) -> None:
        """
        With C{stream_options.include_usage} a usage chunk with no choices
        comes after the finish chunk and before C{[DONE]}; the model
        defaults to C{mock-model}.
        """
        events = await self.stream(
            "/v1/chat/completions?events=3", {"stream_options": {"include_usage": True}}
        )
        usage = json.loads(events[-2][1])
        self.assertEqual(usage["choices"], [])
        self.assertEqual(usage["model"], "mock-model")
        self.assertEqual(
            usage["usage"], {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
        )
        self.assertEqual(json.loads(events[-3][1])["choices"][0]["finish_reason"], "stop")

    async def test_usage_control_omits_usage_chunk(self) -> None:
        """
        C{usage=0} drops the usage chunk even when the request asks for it.
        """
        events = await self.stream(
            "/v1/chat/completions?usage=0", {"stream_options": {"include_usage": True}}
        )
        self.assertEqual(len(events), 8)
        self.assertTrue(all(json.loads(data)["choices"] for _, data in events[:-1]))

    async def test_chat_non_stream_shape(self) -> None:
        """
        Without C{stream} the answer is one C{chat.completion} with the whole
        text, usage and the mock's headers.
        """
        response, collector, _ = await self.post("/v1/chat/completions", {"model": "m2"})
        answer = json.loads(collector.body)
        self.assertEqual(answer["object"], "chat.completion")
        self.assertEqual(answer["model"], "m2")
        self.assertEqual(
            answer["choices"][0]["message"],
            {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 "},
        )
        self.assertEqual(answer["choices"][0]["finish_reason"], "stop")
        self.assertEqual(answer["usage"]["total_tokens"], 15)
        self.assertEqual(response.headers.getRawHeaders("x-request-id"), ["mock-1"])
        self.assertEqual(response.headers.getRawHeaders("x-ratelimit-remaining-requests"), ["99"])

    async def test_messages_stream_event_order(self) -> None:
        """
        A streamed Anthropic message is C{message_start},
        C{content_block_start}, one C{text_delta} per piece,
        C{content_block_stop}, C{message_delta} with the stop reason and
        usage, C{message_stop}; each data's type names its event.
        """
        events = await self.stream("/anthropic/v1/messages?events=2", {})
        names = [name for name, _ in events]
        self.assertEqual(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
        )
        datas = [json.loads(data) for _, data in events]
        self.assertEqual([data["type"] for data in datas], names)
        self.assertEqual(datas[2]["delta"], {"type": "text_delta", "text": "tok0 "})
        self.assertEqual(datas[5]["delta"]["stop_reason"], "end_turn")
        self.assertEqual(datas[5]["usage"], {"output_tokens": 2})
        self.assertEqual(datas[0]["message"]["usage"]["input_tokens"], 10)

    async def test_messages_non_stream_shape(self) -> None:
        """
        A non-streamed Anthropic message holds one text block and usage.
        """
        _, collector, _ = await self.post("/v1/messages?events=2", {"model": "claude"})
        answer = json.loads(collector.body)
        self.assertEqual(answer["type"], "message")
        self.assertEqual(answer["model"], "claude")
        self.assertEqual(answer["content"], [{"type": "text", "text": "tok0 tok1 "}])
        self.assertEqual(answer["usage"], {"input_tokens": 10, "output_tokens": 2})

    async def test_responses_stream(self) -> None:
        """
        A streamed Responses call is C{response.created}, one
        C{response.output_text.delta} per piece and C{response.completed}
        holding the output and usage.
        """
        events = await self.stream("/v1/responses?events=2", {"input": "hi"})
        self.assertEqual(
            [name for name, _ in events],
            ["response.created"] + ["response.output_text.delta"] * 2 + ["response.completed"],
        )
        completed = json.loads(events[-1][1])["response"]
        self.assertEqual(completed["output"][0]["content"][0]["text"], "tok0 tok1 ")
        self.assertEqual(completed["usage"]["output_tokens"], 2)

    async def test_responses_and_embeddings_non_stream(self) -> None:
        """
        Non-streamed Responses and embeddings calls answer JSON with usage.
        """
        _, collector, _ = await self.post("/v1/responses?events=1", {"input": "hi"})
        response = json.loads(collector.body)
        self.assertEqual(response["output"][0]["content"][0]["text"], "tok0 ")
        self.assertEqual(response["usage"]["total_tokens"], 11)
        _, collector, _ = await self.post("/v1/embeddings", {"input": "hi", "stream": True})
        embeddings = json.loads(collector.body)
        self.assertEqual(len(embeddings["data"][0]["embedding"]), 8)
        self.assertEqual(embeddings["usage"], {"prompt_tokens": 10, "total_tokens": 10})

    async def test_status_error(self) -> None:
        """
        C{status} answers that status with an OpenAI-shaped error body and,
        on 429, C{retry-after: 1}.
        """
        response, collector, _ = await self.post("/v1/chat/completions?status=429", {})
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(
            json.loads(collector.body),
            {"error": {"message": "mock error", "type": "mock", "code": 429}},
        )

    async def test_status_error_messages(self) -> None:
        """
        On C{/v1/messages} the error body has Anthropic's shape.
        """
        response, collector, _ = await self.post(
            "/v1/messages", {"stream": True}, {"x-mock-status": "529"}
        )
        self.assertEqual(response.code, 529)
        self.assertIsNone(response.headers.getRawHeaders("retry-after"))
        self.assertEqual(
            json.loads(collector.body),
            {"type": "error", "error": {"type": "mock", "message": "mock error"}},
        )

    async def test_endless_disconnect_counts_aborted(self) -> None:
        """
        An endless stream writes content events until the client closes the
        connection; then it counts as aborted and no longer open, and its
        timer is gone.
        """
        response = await self.http.post(
            self.running.url("/v1/chat/completions?endless=1&delay_ms=5"),
            data=b'{"stream": true}',
            unbuffered=True,
        )
        collector = BodyCollector()
        response.deliverBody(collector)
        stats = await self.stats_when(lambda s: s["events_sent"] >= 10)
        self.assertEqual(stats["streams_open"], 1)
        collector.body_transport.stopProducing()
        stats = await self.stats_when(lambda s: s["streams_aborted"] == 1)
        self.assertEqual(stats["streams_open"], 0)
        self.assertEqual(stats["streams_finished"], 0)
        self.assertEqual(stats["requests_aborted"], 1)
        sent = stats["events_sent"]
        await deferLater(reactor, 0.03)
        self.assertEqual(self.running.upstream.stats.events_sent, sent)

    async def test_controls_by_query_and_header(self) -> None:
        """
        Controls come from the query or from C{x-mock-*} headers, dashed or
        not; the header wins over the query.
        """
        by_query = await self.stream("/v1/chat/completions?events=2", {})
        by_header = await self.stream("/v1/chat/completions?events=2", {}, {"x-mock-events": "3"})
        underscore = await self.stream(
            "/v1/chat/completions?keepalive_comments=0",
            {},
            {"x-mock-keepalive_comments": "1", "x-mock-events": "1"},
        )
        self.assertEqual(len(by_query), 5)
        self.assertEqual(len(by_header), 6)
        self.assertEqual(len(underscore), 4)

    async def test_invalid_control(self) -> None:
        """
        A control value out of range answers 400 naming the control.
        """
        response, collector, _ = await self.post("/v1/chat/completions?burst=0", {})
        self.assertEqual(response.code, 400)
        self.assertIn("burst", json.loads(collector.body)["error"]["message"])

    async def test_invalid_body(self) -> None:
        """
        An API call whose body is not a JSON object answers 400.
        """
        response = await self.http.post(self.running.url("/v1/messages"), data=b"[1]")
        self.assertEqual(response.code, 400)
        self.assertEqual((await response.json())["type"], "error")

    async def test_requests_recorded(self) -> None:
        """
        C{/_mock/requests} lists the requests, most recent last, with the
        path and query, lower-cased headers as lists, and the body as text
        and base64; administrative requests are not recorded.
        """
        await self.post("/first", {})
        await self.post("/v1/chat/completions?x=1", {"model": "m"}, {"X-Custom": "v"})
        records = await self.get_json("/_mock/requests")
        self.assertEqual(
            [record["path"] for record in records], ["/first", "/v1/chat/completions?x=1"]
        )
        last = records[-1]
        self.assertEqual(last["method"], "POST")
        self.assertEqual(last["headers"]["x-custom"], ["v"])
        self.assertEqual(json.loads(last["body"]), {"model": "m"})
        self.assertEqual(b64decode(last["body_base64"]), last["body"].encode("utf-8"))

    async def test_echo(self) -> None:
        """
        Any other request is echoed back as JSON with status 200.
        """
        response = await self.http.put(
            self.running.url("/some/thing?a=1&a=2"),
            data=b"payload",
            headers=Headers({"x-h": ["1"]}),
        )
        self.assertEqual(response.code, 200)
        echo = await response.json()
        self.assertEqual(echo["method"], "PUT")
        self.assertEqual(echo["path"], "/some/thing")
        self.assertEqual(echo["query"], {"a": ["1", "2"]})
        self.assertEqual(echo["headers"]["x-h"], ["1"])
        self.assertEqual(echo["body"], "payload")

    async def test_crlf(self) -> None:
        """
        C{crlf=1} ends every line with CRLF and every event with
        C{\\r\\n\\r\\n}.
        """
        _, collector, _ = await self.post(
            "/v1/messages?crlf=1&events=1&keepalive_comments=1", {"stream": True}
        )
        raw = collector.body
        self.assertEqual(raw.count(b"\n"), raw.count(b"\r\n"))
        self.assertTrue(raw.startswith(b": keep-alive\r\n\r\nevent: message_start\r\ndata: "))
        self.assertTrue(raw.endswith(b"\r\n\r\n"))
        self.assertEqual(len(parse_sse(raw)), 6)

    async def test_truncate(self) -> None:
        """
        C{truncate=1} sends the opening and content events, then closes the
        connection without finish, usage or C{[DONE]}: the client sees an
        incomplete body, and the stream counts as truncated.
        """
        _, collector, reason = await self.post(
            "/v1/chat/completions?truncate=1&events=2",
            {"stream": True, "stream_options": {"include_usage": True}},
        )
        self.assertFalse(reason.check(ResponseDone))
        events = parse_sse(collector.body)
        self.assertEqual(len(events), 3)
        self.assertNotIn(b'finish_reason":"stop', collector.body)
        stats = await self.stats_when(lambda s: s["streams_truncated"] == 1)
        self.assertEqual(stats["streams_aborted"], 0)
        self.assertEqual(stats["streams_open"], 0)

    async def test_truncate_non_stream(self) -> None:
        """
        C{truncate=1} on a non-streamed call sends half the announced body.
        """
        _, collector, reason = await self.post("/v1/chat/completions?truncate=1", {})
        self.assertFalse(reason.check(ResponseDone))
        self.assertTrue(collector.body.startswith(b'{"id":"chatcmpl-mock-1"'))

    async def test_burst_and_split_events(self) -> None:
        """
        Each write is one HTTP chunk: C{burst} puts that many events in a
        chunk, C{split_events} sends every write as two chunks.
        """
        _, burst, _ = await self.post("/v1/chat/completions?events=4&burst=3", {"stream": True})
        self.assertEqual([len(parse_sse(chunk)) for chunk in burst.chunks], [3, 3, 1])
        _, split, _ = await self.post(
            "/v1/chat/completions?events=1&split_events=1", {"stream": True}
        )
        self.assertEqual(len(split.chunks), 8)
        self.assertFalse(split.chunks[0].endswith(b"\n\n"))
        self.assertEqual(len(parse_sse(split.body)), 4)

    async def test_text_and_tool_calls(self) -> None:
        """
        C{text} is split into C{events} pieces; C{tool_calls=1} streams the
        pieces of JSON arguments holding that text instead.
        """
        events = await self.stream("/v1/chat/completions?events=3&text=abcdefg", {})
        pieces = [json.loads(data)["choices"][0]["delta"]["content"] for _, data in events[1:4]]
        self.assertEqual(pieces, ["ab", "cd", "efg"])
        events = await self.stream("/v1/chat/completions?events=3&tool_calls=1", {})
        calls = [
            json.loads(data)["choices"][0]["delta"]["tool_calls"][0] for _, data in events[1:4]
        ]
        self.assertEqual(calls[0]["function"]["name"], "mock_tool")
        arguments = "".join(call["function"]["arguments"] for call in calls)
        self.assertEqual(json.loads(arguments), {"text": "tok0 tok1 tok2 "})
        finish = json.loads(events[4][1])["choices"][0]["finish_reason"]
        self.assertEqual(finish, "tool_calls")

    async def test_garbage_giant_line_content_type(self) -> None:
        """
        C{garbage} sends seeded pseudo-random bytes, the same each time;
        C{giant_line} one unterminated C{data:} line; C{content_type}
        replaces the content type.
        """
        _, first, _ = await self.post("/v1/chat/completions?garbage=64", {"stream": True})
        _, second, _ = await self.post("/v1/chat/completions?garbage=64", {"stream": True})
        self.assertEqual(len(first.body), 64)
        self.assertEqual(first.body, second.body)
        response, giant, reason = await self.post(
            "/v1/chat/completions?giant_line=1000&content_type=text/plain", {"stream": True}
        )
        self.assertTrue(reason.check(ResponseDone))
        self.assertEqual(giant.body, b"data: " + b"x" * 1000)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/plain"])

    async def test_stats_reset_and_chunks(self) -> None:
        """
        C{/_mock/stats} counts requests, events and streams; C{/chunks} is
        the event count of the latest stream; C{POST /_mock/reset} zeroes the
        counters and the request record, and numbering starts again.
        """
        await self.stream("/v1/chat/completions?events=2", {})
        await self.stream("/v1/chat/completions?events=1", {})
        await self.post("/v1/chat/completions", {})
        stats = await self.get_json("/_mock/stats")
        self.assertEqual(
            {key: stats[key] for key in ("requests", "events_sent", "streams_started")},
            {"requests": 3, "events_sent": 9, "streams_started": 2},
        )
        self.assertEqual((stats["streams_finished"], stats["streams_open"]), (2, 0))
        chunks = await self.http.get(self.running.url("/chunks"))
        self.assertEqual(await chunks.text(), "4")
        reset = await self.http.post(self.running.url("/_mock/reset"))
        self.assertEqual(set((await reset.json()).values()), {0})
        self.assertEqual(await self.get_json("/_mock/requests"), [])
        response, _, _ = await self.post("/v1/chat/completions", {})
        self.assertEqual(response.headers.getRawHeaders("x-request-id"), ["mock-1"])

    async def test_admin_wrong_method(self) -> None:
        """
        An administrative path called with the wrong method answers 405.
        """
        response = await self.http.get(self.running.url("/_mock/reset"))
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["POST"])

    async def test_backpressure(self) -> None:
        """
        A client that stops reading pauses an endless stream, which resumes
        when the client reads again: the mock never buffers without bound.
        """
        response = await self.http.post(
            self.running.url("/v1/chat/completions?endless=1&burst=500"),
            data=b'{"stream": true}',
            unbuffered=True,
        )
        collector = BodyCollector()
        response.deliverBody(collector)
        collector.body_transport.pauseProducing()
        self.addCleanup(collector.body_transport.stopProducing)
        paused = await self.events_when_steady()
        self.assertLess(paused, 100_000)
        collector.body_transport.resumeProducing()
        await self.stats_when(lambda s: s["events_sent"] > paused)

    async def events_when_steady(self) -> int:
        """
        Wait until C{events_sent} stops growing for 20 ms, for up to 2 s.

        @return: Its value then.
        """
        for _ in range(100):
            before = self.running.upstream.stats.events_sent
            await deferLater(reactor, 0.02)
            if self.running.upstream.stats.events_sent == before:
                return before
        self.fail("the stream never paused")


class DelayTests(TestCase):
    """
    The delay controls, with a mock driven by a L{Clock}.
    """

    async def setUp(self) -> None:  # type: ignore[override]
        self.clock = Clock()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.addCleanup(pool.closeCachedConnections)
        self.running = await start_mock_upstream(reactor, clock=self.clock)
        self.addCleanup(self.running.listening_port.stopListening)

    async def _until(self, ready: Callable[[MockStats], bool]) -> None:
        for _ in range(200):
            if ready(self.running.upstream.stats):
                return
            await deferLater(reactor, 0.005)
        self.fail("the mock never got there")

    async def test_first_delay(self) -> None:
        """
        C{first_delay_ms} holds the status and headers back.
        """
        answer = self.http.post(
            self.running.url("/v1/chat/completions?first_delay_ms=1000"), data=b"{}"
        )
        await self._until(lambda stats: stats.requests == 1)
        await deferLater(reactor, 0.02)
        self.assertNoResult(answer)
        self.clock.advance(1)
        response = await answer
        self.assertEqual(response.code, 200)

    async def test_leaving_during_first_delay(self) -> None:
        """
        A client leaving before the first byte aborts the stream and cancels
        its timer.
        """
        answer = self.http.post(
            self.running.url("/v1/chat/completions?first_delay_ms=1000"),
            data=b'{"stream":true}',
        )
        await self._until(lambda stats: stats.streams_open == 1)
        answer.cancel()
        self.failureResultOf(answer)
        await self._until(lambda stats: stats.streams_aborted == 1)
        self.assertEqual(self.running.upstream.stats.requests_aborted, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_body_delay_and_delay(self) -> None:
        """
        C{body_delay_ms} sends the headers at once and the first event after
        the delay; C{delay_ms} separates the writes.
        """
        response = await self.http.post(
            self.running.url("/v1/messages?body_delay_ms=500&delay_ms=100&events=1"),
            data=b'{"stream":true}',
            unbuffered=True,
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.running.upstream.stats.events_sent, 0)
        collector = BodyCollector()
        response.deliverBody(collector)
        self.clock.advance(0.5)
        self.assertEqual(self.running.upstream.stats.events_sent, 1)
        for _ in range(5):
            self.clock.advance(0.1)
        self.assertEqual(self.running.upstream.stats.events_sent, 6)
        await collector.done
        self.assertEqual(len(parse_sse(collector.body)), 6)


class UnitTests(SynchronousTestCase):
    """
    Parts of the mock that need no network.
    """

    def test_delivery_is_a_push_producer(self) -> None:
        """
        A delivery provides L{IPushProducer}.
        """
        delivery = _Delivery(
            cast(Request, DummyRequest([b""])),
            Clock(),
            MockStats(),
            _Reply(200, {}, b""),
            MockControls(),
        )
        self.assertTrue(verifyObject(IPushProducer, delivery))

    def test_options(self) -> None:
        """
        C{--port N} listens on loopback port N, C{--listen} takes any
        endpoint, the default is L{DEFAULT_LISTEN}, and both together are an
        error.
        """
        options = Options()
        options.parseOptions(["--port", "8"])
        self.assertEqual(options["listen"], "tcp:port=8:interface=127.0.0.1")
        options = Options()
        options.parseOptions(["--listen", "unix:/tmp/mock.sock"])
        self.assertEqual(options["listen"], "unix:/tmp/mock.sock")
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["listen"], DEFAULT_LISTEN)
        self.assertRaises(usage.UsageError, Options().parseOptions, ["-p", "1", "-l", "tcp:2"])
        self.assertRaises(usage.UsageError, Options().parseOptions, ["-p", "70000"])


class CommandLineTests(TestCase):
    """
    C{python -m aiproxy.testing.upstream}.
    """

    async def test_ready_line(self) -> None:
        """
        The command prints one line naming the address once it listens.
        """
        watcher = LineWatcher()
        process = reactor.spawnProcess(
            watcher,
            sys.executable,
            [sys.executable, "-m", "aiproxy.testing.upstream", "--port", "0"],
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(aiproxy.__file__))},
        )
        try:
            line = await watcher.first_line
        finally:
            process.signalProcess("TERM")
            await watcher.ended
        self.assertRegex(line.decode("ascii"), r"^mock upstream listening on 127\.0\.0\.1:\d+$")
