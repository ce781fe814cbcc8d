# -*- test-case-name: tests.test_ops_e2e -*-
"""
End-to-end tests of operations through the real C{twistd aiproxy}
daemon: the metrics scrape parsed with C{prometheus_client}'s parser after
known traffic, the JSON access log, C{SIGHUP} reload during a live stream,
an invalid reload, and C{SIGTERM} during a stream.

The mock upstream runs in the test's reactor (see L{tests.daemon}); its
streams are paced with C{x-mock-*} headers, which the gateway forwards.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
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
    start_daemon,
    start_mock,
    wait_until,
)
from tests.helpers import data_events, write_config

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "gpt-ops", "messages": MESSAGES}
CHAT_STREAM = {**CHAT, "stream": True}

#: The client's own credential: never forwarded (the route has its key) and
#: never logged.
CLIENT_SECRET = "Bearer client-ops-secret-987"

#: The keys docs/operations.md lists in every access record, and ours.
ACCESS_KEYS = RECORD_KEYS | {"attempts"}

_METRICS_LINE = re.compile(r"MetricsSite starting on (\d+)")


def contents(body: bytes) -> list[str]:
    """
    The content deltas of an OpenAI chat stream.
    """
    found = []
    for data in data_events(body):
        if data == b"[DONE]":
            continue
        for choice in json.loads(data).get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                found.append(text)
    return found


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """
    GET C{/metrics} and parse it with C{prometheus_client}'s parser: every
    sample's value by (name, labels). Blocking.
    """
    response = http_call(port, "GET", "/metrics")
    assert response.status == 200, response
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    found = {}
    for family in text_string_to_metric_families(response.body.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def sample(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def metrics_port(daemon: Daemon) -> int:
    """
    The port of the daemon's metrics listener, from its log line.
    """
    line = await daemon.wait_for_line("MetricsSite starting on")
    match = _METRICS_LINE.search(line)
    assert match is not None, line
    return int(match.group(1))


class LiveStream:
    """
    A streamed chat request on a raw socket, read in steps from a thread.
    """

    def __init__(self, port: int, path: str = "/v1/chat/completions", **controls: str) -> None:
        self.client = RawHTTPClient(port, timeout=20)
        headers = {f"x-mock-{name.replace('_', '-')}": value for name, value in controls.items()}
        headers["Authorization"] = CLIENT_SECRET
        self.client.send_request("POST", path, CHAT_STREAM, headers)
        self.response: RawResponse = self.client.read_head()

    def read(self, chunks: int | None = None) -> RawResponse:
        """
        Read until C{chunks} chunks in all (or to the end).
        """
        return self.client.read_body(self.response, chunks)

    def close(self) -> None:
        self.client.close()


async def open_stream(
    testcase: TestCase, port: int, path: str = "/v1/chat/completions", **controls: str
) -> LiveStream:
    """
    Open a L{LiveStream} and read its first chunk; closed by the cleanup.
    """
    stream = await in_thread(LiveStream, port, path, **controls)
    testcase.addCleanup(stream.close)
    await in_thread(stream.read, 1)
    return stream


def refused(port: int) -> bool:
    """
    Whether a connection to C{port} is refused (nothing listens). Blocking.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class MetricsTests(TestCase):
    """
    C{/metrics} on C{metrics_listen}, checked after known traffic.
    """

    async def test_scrape_after_traffic(self) -> None:
        """
        After two streams, one non-streamed request, a 404 and a client
        leaving mid-stream, the scrape counts each by route, instance,
        status and type; TTFT only for the streams; tokens by model and
        type; the abort by reason; no stream is active; the main listener
        does not serve C{/metrics}.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(
            self,
            config={
                "metrics_listen": "tcp:port=0:interface=127.0.0.1",
                "routes": [proxy_route(mock, streaming_flush_interval_ms=0)],
            },
        )
        port = await metrics_port(daemon)
        for _ in range(2):
            stream = await in_thread(LiveStream, daemon.port, events="3")
            response = await in_thread(stream.read)
            stream.close()
            self.assertTrue(response.complete)
        response = await in_thread(
            http_call, daemon.port, "POST", "/v1/chat/completions", CHAT, {"x-mock-events": "4"}
        )
        self.assertEqual(response.status, 200)
        response = await in_thread(http_call, daemon.port, "POST", "/nowhere", CHAT)
        self.assertEqual(response.status, 404)
        leaving = await open_stream(self, daemon.port, endless="1", delay_ms="20")
        leaving.close()
        await daemon.wait_for_records(5)
        self.assertEqual((await in_thread(http_call, daemon.port, "GET", "/metrics")).status, 404)

        samples = await in_thread(scrape, port)
        labels = {"route": "chat", "instance": "ai-proxy-openai"}
        self.assertEqual(
            sample(
                samples, "aiproxy_requests_total", status="200", request_type="ai_stream", **labels
            ),
            2,
        )
        self.assertEqual(
            sample(
                samples, "aiproxy_requests_total", status="200", request_type="ai_chat", **labels
            ),
            1,
        )
        self.assertEqual(
            sample(
                samples, "aiproxy_requests_total", status="499", request_type="ai_stream", **labels
            ),
            1,
        )
        # POST /nowhere and GET /metrics on the main listener.
        self.assertEqual(
            sample(
                samples,
                "aiproxy_requests_total",
                route="",
                instance="",
                status="404",
                request_type="",
            ),
            2,
        )
        self.assertEqual(sample(samples, "aiproxy_ttft_seconds_count", route="chat"), 3)
        self.assertEqual(sample(samples, "aiproxy_upstream_ttft_seconds_count", route="chat"), 3)
        self.assertEqual(sample(samples, "aiproxy_gateway_latency_seconds_count", route="chat"), 3)
        self.assertEqual(
            sample(
                samples,
                "aiproxy_request_duration_seconds_count",
                route="chat",
                request_type="ai_chat",
            ),
            1,
        )
        self.assertEqual(
            sample(
                samples,
                "aiproxy_request_duration_seconds_count",
                route="chat",
                request_type="ai_stream",
            ),
            3,
        )
        self.assertEqual(
            sample(samples, "aiproxy_tokens_total", model="gpt-ops", type="prompt"), 30
        )
        self.assertEqual(
            sample(samples, "aiproxy_tokens_total", model="gpt-ops", type="completion"), 10
        )
        self.assertEqual(sample(samples, "aiproxy_aborts_total", reason="client_disconnect"), 1)
        self.assertEqual(sample(samples, "aiproxy_active_streams"), 0)
        self.assertEqual(sample(samples, "aiproxy_in_flight_requests"), 0)
        self.assertGreater(sample(samples, "aiproxy_bytes_out_total", route="chat") or 0, 0)
        self.assertGreater(
            sample(samples, "aiproxy_stream_chunk_gap_seconds_count", route="chat") or 0, 0
        )

    async def test_active_stream(self) -> None:
        """
        A stream being relayed shows in C{aiproxy_active_streams}.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(
            self,
            config={
                "metrics_listen": "tcp:port=0:interface=127.0.0.1",
                "routes": [proxy_route(mock)],
            },
        )
        port = await metrics_port(daemon)
        stream = await open_stream(self, daemon.port, endless="1", delay_ms="20")
        samples = await in_thread(scrape, port)
        self.assertEqual(sample(samples, "aiproxy_active_streams"), 1)
        stream.close()
        await daemon.wait_for_records(1)
        samples = await in_thread(scrape, port)
        self.assertEqual(sample(samples, "aiproxy_active_streams"), 0)


