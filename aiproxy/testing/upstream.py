# -*- test-case-name: tests.test_mock_upstream -*-
"""
A deterministic mock LLM upstream on twisted.web, controllable per request.

It speaks four APIs, chosen by the end of a C{POST} request's path (the
prefix is free, so any C{override.endpoint} path works):

  - C{.../chat/completions}: OpenAI chat completions, streamed as
    C{chat.completion.chunk} events when the body has C{"stream": true};
  - C{.../v1/messages}: Anthropic Messages, streamed or not;
  - C{.../responses}: OpenAI Responses (minimal), streamed or not;
  - C{.../embeddings}: one vector.

Any other request is echoed back as JSON (method, path, query, headers,
body) with status 200. Administrative resources, which are neither recorded
nor counted as requests:

  - C{GET /_mock/stats}: counters, see L{MockStats.as_dict};
  - C{POST /_mock/reset}: zero the counters and forget recorded requests;
  - C{GET /_mock/requests}: the last L{RECORDED_REQUESTS} requests, see
    L{RecordedRequest.as_dict};
  - C{GET /chunks}: the number of data events sent on the most recent stream,
    as plain text.

Each request is controlled by query parameters of its URL or by
C{x-mock-<name>} request headers (the header wins; C{x-mock-delay-ms} and
C{x-mock-delay_ms} both work); the controls are the fields of
L{MockControls}.

The content is deterministic: the pieces are C{"tok0 "}, C{"tok1 "}, ...
unless a C{text} is given, C{created} is the fixed L{CREATED}, identifiers
carry the request's number (C{x-request-id: mock-<n>}, counted from 1 after
start or reset), C{prompt_tokens} is the control of that name and
C{completion_tokens} the number of content pieces.

Use L{start_mock_upstream} in tests, L{MockUpstream.resource} to mount it in
another site, or the command line::

    python -m aiproxy.testing.upstream --listen tcp:port=7751:interface=127.0.0.1
"""

from __future__ import annotations

import base64
import json
import os
import random
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from functools import cached_property
from http.client import responses
from itertools import chain, count, islice
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTime,
)
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

__all__ = [
    "CREATED",
    "DEFAULT_LISTEN",
    "DEFAULT_MODEL",
    "RECORDED_REQUESTS",
    "MockControlError",
    "MockControls",
    "MockStats",
    "MockUpstream",
    "Options",
    "RecordedRequest",
    "RunningMockUpstream",
    "main",
    "start_mock_upstream",
]

_log = Logger()

DEFAULT_LISTEN = "tcp:port=7751:interface=127.0.0.1"
"""The endpoint the command line listens on when given neither option."""

DEFAULT_MODEL = "mock-model"
"""The model named in answers to requests that name none."""

CREATED = 1700000000
"""The fixed C{created} timestamp of every answer, for determinism."""

RECORDED_REQUESTS = 100
"""How many of the most recent requests C{/_mock/requests} keeps."""

_GARBAGE_SEED = 0
_TOOL_NAME = "mock_tool"
_EMBEDDING = [round(0.125 * index, 3) for index in range(8)]
_JSON = "application/json"
_EVENT_STREAM = "text/event-stream"


# Controls


class MockControlError(ValueError):
    """
    A control was given a value it cannot take.

    @ivar name: The control's name.
    @ivar value: The value given, as text.
    """

    def __init__(self, name: str, value: str) -> None:
        super().__init__(f"invalid mock control {name}: {value!r}")
        self.name = name
        self.value = value


