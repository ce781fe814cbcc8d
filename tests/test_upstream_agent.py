# -*- test-case-name: tests.test_upstream_agent -*-
"""
Tests for the agent under L{aiproxy.upstream.client.UpstreamClient}: the
endpoint of each upstream (L{EndpointCache}), the requests sent over a
pooled connection (L{PoolAgent}) and the URL treq is given
(L{_PreparedURL}). Connections are made on a L{MemoryReactorClock}, HTTP
goes over a L{StringTransport}.
"""

from __future__ import annotations

from typing import Any

from hyperlink import EncodedURL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aiproxy.upstream.agent import BytesProducer, EndpointCache, PoolAgent
from aiproxy.upstream.client import _PreparedURL

#: The connect timeout the endpoints are given, in seconds.
TIMEOUT = 5.0


@implementer(IHostnameResolver)
class RecordingResolver:
    """
    A resolver that records the names it is asked for and resolves them
    all with the memory reactor's own resolver (to C{127.0.0.1}).
    """

    def __init__(self, resolver: IHostnameResolver) -> None:
        self.resolver = resolver
        self.names: list[str] = []

    def resolveHostName(  # type: ignore[override]
        self, receiver: Any, hostName: str, *args: Any, **kw: Any
    ) -> Any:
        self.names.append(hostName)
        return self.resolver.resolveHostName(receiver, hostName, *args, **kw)


class RecordingPolicy(BrowserLikePolicyForHTTPS):
    """
    Twisted's HTTPS policy, recording the host and port of each connection
    creator it makes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.netlocs: list[tuple[bytes, int]] = []

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        self.netlocs.append((hostname, port))
        return super().creatorForNetloc(hostname, port)


class EndpointCase(SynchronousTestCase):
    """
    An L{EndpointCache} on a memory reactor whose name resolutions are
    recorded.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = RecordingResolver(self.reactor.nameResolver)
        self.reactor.installNameResolver(self.resolver)
        self.policy = RecordingPolicy()
        self.cache = EndpointCache(self.reactor, self.policy, TIMEOUT)

    def endpoint(self, url: bytes) -> Any:
        """The cache's endpoint for C{url}."""
        return self.cache.endpointForURI(URI.fromBytes(url))

    def connect(self, endpoint: Any) -> tuple[str, int, Any, float]:
        """
        Connect C{endpoint}: the host, port, factory and timeout of the TCP
        connection the reactor is then asked for.
        """
        endpoint.connect(Factory.forProtocol(Protocol))
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        return host, port, factory, timeout

    def assert_tls(self, factory: Any) -> None:
        """
        The first bytes a protocol of C{factory} sends are a TLS record of
        type 22, handshake: its ClientHello.
        """
        transport = StringTransport()
        factory.buildProtocol(None).makeConnection(transport)
        self.assertEqual(transport.value()[:1], b"\x16")


