# -*- test-case-name: tests.test_timeouts -*-
"""
The timers of an L{aiproxy.proxy.Exchange}, driven by a L{Clock}:
C{first_token_timeout_ms}, C{stream_idle_timeout_ms} (with and without
C{stream_idle_timeout_counts_comments}), C{timeout} between reads,
C{max_stream_duration_ms} and the keep-alive comments of
C{keepalive_comment_interval_ms}; and the honest ending every early end
gets: before output an error status with a JSON body, after output a final
error event in the client's protocol, no C{[DONE]}, no terminating chunk,
and the status already sent left as it was.

The fake upstream, the gateway over a L{StringTransport} and the response
parser are those of C{tests.test_proxy}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from aiproxy.filters import Replace
from aiproxy.stream.sse import SSEDecoder
from tests.test_proxy import (
    CHAT,
    CHAT_STREAM,
    DONE,
    USAGE,
    FakeResponse,
    Gateway,
    ScriptedFilter,
    delta,
    json_response,
    make_table,
    stream_response,
    with_body_filters,
)

#: What the upstream sends as its own keep-alive.
UPSTREAM_COMMENT = b": keep-alive\n\n"


def gateway_for(testcase: SynchronousTestCase, **proxy: Any) -> Gateway:
    """
    A gateway whose route has the given C{ai-proxy} fields, writing each
    chunk at once unless told otherwise.
    """
    proxy.setdefault("streaming_flush_interval_ms", 0)
    return Gateway(testcase, make_table(proxy))


def events_of(body: bytes) -> list[Any]:
    """
    The SSE events a client decodes from C{body}.
    """
    return SSEDecoder().feed(body)


def error_events(body: bytes) -> list[dict[str, Any]]:
    """
    The OpenAI-shaped error events in C{body}, decoded.
    """
    found = []
    for event in events_of(body):
        try:
            document = json.loads(event.data)
        except ValueError:
            continue
        if isinstance(document, dict) and "error" in document:
            found.append(document["error"])
    return found


class HonestEndingCase(SynchronousTestCase):
    """
    Assertions about how a response ended.
    """

    def assert_error_status(self, gateway: Gateway, status: int, message: str, reason: str) -> None:
        """
        Nothing had been sent: the client got C{status} with
        C{{"message": message}}, and the record names C{reason}.
        """
        response = gateway.response()
        self.assertEqual(response.status, status)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.json(), {"message": message})
        self.assertTrue(response.complete)
        self.assertEqual(gateway.record["status"], status)
        self.assertEqual(gateway.record["abort_reason"], reason)

    def assert_cut(self, gateway: Gateway, reason: str, status: int = 200) -> dict[str, Any]:
        """
        Output had started: the status sent stays, the body ends with one
        error event naming C{reason} and no C{[DONE]}, the connection is
        closed without the terminating chunk, and once the connection is
        gone no timer is left and the access record stays the only one.

        @return: the error event's C{error} object.
        """
        self.assertEqual(gateway.raw.count(b"HTTP/1.1 "), 1)
        response = gateway.response()
        self.assertEqual(response.status, status)
        self.assertFalse(response.complete)
        self.assertTrue(gateway.closed)
        self.assertNotIn(b"[DONE]", response.body)
        errors = error_events(response.body)
        self.assertEqual(len(errors), 1, response.body)
        self.assertEqual(errors[0]["code"], reason)
        self.assertEqual(
            events_of(response.body)[-1].data, json.dumps({"error": errors[0]}).encode()
        )
        self.assertEqual(gateway.record["status"], status)
        self.assertEqual(gateway.record["abort_reason"], reason)
        gateway.disconnect()
        self.assertEqual(gateway.pending_timers(), [])
        self.assertEqual(len(gateway.access_records()), 1)
        return errors[0]


class FirstTokenTimeoutTests(HonestEndingCase):
    """
    C{first_token_timeout_ms}: from the start of the request to the first
    event of a stream (comments do not count) or the first byte of a whole
    response.
    """

    def test_no_response_headers(self) -> None:
        """
        An upstream that does not even answer: 504 at the deadline, not a
        moment before, and the upstream request is cancelled.
        """
        gateway = gateway_for(self, first_token_timeout_ms=1000)
        gateway.send(CHAT_STREAM)
        gateway.clock.advance(0.999)
        self.assertEqual(gateway.raw, b"")
        gateway.clock.advance(0.001)
        self.assert_error_status(
            gateway, 504, "first_token_timeout_ms exceeded", "first_token_timeout_ms"
        )
        self.assertTrue(gateway.upstream.cancelled)
        self.assertEqual(gateway.pending_timers(), [])

    def test_headers_without_body(self) -> None:
        """
        Headers arrived but no byte of the body: 504, and the upstream body
        transfer is stopped.
        """
        gateway = gateway_for(self, first_token_timeout_ms=1000)
        upstream = gateway.stream()
        gateway.clock.advance(1)
        self.assert_error_status(
            gateway, 504, "first_token_timeout_ms exceeded", "first_token_timeout_ms"
        )
        self.assertTrue(upstream.transport.stopped)

    def test_measured_from_request_start(self) -> None:
        """
        The wait counts from the request, not from the response headers.
        """
        gateway = gateway_for(self, first_token_timeout_ms=1000)
        gateway.send(CHAT_STREAM)
        gateway.clock.advance(0.8)
        upstream = gateway.answer(stream_response())
        gateway.clock.advance(0.2)
        self.assert_error_status(
            gateway, 504, "first_token_timeout_ms exceeded", "first_token_timeout_ms"
        )
        self.assertTrue(upstream.transport.stopped)

    def test_first_event_stops_it(self) -> None:
        """
        Once an event arrived the timer is gone: a stream much longer than
        the timeout completes.
        """
        gateway = gateway_for(self, first_token_timeout_ms=1000)
        upstream = gateway.stream()
        gateway.clock.advance(0.5)
        upstream.data(delta("a"))
        for _ in range(5):
            gateway.clock.advance(0.9)
            upstream.data(delta("b"))
        upstream.data(USAGE, DONE)
        upstream.end()
        response = gateway.response()
        self.assertTrue(response.complete)
        self.assertIsNone(gateway.record["abort_reason"])

    def test_upstream_comments_do_not_count(self) -> None:
        """
        Comments from the upstream are relayed (so output starts) but are
        not a first token: at the deadline the stream ends with an error
        event after them.
        """
        gateway = gateway_for(self, first_token_timeout_ms=1000)
        upstream = gateway.stream()
        upstream.data(UPSTREAM_COMMENT)
        gateway.clock.advance(0.5)
        upstream.data(UPSTREAM_COMMENT)
        gateway.clock.advance(0.5)
        error = self.assert_cut(gateway, "first_token_timeout_ms")
        self.assertEqual(error["message"], "first_token_timeout_ms exceeded")
        self.assertTrue(gateway.response().body.startswith(UPSTREAM_COMMENT * 2))
        self.assertTrue(upstream.transport.stopped)

    def test_whole_response_first_byte(self) -> None:
        """
        A non-streamed response whose first byte came in time is not cut
        by the timer, however long the rest takes (within C{timeout}).
        """
        gateway = gateway_for(self, first_token_timeout_ms=1000)
        gateway.send(CHAT)
        upstream = gateway.answer(json_response(b""))
        gateway.clock.advance(0.5)
        upstream.data(b'{"choices": [], ')
        gateway.clock.advance(2)
        upstream.data(b'"model": "m"}')
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json(), {"choices": [], "model": "m"})

    def test_whole_response_too_late(self) -> None:
        """
        A non-streamed response with no byte by the deadline: 504.
        """
        gateway = gateway_for(self, first_token_timeout_ms=1000)
        gateway.send(CHAT)
        upstream = gateway.answer(json_response(b""))
        gateway.clock.advance(1)
        self.assert_error_status(
            gateway, 504, "first_token_timeout_ms exceeded", "first_token_timeout_ms"
        )
        self.assertTrue(upstream.transport.stopped)


class StreamIdleTimeoutTests(HonestEndingCase):
    """
    C{stream_idle_timeout_ms}: the longest gap between upstream chunks of a
    stream; chunks holding only comments do not count unless
    C{stream_idle_timeout_counts_comments}, nor does time the client kept
    the stream paused.
    """

    def test_gap_after_output(self) -> None:
        """
        Gaps shorter than the timeout pass; the first one as long ends the
        stream with an error event, the status already sent untouched.
        """
        gateway = gateway_for(self, stream_idle_timeout_ms=1000)
        upstream = gateway.stream()
        for _ in range(4):
            gateway.clock.advance(0.999)
            upstream.data(delta("a"))
        gateway.clock.advance(0.999)
        self.assertFalse(gateway.closed)
        gateway.clock.advance(0.001)
        error = self.assert_cut(gateway, "stream_idle_timeout_ms")
        self.assertEqual(error["message"], "stream_idle_timeout_ms exceeded")
        self.assertEqual(len(events_of(gateway.response().body)), 5)
        self.assertTrue(upstream.transport.stopped)

    def test_before_output(self) -> None:
        """
        A stream whose body does not start within the timeout: 504 with a
        JSON body (counted from the response headers).
        """
        gateway = gateway_for(self, stream_idle_timeout_ms=1000)
        upstream = gateway.stream()
        gateway.clock.advance(1)
        self.assert_error_status(
            gateway, 504, "stream_idle_timeout_ms exceeded", "stream_idle_timeout_ms"
        )
        self.assertTrue(upstream.transport.stopped)

    def test_upstream_comments_do_not_reset(self) -> None:
        """
        An upstream that only sends keep-alive comments after its last
        event is idle: they are relayed, and the stream is cut one timeout
        after the last event.
        """
        gateway = gateway_for(self, stream_idle_timeout_ms=1000)
        upstream = gateway.stream()
        upstream.data(delta("a"))
        gateway.clock.advance(0.4)
        upstream.data(UPSTREAM_COMMENT)
        gateway.clock.advance(0.4)
        upstream.data(UPSTREAM_COMMENT)
        gateway.clock.advance(0.199)
        self.assertFalse(gateway.closed)
        gateway.clock.advance(0.001)
        self.assert_cut(gateway, "stream_idle_timeout_ms")
        self.assertEqual(gateway.response().body.count(UPSTREAM_COMMENT), 2)

    def test_upstream_comments_reset_when_configured(self) -> None:
        """
        With C{stream_idle_timeout_counts_comments}, the upstream's comments
        keep the stream alive like any chunk.
        """
        gateway = gateway_for(
            self, stream_idle_timeout_ms=1000, stream_idle_timeout_counts_comments=True
        )
        upstream = gateway.stream()
        upstream.data(delta("a"))
        for _ in range(10):
            gateway.clock.advance(0.9)
            upstream.data(UPSTREAM_COMMENT)
        self.assertFalse(gateway.closed)
        upstream.data(delta("b"), USAGE, DONE)
        upstream.end()
        self.assertTrue(gateway.response().complete)
        self.assertIsNone(gateway.record["abort_reason"])

    def test_slow_event_is_activity(self) -> None:
        """
        One large event arriving in pieces, each within the timeout, is not
        an idle upstream even though no event completes for a long time.
        """
        gateway = gateway_for(self, stream_idle_timeout_ms=1000)
        upstream = gateway.stream()
        upstream.data(delta("a"))
        big = delta("x" * 600)
        pieces = [big[i : i + 100] for i in range(0, len(big), 100)]
        for piece in pieces:
            gateway.clock.advance(0.9)
            upstream.data(piece)
        gateway.clock.advance(0.9)
        upstream.data(USAGE, DONE)
        upstream.end()
        self.assertTrue(gateway.response().complete)
        self.assertIsNone(gateway.record["abort_reason"])

    def test_comment_split_from_event(self) -> None:
        """
        A chunk that ends a comment and starts an event counts: only chunks
        holding nothing but comments and blank lines are not activity.
        """
        gateway = gateway_for(self, stream_idle_timeout_ms=1000)
        upstream = gateway.stream()
        upstream.data(delta("a"))
        gateway.clock.advance(0.9)
        upstream.data(b': ping\n\ndata: {"choi')
        gateway.clock.advance(0.9)
        self.assertFalse(gateway.closed)
        upstream.data(b'ces": []}\n\n', DONE)
        upstream.end()
        self.assertTrue(gateway.response().complete)

    def test_paused_by_client_is_not_idle(self) -> None:
        """
        While the client's connection keeps the upstream paused, the
        upstream's silence is ours: no cut however long; on resume the
        whole timeout is ahead again.
        """
        gateway = gateway_for(self, stream_idle_timeout_ms=1000)
        upstream = gateway.stream()
        upstream.data(delta("a"))
        gateway.clock.advance(0.5)
        gateway.pause()
        gateway.clock.advance(30)
        self.assertFalse(gateway.closed)
        self.assertFalse(upstream.transport.stopped)
        gateway.resume()
        gateway.clock.advance(0.999)
        self.assertFalse(gateway.closed)
        gateway.clock.advance(0.001)
        self.assert_cut(gateway, "stream_idle_timeout_ms")

    def test_not_for_whole_responses(self) -> None:
        """
        A non-streamed response is bounded by C{timeout} per read, not by
        the stream idle timeout.
        """
        gateway = gateway_for(self, stream_idle_timeout_ms=1000, timeout=5000)
        gateway.send(CHAT)
        upstream = gateway.answer(json_response(b""))
        upstream.data(b'{"choices": [],')
        gateway.clock.advance(3)
        upstream.data(b' "model": "m"}')
        upstream.end()
        self.assertEqual(gateway.response().status, 200)


class ReadTimeoutTests(HonestEndingCase):
    """
    The per-operation C{timeout} between two reads of the body, next to
    the stream timers.
    """

    def test_comments_count_as_reads(self) -> None:
        """
        Unlike the idle timeout, C{timeout} is about the socket: any chunk,
        a comment too, is a read.
        """
        gateway = gateway_for(self, timeout=1000)
        upstream = gateway.stream()
        upstream.data(delta("a"))
        for _ in range(5):
            gateway.clock.advance(0.9)
            upstream.data(UPSTREAM_COMMENT)
        self.assertFalse(gateway.closed)
        gateway.clock.advance(1)
        error = self.assert_cut(gateway, "timeout")
        self.assertEqual(error["message"], "upstream read timed out")

    def test_idle_shorter_than_timeout(self) -> None:
        """
        Both run: the shorter one ends the stream.
        """
        gateway = gateway_for(self, timeout=5000, stream_idle_timeout_ms=2000)
        upstream = gateway.stream()
        upstream.data(delta("a"))
        gateway.clock.advance(2)
        self.assert_cut(gateway, "stream_idle_timeout_ms")
        self.assertTrue(upstream.transport.stopped)


class DurationTimerTests(HonestEndingCase):
    """
    C{max_stream_duration_ms} is a timer: it ends a stream whose upstream is
    silent, or whose client is slow, without waiting for a chunk.
    """

    def test_silent_after_output(self) -> None:
        """
        Events, then silence: the stream is cut at the limit exactly.
        """
        gateway = gateway_for(self, max_stream_duration_ms=3000)
        upstream = gateway.stream()
        upstream.data(delta("a"), delta("b"))
        gateway.clock.advance(2.999)
        self.assertFalse(gateway.closed)
        gateway.clock.advance(0.001)
        error = self.assert_cut(gateway, "max_stream_duration_ms")
        self.assertEqual(error["message"], "max_stream_duration_ms exceeded")
        self.assertTrue(upstream.transport.stopped)

    def test_busy_upstream(self) -> None:
        """
        An upstream that never stops talking is cut at the limit too.
        """
        gateway = gateway_for(self, max_stream_duration_ms=1000)
        upstream = gateway.stream()
        for _ in range(7):
            upstream.data(delta("a"))
            gateway.clock.advance(0.125)
        upstream.data(delta("a"))
        self.assertFalse(gateway.closed)
        gateway.clock.advance(0.125)
        self.assert_cut(gateway, "max_stream_duration_ms")

    def test_runs_while_client_paused(self) -> None:
        """
        A client too slow to take the stream in time has it cut: a pause
        does not stop this timer.
        """
        gateway = gateway_for(self, max_stream_duration_ms=1000)
        upstream = gateway.stream()
        upstream.data(delta("a"))
        gateway.pause()
        gateway.clock.advance(1)
        self.assert_cut(gateway, "max_stream_duration_ms")
        self.assertTrue(upstream.transport.stopped)


class KeepaliveCommentTests(HonestEndingCase):
    """
    C{keepalive_comment_interval_ms}: C{:} comments to a streaming client
    until the upstream's first body byte.
    """

    def test_comments_until_first_byte(self) -> None:
        """
        One comment per interval, the first committing a 200 event stream;
        none once the upstream's body started, and the upstream's bytes
        follow them unchanged.
        """
        gateway = gateway_for(self, keepalive_comment_interval_ms=500)
        gateway.send(CHAT_STREAM)
        gateway.clock.advance(0.25)
        self.assertEqual(gateway.raw, b"")
        gateway.clock.advance(0.25)
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "text/event-stream")
        self.assertEqual(response.header("cache-control"), "no-cache")
        self.assertEqual(response.header("x-accel-buffering"), "no")
        self.assertEqual(response.chunks, [b":\n\n"])
        gateway.clock.pump([0.25] * 4)
        self.assertEqual(gateway.response().chunks, [b":\n\n"] * 3)
        upstream = gateway.answer(stream_response())
        gateway.clock.advance(0.5)
        self.assertEqual(gateway.response().chunks, [b":\n\n"] * 4)
        upstream.data(delta("a"))
        gateway.clock.pump([0.25] * 20)
        upstream.data(USAGE, DONE)
        upstream.end()
        response = gateway.response()
        self.assertTrue(response.complete)
        self.assertEqual(response.chunks, [b":\n\n"] * 4 + [delta("a"), USAGE, DONE])
        self.assertEqual(gateway.raw.count(b"HTTP/1.1 "), 1)
        self.assertIsNone(gateway.record["abort_reason"])
        self.assertEqual(gateway.pending_timers(), [])

    def test_not_inside_an_event(self) -> None:
        """
        The upstream's first bytes may be part of an event: no comment is
        written after them, however long the rest takes.
        """
        gateway = gateway_for(self, keepalive_comment_interval_ms=500)
        upstream = gateway.stream()
        upstream.data(b'data: {"choices": [{"delta": {"content": "a')
        gateway.clock.pump([0.25] * 20)
        upstream.data(b'"}}]}\n\n', DONE)
        upstream.end()
        response = gateway.response()
        self.assertTrue(response.complete)
        self.assertNotIn(b":\n\n", response.body)
        self.assertEqual(len(events_of(response.body)), 2)

    def test_not_for_non_stream_requests(self) -> None:
        """
        A client that did not ask for a stream gets no comments: its
        response is one JSON document.
        """
        gateway = gateway_for(self, keepalive_comment_interval_ms=500)
        gateway.send(CHAT)
        gateway.clock.pump([0.25] * 12)
        self.assertEqual(gateway.raw, b"")
        upstream = gateway.answer(json_response(b""))
        upstream.data(b'{"choices": []}')
        upstream.end()
        self.assertEqual(gateway.response().json(), {"choices": []})

    def test_never_reach_filters_or_usage(self) -> None:
        """
        The comments are written past the body filters and the observers:
        a filter sees only the upstream's bytes, the text and the usage
        are the upstream's, and the tokens counted are its own.
        """
        seen_chunks: list[bytes] = []

        def on_chunk(chunk: bytes, context: Any) -> Any:
            seen_chunks.append(chunk)
            return Replace(chunk)

        body_filter = ScriptedFilter(on_chunk)
        gateway = Gateway(
            self,
            with_body_filters(
                make_table(
                    {"keepalive_comment_interval_ms": 125, "streaming_flush_interval_ms": 0}
                ),
                body_filter,
            ),
        )
        gateway.send(CHAT_STREAM)
        gateway.clock.pump([0.125] * 10)
        upstream = gateway.answer(stream_response())
        upstream.data(delta("hello "), delta("world"), USAGE, DONE)
        upstream.end()
        self.assertEqual(seen_chunks, [delta("hello "), delta("world"), USAGE, DONE])
        self.assertEqual(body_filter.finished[0]["text"], "hello world")
        self.assertEqual(body_filter.finished[0]["usage"]["completion_tokens"], 3)
        record = gateway.record
        self.assertEqual(
            (record["prompt_tokens"], record["completion_tokens"], record["total_tokens"]),
            (7, 3, 10),
        )
        response = gateway.response()
        self.assertEqual(response.chunks[:10], [b":\n\n"] * 10)
        self.assertEqual(
            b"".join(response.chunks[10:]), delta("hello ") + delta("world") + USAGE + DONE
        )

    def test_upstream_error_status_after_comments(self) -> None:
        """
        An upstream answering 429 after comments committed a 200: the 200
        stays, and the 429 is told in-band with the upstream's message.
        """
        gateway = gateway_for(self, keepalive_comment_interval_ms=500)
        gateway.send(CHAT_STREAM)
        gateway.clock.advance(0.5)
        upstream = gateway.answer(json_response(b"", code=429))
        upstream.data(json.dumps({"error": {"message": "slow down"}}).encode())
        upstream.end()
        error = self.assert_cut(gateway, "upstream_error")
        self.assertEqual(error["message"], "upstream returned status 429: slow down")

    def test_empty_stream_after_comments(self) -> None:
        """
        A stream that ends without a byte after comments were sent is not a
        clean (empty) success: it ends with an error event.
        """
        gateway = gateway_for(self, keepalive_comment_interval_ms=500)
        gateway.send(CHAT_STREAM)
        gateway.clock.advance(0.5)
        upstream = gateway.answer(stream_response())
        upstream.end()
        error = self.assert_cut(gateway, "upstream_error")
        self.assertEqual(error["message"], "upstream returned an empty stream")

    def test_first_token_timeout_after_comments(self) -> None:
        """
        The first-token deadline passing after comments: an error event
        (the status is sent), not a 504.
        """
        gateway = gateway_for(self, keepalive_comment_interval_ms=375, first_token_timeout_ms=1000)
        gateway.send(CHAT_STREAM)
        gateway.clock.pump([0.125] * 8)
        self.assert_cut(gateway, "first_token_timeout_ms")
        self.assertEqual(gateway.response().body.count(b":\n\n"), 2)
        self.assertTrue(gateway.upstream.cancelled)

    def test_client_leaves_while_waiting(self) -> None:
        """
        A client that leaves during the comments: the upstream request is
        cancelled, the comments stop, the record says 499.
        """
        gateway = gateway_for(self, keepalive_comment_interval_ms=500)
        gateway.send(CHAT_STREAM)
        gateway.clock.pump([0.5, 0.5])
        self.assertEqual(gateway.response().chunks, [b":\n\n"] * 2)
        gateway.disconnect()
        self.assertTrue(gateway.upstream.cancelled)
        self.assertEqual(gateway.pending_timers(), [])
        self.assertEqual(gateway.record["status"], 499)
        self.assertEqual(gateway.record["abort_reason"], "client_disconnect")


class HonestEndingTests(HonestEndingCase):
    """
    However a stream ends early, the client can tell: an error event in its
    protocol that it can decode, no C{[DONE]}, no clean end.
    """

    def test_upstream_cut_inside_event(self) -> None:
        """
        The upstream connection lost in the middle of an event: the partial
        event is closed off by a blank line so that the error event after it
        is an event of its own.
        """
        gateway = gateway_for(self)
        upstream = gateway.stream()
        upstream.data(delta("a"), b'data: {"choices": [{"delta": {"cont')
        upstream.end(ResponseFailed([Failure(ConnectionLost())]))
        error = self.assert_cut(gateway, "upstream_error")
        self.assertEqual(
            error["message"], "upstream closed the connection before the response was complete"
        )
        self.assertIn(b'"cont\n\ndata: {"error"', gateway.response().body)

    def test_error_event_after_whole_event(self) -> None:
        """
        A cut between events adds no blank line: the error event follows the
        last one directly.
        """
        gateway = gateway_for(self)
        upstream = gateway.stream()
        upstream.data(delta("a"))
        upstream.end(ResponseFailed([Failure(ConnectionLost())]))
        self.assert_cut(gateway, "upstream_error")
        self.assertTrue(gateway.response().body.startswith(delta("a") + b'data: {"error"'))

    def test_clean_close_without_done(self) -> None:
        """
        An OpenAI chat stream whose upstream closed cleanly without
        C{[DONE]} was cut short all the same.
        """
        gateway = gateway_for(self)
        upstream = gateway.stream()
        upstream.data(delta("a"), USAGE)
        upstream.end()
        error = self.assert_cut(gateway, "upstream_incomplete")
        self.assertEqual(
            error["message"], "upstream ended the stream without its end-of-stream event"
        )

    def test_anthropic_client(self) -> None:
        """
        An Anthropic Messages client gets C{event: error} in its own shape.
        """
        route = {
            "id": "messages",
            "uri": "/v1/messages",
            "plugins": {
                "ai-proxy": {
                    "provider": "anthropic",
                    "auth": {"header": {"x-api-key": "sk-ant-test"}},
                    "override": {"endpoint": "http://upstream.test/v1/messages"},
                    "streaming_flush_interval_ms": 0,
                    "stream_idle_timeout_ms": 1000,
                }
            },
        }
        gateway = Gateway(self, make_table(routes=[route]))
        gateway.send(
            {
                "model": "claude",
                "max_tokens": 10,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
            path=b"/v1/messages",
        )
        upstream = gateway.answer(stream_response())
        upstream.data(
            b'event: message_start\ndata: {"type": "message_start", "message": {"model": "claude"}}\n\n'
        )
        gateway.clock.advance(1)
        body = gateway.response().body
        self.assertFalse(gateway.response().complete)
        self.assertTrue(gateway.closed)
        last = events_of(body)[-1]
        self.assertEqual(last.event, "error")
        self.assertEqual(
            json.loads(last.data),
            {
                "type": "error",
                "error": {"type": "api_error", "message": "stream_idle_timeout_ms exceeded"},
            },
        )
        self.assertEqual(gateway.record["abort_reason"], "stream_idle_timeout_ms")
        self.assertTrue(upstream.transport.stopped)

    def test_filter_failing_at_the_end(self) -> None:
        """
        A body filter raising in its final call: the response ends with an
        error event instead of leaving the client waiting.
        """

        def boom(context: Any) -> Any:
            raise RuntimeError("filter bug")

        gateway = Gateway(
            self,
            with_body_filters(
                make_table({"streaming_flush_interval_ms": 0}), ScriptedFilter(on_finish=boom)
            ),
        )
        upstream = gateway.stream()
        upstream.data(delta("a"), DONE)
        upstream.end()
        response = gateway.response()
        self.assertFalse(response.complete)
        self.assertTrue(gateway.closed)
        self.assertEqual(error_events(response.chunks[-1])[0]["code"], "internal_error")
        self.assertEqual(gateway.record["abort_reason"], "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_filter_failing_at_the_end_of_whole_response(self) -> None:
        """
        The same for a non-streamed response: 502 with a JSON body.
        """

        def boom(context: Any) -> Any:
            raise RuntimeError("filter bug")

        gateway = Gateway(self, with_body_filters(make_table(), ScriptedFilter(on_finish=boom)))
        gateway.send(CHAT)
        upstream = gateway.answer(json_response(b""))
        upstream.data(b'{"choices": []}')
        upstream.end()
        self.assert_error_status(
            gateway, 502, "internal error while relaying the response", "internal_error"
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_limits_leave_status_alone(self) -> None:
        """
        Whatever ends the stream after output, the one status line sent is
        the upstream's.
        """
        for fields, act, reason in [
            (
                {"max_response_bytes": 100},
                lambda g, u: u.data(delta("x" * 200)),
                "max_response_bytes",
            ),
            (
                {"max_stream_duration_ms": 100},
                lambda g, u: g.clock.advance(0.1),
                "max_stream_duration_ms",
            ),
            ({"timeout": 100}, lambda g, u: g.clock.advance(0.1), "timeout"),
        ]:
            gateway = gateway_for(self, **fields)
            gateway.send(CHAT_STREAM)
            upstream = gateway.answer(FakeResponse(201, {b"content-type": [b"text/event-stream"]}))
            upstream.data(delta("a"))
            act(gateway, upstream)
            self.assert_cut(gateway, reason, status=201)
            self.assertTrue(upstream.transport.stopped)