@dataclass(frozen=True)
class MockControls:
    """
    How to answer one request; each field is a control of the same name.

    @ivar events: Number of content events (and pieces of a non-streamed
        answer).
    @ivar delay_ms: Pause between two writes of a stream.
    @ivar first_delay_ms: Pause before the status line and headers.
    @ivar body_delay_ms: Pause after the headers, before the first body byte.
    @ivar burst: Events per write; each write is one HTTP chunk.
    @ivar endless: Stream content events (C{"tok<i> "}, C{text} ignored)
        forever, one write per C{delay_ms}, until the client leaves.
    @ivar crlf: End lines with CRLF and events with C{\\r\\n\\r\\n}.
    @ivar text: The whole content text, split into C{events} pieces (fewer
        when the text is shorter).
    @ivar status: Answer with this status and an error body in the API's
        shape (C{retry-after: 1} on 429).
    @ivar truncate: Stop a stream after its first C{events} content events
        (endless or not), without the finish, usage or C{[DONE]} events, or
        a non-streamed body after half of it, and close the connection
        without ending the response. The bytes written are flushed before
        the close (C{abortConnection} would discard them), so the client
        receives them all, then sees an incomplete chunked or
        C{Content-Length} body.
    @ivar keepalive_comments: Number of C{: keep-alive} comment blocks sent
        before the first event, one per write.
    @ivar content_type: Replaces the response's C{Content-Type}.
    @ivar garbage: Send this many seeded pseudo-random bytes as the body.
    @ivar giant_line: Send one C{data: } line with this many bytes of value
        and no line end, then end the response.
    @ivar split_events: Send every write as two halves, two HTTP chunks.
    @ivar usage: Report token usage; C{0} omits it even when asked for.
    @ivar tool_calls: The content is a tool call's arguments (chat
        completions and messages).
    @ivar prompt_tokens: The prompt token count reported in usage.
    """

    events: int = 5
    delay_ms: int = 0
    first_delay_ms: int = 0
    body_delay_ms: int = 0
    burst: int = 1
    endless: bool = False
    crlf: bool = False
    text: str | None = None
    status: int | None = None
    truncate: bool = False
    keepalive_comments: int = 0
    content_type: str | None = None
    garbage: int = 0
    giant_line: int = 0
    split_events: bool = False
    usage: bool = True
    tool_calls: bool = False
    prompt_tokens: int = 10

    @classmethod
    def from_request(cls, request: Request) -> MockControls:
        """
        Read the controls of a request from its C{x-mock-*} headers and its
        query.

        @param request: The request to read.
        @return: The controls, defaults for those not given.
        @raise MockControlError: A value is not valid for its control.
        """
        values: dict[str, Any] = {}
        for control in fields(cls):
            raw = _control_value(request, control.name)
            if raw is None:
                continue
            try:
                values[control.name] = _CONTROL_PARSERS[control.name](raw)
            except ValueError:
                raise MockControlError(control.name, raw) from None
        return cls(**values)


def _control_value(request: Request, name: str) -> str | None:
    """
    Find a control's raw value: header first, then query parameter.

    @param request: The request to read.
    @param name: The control's name.
    @return: The value as text, or C{None} when not given.
    """
    for header in (f"x-mock-{name.replace('_', '-')}", f"x-mock-{name}"):
        value = request.getHeader(header.encode("ascii"))
        if value is not None:
            return value.decode("utf-8", "replace")
    values = _query(request).get(name.encode("ascii"))
    if values:
        return values[-1].decode("utf-8", "replace")
    return None


def _query(request: Request) -> dict[bytes, list[bytes]]:
    """
    @param request: A request.
    @return: Its query parameters, name to values.
    """
    query: dict[bytes, list[bytes]] = request.args or {}
    return query


def _at_least(minimum: int) -> Callable[[str], int]:
    """
    @param minimum: The smallest value allowed.
    @return: A parser of control values into integers of at least
        C{minimum}, raising L{ValueError} for anything else.
    """

    def parse(raw: str) -> int:
        value = int(raw)
        if value < minimum:
            raise ValueError(raw)
        return value

    return parse


_natural = _at_least(0)
_positive = _at_least(1)


def _flag(raw: str) -> bool:
    """
    @param raw: A control value: C{1/true/yes/on} or C{0/false/no/off}.
    @return: Its truth.
    @raise ValueError: It is neither.
    """
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(raw)


def _status(raw: str) -> int:
    """
    @param raw: A control value.
    @return: It as an HTTP status from 200 to 599.
    @raise ValueError: It is not one.
    """
    value = int(raw)
    if not 200 <= value <= 599:
        raise ValueError(raw)
    return value


