# -*- test-case-name: tests.test_upstream -*-
"""
The upstream HTTP client of one route: treq over a persistent
L{HTTPConnectionPool}, with the route's keep-alive, TLS and timeout settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from hyperlink import EncodedURL
from OpenSSL import SSL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.web._newclient import HTTP11ClientProtocol, Request, _ensureValidMethod
from twisted.web.client import (
    URI,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    _StandardEndpointFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from aiproxy.tcp import send_eagerly, set_no_delay

if TYPE_CHECKING:
    # treq's name for what its Agent needs of a reactor: TCP, time and name
    # resolution.
    from treq._types import _ITreqReactor

__all__ = ["BytesProducer", "DiscardBody", "UpstreamClient", "tls_policy"]


class DiscardBody(Protocol):
    """
    Receives a response body nobody wants: stops the transfer at once (the
    connection is closed, never pooled).
    """

    def connectionMade(self) -> None:
        # deliverBody hands its protocol a producer (TransportProxyProducer),
        # not the ITransport that Twisted's Protocol declares.
        cast(IPushProducer, self.transport).stopProducing()


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


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    """
    TLS without certificate verification (C{ssl_verify: false}); SNI is
    still sent.
    """

    def __init__(self, hostname: bytes) -> None:
        self._hostname = hostname
        self._context = ssl.CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._hostname)
        return connection


@implementer(IPolicyForHTTPS)
class _UnverifiedPolicy:
    """
    The HTTPS policy of C{ssl_verify: false}.
    """

    def creatorForNetloc(self, hostname: bytes, port: int) -> _UnverifiedCreator:
        return _UnverifiedCreator(hostname)


def _trust_root(path: str) -> Any:
    """
    A trust root holding every certificate of the PEM bundle at C{path}.
    """
    with open(path, "rb") as f:
        pem = f.read()
    marker = b"-----END CERTIFICATE-----"
    blocks = [
        block + marker for block in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in block
    ]
    if not blocks:
        raise ValueError(f"no certificate in {path}")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(block) for block in blocks])


def tls_policy(conf: Mapping[str, Any]) -> IPolicyForHTTPS:
    """
    The HTTPS policy of a route: verified against the system trust store
    (or C{ssl_ca_file}) unless C{ssl_verify} is false.
    """
    if not conf.get("ssl_verify", True):
        return _UnverifiedPolicy()
    if conf.get("ssl_ca_file"):
        return BrowserLikePolicyForHTTPS(trustRoot=_trust_root(conf["ssl_ca_file"]))
    return BrowserLikePolicyForHTTPS()


class _NoCookies(IndexableCookieJar):
    """
    A cookie jar that never stores nor sends anything: the pool is shared by
    every client, so an upstream's cookies must not travel between them (the
    client's own C{Cookie} header, when forwarded, is untouched).
    """

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


class _PreparedURL(EncodedURL):
    """
    A URL already in its final, ASCII (URI) form: treq converts every URL
    it is given with C{to_uri()}, which re-runs IDNA on the host each time
    (tens of microseconds per request); for this one it is a no-op.
    """

    _text: str | None = None

    def to_uri(self) -> _PreparedURL:
        return self

    def to_text(self, with_password: bool = False) -> str:
        text = self._text
        if text is None or with_password:
            text = super().to_text(with_password)
            if not with_password:
                self._text = text
        return text


#: How many distinct upstream URLs a client keeps prepared.
_URL_CACHE_SIZE = 256


class _UpstreamProtocol(HTTP11ClientProtocol):
    """
    An upstream HTTP/1.1 connection without Nagle's algorithm, whose
    requests are sent at once (L{send_eagerly}).
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        set_no_delay(self.transport)
        send_eagerly(self.transport)

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

    def buildProtocol(self, addr: Any) -> _UpstreamProtocol:
        return _UpstreamProtocol(self._quiescentCallback)


