# -*- test-case-name: tests.test_convert_anthropic_openai -*-
"""
Tests for L{aiproxy.convert.anthropic_openai}: an Anthropic Messages client
served by an OpenAI chat upstream (CONVERSION.md section 4), its requests,
headers, answers, errors and streams.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from aiproxy.context import ExchangeContext
from aiproxy.convert.anthropic_openai import (
    ANTHROPIC_TO_OPENAI,
    AnthropicToOpenAI,
    openai_tool_name,
    strict_schema,
)
from aiproxy.interfaces import IConverter, IStreamConverter
from aiproxy.stream.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT
from aiproxy.stream.sse import SSEDecoder
from aiproxy.upstream.request import ClientError
from tests.helpers import (
    block_delta,
    block_start,
    block_stop,
    compact,
    feed_stream,
    make_context,
    user,
)


def request(**fields: Any) -> dict[str, Any]:
    """
    An Anthropic Messages request of one user message, with C{fields}.
    """
    body: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [user()]}
    body.update(fields)
    return body


def convert(body: Any, converter: AnthropicToOpenAI | None = None) -> dict[str, Any]:
    """
    The upstream body of C{body}.
    """
    converter = converter or AnthropicToOpenAI()
    result: dict[str, Any] = converter.convert_request(body, make_context())
    return result


def messages(**fields: Any) -> list[dict[str, Any]]:
    """
    The upstream messages of a request with C{fields}.
    """
    result: list[dict[str, Any]] = convert(request(**fields))["messages"]
    return result


def hashed(name: str, sanitized: str) -> str:
    """
    The name a tool called C{name} gets upstream, C{sanitized} being the
    name with its invalid bytes replaced.
    """
    return sanitized[:55] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]


def tool(name: str, **fields: Any) -> dict[str, Any]:
    """
    A client tool.
    """
    return {
        "name": name,
        "description": f"the {name} tool",
        "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}},
        **fields,
    }


class InterfaceTests(SynchronousTestCase):
    """
    The converter and its stream converter provide their interfaces.
    """

    def test_converter(self) -> None:
        """
        L{ANTHROPIC_TO_OPENAI} is an L{IConverter} from Anthropic Messages
        to OpenAI chat.
        """
        self.assertTrue(verifyObject(IConverter, ANTHROPIC_TO_OPENAI))
        self.assertIsInstance(ANTHROPIC_TO_OPENAI, AnthropicToOpenAI)
        self.assertEqual(ANTHROPIC_TO_OPENAI.client_protocol, ANTHROPIC_MESSAGES)
        self.assertEqual(ANTHROPIC_TO_OPENAI.upstream_protocol, OPENAI_CHAT)

    def test_stream_converter(self) -> None:
        """
        L{AnthropicToOpenAI.stream} gives a fresh L{IStreamConverter} that
        has produced nothing yet.
        """
        context = make_context()
        stream = ANTHROPIC_TO_OPENAI.stream(context)
        self.assertTrue(verifyObject(IStreamConverter, stream))
        self.assertFalse(stream.produced)
        self.assertIsNot(ANTHROPIC_TO_OPENAI.stream(context), stream)


class RequestTests(SynchronousTestCase):
    """
    L{AnthropicToOpenAI.convert_request}: the OpenAI chat request of an
    Anthropic Messages request.
    """

    def test_missing_messages(self) -> None:
        """
        No messages, an empty list, or not a list → 400
        C{{"error_msg": "missing messages"}}.
        """
        for body in [{"model": "m"}, {"messages": []}, {"messages": "hi"}, {"messages": {}}]:
            error = self.assertRaises(ClientError, convert, body)
            self.assertEqual(error.status, 400)
            self.assertEqual(error.message, "missing messages")
            self.assertEqual(error.document, {"error_msg": "missing messages"})

    def test_not_an_object(self) -> None:
        """
        A body that is not an object is refused as having no messages.
        """
        error = self.assertRaises(ClientError, convert, [user()])
        self.assertEqual(error.document, {"error_msg": "missing messages"})

    def test_invalid_message(self) -> None:
        """
        A message that is not an object, or has no string role, is refused
        with a 400 naming its (0-based) index.
        """
        for message in ["hi", None, {"content": "no role"}, {"role": 3, "content": "x"}]:
            body = request(messages=[user(), message])
            error = self.assertRaises(ClientError, convert, body)
            self.assertEqual(error.status, 400)
            self.assertEqual(error.document, {"error_msg": "invalid message at index 1"})

    def test_invalid_content(self) -> None:
        """
        A message whose content is neither a string nor a list of blocks is
        refused naming its index.
        """
        for content in [None, 5, {"type": "text", "text": "x"}]:
            body = request(messages=[user(content)])
            error = self.assertRaises(ClientError, convert, body)
            self.assertEqual(error.document, {"error_msg": "invalid message content at index 0"})

    def test_whitelist(self) -> None:
        """
        Only the fields the conversion knows reach the upstream: Claude
        Code's C{context_management}, C{top_k} and any other field are
        dropped.
        """
        body = request(
            context_management={"edits": []},
            top_k=5,
            anthropic_beta=["x"],
            container="c",
            mcp_servers=[],
        )
        self.assertEqual(
            convert(body),
            {
                "model": "claude-sonnet-4-5",
                "max_completion_tokens": 1024,
                "messages": [{"role": "user", "content": "Hello"}],
            },
        )

    def test_kept_fields(self) -> None:
        """
        C{model}, C{temperature} (0 too), C{top_p} and C{service_tier} are
        kept as they are.
        """
        body = convert(request(temperature=0, top_p=0.5, service_tier="auto"))
        self.assertEqual(body["model"], "claude-sonnet-4-5")
        self.assertEqual(body["temperature"], 0)
        self.assertEqual(body["top_p"], 0.5)
        self.assertEqual(body["service_tier"], "auto")

    def test_non_string_model(self) -> None:
        """
        A model that is not a string is not sent.
        """
        self.assertNotIn("model", convert(request(model=5)))

    def test_stream(self) -> None:
        """
        A streamed request asks for the usage chunk; C{stream: false} is
        kept alone, and no C{stream} gives none.
        """
        body = convert(request(stream=True))
        self.assertIs(body["stream"], True)
        self.assertEqual(body["stream_options"], {"include_usage": True})
        body = convert(request(stream=False))
        self.assertIs(body["stream"], False)
        self.assertNotIn("stream_options", body)
        self.assertNotIn("stream", convert(request()))

    def test_max_tokens(self) -> None:
        """
        C{max_tokens} is sent as C{max_completion_tokens}, never as
        C{max_tokens}.
        """
        body = convert(request(max_tokens=128000))
        self.assertEqual(body["max_completion_tokens"], 128000)
        self.assertNotIn("max_tokens", body)
        body = convert({"messages": [user()]})
        self.assertNotIn("max_completion_tokens", body)
        self.assertNotIn("max_tokens", body)

    def test_stop_sequences(self) -> None:
        """
        C{stop_sequences} → C{stop}.
        """
        body = convert(request(stop_sequences=["END", "STOP"]))
        self.assertEqual(body["stop"], ["END", "STOP"])
        self.assertNotIn("stop_sequences", body)

    def test_user_id(self) -> None:
        """
        C{metadata.user_id} → C{user} (Claude Code's JSON string too); other
        metadata is dropped.
        """
        user_id = json.dumps({"device_id": "d", "session_id": "s"})
        body = convert(request(metadata={"user_id": user_id, "other": 1}))
        self.assertEqual(body["user"], user_id)
        self.assertNotIn("metadata", body)
        self.assertNotIn("user", convert(request(metadata={"user_id": 5})))

    def test_thinking_enabled(self) -> None:
        """
        Enabled thinking → C{reasoning_effort} by its budget: ≥4096 high,
        ≥2048 medium, ≥1024 low, else (or no budget) minimal.
        """
        cases = [
            (16000, "high"),
            (4096, "high"),
            (4095, "medium"),
            (2048, "medium"),
            (2047, "low"),
            (1024, "low"),
            (1023, "minimal"),
            (None, "minimal"),
        ]
        for budget, effort in cases:
            thinking: dict[str, Any] = {"type": "enabled"}
            if budget is not None:
                thinking["budget_tokens"] = budget
            body = convert(request(thinking=thinking))
            self.assertEqual(body["reasoning_effort"], effort, budget)
            self.assertNotIn("thinking", body)

    def test_thinking_adaptive(self) -> None:
        """
        Adaptive thinking takes C{output_config.effort} as it is, else
        medium; C{display} and the rest of C{output_config} are dropped.
        """
        thinking = {"type": "adaptive", "display": "omitted"}
        body = convert(request(thinking=thinking, output_config={"effort": "xhigh"}))
        self.assertEqual(body["reasoning_effort"], "xhigh")
        self.assertNotIn("output_config", body)
        for config in [None, {}, {"effort": ""}, {"effort": 3}]:
            body = convert(request(thinking=thinking, output_config=config))
            self.assertEqual(body["reasoning_effort"], "medium")

    def test_thinking_disabled(self) -> None:
        """
        Disabled (or unknown) thinking sends no reasoning effort.
        """
        for thinking in [{"type": "disabled"}, {"type": "other"}, "yes", None]:
            self.assertNotIn("reasoning_effort", convert(request(thinking=thinking)))

    def test_tools(self) -> None:
        """
        Tools become functions: name, description, and the input schema as
        parameters (C{$schema} kept); C{cache_control}, C{defer_loading} and
        any other tool key are dropped.
        """
        schema = {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
        }
        tools = [
            {
                "name": "Bash",
                "description": "Run a command",
                "input_schema": schema,
                "cache_control": {"type": "ephemeral"},
            },
            {"name": "Later", "input_schema": {"type": "object"}, "defer_loading": True},
        ]
        self.assertEqual(
            convert(request(tools=tools))["tools"],
            [
                {
                    "type": "function",
                    "function": {
                        "name": "Bash",
                        "description": "Run a command",
                        "parameters": schema,
                    },
                },
                {
                    "type": "function",
                    "function": {"name": "Later", "parameters": {"type": "object"}},
                },
            ],
        )

    def test_builtin_tools(self) -> None:
        """
        Anthropic's built-in tools (computer, bash, text editor, web search,
        code execution) and tools without a name are dropped.
        """
        builtins = [
            {"type": "computer_20250124", "name": "computer"},
            {"type": "bash_20250124", "name": "bash"},
            {"type": "text_editor_20250429", "name": "str_replace_based_edit_tool"},
            {"type": "web_search_20250305", "name": "web_search"},
            {"type": "code_execution_20250522", "name": "code_execution"},
            {"description": "no name"},
            {"name": ""},
            "not a tool",
        ]
        body = convert(request(tools=[*builtins, tool("Read", type="custom")]))
        self.assertEqual([t["function"]["name"] for t in body["tools"]], ["Read"])

    def test_tool_name_rewritten(self) -> None:
        """
        A tool name with characters outside C{[a-zA-Z0-9_-]} becomes its
        sanitized first 55 characters, C{_} and 8 hex digits of the
        SHA-256 of the name; a valid name is kept.
        """
        name = "mcp__server__get.weather now"
        body = convert(request(tools=[tool(name), tool("valid_Name-1")]))
        self.assertEqual(
            [t["function"]["name"] for t in body["tools"]],
            [hashed(name, "mcp__server__get_weather_now"), "valid_Name-1"],
        )

    def test_tool_name_long(self) -> None:
        """
        A name of 64 characters is kept; a longer one is cut to 55 and
        hashed (64 characters upstream).
        """
        self.assertEqual(openai_tool_name("a" * 64), "a" * 64)
        long = "b" * 70
        self.assertEqual(openai_tool_name(long), hashed(long, long))
        self.assertEqual(len(openai_tool_name(long)), 64)

    def test_tool_name_non_ascii(self) -> None:
        """
        Names are sanitized byte by byte, as APISIX does: a non-ASCII
        character becomes one C{_} per UTF-8 byte.
        """
        self.assertEqual(openai_tool_name("é"), hashed("é", "__"))

    def test_tool_use_names(self) -> None:
        """
        A C{tool_use} block of the history gets the same rewritten name as
        its tool, so the two agree upstream.
        """
        name = "ns:tool"
        history = [
            user(),
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": name, "input": {}}],
            },
        ]
        body = convert(request(tools=[tool(name)], messages=history))
        [call] = body["messages"][1]["tool_calls"]
        self.assertEqual(call["function"]["name"], body["tools"][0]["function"]["name"])
        self.assertEqual(call["function"]["name"], hashed(name, "ns_tool"))

    def test_tool_choice(self) -> None:
        """
        C{tool_choice}: auto → auto, any → required, none → none, a named
        tool → that function (by its upstream name).
        """
        tools = [tool("Read"), tool("my.tool")]
        cases = [
            ({"type": "auto"}, "auto"),
            ({"type": "any"}, "required"),
            ({"type": "none"}, "none"),
            ({"type": "tool", "name": "Read"}, {"type": "function", "function": {"name": "Read"}}),
            (
                {"type": "tool", "name": "my.tool"},
                {"type": "function", "function": {"name": hashed("my.tool", "my_tool")}},
            ),
        ]
        for choice, expected in cases:
            body = convert(request(tools=tools, tool_choice=choice))
            self.assertEqual(body["tool_choice"], expected)
        body = convert(request(tools=tools, tool_choice={"type": "unknown"}))
        self.assertNotIn("tool_choice", body)

    def test_disable_parallel_tool_use(self) -> None:
        """
        C{disable_parallel_tool_use: true} → C{parallel_tool_calls: false}.
        """
        choice = {"type": "auto", "disable_parallel_tool_use": True}
        body = convert(request(tools=[tool("Read")], tool_choice=choice))
        self.assertIs(body["parallel_tool_calls"], False)
        self.assertNotIn("disable_parallel_tool_use", json.dumps(body))
        choice = {"type": "auto", "disable_parallel_tool_use": False}
        body = convert(request(tools=[tool("Read")], tool_choice=choice))
        self.assertNotIn("parallel_tool_calls", body)

    def test_tool_choice_without_tools(self) -> None:
        """
        Without a tool left (none given, or only built-ins),
        C{tool_choice} and C{parallel_tool_calls} are dropped too.
        """
        choice = {"type": "any", "disable_parallel_tool_use": True}
        for tools in [None, [], [{"type": "bash_20250124", "name": "bash"}]]:
            body = convert(request(tools=tools, tool_choice=choice))
            for key in ("tools", "tool_choice", "parallel_tool_calls"):
                self.assertNotIn(key, body)

    def test_output_format(self) -> None:
        """
        A C{json_schema} C{output_format} → a strict C{response_format}
        named C{structured_output}: objects closed, all their properties
        required, sorted.
        """
        schema = {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name"],
        }
        body = convert(request(output_format={"type": "json_schema", "schema": schema}))
        self.assertEqual(
            body["response_format"],
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "structured_output",
                    "schema": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                        "required": ["age", "name"],
                        "additionalProperties": False,
                    },
                    "strict": True,
                },
            },
        )
        self.assertNotIn("output_format", body)

    def test_output_config_format(self) -> None:
        """
        C{output_config.format} gives the same; C{output_format} wins when
        both are given; another format type or an empty schema gives none.
        """
        first = {"type": "object", "properties": {"a": {"type": "string"}}}
        second = {"type": "object", "properties": {"b": {"type": "string"}}}
        body = convert(request(output_config={"format": {"type": "json_schema", "schema": first}}))
        self.assertEqual(body["response_format"]["json_schema"]["schema"]["required"], ["a"])
        body = convert(
            request(
                output_format={"type": "json_schema", "schema": second},
                output_config={"format": {"type": "json_schema", "schema": first}},
            )
        )
        self.assertEqual(body["response_format"]["json_schema"]["schema"]["required"], ["b"])
        for output_format in [{"type": "json_object"}, {"type": "json_schema", "schema": {}}]:
            self.assertNotIn("response_format", convert(request(output_format=output_format)))

    def test_strict_schema_nested(self) -> None:
        """
        Nested objects, array items, C{anyOf}/C{oneOf}/C{allOf} and
        C{$defs}/C{definitions} are made strict too; an object without
        properties and the client's schema are left alone.
        """
        inner = {"type": "object", "properties": {"z": {}, "y": {}}}
        schema = {
            "type": "object",
            "properties": {"list": {"type": "array", "items": copy.deepcopy(inner)}},
            "anyOf": [copy.deepcopy(inner)],
            "oneOf": [copy.deepcopy(inner)],
            "allOf": [copy.deepcopy(inner)],
            "$defs": {"d": copy.deepcopy(inner)},
            "definitions": {"e": copy.deepcopy(inner)},
        }
        original = copy.deepcopy(schema)
        strict = strict_schema(schema)
        self.assertEqual(schema, original)
        closed = {**inner, "additionalProperties": False, "required": ["y", "z"]}
        self.assertEqual(strict["properties"]["list"]["items"], closed)
        for key in ("anyOf", "oneOf", "allOf"):
            self.assertEqual(strict[key], [closed])
        self.assertEqual(strict["$defs"], {"d": closed})
        self.assertEqual(strict["definitions"], {"e": closed})
        self.assertEqual(strict_schema({"type": "object"}), {"type": "object"})

    def test_system_string(self) -> None:
        """
        A C{system} string → the first message, a system message; an empty
        one → none.
        """
        self.assertEqual(
            messages(system="Be brief."),
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        )
        self.assertEqual(messages(system=""), [{"role": "user", "content": "Hello"}])

    def test_system_blocks(self) -> None:
        """
        C{system} text blocks are joined into one system message without
        their C{cache_control}; other blocks are skipped.
        """
        system = [
            {"type": "text", "text": "You are Claude Code. "},
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
            {"type": "image", "source": {}},
        ]
        self.assertEqual(
            messages(system=system)[0],
            {"role": "system", "content": "You are Claude Code. Be brief."},
        )

    def test_billing_header(self) -> None:
        """
        The C{cch=} entries of an C{x-anthropic-billing-header:} text are
        stripped (they change with every request); a header left empty is
        dropped; other texts keep theirs.
        """
        header = "x-anthropic-billing-header: cc_version=2.1.3.abc; cc_entrypoint=cli; cch=4f2e1;"
        system = [{"type": "text", "text": header}, {"type": "text", "text": "\nHi cch=1;"}]
        self.assertEqual(
            messages(system=system)[0]["content"],
            "x-anthropic-billing-header:cc_version=2.1.3.abc; cc_entrypoint=cli\nHi cch=1;",
        )
        system = [
            {"type": "text", "text": "X-Anthropic-Billing-Header: cch=1; "},
            {"type": "text", "text": "Rest"},
        ]
        self.assertEqual(messages(system=system)[0]["content"], "Rest")

    def test_system_role_message(self) -> None:
        """
        A message of role C{system} inside C{messages} (Claude Code's
        environment block) → a system message at its position, its text
        blocks joined.
        """
        environment = {
            "role": "system",
            "content": [
                {"type": "text", "text": "cwd: /x"},
                {"type": "text", "text": ", os: linux"},
            ],
        }
        result = messages(system="S", messages=[user("a"), environment, user("b")])
        self.assertEqual(
            result,
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "a"},
                {"role": "system", "content": "cwd: /x, os: linux"},
                {"role": "user", "content": "b"},
            ],
        )

    def test_text_blocks(self) -> None:
        """
        User text blocks → text parts (without C{cache_control}); assistant
        content is flattened to one string; a string content is kept.
        """
        blocks = [
            {"type": "text", "text": "one "},
            {"type": "text", "text": "two", "cache_control": {"type": "ephemeral"}},
        ]
        result = messages(
            messages=[user(blocks), {"role": "assistant", "content": blocks}, user("three")]
        )
        self.assertEqual(
            result,
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}],
                },
                {"role": "assistant", "content": "one two"},
                {"role": "user", "content": "three"},
            ],
        )

    def test_images(self) -> None:
        """
        A base64 image → a C{data:} URL part (PNG by default), a URL image
        → that URL, a base64 document (a PDF) → a C{data:} URL part; other
        sources are dropped.
        """
        blocks = [
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/jpeg", "data": "AA"},
            },
            {"type": "image", "source": {"type": "base64", "data": "BB"}},
            {"type": "image", "source": {"type": "url", "url": "https://x/i.png"}},
            {"type": "document", "source": {"type": "base64", "data": "CC"}},
            {"type": "document", "source": {"type": "text", "data": "plain"}},
            {"type": "document", "source": {"type": "url", "url": "https://x/d.pdf"}},
            {"type": "image", "source": {"type": "base64", "data": ""}},
            {"type": "image"},
        ]
        [message] = messages(messages=[user(blocks)])
        self.assertEqual(
            [part["image_url"]["url"] for part in message["content"]],
            [
                "data:image/jpeg;base64,AA",
                "data:image/png;base64,BB",
                "https://x/i.png",
                "data:application/pdf;base64,CC",
            ],
        )
        self.assertEqual({part["type"] for part in message["content"]}, {"image_url"})

    def test_tool_use(self) -> None:
        """
        Assistant C{tool_use} blocks → C{tool_calls} with JSON-encoded
        arguments (none → C{{}}), beside the message's text.
        """
        assistant = {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "é"}},
                {"type": "tool_use", "id": "toolu_2", "name": "Ls"},
                {"type": "tool_use", "name": "no id"},
            ],
        }
        [_, message] = messages(messages=[user(), assistant])
        self.assertEqual(
            message,
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "Read", "arguments": '{"path":"é"}'},
                    },
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "Ls", "arguments": "{}"},
                    },
                ],
            },
        )

    def test_tool_use_without_text(self) -> None:
        """
        An assistant message of tool calls only has no content.
        """
        assistant = {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t", "name": "Read", "input": {}}],
        }
        [_, message] = messages(messages=[user(), assistant])
        self.assertNotIn("content", message)
        self.assertEqual(len(message["tool_calls"]), 1)

    def test_tool_results(self) -> None:
        """
        C{tool_result} blocks → separate C{tool} messages, placed before
        the rest of their message; list content is joined text, or parts
        when it holds an image.
        """
        image = {"type": "image", "source": {"type": "url", "url": "https://x/i.png"}}
        content = [
            {"type": "text", "text": "Here:"},
            {"type": "tool_result", "tool_use_id": "t1", "content": "file text"},
            {
                "type": "tool_result",
                "tool_use_id": "t2",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"type": "tool_result", "tool_use_id": "t3", "content": [image]},
            {"type": "tool_result", "tool_use_id": "t4", "is_error": True},
            {"type": "tool_result", "content": "no id"},
        ]
        self.assertEqual(
            messages(messages=[user(content)]),
            [
                {"role": "tool", "tool_call_id": "t1", "content": "file text"},
                {"role": "tool", "tool_call_id": "t2", "content": "ab"},
                {
                    "role": "tool",
                    "tool_call_id": "t3",
                    "content": [{"type": "image_url", "image_url": {"url": "https://x/i.png"}}],
                },
                {"role": "tool", "tool_call_id": "t4", "content": ""},
                {"role": "user", "content": [{"type": "text", "text": "Here:"}]},
            ],
        )

    def test_thinking_blocks_dropped(self) -> None:
        """
        C{thinking} and C{redacted_thinking} blocks are dropped.
        """
        assistant = {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "redacted_thinking", "data": "xx"},
                {"type": "text", "text": "Answer"},
            ],
        }
        [_, message] = messages(messages=[user(), assistant])
        self.assertEqual(message, {"role": "assistant", "content": "Answer"})

    def test_empty_content(self) -> None:
        """
        A message whose blocks all drop has an empty string content.
        """
        assistant = {"role": "assistant", "content": [{"type": "thinking", "thinking": "x"}]}
        self.assertEqual(
            messages(messages=[user([]), assistant]),
            [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
        )

    def test_client_body_unchanged(self) -> None:
        """
        The client's body is not changed by the conversion.
        """
        body = request(
            system=[{"type": "text", "text": "x-anthropic-billing-header: cch=1;"}],
            tools=[tool("a.b", cache_control={"type": "ephemeral"})],
            tool_choice={"type": "tool", "name": "a.b"},
            output_format={"type": "json_schema", "schema": {"type": "object", "properties": {}}},
            stream=True,
        )
        original = copy.deepcopy(body)
        convert(body)
        self.assertEqual(body, original)

    def test_claude_code_request(self) -> None:
        """
        A request as Claude Code 2.1 sends it converts to a valid OpenAI
        request.
        """
        body = request(
            max_tokens=128000,
            stream=True,
            thinking={"type": "adaptive", "display": "omitted"},
            output_config={"effort": "high"},
            context_management={"edits": [{"type": "clear_thinking_20251015"}]},
            metadata={"user_id": '{"session_id":"s"}'},
            tools=[tool("Bash"), tool("ToolSearch", defer_loading=True)],
        )
        self.assertEqual(
            sorted(convert(body)),
            [
                "max_completion_tokens",
                "messages",
                "model",
                "reasoning_effort",
                "stream",
                "stream_options",
                "tools",
                "user",
            ],
        )


class HeaderTests(SynchronousTestCase):
    """
    L{AnthropicToOpenAI.convert_headers}.
    """

    def test_api_key_to_bearer(self) -> None:
        """
        Without the route's credentials, the client's C{x-api-key} becomes
        C{authorization: Bearer <key>}.
        """
        headers = Headers({b"x-api-key": [b"sk-client"]})
        ANTHROPIC_TO_OPENAI.convert_headers(headers, False)
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer sk-client"])
        self.assertFalse(headers.hasHeader(b"x-api-key"))

    def test_authorization_kept(self) -> None:
        """
        A client C{authorization} header is kept; its C{x-api-key} still
        goes.
        """
        headers = Headers({b"x-api-key": [b"k"], b"authorization": [b"Bearer other"]})
        ANTHROPIC_TO_OPENAI.convert_headers(headers, False)
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer other"])
        self.assertFalse(headers.hasHeader(b"x-api-key"))

    def test_own_credentials(self) -> None:
        """
        With the route's own credentials (the client's were already left
        out) the headers carrying them are left alone.
        """
        headers = Headers({b"authorization": [b"Bearer route"], b"x-api-key": [b"route-key"]})
        ANTHROPIC_TO_OPENAI.convert_headers(headers, True)
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer route"])
        self.assertEqual(headers.getRawHeaders(b"x-api-key"), [b"route-key"])

    def test_anthropic_headers_removed(self) -> None:
        """
        Every C{anthropic-*} and C{x-stainless-*} header is removed, the
        rest kept.
        """
        headers = Headers(
            {
                b"Anthropic-Version": [b"2023-06-01"],
                b"anthropic-beta": [b"claude-code-20250219"],
                b"anthropic-dangerous-direct-browser-access": [b"true"],
                b"X-Stainless-Lang": [b"js"],
                b"x-stainless-retry-count": [b"0"],
                b"user-agent": [b"claude-cli/2.1"],
                b"content-type": [b"application/json"],
            }
        )
        ANTHROPIC_TO_OPENAI.convert_headers(headers, True)
        self.assertEqual(
            sorted(name.lower() for name, _ in headers.getAllRawHeaders()),
            [b"content-type", b"user-agent"],
        )


def completion(message: dict[str, Any], **fields: Any) -> bytes:
    """
    An OpenAI C{chat.completion} body with one choice of C{message}.
    """
    document: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-5-2025-08-07",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
    }
    document.update(fields)
    return json.dumps(document).encode()


def answer(
    body: bytes,
    context: ExchangeContext | None = None,
    converter: AnthropicToOpenAI | None = None,
    status: int = 200,
) -> Any:
    """
    The parsed client answer of an upstream C{body}.
    """
    converter = converter or AnthropicToOpenAI()
    return json.loads(converter.convert_answer(status, body, context or make_context()))


class AnswerTests(SynchronousTestCase):
    """
    L{AnthropicToOpenAI.convert_answer}: a whole OpenAI answer as an
    Anthropic message.
    """

    def test_text(self) -> None:
        """
        The answer's text → one text block, in a compact Anthropic message
        of the upstream id and the model sent.
        """
        context = make_context("gpt-5")
        body = ANTHROPIC_TO_OPENAI.convert_answer(
            200, completion({"role": "assistant", "content": "Hi é"}), context
        )
        self.assertEqual(
            body,
            compact(
                {
                    "id": "chatcmpl-1",
                    "type": "message",
                    "role": "assistant",
                    "model": "gpt-5",
                    "content": [{"type": "text", "text": "Hi é"}],
                    "stop_reason": "end_turn",
                    "usage": {"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 0},
                }
            ),
        )

    def test_upstream_model(self) -> None:
        """
        Without a model sent, the upstream's model is reported.
        """
        document = answer(completion({"content": "x"}))
        self.assertEqual(document["model"], "gpt-5-2025-08-07")

    def test_reasoning(self) -> None:
        """
        C{reasoning_content} (or C{reasoning}) → a thinking block with an
        empty signature, before the text.
        """
        for key in ("reasoning_content", "reasoning"):
            document = answer(completion({"content": "42", key: "Let me think"}))
            self.assertEqual(
                document["content"],
                [
                    {"type": "thinking", "thinking": "Let me think", "signature": ""},
                    {"type": "text", "text": "42"},
                ],
            )

    def test_tool_calls(self) -> None:
        """
        Tool calls → C{tool_use} blocks with parsed arguments, rewritten
        names restored; the context notes the tool calls.
        """
        converter = AnthropicToOpenAI()
        converter.convert_request(request(tools=[tool("mcp.read"), tool("Ls")]), make_context())
        calls = [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": hashed("mcp.read", "mcp_read"), "arguments": '{"p":"x"}'},
            },
            {"id": "call_2", "type": "function", "function": {"name": "Ls", "arguments": "{}"}},
        ]
        context = make_context()
        choice = {"message": {"content": None, "tool_calls": calls}, "finish_reason": "tool_calls"}
        document = answer(completion({}, choices=[choice]), context, converter)
        self.assertEqual(
            document["content"],
            [
                {"type": "tool_use", "id": "call_1", "name": "mcp.read", "input": {"p": "x"}},
                {"type": "tool_use", "id": "call_2", "name": "Ls", "input": {}},
            ],
        )
        self.assertEqual(document["stop_reason"], "tool_use")
        self.assertTrue(context.has_tool_calls)

    def test_bad_arguments(self) -> None:
        """
        Arguments that are not JSON, or not a JSON object, give C{{}}; the
        rest of the answer is kept.
        """
        for arguments in ['{"p": ', "[1, 2]", "null", None]:
            call = {"id": "c1", "function": {"name": "Read", "arguments": arguments}}
            document = answer(completion({"content": "text", "tool_calls": [call]}))
            self.assertEqual(document["content"][0], {"type": "text", "text": "text"})
            self.assertEqual(document["content"][1]["input"], {})

    def test_no_content(self) -> None:
        """
        An answer without text, thinking or tool calls → one empty text
        block; the context notes no tool call.
        """
        empty: list[dict[str, Any]] = [{"content": None}, {"content": ""}, {}]
        for message in empty:
            context = make_context()
            document = answer(completion(message), context)
            self.assertEqual(document["content"], [{"type": "text", "text": ""}])
            self.assertFalse(context.has_tool_calls)

    def test_stop_reasons(self) -> None:
        """
        stop → end_turn, length → max_tokens, tool_calls and function_call
        → tool_use, anything else → end_turn.
        """
        cases = {
            "stop": "end_turn",
            "length": "max_tokens",
            "tool_calls": "tool_use",
            "function_call": "tool_use",
            "content_filter": "end_turn",
            "weird": "end_turn",
            None: "end_turn",
        }
        for finish, stop_reason in cases.items():
            choice = {"message": {"content": "x"}, "finish_reason": finish}
            document = answer(completion({}, choices=[choice]))
            self.assertEqual(document["stop_reason"], stop_reason, finish)

    def test_usage_with_cache(self) -> None:
        """
        Cached prompt tokens are reported apart from the input tokens, the
        cache creation count kept; the context records the upstream's usage.
        """
        usage = {
            "prompt_tokens": 1000,
            "completion_tokens": 50,
            "total_tokens": 1050,
            "prompt_tokens_details": {"cached_tokens": 800, "cache_creation_input_tokens": 100},
        }
        context = make_context()
        document = answer(completion({"content": "x"}, usage=usage), context)
        self.assertEqual(
            document["usage"],
            {
                "input_tokens": 200,
                "output_tokens": 50,
                "cache_read_input_tokens": 800,
                "cache_creation_input_tokens": 100,
            },
        )
        self.assertEqual(context.prompt_tokens, 1000)
        self.assertEqual(context.completion_tokens, 50)
        self.assertEqual(context.total_tokens, 1050)
        self.assertEqual(context.cache_read_input_tokens, 800)

    def test_no_usage(self) -> None:
        """
        An answer without usage reports zeros.
        """
        document = answer(completion({"content": "x"}, usage=None))
        self.assertEqual(
            document["usage"], {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0}
        )

    def test_error(self) -> None:
        """
        An OpenAI error → an Anthropic error of its type (or code), the
        upstream status kept by the caller.
        """
        body = b'{"error":{"message":"slow down","type":"rate_limit_exceeded","code":null}}'
        self.assertEqual(
            answer(body, status=429),
            {"type": "error", "error": {"type": "rate_limit_exceeded", "message": "slow down"}},
        )
        body = b'{"error":{"message":"no","type":null,"code":"invalid_api_key"}}'
        self.assertEqual(answer(body, status=401)["error"]["type"], "invalid_api_key")

    def test_error_not_json(self) -> None:
        """
        An error body that does not parse is wrapped as an C{api_error}.
        """
        self.assertEqual(
            answer(b"<html>bad gateway</html>", status=502),
            {
                "type": "error",
                "error": {"type": "api_error", "message": "<html>bad gateway</html>"},
            },
        )

    def test_error_with_success_status(self) -> None:
        """
        An OpenAI error body under a 200 is an Anthropic error too.
        """
        document = answer(b'{"error":{"message":"m","type":"server_error"}}')
        self.assertEqual(document["type"], "error")

    def test_no_choices(self) -> None:
        """
        A success without choices, or not JSON, raises L{ValueError} (the
        caller answers 500).
        """
        for body in [b'{"id":"x","choices":[]}', b'{"id":"x"}', b"[1]", b"not json"]:
            self.assertRaises(
                ValueError, ANTHROPIC_TO_OPENAI.convert_answer, 200, body, make_context()
            )

    def test_convert_error(self) -> None:
        """
        The gateway's own errors are Anthropic errors of the status's type.
        """
        self.assertEqual(
            json.loads(ANTHROPIC_TO_OPENAI.convert_error(502, "failed")),
            {"type": "error", "error": {"type": "api_error", "message": "failed"}},
        )
        self.assertEqual(
            json.loads(ANTHROPIC_TO_OPENAI.convert_error(429, "x"))["error"]["type"],
            "rate_limit_error",
        )


def sse(*documents: Any) -> bytes:
    """
    An OpenAI SSE stream of C{documents} (bytes as they are, others as
    JSON).
    """
    return b"".join(
        b"data: " + (d if isinstance(d, bytes) else json.dumps(d).encode()) + b"\n\n"
        for d in documents
    )


def chunk(
    delta: dict[str, Any] | None = None, finish_reason: Any = None, **fields: Any
) -> dict[str, Any]:
    """
    One C{chat.completion.chunk} with one choice.
    """
    document: dict[str, Any] = {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-5-2025-08-07",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}],
    }
    document.update(fields)
    return document


def text(content: str) -> dict[str, Any]:
    """
    A text chunk.
    """
    return chunk({"content": content})


USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 9,
    "total_tokens": 129,
    "prompt_tokens_details": {"cached_tokens": 100},
}
#: The usage-only chunk OpenAI sends last when asked.
USAGE_CHUNK = {**chunk(), "choices": [], "usage": USAGE}
DONE = b"[DONE]"

TEXT_STREAM = sse(
    chunk({"role": "assistant", "content": ""}),
    text("Hel"),
    text("lo"),
    chunk(finish_reason="stop"),
    USAGE_CHUNK,
    DONE,
)

THINKING_STREAM = sse(
    chunk({"role": "assistant", "reasoning_content": "Let"}),
    chunk({"reasoning_content": " me think"}),
    text("42"),
    chunk(finish_reason="stop"),
    USAGE_CHUNK,
    DONE,
)

TOOL_STREAM = sse(
    chunk({"role": "assistant", "content": "Checking."}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "Read", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"pa'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'th":"x"}'}}]}),
    chunk(
        {
            "tool_calls": [
                {"index": 1, "id": "call_b", "function": {"name": "Ls", "arguments": "{}"}}
            ]
        }
    ),
    chunk(finish_reason="tool_calls"),
    USAGE_CHUNK,
    DONE,
)


def run_stream(
    stream: bytes,
    chunks: list[bytes] | None = None,
    context: ExchangeContext | None = None,
    converter: AnthropicToOpenAI | None = None,
) -> tuple[bytes, ExchangeContext, Any]:
    """
    Convert C{stream} (fed in C{chunks}, or whole), then end it.

    @return: the client bytes, the context and the stream converter.
    """
    converter = converter or AnthropicToOpenAI()
    context = context or make_context("gpt-5")
    streamer = converter.stream(context)
    out = feed_stream(streamer, context, [stream] if chunks is None else chunks)
    return out, context, streamer


def client_events(out: bytes) -> list[tuple[str, Any]]:
    """
    The client stream's events: (event type, parsed data).
    """
    return [(event.event, json.loads(event.data)) for event in SSEDecoder().feed(out)]


def kinds(out: bytes) -> list[str]:
    """
    The client stream's event types.
    """
    return [kind for kind, _ in client_events(out)]


def message_start(model: str = "gpt-5", message_id: str = "chatcmpl-9") -> tuple[str, Any]:
    """
    The C{message_start} event.
    """
    return (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "usage": {"input_tokens": 0, "output_tokens": 0},
            },
        },
    )


def message_end(stop_reason: str, usage: dict[str, int]) -> list[tuple[str, Any]]:
    """
    The C{message_delta} and C{message_stop} events.
    """
    return [
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": usage},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


#: The usage of L{USAGE} in a C{message_delta}.
END_USAGE = {"input_tokens": 20, "output_tokens": 9, "cache_read_input_tokens": 100}


class StreamTests(SynchronousTestCase):
    """
    The stream converter: OpenAI chunks → Anthropic events.
    """

    def test_text(self) -> None:
        """
        A text stream: C{message_start}, one text block of the deltas
        (empty content gives nothing), the block closed at the finish, then
        C{message_delta} with the trailing usage chunk's figures and
        C{message_stop}.
        """
        out, context, streamer = run_stream(TEXT_STREAM)
        self.assertEqual(
            client_events(out),
            [
                message_start(),
                block_start(0, {"type": "text", "text": ""}),
                block_delta(0, {"type": "text_delta", "text": "Hel"}),
                block_delta(0, {"type": "text_delta", "text": "lo"}),
                block_stop(0),
                *message_end("end_turn", END_USAGE),
            ],
        )
        self.assertTrue(context.done)
        self.assertTrue(streamer.produced)

    def test_format(self) -> None:
        """
        Each event is C{event: <type>}, C{data: <compact JSON>} and a blank
        line; non-ASCII text is written as it is.
        """
        out, _, _ = run_stream(sse(text("é\n"), chunk(finish_reason="stop"), DONE))
        blocks = out.split(b"\n\n")
        self.assertEqual(blocks[-1], b"")
        self.assertEqual(
            blocks[2],
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            + b'"delta":{"type":"text_delta","text":"\xc3\xa9\\n"}}',
        )
        for block, (kind, data) in zip(blocks[:-1], client_events(out), strict=True):
            self.assertEqual(block, b"event: " + kind.encode() + b"\ndata: " + compact(data))
        self.assertEqual(blocks[-2], b'event: message_stop\ndata: {"type":"message_stop"}')

    def test_model(self) -> None:
        """
        C{message_start} names the model sent upstream, else the chunk's.
        """
        out, _, _ = run_stream(TEXT_STREAM, context=make_context())
        self.assertEqual(client_events(out)[0][1]["message"]["model"], "gpt-5-2025-08-07")

    def test_thinking(self) -> None:
        """
        Reasoning deltas open a thinking block, closed when text starts in
        the next block; indexes count up.
        """
        out, _, _ = run_stream(THINKING_STREAM)
        self.assertEqual(
            client_events(out),
            [
                message_start(),
                block_start(0, {"type": "thinking", "thinking": ""}),
                block_delta(0, {"type": "thinking_delta", "thinking": "Let"}),
                block_delta(0, {"type": "thinking_delta", "thinking": " me think"}),
                block_stop(0),
                block_start(1, {"type": "text", "text": ""}),
                block_delta(1, {"type": "text_delta", "text": "42"}),
                block_stop(1),
                *message_end("end_turn", END_USAGE),
            ],
        )

    def test_reasoning_key(self) -> None:
        """
        C{delta.reasoning} is read as C{reasoning_content} is.
        """
        out, _, _ = run_stream(sse(chunk({"reasoning": "hm"}), DONE))
        self.assertIn(
            block_delta(0, {"type": "thinking_delta", "thinking": "hm"}), client_events(out)
        )

    def test_tool_calls(self) -> None:
        """
        Each new tool call index closes the open block and opens a
        C{tool_use} block; argument fragments are C{input_json_delta}s of
        their block; the finish says tool_use.
        """
        out, context, _ = run_stream(TOOL_STREAM)
        self.assertEqual(
            client_events(out),
            [
                message_start(),
                block_start(0, {"type": "text", "text": ""}),
                block_delta(0, {"type": "text_delta", "text": "Checking."}),
                block_stop(0),
                block_start(1, {"type": "tool_use", "id": "call_a", "name": "Read", "input": {}}),
                block_delta(1, {"type": "input_json_delta", "partial_json": '{"pa'}),
                block_delta(1, {"type": "input_json_delta", "partial_json": 'th":"x"}'}),
                block_stop(1),
                block_start(2, {"type": "tool_use", "id": "call_b", "name": "Ls", "input": {}}),
                block_delta(2, {"type": "input_json_delta", "partial_json": "{}"}),
                block_stop(2),
                *message_end("tool_use", END_USAGE),
            ],
        )
        self.assertTrue(context.has_tool_calls)

    def test_tool_name_restored(self) -> None:
        """
        A rewritten tool name is restored in its C{tool_use} block.
        """
        converter = AnthropicToOpenAI()
        converter.convert_request(request(tools=[tool("mcp.read")]), make_context())
        call = {"index": 0, "id": "c", "function": {"name": hashed("mcp.read", "mcp_read")}}
        out, _, _ = run_stream(sse(chunk({"tool_calls": [call]}), DONE), converter=converter)
        self.assertEqual(client_events(out)[1][1]["content_block"]["name"], "mcp.read")

    def test_finish_with_usage(self) -> None:
        """
        A finish chunk carrying usage puts it in C{message_delta} (cache
        reads only when above 0); the context records the upstream usage.
        """
        usage = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}
        out, context, _ = run_stream(
            sse(text("a"), chunk(finish_reason="length", usage=usage), DONE)
        )
        self.assertEqual(
            client_events(out)[-2:],
            message_end("max_tokens", {"input_tokens": 30, "output_tokens": 5}),
        )
        self.assertEqual((context.prompt_tokens, context.completion_tokens), (30, 5))

    def test_finish_usage_first(self) -> None:
        """
        When the finish chunk carries usage, a usage chunk after it does not
        replace it in C{message_delta}.
        """
        usage = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}
        out, _, _ = run_stream(
            sse(text("a"), chunk(finish_reason="stop", usage=usage), USAGE_CHUNK, DONE)
        )
        self.assertEqual(
            client_events(out)[-2][1]["usage"], {"input_tokens": 30, "output_tokens": 5}
        )

    def test_usage_before_finish(self) -> None:
        """
        A usage chunk before the finish gives the C{message_delta} usage
        when none comes with or after the finish; without any finish the
        end has zero usage and end_turn.
        """
        out, _, _ = run_stream(sse(text("a"), USAGE_CHUNK, chunk(finish_reason="length"), DONE))
        self.assertEqual(client_events(out)[-2:], message_end("max_tokens", END_USAGE))
        out, _, _ = run_stream(sse(text("a"), USAGE_CHUNK, DONE))
        self.assertEqual(
            client_events(out)[-3:],
            [block_stop(0), *message_end("end_turn", {"input_tokens": 0, "output_tokens": 0})],
        )

    def test_usage_chunk(self) -> None:
        """
        The usage-only chunk after the finish lands in C{message_delta},
        and the context records it as the upstream sent it.
        """
        out, context, _ = run_stream(sse(text("a"), chunk(finish_reason="stop"), USAGE_CHUNK))
        self.assertEqual(client_events(out)[-2][1]["usage"], END_USAGE)
        self.assertEqual(
            (context.prompt_tokens, context.completion_tokens, context.cache_read_input_tokens),
            (120, 9, 100),
        )

    def test_deferred(self) -> None:
        """
        The finish closes the block but holds C{message_delta} and
        C{message_stop} back until the next chunk.
        """
        context = make_context("m")
        streamer = AnthropicToOpenAI().stream(context)
        events = SSEDecoder().feed(sse(text("a"), chunk(finish_reason="stop")))
        out = streamer.convert_events(events, context)
        self.assertEqual(kinds(out)[-1], "content_block_stop")
        self.assertFalse(context.done)
        out = streamer.convert_events(SSEDecoder().feed(sse(USAGE_CHUNK)), context)
        self.assertEqual(kinds(out), ["message_delta", "message_stop"])
        self.assertTrue(context.done)

    def test_double_finish(self) -> None:
        """
        Two finish chunks: the second releases the deferred pair, and
        C{message_stop} comes once; later chunks are ignored.
        """
        out, _, _ = run_stream(
            sse(
                text("a"),
                chunk(finish_reason="stop"),
                chunk(finish_reason="stop"),
                text("late"),
                USAGE_CHUNK,
                DONE,
            )
        )
        self.assertEqual(
            kinds(out),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
        )
        self.assertEqual(
            client_events(out)[-2][1]["usage"], {"input_tokens": 0, "output_tokens": 0}
        )

    def test_late_usage(self) -> None:
        """
        A usage chunk after the end still reaches the context.
        """
        _, context, _ = run_stream(
            sse(text("a"), chunk(finish_reason="stop"), chunk(), USAGE_CHUNK, DONE)
        )
        self.assertEqual(context.prompt_tokens, 120)

    def test_done_without_finish(self) -> None:
        """
        C{[DONE]} after C{message_start} without a finish closes the open
        block and ends with end_turn and zero usage.
        """
        out, context, _ = run_stream(sse(text("a"), DONE))
        self.assertEqual(
            client_events(out)[-3:],
            [block_stop(0), *message_end("end_turn", {"input_tokens": 0, "output_tokens": 0})],
        )
        self.assertTrue(context.done)
        out, _, _ = run_stream(sse(chunk({"role": "assistant"}), DONE))
        self.assertEqual(kinds(out), ["message_start", "message_delta", "message_stop"])

    def test_done_first(self) -> None:
        """
        C{[DONE]} before any chunk gives nothing, and the end nothing
        either.
        """
        out, context, streamer = run_stream(sse(DONE))
        self.assertEqual(out, b"")
        self.assertFalse(context.done)
        self.assertFalse(streamer.produced)

    def test_blank_finish_reasons(self) -> None:
        """
        A finish reason of C{""}, C{"null"} or blanks is no finish.
        """
        for reason in ["", "null", "  ", 5]:
            context = make_context("m")
            streamer = AnthropicToOpenAI().stream(context)
            out = streamer.convert_events(
                SSEDecoder().feed(sse(text("a"), chunk(finish_reason=reason), text("b"))), context
            )
            self.assertNotIn("content_block_stop", kinds(out), reason)
            self.assertEqual(kinds(out).count("content_block_delta"), 2)

    def test_padded_finish_reason(self) -> None:
        """
        A finish reason is read without surrounding blanks.
        """
        out, _, _ = run_stream(sse(text("a"), chunk(finish_reason=" length "), DONE))
        self.assertEqual(client_events(out)[-2][1]["delta"], {"stop_reason": "max_tokens"})

    def test_ping(self) -> None:
        """
        A C{ping} event → C{event: ping} with C{{"type":"ping"}}.
        """
        out, _, _ = run_stream(b"event: ping\ndata: {}\n\n" + sse(text("a"), DONE))
        self.assertTrue(
            out.startswith(b'event: ping\ndata: {"type":"ping"}\n\nevent: message_start')
        )

    def test_ignored_events(self) -> None:
        """
        Other named events, data that is not a JSON object and blank data
        give nothing.
        """
        stream = b'event: other\ndata: {"a":1}\n\ndata: nope\n\ndata: [1]\n\ndata:\n\n'
        out, _, streamer = run_stream(stream)
        self.assertEqual(out, b"")
        self.assertFalse(streamer.produced)

    def test_end_without_done(self) -> None:
        """
        A stream that ends without C{[DONE]} is ended by L{finish} as
        C{[DONE]} would: the deferred pair released, or the open block
        closed with end_turn.
        """
        out, context, _ = run_stream(sse(text("a"), chunk(finish_reason="stop"), USAGE_CHUNK))
        self.assertEqual(kinds(out).count("message_stop"), 1)
        out, context, _ = run_stream(sse(text("a"), chunk(finish_reason="stop")))
        self.assertEqual(kinds(out)[-3:], ["content_block_stop", "message_delta", "message_stop"])
        self.assertTrue(context.done)
        out, context, _ = run_stream(sse(text("a")))
        self.assertEqual(kinds(out)[-3:], ["content_block_stop", "message_delta", "message_stop"])

    def test_finish_after_done(self) -> None:
        """
        L{finish} after a complete stream adds nothing.
        """
        context = make_context("m")
        streamer = AnthropicToOpenAI().stream(context)
        streamer.convert_events(SSEDecoder().feed(TEXT_STREAM), context)
        self.assertEqual(streamer.finish(context), b"")

    def test_error_chunk(self) -> None:
        """
        An OpenAI error chunk → an Anthropic C{error} event, and nothing
        after it (no C{message_stop}).
        """
        error = {"error": {"message": "overloaded", "type": "server_error", "code": None}}
        out, context, _ = run_stream(sse(text("a"), error, text("b"), DONE))
        events = client_events(out)
        self.assertEqual(
            events[-1],
            (
                "error",
                {"type": "error", "error": {"type": "server_error", "message": "overloaded"}},
            ),
        )
        self.assertNotIn("message_stop", kinds(out))
        self.assertFalse(context.done)

    def test_events_apart(self) -> None:
        """
        Events given one by one produce the same bytes as all at once.
        """
        events = SSEDecoder().feed(TOOL_STREAM)
        context = make_context("m")
        together = AnthropicToOpenAI().stream(context).convert_events(events, context)
        streamer = AnthropicToOpenAI().stream(context)
        apart = b"".join(streamer.convert_events([event], context) for event in events)
        self.assertEqual(apart, together)

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_chunking(self, data: st.DataObject) -> None:
        """
        Any split of the upstream bytes into chunks, each decoded and
        converted as it comes, gives the same client bytes.
        """
        stream = data.draw(st.sampled_from([TEXT_STREAM, TOOL_STREAM, THINKING_STREAM]))
        cuts = sorted(
            data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=40))
        )
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        whole, _, _ = run_stream(stream)
        out, context, _ = run_stream(stream, chunks)
        self.assertEqual(out, whole)
        self.assertEqual(kinds(out).count("message_stop"), 1)
        self.assertTrue(context.done)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(["text", "finish", "finish_usage", "usage", "empty", "done", "tool"]),
            max_size=12,
        ),
        st.booleans(),
    )
    def test_one_message_stop(self, sequence: list[str], chunked: bool) -> None:
        """
        After a content chunk, whatever finish, usage and C{[DONE]} chunks
        follow (and whether or not the stream ends with C{[DONE]}), the
        client gets C{message_stop} exactly once, last, and the block
        events are balanced.
        """
        pieces = {
            "text": text("x"),
            "finish": chunk(finish_reason="stop"),
            "finish_usage": chunk(finish_reason="stop", usage=USAGE),
            "usage": USAGE_CHUNK,
            "empty": chunk(),
            "done": DONE,
            "tool": chunk({"tool_calls": [{"index": 0, "id": "t", "function": {"name": "f"}}]}),
        }
        stream = sse(text("first"), *(pieces[name] for name in sequence))
        chunks = [event + b"\n\n" for event in stream.split(b"\n\n") if event] if chunked else None
        out, context, _ = run_stream(stream, chunks)
        names = kinds(out)
        self.assertEqual(names.count("message_stop"), 1)
        self.assertEqual(names[-1], "message_stop")
        self.assertEqual(names[-2], "message_delta")
        self.assertEqual(names.count("content_block_start"), names.count("content_block_stop"))
        self.assertTrue(context.done)
