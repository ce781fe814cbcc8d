# -*- test-case-name: tests.test_mock_upstream -*-
"""
The mock upstream's answer to a call, planned from its controls and its API,
and the wire form of its bodies and events.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

from aiproxy.testing.upstream.controls import MockControls
from aiproxy.testing.upstream.dialects import _OPENAI_ERRORS, _Dialect, _Event, _Script, _Turn

__all__: list[str] = []

_GARBAGE_SEED = 0
_JSON = "application/json"
_EVENT_STREAM = "text/event-stream"


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
        C{truncate}, C{events}; the first two for Server-Sent Events only).
    @return: The reply.
    """
    events: Iterator[_Event] = (
        chain(script.head, islice(script.contents, controls.events))
        if controls.truncate
        else chain(script.head, script.contents, script.tail)
    )
    framing = script.framing
    if framing is not None:
        stream = _EventStream(comments=[], events=(framing.encode(event) for event in events))
        content_type = framing.content_type
    else:
        end = "\r\n" if controls.crlf else "\n"
        comment = f": keep-alive{end}{end}".encode("ascii")
        stream = _EventStream(
            comments=[comment] * controls.keepalive_comments,
            events=(_encode_event(event, controls.crlf) for event in events),
        )
        content_type = _EVENT_STREAM
    headers = {**headers, "content-type": content_type, "cache-control": "no-cache"}
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
    elif dialect.streams(turn) and (script := dialect.stream(turn)) is not None:
        reply = _stream_reply(headers, script, controls)
    else:
        reply = _json_reply(200, headers, dialect.complete(turn))
        reply.truncate = controls.truncate
    if controls.content_type is not None:
        reply.headers["content-type"] = controls.content_type
    return reply
