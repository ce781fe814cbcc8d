"""
End-to-end tests: the real C{twistd aiproxy} process on loopback sockets,
the mock upstream in the test's reactor, clients in threads (the official
C{openai} SDK and raw sockets that see the HTTP chunks).

Each test starts its own daemon (about a second): trial cleans the reactor
after every test, so a process cannot be shared between tests.
"""

from __future__ import annotations

import json
import time
from typing import Any

from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from aiproxy.context import RECORD_KEYS
from tests.daemon import (
    ROUTE_API_KEY,
    Daemon,
    RawHTTPClient,
    RawResponse,
    http_call,
    in_thread,
    proxy_route,
    sleep,
    start_daemon,
    start_mock,
    wait_until,
)
from tests.helpers import data_events

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
CHAT = {"model": "gpt-e2e", "messages": MESSAGES}
CHAT_STREAM = {**CHAT, "stream": True}


def sdk(daemon: Daemon) -> OpenAI:
    """
    The official SDK pointed at the daemon, without retries.
    """
    return OpenAI(
        base_url=f"http://127.0.0.1:{daemon.port}/v1",
        api_key="client-key",
        max_retries=0,
        timeout=20,
    )


def open_stream(
    port: int,
    headers: dict[str, str],
    path: str = "/v1/chat/completions",
    rcvbuf: int | None = None,
) -> tuple[RawHTTPClient, RawResponse]:
    """
    Send a streamed chat request on a raw socket and read the response head.
    """
    client = RawHTTPClient(port, rcvbuf=rcvbuf)
    client.send_request("POST", path, CHAT_STREAM, headers)
    return client, client.read_head()


def stream_call(
    port: int, headers: dict[str, str], path: str = "/v1/chat/completions"
) -> RawResponse:
    """
    A whole streamed request on a raw socket, chunk by chunk.
    """
    client, response = open_stream(port, headers, path)
    try:
        return client.read_body(response)
    finally:
        client.close()


class OpenAISDKTests(TestCase):
    """
    The official OpenAI Python SDK as the client.
    """

    async def test_stream(self) -> None:
        """
        A streamed completion: the text the SDK assembles is the upstream's,
        and the usage chunk is there although the client did not ask for it
        (the proxy adds C{stream_options.include_usage}).
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock)])
        text = "Hello there, this is a streamed answer."

        def run() -> tuple[str, Any, int]:
            stream = sdk(daemon).chat.completions.create(
                model="gpt-e2e",
                messages=MESSAGES,
                stream=True,
                extra_headers={"x-mock-text": text, "x-mock-events": "7"},
            )
            pieces, usage, chunks = [], None, 0
            for chunk in stream:
                chunks += 1
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            return "".join(pieces), usage, chunks

        assembled, usage, chunks = await in_thread(run)
        self.assertEqual(assembled, text)
        self.assertIsNotNone(usage)
        self.assertEqual(
            (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (10, 7, 17)
        )
        sent = json.loads(mock.requests()[-1]["body"])
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        record = (await daemon.wait_for_records(1))[-1]
        self.assertTrue(RECORD_KEYS <= set(record), RECORD_KEYS - set(record))
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["request_type"], "ai_stream")
        self.assertEqual(
            (record["prompt_tokens"], record["completion_tokens"], record["total_tokens"]),
            (10, 7, 17),
        )
        self.assertEqual(record["llm_model"], "gpt-e2e")
        self.assertIsNone(record["abort_reason"])

    async def test_non_stream(self) -> None:
        """
        A non-streamed completion: the same text and usage.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock)])
        text = "A whole answer at once."

        def run() -> Any:
            return sdk(daemon).chat.completions.create(
                model="gpt-e2e",
                messages=MESSAGES,
                extra_headers={"x-mock-text": text, "x-mock-events": "3"},
            )

        completion = await in_thread(run)
        self.assertEqual(completion.choices[0].message.content, text)
        self.assertEqual(completion.usage.total_tokens, 13)
        record = (await daemon.wait_for_records(1))[-1]
        self.assertEqual(record["request_type"], "ai_chat")
        self.assertEqual(record["total_tokens"], 13)
        self.assertEqual(record["status"], 200)


