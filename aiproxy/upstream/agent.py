# -*- test-case-name: tests.test_upstream_agent -*-
"""
The agent under a route's treq client and its connections: what Twisted's
C{Agent} does (a pooled connection per upstream, a C{Host} header, the
request over it), with each upstream URL parsed and its endpoint made once,
an IP address connected without a resolver, a body in memory written with
its head in one send, and chunked bodies decoded in one pass per read.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web._newclient import (
    HTTP11ClientProtocol,
    HTTPClientParser,
    Request,
    _ensureValidMethod,
)
from twisted.web.client import (
    URI,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    _StandardEndpointFactory,
)
from twisted.web.http import _ChunkedTransferDecoder
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from aiproxy.tcp import send_eagerly, set_no_delay
from aiproxy.upstream.chunks import decode_chunks

__all__ = [
    "URL_CACHE_SIZE",
    "BytesProducer",
    "EndpointCache",
    "PoolAgent",
    "QuietPool",
]

#: How many distinct upstream URLs a client keeps prepared.
URL_CACHE_SIZE = 256


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory, written in one go.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _ResponseParser(HTTPClientParser):
    """
    A response parser whose chunked body is decoded in one pass per read
    (L{decode_chunks}): Twisted's decoder hands it through five calls per
    chunk (the decoder and its states), here one, also for the body that
    arrives in the read of the response head.
    """

    def rawDataReceived(self, data: bytes) -> None:
        # In the body: a decoder is set.
        decoder: Any = self.bodyDecoder
        if decoder.__class__ is _ChunkedTransferDecoder and decode_chunks(decoder, data):
            return
        decoder.dataReceived(data)


class UpstreamProtocol(HTTP11ClientProtocol):
    """
    An upstream HTTP/1.1 connection without Nagle's algorithm, whose
    requests are sent at once (L{send_eagerly}), and whose chunked response
    bodies are decoded in one pass per read (L{_ResponseParser}).
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        set_no_delay(self.transport)
        send_eagerly(self.transport)

    def request(self, request: Request) -> Deferred[Any]:
        d = super().request(request)
        parser = self._parser
        if parser is not None and parser.__class__ is HTTPClientParser:
            parser.__class__ = _ResponseParser
        return d

    def _disconnectParser(self, reason: Any) -> None:
        parser = self._parser
        super()._disconnectParser(reason)
        if parser is not None:
            # The response parser and its chunked decoder refer to each
            # other: unlinked, a response is freed as soon as it is over,
            # not by the garbage collector.
            parser.bodyDecoder = None


class _QuietFactory(_HTTP11ClientFactory):
    """
    Upstream connection factory that does not log every new connection.
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> UpstreamProtocol:
        return UpstreamProtocol(self._quiescentCallback)


@implementer(IAgentEndpointFactory)
class EndpointCache:
    """
    One client endpoint per upstream scheme, host and port, reused by every
    request: building one parses and IDNA-encodes the host and, for HTTPS,
    creates the TLS options (a new SSL context) each time.

    An IP address connects directly: Twisted's C{HostnameEndpoint} would
    resolve even a literal address with C{getaddrinfo} in a thread, for
    every new connection.
    """

    def __init__(
        self, reactor: Any, policy: IPolicyForHTTPS, timeout: float, size: int = 64
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = timeout
        self._factory = _StandardEndpointFactory(reactor, policy, timeout, None)
        self._size = size
        self._endpoints: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: URI) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= self._size:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = self._direct(uri) or self._factory.endpointForURI(uri)
        return endpoint

    def _direct(self, uri: URI) -> IStreamClientEndpoint | None:
        """
        The endpoint of an IP address (an IPv6 one without its brackets, as
        L{URI} gives it) over plain HTTP or HTTPS, or L{None} for a name.
        """
        if uri.scheme not in (b"http", b"https"):
            return None
        host = uri.host.decode("ascii", "replace")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, self._timeout)
        elif isIPv6Address(host):
            # URI.host is an IPv6 address without its brackets.
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, self._timeout)
        else:
            return None
        if uri.scheme == b"https":
            creator = self._policy.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint


class _Lines(list[bytes]):
    """
    Collects the request head L{Request} writes, to send it with the body.
    """

    writeSequence = list.extend


#: The headers of a request once sent.
_SENT = Headers()


class _InMemoryRequest(Request):
    """
    A request whose body is already in memory (a L{BytesProducer}): its
    head and body go to the transport in one write, not through a
    producer and its consumer.
    """

    def writeTo(self, transport: Any) -> Deferred[None]:
        body = self.bodyProducer.data
        lines = _Lines()
        self._writeHeaders(lines, b"Content-Length: %d\r\n" % len(body))
        lines.append(body)
        transport.writeSequence(lines)
        # Sent: its headers and body are not kept while the response lasts.
        self.bodyProducer = None
        self.headers = _SENT
        return succeed(None)


class _Destination(NamedTuple):
    """
    An upstream URL as a request needs it: its pool key, endpoint, C{Host}
    header and request target.
    """

    key: tuple[bytes, bytes, int]
    endpoint: Any
    host: bytes
    path: bytes
    uri: URI


@implementer(IAgent)
class PoolAgent:
    """
    The agent treq drives: what Twisted's C{Agent} does (a connection from
    the pool, a C{Host} header, the request over it), with each URL parsed
    and its endpoint found once, and a body in memory written with its head.
    """

    def __init__(self, pool: HTTPConnectionPool, endpoints: EndpointCache) -> None:
        self._pool = pool
        self._endpoints = endpoints
        self._destinations: dict[bytes, _Destination] = {}

    def _destination(self, uri: bytes) -> _Destination:
        """
        C{uri} parsed, with its endpoint (kept for the next requests).
        """
        parsed = URI.fromBytes(uri)
        host = parsed.host
        if isIPv6Address(host.decode("ascii", "replace")):
            host = b"[%b]" % host
        if (parsed.scheme, parsed.port) not in ((b"http", 80), (b"https", 443)):
            host = b"%b:%d" % (host, parsed.port)
        destination = _Destination(
            (parsed.scheme, parsed.host, parsed.port),
            self._endpoints.endpointForURI(parsed),
            host,
            parsed.originForm,
            parsed,
        )
        if len(self._destinations) >= URL_CACHE_SIZE:
            self._destinations.clear()
        self._destinations[uri] = destination
        return destination

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[Any]:
        destination = self._destinations.get(uri)
        if destination is None:
            try:
                destination = self._destination(uri)
            except Exception:
                return fail()
        method = _ensureValidMethod(method)
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            headers = headers.copy()
            headers.addRawHeader(b"Host", destination.host)
        d = self._pool.getConnection(destination.key, destination.endpoint)
        return d.addCallback(self._send, method, destination, headers, bodyProducer)

    def _send(
        self,
        connection: HTTP11ClientProtocol,
        method: bytes,
        destination: _Destination,
        headers: Headers,
        producer: IBodyProducer | None,
    ) -> Deferred[Any]:
        factory = _InMemoryRequest if isinstance(producer, BytesProducer) else Request
        request = factory._construct(
            method,
            destination.path,
            headers,
            producer,
            persistent=self._pool.persistent,
            parsedURI=destination.uri,
        )
        return connection.request(request)


class QuietPool(HTTPConnectionPool):
    """
    A connection pool whose new connections are not logged one by one.
    """

    _factory = _QuietFactory