class AccessLogTests(TestCase):
    """
    One JSON object per request on stdout, with the documented keys and the
    attempts; payloads only where the route asks; never a credential.
    """

    async def test_records(self) -> None:
        """
        Every stdout line that is a record parses as one JSON object with
        the docs/operations.md keys and one attempt; the route with
        C{logging.summaries}/C{payloads} adds the summary, the request's
        messages and the answer's text; no output holds the route's key or
        the client's C{Authorization}.
        """
        mock = await start_mock(self)
        logged = proxy_route(
            mock,
            route_id="logged",
            uri="/logged/v1/chat/completions",
            logging={"summaries": True, "payloads": True},
        )
        daemon = await start_daemon(
            self, [proxy_route(mock, streaming_flush_interval_ms=0), logged]
        )
        stream = await in_thread(LiveStream, daemon.port, events="3", text="one two three")
        self.assertTrue((await in_thread(stream.read)).complete)
        stream.close()
        stream = await in_thread(
            LiveStream, daemon.port, "/logged/v1/chat/completions", events="3", text="one two three"
        )
        self.assertTrue((await in_thread(stream.read)).complete)
        stream.close()
        response = await in_thread(
            http_call,
            daemon.port,
            "POST",
            "/v1/chat/completions",
            CHAT,
            {"Authorization": CLIENT_SECRET},
        )
        self.assertEqual(response.status, 200)
        records = await daemon.wait_for_records(3)
        self.assertEqual(len(records), 3)

        for record in records:
            self.assertLessEqual(ACCESS_KEYS, set(record), record)
            [attempt] = record["attempts"]
            self.assertEqual(set(attempt), {"instance", "status", "duration_ms"})
            self.assertEqual(attempt["status"], 200)
        plain, logged_record, chat = records
        self.assertEqual(
            (plain["route_id"], plain["request_type"], plain["status"]), ("chat", "ai_stream", 200)
        )
        self.assertEqual((plain["prompt_tokens"], plain["completion_tokens"]), (10, 3))
        self.assertEqual(plain["instance"], "ai-proxy-openai")
        self.assertIsInstance(plain["llm_time_to_first_token"], int)
        self.assertGreater(plain["bytes_out"], 0)
        self.assertIsNone(plain["abort_reason"])
        for key in ("llm_summary", "llm_request", "llm_response_text"):
            self.assertNotIn(key, plain)
            self.assertNotIn(key, chat)
        self.assertEqual(chat["request_type"], "ai_chat")
        self.assertEqual(logged_record["llm_summary"]["model"], "gpt-ops")
        self.assertEqual(logged_record["llm_summary"]["completion_tokens"], 3)
        self.assertEqual(logged_record["llm_request"]["messages"], MESSAGES)
        self.assertEqual(logged_record["llm_response_text"], {"content": "one two three"})

        for line in daemon.stdout_lines:
            if line.startswith("{"):
                self.assertIsInstance(json.loads(line), dict)
        self.assertNotIn(ROUTE_API_KEY, daemon.output)
        self.assertNotIn("client-ops-secret", daemon.output)