class FlushModeTests(TestCase):
    """
    C{streaming_flush_interval_ms}, as APISIX's C{ai-proxy-flush.t}.
    """

    async def test_sync_mode_one_chunk_per_event(self) -> None:
        """
        With C{0}, a stream of events 50 ms apart reaches the client as one
        HTTP chunk per event, each when it was sent.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock, streaming_flush_interval_ms=0)])
        response = await in_thread(
            stream_call, daemon.port, {"x-mock-events": "5", "x-mock-delay-ms": "50"}
        )
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        # role chunk, 5 content events, finish, usage, [DONE]: 9 writes upstream.
        self.assertEqual(len(response.chunks), 9, response.chunks)
        for chunk in response.chunks:
            self.assertEqual(len(data_events(chunk)), 1, chunk)
            self.assertTrue(chunk.endswith(b"\n\n"))
        contents = [
            json.loads(d)["choices"][0]["delta"].get("content")
            for d in data_events(response.body)[1:6]
        ]
        self.assertEqual(contents, [f"tok{i} " for i in range(5)])
        self.assertEqual(data_events(response.chunks[-1]), [b"[DONE]"])
        gaps = [b - a for a, b in zip(response.times, response.times[1:], strict=False)]
        self.assertGreater(min(gaps), 0.025, gaps)

    async def test_interval_mode_coalesces(self) -> None:
        """
        With an interval, the same burst of events reaches the client in
        fewer chunks than in sync mode, and the body is the same.
        """
        mock = await start_mock(self)
        routes = [
            proxy_route(mock, "sync", "/sync/v1/chat/completions", streaming_flush_interval_ms=0),
            proxy_route(
                mock, "interval", "/interval/v1/chat/completions", streaming_flush_interval_ms=100
            ),
        ]
        daemon = await start_daemon(self, routes)
        headers = {"x-mock-events": "30", "x-mock-delay-ms": "10"}
        sync = await in_thread(stream_call, daemon.port, headers, "/sync/v1/chat/completions")
        interval = await in_thread(
            stream_call, daemon.port, headers, "/interval/v1/chat/completions"
        )
        self.assertTrue(sync.complete and interval.complete)
        self.assertEqual(
            [e for e in data_events(sync.body) if b"chatcmpl-mock" not in e],
            [e for e in data_events(interval.body) if b"chatcmpl-mock" not in e],
        )
        self.assertEqual(len(data_events(sync.body)), len(data_events(interval.body)))
        # ~34 writes 10 ms apart: ~0.35 s of stream, ticks every 100 ms.
        self.assertGreater(len(sync.chunks), 20)
        self.assertLess(
            len(interval.chunks), len(sync.chunks) // 2, (len(interval.chunks), len(sync.chunks))
        )
        records = await daemon.wait_for_records(2)
        flushes = {r["route_id"]: r["flushes"] for r in records}
        self.assertLess(flushes["interval"], flushes["sync"])


class DisconnectTests(TestCase):
    """
    A client leaving mid-stream aborts the upstream read at once, as
    APISIX's C{ai-proxy-client-disconnect.t}, in both flush modes.
    """

    async def check_disconnect(self, flush_interval_ms: int) -> None:
        mock = await start_mock(self)
        daemon = await start_daemon(
            self, [proxy_route(mock, streaming_flush_interval_ms=flush_interval_ms)]
        )

        def read_three_and_leave() -> list[bytes]:
            client, response = open_stream(
                daemon.port, {"x-mock-endless": "1", "x-mock-delay-ms": "30"}
            )
            try:
                return client.read_body(response, max_chunks=3).chunks
            finally:
                client.close()

        chunks = await in_thread(read_three_and_leave)
        self.assertEqual(len(chunks), 3)
        await sleep(1.0)
        probe = await in_thread(http_call, mock.port, "GET", "/chunks")
        self.assertLessEqual(int(probe.body), 15, probe.body)
        stats = mock.stats()
        self.assertLessEqual(stats["last_stream_events"], 15, stats)
        self.assertEqual(stats["streams_aborted"], 1, stats)
        self.assertEqual(stats["streams_open"], 0, stats)
        await daemon.wait_for_line("client disconnected during AI streaming")
        record = (await daemon.wait_for_records(1))[-1]
        self.assertEqual(record["status"], 499)
        self.assertEqual(record["abort_reason"], "client_disconnect")

    async def test_sync_mode(self) -> None:
        """
        Sync flushing: the upstream stream is aborted within a few events.
        """
        await self.check_disconnect(0)

    async def test_interval_mode(self) -> None:
        """
        Interval flushing: the same.
        """
        await self.check_disconnect(50)

    async def test_before_first_byte(self) -> None:
        """
        A client leaving while the upstream has not answered yet: the
        upstream request is aborted too.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock)])

        def send_and_leave() -> None:
            client = RawHTTPClient(daemon.port)
            client.send_request(
                "POST", "/v1/chat/completions", CHAT_STREAM, {"x-mock-first-delay-ms": "5000"}
            )
            time.sleep(0.3)
            client.close()

        await in_thread(send_and_leave)
        await wait_until(
            lambda: mock.stats()["streams_aborted"] == 1, 3, what="the mock to see the abort"
        )
        record = (await daemon.wait_for_records(1))[-1]
        self.assertEqual((record["status"], record["abort_reason"]), (499, "client_disconnect"))


