# -*- test-case-name: tests.test_convert_e2e -*-
"""
Protocol conversion end to end: the real daemon, the mock upstream on
loopback, and the official SDKs as clients: the C{anthropic} SDK against an
OpenAI-style upstream, and the C{openai} SDK against an Anthropic Messages
upstream, streamed and not, with text, tool calls and usage.
"""

from __future__ import annotations

import json
from typing import Any

from anthropic import Anthropic
from openai import OpenAI
from twisted.trial.unittest import TestCase

from tests.daemon import (
    ROUTE_API_KEY,
    Daemon,
    MockServer,
    in_thread,
    start_daemon,
    start_mock,
)

#: The mock's five content pieces, joined.
TEXT = "tok0 tok1 tok2 tok3 tok4 "

#: A tool the mock calls when asked (C{tool_calls=1}).
TOOL = {"name": "mock_tool", "description": "a tool", "input_schema": {"type": "object"}}
OPENAI_TOOL = {
    "type": "function",
    "function": {"name": "mock_tool", "description": "a tool", "parameters": {"type": "object"}},
}


def route(route_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    """
    A route serving C{/<route_id>/*}.
    """
    return {"id": route_id, "uri": f"/{route_id}/*", "plugins": {"ai-proxy": conf}}


def openai_upstream(mock: MockServer, query: str = "") -> dict[str, Any]:
    """
    An C{ai-proxy} on an OpenAI-style upstream (the mock's chat completions).
    """
    return {
        "provider": "openai",
        "auth": {"header": {"Authorization": f"Bearer {ROUTE_API_KEY}"}},
        "override": {"endpoint": mock.url() + query},
        "streaming_flush_interval_ms": 0,
    }


def messages_upstream(mock: MockServer, query: str = "") -> dict[str, Any]:
    """
    An C{ai-proxy} on an Anthropic Messages upstream (the mock's
    C{/v1/messages}): OpenAI clients are converted.
    """
    return {
        "provider": "anthropic",
        "auth": {"header": {"x-api-key": ROUTE_API_KEY}},
        "override": {"endpoint": mock.url("/v1/messages") + query},
        "streaming_flush_interval_ms": 0,
    }


async def start(testcase: TestCase) -> tuple[MockServer, Daemon]:
    """
    The mock, and a daemon with a route per client and upstream pair.
    """
    mock = await start_mock(testcase)
    daemon = await start_daemon(
        testcase,
        [
            route("claude", openai_upstream(mock)),
            route("claude-tools", openai_upstream(mock, "?tool_calls=1")),
            route("gpt", messages_upstream(mock)),
            route("gpt-tools", messages_upstream(mock, "?tool_calls=1")),
        ],
    )
    return mock, daemon


def anthropic_client(daemon: Daemon, route_id: str) -> Anthropic:
    return Anthropic(
        base_url=f"http://127.0.0.1:{daemon.port}/{route_id}",
        api_key="client-key",
        max_retries=0,
        timeout=20,
    )


def openai_client(daemon: Daemon, route_id: str) -> OpenAI:
    return OpenAI(
        base_url=f"http://127.0.0.1:{daemon.port}/{route_id}/v1",
        api_key="client-key",
        max_retries=0,
        timeout=20,
    )


def records_of(daemon: Daemon, route_id: str) -> list[dict[str, Any]]:
    return [r for r in daemon.access_records() if r["route_id"] == route_id]


class AnthropicSDKTests(TestCase):
    """
    The C{anthropic} SDK against an OpenAI chat upstream.
    """

    async def test_text(self) -> None:
        """
        A message and a stream of it: the same text, Anthropic usage from
        the upstream's figures, the upstream asked in OpenAI's shape; the
        records carry the upstream's usage.
        """
        mock, daemon = await start(self)
        client = anthropic_client(daemon, "claude")
        question = [{"role": "user", "content": "hi"}]

        def run() -> tuple[Any, str, Any]:
            message = client.messages.create(model="m", max_tokens=64, messages=question)
            with client.messages.stream(model="m", max_tokens=64, messages=question) as stream:
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
            return message, text, final

        message, streamed, final = await in_thread(run)
        self.assertEqual(message.content[0].text, TEXT)
        self.assertEqual(message.stop_reason, "end_turn")
        self.assertEqual((message.usage.input_tokens, message.usage.output_tokens), (10, 5))
        self.assertEqual(streamed, TEXT)
        self.assertEqual(final.stop_reason, "end_turn")
        self.assertEqual(final.usage.output_tokens, 5)
        [first, second] = mock.requests()
        self.assertTrue(first["path"].endswith("/chat/completions"))
        sent = json.loads(second["body"])
        self.assertEqual(sent["max_completion_tokens"], 64)
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertNotIn("client-key", json.dumps(second["headers"]))
        records = await daemon.wait_for_records(2)
        self.assertEqual(
            [(r["prompt_tokens"], r["completion_tokens"]) for r in records], [(10, 5), (10, 5)]
        )
        self.assertEqual([r["request_type"] for r in records], ["ai_chat", "ai_stream"])
        self.assertNotIn(ROUTE_API_KEY, daemon.output)

    async def test_tool_use(self) -> None:
        """
        An upstream tool call reaches the SDK as a C{tool_use} block, whole
        and streamed, with its input parsed.
        """
        mock, daemon = await start(self)
        client = anthropic_client(daemon, "claude-tools")
        question = [{"role": "user", "content": "call it"}]

        def run() -> tuple[Any, Any]:
            message = client.messages.create(
                model="m", max_tokens=64, messages=question, tools=[TOOL]
            )
            with client.messages.stream(
                model="m", max_tokens=64, messages=question, tools=[TOOL]
            ) as stream:
                final = stream.get_final_message()
            return message, final

        message, final = await in_thread(run)
        for answer in (message, final):
            self.assertEqual(answer.stop_reason, "tool_use")
            [block] = [b for b in answer.content if b.type == "tool_use"]
            self.assertEqual(block.name, "mock_tool")
            self.assertEqual(block.input, {"text": TEXT})
        sent = json.loads(mock.requests()[0]["body"])
        self.assertEqual(sent["tools"][0]["function"]["name"], "mock_tool")
        records = await daemon.wait_for_records(2)
        self.assertTrue(all(r["llm_has_tool_calls"] for r in records))


class OpenAISDKTests(TestCase):
    """
    The C{openai} SDK against an Anthropic Messages upstream.
    """

    async def test_text(self) -> None:
        """
        A completion and a stream of it with usage: the same text, OpenAI
        usage from the upstream's figures, the upstream asked in Anthropic's
        shape with the route's key.
        """
        mock, daemon = await start(self)
        client = openai_client(daemon, "gpt")
        question = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]

        def run() -> tuple[Any, str, Any]:
            completion = client.chat.completions.create(model="claude-x", messages=question)
            stream = client.chat.completions.create(
                model="claude-x",
                messages=question,
                stream=True,
                stream_options={"include_usage": True},
            )
            pieces: list[str] = []
            usage = None
            for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                if chunk.usage is not None:
                    usage = chunk.usage
            return completion, "".join(pieces), usage

        completion, streamed, usage = await in_thread(run)
        self.assertEqual(completion.choices[0].message.content, TEXT)
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        self.assertEqual(completion.usage.completion_tokens, 5)
        self.assertEqual(streamed, TEXT)
        self.assertIsNotNone(usage)
        self.assertEqual(usage.completion_tokens, 5)
        [first, _] = mock.requests()
        self.assertTrue(first["path"].endswith("/v1/messages"))
        sent = json.loads(first["body"])
        self.assertEqual(sent["system"], "be brief")
        self.assertEqual(sent["max_tokens"], 4096)
        headers = {name.lower(): value for name, value in first["headers"].items()}
        self.assertIn(ROUTE_API_KEY, json.dumps(headers.get("x-api-key")))
        self.assertNotIn("authorization", headers)
        records = await daemon.wait_for_records(2)
        self.assertEqual([r["completion_tokens"] for r in records], [5, 5])

    async def test_tool_calls(self) -> None:
        """
        An upstream C{tool_use} reaches the SDK as tool calls, whole and
        streamed (arguments assembled from their fragments).
        """
        mock, daemon = await start(self)
        client = openai_client(daemon, "gpt-tools")
        question = [{"role": "user", "content": "call it"}]

        def run() -> tuple[Any, str, str | None]:
            completion = client.chat.completions.create(
                model="claude-x", messages=question, tools=[OPENAI_TOOL]
            )
            stream = client.chat.completions.create(
                model="claude-x", messages=question, tools=[OPENAI_TOOL], stream=True
            )
            arguments: list[str] = []
            finish = None
            for chunk in stream:
                for choice in chunk.choices:
                    for call in choice.delta.tool_calls or ():
                        arguments.append(call.function.arguments or "")
                    finish = choice.finish_reason or finish
            return completion, "".join(arguments), finish

        completion, arguments, finish = await in_thread(run)
        [call] = completion.choices[0].message.tool_calls
        self.assertEqual(call.function.name, "mock_tool")
        self.assertEqual(json.loads(call.function.arguments), {"text": TEXT})
        self.assertEqual(completion.choices[0].finish_reason, "tool_calls")
        self.assertEqual(json.loads(arguments), {"text": TEXT})
        self.assertEqual(finish, "tool_calls")
        sent = json.loads(mock.requests()[0]["body"])
        self.assertEqual(sent["tools"][0]["name"], "mock_tool")
