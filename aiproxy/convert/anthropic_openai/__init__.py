# -*- test-case-name: tests.test_convert_anthropic_openai -*-
"""
An Anthropic Messages client served by an OpenAI chat upstream
(docs/conversion.md): the request (L{aiproxy.convert.anthropic_openai.request}),
the whole answer and error bodies, and the event stream
(L{aiproxy.convert.anthropic_openai.stream}), as APISIX converts them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from aiproxy.convert import errors
from aiproxy.convert.anthropic_openai.request import (
    _BUILTIN_TOOL_PREFIXES,
    _NAMES_LIMIT,
    _TOOL_CHOICES,
    _effort,
    _joined_text,
    _media,
    _refuse,
    _response_format,
    _system,
    _tool_result_content,
    openai_tool_name,
    strict_schema,
)
from aiproxy.convert.anthropic_openai.stream import _STOP_REASONS, AnthropicStream, _anthropic_usage
from aiproxy.convert.encoding import dumps, encode
from aiproxy.interfaces import IConverter
from aiproxy.stream.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT

__all__ = ["ANTHROPIC_TO_OPENAI", "AnthropicToOpenAI", "openai_tool_name", "strict_schema"]


log = Logger()


@implementer(IConverter)
class AnthropicToOpenAI:
    """
    Converts Anthropic Messages requests for an OpenAI chat upstream, and
    its answers back. Shared by every route converting this way.

    Tool names OpenAI refuses are rewritten (L{openai_tool_name}) and
    restored in answers. The upstream body holds only the rewritten names
    and C{ExchangeContext} has no room for the mapping, so the converter
    keeps one map, rewritten name → original, filled by
    L{convert_request} and read by L{convert_answer} and the streams. A
    rewritten name is a function of the original, so sharing the map
    between requests is safe; at most L{_NAMES_LIMIT} names are kept, the
    least recently declared pushed out. (A client tool literally named like
    another tool's rewritten name would be restored to that other name, a
    hole APISIX and LiteLLM share.)
    """

    client_protocol = ANTHROPIC_MESSAGES
    upstream_protocol = OPENAI_CHAT

    def __init__(self) -> None:
        self._names: dict[str, str] = {}

    def _tool_name(self, name: str) -> str:
        """
        The OpenAI name of a tool, remembered for the answer when rewritten.
        """
        renamed = openai_tool_name(name)
        if renamed != name:
            names = self._names
            names.pop(renamed, None)
            names[renamed] = name
            if len(names) > _NAMES_LIMIT:
                del names[next(iter(names))]
        return renamed

    def restore(self, name: str) -> str:
        """
        The client's name of a tool named C{name} upstream.
        """
        return self._names.get(name, name)

    def convert_request(self, body: Any, context: Any) -> dict[str, Any]:
        if not isinstance(body, Mapping):
            raise _refuse("missing messages")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _refuse("missing messages")
        out: dict[str, Any] = {}
        model = body.get("model")
        if isinstance(model, str):
            out["model"] = model
        stream = body.get("stream")
        if stream is not None:
            out["stream"] = stream
            if stream is True:
                out["stream_options"] = {"include_usage": True}
        if body.get("max_tokens") is not None:
            out["max_completion_tokens"] = body["max_tokens"]
        for key in ("temperature", "top_p"):
            if body.get(key) is not None:
                out[key] = body[key]
        if isinstance(body.get("stop_sequences"), list):
            out["stop"] = body["stop_sequences"]
        effort = _effort(body.get("thinking"), body.get("output_config"))
        if effort is not None:
            out["reasoning_effort"] = effort
        self._convert_tools(body, out)
        response_format = _response_format(body)
        if response_format is not None:
            out["response_format"] = response_format
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
            out["user"] = metadata["user_id"]
        if isinstance(body.get("service_tier"), str):
            out["service_tier"] = body["service_tier"]
        converted: list[dict[str, Any]] = []
        system = _system(body.get("system"))
        if system is not None:
            converted.append({"role": "system", "content": system})
        for index, message in enumerate(messages):
            self._convert_message(index, message, converted)
        out["messages"] = converted
        return out

    def _convert_tools(self, body: Mapping[str, Any], out: dict[str, Any]) -> None:
        """
        C{tools}, C{tool_choice} and C{disable_parallel_tool_use} into
        C{out}; the last two only when a tool survives.
        """
        tools = body.get("tools")
        if not isinstance(tools, list):
            return
        converted = []
        declared: dict[str, str] = {}
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            kind = tool.get("type")
            if isinstance(kind, str) and kind.startswith(_BUILTIN_TOOL_PREFIXES):
                continue
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                continue
            declared[name] = renamed = self._tool_name(name)
            function: dict[str, Any] = {"name": renamed}
            if tool.get("description") is not None:
                function["description"] = tool["description"]
            if tool.get("input_schema") is not None:
                function["parameters"] = tool["input_schema"]
            converted.append({"type": "function", "function": function})
        if not converted:
            return
        out["tools"] = converted
        choice = body.get("tool_choice")
        if not isinstance(choice, dict):
            return
        kind = choice.get("type")
        if isinstance(kind, str) and kind in _TOOL_CHOICES:
            out["tool_choice"] = _TOOL_CHOICES[kind]
        elif kind == "tool" and isinstance(choice.get("name"), str):
            name = choice["name"]
            out["tool_choice"] = {
                "type": "function",
                "function": {"name": declared.get(name, name)},
            }
        if choice.get("disable_parallel_tool_use") is True:
            out["parallel_tool_calls"] = False

    def _convert_message(self, index: int, message: Any, out: list[dict[str, Any]]) -> None:
        """
        Append the OpenAI messages of the Anthropic C{message} at C{index}.

        @raise ClientError: a message that is not an object, has no role or
            content that is neither a string nor a list (400).
        """
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _refuse(f"invalid message at index {index}")
        role = message["role"]
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            return
        if not isinstance(content, list):
            raise _refuse(f"invalid message content at index {index}")
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        parts: list[dict[str, Any]] = []
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text":
                if isinstance(block.get("text"), str):
                    parts.append({"type": "text", "text": block["text"]})
            elif kind == "image" or kind == "document":
                part = _media(block)
                if part is not None:
                    parts.append(part)
            elif kind == "tool_use":
                call_id = block.get("id")
                name = block.get("name")
                if isinstance(call_id, str) and isinstance(name, str):
                    arguments = block.get("input")
                    calls.append(
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {
                                "name": self._tool_name(name),
                                "arguments": encode({} if arguments is None else arguments),
                            },
                        }
                    )
            elif kind == "tool_result":
                call_id = block.get("tool_use_id")
                if isinstance(call_id, str):
                    results.append(
                        {
                            "role": "tool",
                            "tool_call_id": call_id,
                            "content": _tool_result_content(block.get("content")),
                        }
                    )
            # thinking and redacted_thinking: OpenAI takes no past reasoning.
        if results:
            # A tool message must follow the assistant message of its call.
            out.extend(results)
            if parts:
                out.append({"role": role, "content": parts})
            return
        converted: dict[str, Any] = {"role": role}
        if calls:
            converted["tool_calls"] = calls
            text = _joined_text(parts)
            if text:
                converted["content"] = text
        elif not parts:
            converted["content"] = ""
        elif role == "assistant" or role == "system":
            converted["content"] = _joined_text(parts)
        else:
            converted["content"] = parts
        out.append(converted)

    def convert_headers(self, headers: Any, own_credentials: bool) -> None:
        """
        The client's C{x-api-key} becomes C{authorization: Bearer <key>}
        (unless an C{authorization} header is there); with the route's own
        credentials the client's key was already left out, and an
        C{x-api-key} header is the route's own, kept. Every C{anthropic-*}
        and C{x-stainless-*} header is removed.
        """
        if not own_credentials:
            keys = headers.getRawHeaders(b"x-api-key")
            if keys:
                headers.removeHeader(b"x-api-key")
                key = keys[0].strip()
                if key and not headers.hasHeader(b"authorization"):
                    headers.setRawHeaders(b"authorization", [b"Bearer " + key])
        dropped = [
            name
            for name, _ in headers.getAllRawHeaders()
            if name.lower().startswith((b"anthropic-", b"x-stainless-"))
        ]
        for name in dropped:
            headers.removeHeader(name)

    def convert_answer(self, status: int, body: bytes, context: Any) -> bytes:
        """
        @raise ValueError: a success that is not a chat completion with
            choices.
        """
        if status >= 400:
            return errors.to_anthropic_error(status, body)
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("upstream answer is not a JSON object")
        choices = document.get("choices")
        if "error" in document and not choices:
            return errors.to_anthropic_error(status, body)
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            raise ValueError("no choices in upstream answer")
        message = choice.get("message")
        if not isinstance(message, dict):
            message = {}
        content: list[dict[str, Any]] = []
        reasoning = message.get("reasoning_content")
        if not isinstance(reasoning, str) or not reasoning:
            reasoning = message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        text = message.get("content")
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict):
                    content.append(self._tool_use(call))
                    context.has_tool_calls = True
        if not content:
            content.append({"type": "text", "text": ""})
        usage = document.get("usage")
        if isinstance(usage, dict):
            context.set_usage(usage)
        else:
            usage = {}
        finish = choice.get("finish_reason")
        model = context.llm_model or document.get("model")
        return dumps(
            {
                "id": document.get("id"),
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": _STOP_REASONS.get(finish, "end_turn")
                if isinstance(finish, str)
                else "end_turn",
                "usage": _anthropic_usage(usage, True),
            }
        )

    def _tool_use(self, call: dict[str, Any]) -> dict[str, Any]:
        """
        The C{tool_use} block of a tool call (arguments that are not a JSON
        object → C{{}}).
        """
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        arguments = function.get("arguments")
        tool_input: Any = arguments if isinstance(arguments, dict) else {}
        if isinstance(arguments, str):
            try:
                tool_input = json.loads(arguments)
            except ValueError:
                tool_input = None
            if not isinstance(tool_input, dict):
                log.warn("tool call arguments are not a JSON object, using {{}}")
                tool_input = {}
        name = function.get("name")
        call_id = call.get("id")
        return {
            "type": "tool_use",
            "id": call_id if isinstance(call_id, str) else "",
            "name": self.restore(name) if isinstance(name, str) else "",
            "input": tool_input,
        }

    def convert_error(self, status: int, message: str) -> bytes:
        return errors.anthropic_error(status, message)

    def stream(self, context: Any) -> AnthropicStream:
        return AnthropicStream(self._names)


#: The converter of every route taking Anthropic clients to OpenAI chat
#: upstreams.
ANTHROPIC_TO_OPENAI = AnthropicToOpenAI()
