# -*- test-case-name: tests.test_upstream -*-
"""
The upstream HTTP client of one route: treq over a persistent
L{HTTPConnectionPool}, with the route's keep-alive, TLS and timeout settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from hyperlink import EncodedURL
from OpenSSL import SSL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from aiproxy.upstream.agent import (
    URL_CACHE_SIZE,
    BytesProducer,
    EndpointCache,
    PoolAgent,
    QuietPool,
)

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
        self.pool = QuietPool(reactor, persistent=conf["keepalive"])
        self.pool.maxPersistentPerHost = conf["keepalive_pool"]
        self.pool.cachedConnectionTimeout = conf["keepalive_timeout"] / 1000.0
        self.pool.retryAutomatically = False
        endpoints = EndpointCache(reactor, tls_policy(conf), self._timeout)
        agent = PoolAgent(self.pool, endpoints)
        self._cookies = _NoCookies()
        self._http = HTTPClient(agent, cookiejar=self._cookies, data_to_body_producer=BytesProducer)
        self._urls: dict[str, _PreparedURL] = {}

    def _prepared(self, url: str) -> _PreparedURL:
        """
        C{url} parsed and IDNA-encoded once, then reused.
        """
        prepared = self._urls.get(url)
        if prepared is None:
            if len(self._urls) >= URL_CACHE_SIZE:
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