class ReloadTests(TestCase):
    """
    C{SIGHUP}: the config is read again; in-flight streams finish on the
    routes they started with.
    """

    async def test_reload_during_stream(self) -> None:
        """
        During a live stream a reload removes its route and adds another:
        the stream completes intact, the new route answers, the removed one
        404s, and the removed route's upstream connection is closed once
        the stream ended.
        """
        mock = await start_mock(self)
        old = proxy_route(mock, route_id="old")
        daemon = await start_daemon(self, [old])
        stream = await open_stream(self, daemon.port, events="30", delay_ms="40")

        write_config(
            daemon.config.parent,
            {"routes": [proxy_route(mock, route_id="new", uri="/v2/chat/completions")]},
        )
        daemon.signal("HUP")
        await daemon.wait_for_line("reloaded")
        new = await in_thread(http_call, daemon.port, "POST", "/v2/chat/completions", CHAT)
        self.assertEqual(new.status, 200)
        removed = await in_thread(http_call, daemon.port, "POST", "/v1/chat/completions", CHAT)
        self.assertEqual(removed.status, 404)
        self.assertFalse(stream.response.complete)

        response = await in_thread(stream.read)
        self.assertTrue(response.complete)
        self.assertEqual(contents(response.body), [f"tok{i} " for i in range(30)])
        self.assertEqual(data_events(response.body)[-1], b"[DONE]")
        records = await daemon.wait_for_records(3)
        by_route = {record["route_id"]: record for record in records}
        self.assertEqual(by_route["old"]["status"], 200)
        self.assertIsNone(by_route["old"]["abort_reason"])
        self.assertEqual(by_route["new"]["status"], 200)
        # The old route's pooled connection is closed; the new one's stays.
        await wait_until(
            lambda: len(mock.site.open_transports()) == 1, 5, what="the old pool to close"
        )

    async def test_invalid_reload(self) -> None:
        """
        An invalid config is refused with its problems logged at error
        level; the daemon keeps serving the previous routes.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock)])
        write_config(
            daemon.config.parent, {"routes": [proxy_route(mock, streaming_flush_interval_ms=-1)]}
        )
        daemon.signal("HUP")
        line = await daemon.wait_for_line("reload refused")
        self.assertIn(
            "routes[0].plugins.ai-proxy.streaming_flush_interval_ms: -1 is less than the minimum of 0",
            line,
        )
        self.assertIn("#error]", line)
        await daemon.wait_for_line("still serving the previous configuration")
        response = await in_thread(http_call, daemon.port, "POST", "/v1/chat/completions", CHAT)
        self.assertEqual(response.status, 200)
        self.assertTrue(daemon.running)
        write_config(daemon.config.parent, "routes: [")
        daemon.signal("HUP")
        await wait_until(
            lambda: daemon.output.count("still serving") == 2, 5, what="the second refusal"
        )
        response = await in_thread(http_call, daemon.port, "POST", "/v1/chat/completions", CHAT)
        self.assertEqual(response.status, 200)


class StopTests(TestCase):
    """
    C{SIGTERM}: stop accepting, let streams finish within
    C{shutdown_grace_s}, abort the rest with an error event, exit 0.
    """

    async def test_stream_completes(self) -> None:
        """
        A stream in flight at SIGTERM completes intact while new
        connections are refused; then the process exits 0.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock)])
        stream = await open_stream(self, daemon.port, events="30", delay_ms="40")
        daemon.signal("TERM")
        await wait_until(
            lambda: "draining: 1 request(s) in flight" in daemon.output, 5, what="the drain"
        )
        self.assertTrue(await in_thread(refused, daemon.port))
        response = await in_thread(stream.read)
        self.assertTrue(response.complete)
        self.assertEqual(contents(response.body), [f"tok{i} " for i in range(30)])
        self.assertEqual(data_events(response.body)[-1], b"[DONE]")
        self.assertEqual(await daemon.wait_exit(10), 0)
        [record] = daemon.access_records()
        self.assertIsNone(record["abort_reason"])

    async def test_grace_expires(self) -> None:
        """
        A stream still running when C{shutdown_grace_s} is over gets an
        error event and a closed connection (no C{[DONE]}, no terminating
        chunk); the process still exits 0.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(
            self, config={"shutdown_grace_s": 0.5, "routes": [proxy_route(mock)]}
        )
        stream = await open_stream(self, daemon.port, endless="1", delay_ms="20")
        daemon.signal("TERM")
        response = await in_thread(stream.read)
        self.assertFalse(response.complete)
        last = json.loads(data_events(response.body)[-1])
        self.assertIn("server shutting down", json.dumps(last))
        self.assertNotIn(b"[DONE]", response.body)
        self.assertEqual(await daemon.wait_exit(10), 0)
        [record] = daemon.access_records()
        self.assertEqual(record["abort_reason"], "shutdown")
        await wait_until(
            lambda: mock.stats()["streams_open"] == 0, 5, what="the upstream stream to close"
        )

    async def test_idle(self) -> None:
        """
        An idle daemon exits 0 at once on SIGTERM.
        """
        daemon = await start_daemon(self, [])
        daemon.signal("TERM")
        self.assertEqual(await daemon.wait_exit(5), 0)
        self.assertIn("drained in", daemon.output)
