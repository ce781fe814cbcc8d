# -*- test-case-name: tests.test_convert_anthropic_openai -*-
"""
The Anthropic side of a converted OpenAI chat stream: each upstream
chunk becomes Anthropic events (message_start, content blocks with their
deltas, message_delta and message_stop exactly once), and the usage
shared with whole answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import Enum
from typing import Any

from zope.interface import implementer

from aiproxy.convert import errors
from aiproxy.convert.anthropic_openai.request import _count
from aiproxy.convert.encoding import dumps
from aiproxy.interfaces import IStreamConverter

__all__ = ["AnthropicStream"]


#: An OpenAI C{finish_reason} → the Anthropic C{stop_reason} (else
#: C{end_turn}).
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "content_filter": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
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
    return b"event: " + kind.encode() + b"\ndata: " + dumps(document) + b"\n\n"


def _delta_head(index: int, kind: str, field: str) -> bytes:
    """
    A C{content_block_delta} event of block C{index} up to its JSON value.
    """
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
        b'"delta":{"type":"%s","%s":' % (index, kind.encode(), field.encode())
    )


@implementer(IStreamConverter)
class AnthropicStream:
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
                    + dumps(arguments)
                    + _DELTA_TAIL
                )

    def _chunk(self, document: dict[str, Any], out: list[bytes], context: Any) -> None:
        """
        Convert one parsed chunk (the phase is C{WAITING} or C{OPEN}).
        """
        if "error" in document and "choices" not in document:
            # An error chunk: the client's error event, and nothing after it.
            out.append(
                b"event: error\ndata: " + errors.to_anthropic_error(500, dumps(document)) + b"\n\n"
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
                out.append(self._head + dumps(reasoning) + _DELTA_TAIL)
            text = delta.get("content")
            if text and isinstance(text, str):
                if self._open_kind != "text":
                    index = self._open_block("text", {"type": "text", "text": ""}, out)
                    self._head = _delta_head(index, "text_delta", "text")
                out.append(self._head + dumps(text) + _DELTA_TAIL)
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