_CONTROL_PARSERS: dict[str, Callable[[str], Any]] = {
    "events": _natural,
    "delay_ms": _natural,
    "first_delay_ms": _natural,
    "body_delay_ms": _natural,
    "burst": _positive,
    "endless": _flag,
    "crlf": _flag,
    "text": str,
    "status": _status,
    "truncate": _flag,
    "keepalive_comments": _natural,
    "content_type": str,
    "garbage": _natural,
    "giant_line": _natural,
    "split_events": _flag,
    "usage": _flag,
    "tool_calls": _flag,
    "prompt_tokens": _natural,
}


# Bookkeeping


@dataclass
class RecordedRequest:
    """
    A request as the mock received it.

    @ivar method: The HTTP method.
    @ivar path: The request target, query included.
    @ivar headers: Lower-cased header name to its values.
    @ivar body: The raw body.
    """

    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes

    @classmethod
    def from_request(cls, request: Request, body: bytes) -> RecordedRequest:
        """
        @param request: The request received.
        @param body: Its body, already read.
        @return: Its record.
        """
        return cls(
            method=request.method.decode("ascii", "replace"),
            path=request.uri.decode("utf-8", "replace"),
            headers=_header_lists(request),
            body=body,
        )

    def as_dict(self) -> dict[str, Any]:
        """
        @return: The JSON form: C{method}, C{path}, C{headers}, C{body} (as
            text) and C{body_base64}.
        """
        return {
            "method": self.method,
            "path": self.path,
            "headers": self.headers,
            "body": self.body.decode("utf-8", "replace"),
            "body_base64": base64.b64encode(self.body).decode("ascii"),
        }


