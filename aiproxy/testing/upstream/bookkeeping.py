# -*- test-case-name: tests.test_mock_upstream -*-
"""
What the mock upstream keeps about the requests it answers: their records and
its counters.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, fields
from typing import Any

from twisted.web.server import Request

__all__ = ["MockStats", "RecordedRequest"]


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
    @ivar token_requests: Those of them made to the OAuth2 token endpoint.
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
    token_requests: int = 0
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
            "token_requests": self.token_requests,
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
