# -*- test-case-name: tests.test_server -*-
"""
The HTTP front: a L{Site} whose root finds the route of each request, and
a L{Request} that refuses an oversized body before reading it; the client
connections are held to the limits of L{aiproxy.listener} (C{Host}
checks, deadlines for request heads and bodies, a cap on connections).
"""

from __future__ import annotations

import weakref
from http import HTTPStatus
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.http import _GenericHTTPChannelProtocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from aiproxy.access.consumers import Consumer
from aiproxy.access.keyauth import CHALLENGE, KeyRefused, SentKey
from aiproxy.accesslog import log_access
from aiproxy.config import Config
from aiproxy.exchange import Exchange
from aiproxy.exchange.admission import client_error_body
from aiproxy.exchange.errors import error_body
from aiproxy.exchange.record import refusal_record
from aiproxy.interfaces import IExchangeMonitor
from aiproxy.listener import ClientLimits, ConnectionCap, LimitedChannel, RefusedConnection
from aiproxy.routing.routes import Route, RouteTable
from aiproxy.tcp import set_no_delay
from aiproxy.upstream.request import too_large_message

__all__ = ["GatewayChannel", "GatewayRequest", "GatewayResource", "GatewaySite"]


class RouteResource(Resource):
    """
    The resource of one route: each request becomes an L{Exchange}.
    """

    isLeaf = True

    def __init__(
        self, route: Route, clock: IReactorTime, monitor: IExchangeMonitor | None = None
    ) -> None:
        super().__init__()
        self._route = route
        self._clock = clock
        self._monitor = monitor

    def render(self, request: Request) -> Any:
        Exchange(self._route, request, self._clock, self._monitor).start()
        return NOT_DONE_YET


class NoRouteResource(Resource):
    """
    404 with a JSON body for a path no route serves.
    """

    isLeaf = True

    #: The L{aiproxy.interfaces.IExchangeMonitor} whose metrics count the 404s.
    monitor: IExchangeMonitor | None = None

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        body = error_body("404 Route Not Found")
        size = getattr(request, "_received", None)
        if size is None:
            size = request.content.seek(0, 2) if request.content is not None else 0
        _log_refusal(
            self.monitor,
            refusal_record(request.method, request.path, 404, bytes_in=size, bytes_out=len(body)),
        )
        return body


def _log_refusal(monitor: IExchangeMonitor | None, record: dict[str, Any]) -> None:
    """
    Log a request refused before an exchange handled it, and tell the
    monitor (which counts it in the metrics when they are on).
    """
    log_access(record)
    if monitor is not None:
        monitor.request_refused(record)


def _monitor_of(site: Site) -> IExchangeMonitor | None:
    """
    The monitor of the site's L{GatewayResource}, or L{None}.
    """
    return getattr(site.resource, "monitor", None)


class GatewayResource(Resource):
    """
    The root: dispatches on the whole request path to the current routes.

    @ivar table: the routes in force; replacing it (on reload) affects new
        requests only, as each request keeps the route it started with.
    @ivar monitor: the L{aiproxy.interfaces.IExchangeMonitor} every exchange
        reports to, or L{None}.
    """

    def __init__(
        self, table: RouteTable, clock: IReactorTime, monitor: IExchangeMonitor | None = None
    ) -> None:
        super().__init__()
        self.clock = clock
        self.table = table
        self.monitor = monitor
        self._resources: dict[int, RouteResource] = {}
        self._no_route = NoRouteResource()
        self._no_route.monitor = monitor

    def match(self, path: bytes, method: bytes) -> Route | None:
        """
        The route for a raw request path (query ignored) and method.
        """
        return self.table.match(path.partition(b"?")[0].decode("latin-1"), method.decode("latin-1"))

    def getChildWithDefault(self, name: bytes, request: Request) -> Resource:
        if getattr(request, "matched", False):
            # Decided when its headers were in, before a reload could land.
            route = request._route  # type: ignore[attr-defined]
        else:
            route = self.match(request.path, request.method)
        if route is None:
            return self._no_route
        resource = self._resources.get(id(route))
        if resource is None or resource._route is not route:
            resource = self._resources[id(route)] = RouteResource(route, self.clock, self.monitor)
        return resource

    def render(self, request: Request) -> Any:
        return self.getChildWithDefault(b"", request).render(request)

    def set_table(self, table: RouteTable) -> None:
        """
        Serve new requests with C{table}.
        """
        self.table = table
        self._resources.clear()


#: Bytes of body read from a request no route serves before its 404 is
#: sent and the connection closed.
UNROUTED_BODY_LIMIT = 1024 * 1024


