# -*- test-case-name: tests.test_mock_upstream -*-
"""
The mock upstream served: its state, the twisted.web resource answering every
path, and starting it on an endpoint.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTime
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from aiproxy.testing.upstream.bookkeeping import MockStats, RecordedRequest
from aiproxy.testing.upstream.controls import MockControls, _query
from aiproxy.testing.upstream.delivery import _Delivery
from aiproxy.testing.upstream.dialects import _OPENAI_ERRORS, _dialect_for, _Turn
from aiproxy.testing.upstream.oauth import TOKEN_PATH, token_reply
from aiproxy.testing.upstream.replies import _JSON, _error_reply, _headers, _json_bytes, _plan

__all__ = ["RECORDED_REQUESTS", "MockUpstream", "RunningMockUpstream", "start_mock_upstream"]

RECORDED_REQUESTS = 100
"""How many of the most recent requests C{/_mock/requests} keeps."""


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
        @return: A leaf resource answering every path as
            L{aiproxy.testing.upstream} describes.
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
            if request.method == b"POST" and request.path.endswith(TOKEN_PATH):
                return self._answer_token(request)
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

    def _answer_token(self, request: Request) -> int:
        """
        Record and count a call of the OAuth2 token endpoint
        (L{aiproxy.testing.upstream.oauth}) and start delivering its answer.

        @param request: The call.
        @return: C{NOT_DONE_YET}.
        """
        body = request.content.read() if request.content is not None else b""
        self._upstream.requests.append(RecordedRequest.from_request(request, body))
        stats = self._upstream.stats
        stats.requests += 1
        stats.token_requests += 1
        headers = _headers(stats.requests)
        try:
            controls = MockControls.from_request(request)
        except ValueError as error:
            controls = MockControls()
            problem = {"error": "invalid_request", "error_description": str(error)}
            reply = _error_reply(400, headers, problem)
        else:
            content_type = request.getHeader(b"content-type")
            reply = token_reply(stats.token_requests, body, content_type, controls, headers)
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
