# -*- test-case-name: tests.test_mock_upstream -*-
"""
The per-request controls of the mock upstream: the fields of L{MockControls},
read from C{x-mock-<name>} request headers or query parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from twisted.web.server import Request

__all__ = ["MockControlError", "MockControls"]


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
    @ivar prompt_tokens: The prompt token count reported in usage (per
        instance of a C{:predict} call).
    @ivar expires_in: The C{expires_in} of a token endpoint answer, seconds.
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
    expires_in: int = 3600

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
    "expires_in": _positive,
}