class GatewayRequest(Request):
    """
    A request whose route is found as soon as its headers are in (a reload
    after that does not change it): over the route's C{max_req_body_size}
    by its declared (or received) length it is refused with 413 without
    reading the body; without a route its body is counted but not kept,
    and a 404 follows.
    """

    # Its channel is always a GatewayChannel (GatewaySite builds them);
    # Twisted declares an HTTPChannel, which has no site.
    channel: GatewayChannel
    _route: Route | None = None
    #: The route was looked up when the headers were in (C{_route}, maybe
    #: L{None}); the request is served by that answer.
    matched = False
    _received = 0
    _refused = False
    #: The consumer and where its key was sent, found from the head
    #: (C{key-auth} routes).
    authenticated: tuple[Consumer, SentKey] | None = None
    #: The consumer's username, for C{$consumer_name} and C{hash_on: consumer}.
    consumer_name: str | None = None

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        site = self.channel.site
        path = getattr(self.channel, "_path", None)
        command = getattr(self.channel, "_command", None)
        if path is None or command is None:
            return
        route = self._route = site.resource.match(path, command)
        self.matched = True
        if route is None:
            return
        if length is not None and length > route.conf["max_req_body_size"]:
            self._refuse_large(path, command, length)
        elif route.key_auth is not None:
            try:
                self.authenticated = route.key_auth.authenticate_head(self.requestHeaders, path)
            except KeyRefused as e:
                # Refused before its body is read.
                where = path.partition(b"?")[0].decode("latin-1")
                body = client_error_body(route, where, 401, e.message)
                self._refuse(path, command, 401, body, e.reason, (b"www-authenticate", CHALLENGE))

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self.matched and self._route is None:
            # A 404 follows: the body is counted, not kept, and not read
            # past UNROUTED_BODY_LIMIT.
            if self._received > UNROUTED_BODY_LIMIT:
                self._refuse(
                    getattr(self.channel, "_path", b""),
                    getattr(self.channel, "_command", b""),
                    404,
                    error_body("404 Route Not Found"),
                    "no_route",
                )
            return
        if self._route is not None and self._received > self._route.conf["max_req_body_size"]:
            self._refuse_large(
                getattr(self.channel, "_path", b""),
                getattr(self.channel, "_command", b""),
                self._received,
            )
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse_large(self, path: bytes, command: bytes, size: int) -> None:
        """
        Answer 413 at once: the body is over C{max_req_body_size}.
        """
        assert self._route is not None
        body = error_body(too_large_message(size, self._route.conf["max_req_body_size"]))
        self._refuse(path, command, 413, body, "request_too_large")

    def _refuse(
        self,
        path: bytes,
        command: bytes,
        status: int,
        body: bytes,
        reason: str,
        header: tuple[bytes, bytes] | None = None,
    ) -> None:
        """
        Answer C{status} with the JSON C{body} (and C{header}) at once and
        close the connection; the body is not read.
        """
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")
        transport = self.channel.transport
        assert transport is not None
        extra = b"" if header is None else header[0] + b": " + header[1] + b"\r\n"
        transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n%s"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, HTTPStatus(status).phrase.encode("ascii"), extra, len(body), body)
        )
        transport.loseConnection()
        self.channel.closing()
        route = self._route
        _log_refusal(
            _monitor_of(self.channel.site),
            refusal_record(
                command,
                path,
                status,
                None if route is None else route.id,
                None if route is None else route.instance_name,
                reason,
                self._received,
                len(body),
            ),
        )


