# -*- test-case-name: tests.test_mock_upstream -*-
"""
The APIs the mock upstream speaks: the call to answer (L{_Turn}) and, per API,
the shapes of its whole answer, its stream of events and its error body.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from itertools import count
from typing import Any, NamedTuple

from twisted.web.server import Request

from aiproxy.stream.eventstream import encode_message
from aiproxy.testing.upstream.controls import MockControls

__all__ = ["CREATED", "DEFAULT_MODEL"]

DEFAULT_MODEL = "mock-model"
"""The model named in answers to requests that name none."""

CREATED = 1700000000
"""The fixed C{created} timestamp of every answer, for determinism."""

_TOOL_NAME = "mock_tool"
_EMBEDDING = [round(0.125 * index, 3) for index in range(8)]


class _Event(NamedTuple):
    """
    One Server-Sent Event: an optional C{event:} name and its C{data:},
    JSON-encoded unless already text.
    """

    name: str | None
    data: Any


class _Framing(NamedTuple):
    """
    A stream framing other than Server-Sent Events.

    @ivar content_type: The stream's C{Content-Type}.
    @ivar encode: The wire form of one event.
    """

    content_type: str
    encode: Callable[[_Event], bytes]


@dataclass
class _Script:
    """
    The events of a stream in three parts, so that truncation can drop the
    tail and an endless stream never reaches it.

    @ivar head: Events before the content.
    @ivar contents: One event per content piece, maybe endless.
    @ivar tail: Events after the content.
    @ivar framing: How the events are framed; C{None} for Server-Sent
        Events.
    """

    head: list[_Event]
    contents: Iterator[_Event]
    tail: list[_Event]
    framing: _Framing | None = None


def _split(text: str, parts: int) -> list[str]:
    """
    @param text: A text.
    @param parts: How many pieces are wanted.
    @return: Consecutive non-empty pieces of nearly equal length joining to
        C{text}; fewer than C{parts} when C{text} is shorter.
    """
    parts = min(parts, len(text))
    return [text[len(text) * i // parts : len(text) * (i + 1) // parts] for i in range(parts)]


def _endless_pieces() -> Iterator[str]:
    """
    @return: C{"tok0 "}, C{"tok1 "}, ... forever.
    """
    return (f"tok{index} " for index in count())


@dataclass(frozen=True)
class _Turn:
    """
    One API call to answer.

    @ivar number: The request's number, used in identifiers.
    @ivar payload: The JSON request body.
    @ivar controls: The request's controls.
    """

    number: int
    payload: dict[str, Any]
    controls: MockControls

    @property
    def model(self) -> str:
        """
        The request's C{model}, or L{DEFAULT_MODEL}.
        """
        model = self.payload.get("model")
        return model if isinstance(model, str) else DEFAULT_MODEL

    @property
    def streaming(self) -> bool:
        """
        Whether the request asks for a stream.
        """
        return self.payload.get("stream") is True

    @cached_property
    def pieces(self) -> list[str]:
        """
        The content pieces of a finite answer.
        """
        if self.controls.text is not None:
            return _split(self.controls.text, self.controls.events)
        return [f"tok{index} " for index in range(self.controls.events)]

    @property
    def text(self) -> str:
        """
        The whole content of a finite answer.
        """
        return "".join(self.pieces)

    @property
    def arguments(self) -> str:
        """
        The tool-call arguments of a finite answer: a JSON object holding
        L{text}.
        """
        return json.dumps({"text": self.text})

    @property
    def completion_tokens(self) -> int:
        """
        The completion token count: one per content piece.
        """
        return len(self.pieces)

    def stream_pieces(self) -> Iterator[str]:
        """
        @return: The text or tool-argument pieces of the content events.
        """
        if self.controls.endless:
            return _endless_pieces()
        if self.controls.tool_calls:
            return iter(_split(self.arguments, len(self.pieces)))
        return iter(self.pieces)


class _Dialect:
    """
    One API's shapes: its whole answer, its stream and its error body.
    OpenAI's error shape is the default.
    """

    def complete(self, turn: _Turn) -> dict[str, Any]:
        """
        @param turn: The call.
        @return: The non-streamed answer.
        """
        raise NotImplementedError

    def streams(self, turn: _Turn) -> bool:
        """
        @param turn: The call.
        @return: Whether it asks for a stream: its body's C{"stream": true}.
        """
        return turn.streaming

    def stream(self, turn: _Turn) -> _Script | None:
        """
        @param turn: The call.
        @return: The streamed answer, or C{None} when the API has no stream.
        """
        return None

    def error(self, status: int, message: str) -> dict[str, Any]:
        """
        @param status: The HTTP status.
        @param message: What went wrong.
        @return: The error body.
        """
        return {"error": {"message": message, "type": "mock", "code": status}}


class _ChatCompletions(_Dialect):
    """
    OpenAI chat completions.
    """

    def _usage(self, turn: _Turn) -> dict[str, int]:
        prompt, completion = turn.controls.prompt_tokens, turn.completion_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _finish_reason(self, turn: _Turn) -> str:
        return "tool_calls" if turn.controls.tool_calls else "stop"

    def complete(self, turn: _Turn) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": turn.text}
        if turn.controls.tool_calls:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_mock_{turn.number}",
                        "type": "function",
                        "function": {"name": _TOOL_NAME, "arguments": turn.arguments},
                    }
                ],
            }
        answer: dict[str, Any] = {
            "id": f"chatcmpl-mock-{turn.number}",
            "object": "chat.completion",
            "created": CREATED,
            "model": turn.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self._finish_reason(turn),
                }
            ],
        }
        if turn.controls.usage:
            answer["usage"] = self._usage(turn)
        return answer

    def stream(self, turn: _Turn) -> _Script:
        base = {
            "id": f"chatcmpl-mock-{turn.number}",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": turn.model,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> _Event:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return _Event(None, {**base, "choices": [choice], "usage": None})

        def content(index: int, piece: str) -> _Event:
            if not turn.controls.tool_calls:
                return chunk({"content": piece})
            call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
            if index == 0:
                call = {
                    "index": 0,
                    "id": f"call_mock_{turn.number}",
                    "type": "function",
                    "function": {"name": _TOOL_NAME, "arguments": piece},
                }
            return chunk({"tool_calls": [call]})

        tail = [chunk({}, self._finish_reason(turn))]
        options = turn.payload.get("stream_options")
        if turn.controls.usage and isinstance(options, dict) and options.get("include_usage"):
            tail.append(_Event(None, {**base, "choices": [], "usage": self._usage(turn)}))
        tail.append(_Event(None, "[DONE]"))
        return _Script(
            head=[chunk({"role": "assistant", "content": ""})],
            contents=(content(index, piece) for index, piece in enumerate(turn.stream_pieces())),
            tail=tail,
        )


class _Messages(_Dialect):
    """
    Anthropic Messages.
    """

    def _stop_reason(self, turn: _Turn) -> str:
        return "tool_use" if turn.controls.tool_calls else "end_turn"

    def _block(self, turn: _Turn, complete: bool) -> dict[str, Any]:
        if turn.controls.tool_calls:
            return {
                "type": "tool_use",
                "id": f"toolu_mock_{turn.number}",
                "name": _TOOL_NAME,
                "input": {"text": turn.text} if complete else {},
            }
        return {"type": "text", "text": turn.text if complete else ""}

    def _message(self, turn: _Turn, complete: bool) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": f"msg_mock_{turn.number}",
            "type": "message",
            "role": "assistant",
            "model": turn.model,
            "content": [self._block(turn, True)] if complete else [],
            "stop_reason": self._stop_reason(turn) if complete else None,
            "stop_sequence": None,
        }
        if turn.controls.usage:
            output_tokens = turn.completion_tokens if complete else 0
            message["usage"] = {
                "input_tokens": turn.controls.prompt_tokens,
                "output_tokens": output_tokens,
            }
        return message

    def complete(self, turn: _Turn) -> dict[str, Any]:
        return self._message(turn, complete=True)

    def stream(self, turn: _Turn) -> _Script:
        def event(name: str, **data: Any) -> _Event:
            return _Event(name, {"type": name, **data})

        delta_type, key = (
            ("input_json_delta", "partial_json")
            if turn.controls.tool_calls
            else ("text_delta", "text")
        )
        message_delta: dict[str, Any] = {
            "delta": {"stop_reason": self._stop_reason(turn), "stop_sequence": None}
        }
        if turn.controls.usage:
            message_delta["usage"] = {"output_tokens": turn.completion_tokens}
        return _Script(
            head=[
                event("message_start", message=self._message(turn, complete=False)),
                event("content_block_start", index=0, content_block=self._block(turn, False)),
            ],
            contents=(
                event("content_block_delta", index=0, delta={"type": delta_type, key: piece})
                for piece in turn.stream_pieces()
            ),
            tail=[
                event("content_block_stop", index=0),
                event("message_delta", **message_delta),
                event("message_stop"),
            ],
        )

    def error(self, status: int, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": "mock", "message": message}}


class _Responses(_Dialect):
    """
    OpenAI Responses, text only.
    """

    def _response(self, turn: _Turn, complete: bool) -> dict[str, Any]:
        response: dict[str, Any] = {
            "id": f"resp_mock_{turn.number}",
            "object": "response",
            "created_at": CREATED,
            "status": "completed" if complete else "in_progress",
            "model": turn.model,
            "output": [],
            "usage": None,
        }
        if complete:
            response["output"] = [
                {
                    "type": "message",
                    "id": f"msg_mock_{turn.number}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": turn.text, "annotations": []}],
                }
            ]
            if turn.controls.usage:
                prompt, completion = turn.controls.prompt_tokens, turn.completion_tokens
                response["usage"] = {
                    "input_tokens": prompt,
                    "output_tokens": completion,
                    "total_tokens": prompt + completion,
                }
        return response

    def complete(self, turn: _Turn) -> dict[str, Any]:
        return self._response(turn, complete=True)

    def stream(self, turn: _Turn) -> _Script:
        def event(name: str, sequence_number: int, **data: Any) -> _Event:
            return _Event(name, {"type": name, "sequence_number": sequence_number, **data})

        return _Script(
            head=[event("response.created", 0, response=self._response(turn, complete=False))],
            contents=(
                event(
                    "response.output_text.delta",
                    index + 1,
                    item_id=f"msg_mock_{turn.number}",
                    output_index=0,
                    content_index=0,
                    delta=piece,
                )
                for index, piece in enumerate(turn.stream_pieces())
            ),
            tail=[
                event(
                    "response.completed",
                    turn.completion_tokens + 1,
                    response=self._response(turn, complete=True),
                )
            ],
        )


class _Embeddings(_Dialect):
    """
    OpenAI embeddings: one fixed vector.
    """

    def complete(self, turn: _Turn) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": _EMBEDDING}],
            "model": turn.model,
        }
        if turn.controls.usage:
            prompt = turn.controls.prompt_tokens
            answer["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
        return answer


#: The C{status} of a Google API error, by HTTP status.
_GOOGLE_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


class _Predict(_Dialect):
    """
    Vertex AI C{:predict} of a text embedding model: one prediction per
    C{instances} item, each the fixed vector with C{prompt_tokens} as its
    C{statistics.token_count}; never a stream; Google's error shape.
    """

    def streams(self, turn: _Turn) -> bool:
        return False

    def complete(self, turn: _Turn) -> dict[str, Any]:
        instances = turn.payload.get("instances")
        if not isinstance(instances, list):
            instances = []
        predictions = []
        for _ in instances:
            embeddings: dict[str, Any] = {"values": _EMBEDDING}
            if turn.controls.usage:
                statistics = {"token_count": turn.controls.prompt_tokens, "truncated": False}
                embeddings["statistics"] = statistics
            predictions.append({"embeddings": embeddings})
        characters = sum(
            len(item["content"])
            for item in instances
            if isinstance(item, dict) and isinstance(item.get("content"), str)
        )
        return {"predictions": predictions, "metadata": {"billableCharacterCount": characters}}

    def error(self, status: int, message: str) -> dict[str, Any]:
        google = _GOOGLE_STATUSES.get(status, "INTERNAL")
        return {"error": {"code": status, "message": message, "status": google}}


def _eventstream_frame(event: _Event) -> bytes:
    """
    @param event: A Bedrock stream event: its type and payload.
    @return: Its AWS EventStream message.
    """
    headers = {
        ":event-type": event.name or "",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return encode_message(headers, json.dumps(event.data, separators=(",", ":")).encode("utf-8"))


_EVENTSTREAM = _Framing("application/vnd.amazon.eventstream", _eventstream_frame)


class _Converse(_Dialect):
    """
    Amazon Bedrock Converse (C{/model/{model}/converse}): never a stream,
    the model is in the path and the body has none.
    """

    def streams(self, turn: _Turn) -> bool:
        return False

    def _stop_reason(self, turn: _Turn) -> str:
        return "tool_use" if turn.controls.tool_calls else "end_turn"

    def _usage(self, turn: _Turn) -> dict[str, int]:
        prompt, completion = turn.controls.prompt_tokens, turn.completion_tokens
        return {
            "inputTokens": prompt,
            "outputTokens": completion,
            "totalTokens": prompt + completion,
        }

    def complete(self, turn: _Turn) -> dict[str, Any]:
        block: dict[str, Any] = {"text": turn.text}
        if turn.controls.tool_calls:
            block = {
                "toolUse": {
                    "toolUseId": f"tooluse_mock_{turn.number}",
                    "name": _TOOL_NAME,
                    "input": {"text": turn.text},
                }
            }
        answer: dict[str, Any] = {
            "output": {"message": {"role": "assistant", "content": [block]}},
            "stopReason": self._stop_reason(turn),
            "metrics": {"latencyMs": 1},
        }
        if turn.controls.usage:
            answer["usage"] = self._usage(turn)
        return answer

    def error(self, status: int, message: str) -> dict[str, Any]:
        return {"message": message}


class _ConverseStream(_Converse):
    """
    Amazon Bedrock ConverseStream (C{/model/{model}/converse-stream}):
    always a stream of AWS EventStream messages, C{messageStart},
    C{contentBlockDelta}..., C{contentBlockStop}, C{messageStop} and
    C{metadata} (with the usage).
    """

    def streams(self, turn: _Turn) -> bool:
        return True

    def stream(self, turn: _Turn) -> _Script:
        head = [_Event("messageStart", {"role": "assistant"})]
        if turn.controls.tool_calls:
            start = {"toolUse": {"toolUseId": f"tooluse_mock_{turn.number}", "name": _TOOL_NAME}}
            head.append(_Event("contentBlockStart", {"contentBlockIndex": 0, "start": start}))

        def delta(piece: str) -> _Event:
            value = {"toolUse": {"input": piece}} if turn.controls.tool_calls else {"text": piece}
            return _Event("contentBlockDelta", {"contentBlockIndex": 0, "delta": value})

        metadata: dict[str, Any] = {"metrics": {"latencyMs": 1}}
        if turn.controls.usage:
            metadata["usage"] = self._usage(turn)
        return _Script(
            head=head,
            contents=(delta(piece) for piece in turn.stream_pieces()),
            tail=[
                _Event("contentBlockStop", {"contentBlockIndex": 0}),
                _Event("messageStop", {"stopReason": self._stop_reason(turn)}),
                _Event("metadata", metadata),
            ],
            framing=_EVENTSTREAM,
        )


_OPENAI_ERRORS = _Dialect()
"""The error shape of echoed requests."""

_DIALECTS: list[tuple[bytes, _Dialect]] = [
    (b"/chat/completions", _ChatCompletions()),
    (b"/v1/messages", _Messages()),
    (b"/responses", _Responses()),
    (b"/embeddings", _Embeddings()),
    (b"/converse", _Converse()),
    (b"/converse-stream", _ConverseStream()),
    (b":predict", _Predict()),
]


def _dialect_for(request: Request) -> _Dialect | None:
    """
    @param request: A request.
    @return: The API its method and path call, or C{None} to echo it.
    """
    if request.method != b"POST":
        return None
    for suffix, dialect in _DIALECTS:
        if request.path.endswith(suffix):
            return dialect
    return None