class BackpressureTests(TestCase):
    """
    A client reading slower than the upstream writes pauses the upstream.
    """

    async def test_client_never_reads(self) -> None:
        """
        A client that stops reading an endless fast stream: the upstream
        soon stops sending (events_sent flat over a second) and the
        daemon's memory stays bounded. Measured here: VmRSS ~57 MB at rest
        and unchanged (+0.1 MB) while 25,000 events (~5 MB) wait in socket
        buffers. The route's per-read C{timeout} (2 s) does not cut the
        stalled stream: the pause is the client's, not the upstream's; the
        stream flows again when the client reads.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock, timeout=2000)])
        rss_before = daemon.rss_kb()
        client, response = await in_thread(
            open_stream,
            daemon.port,
            {"x-mock-endless": "1", "x-mock-delay-ms": "1", "x-mock-burst": "50"},
            rcvbuf=8192,
        )
        self.addCleanup(client.close)
        self.assertEqual(response.status, 200, daemon.output[-3000:])
        await wait_until(lambda: mock.stats()["events_sent"] > 1000, 5, what="the stream to flow")
        # The stream stalls: within a few seconds comes a 1 s window in which
        # the mock sent (almost) nothing. Flowing freely it sends ~50 events
        # per ms; once stalled, kernel buffer autotuning still lets a few
        # hundred through now and then, so one window is allowed 50.
        growth = []
        previous = mock.stats()["events_sent"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await sleep(1.0)
            current = mock.stats()["events_sent"]
            growth.append(current - previous)
            previous = current
            if growth[-1] <= 50:
                break
        self.assertLessEqual(growth[-1], 50, growth)
        second = previous
        rss_stalled = daemon.rss_kb()
        self.assertLess(rss_stalled - rss_before, 30 * 1024, (rss_before, rss_stalled))
        # Stalled for more than the route's timeout (2 s) by now.
        await sleep(2.5)
        self.assertEqual(daemon.access_records(), [], "the stalled stream was ended")
        # Reading again resumes the stream.
        chunks = await in_thread(
            lambda: client.read_body(RawResponse(200, "", response.headers), max_chunks=500).chunks
        )
        self.assertEqual(len(chunks), 500)
        self.assertNotIn(b'"error"', b"".join(chunks))
        await wait_until(
            lambda: mock.stats()["events_sent"] > second, 5, what="the upstream to resume"
        )
        client.close()
        record = (await daemon.wait_for_records(1))[-1]
        self.assertEqual(record["abort_reason"], "client_disconnect")


class LimitTests(TestCase):
    """
    C{max_stream_duration_ms} and C{max_response_bytes}.
    """

    async def test_max_stream_duration(self) -> None:
        """
        After output: the stream ends with an error event, no C{[DONE]}, and
        the connection closes without the terminating chunk. Before output
        (upstream silent before or after its headers): 504 with a JSON body
        naming the limit, and the upstream request is aborted.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(
            self, [proxy_route(mock, max_stream_duration_ms=400, streaming_flush_interval_ms=0)]
        )
        started = time.monotonic()
        response = await in_thread(
            stream_call, daemon.port, {"x-mock-events": "50", "x-mock-delay-ms": "50"}
        )
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete)
        events = data_events(response.body)
        self.assertGreater(len(events), 3)
        self.assertNotIn(b"[DONE]", events)
        error = json.loads(events[-1])["error"]
        self.assertEqual(
            (error["code"], error["message"]),
            ("max_stream_duration_ms", "max_stream_duration_ms exceeded"),
        )
        for control in ("x-mock-first-delay-ms", "x-mock-body-delay-ms"):
            started = time.monotonic()
            response = await in_thread(
                http_call, daemon.port, body=CHAT_STREAM, headers={control: "5000"}
            )
            self.assertLess(time.monotonic() - started, 2, control)
            self.assertEqual(response.status, 504, control)
            self.assertEqual(response.headers["content-type"], "application/json")
            self.assertEqual(response.json(), {"message": "max_stream_duration_ms exceeded"})
        await wait_until(
            lambda: mock.stats()["streams_open"] == 0, 2, what="the upstream streams to be aborted"
        )
        self.assertEqual(mock.stats()["streams_aborted"], 3)
        records = await daemon.wait_for_records(3)
        self.assertEqual([r["abort_reason"] for r in records], ["max_stream_duration_ms"] * 3)
        self.assertEqual([r["status"] for r in records], [200, 504, 504])

    async def test_max_response_bytes(self) -> None:
        """
        A stream passing the limit after output ends with an error event;
        one whose first chunk is over it gets 502. A non-streamed answer over
        it gets 502 C{max_response_bytes exceeded}, whether it declares its
        length or is chunked.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(
            self, [proxy_route(mock, max_response_bytes=2000, streaming_flush_interval_ms=0)]
        )
        response = await in_thread(stream_call, daemon.port, {"x-mock-events": "40"})
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete)
        events = data_events(response.body)
        self.assertEqual(json.loads(events[-1])["error"]["code"], "max_response_bytes")
        self.assertNotIn(b"[DONE]", events)
        self.assertLessEqual(sum(map(len, response.chunks[:-1])), 2000)

        response = await in_thread(
            stream_call, daemon.port, {"x-mock-events": "40", "x-mock-burst": "50"}
        )
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json(), {"message": "max_response_bytes exceeded"})

        for headers in ({"x-mock-events": "500"}, {"x-mock-garbage": "5000"}):
            response = await in_thread(http_call, daemon.port, body=CHAT, headers=headers)
            self.assertEqual(response.status, 502, headers)
            self.assertEqual(response.json(), {"message": "max_response_bytes exceeded"})
        records = await daemon.wait_for_records(4)
        self.assertEqual([r["abort_reason"] for r in records], ["max_response_bytes"] * 4)
        self.assertEqual([r["status"] for r in records], [200, 502, 502, 502])


class UpstreamErrorTests(TestCase):
    """
    Upstream error statuses and failures.
    """

    async def test_error_passthrough(self) -> None:
        """
        429 and 5xx: status, body and content type byte for byte, with the
        retry, request-id and rate-limit headers.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock)])
        for status in (429, 500, 503):
            response = await in_thread(
                http_call, daemon.port, body=CHAT_STREAM, headers={"x-mock-status": str(status)}
            )
            self.assertEqual(response.status, status)
            expected = {"error": {"message": "mock error", "type": "mock", "code": status}}
            self.assertEqual(response.body, json.dumps(expected, separators=(",", ":")).encode())
            self.assertEqual(response.headers["content-type"], "application/json")
            self.assertTrue(response.headers["x-request-id"].startswith("mock-"))
            self.assertEqual(response.headers["x-ratelimit-remaining-requests"], "99")
            if status == 429:
                self.assertEqual(response.headers["retry-after"], "1")
        records = await daemon.wait_for_records(3)
        self.assertEqual([r["status"] for r in records], [429, 500, 503])

    async def test_unreachable_and_timeout(self) -> None:
        """
        A refused connection gives 502 with a JSON error; no headers within
        C{timeout}, 504; no body byte within it, 504 too.
        """
        mock = await start_mock(self)
        from tests.daemon import closed_port

        routes = [
            proxy_route(
                route_id="refused",
                uri="/refused",
                endpoint=f"http://127.0.0.1:{closed_port()}/v1/chat/completions",
            ),
            proxy_route(mock, "slow", "/slow", timeout=200),
        ]
        daemon = await start_daemon(self, routes)
        response = await in_thread(http_call, daemon.port, path="/refused", body=CHAT)
        self.assertEqual(response.status, 502)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertIn("message", response.json())
        for control in ("x-mock-first-delay-ms", "x-mock-body-delay-ms"):
            started = time.monotonic()
            response = await in_thread(
                http_call, daemon.port, path="/slow", body=CHAT, headers={control: "2000"}
            )
            self.assertLess(time.monotonic() - started, 1.5)
            self.assertEqual(response.status, 504, control)
            self.assertEqual(response.headers["content-type"], "application/json")
            self.assertIn("message", response.json())
        records = await daemon.wait_for_records(3)
        self.assertEqual(
            [(r["status"], r["abort_reason"]) for r in records],
            [(502, "upstream_error"), (504, "timeout"), (504, "timeout")],
        )

    async def test_truncated(self) -> None:
        """
        An upstream that closes mid-answer: a non-streamed body gives 502
        with a JSON error; a stream ends with an error event.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock, streaming_flush_interval_ms=0)])
        response = await in_thread(
            http_call, daemon.port, body=CHAT, headers={"x-mock-truncate": "1"}
        )
        self.assertEqual(response.status, 502)
        self.assertIn("message", response.json())
        response = await in_thread(
            stream_call, daemon.port, {"x-mock-truncate": "1", "x-mock-events": "3"}
        )
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete)
        events = data_events(response.body)
        self.assertEqual(json.loads(events[-1])["error"]["code"], "upstream_error")
        self.assertNotIn(b"[DONE]", events)


class RequestTests(TestCase):
    """
    The request path: errors answered by the gateway, headers and bytes.
    """

    async def test_request_errors(self) -> None:
        """
        Content type, empty body, invalid JSON: 400 with the documented messages;
        too large by Content-Length (before the body is sent) or while a
        chunked body is read: 413; an unknown path: 404 JSON. Nothing
        reaches the upstream.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock, max_req_body_size=1000)])
        port = daemon.port
        response = await in_thread(
            http_call, port, body=b"{}", headers={"content-type": "text/plain"}
        )
        self.assertEqual(
            (response.status, response.json()),
            (
                400,
                {
                    "message": "unsupported content-type: text/plain, only application/json is supported"
                },
            ),
        )
        response = await in_thread(
            http_call, port, body=b"", headers={"content-type": "application/json"}
        )
        self.assertEqual(response.status, 400)
        self.assertIn("empty", response.json()["message"])
        response = await in_thread(
            http_call, port, body=b'{"messages": [', headers={"content-type": "application/json"}
        )
        self.assertEqual(response.status, 400)
        self.assertTrue(
            response.json()["message"].startswith("could not parse JSON request body: ")
        )

        def too_large_declared() -> RawResponse:
            client = RawHTTPClient(port, timeout=3)
            try:
                client.send_request(
                    "POST",
                    "/v1/chat/completions",
                    b"x" * 5000,
                    {"content-type": "application/json"},
                    send_body=False,
                )
                return client.read_body(client.read_head())
            finally:
                client.close()

        response = await in_thread(too_large_declared)
        self.assertEqual(response.status, 413)
        self.assertIn("greater than the maximum size 1000", response.json()["message"])

        def too_large_chunked() -> RawResponse:
            client = RawHTTPClient(port, timeout=3)
            try:
                client.send_request(
                    "POST",
                    "/v1/chat/completions",
                    None,
                    {
                        "content-type": "application/json",
                        "transfer-encoding": "chunked",
                        "Content-Length": None,
                    },  # type: ignore[dict-item]
                )
                for _ in range(3):
                    try:
                        client.sock.sendall(b"258\r\n" + b" " * 600 + b"\r\n")
                    except OSError:
                        break
                return client.read_body(client.read_head())
            finally:
                client.close()

        response = await in_thread(too_large_chunked)
        self.assertEqual(response.status, 413)
        response = await in_thread(http_call, port, path="/v1/unknown", body=CHAT)
        self.assertEqual(response.status, 404)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertIn("message", response.json())
        self.assertEqual(mock.stats()["requests"], 0)
        records = await daemon.wait_for_records(6)
        self.assertEqual([r["status"] for r in records], [400, 400, 400, 413, 413, 404])

    async def test_headers_and_untouched_bytes(self) -> None:
        """
        With nothing to change, the upstream gets the client's exact body
        bytes, the route's credentials instead of the client's, and the
        client's other headers; the client gets the upstream's request id
        and rate-limit headers.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock)])
        raw = b'{ "model" : "gpt-e2e",\n  "messages": [{"role": "user", "content": "caf\\u00e9 \xc3\xa9"}], "temperature": 0.50 }'
        headers = {
            "content-type": "application/json; charset=utf-8",
            "authorization": "Bearer client-key",
            "cookie": "session=abc",
            "x-trace": "t-1",
        }
        response = await in_thread(http_call, daemon.port, body=raw, headers=headers)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["x-request-id"], "mock-1")
        self.assertEqual(response.headers["x-ratelimit-remaining-requests"], "99")
        recorded = mock.requests()[-1]
        import base64

        self.assertEqual(base64.b64decode(recorded["body_base64"]), raw)
        self.assertEqual(recorded["headers"]["authorization"], [f"Bearer {ROUTE_API_KEY}"])
        self.assertNotIn("cookie", recorded["headers"])
        self.assertEqual(recorded["headers"]["x-trace"], ["t-1"])
        self.assertEqual(recorded["headers"]["content-type"], ["application/json"])
        self.assertEqual(recorded["path"], "/v1/chat/completions")


class ConfigTests(TestCase):
    """
    Invalid configs are refused with C{<json path>: <reason>} lines.
    """

    BAD = (
        "routes:\n"
        "  - uri: /v1/chat/completions\n"
        "    plugins:\n"
        "      ai-proxy:\n"
        "        provider: openai\n"
        "        auth: {header: {Authorization: Bearer x}}\n"
        "        streaming_flush_interval_ms: -1\n"
        "unknown_key: 1\n"
    )
    PROBLEM = (
        "routes[0].plugins.ai-proxy.streaming_flush_interval_ms: -1 is less than the minimum of 0"
    )

    async def test_twistd_refuses(self) -> None:
        """
        C{twistd aiproxy} with an invalid config exits non-zero within a few
        seconds, printing every problem, and serves nothing.
        """
        from tests.daemon import Daemon
        from tests.helpers import write_config

        path = write_config(self.mktemp(), self.BAD)
        daemon = Daemon(path.resolve(), ["--listen", "tcp:port=0:interface=127.0.0.1"])
        self.addCleanup(lambda: Deferred.fromCoroutine(daemon.stop()))
        started = time.monotonic()
        daemon.spawn()
        code = await daemon.wait_exit(10)
        self.assertLess(time.monotonic() - started, 5)
        self.assertNotEqual(code, 0)
        self.assertIn(self.PROBLEM, daemon.lines)
        self.assertIn("unknown_key: unknown key 'unknown_key'", daemon.lines)
        self.assertIsNone(daemon.listening_port)

    async def test_check_command(self) -> None:
        """
        C{aiproxy-check} exits 1 with the same lines for an invalid config,
        0 for a valid one.
        """
        import sys

        from tests.daemon import run_command
        from tests.helpers import write_config

        directory = self.mktemp()
        bad = write_config(directory, self.BAD, "bad.yaml").resolve()
        good = write_config(
            directory,
            {"routes": [proxy_route(endpoint="http://127.0.0.1:1/v1/chat/completions")]},
            "good.yaml",
        ).resolve()
        code, output = await run_command(self, [sys.executable, "-m", "aiproxy.check", str(bad)])
        self.assertEqual(code, 1, output)
        self.assertIn(self.PROBLEM, output.splitlines())
        code, output = await run_command(self, [sys.executable, "-m", "aiproxy.check", str(good)])
        self.assertEqual(code, 0, output)


class AccessLogTests(TestCase):
    """
    One bare JSON access record per request on stdout, never an API key.
    """

    async def test_records(self) -> None:
        """
        A stream, a non-stream answer, an upstream 429, a client error, an
        unknown path and a client that left each give one record with the
        docs/operations.md keys and the right status; the route's key appears
        nowhere in the daemon's output.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock, streaming_flush_interval_ms=0)])
        port = daemon.port
        await in_thread(stream_call, port, {"x-mock-events": "4"})
        await in_thread(
            http_call, port, body=CHAT, headers={"x-mock-events": "6", "x-mock-prompt-tokens": "21"}
        )
        await in_thread(http_call, port, body=CHAT, headers={"x-mock-status": "429"})
        await in_thread(http_call, port, body=b"nope", headers={"content-type": "application/json"})
        await in_thread(http_call, port, path="/nowhere", body=CHAT)

        def leave() -> None:
            client, response = open_stream(port, {"x-mock-endless": "1", "x-mock-delay-ms": "20"})
            client.read_body(response, max_chunks=2)
            client.close()

        await in_thread(leave)
        records = await daemon.wait_for_records(6)
        await sleep(0.2)
        records = daemon.access_records()
        self.assertEqual(len(records), 6, records)
        for record in records:
            self.assertTrue(RECORD_KEYS <= set(record), (RECORD_KEYS - set(record), record))
        self.assertEqual([r["status"] for r in records], [200, 200, 429, 400, 404, 499])
        stream, whole = records[0], records[1]
        self.assertEqual(stream["request_type"], "ai_stream")
        self.assertEqual(
            (stream["prompt_tokens"], stream["completion_tokens"], stream["total_tokens"]),
            (10, 4, 14),
        )
        self.assertEqual(whole["request_type"], "ai_chat")
        self.assertEqual(
            (whole["prompt_tokens"], whole["completion_tokens"], whole["total_tokens"]), (21, 6, 27)
        )
        for record in (stream, whole):
            self.assertEqual((record["route_id"], record["instance"]), ("chat", "ai-proxy-openai"))
            self.assertEqual(record["request_llm_model"], "gpt-e2e")
            self.assertIsInstance(record["llm_time_to_first_token"], int)
            self.assertIsInstance(record["upstream_response_time"], int)
            self.assertGreater(record["bytes_in"], 0)
            self.assertGreater(record["bytes_out"], 0)
            self.assertIsNone(record["abort_reason"])
        self.assertEqual(records[5]["abort_reason"], "client_disconnect")
        await daemon.stop()
        self.assertNotIn(ROUTE_API_KEY, daemon.output)
        self.assertNotIn(ROUTE_API_KEY.removeprefix("sk-"), daemon.output)