class GatewayChannel(LimitedChannel):
    """
    An HTTP/1.1 channel whose refusals of a request head are clean answers,
    each with a JSON body, C{Connection: close} and an access record
    (counted in the metrics, as a 404 is): 414
    for a request line longer than C{MAX_LENGTH} (16 KiB), 431 for a header
    line that long, more than C{maxHeaders} headers or a head of more than
    C{totalHeadersSize} bytes, 400 for a missing, repeated or invalid
    C{Host} (RFC 9112 §3.2) and for anything else malformed, 408 for a
    head or body not received within its deadline. Twisted alone answers a
    bare 400, or closes the connection without a word when one line is too
    long.

    Its deadlines are L{LimitedChannel}'s.
    """

    #: The site that built it (C{Site.buildProtocol} sets it through the
    #: protocol wrapper).
    site: GatewaySite

    def connectionMade(self) -> None:
        super().connectionMade()
        # Small SSE writes go out at once instead of waiting for an ACK.
        set_no_delay(self.transport)

    def lineLengthExceeded(self, line: bytes) -> None:
        if getattr(self, "_command", None) is None:
            self._refuse_head(414, "request line too long", "request_line_too_long")
        else:
            self._refuse_head(431, "request header fields too large", "request_headers_too_large")

    def _respondToBadRequestAndDisconnect(self) -> None:
        if (
            self._receivedHeaderSize > self.totalHeadersSize
            or self._receivedHeaderCount > self.maxHeaders
        ):
            self._refuse_head(431, "request header fields too large", "request_headers_too_large")
        else:
            self._refuse_head(400, "bad request", "bad_request")

    def _refuse_head(self, status: int, message: str, reason: str) -> None:
        """
        Answer C{status} with C{{"message": message}} and close the
        connection; nothing more is read.
        """
        body = error_body(message)
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s"
            % (status, HTTPStatus(status).phrase.encode("ascii"), len(body), body)
        )
        self.loseConnection()
        self.closing()
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        command = getattr(self, "_command", None) or b""
        path = getattr(self, "_path", None) or b""
        # A body deadline names the route the request had.
        request = self.requests[-1] if self.requests else None
        route: Route | None = getattr(request, "_route", None)
        _log_refusal(
            _monitor_of(self.site),
            refusal_record(
                command,
                path,
                status,
                route.id if route is not None else None,
                route.instance_name if route is not None else None,
                reason,
                bytes_in=getattr(request, "_received", 0),
                bytes_out=len(body),
            ),
        )


def _gateway_channel(factory: Site) -> _GenericHTTPChannelProtocol:
    """
    A client connection of the gateway: a L{GatewayChannel} in Twisted's
    usual protocol wrapper.
    """
    return _GenericHTTPChannelProtocol(GatewayChannel())


#: Seconds an idle kept-alive client connection stays open (as nginx's
#: C{keepalive_timeout}); no limit applies while a request is in progress.
CLIENT_IDLE_TIMEOUT = 75


class GatewaySite(Site):
    """
    The gateway's site: L{GatewayRequest}s, and no Twisted access log (the
    exchanges write their own records).

    @ivar limits: the L{ClientLimits} in force (L{apply_limits} sets them).
    @ivar cap: the L{ConnectionCap} counting the client connections.
    """

    requestFactory = GatewayRequest
    protocol = _gateway_channel  # type: ignore[assignment]

    def __init__(self, resource: GatewayResource, **kwargs: Any) -> None:
        """
        @param kwargs: as L{Site}'s; C{timeout} is the idle timeout of a
            kept-alive connection (L{CLIENT_IDLE_TIMEOUT} by default) and
            C{reactor} runs every client deadline.
        """
        kwargs.setdefault("timeout", CLIENT_IDLE_TIMEOUT)
        # Bodies are JSON: never parse them as HTML form submissions (Twisted
        # would parse every POST's Content-Type with the email package).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)
        #: The open client connections (their protocols), for the drain.
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self.limits = ClientLimits()
        self.cap = ConnectionCap(
            self.reactor,
            self.get_limits,
            lambda: getattr(_monitor_of(self), "metrics", None),
        )

    def get_limits(self) -> ClientLimits:
        """
        The limits in force.
        """
        return self.limits

    def apply_limits(self, config: Config) -> None:
        """
        Hold client connections to C{config}'s C{client_header_timeout},
        C{client_body_timeout}, C{client_body_min_rate} and
        C{max_client_connections}: at start and on reload. Deadlines already
        running keep their time; the next ones use the new values.
        """
        self.limits = ClientLimits.from_config(config)

    def buildProtocol(self, addr: Any) -> Any:
        if not self.cap.admit():
            return RefusedConnection()
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            # The channel's own deadlines replace Twisted's idle timeout.
            protocol.timeOut = None
            self.connections.add(protocol)
        return protocol

    def close_idle(self, after_response: bool) -> int:
        """
        Close the client connections that have no request in progress; with
        C{after_response}, make the others close once their current
        response is complete (no more keep-alive).

        @return: how many connections are still open.
        """
        still = 0
        for protocol in list(self.connections):
            channel = getattr(protocol, "_channel", protocol)
            transport = getattr(channel, "transport", None)
            if transport is None or getattr(transport, "disconnected", False):
                continue
            still += 1
            if after_response:
                channel.persistent = False
            if not getattr(channel, "requests", None):
                transport.loseConnection()
        return still

    def log(self, request: http.Request) -> None:
        """
        Access records come from L{aiproxy.accesslog}, not from here.
        """
