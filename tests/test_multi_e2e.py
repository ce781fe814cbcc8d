"""
End-to-end tests of C{ai-proxy-multi}: the real C{twistd aiproxy} process
with two instances on the in-process mock upstream, each instance made to
fail or not by the query of its C{override.endpoint} (the mock's controls).
"""

from __future__ import annotations

import json
from typing import Any

from openai import OpenAI
from twisted.trial.unittest import TestCase

from tests.daemon import (
    ROUTE_API_KEY,
    Daemon,
    MockServer,
    closed_port,
    http_call,
    in_thread,
    start_daemon,
    start_mock,
)
from tests.helpers import data_events
from tests.test_e2e import CHAT, CHAT_STREAM, MESSAGES


def instance(name: str, endpoint: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "weight": 1,
        "auth": {"header": {"Authorization": f"Bearer {ROUTE_API_KEY}"}},
        "override": {"endpoint": endpoint},
        **fields,
    }


def multi_route(route_id: str, *instances: dict[str, Any], **plugin: Any) -> dict[str, Any]:
    """
    A route serving C{/<route_id>/*} with C{ai-proxy-multi}.
    """
    return {
        "id": route_id,
        "uri": f"/{route_id}/*",
        "plugins": {
            "ai-proxy-multi": {
                "instances": list(instances),
                "streaming_flush_interval_ms": 0,
                **plugin,
            }
        },
    }


def records_of(daemon: Daemon, route_id: str) -> list[dict[str, Any]]:
    return [r for r in daemon.access_records() if r["route_id"] == route_id]


def attempts(record: dict[str, Any]) -> list[tuple[str, int | None]]:
    return [(a["instance"], a["status"]) for a in record["attempts"]]


async def start(testcase: TestCase) -> tuple[MockServer, Daemon]:
    """
    The mock, and a daemon with one multi route per behaviour.
    """
    mock = await start_mock(testcase)
    url = mock.url()
    down = f"http://127.0.0.1:{closed_port()}/v1/chat/completions"
    tcp_check = {
        "active": {
            "type": "tcp",
            "healthy": {"interval": 1},
            "unhealthy": {"interval": 1, "tcp_failures": 1},
        }
    }
    routes = [
        multi_route(
            "fallback",
            instance("a", url + "?status=500"),
            instance("b", url),
            fallback_strategy="http_5xx",
        ),
        multi_route(
            "limited",
            instance("a", url + "?status=429"),
            instance("b", url),
            fallback_strategy="http_429",
        ),
        multi_route(
            "broken",
            instance("a", url + "?status=500"),
            instance("b", url + "?status=503"),
            fallback_strategy=["http_429", "http_5xx"],
        ),
        multi_route(
            "commit",
            instance("a", url + "?events=0"),
            instance("b", url + "?events=3"),
            fallback_strategy="http_5xx",
            stream_commit_ms=5000,
        ),
        multi_route(
            "health",
            instance("a", down, checks=tcp_check),
            instance("b", url),
        ),
    ]
    daemon = await start_daemon(testcase, routes)
    return mock, daemon


class MultiTests(TestCase):
    """
    Fallback between instances through the real daemon.
    """

    async def test_fallbacks(self) -> None:
        """
        A 500 (C{http_5xx}) or a 429 (C{http_429}) from the first instance:
        the client gets the second's answer, the record lists both attempts
        and names the second, and a warning names both; every instance
        failing: 502 with the last error body; a stream ending before any
        content with C{stream_commit_ms}: the client only sees the second
        instance's stream.
        """
        mock, daemon = await start(self)

        response = await in_thread(
            http_call, daemon.port, path="/fallback/v1/chat/completions", body=CHAT
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json()["object"], "chat.completion")
        await daemon.wait_for_line("ai instance a returned status 500, falling back to b")

        response = await in_thread(
            http_call, daemon.port, path="/limited/v1/chat/completions", body=CHAT
        )
        self.assertEqual(response.status, 200)

        response = await in_thread(
            http_call, daemon.port, path="/broken/v1/chat/completions", body=CHAT
        )
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json()["error"]["code"], 503)

        response = await in_thread(
            http_call, daemon.port, path="/commit/v1/chat/completions", body=CHAT_STREAM
        )
        self.assertEqual(response.status, 200)
        events = data_events(response.body)
        self.assertEqual(events[-1], b"[DONE]")
        text = "".join(
            choice["delta"].get("content") or ""
            for event in events[:-1]
            for choice in json.loads(event)["choices"]
        )
        self.assertEqual(text, "tok0 tok1 tok2 ")
        self.assertEqual(len([e for e in events if b'"role"' in e]), 1)

        await daemon.wait_for_records(4)
        [fallback] = records_of(daemon, "fallback")
        self.assertEqual(attempts(fallback), [("a", 500), ("b", 200)])
        self.assertEqual((fallback["instance"], fallback["status"]), ("b", 200))
        self.assertEqual(fallback["prompt_tokens"], 10)
        [limited] = records_of(daemon, "limited")
        self.assertEqual(attempts(limited), [("a", 429), ("b", 200)])
        [broken] = records_of(daemon, "broken")
        self.assertEqual(attempts(broken), [("a", 500), ("b", 503)])
        self.assertEqual(broken["status"], 502)
        [commit] = records_of(daemon, "commit")
        self.assertEqual(attempts(commit), [("a", 502), ("b", 200)])
        self.assertEqual(commit["completion_tokens"], 3)
        self.assertEqual(mock.stats()["requests"], 8)
        self.assertNotIn(ROUTE_API_KEY, daemon.output)

    async def test_health_and_sdk(self) -> None:
        """
        An instance whose active health check fails gets no request; the
        official SDK works through a multi route, streamed or not, the
        fallback invisible to it.
        """
        mock, daemon = await start(self)
        await daemon.wait_for_line("ai instance a of route health is unhealthy")
        for _ in range(3):
            response = await in_thread(
                http_call, daemon.port, path="/health/v1/chat/completions", body=CHAT
            )
            self.assertEqual(response.status, 200)
        await daemon.wait_for_records(3)
        self.assertEqual([attempts(r) for r in records_of(daemon, "health")], [[("b", 200)]] * 3)

        client = OpenAI(
            base_url=f"http://127.0.0.1:{daemon.port}/fallback/v1",
            api_key="client-key",
            max_retries=0,
            timeout=20,
        )

        def run() -> tuple[str, str]:
            completion = client.chat.completions.create(model="gpt-e2e", messages=MESSAGES)
            stream = client.chat.completions.create(model="gpt-e2e", messages=MESSAGES, stream=True)
            pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
            return completion.choices[0].message.content or "", "".join(pieces)

        whole, streamed = await in_thread(run)
        self.assertEqual(whole, "tok0 tok1 tok2 tok3 tok4 ")
        self.assertEqual(streamed, whole)
        await daemon.wait_for_records(5)
        fallback = records_of(daemon, "fallback")
        self.assertEqual(len(fallback), 2)
        for record in fallback:
            self.assertEqual(record["instance"], "b")
            self.assertEqual(attempts(record)[-1], ("b", 200))