class ConnectionTests(TestCase):
    """
    Client connections: keep-alive and concurrent streams.
    """

    async def test_keep_alive(self) -> None:
        """
        One SDK client sends streamed and whole requests one after another
        on its kept-alive connection, also after a stream that was cut.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock, max_response_bytes=3000)])

        def run() -> list[str]:
            client = sdk(daemon)
            texts = []
            for index in range(4):
                stream = index % 2 == 0
                headers = {"x-mock-text": f"answer {index}"}
                if stream:
                    pieces = client.chat.completions.create(
                        model="gpt-e2e", messages=MESSAGES, stream=True, extra_headers=headers
                    )
                    texts.append(
                        "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
                    )
                else:
                    completion = client.chat.completions.create(
                        model="gpt-e2e", messages=MESSAGES, extra_headers=headers
                    )
                    texts.append(completion.choices[0].message.content or "")
            try:
                cut = client.chat.completions.create(
                    model="gpt-e2e",
                    messages=MESSAGES,
                    stream=True,
                    extra_headers={"x-mock-events": "100"},
                )
                for _ in cut:
                    pass
            except Exception as e:  # the SDK raises on the in-band error event
                texts.append(type(e).__name__)
            completion = client.chat.completions.create(
                model="gpt-e2e", messages=MESSAGES, extra_headers={"x-mock-text": "after"}
            )
            texts.append(completion.choices[0].message.content or "")
            return texts

        texts = await in_thread(run)
        self.assertEqual(texts[:4], [f"answer {i}" for i in range(4)])
        self.assertEqual(texts[-1], "after")
        self.assertEqual(len(texts), 6, texts)
        records = await daemon.wait_for_records(6)
        self.assertEqual(
            [r["abort_reason"] for r in records], [None] * 4 + ["max_response_bytes", None]
        )

    async def test_concurrent_streams(self) -> None:
        """
        Twenty streams at once, each with its own text and pace, all arrive
        whole and in order, each with its own access record.
        """
        from concurrent.futures import ThreadPoolExecutor

        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock, streaming_flush_interval_ms=0)])

        def one(index: int) -> tuple[int, str, bool]:
            headers = {
                "x-mock-text": f"stream-{index}/" * 5,
                "x-mock-events": "10",
                "x-mock-delay-ms": str(5 + index % 4 * 5),
            }
            response = stream_call(daemon.port, headers)
            text = "".join(
                json.loads(e)["choices"][0]["delta"].get("content") or ""
                for e in data_events(response.body)
                if e != b"[DONE]" and json.loads(e)["choices"]
            )
            return index, text, response.complete

        def run() -> list[tuple[int, str, bool]]:
            with ThreadPoolExecutor(20) as pool:
                return list(pool.map(one, range(20)))

        results = await in_thread(run)
        for index, text, complete in results:
            self.assertTrue(complete, index)
            self.assertEqual(text, f"stream-{index}/" * 5)
        records = await daemon.wait_for_records(20)
        self.assertEqual({r["status"] for r in records}, {200})
        self.assertEqual({r["completion_tokens"] for r in records}, {10})
