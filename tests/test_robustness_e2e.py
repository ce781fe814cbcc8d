# -*- test-case-name: tests.test_robustness_e2e -*-
"""
Robustness through the real daemon (C{twistd -n aiproxy}) and the mock
upstream: the stream timeouts, keep-alive comments as a raw client sees
them, honest endings (an error event, never a C{[DONE]}, the reason in the
access record) and an upstream sending garbage, giant lines and wrong
content types without harming the daemon.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from aiproxy.stream.sse import SSEDecoder
from tests.daemon import (
    RawHTTPClient,
    RawResponse,
    in_thread,
    proxy_route,
    start_daemon,
    start_mock,
    wait_until,
)

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
CHAT_STREAM = {**CHAT, "stream": True}
MESSAGES_STREAM = {
    "model": "claude-test",
    "max_tokens": 32,
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}

#: Words that must never appear in what the daemon prints.
CRASH_WORDS = ("Traceback", "Unhandled Error", "Unhandled error")


def call(
    port: int,
    path: str,
    body: Any = CHAT_STREAM,
    mock: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[RawResponse, float]:
    """
    One request on a new connection (blocking): the response, and the
    seconds it took.
    """
    started = time.monotonic()
    client = RawHTTPClient(port, timeout)
    try:
        client.send_request("POST", path, body, {f"x-mock-{k}": v for k, v in (mock or {}).items()})
        response = client.read_body(client.read_head())
    finally:
        client.close()
    return response, time.monotonic() - started


def events(response: RawResponse) -> list[Any]:
    """
    The SSE events of a response body, as a client decodes them.
    """
    return SSEDecoder().feed(response.body)


class EndingCase(TestCase):
    """
    Assertions about how a streamed response ended.
    """

    def assert_honest_cut(
        self, response: RawResponse, code: str, message: str | None = None
    ) -> dict[str, Any]:
        """
        The stream's status stayed 200; its body ends with one OpenAI error
        event naming C{code}, has no C{[DONE]}, and the connection closed
        without the terminating chunk.
        """
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete)
        decoded = events(response)
        self.assertNotIn(b"[DONE]", [event.data for event in decoded])
        error = json.loads(decoded[-1].data)["error"]
        self.assertEqual(error["code"], code)
        if message is not None:
            self.assertEqual(error["message"], message)
        return error

    def assert_error_status(self, response: RawResponse, status: int, message: str) -> None:
        """
        Nothing had been sent: C{status} with C{{"message": message}}.
        """
        self.assertEqual(response.status, status)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertEqual(response.json(), {"message": message})

    def assert_records(
        self, records: list[dict[str, Any]], expected: list[tuple[str, int, str | None]]
    ) -> None:
        """
        The access records are these C{(path, status, abort_reason)}, in
        any order.
        """
        got = Counter((r["path"], r["status"], r["abort_reason"]) for r in records)
        self.assertEqual(got, Counter(expected))


class TimeoutTests(EndingCase):
    """
    C{first_token_timeout_ms}, C{stream_idle_timeout_ms} (with and without
    counting the upstream's comments), C{timeout} between reads and
    C{max_stream_duration_ms} on a silent upstream, each before and after
    output.
    """

    async def test_timeouts(self) -> None:
        """
        Each timeout ends the request at its deadline (well before the
        upstream would have gone on), with a 504 and a JSON body before
        output and an error event after it; streams within the limits
        complete; every aborted upstream stream is closed.
        """
        mock = await start_mock(self)
        fast: dict[str, Any] = {"streaming_flush_interval_ms": 0}
        routes = [
            proxy_route(mock, "ft", "/ft", first_token_timeout_ms=400, **fast),
            proxy_route(mock, "idle", "/idle", stream_idle_timeout_ms=400, **fast),
            proxy_route(
                mock,
                "idle-comments",
                "/idle-comments",
                stream_idle_timeout_ms=400,
                stream_idle_timeout_counts_comments=True,
                **fast,
            ),
            proxy_route(mock, "read", "/read", timeout=400, **fast),
            proxy_route(mock, "dur", "/dur", max_stream_duration_ms=500, **fast),
        ]
        daemon = await start_daemon(self, routes)
        port = daemon.port
        assert port is not None
        cases: list[tuple[str, dict[str, str]]] = [
            ("/ft", {"first-delay-ms": "3000"}),  # 0: no headers
            ("/ft", {"body-delay-ms": "3000"}),  # 1: headers, no body
            ("/ft", {"keepalive-comments": "20", "delay-ms": "100"}),  # 2: only comments
            ("/ft", {"events": "20", "delay-ms": "50"}),  # 3: in time
            ("/idle", {"events": "3", "delay-ms": "1500"}),  # 4: a gap after output
            ("/idle", {"events": "20", "delay-ms": "50"}),  # 5: no gap
            (
                "/idle",
                {"keepalive-comments": "12", "delay-ms": "100"},
            ),  # 6: comments are not activity
            (
                "/idle-comments",
                {"keepalive-comments": "12", "delay-ms": "100"},
            ),  # 7: unless configured
            ("/read", {"body-delay-ms": "3000"}),  # 8: no body byte
            ("/read", {"events": "3", "delay-ms": "1500"}),  # 9: a read too late
            ("/dur", {"events": "3", "delay-ms": "3000"}),  # 10: silent after output
            ("/dur", {"body-delay-ms": "3000"}),  # 11: silent before output
        ]
        results = await gatherResults(
            [in_thread(call, port, path, CHAT_STREAM, controls) for path, controls in cases]
        )
        responses = [response for response, _ in results]
        took = [seconds for _, seconds in results]

        self.assert_error_status(responses[0], 504, "first_token_timeout_ms exceeded")
        self.assert_error_status(responses[1], 504, "first_token_timeout_ms exceeded")
        self.assert_honest_cut(
            responses[2], "first_token_timeout_ms", "first_token_timeout_ms exceeded"
        )
        self.assertTrue(responses[2].body.startswith(b": keep-alive\n\n"))
        self.assertTrue(responses[3].complete)
        self.assertEqual(events(responses[3])[-1].data, b"[DONE]")

        self.assert_honest_cut(
            responses[4], "stream_idle_timeout_ms", "stream_idle_timeout_ms exceeded"
        )
        self.assertTrue(responses[5].complete)
        self.assert_honest_cut(responses[6], "stream_idle_timeout_ms")
        self.assertTrue(responses[7].complete)
        self.assertEqual(responses[7].body.count(b": keep-alive"), 12)

        self.assert_error_status(responses[8], 504, "upstream read timed out")
        self.assert_honest_cut(responses[9], "timeout", "upstream read timed out")

        self.assert_honest_cut(
            responses[10], "max_stream_duration_ms", "max_stream_duration_ms exceeded"
        )
        self.assert_error_status(responses[11], 504, "max_stream_duration_ms exceeded")

        for index in (0, 1, 2, 4, 6, 8, 9, 10, 11):
            self.assertLess(took[index], 1.4, cases[index])

        records = await daemon.wait_for_records(len(cases))
        self.assert_records(
            records,
            [
                ("/ft", 504, "first_token_timeout_ms"),
                ("/ft", 504, "first_token_timeout_ms"),
                ("/ft", 200, "first_token_timeout_ms"),
                ("/ft", 200, None),
                ("/idle", 200, "stream_idle_timeout_ms"),
                ("/idle", 200, None),
                ("/idle", 200, "stream_idle_timeout_ms"),
                ("/idle-comments", 200, None),
                ("/read", 504, "timeout"),
                ("/read", 200, "timeout"),
                ("/dur", 200, "max_stream_duration_ms"),
                ("/dur", 504, "max_stream_duration_ms"),
            ],
        )
        await wait_until(
            lambda: mock.stats()["streams_open"] == 0,
            3,
            what="the aborted upstream streams to close",
        )
        stats = mock.stats()
        self.assertEqual(stats["streams_finished"], 3)
        self.assertEqual(stats["streams_aborted"], len(cases) - 3)
        self.assertFalse(
            [line for line in daemon.lines if any(word in line for word in CRASH_WORDS)]
        )


class KeepaliveTests(EndingCase):
    """
    C{keepalive_comment_interval_ms} as a raw HTTP client sees it.
    """

    async def test_comments_before_first_token(self) -> None:
        """
        A slow upstream: the client gets a 200 event stream and a C{:}
        comment per interval while the upstream has not answered, then the
        upstream's events, and a complete stream. A non-streaming request
        gets no comments. An upstream error after the comments is told
        in-band, the 200 untouched.
        """
        mock = await start_mock(self)
        route = proxy_route(
            mock, "ka", "/ka", keepalive_comment_interval_ms=100, streaming_flush_interval_ms=0
        )
        daemon = await start_daemon(self, [route])
        port = daemon.port
        assert port is not None

        def slow_stream() -> tuple[float, RawResponse, float]:
            client = RawHTTPClient(port)
            try:
                sent = time.monotonic()
                client.send_request(
                    "POST",
                    "/ka",
                    CHAT_STREAM,
                    {"x-mock-first-delay-ms": "700", "x-mock-events": "3"},
                )
                head = client.read_head()
                head_at = time.monotonic() - sent
                return head_at, client.read_body(head), sent
            finally:
                client.close()

        head_at, response, sent = await in_thread(slow_stream)
        self.assertLess(head_at, 0.5)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "text/event-stream")
        self.assertEqual(response.headers["cache-control"], "no-cache")
        self.assertEqual(response.headers["x-accel-buffering"], "no")
        self.assertTrue(response.complete)
        comments = [i for i, chunk in enumerate(response.chunks) if chunk == b":\n\n"]
        self.assertGreaterEqual(len(comments), 4)
        self.assertEqual(
            comments, list(range(len(comments))), "comments come first, and only first"
        )
        self.assertLess(response.times[0] - sent, 0.5)
        self.assertGreater(response.times[len(comments)] - sent, 0.6)
        data = [event.data for event in events(response)]
        self.assertEqual(data[-1], b"[DONE]")
        self.assertEqual(len(data), 1 + 3 + 2 + 1)  # role, content, finish, usage, [DONE]

        plain, _ = await in_thread(call, port, "/ka", CHAT, {"first-delay-ms": "400"})
        self.assertEqual(plain.status, 200)
        self.assertEqual(plain.headers["content-type"], "application/json")
        self.assertEqual(plain.json()["object"], "chat.completion")

        error, _ = await in_thread(
            call, port, "/ka", CHAT_STREAM, {"first-delay-ms": "300", "status": "429"}
        )
        self.assertTrue(error.body.startswith(b":\n\n"))
        self.assert_honest_cut(error, "upstream_error", "upstream returned status 429: mock error")

        records = await daemon.wait_for_records(3)
        self.assert_records(
            records, [("/ka", 200, None), ("/ka", 200, None), ("/ka", 200, "upstream_error")]
        )
        stream_record = next(
            r for r in records if r["request_type"] == "ai_stream" and r["abort_reason"] is None
        )
        self.assertEqual(stream_record["completion_tokens"], 3)


class HonestEndingTests(EndingCase):
    """
    Every early end of a stream is visible to the client and in the
    access record.
    """

    async def test_endings(self) -> None:
        """
        An upstream that cuts the connection, one that ends a stream
        without its end event (also inside an event), one that passes
        C{max_response_bytes}: each stream ends with an error event in the
        client's protocol, no C{[DONE]}, no terminating chunk, and an
        C{abort_reason}.
        """
        mock = await start_mock(self)
        routes = [
            proxy_route(mock, "chat", "/chat", streaming_flush_interval_ms=0),
            proxy_route(
                mock, "bytes", "/bytes", max_response_bytes=1500, streaming_flush_interval_ms=0
            ),
            {
                "id": "messages",
                "uri": "/v1/messages",
                "plugins": {
                    "ai-proxy": {
                        "provider": "anthropic",
                        "auth": {"header": {"x-api-key": "sk-ant-e2e"}},
                        "override": {"endpoint": mock.url("/v1/messages")},
                        "streaming_flush_interval_ms": 0,
                    }
                },
            },
        ]
        daemon = await start_daemon(self, routes)
        port = daemon.port
        assert port is not None
        cases: list[tuple[str, Any, dict[str, str]]] = [
            ("/chat", CHAT_STREAM, {"truncate": "1", "events": "3"}),
            ("/chat", CHAT_STREAM, {"giant-line": "100"}),
            ("/chat", CHAT_STREAM, {"garbage": "300", "content-type": "text/event-stream"}),
            ("/bytes", CHAT_STREAM, {"events": "60"}),
            ("/v1/messages", MESSAGES_STREAM, {"truncate": "1", "events": "3"}),
        ]
        results = await gatherResults(
            [in_thread(call, port, path, body, controls) for path, body, controls in cases]
        )
        responses = [response for response, _ in results]

        self.assert_honest_cut(
            responses[0],
            "upstream_error",
            "upstream closed the connection before the response was complete",
        )
        self.assertEqual(len(events(responses[0])), 1 + 3 + 1)

        cut = self.assert_honest_cut(responses[1], "upstream_incomplete")
        self.assertEqual(
            cut["message"], "upstream ended the stream without its end-of-stream event"
        )
        self.assertTrue(
            responses[1].body.startswith(b"data: " + b"x" * 100 + b'\n\ndata: {"error"')
        )

        self.assert_honest_cut(responses[2], "upstream_incomplete")
        self.assert_honest_cut(responses[3], "max_response_bytes", "max_response_bytes exceeded")
        self.assertLessEqual(len(responses[3].body) - len(events(responses[3])[-1].data), 1500)

        anthropic = responses[4]
        self.assertEqual(anthropic.status, 200)
        self.assertFalse(anthropic.complete)
        last = events(anthropic)[-1]
        self.assertEqual(last.event, "error")
        self.assertEqual(json.loads(last.data)["type"], "error")
        self.assertNotIn("message_stop", [event.event for event in events(anthropic)])

        records = await daemon.wait_for_records(len(cases))
        self.assert_records(
            records,
            [
                ("/chat", 200, "upstream_error"),
                ("/chat", 200, "upstream_incomplete"),
                ("/chat", 200, "upstream_incomplete"),
                ("/bytes", 200, "max_response_bytes"),
                ("/v1/messages", 200, "upstream_error"),
            ],
        )
        warnings = [line for line in daemon.lines if "aborting AI stream" in line]
        self.assertEqual(len(warnings), len(cases))


class HostileUpstreamTests(EndingCase):
    """
    An upstream sending random bytes, truncated frames, giant lines and
    wrong content types never crashes the daemon, and later requests
    still succeed.
    """

    async def test_survives(self) -> None:
        """
        Every hostile answer ends as a proxied answer or an honest error
        (never a 500, never a hang); the daemon prints no traceback, keeps
        running, serves normal requests afterwards, and its memory is not
        left holding a giant line.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(
            self, [proxy_route(mock, "chat", "/chat", streaming_flush_interval_ms=0)]
        )
        port = daemon.port
        assert port is not None
        giant = str(3 * 1024 * 1024)
        hostile: list[tuple[Any, dict[str, str]]] = [
            (CHAT_STREAM, {"garbage": "200000"}),
            (CHAT, {"garbage": "200000"}),
            (
                CHAT_STREAM,
                {"garbage": "50000", "content-type": "application/vnd.amazon.eventstream"},
            ),
            (CHAT_STREAM, {"giant-line": giant}),
            (CHAT_STREAM, {"giant-line": giant, "split-events": "1"}),
            (CHAT_STREAM, {"content-type": "application/json"}),
            (CHAT_STREAM, {"content-type": "text/html; charset=utf-8"}),
            (CHAT_STREAM, {"content-type": "application/octet-stream", "truncate": "1"}),
            (CHAT, {"content-type": "text/event-stream"}),
            (CHAT, {"truncate": "1"}),
            (CHAT_STREAM, {"truncate": "1", "events": "0", "split-events": "1"}),
            (CHAT_STREAM, {"crlf": "1", "split-events": "1", "events": "5"}),
        ]
        results = await gatherResults(
            [in_thread(call, port, "/chat", body, controls) for body, controls in hostile]
        )
        for (response, _), (_, controls) in zip(results, hostile, strict=True):
            self.assertNotEqual(response.status, 500, controls)
            self.assertIn(response.status, (200, 502), controls)
            if response.status == 502:
                self.assertEqual(response.headers["content-type"], "application/json", controls)
                self.assertIn("message", response.json())
            elif not response.complete:
                # The last write is the error event (after a blank line when
                # the upstream's bytes ended inside an SSE event).
                self.assertRegex(response.chunks[-1], rb'^(\n\n)?data: \{"error": ', controls)
        self.assertTrue(results[-1][0].complete)

        for _ in range(3):
            response, _ = await in_thread(call, port, "/chat", CHAT_STREAM, {"events": "4"})
            self.assertTrue(response.complete)
            self.assertEqual(events(response)[-1].data, b"[DONE]")
            response, _ = await in_thread(call, port, "/chat", CHAT)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.json()["object"], "chat.completion")
        await daemon.wait_for_records(len(hostile) + 6)
        self.assertTrue(daemon.running)
        self.assertFalse(
            [line for line in daemon.lines if any(word in line for word in CRASH_WORDS)]
        )
        self.assertTrue([line for line in daemon.lines if "dropping" in line and "1048576" in line])
        self.assertLess(daemon.rss_kb(), 200 * 1024)
