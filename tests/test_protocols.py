# -*- test-case-name: tests.test_protocols -*-
"""
Tests for L{aiproxy.stream.protocols}: reading model, usage, text, tool calls and
the end of each protocol's responses, and the error events that end a cut
stream.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from aiproxy.context import ExchangeContext
from aiproxy.stream import observers
from aiproxy.stream.observers import observer_for
from aiproxy.stream.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    PASSTHROUGH,
    error_event,
)
from aiproxy.stream.sse import SSEDecoder, SSEEvent


def sse(*events: tuple[str | None, Any]) -> bytes:
    """
    An SSE stream of C{(event name or None, data)}; data that is not
    bytes is written as JSON.
    """
    out = b""
    for name, data in events:
        if name is not None:
            out += b"event: " + name.encode() + b"\n"
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        out += b"data: " + raw + b"\n\n"
    return out


def observe(
    protocol: str, stream: bytes, wants_text: bool = False, chunk: int = 0
) -> ExchangeContext:
    """
    Decode C{stream} (in chunks of C{chunk} bytes, or whole) and let the
    protocol's observer read it into a fresh context.
    """
    context = ExchangeContext("route", "instance", 0.0)
    context.wants_text = wants_text
    decoder = SSEDecoder()
    observer = observer_for(protocol)
    pieces = [stream[i : i + chunk] for i in range(0, len(stream), chunk)] if chunk else [stream]
    for piece in pieces:
        events = decoder.feed(piece)
        if events:
            observer.observe_events(events, context)
    return context


def chat_chunk(content: str | None = None, **extra: Any) -> dict[str, Any]:
    """
    One C{chat.completion.chunk}.
    """
    delta: dict[str, Any] = {} if content is None else {"content": content}
    delta.update(extra.pop("delta", {}))
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini-2024",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    chunk.update(extra)
    return chunk


OPENAI_USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 30,
    "total_tokens": 42,
    "prompt_tokens_details": {"cached_tokens": 8},
    "completion_tokens_details": {"reasoning_tokens": 16},
}

OPENAI_STREAM = sse(
    (None, chat_chunk(delta={"role": "assistant"}, usage=None)),
    (None, chat_chunk("Hel", usage=None)),
    (None, chat_chunk("lo", usage=None)),
    (None, {**chat_chunk(), "choices": [], "usage": OPENAI_USAGE}),
    (None, b"[DONE]"),
)

ANTHROPIC_STREAM = sse(
    (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "m1",
                "model": "claude-sonnet-4",
                "content": [],
                "usage": {
                    "input_tokens": 25,
                    "output_tokens": 1,
                    "cache_read_input_tokens": 5,
                    "cache_creation_input_tokens": 3,
                },
            },
        },
    ),
    (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    ("ping", {"type": "ping"}),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi "}},
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "there"},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 15},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
)

RESPONSES_USAGE = {
    "input_tokens": 20,
    "output_tokens": 9,
    "total_tokens": 29,
    "input_tokens_details": {"cached_tokens": 4},
    "output_tokens_details": {"reasoning_tokens": 2},
}

RESPONSES_STREAM = sse(
    (
        "response.created",
        {"type": "response.created", "response": {"model": "gpt-4.1", "usage": None, "output": []}},
    ),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Good "}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "day"}),
    (
        "response.completed",
        {
            "type": "response.completed",
            "response": {
                "model": "gpt-4.1",
                "usage": RESPONSES_USAGE,
                "output": [
                    {"type": "message", "content": [{"type": "output_text", "text": "Good day"}]}
                ],
            },
        },
    ),
)


class OpenAIChatTests(SynchronousTestCase):
    """
    OpenAI chat completions, streamed and whole.
    """

    def test_stream(self) -> None:
        """
        A stream gives the model, the usage with cached and reasoning
        tokens, and C{done} at C{[DONE]}.
        """
        context = observe(OPENAI_CHAT, OPENAI_STREAM)
        self.assertEqual(context.llm_model, "gpt-4o-mini-2024")
        self.assertEqual(
            (context.prompt_tokens, context.completion_tokens, context.total_tokens),
            (12, 30, 42),
        )
        self.assertEqual(context.cache_read_input_tokens, 8)
        self.assertEqual(context.reasoning_tokens, 16)
        self.assertTrue(context.done)
        self.assertFalse(context.has_tool_calls)

    def test_any_split(self) -> None:
        """
        The same figures come out whatever the chunking.
        """
        whole = observe(OPENAI_CHAT, OPENAI_STREAM, wants_text=True).record()
        for size in (1, 7, 64):
            self.assertEqual(
                observe(OPENAI_CHAT, OPENAI_STREAM, wants_text=True, chunk=size).record(), whole
            )

    def test_not_done_without_terminator(self) -> None:
        """
        A stream cut before C{[DONE]} is not done.
        """
        context = observe(OPENAI_CHAT, OPENAI_STREAM[: OPENAI_STREAM.index(b"data: [DONE]")])
        self.assertFalse(context.done)
        self.assertEqual(context.total_tokens, 42)

    def test_text_only_when_wanted(self) -> None:
        """
        Text is collected only when a filter wants it.
        """
        self.assertEqual(observe(OPENAI_CHAT, OPENAI_STREAM).text, "")
        self.assertEqual(observe(OPENAI_CHAT, OPENAI_STREAM, wants_text=True).text, "Hello")

    def test_null_usage_not_parsed(self) -> None:
        """
        Chunks with C{"usage": null} are not parsed as JSON once the model
        is known (the hot path); only the chunk with a usage object is.
        """
        parsed: list[bytes] = []
        original = observers._json

        def counting(data: bytes) -> Any:
            parsed.append(data)
            return original(data)

        self.patch(observers, "_json", counting)
        context = observe(OPENAI_CHAT, OPENAI_STREAM)
        self.assertEqual(len(parsed), 2)
        self.assertIn(b'"role"', parsed[0])
        self.assertIn(b'"prompt_tokens"', parsed[1])
        self.assertEqual(context.total_tokens, 42)

    def test_usage_with_blanks(self) -> None:
        """
        A usage object written with extra blanks after the colon is read.
        """
        stream = (
            sse((None, {"model": "m"}))
            + b'data: {"choices": [], "usage":    \t  {"prompt_tokens": 3, "completion_tokens": 4}}\n\n'
        )
        context = observe(OPENAI_CHAT, stream)
        self.assertEqual(context.total_tokens, 7)

    def test_usage_word_in_text(self) -> None:
        """
        The word C{usage} in the generated text is not taken for usage.
        """
        stream = sse((None, chat_chunk('"usage": {"prompt_tokens": 1}')))
        context = observe(OPENAI_CHAT, stream)
        self.assertIsNone(context.prompt_tokens)

    def test_tool_calls(self) -> None:
        """
        A delta with tool calls sets C{has_tool_calls}.
        """
        call = {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": ""},
        }
        context = observe(OPENAI_CHAT, sse((None, chat_chunk(delta={"tool_calls": [call]}))))
        self.assertTrue(context.has_tool_calls)

    def test_empty_tool_calls(self) -> None:
        """
        C{"tool_calls": null} or C{[]} (sent on every delta by some
        compatible servers) is not a tool call.
        """
        stream = sse(
            (None, chat_chunk("a", delta={"tool_calls": None})),
            (None, chat_chunk("b", delta={"tool_calls": []})),
            (None, b'{"choices":[{"delta":{"content":"c","tool_calls": [ ]}}]}'),
        )
        self.assertFalse(observe(OPENAI_CHAT, stream).has_tool_calls)

    def test_whole_body(self) -> None:
        """
        A whole C{chat.completion} gives the model, usage, text and tool
        calls.
        """
        body = {
            "model": "gpt-4o",
            "choices": [
                {"message": {"role": "assistant", "content": "Hi!", "tool_calls": [{"id": "c"}]}}
            ],
            "usage": OPENAI_USAGE,
        }
        context = ExchangeContext("r", "i", 0.0)
        observer_for(OPENAI_CHAT).observe_body(json.dumps(body).encode(), context)
        self.assertEqual(context.llm_model, "gpt-4o")
        self.assertEqual(context.total_tokens, 42)
        self.assertEqual(context.reasoning_tokens, 16)
        self.assertEqual(context.text, "Hi!")
        self.assertTrue(context.has_tool_calls)

    def test_whole_body_not_json(self) -> None:
        """
        A body that is not JSON gives no figures and no error.
        """
        context = ExchangeContext("r", "i", 0.0)
        observer_for(OPENAI_CHAT).observe_body(b"<html>bad gateway</html>", context)
        self.assertIsNone(context.total_tokens)


class AnthropicTests(SynchronousTestCase):
    """
    Anthropic messages, streamed and whole.
    """

    def test_stream(self) -> None:
        """
        Usage is merged from C{message_start} and C{message_delta} (total =
        input + output), with cache tokens; C{message_stop} sets C{done}.
        """
        context = observe(ANTHROPIC_MESSAGES, ANTHROPIC_STREAM)
        self.assertEqual(context.llm_model, "claude-sonnet-4")
        self.assertEqual(
            (context.prompt_tokens, context.completion_tokens, context.total_tokens), (25, 15, 40)
        )
        self.assertEqual(
            (context.cache_read_input_tokens, context.cache_creation_input_tokens), (5, 3)
        )
        self.assertTrue(context.done)
        self.assertFalse(context.has_tool_calls)

    def test_text(self) -> None:
        """
        Text deltas are collected when wanted, and only then.
        """
        self.assertEqual(
            observe(ANTHROPIC_MESSAGES, ANTHROPIC_STREAM, wants_text=True).text, "Hi there"
        )
        self.assertEqual(observe(ANTHROPIC_MESSAGES, ANTHROPIC_STREAM).text, "")

    def test_delta_with_zero_input(self) -> None:
        """
        A C{message_delta} carrying C{input_tokens: 0} does not erase the
        prompt count of C{message_start}.
        """
        stream = ANTHROPIC_STREAM.replace(
            b'"usage": {"output_tokens": 15}', b'"usage": {"input_tokens": 0, "output_tokens": 15}'
        )
        context = observe(ANTHROPIC_MESSAGES, stream)
        self.assertEqual((context.prompt_tokens, context.total_tokens), (25, 40))

    def test_tool_use(self) -> None:
        """
        A C{tool_use} content block sets C{has_tool_calls}.
        """
        stream = sse(
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 1,
                    "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}},
                },
            )
        )
        self.assertTrue(observe(ANTHROPIC_MESSAGES, stream).has_tool_calls)

    def test_whole_body(self) -> None:
        """
        A whole C{message} gives model, usage, text and tool use.
        """
        body = {
            "model": "claude-3",
            "content": [
                {"type": "text", "text": "Hello"},
                {"type": "tool_use", "id": "t", "name": "f", "input": {}},
            ],
            "usage": {"input_tokens": 3, "output_tokens": 4},
        }
        context = ExchangeContext("r", "i", 0.0)
        observer_for(ANTHROPIC_MESSAGES).observe_body(json.dumps(body).encode(), context)
        self.assertEqual(
            (context.llm_model, context.total_tokens, context.text), ("claude-3", 7, "Hello")
        )
        self.assertTrue(context.has_tool_calls)


class ResponsesTests(SynchronousTestCase):
    """
    OpenAI Responses, streamed and whole.
    """

    def test_stream(self) -> None:
        """
        C{response.completed} gives the usage (with cached and reasoning
        tokens) and sets C{done}; the model is read.
        """
        context = observe(OPENAI_RESPONSES, RESPONSES_STREAM)
        self.assertEqual(context.llm_model, "gpt-4.1")
        self.assertEqual(
            (context.prompt_tokens, context.completion_tokens, context.total_tokens), (20, 9, 29)
        )
        self.assertEqual((context.cache_read_input_tokens, context.reasoning_tokens), (4, 2))
        self.assertTrue(context.done)

    def test_text_once(self) -> None:
        """
        Streamed text comes from the deltas, once (not again from
        C{response.completed}).
        """
        self.assertEqual(
            observe(OPENAI_RESPONSES, RESPONSES_STREAM, wants_text=True).text, "Good day"
        )
        self.assertEqual(observe(OPENAI_RESPONSES, RESPONSES_STREAM).text, "")

    def test_not_done_before_completed(self) -> None:
        """
        Without C{response.completed} the stream is not done.
        """
        cut = RESPONSES_STREAM[: RESPONSES_STREAM.index(b"event: response.completed")]
        self.assertFalse(observe(OPENAI_RESPONSES, cut).done)

    def test_function_call(self) -> None:
        """
        A C{function_call} output item sets C{has_tool_calls}.
        """
        stream = sse(
            (
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "item": {"type": "function_call", "name": "f"},
                },
            )
        )
        self.assertTrue(observe(OPENAI_RESPONSES, stream).has_tool_calls)

    def test_whole_body(self) -> None:
        """
        A whole C{response} gives model, usage, output text and function
        calls.
        """
        body = {
            "model": "gpt-4.1",
            "usage": RESPONSES_USAGE,
            "output": [
                {"type": "message", "content": [{"type": "output_text", "text": "Good day"}]},
                {"type": "function_call", "name": "f", "arguments": "{}"},
            ],
        }
        context = ExchangeContext("r", "i", 0.0)
        observer_for(OPENAI_RESPONSES).observe_body(json.dumps(body).encode(), context)
        self.assertEqual(
            (context.llm_model, context.total_tokens, context.text), ("gpt-4.1", 29, "Good day")
        )
        self.assertTrue(context.has_tool_calls)


class PassthroughTests(SynchronousTestCase):
    """
    Other protocols: only C{[DONE]}, and a whole body's model and usage.
    """

    def test_done(self) -> None:
        """
        C{[DONE]} ends a passthrough stream; other events give nothing.
        """
        for protocol in (PASSTHROUGH, OPENAI_EMBEDDINGS):
            context = observe(
                protocol,
                sse((None, {"model": "m", "usage": {"prompt_tokens": 1}}), (None, b"[DONE]")),
            )
            self.assertTrue(context.done)
            self.assertIsNone(context.prompt_tokens)

    def test_embeddings_body(self) -> None:
        """
        An embeddings body gives its model and usage.
        """
        body = {
            "model": "text-embedding-3-small",
            "data": [],
            "usage": {"prompt_tokens": 5, "total_tokens": 5},
        }
        context = ExchangeContext("r", "i", 0.0)
        observer_for(OPENAI_EMBEDDINGS).observe_body(json.dumps(body).encode(), context)
        self.assertEqual(
            (context.llm_model, context.prompt_tokens, context.total_tokens),
            ("text-embedding-3-small", 5, 5),
        )


class ModelTests(SynchronousTestCase):
    """
    C{llm_model} is the model sent upstream; the response's model is only
    used when the request named none.
    """

    def test_known_model_kept(self) -> None:
        """
        A model set from the request is kept, whatever the response names,
        for every protocol, streamed or whole.
        """
        whole = {
            OPENAI_CHAT: {"model": "dated-2024", "choices": []},
            ANTHROPIC_MESSAGES: {"model": "dated-2024", "content": []},
            OPENAI_RESPONSES: {"model": "dated-2024", "output": []},
            PASSTHROUGH: {"model": "dated-2024"},
        }
        streams = {
            OPENAI_CHAT: OPENAI_STREAM,
            ANTHROPIC_MESSAGES: ANTHROPIC_STREAM,
            OPENAI_RESPONSES: RESPONSES_STREAM,
        }
        for protocol, body in whole.items():
            context = ExchangeContext("r", "i", 0.0)
            context.llm_model = "sent"
            observer_for(protocol).observe_body(json.dumps(body).encode(), context)
            self.assertEqual(context.llm_model, "sent", protocol)
        for protocol, stream in streams.items():
            context = ExchangeContext("r", "i", 0.0)
            context.llm_model = "sent"
            for wants_text in (False, True):
                context.wants_text = wants_text
                observer_for(protocol).observe_events(SSEDecoder().feed(stream), context)
                self.assertEqual(context.llm_model, "sent", protocol)


class ErrorEventTests(SynchronousTestCase):
    """
    L{error_event}: the final event of a cut stream, in the client's
    protocol, never a C{[DONE]}.
    """

    def decode(self, raw: bytes) -> list[SSEEvent]:
        """
        The events of C{raw}, which must be one complete SSE event.
        """
        decoder = SSEDecoder()
        events = decoder.feed(raw)
        self.assertEqual(decoder.pending, 0)
        self.assertEqual(len(events), 1)
        self.assertNotIn(b"[DONE]", raw)
        return events

    def test_openai(self) -> None:
        """
        OpenAI-shaped clients get C{data: {"error": {...}}} with the message
        and the abort reason as code.
        """
        for protocol in (OPENAI_CHAT, PASSTHROUGH, OPENAI_EMBEDDINGS):
            raw = error_event(protocol, "max_stream_duration_ms exceeded", "max_stream_duration_ms")
            self.assertTrue(raw.startswith(b"data: "))
            [event] = self.decode(raw)
            self.assertEqual(event.event, "message")
            self.assertEqual(
                json.loads(event.data),
                {
                    "error": {
                        "message": "max_stream_duration_ms exceeded",
                        "type": "aiproxy_error",
                        "code": "max_stream_duration_ms",
                    }
                },
            )

    def test_anthropic(self) -> None:
        """
        Anthropic clients get C{event: error} with an Anthropic error object.
        """
        raw = error_event(ANTHROPIC_MESSAGES, "upstream failed", "upstream_error")
        self.assertTrue(raw.startswith(b"event: error\n"))
        [event] = self.decode(raw)
        self.assertEqual(event.event, "error")
        self.assertEqual(
            json.loads(event.data),
            {"type": "error", "error": {"type": "api_error", "message": "upstream failed"}},
        )

    def test_responses(self) -> None:
        """
        Responses clients get C{event: error} with code and message.
        """
        [event] = self.decode(error_event(OPENAI_RESPONSES, "cut", "max_response_bytes"))
        self.assertEqual(event.event, "error")
        document = json.loads(event.data)
        self.assertEqual(
            (document["type"], document["code"], document["message"]),
            ("error", "max_response_bytes", "cut"),
        )

    def test_message_escaped(self) -> None:
        """
        A message with quotes and newlines stays one valid event.
        """
        for protocol in (OPENAI_CHAT, ANTHROPIC_MESSAGES):
            [event] = self.decode(error_event(protocol, 'bad "x"\n\nagain', "r"))
            self.assertEqual(json.loads(event.data)["error"]["message"], 'bad "x"\n\nagain')