@implementer(IAgentEndpointFactory)
class _EndpointCache:
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
        The endpoint of an IP address (C{[...]} for IPv6) over plain HTTP
        or HTTPS, or L{None} for a name.
        """
        if uri.scheme not in (b"http", b"https"):
            return None
        host = uri.host.decode("ascii", "replace")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, self._timeout)
        elif host.startswith("[") and host.endswith("]") and isIPv6Address(host[1:-1]):
            endpoint = TCP6ClientEndpoint(self._reactor, host[1:-1], uri.port, self._timeout)
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
class _PoolAgent:
    """
    The agent treq drives: what Twisted's C{Agent} does (a connection from
    the pool, a C{Host} header, the request over it), with each URL parsed
    and its endpoint found once, and a body in memory written with its head.
    """

    def __init__(self, pool: HTTPConnectionPool, endpoints: _EndpointCache) -> None:
        self._pool = pool
        self._endpoints = endpoints
        self._destinations: dict[bytes, _Destination] = {}

    def _destination(self, uri: bytes) -> _Destination:
        """
        C{uri} parsed, with its endpoint (kept for the next requests).
        """
        parsed = URI.fromBytes(uri)
        host = parsed.host
        if (parsed.scheme, parsed.port) not in ((b"http", 80), (b"https", 443)):
            host = b"%b:%d" % (host, parsed.port)
        destination = _Destination(
            (parsed.scheme, parsed.host, parsed.port),
            self._endpoints.endpointForURI(parsed),
            host,
            parsed.originForm,
            parsed,
        )
        if len(self._destinations) >= _URL_CACHE_SIZE:
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


class _QuietPool(HTTPConnectionPool):
    """
    A connection pool whose new connections are not logged one by one.
    """

    _factory = _QuietFactory


class UpstreamClient:
    """
    Sends requests upstream for one route over its own connection pool.
    """

    def __init__(self, reactor: _ITreqReactor, conf: Mapping[str, Any]) -> None:
        """
        @param reactor: the reactor that connects and times the requests.
        @param conf: the route's C{ai-proxy} config (C{keepalive},
            C{keepalive_pool}, C{keepalive_timeout}, C{timeout},
            C{ssl_verify}, C{ssl_ca_file}).
        """
        self._reactor = reactor
        self._timeout = conf["timeout"] / 1000.0
        self.pool = _QuietPool(reactor, persistent=conf["keepalive"])
        self.pool.maxPersistentPerHost = conf["keepalive_pool"]
        self.pool.cachedConnectionTimeout = conf["keepalive_timeout"] / 1000.0
        self.pool.retryAutomatically = False
        endpoints = _EndpointCache(reactor, tls_policy(conf), self._timeout)
        agent = _PoolAgent(self.pool, endpoints)
        self._cookies = _NoCookies()
        self._http = HTTPClient(agent, cookiejar=self._cookies, data_to_body_producer=BytesProducer)
        self._urls: dict[str, _PreparedURL] = {}

    def _prepared(self, url: str) -> _PreparedURL:
        """
        C{url} parsed and IDNA-encoded once, then reused.
        """
        prepared = self._urls.get(url)
        if prepared is None:
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls.clear()
            # hyperlink annotates from_text as returning URL, though it builds
            # an instance of the class it is called on.
            prepared = self._urls[url] = cast(
                _PreparedURL, _PreparedURL.from_text(EncodedURL.from_text(url).to_uri().to_text())
            )
        return prepared

    def request(self, method: str, url: str, headers: Headers, body: bytes | None) -> Deferred[Any]:
        """
        Send one request; the Deferred fires with the treq response as soon
        as its headers arrive (the body is not read), or fails after
        C{timeout} without them.
        """
        return self._http.request(
            method,
            self._prepared(url),
            headers=headers,
            data=body or None,
            # A jar of our own: treq makes a new one for every request without.
            cookies=self._cookies,
            allow_redirects=False,
            unbuffered=True,
            timeout=self._timeout,
            reactor=self._reactor,
        )

    def close(self) -> Deferred[None]:
        """
        Close the idle pooled connections.
        """
        return self.pool.closeCachedConnections()
