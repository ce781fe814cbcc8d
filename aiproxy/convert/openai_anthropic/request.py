# -*- test-case-name: tests.test_convert_openai_anthropic -*-
"""
An OpenAI chat request as an Anthropic Messages request: system
messages, content parts, tool calls and results, tools and tool choice,
limits and reasoning effort.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiproxy.upstream.request import ClientError

__all__ = [
    "BUDGETS",
    "DEFAULT_MAX_TOKENS",
    "client_max_tokens",
    "convert_messages",
    "convert_tool_choice",
    "convert_tools",
    "refuse",
]


#: C{max_tokens} when neither the client nor the route gives one
#: (Anthropic requires it).
DEFAULT_MAX_TOKENS = 4096

#: C{reasoning_effort} → C{thinking.budget_tokens}.
BUDGETS = {"low": 1024, "medium": 2048, "high": 4096}

#: An OpenAI C{tool_choice} string → the Anthropic C{tool_choice} type.
_TOOL_CHOICES = {"auto": "auto", "required": "any", "none": "none"}


def refuse(message: str) -> ClientError:
    """
    The 400 refusing a request that cannot be converted.
    """
    return ClientError(400, message, {"error_msg": message})


def _image(url: Any, index: int) -> dict[str, Any]:
    """
    The Anthropic image block of an C{image_url} part's URL: a C{data:}
    URL becomes a base64 source with its media type, any other a URL source.

    @raise ClientError: a URL that is not a string or a data URL that is not
        base64 (400).
    """
    if not isinstance(url, str) or not url:
        raise refuse(f"invalid image_url in message at index {index}")
    if not url.startswith("data:"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    header, comma, data = url[5:].partition(",")
    media_type, _, parameters = header.partition(";")
    if not comma or not media_type or "base64" not in parameters.split(";"):
        raise refuse(f"invalid image data URL in message at index {index}")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _blocks(parts: list[Any], index: int) -> list[dict[str, Any]]:
    """
    The Anthropic content blocks of an OpenAI content part list: text
    (and refusal) parts → text blocks (empty ones dropped: Anthropic
    refuses them), C{image_url} parts → image blocks.

    @raise ClientError: a part of another type, or malformed (400).
    """
    blocks: list[dict[str, Any]] = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" or kind == "refusal":
            text = part.get(kind)
            if not isinstance(text, str):
                raise refuse(f"invalid {kind} part in message at index {index}")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            image = part.get("image_url")
            blocks.append(_image(image.get("url") if isinstance(image, dict) else image, index))
        else:
            raise refuse(f"unsupported content part type {kind!r} in message at index {index}")
    return blocks


def _text(content: Any, index: int) -> str:
    """
    The text of a system or developer message: a string, or its text
    parts joined with line feeds.

    @raise ClientError: content of another shape (400).
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise refuse(f"invalid message at index {index}")
            text = part.get("text")
            if not isinstance(text, str):
                raise refuse(f"invalid message at index {index}")
            texts.append(text)
        return "\n".join(texts)
    raise refuse(f"invalid message at index {index}")


def _tool_uses(calls: Any, index: int) -> list[dict[str, Any]]:
    """
    The C{tool_use} blocks of an assistant message's C{tool_calls}, their
    arguments parsed (an empty string is no argument).

    @raise ClientError: a malformed call, or arguments that are not a JSON
        object (400, naming the message).
    """
    if not isinstance(calls, list):
        raise refuse(f"invalid tool_calls in message at index {index}")
    blocks = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise refuse(f"invalid tool_calls in message at index {index}")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            if arguments.strip():
                try:
                    arguments = json.loads(arguments)
                except ValueError as e:
                    raise refuse(
                        f"invalid tool call arguments in message at index {index}: {e}"
                    ) from None
            else:
                arguments = {}
        elif arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise refuse(
                f"invalid tool call arguments in message at index {index}: not a JSON object"
            )
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function["name"],
                "input": arguments,
            }
        )
    return blocks


def _tool_result(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    """
    The C{tool_result} block of a C{tool} message.

    @raise ClientError: no C{tool_call_id}, or content of another shape (400).
    """
    tool_use_id = message.get("tool_call_id")
    if not isinstance(tool_use_id, str):
        raise refuse(f"invalid message at index {index}")
    content = message.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id}
    if isinstance(content, list):
        block["content"] = _blocks(content, index)
    elif isinstance(content, str):
        block["content"] = content
    elif content is not None:
        raise refuse(f"invalid message at index {index}")
    return block


def convert_messages(messages: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """
    The system texts and the Anthropic messages of OpenAI chat messages.

    @raise ClientError: a message that cannot be converted (400).
    """
    system: list[str] = []
    out: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool":
            results.append(_tool_result(message, index))
            continue
        if results:
            # Consecutive tool messages answer as one user turn.
            out.append({"role": "user", "content": results})
            results = []
        content = message.get("content") if isinstance(message, dict) else None
        if role == "system" or role == "developer":
            system.append(_text(content, index))
        elif role == "user":
            if isinstance(content, list):
                content = _blocks(content, index)
            elif not isinstance(content, str):
                raise refuse(f"invalid message at index {index}")
            out.append({"role": "user", "content": content})
        elif role == "assistant":
            calls = message.get("tool_calls")
            blocks: list[dict[str, Any]]
            if isinstance(content, list):
                blocks = _blocks(content, index)
            elif isinstance(content, str):
                if content and not calls:
                    out.append({"role": "assistant", "content": content})
                    continue
                blocks = [{"type": "text", "text": content}] if content else []
            elif content is None:
                blocks = []
            else:
                raise refuse(f"invalid message at index {index}")
            if calls:
                blocks.extend(_tool_uses(calls, index))
            if blocks:
                # An empty assistant turn is dropped: Anthropic refuses it.
                out.append({"role": "assistant", "content": blocks})
        else:
            raise refuse(f"invalid message at index {index}")
    if results:
        out.append({"role": "user", "content": results})
    return system, out


def convert_tools(tools: Any) -> list[dict[str, Any]]:
    """
    The Anthropic tools of OpenAI C{function} tools.

    @raise ClientError: a tool of another type, or malformed (400).
    """
    if not isinstance(tools, list):
        raise refuse("invalid tools")
    out = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise refuse(f"invalid tool at index {index}")
        if tool.get("type") != "function":
            raise refuse(f"unsupported tool type {tool.get('type')!r} at index {index}")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise refuse(f"invalid tool at index {index}")
        converted: dict[str, Any] = {"name": function["name"]}
        if isinstance(function.get("description"), str):
            converted["description"] = function["description"]
        schema = function.get("parameters")
        converted["input_schema"] = (
            schema if isinstance(schema, dict) else {"type": "object", "properties": {}}
        )
        out.append(converted)
    return out


def convert_tool_choice(choice: Any) -> dict[str, Any] | None:
    """
    The Anthropic C{tool_choice} of an OpenAI one, or L{None} for none or
    one it does not know.
    """
    if isinstance(choice, str):
        kind = _TOOL_CHOICES.get(choice)
        return {"type": kind} if kind else None
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            return {"type": "tool", "name": name}
    return None


def client_max_tokens(body: Mapping[str, Any]) -> int | None:
    """
    The client's C{max_completion_tokens}, else its C{max_tokens}, or
    L{None}.
    """
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