class EndpointCacheTests(EndpointCase):
    """
    L{EndpointCache}: an IP address is connected to directly, a name
    through Twisted's standard endpoint (which resolves it); one endpoint
    per scheme, host and port.
    """

    def test_ip(self) -> None:
        """
        An IP address (IPv6 in brackets in the URL) gets a TCP endpoint of
        its family to that address and port, with the timeout, that
        resolves nothing.
        """
        for url, kind, address in (
            (b"http://127.0.0.1:8080/v1/chat", TCP4ClientEndpoint, "127.0.0.1"),
            (b"http://[::1]:8080/v1/chat", TCP6ClientEndpoint, "::1"),
        ):
            endpoint = self.endpoint(url)
            self.assertIsInstance(endpoint, kind)
            host, port, _, timeout = self.connect(endpoint)
            self.assertEqual((host, port, timeout), (address, 8080, TIMEOUT))
        self.assertEqual(self.resolver.names, [])
        self.assertEqual(self.policy.netlocs, [])

    def test_https_ip(self) -> None:
        """
        An IP address over HTTPS is connected to directly, through TLS with
        the policy's connection creator for that address and port.
        """
        for url, address, port in (
            (b"https://127.0.0.1:8443/v1/chat", "127.0.0.1", 8443),
            (b"https://[2001:db8::1]/v1/chat", "2001:db8::1", 443),
        ):
            endpoint = self.endpoint(url)
            self.assertEqual(self.policy.netlocs[-1], (address.encode(), port))
            host, connected_port, factory, timeout = self.connect(endpoint)
            self.assertEqual((host, connected_port, timeout), (address, port, TIMEOUT))
            self.assert_tls(factory)
        self.assertEqual(self.resolver.names, [])

    def test_name(self) -> None:
        """
        A host name gets Twisted's standard endpoint, which resolves it and
        connects to its address.
        """
        endpoint = self.endpoint(b"http://upstream.test:8080/v1/chat")
        self.assertIsInstance(endpoint, HostnameEndpoint)
        host, port, _, timeout = self.connect(endpoint)
        self.assertEqual(self.resolver.names, ["upstream.test"])
        self.assertEqual((host, port), ("127.0.0.1", 8080))

    def test_https_name(self) -> None:
        """
        A host name over HTTPS gets Twisted's standard TLS endpoint, with the
        policy's connection creator for that name.
        """
        endpoint = self.endpoint(b"https://upstream.test/v1/chat")
        self.assertNotIsInstance(endpoint, HostnameEndpoint)
        self.assertEqual(self.policy.netlocs, [(b"upstream.test", 443)])
        _, port, factory, _ = self.connect(endpoint)
        self.assertEqual((self.resolver.names, port), (["upstream.test"], 443))
        self.assert_tls(factory)

    def test_reused(self) -> None:
        """
        The same scheme, host and port get the same endpoint (whatever the
        path), made once; another scheme, host or port gets another.
        """
        first = self.endpoint(b"https://127.0.0.1:8443/v1/chat")
        self.assertIs(self.endpoint(b"https://127.0.0.1:8443/v1/embeddings?x=1"), first)
        self.assertEqual(len(self.policy.netlocs), 1)
        for other in (
            b"http://127.0.0.1:8443/",
            b"https://127.0.0.2:8443/",
            b"https://127.0.0.1:8444/",
        ):
            self.assertIsNot(self.endpoint(other), first)
        named = self.endpoint(b"http://upstream.test/")
        self.assertIs(self.endpoint(b"http://upstream.test/x"), named)

    def test_bounded(self) -> None:
        """
        Past its size, the cache starts over: an endpoint is made anew.
        """
        cache = EndpointCache(self.reactor, self.policy, TIMEOUT, size=2)
        a, b, c = (URI.fromBytes(b"http://10.0.0.%d/" % i) for i in (1, 2, 3))
        first = cache.endpointForURI(a)
        cache.endpointForURI(b)
        cache.endpointForURI(c)
        self.assertIsNot(cache.endpointForURI(a), first)

    def test_unsupported_scheme(self) -> None:
        """
        A scheme other than HTTP or HTTPS is refused, IP address or not.
        """
        for url in (b"ftp://127.0.0.1/x", b"ftp://upstream.test/x"):
            self.assertRaises(SchemeNotSupported, self.endpoint, url)


class RecordingTransport(StringTransport):
    """
    A transport that records each C{write} and C{writeSequence} call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.calls.append(data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.calls.append(b"".join(data))
        super().writeSequence(data)


class FakePool:
    """
    A connection pool handing out a new HTTP/1.1 connection over a
    L{RecordingTransport} for each request, recording the keys and
    endpoints asked for.

    @ivar connection: the last connection handed out.
    @ivar transport: its transport.
    """

    def __init__(self, persistent: bool = True) -> None:
        self.persistent = persistent
        self.asked: list[tuple[Any, Any]] = []

    def getConnection(self, key: Any, endpoint: Any) -> Deferred[HTTP11ClientProtocol]:
        self.asked.append((key, endpoint))
        self.transport = RecordingTransport()
        self.connection = HTTP11ClientProtocol()
        self.connection.makeConnection(self.transport)
        return succeed(self.connection)


@implementer(IBodyProducer)
class OtherProducer:
    """
    A body producer that is not a L{BytesProducer}: writes its bytes when
    asked to produce.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


