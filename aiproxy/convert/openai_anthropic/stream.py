# -*- test-case-name: tests.test_convert_openai_anthropic -*-
"""
The OpenAI side of a converted Anthropic Messages stream: each upstream
event becomes C{chat.completion.chunk}s ending in C{data: [DONE]}, and
the shapes shared with whole answers (usage, finish reasons).

On the per-event hot path: each event's JSON is parsed once (not at all
for C{ping} and C{content_block_stop}), and a text or reasoning chunk is
written from a prefix made once per stream around the one JSON string
encoded per event.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import Enum
from typing import Any

from zope.interface import implementer

from aiproxy.convert import errors
from aiproxy.convert.encoding import dumps
from aiproxy.interfaces import IStreamConverter

__all__ = ["OpenAIStream", "finish_reason", "openai_usage"]


#: An Anthropic C{stop_reason} → the OpenAI C{finish_reason} (else C{stop}).
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

#: The Anthropic usage counts a stream's usage chunk is made of.
_USAGE_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)

_DONE = b"data: [DONE]\n\n"

_CONTENT = b'{"content":'

_REASONING = b'{"reasoning_content":'

_OPEN_TAIL = b'},"finish_reason":null}]}\n\n'


def _count(value: Any) -> int:
    """
    C{value} if it is a token count, else 0.
    """
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def openai_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """
    The OpenAI usage object of an Anthropic one: the prompt counts the
    cached and cache-written tokens too.
    """
    cached = _count(usage.get("cache_read_input_tokens"))
    prompt = (
        _count(usage.get("input_tokens"))
        + cached
        + _count(usage.get("cache_creation_input_tokens"))
    )
    completion = _count(usage.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def finish_reason(stop_reason: Any) -> str:
    """
    The OpenAI C{finish_reason} of an Anthropic C{stop_reason}.
    """
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


class _Phase(Enum):
    """
    Where an upstream stream is.
    """

    #: Before C{message_start}: nothing to say yet.
    WAITING = "waiting"
    #: In the message.
    OPEN = "open"
    #: C{message_stop} seen, C{[DONE]} written: the rest is ignored.
    ENDED = "ended"
    #: An C{error} event written as an error chunk: the rest is ignored.
    FAILED = "failed"


@implementer(IStreamConverter)
class OpenAIStream:
    """
    Converts one Anthropic event stream into C{chat.completion.chunk}s.

    @ivar produced: whether any bytes were returned yet.
    """

    __slots__ = (
        "produced",
        "_phase",
        "_created",
        "_include_usage",
        "_head",
        "_delta",
        "_tools",
        "_finished",
        "_usage",
    )

    def __init__(self, created: int, include_usage: bool) -> None:
        """
        @param created: the chunks' C{created} time.
        @param include_usage: the client asked for a usage chunk.
        """
        self.produced = False
        self._phase = _Phase.WAITING
        self._created = created
        self._include_usage = include_usage
        # The chunks' JSON up to "choices", and up to the delta's value.
        self._head = b""
        self._delta = b""
        # Anthropic block index → OpenAI tool call index.
        self._tools: dict[Any, int] = {}
        self._finished = False
        self._usage: dict[str, int] = {}

    def _chunk(self, delta: Any, finish_reason: str | None = None) -> bytes:
        return self._delta + dumps(delta) + b',"finish_reason":' + dumps(finish_reason) + b"}]}\n\n"

    def _add_usage(self, usage: Any, context: Any) -> None:
        """
        Record an Anthropic usage object: in C{context}, and in the counts
        of the usage chunk (a later 0 does not erase a known count).
        """
        if not isinstance(usage, dict):
            return
        context.set_usage(usage)
        known = self._usage
        for key in _USAGE_KEYS:
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                if value or not known.get(key):
                    known[key] = value

    def _start(self, document: Any, context: Any) -> bytes:
        message = document.get("message")
        if not isinstance(message, dict):
            message = {}
        message_id = message.get("id")
        model = context.llm_model or message.get("model")
        head = dumps(
            {
                "id": message_id if isinstance(message_id, str) else "",
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": model if isinstance(model, str) else "",
            }
        )
        self._head = b"data: " + head[:-1]
        self._delta = self._head + b',"choices":[{"index":0,"delta":'
        self._phase = _Phase.OPEN
        self._add_usage(message.get("usage"), context)
        return self._chunk({"role": "assistant", "content": ""})

    def _finish(self, stop_reason: Any) -> bytes:
        self._finished = True
        out = self._chunk({}, finish_reason(stop_reason))
        if self._include_usage:
            out += (
                self._head + b',"choices":[],"usage":' + dumps(openai_usage(self._usage)) + b"}\n\n"
            )
        return out

    def _block_start(self, document: Any, context: Any) -> bytes:
        block = document.get("content_block")
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_use":
            assert isinstance(block, dict)
            index = self._tools[document.get("index")] = len(self._tools)
            context.has_tool_calls = True
            return self._chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": block.get("id"),
                            "type": "function",
                            "function": {"name": block.get("name"), "arguments": ""},
                        }
                    ]
                }
            )
        if kind == "text" or kind == "thinking":
            assert isinstance(block, dict)
            text = block.get(kind)
            if isinstance(text, str) and text:
                prefix = _CONTENT if kind == "text" else _REASONING
                return self._delta + prefix + dumps(text) + _OPEN_TAIL
        return b""

    def _block_delta(self, document: Any) -> bytes:
        delta = document.get("delta")
        if not isinstance(delta, dict):
            return b""
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if isinstance(text, str) and text:
                return self._delta + _CONTENT + dumps(text) + _OPEN_TAIL
        elif kind == "thinking_delta":
            text = delta.get("thinking")
            if isinstance(text, str) and text:
                return self._delta + _REASONING + dumps(text) + _OPEN_TAIL
        elif kind == "input_json_delta":
            fragment = delta.get("partial_json")
            index = self._tools.get(document.get("index"))
            if index is not None and isinstance(fragment, str) and fragment:
                return self._chunk(
                    {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
                )
        return b""

    def convert_events(self, events: Any, context: Any) -> bytes:
        out: list[bytes] = []
        for event in events:
            phase = self._phase
            if phase is _Phase.ENDED or phase is _Phase.FAILED:
                break
            kind = event.event
            if kind == "ping" or kind == "content_block_stop":
                continue
            document = None
            if kind != "error":
                try:
                    document = json.loads(event.data)
                except ValueError:
                    continue
                if not isinstance(document, dict):
                    continue
                if kind == "message":
                    # An unnamed event: the type its data carries.
                    kind = document.get("type")
            if kind == "error":
                # The error's body as an OpenAI error chunk, and no [DONE].
                out.append(b"data: " + errors.to_openai_error(500, event.data) + b"\n\n")
                self._phase = _Phase.FAILED
                break
            assert document is not None
            if phase is _Phase.WAITING:
                if kind == "message_start":
                    out.append(self._start(document, context))
            elif kind == "content_block_delta":
                piece = self._block_delta(document)
                if piece:
                    out.append(piece)
            elif kind == "content_block_start":
                piece = self._block_start(document, context)
                if piece:
                    out.append(piece)
            elif kind == "message_delta":
                self._add_usage(document.get("usage"), context)
                if not self._finished:
                    delta = document.get("delta")
                    out.append(
                        self._finish(delta.get("stop_reason") if isinstance(delta, dict) else None)
                    )
            elif kind == "message_stop":
                if not self._finished:
                    out.append(self._finish(None))
                out.append(_DONE)
                context.done = True
                self._phase = _Phase.ENDED
        if not out:
            return b""
        self.produced = True
        return b"".join(out)

    def finish(self, context: Any) -> bytes:
        """
        Nothing more: a stream cut mid-message is ended by the relay's own
        error event.
        """
        return b""
