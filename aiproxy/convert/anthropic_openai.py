# -*- test-case-name: tests.test_convert_anthropic_openai -*-
"""
An Anthropic Messages client served by an OpenAI chat upstream, as APISIX
converts it (CONVERSION.md section 4): the request becomes a chat
completions request built from a whitelist, the answer an Anthropic
C{message}, the stream Anthropic events from C{message_start} to one
C{message_stop}, error bodies Anthropic errors.

The stream is on the per-event hot path: each upstream event's JSON is
parsed once and each client event encoded once; a text or thinking delta
is written from a prefix made once per content block around the one JSON
string encoded per event.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from enum import Enum
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from aiproxy.convert import errors
from aiproxy.interfaces import IConverter, IStreamConverter
from aiproxy.stream.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT
from aiproxy.upstream.request import ClientError

__all__ = ["ANTHROPIC_TO_OPENAI", "AnthropicToOpenAI", "openai_tool_name", "strict_schema"]

log = Logger()


#: Anthropic built-in tool types (no C{input_schema}): never sent upstream.
_BUILTIN_TOOL_PREFIXES = ("computer_", "bash_", "text_editor_", "web_search", "code_execution_")

#: OpenAI's longest tool name, and what a rewritten name keeps of the
#: sanitized one before C{_<8 hex of sha256>}.
_TOOL_NAME_MAX = 64
_TOOL_NAME_HASH = 8
_TOOL_NAME_PREFIX = _TOOL_NAME_MAX - _TOOL_NAME_HASH - 1

#: Every byte outside C{[a-zA-Z0-9_-]} → C{_} (names are sanitized byte by
#: byte, as APISIX does: a non-ASCII character becomes one C{_} per byte).
_NAME_BYTES = bytes(
    c if (chr(c).isascii() and chr(c).isalnum()) or chr(c) in "_-" else ord("_") for c in range(256)
)

#: How many rewritten tool names the converter remembers to restore them.
_NAMES_LIMIT = 4096

#: An Anthropic C{tool_choice} type → the OpenAI C{tool_choice}.
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}

#: An OpenAI C{finish_reason} → the Anthropic C{stop_reason} (else
#: C{end_turn}).
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "content_filter": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
}

#: C{thinking.budget_tokens} thresholds → C{reasoning_effort} (else
#: C{minimal}).
_EFFORTS = ((4096, "high"), (2048, "medium"), (1024, "low"))

#: The effort of C{adaptive} thinking without C{output_config.effort}.
_ADAPTIVE_EFFORT = "medium"

#: Schema keywords holding a list, and a map, of sub-schemas.
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")
_SCHEMA_MAPS = ("$defs", "definitions")

_BILLING_PREFIX = "x-anthropic-billing-header:"
_CCH = re.compile(r" ?cch=[^;]*;?")

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_encode = _ENCODER.encode


def _dumps(document: Any) -> bytes:
    """
    Compact JSON, UTF-8 (a lone surrogate, which UTF-8 cannot carry,
    becomes C{?}).
    """
    return _encode(document).encode("utf-8", "replace")


def _refuse(message: str) -> ClientError:
    """
    The 400 refusing a request, in APISIX's C{{"error_msg": ...}} shape.
    """
    return ClientError(400, message, {"error_msg": message})


def _count(value: Any) -> int:
    """
    C{value} if it is a token count, else 0.
    """
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def openai_tool_name(name: str) -> str:
    """
    The OpenAI name of an Anthropic tool: the name itself when it is
    valid (C{[a-zA-Z0-9_-]}, at most 64 bytes), else its first 55
    sanitized bytes, C{_} and the first 8 hex digits of the SHA-256 of the
    name. A function of the name alone, so the C{tools} array and the
    C{tool_use} blocks of the history agree.
    """
    raw = name.encode("utf-8", "surrogatepass")
    sanitized = raw.translate(_NAME_BYTES)
    if sanitized == raw and len(raw) <= _TOOL_NAME_MAX:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:_TOOL_NAME_HASH]
    return sanitized[:_TOOL_NAME_PREFIX].decode("ascii") + "_" + digest


def strict_schema(schema: Any) -> Any:
    """
    A copy of a JSON schema fit for OpenAI's strict mode: every object with
    C{properties} gets C{additionalProperties: false} and all its
    properties, sorted, as C{required}; sub-schemas (C{properties},
    C{items}, C{anyOf}/C{oneOf}/C{allOf}, C{$defs}/C{definitions}) alike.
    The client's schema is left as it is.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    properties = schema.get("properties")
    if schema.get("type") == "object" and isinstance(properties, dict):
        out["properties"] = {key: strict_schema(value) for key, value in properties.items()}
        out["additionalProperties"] = False
        out["required"] = sorted(properties)
    if "items" in schema:
        out["items"] = strict_schema(schema["items"])
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            out[key] = [strict_schema(sub) for sub in schema[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            out[key] = {name: strict_schema(sub) for name, sub in schema[key].items()}
    return out


def _effort(thinking: Any, output_config: Any) -> str | None:
    """
    The C{reasoning_effort} of a C{thinking} setting: C{enabled} by its
    budget, C{adaptive} by C{output_config.effort} (else C{medium}).
    """
    if not isinstance(thinking, dict):
        return None
    kind = thinking.get("type")
    if kind == "adaptive":
        effort = output_config.get("effort") if isinstance(output_config, dict) else None
        return effort if isinstance(effort, str) and effort else _ADAPTIVE_EFFORT
    if kind != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, (int, float)) or isinstance(budget, bool):
        budget = 0
    for least, effort in _EFFORTS:
        if budget >= least:
            return effort
    return "minimal"


def _strip_billing(text: str) -> str | None:
    """
    An C{x-anthropic-billing-header:} text without its C{cch=} entries
    (they change with every request and would defeat prompt caching), or
    L{None} when nothing is left; any other text as it is.
    """
    if text[: len(_BILLING_PREFIX)].lower() != _BILLING_PREFIX:
        return text
    value = _CCH.sub("", text[len(_BILLING_PREFIX) :]).strip("; ")
    return _BILLING_PREFIX + value if value else None


def _system(system: Any) -> str | None:
    """
    The text of the C{system} field: a string, or its text blocks joined
    (billing header C{cch=} entries stripped, C{cache_control} dropped).
    """
    if isinstance(system, str):
        return system or None
    if not isinstance(system, list):
        return None
    parts = []
    for block in system:
        if isinstance(block, dict) and block.get("type") == "text":
            text = block.get("text")
            if isinstance(text, str):
                cleaned = _strip_billing(text)
                if cleaned is not None:
                    parts.append(cleaned)
    return "".join(parts) or None


def _media(block: dict[str, Any]) -> dict[str, Any] | None:
    """
    The C{image_url} part of an C{image} (base64 or URL source) or
    C{document} (base64) block, or L{None}.
    """
    source = block.get("source")
    if not isinstance(source, dict):
        return None
    kind = block.get("type")
    source_type = source.get("type")
    if source_type == "base64":
        data = source.get("data")
        if not isinstance(data, str) or not data:
            return None
        media_type = source.get("media_type")
        if not isinstance(media_type, str):
            media_type = "image/png" if kind == "image" else "application/pdf"
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "image" and source_type == "url":
        url = source.get("url")
        if isinstance(url, str) and url:
            return {"type": "image_url", "image_url": {"url": url}}
    return None


def _tool_result_content(content: Any) -> Any:
    """
    The content of a C{tool} message: a string, its text blocks joined, or
    parts when it holds images or documents.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    has_media = False
    for sub in content:
        if not isinstance(sub, dict):
            continue
        kind = sub.get("type")
        if kind == "text" and isinstance(sub.get("text"), str):
            texts.append(sub["text"])
            parts.append({"type": "text", "text": sub["text"]})
        elif kind == "image" or kind == "document":
            part = _media(sub)
            if part is not None:
                parts.append(part)
                has_media = True
    return parts if has_media else "".join(texts)


def _joined_text(parts: list[dict[str, Any]]) -> str:
    return "".join(part["text"] for part in parts if part["type"] == "text")


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
                                "arguments": _encode({} if arguments is None else arguments),
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
        return _dumps(
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

    def stream(self, context: Any) -> _AnthropicStream:
        return _AnthropicStream(self._names)


def _response_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """
    The strict C{json_schema} response format of C{output_format} (when a
    non-empty object) or C{output_config.format}, or L{None}.
    """
    output_format = body.get("output_format")
    if not isinstance(output_format, dict) or not output_format:
        config = body.get("output_config")
        output_format = config.get("format") if isinstance(config, dict) else None
    if not isinstance(output_format, dict) or output_format.get("type") != "json_schema":
        return None
    schema = output_format.get("schema")
    if not isinstance(schema, dict) or not schema:
        return None
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "structured_output",
            "schema": strict_schema(schema),
            "strict": True,
        },
    }


def _anthropic_usage(usage: Mapping[str, Any], whole: bool) -> dict[str, int]:
    """
    The Anthropic usage of an OpenAI one: the cached prompt tokens are
    reported apart from the input tokens.

    @param whole: for a whole answer, C{cache_read_input_tokens} is always
        there; in a stream only when above 0.
    """
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        details = {}
    cached_value = details.get("cached_tokens")
    if cached_value is None:
        cached_value = usage.get("prompt_cache_hit_tokens")  # DeepSeek
    cached = _count(cached_value)
    out = {
        "input_tokens": max(0, _count(usage.get("prompt_tokens")) - cached),
        "output_tokens": _count(usage.get("completion_tokens")),
    }
    if whole or cached > 0:
        out["cache_read_input_tokens"] = cached
    created = details.get("cache_creation_input_tokens")
    if created is None:
        created = usage.get("cache_creation_input_tokens")
    if isinstance(created, int) and not isinstance(created, bool):
        out["cache_creation_input_tokens"] = created
    return out


class _Phase(Enum):
    """
    Where a converted stream is.
    """

    #: Nothing parsed yet: C{message_start} not written.
    WAITING = "waiting"
    #: In the message: content blocks open and close.
    OPEN = "open"
    #: A finish seen, its block closed: C{message_delta} and
    #: C{message_stop} wait for the next chunk (which may carry the usage).
    FINISHING = "finishing"
    #: C{message_stop} written: the rest is ignored.
    ENDED = "ended"
    #: An upstream error written as an C{error} event: the rest is ignored.
    FAILED = "failed"


_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_DELTA_TAIL = b"}}\n\n"
_ZERO_USAGE = {"input_tokens": 0, "output_tokens": 0}


def _event(kind: str, document: Any) -> bytes:
    """
    One client event: C{document} (whose C{type} is C{kind}) under C{kind}.
    """
    return b"event: " + kind.encode() + b"\ndata: " + _dumps(document) + b"\n\n"


def _delta_head(index: int, kind: str, field: str) -> bytes:
    """
    A C{content_block_delta} event of block C{index} up to its JSON value.
    """
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
        b'"delta":{"type":"%s","%s":' % (index, kind.encode(), field.encode())
    )


@implementer(IStreamConverter)
class _AnthropicStream:
    """
    Converts one OpenAI C{chat.completion.chunk} stream into Anthropic
    events (CONVERSION.md section 4, stream rules 1 to 9).

    @ivar produced: whether any bytes were returned yet.
    """

    __slots__ = (
        "produced",
        "_names",
        "_phase",
        "_next",
        "_open",
        "_open_kind",
        "_head",
        "_tools",
        "_stop_reason",
        "_usage",
        "_seen_usage",
    )

    def __init__(self, names: Mapping[str, str]) -> None:
        """
        @param names: rewritten tool name → the client's name.
        """
        self.produced = False
        self._names = names
        self._phase = _Phase.WAITING
        # The index of the next block, and the open one (with its kind).
        self._next = 0
        self._open: int | None = None
        self._open_kind: str | None = None
        # The delta event prefix of the open text or thinking block.
        self._head = b""
        # OpenAI tool call index → block index.
        self._tools: dict[Any, int] = {}
        # The deferred message_delta: its stop reason and usage.
        self._stop_reason = "end_turn"
        self._usage: dict[str, int] | None = None
        # The last usage a chunk carried before the finish.
        self._seen_usage: dict[str, Any] | None = None

    def _start(self, document: dict[str, Any], context: Any) -> bytes:
        self._phase = _Phase.OPEN
        chunk_id = document.get("id")
        model = context.llm_model or document.get("model")
        return _event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": chunk_id if isinstance(chunk_id, str) else "",
                    "type": "message",
                    "role": "assistant",
                    "model": model if isinstance(model, str) else "",
                    "content": [],
                    "usage": _ZERO_USAGE,
                },
            },
        )

    def _close(self, out: list[bytes]) -> None:
        """
        Close the open block, if any.
        """
        if self._open is not None:
            out.append(
                b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
                % self._open
            )
            self._open = None
            self._open_kind = None

    def _open_block(self, kind: str, block: dict[str, Any], out: list[bytes]) -> int:
        """
        Close the open block and open a new one of C{kind}.
        """
        self._close(out)
        index = self._next
        self._next = index + 1
        self._open = index
        self._open_kind = kind
        out.append(
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
        )
        return index

    def _end(self, out: list[bytes], context: Any) -> None:
        """
        Write the deferred C{message_delta} and C{message_stop}.
        """
        out.append(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self._stop_reason},
                    "usage": _ZERO_USAGE if self._usage is None else self._usage,
                },
            )
        )
        out.append(_MESSAGE_STOP)
        self._phase = _Phase.ENDED
        context.done = True

    def _tool_calls(self, calls: list[Any], out: list[bytes], context: Any) -> None:
        tools = self._tools
        for call in calls:
            if not isinstance(call, dict):
                continue
            key = call.get("index")
            if not isinstance(key, (int, str)):
                continue
            function = call.get("function")
            if not isinstance(function, dict):
                function = {}
            index = tools.get(key)
            if index is None:
                name = function.get("name")
                name = self._names.get(name, name) if isinstance(name, str) else ""
                call_id = call.get("id")
                index = tools[key] = self._open_block(
                    "tool_use",
                    {
                        "type": "tool_use",
                        "id": call_id if isinstance(call_id, str) else "",
                        "name": name,
                        "input": {},
                    },
                    out,
                )
                context.has_tool_calls = True
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                out.append(
                    _delta_head(index, "input_json_delta", "partial_json")
                    + _dumps(arguments)
                    + _DELTA_TAIL
                )

    def _chunk(self, document: dict[str, Any], out: list[bytes], context: Any) -> None:
        """
        Convert one parsed chunk (the phase is C{WAITING} or C{OPEN}).
        """
        if "error" in document and "choices" not in document:
            # An error chunk: the client's error event, and nothing after it.
            out.append(
                b"event: error\ndata: " + errors.to_anthropic_error(500, _dumps(document)) + b"\n\n"
            )
            self._phase = _Phase.FAILED
            return
        if self._phase is _Phase.WAITING:
            out.append(self._start(document, context))
        usage = document.get("usage")
        if usage is not None and isinstance(usage, dict):
            context.set_usage(usage)
            self._seen_usage = usage
        choices = document.get("choices")
        if not choices or not isinstance(choices, list):
            return
        choice = choices[0]
        if not isinstance(choice, dict):
            return
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = delta.get("reasoning_content")
            if reasoning is None or reasoning == "":
                reasoning = delta.get("reasoning")
            if reasoning and isinstance(reasoning, str):
                if self._open_kind != "thinking":
                    index = self._open_block("thinking", {"type": "thinking", "thinking": ""}, out)
                    self._head = _delta_head(index, "thinking_delta", "thinking")
                out.append(self._head + _dumps(reasoning) + _DELTA_TAIL)
            text = delta.get("content")
            if text and isinstance(text, str):
                if self._open_kind != "text":
                    index = self._open_block("text", {"type": "text", "text": ""}, out)
                    self._head = _delta_head(index, "text_delta", "text")
                out.append(self._head + _dumps(text) + _DELTA_TAIL)
            calls = delta.get("tool_calls")
            if calls and isinstance(calls, list):
                self._tool_calls(calls, out, context)
        finish = choice.get("finish_reason")
        if finish is not None and isinstance(finish, str):
            finish = finish.strip()
            if finish and finish != "null":
                self._close(out)
                self._stop_reason = _STOP_REASONS.get(finish, "end_turn")
                if isinstance(usage, dict):
                    self._usage = _anthropic_usage(usage, False)
                self._phase = _Phase.FINISHING

    def _release(self, document: dict[str, Any] | None, out: list[bytes], context: Any) -> None:
        """
        End a finished stream: with the usage of C{document} (the chunk
        after the finish) unless the finish chunk had one.
        """
        if document is not None:
            usage = document.get("usage")
            if isinstance(usage, dict):
                context.set_usage(usage)
                self._seen_usage = usage
        if self._usage is None and self._seen_usage is not None:
            self._usage = _anthropic_usage(self._seen_usage, False)
        self._end(out, context)

    def _done(self, out: list[bytes], context: Any) -> None:
        """
        The upstream's stream ended (C{[DONE]}, or its end).
        """
        phase = self._phase
        if phase is _Phase.FINISHING:
            self._release(None, out, context)
        elif phase is _Phase.OPEN:
            # Not finished: end_turn, and zero usage (as APISIX).
            self._close(out)
            self._end(out, context)

    def _late_usage(self, event: Any, context: Any) -> None:
        """
        Record the usage of a chunk that comes after the end.
        """
        if b'"usage"' in event.data:
            try:
                document = json.loads(event.data)
            except ValueError:
                return
            if isinstance(document, dict) and isinstance(document.get("usage"), dict):
                context.set_usage(document["usage"])

    def convert_events(self, events: Any, context: Any) -> bytes:
        out: list[bytes] = []
        for event in events:
            phase = self._phase
            if phase is _Phase.ENDED or phase is _Phase.FAILED:
                self._late_usage(event, context)
                continue
            if event.event != "message":
                if event.event == "ping":
                    out.append(_PING)
                continue
            data = event.data
            if data == b"[DONE]":
                self._done(out, context)
                continue
            try:
                document = json.loads(data)
            except ValueError:
                continue
            if not isinstance(document, dict):
                continue
            if phase is _Phase.FINISHING:
                self._release(document, out, context)
            else:
                self._chunk(document, out, context)
        if not out:
            return b""
        self.produced = True
        return b"".join(out)

    def finish(self, context: Any) -> bytes:
        """
        The upstream's stream ended without C{[DONE]}: a started message is
        ended as C{[DONE]} would end it.
        """
        out: list[bytes] = []
        self._done(out, context)
        if not out:
            return b""
        self.produced = True
        return b"".join(out)


#: The converter of every route taking Anthropic clients to OpenAI chat
#: upstreams.
ANTHROPIC_TO_OPENAI = AnthropicToOpenAI()