def head_lines(sent: bytes) -> tuple[list[bytes], bytes]:
    """
    The lines of the request head in C{sent}, and the body after it.
    """
    head, _, body = sent.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


class PoolAgentTests(EndpointCase):
    """
    L{PoolAgent}: a connection from the pool for the URL's endpoint, a
    C{Host} header, and a body in memory sent with its head.
    """

    def setUp(self) -> None:
        super().setUp()
        self.pool = FakePool()
        self.agent = PoolAgent(self.pool, self.cache)  # type: ignore[arg-type]

    def sent(self, url: bytes) -> list[bytes]:
        """
        Send a C{POST} to C{url}: its head lines (the body checked).
        """
        self.agent.request(b"POST", url, Headers(), BytesProducer(b"{}"))
        lines, body = head_lines(self.pool.transport.value())
        self.assertEqual(body, b"{}")
        return lines

    def test_interface(self) -> None:
        """It provides L{IAgent}."""
        verifyObject(IAgent, self.agent)

    def test_one_write(self) -> None:
        """
        A request with a body in memory goes to the connection for the URL's
        endpoint as one write: the request line, the headers given, a
        C{Host} with the port and the body's length, then the body. Its
        Deferred fires with the response.
        """
        d = self.agent.request(
            b"POST",
            b"http://127.0.0.1:8080/v1/chat?x=1",
            Headers({b"X-Trace": [b"t"]}),
            BytesProducer(b'{"a":1}'),
        )
        [(key, endpoint)] = self.pool.asked
        self.assertEqual(key, (b"http", b"127.0.0.1", 8080))
        self.assertIs(endpoint, self.endpoint(b"http://127.0.0.1:8080/"))
        [sent] = self.pool.transport.calls
        lines, body = head_lines(sent)
        self.assertEqual(lines[0], b"POST /v1/chat?x=1 HTTP/1.1")
        self.assertEqual(
            sorted(lines[1:]), [b"Content-Length: 7", b"Host: 127.0.0.1:8080", b"X-Trace: t"]
        )
        self.assertEqual(body, b'{"a":1}')
        self.assertNoResult(d)
        self.pool.connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_let_go_once_sent(self) -> None:
        """
        Once sent, the request holds neither its body nor its headers
        while the response lasts.
        """
        d = self.agent.request(
            b"POST", b"http://127.0.0.1:8080/", Headers({b"X-Trace": [b"t"]}), BytesProducer(b"{}")
        )
        request = self.pool.connection._currentRequest
        self.assertIsNone(request.bodyProducer)
        self.assertEqual(list(request.headers.getAllRawHeaders()), [])
        self.pool.connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_host_default_port(self) -> None:
        """
        The C{Host} header has no port when it is the scheme's default.
        """
        for url, host in (
            (b"http://10.0.0.1/v1", b"Host: 10.0.0.1"),
            (b"https://10.0.0.1:443/v1", b"Host: 10.0.0.1"),
            (b"https://10.0.0.1:80/v1", b"Host: 10.0.0.1:80"),
            (b"http://upstream.test/v1", b"Host: upstream.test"),
        ):
            self.assertIn(host, self.sent(url))

    def test_host_ipv6(self) -> None:
        """
        The C{Host} header of an IPv6 address has it in brackets.
        """
        self.assertIn(b"Host: [::1]:8080", self.sent(b"http://[::1]:8080/v1"))
        self.assertIn(b"Host: [2001:db8::1]", self.sent(b"https://[2001:db8::1]/v1"))

    def test_host_given(self) -> None:
        """
        A C{Host} header given is sent as it is, alone; headers given
        without one are not changed by the request.
        """
        headers = Headers({b"Host": [b"api.test"]})
        self.agent.request(b"GET", b"http://127.0.0.1:8080/", headers)
        lines, _ = head_lines(self.pool.transport.value())
        self.assertEqual(
            [line for line in lines if line.lower().startswith(b"host:")], [b"Host: api.test"]
        )
        headers = Headers({b"X-Trace": [b"t"]})
        self.agent.request(b"GET", b"http://127.0.0.1:8080/", headers)
        self.assertFalse(headers.hasHeader(b"host"))

    def test_no_body(self) -> None:
        """
        A request without a body is its head alone, without a length.
        """
        self.agent.request(b"GET", b"http://127.0.0.1:8080/v1/models")
        [sent] = self.pool.transport.calls
        lines, body = head_lines(sent)
        self.assertEqual(lines[0], b"GET /v1/models HTTP/1.1")
        self.assertFalse([line for line in lines if line.startswith(b"Content-Length")])
        self.assertEqual(body, b"")

    def test_other_producer(self) -> None:
        """
        A body from another producer is sent after the head, with its length.
        """
        self.agent.request(b"POST", b"http://127.0.0.1:8080/", None, OtherProducer(b"abc"))
        lines, body = head_lines(self.pool.transport.value())
        self.assertIn(b"Content-Length: 3", lines)
        self.assertEqual(body, b"abc")

    def test_not_persistent(self) -> None:
        """
        Over a pool that does not keep connections, requests say so.
        """
        self.pool = FakePool(persistent=False)
        self.agent = PoolAgent(self.pool, self.cache)  # type: ignore[arg-type]
        self.assertIn(b"Connection: close", self.sent(b"http://127.0.0.1:8080/"))

    def test_invalid_url(self) -> None:
        """
        A URL that cannot be connected to gives a failed Deferred, and no
        connection is asked for.
        """
        for url in (b"not a url", b"ftp://127.0.0.1/x"):
            self.failureResultOf(self.agent.request(b"GET", url), SchemeNotSupported)
        self.assertEqual(self.pool.asked, [])

    def test_parsed_once(self) -> None:
        """
        A URL is parsed once: the next requests to it reuse what was found.
        """
        parsed: list[bytes] = []
        from_bytes = URI.fromBytes

        def counting(uri: bytes, defaultPort: int | None = None) -> URI:
            parsed.append(uri)
            return from_bytes(uri, defaultPort)

        self.patch(URI, "fromBytes", counting)
        url = b"http://127.0.0.1:8080/v1/chat"
        for _ in range(3):
            self.agent.request(b"GET", url)
        self.assertEqual(parsed, [url])
        self.assertEqual(len(self.pool.asked), 3)
        self.assertEqual(len({id(endpoint) for _, endpoint in self.pool.asked}), 1)
        self.agent.request(b"GET", b"http://127.0.0.1:8080/v1/models")
        self.assertEqual(len(parsed), 2)


class PreparedURLTests(SynchronousTestCase):
    """
    L{_PreparedURL}: a URL whose text is made once.
    """

    def test_to_text(self) -> None:
        """
        Its text is that of the same URL, the password hidden, made once;
        with the password it is made each time and not kept.
        """
        text = "http://user:pw@upstream.test:1/v1/chat?x=1"
        url = _PreparedURL.from_text(text)
        self.assertEqual(url.to_text(), EncodedURL.from_text(text).to_text())
        self.assertIs(url.to_uri(), url)
        made: list[bool] = []
        to_text = EncodedURL.to_text

        def counting(self: EncodedURL, with_password: bool = False) -> str:
            made.append(with_password)
            return to_text(self, with_password)

        self.patch(EncodedURL, "to_text", counting)
        fresh = _PreparedURL.from_text(text)
        self.assertEqual(
            [fresh.to_text() for _ in range(3)], ["http://user:@upstream.test:1/v1/chat?x=1"] * 3
        )
        self.assertEqual(fresh.to_text(with_password=True), text)
        self.assertEqual(fresh.to_text(), "http://user:@upstream.test:1/v1/chat?x=1")
        self.assertEqual(made, [False, True])