def _header_lists(request: Request) -> dict[str, list[str]]:
    """
    @param request: A request.
    @return: Its headers, lower-cased name to the list of values.
    """
    return {
        name.decode("latin-1").lower(): [value.decode("utf-8", "replace") for value in values]
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


@dataclass
class MockStats:
    """
    Counters of what the mock has done since it started or was reset.

    A stream is an answer sent as Server-Sent Events; it counts as started
    when its request arrives, so a client leaving during C{first_delay_ms}
    aborts it.

    @ivar requests: Requests answered, administrative ones excepted.
    @ivar events_sent: Data events written on all streams (comments excepted).
    @ivar streams_started: Streams begun.
    @ivar streams_finished: Streams that ended normally.
    @ivar streams_aborted: Streams whose client closed the connection first.
    @ivar streams_truncated: Streams cut short by the C{truncate} control.
    @ivar requests_aborted: Requests of any kind whose client closed the
        connection before the answer was complete.
    @ivar last_stream_events: Data events written on the most recent stream.
    """

    requests: int = 0
    events_sent: int = 0
    streams_started: int = 0
    streams_finished: int = 0
    streams_aborted: int = 0
    streams_truncated: int = 0
    requests_aborted: int = 0
    last_stream_events: int = 0
    _open: set[object] = field(default_factory=set, repr=False)
    _last_stream: object | None = field(default=None, repr=False)

    @property
    def streams_open(self) -> int:
        """
        The streams in progress now (not reset by L{reset}).
        """
        return len(self._open)

    def as_dict(self) -> dict[str, int]:
        """
        @return: The JSON form of C{/_mock/stats}: every counter and
            C{streams_open}.
        """
        return {
            "requests": self.requests,
            "events_sent": self.events_sent,
            "streams_started": self.streams_started,
            "streams_finished": self.streams_finished,
            "streams_aborted": self.streams_aborted,
            "streams_truncated": self.streams_truncated,
            "streams_open": self.streams_open,
            "requests_aborted": self.requests_aborted,
            "last_stream_events": self.last_stream_events,
        }

    def reset(self) -> None:
        """
        Zero every counter; streams still in progress keep counting.
        """
        for counter in fields(self):
            if not counter.name.startswith("_"):
                setattr(self, counter.name, 0)
        self._last_stream = None

    def stream_started(self, stream: object) -> None:
        """
        @param stream: A stream that begins; it becomes the most recent one.
        """
        self.streams_started += 1
        self._open.add(stream)
        self._last_stream = stream
        self.last_stream_events = 0

    def events_written(self, stream: object, events: int) -> None:
        """
        @param stream: The stream written to.
        @param events: How many data events were written.
        """
        self.events_sent += events
        if stream is self._last_stream:
            self.last_stream_events += events

    def stream_finished(self, stream: object) -> None:
        """
        @param stream: A stream that ended normally.
        """
        self.streams_finished += 1
        self._open.discard(stream)

    def stream_truncated(self, stream: object) -> None:
        """
        @param stream: A stream the mock cut short on purpose.
        """
        self.streams_truncated += 1
        self._open.discard(stream)

    def stream_aborted(self, stream: object) -> None:
        """
        @param stream: A stream whose client left before its end.
        """
        self.streams_aborted += 1
        self._open.discard(stream)


# What to send


class _Event(NamedTuple):
    """
    One Server-Sent Event: an optional C{event:} name and its C{data:},
    JSON-encoded unless already text.
    """

    name: str | None
    data: Any


@dataclass
class _Script:
    """
    The events of a stream in three parts, so that truncation can drop the
    tail and an endless stream never reaches it.

    @ivar head: Events before the content.
    @ivar contents: One event per content piece, maybe endless.
    @ivar tail: Events after the content.
    """

    head: list[_Event]
    contents: Iterator[_Event]
    tail: list[_Event]


@dataclass
class _EventStream:
    """
    An encoded stream body.

    @ivar comments: Comment blocks written first, one per write, not counted
        as events.
    @ivar events: Encoded events, maybe endless.
    """

    comments: list[bytes]
    events: Iterator[bytes]


@dataclass
class _Reply:
    """
    A planned answer.

    @ivar status: The HTTP status.
    @ivar headers: Response headers.
    @ivar body: A whole body, or a stream.
    @ivar truncate: Close the connection before the body is complete.
    """

    status: int
    headers: dict[str, str]
    body: bytes | _EventStream
    truncate: bool = False


def _json_bytes(value: Any) -> bytes:
    """
    @param value: A JSON value.
    @return: Its compact UTF-8 encoding.
    """
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _encode_event(event: _Event, crlf: bool) -> bytes:
    """
    @param event: An event.
    @param crlf: Use CRLF line ends.
    @return: Its wire form, boundary included.
    """
    data = event.data if isinstance(event.data, str) else _json_bytes(event.data).decode("utf-8")
    lines = [f"event: {event.name}"] if event.name is not None else []
    lines.append(f"data: {data}")
    end = "\r\n" if crlf else "\n"
    return (end.join(lines) + end + end).encode("utf-8")


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


_OPENAI_ERRORS = _Dialect()
"""The error shape of echoed requests."""

_DIALECTS: list[tuple[bytes, _Dialect]] = [
    (b"/chat/completions", _ChatCompletions()),
    (b"/v1/messages", _Messages()),
    (b"/responses", _Responses()),
    (b"/embeddings", _Embeddings()),
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


def _headers(number: int) -> dict[str, str]:
    """
    @param number: A request's number.
    @return: The headers of every answer to it: C{x-request-id} and a
        rate-limit header.
    """
    return {"x-request-id": f"mock-{number}", "x-ratelimit-remaining-requests": "99"}


def _json_reply(status: int, headers: dict[str, str], value: Any) -> _Reply:
    """
    @param status: The HTTP status.
    @param headers: Headers to send besides the content type and length.
    @param value: The JSON body.
    @return: The reply.
    """
    body = _json_bytes(value)
    headers = {**headers, "content-type": _JSON, "content-length": str(len(body))}
    return _Reply(status, headers, body)


def _error_reply(status: int, headers: dict[str, str], body: dict[str, Any]) -> _Reply:
    """
    @param status: The error status.
    @param headers: Headers to send besides the content type and length.
    @param body: The error body.
    @return: The reply, with C{retry-after: 1} on 429.
    """
    if status == 429:
        headers = {**headers, "retry-after": "1"}
    return _json_reply(status, headers, body)


def _stream_reply(headers: dict[str, str], script: _Script, controls: MockControls) -> _Reply:
    """
    @param headers: Headers to send besides the stream's own.
    @param script: The events.
    @param controls: The controls (C{crlf}, C{keepalive_comments},
        C{truncate}, C{events}).
    @return: The reply.
    """
    events: Iterator[_Event] = (
        chain(script.head, islice(script.contents, controls.events))
        if controls.truncate
        else chain(script.head, script.contents, script.tail)
    )
    end = "\r\n" if controls.crlf else "\n"
    comment = f": keep-alive{end}{end}".encode("ascii")
    stream = _EventStream(
        comments=[comment] * controls.keepalive_comments,
        events=(_encode_event(event, controls.crlf) for event in events),
    )
    headers = {**headers, "content-type": _EVENT_STREAM, "cache-control": "no-cache"}
    return _Reply(200, headers, stream, truncate=controls.truncate)


def _raw_reply(headers: dict[str, str], body: bytes, streaming: bool) -> _Reply:
    """
    @param headers: Headers to send besides the content type.
    @param body: The body, sent without a length.
    @param streaming: Whether the request asked for a stream.
    @return: The reply.
    """
    content_type = _EVENT_STREAM if streaming else _JSON
    return _Reply(200, {**headers, "content-type": content_type}, body)


def _plan(turn: _Turn, dialect: _Dialect | None, echo: dict[str, Any]) -> _Reply:
    """
    Decide the answer to a call.

    @param turn: The call.
    @param dialect: The API called, or C{None} to echo.
    @param echo: The echo of the request.
    @return: The reply.
    """
    controls = turn.controls
    headers = _headers(turn.number)
    if controls.status is not None:
        shape = dialect if dialect is not None else _OPENAI_ERRORS
        reply = _error_reply(controls.status, headers, shape.error(controls.status, "mock error"))
    elif controls.garbage:
        body = random.Random(_GARBAGE_SEED).randbytes(controls.garbage)
        reply = _raw_reply(headers, body, turn.streaming)
    elif controls.giant_line:
        reply = _raw_reply(headers, b"data: " + b"x" * controls.giant_line, True)
    elif dialect is None:
        reply = _json_reply(200, headers, echo)
    elif turn.streaming and (script := dialect.stream(turn)) is not None:
        reply = _stream_reply(headers, script, controls)
    else:
        reply = _json_reply(200, headers, dialect.complete(turn))
        reply.truncate = controls.truncate
    if controls.content_type is not None:
        reply.headers["content-type"] = controls.content_type
    return reply


# Sending


@implementer(IPushProducer)
class _Delivery:
    """
    Sends one L{_Reply} with the timing its controls ask for, as the
    producer of a stream so that a client that stops reading pauses it, and
    stops every timer when the client leaves.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        stats: MockStats,
        reply: _Reply,
        controls: MockControls,
    ) -> None:
        """
        @param request: The request to answer.
        @param clock: Schedules the delays.
        @param stats: Counts streams, events and aborts.
        @param reply: The answer.
        @param controls: The timing and write controls.
        """
        self._request = request
        self._clock = clock
        self._stats = stats
        self._reply = reply
        self._controls = controls
        stream = reply.body if isinstance(reply.body, _EventStream) else None
        self._streaming = stream is not None
        self._comments = list(stream.comments) if stream is not None else []
        self._events: Iterator[bytes] = stream.events if stream is not None else iter(())
        self._lookahead: list[bytes] = []
        self._call: IDelayedCall | None = None
        self._paused = False
        self._done = False

    def start(self) -> None:
        """
        Begin answering.
        """
        self._request.notifyFinish().addErrback(self._connection_lost)
        if self._streaming:
            self._stats.stream_started(self)
        self._after(self._controls.first_delay_ms, self._send_head)

    # IPushProducer

    def pauseProducing(self) -> None:
        """
        The client's connection is full: write nothing until resumed.
        """
        self._paused = True

    def resumeProducing(self) -> None:
        """
        The client's connection drained: carry on writing.
        """
        self._paused = False
        if self._call is None and not self._done:
            self._schedule(0, self._pump)

    def stopProducing(self) -> None:
        """
        The connection is going away.
        """
        self._abandon()

    # Steps

    def _after(self, delay_ms: int, step: Callable[[], None]) -> None:
        """
        @param delay_ms: Milliseconds to wait; 0 runs C{step} now.
        @param step: What to do then.
        """
        if delay_ms:
            self._schedule(delay_ms, step)
        else:
            step()

    def _schedule(self, delay_ms: int, step: Callable[[], None]) -> None:
        """
        @param delay_ms: Milliseconds to wait, at least one reactor turn.
        @param step: What to do then.
        """
        self._call = self._clock.callLater(delay_ms / 1000, self._run, step)

    def _run(self, step: Callable[[], None]) -> None:
        """
        @param step: A scheduled step, due now.
        """
        self._call = None
        step()

    def _send_head(self) -> None:
        """
        Send the status line and headers.
        """
        status = self._reply.status
        self._request.setResponseCode(status, responses.get(status, "Mock Status").encode("ascii"))
        for name, value in self._reply.headers.items():
            self._request.setHeader(name, value)
        self._request.write(b"")
        self._after(self._controls.body_delay_ms, self._send_body)

    def _send_body(self) -> None:
        """
        Send a whole body, or start the stream.
        """
        body = self._reply.body
        if not isinstance(body, bytes):
            self._request.registerProducer(self, True)
            self._pump()
            return
        self._done = True
        if self._reply.truncate:
            self._write(body[: len(body) // 2])
            self._drop()
        else:
            self._write(body)
            self._request.finish()

    def _pump(self) -> None:
        """
        Write the next step of the stream unless paused, and schedule the
        one after.
        """
        if self._paused:
            return
        self._step()
        if not self._done:
            self._schedule(self._controls.delay_ms, self._pump)

    def _step(self) -> None:
        """
        Write one comment or one burst of events; end the stream after the
        last.
        """
        if self._comments:
            self._write(self._comments.pop())
            return
        batch = self._take(self._controls.burst)
        self._write(b"".join(batch))
        self._stats.events_written(self, len(batch))
        if not self._lookahead:
            self._end()

    def _take(self, size: int) -> list[bytes]:
        """
        @param size: How many events to take.
        @return: Up to C{size} next events; one more stays in
            C{self._lookahead}, which is empty at the end of the stream.
        """
        wanted = size - len(self._lookahead)
        batch = self._lookahead + list(islice(self._events, wanted))
        self._lookahead = list(islice(self._events, 1))
        return batch

    def _write(self, data: bytes) -> None:
        """
        @param data: Bytes for one HTTP chunk, or two halves with
            C{split_events}.
        """
        if self._controls.split_events and len(data) > 1:
            middle = len(data) // 2
            self._request.write(data[:middle])
            self._request.write(data[middle:])
        else:
            self._request.write(data)

    def _end(self) -> None:
        """
        The stream's events are all written: finish it, or cut the
        connection when truncating.
        """
        self._done = True
        self._request.unregisterProducer()
        if self._reply.truncate:
            self._stats.stream_truncated(self)
            self._drop()
        else:
            self._stats.stream_finished(self)
            self._request.finish()

    def _drop(self) -> None:
        """
        Close the connection without ending the response. The bytes already
        written are flushed first, so the client sees all of them and then
        an incomplete body.
        """
        self._request.loseConnection()

    def _connection_lost(self, reason: Failure) -> None:
        """
        @param reason: Why the request's connection went away.
        """
        self._abandon()

    def _abandon(self) -> None:
        """
        The client left before the answer was complete: stop the timers and
        count the abort, once.
        """
        if self._done:
            return
        self._done = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._streaming:
            self._stats.stream_aborted(self)
        self._stats.requests_aborted += 1
        _log.debug("mock upstream: client left {path}", path=self._request.uri)


# The resource


class MockUpstream:
    """
    The mock's state: counters and recorded requests, shared by the
    resources it makes.

    @ivar stats: The counters.
    @ivar requests: The last L{RECORDED_REQUESTS} requests, oldest first.
    """

    def __init__(self, clock: IReactorTime) -> None:
        """
        @param clock: Schedules every delay and stream write.
        """
        self._clock = clock
        self.stats = MockStats()
        self.requests: deque[RecordedRequest] = deque(maxlen=RECORDED_REQUESTS)

    def resource(self) -> IResource:
        """
        @return: A leaf resource answering every path as the module
            describes.
        """
        return _MockResource(self, self._clock)

    def reset(self) -> None:
        """
        Zero the counters and forget the recorded requests.
        """
        self.stats.reset()
        self.requests.clear()


class _MockResource(Resource):
    """
    The HTTP face of a L{MockUpstream}.
    """

    isLeaf = True

    def __init__(self, upstream: MockUpstream, clock: IReactorTime) -> None:
        """
        @param upstream: The state to use.
        @param clock: Schedules the deliveries.
        """
        super().__init__()
        self._upstream = upstream
        self._clock = clock
        self._admin: dict[bytes, tuple[bytes, Callable[[Request], bytes]]] = {
            b"/_mock/stats": (b"GET", self._render_stats),
            b"/_mock/reset": (b"POST", self._render_reset),
            b"/_mock/requests": (b"GET", self._render_requests),
            b"/chunks": (b"GET", self._render_chunks),
        }

    def render(self, request: Request) -> bytes | int:
        """
        @param request: Any request.
        @return: An administrative answer, or C{NOT_DONE_YET} while the
            delivery answers.
        """
        route = self._admin.get(request.path)
        if route is None:
            return self._answer(request)
        method, render = route
        if request.method != method:
            request.setResponseCode(405)
            request.setHeader(b"allow", method)
            return self._json(request, {"error": {"message": "method not allowed"}})
        return render(request)

    def _json(self, request: Request, value: Any) -> bytes:
        request.setHeader(b"content-type", _JSON.encode("ascii"))
        return _json_bytes(value)

    def _render_stats(self, request: Request) -> bytes:
        return self._json(request, self._upstream.stats.as_dict())

    def _render_reset(self, request: Request) -> bytes:
        self._upstream.reset()
        return self._json(request, self._upstream.stats.as_dict())

    def _render_requests(self, request: Request) -> bytes:
        return self._json(request, [record.as_dict() for record in self._upstream.requests])

    def _render_chunks(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return str(self._upstream.stats.last_stream_events).encode("ascii")

    def _answer(self, request: Request) -> int:
        """
        Record and count an API call, plan its answer and start delivering.

        @param request: The call.
        @return: C{NOT_DONE_YET}.
        """
        body = request.content.read() if request.content is not None else b""
        record = RecordedRequest.from_request(request, body)
        self._upstream.requests.append(record)
        stats = self._upstream.stats
        stats.requests += 1
        dialect = _dialect_for(request)
        try:
            controls = MockControls.from_request(request)
            payload = _payload(body) if dialect is not None else {}
        except ValueError as error:
            controls = MockControls()
            shape = dialect if dialect is not None else _OPENAI_ERRORS
            reply = _error_reply(400, _headers(stats.requests), shape.error(400, str(error)))
        else:
            turn = _Turn(stats.requests, payload, controls)
            reply = _plan(turn, dialect, _echo(request, record))
        _Delivery(request, self._clock, stats, reply, controls).start()
        return NOT_DONE_YET


def _payload(body: bytes) -> dict[str, Any]:
    """
    @param body: An API call's body.
    @return: It parsed as a JSON object.
    @raise ValueError: It is not one.
    """
    payload = json.loads(body)
    if not isinstance(payload, dict):
        raise ValueError("request body is not a JSON object")
    return payload


def _echo(request: Request, record: RecordedRequest) -> dict[str, Any]:
    """
    @param request: A request.
    @param record: Its record.
    @return: The echo: C{method}, C{path} (without query), C{query} (name to
        values), C{headers} and C{body} (as text).
    """
    return {
        "method": record.method,
        "path": request.path.decode("utf-8", "replace"),
        "query": {
            name.decode("utf-8", "replace"): [value.decode("utf-8", "replace") for value in values]
            for name, values in _query(request).items()
        },
        "headers": record.headers,
        "body": record.body.decode("utf-8", "replace"),
    }


# Running it


class RunningMockUpstream(NamedTuple):
    """
    A mock upstream listening, as L{start_mock_upstream} returns it.

    @ivar upstream: Its state.
    @ivar port: The TCP port number it listens on, C{None} on a UNIX socket.
    @ivar listening_port: Stop it with C{stopListening()}.
    """

    upstream: MockUpstream
    port: int | None
    listening_port: IListeningPort

    def url(self, path: str = "/v1/chat/completions") -> str:
        """
        @param path: A path, query allowed.
        @return: The C{http://} URL of C{path} on the mock (TCP only).
        """
        return f"http://{_describe(self.listening_port.getHost())}{path}"


def _site(upstream: MockUpstream) -> Site:
    """
    @param upstream: The mock to serve.
    @return: A quiet site serving it.
    """
    site = Site(upstream.resource())
    site.noisy = False
    return site


def start_mock_upstream(
    reactor: IReactorTime,
    endpoint: str = "tcp:0:interface=127.0.0.1",
    clock: IReactorTime | None = None,
) -> Deferred[RunningMockUpstream]:
    """
    Start a mock upstream, by default on a free loopback port::

        running = await start_mock_upstream(reactor)
        self.addCleanup(running.listening_port.stopListening)
        url = running.url("/v1/chat/completions?events=3")

    @param reactor: The reactor to listen with; it must provide the
        interfaces C{endpoint} needs (C{IReactorTCP} for C{tcp:}).
    @param endpoint: A server endpoint string.
    @param clock: Schedules delays and stream writes; C{reactor} when
        C{None}. A L{twisted.internet.task.Clock} lets a test drive time.
    @return: Fires with the running mock once it listens.
    """
    upstream = MockUpstream(reactor if clock is None else clock)
    listening = serverFromString(reactor, endpoint).listen(_site(upstream))
    return listening.addCallback(
        lambda port: RunningMockUpstream(upstream, getattr(port.getHost(), "port", None), port)
    )


class Options(usage.Options):
    """
    The command line of C{python -m aiproxy.testing.upstream}.
    """

    synopsis = "python -m aiproxy.testing.upstream [--listen ENDPOINT | --port N]"
    longdesc = (
        "Serve a deterministic mock LLM upstream (OpenAI chat completions, "
        "Anthropic Messages, OpenAI Responses, embeddings); controls and "
        "resources are described in aiproxy.testing.upstream."
    )
    optParameters = [
        ["listen", "l", None, f"Server endpoint string to listen on [default: {DEFAULT_LISTEN}]."],
        ["port", "p", None, "Shorthand for --listen tcp:port=N:interface=127.0.0.1.", int],
    ]

    def postOptions(self) -> None:
        """
        Resolve C{--port} and the default into C{self["listen"]}.

        @raise usage.UsageError: Both options are given, or the port is out
            of range.
        """
        port = self["port"]
        if port is None:
            self["listen"] = self["listen"] or DEFAULT_LISTEN
            return
        if self["listen"] is not None:
            raise usage.UsageError("give --listen or --port, not both")
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"port out of range: {port}")
        self["listen"] = f"tcp:port={port}:interface=127.0.0.1"


def _describe(address: IAddress) -> str:
    """
    @param address: A listening address.
    @return: C{host:port}, or the path of a UNIX socket.
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    name = getattr(address, "name", None)
    return os.fsdecode(name) if name is not None else str(address)


async def _serve(reactor: IReactorTime, endpoint: str) -> None:
    """
    Listen, announce readiness on stdout, then serve until the reactor stops.

    @param reactor: The reactor.
    @param endpoint: A server endpoint string.
    """
    upstream = MockUpstream(reactor)
    port = await serverFromString(reactor, endpoint).listen(_site(upstream))
    print(f"mock upstream listening on {_describe(port.getHost())}", flush=True)
    await Deferred()


def main(argv: list[str] | None = None) -> None:
    """
    Run the mock upstream from the command line; logs go to stderr at info
    level and above.

    @param argv: The arguments, C{sys.argv[1:]} when C{None}.
    """
    from twisted.internet.task import react

    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as error:
        raise SystemExit(f"{error}\n{options}") from None
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.info)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    react(_serve, [options["listen"]])


if __name__ == "__main__":
    main()
