# -*- test-case-name: tests.test_protocols -*-
"""
Client protocols: their names, how a request is recognised, what an
event says before a stream's first content, and the error event that
ends a stream cut short in each protocol.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiproxy.stream.eventstream import encode_message

__all__ = [
    "ANTHROPIC_MESSAGES",
    "BEDROCK_CONVERSE",
    "OPENAI_CHAT",
    "OPENAI_EMBEDDINGS",
    "OPENAI_RESPONSES",
    "PASSTHROUGH",
    "STREAM_CONTENT",
    "STREAM_ERROR",
    "detect_protocol",
    "error_event",
    "stream_signal",
]


OPENAI_CHAT = "openai-chat"

OPENAI_RESPONSES = "openai-responses"

OPENAI_EMBEDDINGS = "openai-embeddings"

ANTHROPIC_MESSAGES = "anthropic-messages"

BEDROCK_CONVERSE = "bedrock-converse"

PASSTHROUGH = "passthrough"


def detect_protocol(path: str, body: Mapping[str, Any]) -> str | None:
    """
    The client protocol of a request, first match wins (docs/architecture.md).

    @param path: the request path, without the query.
    @param body: the parsed JSON object.
    @return: a protocol name, or L{None} for an empty object.
    """
    if not body:
        return None
    # As in APISIX, "messages" counts only when it is a JSON array or object.
    messages = isinstance(body.get("messages"), (list, dict))
    if (path.endswith("/converse") or path.endswith("/converse-stream")) and messages:
        return BEDROCK_CONVERSE
    if path.endswith("/v1/messages"):
        return ANTHROPIC_MESSAGES
    if path.endswith("/v1/responses") and "input" in body:
        return OPENAI_RESPONSES
    if messages:
        return OPENAI_CHAT
    if "input" in body:
        return OPENAI_EMBEDDINGS
    return PASSTHROUGH


def _json(data: bytes) -> Any:
    """
    Parse JSON, or L{None} when it is not JSON.
    """
    try:
        return json.loads(data)
    except ValueError:
        return None


def error_event(protocol: str, message: str, code: str) -> bytes:
    """
    The final event telling a client of C{protocol} that its stream was
    cut short: C{data: {"error": ...}} for OpenAI-shaped protocols,
    C{event: error} for Anthropic and Responses; for Bedrock Converse an
    AWS EventStream C{exception} message (C{internalServerException},
    payload C{{"message": ...}}), as Bedrock ends a failed stream.

    @param message: the human-readable reason.
    @param code: a machine-readable reason (the abort reason).
    """
    payload: dict[str, Any]
    if protocol == BEDROCK_CONVERSE:
        headers = {
            ":exception-type": "internalServerException",
            ":content-type": "application/json",
            ":message-type": "exception",
        }
        return encode_message(headers, json.dumps({"message": message}).encode())
    if protocol == ANTHROPIC_MESSAGES:
        payload = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
    if protocol == OPENAI_RESPONSES:
        payload = {"type": "error", "code": code, "message": message, "param": None}
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
    payload = {"error": {"message": message, "type": "aiproxy_error", "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


#: L{stream_signal}: the event carries content (the stream is committed).
STREAM_CONTENT = "content"

#: L{stream_signal}: the event reports an error in-band.
STREAM_ERROR = "error"

_RESPONSES_CONTENT = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
    }
)


def _non_empty(value: Any) -> bool:
    return isinstance(value, (str, list)) and len(value) > 0


def _chat_content(document: Mapping[str, Any]) -> bool:
    """
    Whether an OpenAI chat chunk carries content: a non-empty text,
    reasoning or refusal delta, or a tool call.
    """
    for choice in document.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and any(
            _non_empty(delta.get(key))
            for key in ("content", "reasoning_content", "reasoning", "refusal", "tool_calls")
        ):
            return True
        if isinstance(delta, dict) and isinstance(delta.get("function_call"), dict):
            return True
    return False


def stream_signal(protocol: str, event: Any) -> str | None:
    """
    What one SSE event of a stream says before its first content
    (C{stream_commit_ms}): L{STREAM_CONTENT} for content (a non-empty text,
    reasoning or refusal delta, or a tool call; a role-only chunk is not
    content), L{STREAM_ERROR} for an error reported in-band, L{None} for
    anything else (metadata, comments, the end marker). In a passthrough
    stream every event but C{[DONE]} and an C{{"error": ...}} one is content.
    """
    data = event.data
    kind = event.event
    if protocol == ANTHROPIC_MESSAGES:
        if kind == "error":
            return STREAM_ERROR
        if kind == "content_block_start":
            document = _json(data)
            block = document.get("content_block") if isinstance(document, dict) else None
            if isinstance(block, dict) and block.get("type") in ("tool_use", "server_tool_use"):
                return STREAM_CONTENT
            if isinstance(block, dict) and _non_empty(block.get("text")):
                return STREAM_CONTENT
        elif kind == "content_block_delta":
            document = _json(data)
            delta = document.get("delta") if isinstance(document, dict) else None
            if isinstance(delta, dict) and any(
                _non_empty(delta.get(key)) for key in ("text", "thinking", "partial_json")
            ):
                return STREAM_CONTENT
        return None
    if protocol == OPENAI_RESPONSES:
        if kind in ("error", "response.failed"):
            return STREAM_ERROR
        if kind in _RESPONSES_CONTENT:
            document = _json(data)
            if isinstance(document, dict) and _non_empty(document.get("delta")):
                return STREAM_CONTENT
        elif kind == "response.output_item.added" and b'"function_call"' in data:
            return STREAM_CONTENT
        return None
    if data == b"[DONE]" or not data:
        return None
    document = _json(data)
    if isinstance(document, dict) and document.get("error"):
        return STREAM_ERROR
    if protocol == OPENAI_CHAT:
        if kind == "error":
            return STREAM_ERROR
        return STREAM_CONTENT if isinstance(document, dict) and _chat_content(document) else None
    return STREAM_CONTENT
