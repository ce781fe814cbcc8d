# -*- test-case-name: tests.test_convert_openai_anthropic -*-
"""
Tests for L{aiproxy.convert.openai_anthropic}: an OpenAI chat client served
by an Anthropic Messages upstream (CONVERSION.md section 5), its requests,
headers, answers, errors and streams.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from aiproxy.context import ExchangeContext
from aiproxy.convert import openai_anthropic
from aiproxy.convert.openai_anthropic import OpenAIToAnthropic
from aiproxy.interfaces import IConverter, IStreamConverter
from aiproxy.stream.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT
from aiproxy.stream.sse import SSEDecoder, SSEEvent
from aiproxy.upstream.request import ClientError
from tests.helpers import (
    block_delta,
    block_start,
    block_stop,
    compact,
    data_events,
    feed_stream,
    make_context,
    user,
)

NOW = 1_700_000_000


def make_converter(default_max_tokens: int | None = None) -> OpenAIToAnthropic:
    """
    A converter whose clock reads L{NOW}.
    """
    clock = Clock()
    clock.advance(NOW)
    if default_max_tokens is None:
        return OpenAIToAnthropic(clock=clock)
    return OpenAIToAnthropic(default_max_tokens, clock=clock)


def request(**fields: Any) -> dict[str, Any]:
    """
    An OpenAI chat request of one user message, with C{fields}.
    """
    body: dict[str, Any] = {"model": "claude-sonnet-4-5", "messages": [user()]}
    body.update(fields)
    return body


def convert(body: dict[str, Any], converter: OpenAIToAnthropic | None = None) -> dict[str, Any]:
    """
    The upstream body of C{body}.
    """
    converter = converter or make_converter()
    result: dict[str, Any] = converter.convert_request(body, make_context())
    return result


def sse(*events: tuple[str, Any]) -> bytes:
    """
    An Anthropic SSE stream of C{(event name, data)}; data that is not
    bytes is written as JSON.
    """
    out = b""
    for name, data in events:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        out += b"event: " + name.encode() + b"\ndata: " + raw + b"\n\n"
    return out


MESSAGE_START = (
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 3,
                "cache_read_input_tokens": 100,
                "output_tokens": 1,
            },
        },
    },
)
PING = ("ping", {"type": "ping"})
MESSAGE_STOP = ("message_stop", {"type": "message_stop"})


def text_delta(index: int, text: str) -> tuple[str, Any]:
    """
    A C{text_delta} event.
    """
    return block_delta(index, {"type": "text_delta", "text": text})


def message_delta(stop_reason: str = "end_turn", output_tokens: int = 15) -> tuple[str, Any]:
    """
    A C{message_delta} event.
    """
    return (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
    )


TEXT_STREAM = sse(
    MESSAGE_START,
    block_start(0, {"type": "text", "text": ""}),
    PING,
    text_delta(0, "Hello"),
    text_delta(0, ", wörld «ok»\n"),
    block_stop(0),
    message_delta(),
    MESSAGE_STOP,
)

TOOL_STREAM = sse(
    MESSAGE_START,
    block_start(0, {"type": "text", "text": ""}),
    text_delta(0, "Let me check."),
    block_stop(0),
    block_start(1, {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}),
    block_delta(1, {"type": "input_json_delta", "partial_json": ""}),
    block_delta(1, {"type": "input_json_delta", "partial_json": '{"location": "San'}),
    block_delta(1, {"type": "input_json_delta", "partial_json": ' Francisco", "unit": "c"}'}),
    block_stop(1),
    block_start(2, {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}}),
    block_delta(2, {"type": "input_json_delta", "partial_json": '{"tz": "PST"}'}),
    block_stop(2),
    message_delta("tool_use", 89),
    MESSAGE_STOP,
)

THINKING_STREAM = sse(
    MESSAGE_START,
    block_start(0, {"type": "thinking", "thinking": ""}),
    block_delta(0, {"type": "thinking_delta", "thinking": "Let me think"}),
    block_delta(0, {"type": "thinking_delta", "thinking": " step by step."}),
    block_delta(0, {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}),
    block_stop(0),
    block_start(1, {"type": "text", "text": ""}),
    text_delta(1, "42"),
    block_stop(1),
    message_delta(),
    MESSAGE_STOP,
)


def run_stream(
    stream: bytes,
    chunks: list[bytes] | None = None,
    include_usage: bool = False,
    context: ExchangeContext | None = None,
) -> tuple[bytes, ExchangeContext, Any]:
    """
    Convert C{stream} (fed in C{chunks}, or whole) for a streamed request
    that asked C{include_usage} or not.

    @return: the client bytes, the context and the stream converter.
    """
    converter = make_converter()
    context = context or make_context("claude-sonnet-4-5")
    body = request(stream=True)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    converter.convert_request(body, context)
    streamer = converter.stream(context)
    out = feed_stream(streamer, context, [stream] if chunks is None else chunks)
    return out, context, streamer


def split_events(stream: bytes) -> list[bytes]:
    """
    C{stream} cut after each event, so each is converted on its own.
    """
    return [event + b"\n\n" for event in stream.split(b"\n\n") if event]


def documents(out: bytes) -> list[Any]:
    """
    The client stream's data values, parsed (C{[DONE]} kept as C{b"[DONE]"}).
    """
    return [data if data == b"[DONE]" else json.loads(data) for data in data_events(out)]


def deltas(out: bytes) -> list[dict[str, Any]]:
    """
    The C{delta} of every chunk with a choice.
    """
    return [
        document["choices"][0]["delta"]
        for document in documents(out)
        if isinstance(document, dict) and document.get("choices")
    ]


class InterfaceTests(SynchronousTestCase):
    """
    The converter and its stream converter provide their interfaces.
    """

    def test_converter(self) -> None:
        """
        L{OpenAIToAnthropic} provides L{IConverter}, from OpenAI chat to
        Anthropic Messages.
        """
        converter = OpenAIToAnthropic()
        self.assertTrue(verifyObject(IConverter, converter))
        self.assertEqual(converter.client_protocol, OPENAI_CHAT)
        self.assertEqual(converter.upstream_protocol, ANTHROPIC_MESSAGES)

    def test_stream_converter(self) -> None:
        """
        L{OpenAIToAnthropic.stream} gives an L{IStreamConverter} that has
        produced nothing yet.
        """
        streamer = OpenAIToAnthropic().stream(make_context())
        self.assertTrue(verifyObject(IStreamConverter, streamer))
        self.assertFalse(streamer.produced)


class RequestTests(SynchronousTestCase):
    """
    L{OpenAIToAnthropic.convert_request} maps each field of an OpenAI chat
    request to its Anthropic counterpart.
    """

    def test_system_and_developer(self) -> None:
        """
        C{system} and C{developer} messages leave the message list and
        become C{system}, their texts joined in order.
        """
        body = convert(
            request(
                messages=[
                    {"role": "system", "content": "Be brief."},
                    user(),
                    {"role": "developer", "content": [{"type": "text", "text": "No emoji."}]},
                ]
            )
        )
        self.assertEqual(body["system"], "Be brief.\n\nNo emoji.")
        self.assertEqual(body["messages"], [{"role": "user", "content": "Hello"}])

    def test_system_parts(self) -> None:
        """
        The text parts of one system message are joined with line feeds.
        """
        parts = [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]
        body = convert(request(messages=[{"role": "system", "content": parts}, user()]))
        self.assertEqual(body["system"], "One.\nTwo.")

    def test_no_system(self) -> None:
        """
        Without a system message the upstream body has no C{system}.
        """
        self.assertNotIn("system", convert(request()))

    def test_text_messages(self) -> None:
        """
        User and assistant string contents are kept, in order.
        """
        messages = [user("Hi"), {"role": "assistant", "content": "Hello!"}, user("Bye")]
        body = convert(request(messages=messages))
        self.assertEqual(
            body["messages"],
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
            ],
        )

    def test_text_parts(self) -> None:
        """
        Text parts become text blocks; an empty one (which Anthropic
        refuses) is dropped.
        """
        parts = [
            {"type": "text", "text": "What is"},
            {"type": "text", "text": ""},
            {"type": "text", "text": " this?"},
        ]
        body = convert(request(messages=[user(parts)]))
        self.assertEqual(
            body["messages"][0]["content"],
            [{"type": "text", "text": "What is"}, {"type": "text", "text": " this?"}],
        )

    def test_image_data_url(self) -> None:
        """
        An C{image_url} part with a base64 C{data:} URL becomes an image
        block with a base64 source of its media type.
        """
        part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        body = convert(request(messages=[user([part])]))
        self.assertEqual(
            body["messages"][0]["content"],
            [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                }
            ],
        )

    def test_image_url(self) -> None:
        """
        An C{image_url} part with another URL becomes an image block with a
        URL source.
        """
        part = {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
        body = convert(request(messages=[user([{"type": "text", "text": "Cat?"}, part])]))
        self.assertEqual(
            body["messages"][0]["content"][1],
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        )

    def test_image_data_url_not_base64(self) -> None:
        """
        A C{data:} URL that is not base64 is refused with a 400 naming the
        message.
        """
        part = {"type": "image_url", "image_url": {"url": "data:image/png,%89PNG"}}
        error = self.assertRaises(ClientError, convert, request(messages=[user(), user([part])]))
        self.assertEqual(error.status, 400)
        self.assertIn("index 1", error.message)

    def test_unsupported_part(self) -> None:
        """
        A content part of a type Anthropic cannot take is refused (400)
        rather than dropped.
        """
        part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
        error = self.assertRaises(ClientError, convert, request(messages=[user([part])]))
        self.assertEqual(error.status, 400)
        self.assertIn("input_audio", error.message)

    def test_tool_calls(self) -> None:
        """
        An assistant message's text and C{tool_calls} become a text block
        and C{tool_use} blocks with their arguments parsed.
        """
        assistant = {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                },
            ],
        }
        body = convert(request(messages=[user(), assistant]))
        self.assertEqual(
            body["messages"][1],
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                    {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
                ],
            },
        )

    def test_tool_calls_without_content(self) -> None:
        """
        An assistant message with only tool calls (content null) holds only
        C{tool_use} blocks.
        """
        assistant = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
        body = convert(request(messages=[user(), assistant]))
        self.assertEqual(
            body["messages"][1]["content"],
            [{"type": "tool_use", "id": "call_1", "name": "f", "input": {}}],
        )

    def test_tool_call_bad_json(self) -> None:
        """
        Tool call arguments that are not JSON are refused with a 400 naming
        the message's index.
        """
        assistant = {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
            ],
        }
        error = self.assertRaises(
            ClientError, convert, request(messages=[user(), user(), assistant])
        )
        self.assertEqual(error.status, 400)
        self.assertIn("message at index 2", error.message)

    def test_tool_call_arguments_not_object(self) -> None:
        """
        Tool call arguments that are JSON but not an object (Anthropic's
        C{input} must be one) are refused too.
        """
        assistant = {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
            ],
        }
        error = self.assertRaises(ClientError, convert, request(messages=[user(), assistant]))
        self.assertIn("message at index 1", error.message)

    def test_tool_messages(self) -> None:
        """
        Consecutive C{tool} messages become one user message of
        C{tool_result} blocks; a tool message after another turn starts a
        new one.
        """
        messages = [
            user(),
            {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "9:00"}],
            },
            user("Thanks"),
            {"role": "tool", "tool_call_id": "call_3", "content": "ok"},
        ]
        body = convert(request(messages=messages))
        self.assertEqual(
            body["messages"],
            [
                {"role": "user", "content": "Hello"},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "18°C"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "call_2",
                            "content": [{"type": "text", "text": "9:00"}],
                        },
                    ],
                },
                {"role": "user", "content": "Thanks"},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "call_3", "content": "ok"}],
                },
            ],
        )

    def test_max_completion_tokens(self) -> None:
        """
        C{max_completion_tokens} becomes C{max_tokens}, winning over the
        client's C{max_tokens}.
        """
        body = convert(request(max_completion_tokens=300, max_tokens=100))
        self.assertEqual(body["max_tokens"], 300)
        self.assertNotIn("max_completion_tokens", body)

    def test_max_tokens(self) -> None:
        """
        The client's C{max_tokens} is kept.
        """
        self.assertEqual(convert(request(max_tokens=100))["max_tokens"], 100)

    def test_default_max_tokens(self) -> None:
        """
        Without a client limit, C{max_tokens} (which Anthropic requires) is
        4096, or the route's default.
        """
        self.assertEqual(convert(request())["max_tokens"], 4096)
        self.assertEqual(convert(request(), make_converter(777))["max_tokens"], 777)

    def test_stop(self) -> None:
        """
        C{stop}, a string or a list, becomes C{stop_sequences}.
        """
        self.assertEqual(convert(request(stop="END"))["stop_sequences"], ["END"])
        self.assertEqual(convert(request(stop=["a", "b"]))["stop_sequences"], ["a", "b"])
        self.assertNotIn("stop_sequences", convert(request(stop=None)))
        self.assertNotIn("stop", convert(request(stop="END")))

    def test_sampling(self) -> None:
        """
        C{temperature} and C{top_p} are kept; null ones are left out.
        """
        body = convert(request(temperature=0.2, top_p=0.9))
        self.assertEqual((body["temperature"], body["top_p"]), (0.2, 0.9))
        body = convert(request(temperature=None))
        self.assertNotIn("temperature", body)

    def test_user(self) -> None:
        """
        C{user} becomes C{metadata.user_id}.
        """
        body = convert(request(user="user-42"))
        self.assertEqual(body["metadata"], {"user_id": "user-42"})
        self.assertNotIn("user", body)

    def test_tools(self) -> None:
        """
        Function tools become C{{name, description, input_schema}}; a tool
        without parameters gets an empty object schema.
        """
        schema = {"type": "object", "properties": {"city": {"type": "string"}}}
        tools = [
            {
                "type": "function",
                "function": {"name": "get_weather", "description": "Weather", "parameters": schema},
            },
            {"type": "function", "function": {"name": "now"}},
        ]
        body = convert(request(tools=tools))
        self.assertEqual(
            body["tools"],
            [
                {"name": "get_weather", "description": "Weather", "input_schema": schema},
                {"name": "now", "input_schema": {"type": "object", "properties": {}}},
            ],
        )

    def test_unsupported_tool(self) -> None:
        """
        A tool that is not a function is refused (400).
        """
        error = self.assertRaises(
            ClientError, convert, request(tools=[{"type": "custom", "custom": {"name": "x"}}])
        )
        self.assertEqual(error.status, 400)
        self.assertIn("custom", error.message)

    def test_tool_choice(self) -> None:
        """
        C{tool_choice} auto → auto, required → any, none → none, a function
        → C{{type: tool, name}}.
        """
        tools = [{"type": "function", "function": {"name": "f"}}]
        cases = [
            ("auto", {"type": "auto"}),
            ("required", {"type": "any"}),
            ("none", {"type": "none"}),
            ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"}),
        ]
        for choice, expected in cases:
            body = convert(request(tools=tools, tool_choice=choice))
            self.assertEqual(body["tool_choice"], expected, choice)

    def test_tool_choice_without_tools(self) -> None:
        """
        Without tools, C{tool_choice} and C{parallel_tool_calls} are left out
        (Anthropic refuses a tool choice without tools).
        """
        body = convert(request(tool_choice="required", parallel_tool_calls=False))
        self.assertNotIn("tool_choice", body)
        self.assertNotIn("tools", body)

    def test_parallel_tool_calls(self) -> None:
        """
        C{parallel_tool_calls: false} becomes C{disable_parallel_tool_use}
        inside the tool choice, an auto one when the client gave none; a
        C{none} choice takes no such field.
        """
        tools = [{"type": "function", "function": {"name": "f"}}]
        body = convert(request(tools=tools, tool_choice="required", parallel_tool_calls=False))
        self.assertEqual(body["tool_choice"], {"type": "any", "disable_parallel_tool_use": True})
        body = convert(request(tools=tools, parallel_tool_calls=False))
        self.assertEqual(body["tool_choice"], {"type": "auto", "disable_parallel_tool_use": True})
        body = convert(request(tools=tools, tool_choice="none", parallel_tool_calls=False))
        self.assertEqual(body["tool_choice"], {"type": "none"})
        body = convert(request(tools=tools, parallel_tool_calls=True))
        self.assertNotIn("tool_choice", body)
        self.assertNotIn("parallel_tool_calls", body)

    def test_reasoning_effort(self) -> None:
        """
        C{reasoning_effort} low, medium, high → C{thinking} enabled with a
        budget of 1024, 2048, 4096 tokens; another value gives none.
        """
        for effort, budget in [("low", 1024), ("medium", 2048), ("high", 4096)]:
            body = convert(request(reasoning_effort=effort, max_tokens=8000))
            self.assertEqual(body["thinking"], {"type": "enabled", "budget_tokens": budget})
            self.assertNotIn("reasoning_effort", body)
        self.assertNotIn("thinking", convert(request(reasoning_effort="minimal")))

    def test_reasoning_effort_default_max_tokens(self) -> None:
        """
        When the default C{max_tokens} is not above the thinking budget (as
        Anthropic requires), the budget is added to it; a client's own limit
        is kept as given.
        """
        body = convert(request(reasoning_effort="high"))
        self.assertEqual(body["max_tokens"], 4096 + 4096)
        body = convert(request(reasoning_effort="low"))
        self.assertEqual(body["max_tokens"], 4096)
        body = convert(request(reasoning_effort="high", max_tokens=1000))
        self.assertEqual(body["max_tokens"], 1000)

    def test_stream(self) -> None:
        """
        C{stream} is kept; C{stream_options} is not sent (Anthropic refuses
        unknown fields).
        """
        body = convert(request(stream=True, stream_options={"include_usage": True}))
        self.assertIs(body["stream"], True)
        self.assertNotIn("stream_options", body)
        self.assertIs(convert(request(stream=False))["stream"], False)
        self.assertNotIn("stream", convert(request()))

    def test_model(self) -> None:
        """
        C{model} is kept.
        """
        self.assertEqual(convert(request())["model"], "claude-sonnet-4-5")

    def test_unknown_fields(self) -> None:
        """
        Fields Anthropic has no counterpart for are not sent.
        """
        body = convert(
            request(
                n=2, seed=7, frequency_penalty=0.5, logprobs=True, response_format={"type": "text"}
            )
        )
        self.assertEqual(set(body), {"model", "messages", "max_tokens"})

    def test_client_body_unchanged(self) -> None:
        """
        The upstream body is a new dict: the client's body is not changed.
        """
        body = request(stop="x", tools=[{"type": "function", "function": {"name": "f"}}])
        before = json.dumps(body)
        converted = convert(body)
        self.assertIsNot(converted, body)
        self.assertEqual(json.dumps(body), before)

    def test_missing_messages(self) -> None:
        """
        No messages, an empty list or not a list → 400
        C{{"error_msg": "missing messages"}}.
        """
        for body in [{"model": "m"}, {"messages": []}, {"messages": "hi"}]:
            error = self.assertRaises(ClientError, convert, body)
            self.assertEqual(error.status, 400)
            self.assertEqual(error.message, "missing messages")
            self.assertEqual(error.document, {"error_msg": "missing messages"})

    def test_invalid_message(self) -> None:
        """
        A message that is not an object, or of an unknown role, is refused
        with a 400 naming its index.
        """
        for message in ["hi", {"content": "no role"}, {"role": "function", "content": "x"}]:
            error = self.assertRaises(ClientError, convert, request(messages=[user(), message]))
            self.assertEqual(error.status, 400)
            self.assertEqual(error.document, {"error_msg": "invalid message at index 1"})

    def test_malformed_messages(self) -> None:
        """
        Messages of a shape that cannot be converted are refused with a 400
        naming their index.
        """
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        malformed = [
            {"role": "system", "content": 7},
            {"role": "system", "content": ["text"]},
            {"role": "developer", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "developer", "content": [{"type": "text", "text": None}]},
            user(None),
            user([{"type": "text", "text": 3}]),
            user([{"type": "image_url", "image_url": {"url": ""}}]),
            user(["plain string part"]),
            {"role": "assistant", "content": 5},
            {"role": "assistant", "tool_calls": "call"},
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "x"}],
                "tool_calls": [[call]],
            },
            {"role": "tool", "content": "no id"},
            {"role": "tool", "tool_call_id": "c", "content": 5},
        ]
        for message in malformed:
            error = self.assertRaises(ClientError, convert, request(messages=[user(), message]))
            self.assertEqual(error.status, 400, message)
            self.assertIn("message at index 1", error.message, message)
            self.assertEqual(error.document, {"error_msg": error.message})

    def test_assistant_parts(self) -> None:
        """
        An assistant message's parts (text and refusal) become text blocks,
        followed by its tool calls; arguments already an object or null are
        taken as they are.
        """
        assistant = {
            "role": "assistant",
            "content": [{"type": "text", "text": "A"}, {"type": "refusal", "refusal": "B"}],
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": None}},
            ],
        }
        body = convert(request(messages=[user(), assistant]))
        self.assertEqual(
            body["messages"][1]["content"],
            [
                {"type": "text", "text": "A"},
                {"type": "text", "text": "B"},
                {"type": "tool_use", "id": "c1", "name": "f", "input": {"x": 1}},
                {"type": "tool_use", "id": "c2", "name": "g", "input": {}},
            ],
        )

    def test_empty_assistant(self) -> None:
        """
        An assistant message without content or tool calls (which Anthropic
        refuses) is left out.
        """
        messages = [user("a"), {"role": "assistant", "content": None}, user("b")]
        body = convert(request(messages=messages))
        self.assertEqual([m["content"] for m in body["messages"]], ["a", "b"])

    def test_malformed_tools(self) -> None:
        """
        C{tools} that is not a list, or a function tool without a name, is
        refused (400).
        """
        for tools in [{"type": "function"}, ["f"], [{"type": "function", "function": {}}]]:
            error = self.assertRaises(ClientError, convert, request(tools=tools))
            self.assertEqual(error.status, 400)
            self.assertIn("tool", error.message)

    def test_not_an_object(self) -> None:
        """
        A body that is not an object has no messages: 400.
        """
        error = self.assertRaises(ClientError, make_converter().convert_request, [], None)
        self.assertEqual((error.status, error.message), (400, "missing messages"))


class HeaderTests(SynchronousTestCase):
    """
    L{OpenAIToAnthropic.convert_headers} keeps the client's OpenAI key away
    from the upstream, or turns it into Anthropic's.
    """

    def test_bearer_to_api_key(self) -> None:
        """
        Without the route's credentials, the client's C{authorization:
        Bearer K} is removed and sent as C{x-api-key: K}.
        """
        headers = Headers({b"authorization": [b"Bearer sk-ant-123"]})
        OpenAIToAnthropic().convert_headers(headers, False)
        self.assertFalse(headers.hasHeader(b"authorization"))
        self.assertEqual(headers.getRawHeaders(b"x-api-key"), [b"sk-ant-123"])

    def test_other_scheme(self) -> None:
        """
        An C{authorization} that is not a bearer key is removed, and no key
        is made of it.
        """
        headers = Headers({b"authorization": [b"Basic dXNlcjpwYXNz"]})
        OpenAIToAnthropic().convert_headers(headers, False)
        self.assertFalse(headers.hasHeader(b"authorization"))
        self.assertFalse(headers.hasHeader(b"x-api-key"))

    def test_client_api_key_kept(self) -> None:
        """
        A client that also sent C{x-api-key} keeps it; its C{authorization}
        still does not go upstream.
        """
        headers = Headers({b"authorization": [b"Bearer a"], b"x-api-key": [b"b"]})
        OpenAIToAnthropic().convert_headers(headers, False)
        self.assertFalse(headers.hasHeader(b"authorization"))
        self.assertEqual(headers.getRawHeaders(b"x-api-key"), [b"b"])

    def test_own_credentials(self) -> None:
        """
        With the route's credentials (the client's already left out), the
        headers are the route's: kept, no key made.
        """
        headers = Headers({b"x-api-key": [b"route-key"]})
        OpenAIToAnthropic().convert_headers(headers, True)
        self.assertEqual(headers.getRawHeaders(b"x-api-key"), [b"route-key"])
        headers = Headers({b"authorization": [b"Bearer route-oauth"]})
        OpenAIToAnthropic().convert_headers(headers, True)
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer route-oauth"])
        self.assertFalse(headers.hasHeader(b"x-api-key"))

    def test_anthropic_version(self) -> None:
        """
        C{anthropic-version: 2023-06-01} is set when absent; one the route
        set is kept.
        """
        headers = Headers()
        OpenAIToAnthropic().convert_headers(headers, True)
        self.assertEqual(headers.getRawHeaders(b"anthropic-version"), [b"2023-06-01"])
        headers = Headers({b"anthropic-version": [b"2024-01-01"]})
        OpenAIToAnthropic().convert_headers(headers, False)
        self.assertEqual(headers.getRawHeaders(b"anthropic-version"), [b"2024-01-01"])


def anthropic_message(*content: dict[str, Any], **fields: Any) -> bytes:
    """
    An Anthropic message body holding C{content}.
    """
    message: dict[str, Any] = {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": list(content),
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 25},
    }
    message.update(fields)
    return json.dumps(message).encode()


def answer(
    body: bytes, status: int = 200, model: str | None = "claude-sonnet-4-5"
) -> tuple[Any, ExchangeContext]:
    """
    The client's answer (parsed) to an upstream answer, and the context.
    """
    context = make_context(model)
    return json.loads(make_converter().convert_answer(status, body, context)), context


class AnswerTests(SynchronousTestCase):
    """
    L{OpenAIToAnthropic.convert_answer} turns an Anthropic message into a
    C{chat.completion}, and error bodies into OpenAI errors.
    """

    def test_text(self) -> None:
        """
        A text answer becomes a whole C{chat.completion}: the message id,
        the time, the model sent upstream, the text blocks joined, the
        finish reason and the usage.
        """
        document, _ = answer(
            anthropic_message({"type": "text", "text": "Hello"}, {"type": "text", "text": " there"})
        )
        self.assertEqual(
            document,
            {
                "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
                "object": "chat.completion",
                "created": NOW,
                "model": "claude-sonnet-4-5",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello there"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": 25,
                    "total_tokens": 35,
                    "prompt_tokens_details": {"cached_tokens": 0},
                },
            },
        )

    def test_compact(self) -> None:
        """
        The answer is compact UTF-8 JSON.
        """
        context = make_context("m")
        body = make_converter().convert_answer(
            200, anthropic_message({"type": "text", "text": "héllo"}), context
        )
        self.assertEqual(body, compact(json.loads(body)))
        self.assertIn("héllo".encode(), body)

    def test_upstream_model(self) -> None:
        """
        Without a model sent upstream, the answer's model is the upstream's.
        """
        document, _ = answer(anthropic_message({"type": "text", "text": "x"}), model=None)
        self.assertEqual(document["model"], "claude-sonnet-4-5-20250929")

    def test_tool_use(self) -> None:
        """
        C{tool_use} blocks become C{tool_calls} with their input JSON-encoded;
        with no text the content is null; the context records tool calls.
        """
        document, context = answer(
            anthropic_message(
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Nice"},
                },
                stop_reason="tool_use",
            )
        )
        choice = document["choices"][0]
        self.assertIsNone(choice["message"]["content"])
        self.assertEqual(
            choice["message"]["tool_calls"],
            [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Nice"}'},
                }
            ],
        )
        self.assertEqual(choice["finish_reason"], "tool_calls")
        self.assertTrue(context.has_tool_calls)

    def test_text_and_tool_use(self) -> None:
        """
        Text next to tool calls is kept as the content.
        """
        document, _ = answer(
            anthropic_message(
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "t", "name": "f", "input": {}},
            )
        )
        message = document["choices"][0]["message"]
        self.assertEqual(message["content"], "Checking.")
        self.assertEqual(message["tool_calls"][0]["function"]["arguments"], "{}")

    def test_no_tool_calls(self) -> None:
        """
        A text-only answer has no C{tool_calls} and does not mark the
        context.
        """
        document, context = answer(anthropic_message({"type": "text", "text": "x"}))
        self.assertNotIn("tool_calls", document["choices"][0]["message"])
        self.assertFalse(context.has_tool_calls)

    def test_thinking(self) -> None:
        """
        C{thinking} blocks become C{reasoning_content}; without them there is
        none.
        """
        document, _ = answer(
            anthropic_message(
                {"type": "thinking", "thinking": "Hmm.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "xyz"},
                {"type": "text", "text": "42"},
            )
        )
        message = document["choices"][0]["message"]
        self.assertEqual((message["reasoning_content"], message["content"]), ("Hmm.", "42"))
        document, _ = answer(anthropic_message({"type": "text", "text": "42"}))
        self.assertNotIn("reasoning_content", document["choices"][0]["message"])

    def test_finish_reasons(self) -> None:
        """
        C{stop_reason} end_turn and stop_sequence → stop, max_tokens →
        length, tool_use → tool_calls (and, beyond the rules, refusal →
        content_filter, anything else → stop).
        """
        cases = [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
        ]
        for stop_reason, finish_reason in cases:
            document, _ = answer(
                anthropic_message({"type": "text", "text": "x"}, stop_reason=stop_reason)
            )
            self.assertEqual(document["choices"][0]["finish_reason"], finish_reason, stop_reason)

    def test_usage_with_cache(self) -> None:
        """
        The prompt counts input, cache-read and cache-written tokens; the
        cached ones are C{prompt_tokens_details.cached_tokens}; the context
        records the upstream's own usage object.
        """
        usage = {
            "input_tokens": 7,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 20,
            "output_tokens": 5,
        }
        document, context = answer(anthropic_message({"type": "text", "text": "x"}, usage=usage))
        self.assertEqual(
            document["usage"],
            {
                "prompt_tokens": 127,
                "completion_tokens": 5,
                "total_tokens": 132,
                "prompt_tokens_details": {"cached_tokens": 100},
            },
        )
        self.assertEqual(context.usage, usage)
        self.assertEqual(
            (context.prompt_tokens, context.completion_tokens, context.cache_read_input_tokens),
            (7, 5, 100),
        )

    def test_no_usage(self) -> None:
        """
        An answer without usage counts zero tokens and records none.
        """
        body = json.dumps({"id": "m", "content": [{"type": "text", "text": "x"}]}).encode()
        document, context = answer(body)
        self.assertEqual(document["usage"]["total_tokens"], 0)
        self.assertIsNone(context.usage)

    def test_error(self) -> None:
        """
        An Anthropic error body with an error status becomes an OpenAI
        error of the same type and message.
        """
        body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
        document, _ = answer(body, status=529)
        self.assertEqual(
            document, {"error": {"message": "Overloaded", "type": "overloaded_error", "code": None}}
        )

    def test_error_not_json(self) -> None:
        """
        An error body that does not parse is wrapped, its text the message.
        """
        document, _ = answer(b"<html>Bad gateway</html>", status=502)
        self.assertEqual(document["error"]["message"], "<html>Bad gateway</html>")
        self.assertEqual(document["error"]["type"], "upstream_error")

    def test_not_a_message(self) -> None:
        """
        A success whose body is not an Anthropic message raises
        L{ValueError} (the gateway answers it as its own error).
        """
        converter = make_converter()
        for body in [b"not json", b'{"choices": []}', b"[]"]:
            self.assertRaises(ValueError, converter.convert_answer, 200, body, make_context())

    def test_convert_error(self) -> None:
        """
        The gateway's own error is an OpenAI error body.
        """
        body = OpenAIToAnthropic().convert_error(504, "upstream timed out")
        self.assertEqual(
            json.loads(body),
            {"error": {"message": "upstream timed out", "type": "aiproxy_error", "code": None}},
        )


class StreamTests(SynchronousTestCase):
    """
    L{OpenAIToAnthropic.stream} converts Anthropic event streams into
    C{chat.completion.chunk}s ending in C{[DONE]}.
    """

    def test_text(self) -> None:
        """
        A text stream gives a role chunk, one content chunk per text delta,
        a finish chunk and C{[DONE]}, byte for byte; the ping and the block
        boundaries give nothing.
        """
        out, context, streamer = run_stream(TEXT_STREAM)
        head = {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "object": "chat.completion.chunk",
            "created": NOW,
            "model": "claude-sonnet-4-5",
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return b"data: " + compact({**head, "choices": [choice]}) + b"\n\n"

        self.assertEqual(
            out,
            chunk({"role": "assistant", "content": ""})
            + chunk({"content": "Hello"})
            + chunk({"content": ", wörld «ok»\n"})
            + chunk({}, "stop")
            + b"data: [DONE]\n\n",
        )
        self.assertTrue(context.done)
        self.assertTrue(streamer.produced)

    def test_usage_recorded(self) -> None:
        """
        The usage of C{message_start} and C{message_delta} reaches the
        context.
        """
        _, context, _ = run_stream(TEXT_STREAM)
        self.assertEqual(
            (context.prompt_tokens, context.completion_tokens, context.cache_read_input_tokens),
            (25, 15, 100),
        )
        self.assertEqual(context.cache_creation_input_tokens, 3)

    def test_upstream_model(self) -> None:
        """
        Without a model sent upstream, the chunks carry C{message_start}'s.
        """
        out, _, _ = run_stream(TEXT_STREAM, context=make_context(None))
        models = {document["model"] for document in documents(out) if isinstance(document, dict)}
        self.assertEqual(models, {"claude-sonnet-4-5-20250929"})

    def test_thinking(self) -> None:
        """
        C{thinking_delta}s become C{reasoning_content} deltas; signatures
        give nothing.
        """
        out, _, _ = run_stream(THINKING_STREAM)
        self.assertEqual(
            deltas(out),
            [
                {"role": "assistant", "content": ""},
                {"reasoning_content": "Let me think"},
                {"reasoning_content": " step by step."},
                {"content": "42"},
                {},
            ],
        )

    def test_tool_use(self) -> None:
        """
        A C{tool_use} block opens a tool call (index counting tool blocks
        only, arguments empty); its argument fragments follow, the empty one
        left out; the finish reason is C{tool_calls}; the context records
        tool calls.
        """
        out, context, _ = run_stream(TOOL_STREAM)
        self.assertEqual(
            deltas(out),
            [
                {"role": "assistant", "content": ""},
                {"content": "Let me check."},
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "toolu_01",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                },
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"location": "San'}}]},
                {
                    "tool_calls": [
                        {"index": 0, "function": {"arguments": ' Francisco", "unit": "c"}'}}
                    ]
                },
                {
                    "tool_calls": [
                        {
                            "index": 1,
                            "id": "toolu_02",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": ""},
                        }
                    ]
                },
                {"tool_calls": [{"index": 1, "function": {"arguments": '{"tz": "PST"}'}}]},
                {},
            ],
        )
        finish = [d for d in documents(out) if isinstance(d, dict)][-1]
        self.assertEqual(finish["choices"][0]["finish_reason"], "tool_calls")
        self.assertTrue(context.has_tool_calls)

    def test_tool_arguments_join(self) -> None:
        """
        A tool call's fragments, joined, are its arguments.
        """
        out, _, _ = run_stream(TOOL_STREAM)
        arguments = "".join(
            call["function"]["arguments"]
            for delta in deltas(out)
            for call in delta.get("tool_calls", ())
            if call["index"] == 0
        )
        self.assertEqual(json.loads(arguments), {"location": "San Francisco", "unit": "c"})

    def test_no_tool_calls(self) -> None:
        """
        A text stream does not mark the context as holding tool calls.
        """
        _, context, _ = run_stream(TEXT_STREAM)
        self.assertFalse(context.has_tool_calls)

    def test_finish_reasons(self) -> None:
        """
        The finish chunk maps C{stop_reason}: max_tokens → length,
        stop_sequence → stop.
        """
        for stop_reason, finish_reason in [("max_tokens", "length"), ("stop_sequence", "stop")]:
            stream = sse(
                MESSAGE_START, text_delta(0, "x"), message_delta(stop_reason), MESSAGE_STOP
            )
            out, _, _ = run_stream(stream)
            finish = [d for d in documents(out) if isinstance(d, dict)][-1]
            self.assertEqual(finish["choices"][0]["finish_reason"], finish_reason)

    def test_usage_chunk(self) -> None:
        """
        A client that asked C{stream_options.include_usage} gets a usage
        chunk (no choices) right after the finish chunk, counting cached and
        cache-written prompt tokens.
        """
        out, _, _ = run_stream(TEXT_STREAM, include_usage=True)
        parsed = documents(out)
        self.assertEqual(parsed[-1], b"[DONE]")
        usage_chunk = parsed[-2]
        self.assertEqual(parsed[-3]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(usage_chunk["choices"], [])
        self.assertEqual(usage_chunk["object"], "chat.completion.chunk")
        self.assertEqual(
            usage_chunk["usage"],
            {
                "prompt_tokens": 128,
                "completion_tokens": 15,
                "total_tokens": 143,
                "prompt_tokens_details": {"cached_tokens": 100},
            },
        )

    def test_usage_later_zero(self) -> None:
        """
        A later 0 (C{message_delta} repeating C{input_tokens: 0}) does not
        erase a count C{message_start} gave.
        """
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 9},
        }
        out, _, _ = run_stream(
            sse(MESSAGE_START, ("message_delta", delta), MESSAGE_STOP), include_usage=True
        )
        usage = documents(out)[-2]["usage"]
        self.assertEqual((usage["prompt_tokens"], usage["completion_tokens"]), (128, 9))

    def test_no_usage_chunk(self) -> None:
        """
        Without C{include_usage} no chunk lacks choices.
        """
        out, _, _ = run_stream(TEXT_STREAM)
        self.assertTrue(
            all(d["choices"] for d in documents(out) if isinstance(d, dict)),
        )

    def test_include_usage_per_request(self) -> None:
        """
        Whether to send the usage chunk is remembered per request, and only
        for a streamed one: requests sharing the converter do not mix.
        """
        converter = make_converter()
        asked, other, unstreamed = make_context("m"), make_context("m"), make_context("m")
        options = {"include_usage": True}
        converter.convert_request(request(stream=True, stream_options=options), asked)
        converter.convert_request(request(stream=True), other)
        converter.convert_request(request(stream_options=options), unstreamed)
        for context, expected in [(other, False), (asked, True), (unstreamed, False)]:
            streamer = converter.stream(context)
            out = streamer.convert_events(SSEDecoder().feed(TEXT_STREAM), context)
            has_usage = any(isinstance(d, dict) and d["choices"] == [] for d in documents(out))
            self.assertEqual(has_usage, expected)

    def test_include_usage_other_context(self) -> None:
        """
        An entry is only read by its own request: another context at the
        same address (told apart by its start time) gets no usage chunk.
        """
        converter = make_converter()
        context = make_context("m")
        converter.convert_request(
            request(stream=True, stream_options={"include_usage": True}), context
        )
        context.started += 1
        streamer = converter.stream(context)
        out = streamer.convert_events(SSEDecoder().feed(TEXT_STREAM), context)
        self.assertFalse(any(isinstance(d, dict) and d["choices"] == [] for d in documents(out)))

    def test_include_usage_bounded(self) -> None:
        """
        The remembered requests are bounded: past the limit the oldest is
        forgotten; taken entries are removed.
        """
        self.patch(openai_anthropic, "_ASKED_LIMIT", 2)
        converter = make_converter()
        contexts = [make_context("m") for _ in range(3)]
        for context in contexts:
            converter.convert_request(
                request(stream=True, stream_options={"include_usage": True}), context
            )
        self.assertEqual(len(converter._asked), 2)
        self.assertFalse(converter.stream(contexts[0])._include_usage)
        self.assertTrue(converter.stream(contexts[1])._include_usage)
        converter.convert_answer(200, anthropic_message(), contexts[2])
        self.assertEqual(converter._asked, {})

    def test_ping_only(self) -> None:
        """
        Pings give nothing: a stream of pings has produced nothing.
        """
        out, context, streamer = run_stream(sse(PING, PING))
        self.assertEqual(out, b"")
        self.assertFalse(streamer.produced)
        self.assertFalse(context.done)

    def test_other_format(self) -> None:
        """
        A stream in another format (OpenAI chunks) gives nothing, so the
        gateway can tell the stream produced no output.
        """
        stream = (
            b'data: {"id":"c","object":"chat.completion.chunk","choices":[]}\n\ndata: [DONE]\n\n'
        )
        out, _, streamer = run_stream(stream)
        self.assertEqual(out, b"")
        self.assertFalse(streamer.produced)

    def test_error_event(self) -> None:
        """
        An C{error} event becomes a final OpenAI error chunk, without
        C{[DONE]}; what follows is ignored.
        """
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        stream = sse(
            MESSAGE_START, text_delta(0, "Hi"), ("error", error), text_delta(0, "x"), MESSAGE_STOP
        )
        out, context, _ = run_stream(stream, split_events(stream))
        parsed = documents(out)
        self.assertEqual(
            parsed[-1],
            {"error": {"message": "Overloaded", "type": "overloaded_error", "code": None}},
        )
        self.assertEqual(len(parsed), 3)
        self.assertNotIn(b"[DONE]", out)
        self.assertFalse(context.done)

    def test_error_before_start(self) -> None:
        """
        An C{error} event before C{message_start} is still told to the
        client; an error that is not JSON is wrapped.
        """
        out, _, streamer = run_stream(sse(("error", b"boom")))
        self.assertEqual(
            documents(out), [{"error": {"message": "boom", "type": "upstream_error", "code": None}}]
        )
        self.assertTrue(streamer.produced)

    def test_malformed_events(self) -> None:
        """
        Events whose data is not JSON, not an object, or lacks the expected
        fields are skipped; the stream goes on.
        """
        stream = sse(
            ("message_start", {"type": "message_start", "message": "nope"}),
            ("content_block_delta", b"{not json"),
            ("content_block_delta", b"[1, 2]"),
            block_delta(0, "nope"),  # type: ignore[arg-type]
            block_delta(0, {"type": "input_json_delta", "partial_json": "{}"}),
            block_start(0, "nope"),  # type: ignore[arg-type]
            text_delta(0, "ok"),
            ("message_delta", {"type": "message_delta", "delta": None, "usage": None}),
            MESSAGE_STOP,
        )
        out, _, _ = run_stream(stream, context=make_context(None))
        parsed = documents(out)
        self.assertEqual((parsed[0]["id"], parsed[0]["model"]), ("", ""))
        self.assertEqual(deltas(out), [{"role": "assistant", "content": ""}, {"content": "ok"}, {}])
        self.assertEqual(parsed[-2]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(parsed[-1], b"[DONE]")

    def test_done_once(self) -> None:
        """
        C{[DONE]} comes once, at C{message_stop}: later events, even a
        second C{message_stop}, are ignored.
        """
        stream = TEXT_STREAM + sse(text_delta(0, "late"), MESSAGE_STOP)
        out, _, _ = run_stream(stream)
        self.assertEqual(out.count(b"[DONE]"), 1)
        self.assertTrue(out.endswith(b"data: [DONE]\n\n"))
        self.assertNotIn(b"late", out)

    def test_stop_without_delta(self) -> None:
        """
        A C{message_stop} without C{message_delta} still ends with a finish
        chunk (C{stop}) before C{[DONE]}.
        """
        out, _, _ = run_stream(sse(MESSAGE_START, text_delta(0, "x"), MESSAGE_STOP))
        parsed = documents(out)
        self.assertEqual(parsed[-2]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(parsed[-1], b"[DONE]")

    def test_before_start(self) -> None:
        """
        Events before C{message_start} are ignored.
        """
        out, _, _ = run_stream(sse(text_delta(0, "early")) + TEXT_STREAM)
        self.assertNotIn(b"early", out)
        self.assertEqual(deltas(out)[0], {"role": "assistant", "content": ""})

    def test_unnamed_events(self) -> None:
        """
        Events without an C{event} field are read by the type their data
        carries.
        """
        unnamed = TEXT_STREAM.replace(b"event: ", b": ")
        self.assertEqual(run_stream(unnamed)[0], run_stream(TEXT_STREAM)[0])
        error = b'data: {"type":"error","error":{"type":"api_error","message":"down"}}\n\n'
        out, _, _ = run_stream(error)
        self.assertEqual(
            documents(out), [{"error": {"message": "down", "type": "api_error", "code": None}}]
        )

    def test_finish_mid_message(self) -> None:
        """
        A stream cut mid-message adds nothing at its end (the relay ends it
        with its own error event), and has not set C{done}.
        """
        converter = make_converter()
        context = make_context("m")
        streamer = converter.stream(context)
        out = streamer.convert_events(
            SSEDecoder().feed(sse(MESSAGE_START, text_delta(0, "x"))), context
        )
        self.assertIn(b'"x"', out)
        self.assertEqual(streamer.finish(context), b"")
        self.assertFalse(context.done)

    def test_empty_events(self) -> None:
        """
        No events give no bytes.
        """
        context = make_context("m")
        streamer = make_converter().stream(context)
        self.assertEqual(streamer.convert_events([], context), b"")
        self.assertFalse(streamer.produced)

    def test_one_chunk_per_event(self) -> None:
        """
        Each text event is written as one compact JSON chunk, the very bytes
        the whole chunk object serialises to (the prefix made once per
        stream included), non-ASCII text unescaped.
        """
        out, _, _ = run_stream(
            sse(MESSAGE_START, text_delta(0, 'quote " and é and \u2028'), MESSAGE_STOP)
        )
        for data in data_events(out):
            if data != b"[DONE]":
                self.assertEqual(data, compact(json.loads(data)))
        self.assertIn("é".encode(), out)

    def test_block_start_text(self) -> None:
        """
        A text block that starts with text gives that text.
        """
        stream = sse(MESSAGE_START, block_start(0, {"type": "text", "text": "Hi"}), MESSAGE_STOP)
        self.assertIn({"content": "Hi"}, deltas(run_stream(stream)[0]))

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_chunking(self, data: st.DataObject) -> None:
        """
        Any split of the upstream bytes into chunks gives the same client
        bytes, with one C{[DONE]}, last, after C{message_stop}.
        """
        stream = data.draw(st.sampled_from([TEXT_STREAM, TOOL_STREAM, THINKING_STREAM]))
        cuts = sorted(
            data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=40))
        )
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        whole, _, _ = run_stream(stream, include_usage=True)
        out, context, _ = run_stream(stream, chunks, include_usage=True)
        self.assertEqual(out, whole)
        self.assertEqual(out.count(b"data: [DONE]\n\n"), 1)
        self.assertTrue(out.endswith(b"data: [DONE]\n\n"))
        self.assertTrue(context.done)


class StreamEventTests(SynchronousTestCase):
    """
    The stream converter takes decoded L{SSEEvent}s as the relay gives them.
    """

    def test_events(self) -> None:
        """
        Events given one by one produce the same bytes as all at once.
        """
        events = SSEDecoder().feed(TEXT_STREAM)
        self.assertIsInstance(events[0], SSEEvent)
        context = make_context("m")
        converter = make_converter()
        one = converter.stream(context)
        together = one.convert_events(events, context)
        other = converter.stream(make_context("m"))
        apart = b"".join(other.convert_events([event], context) for event in events)
        self.assertEqual(apart, together)
