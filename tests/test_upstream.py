# -*- test-case-name: tests.test_upstream -*-
"""
Tests for L{aiproxy.upstream.client}: the TLS policy of a route, the request body
producer and the upstream client's connection pool. TLS handshakes run
between two in-memory OpenSSL connections; HTTP goes over a
L{StringTransport}.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS
from zope.interface.verify import verifyObject

from aiproxy.upstream.client import BytesProducer, UpstreamClient, tls_policy
from tests.helpers import certificate, key_pem

CONF = {
    "timeout": 5000,
    "keepalive": True,
    "keepalive_pool": 30,
    "keepalive_timeout": 60000,
    "ssl_verify": True,
}


def self_signed(hostname: str) -> tuple[bytes, bytes]:
    """
    A self-signed CA certificate for C{hostname} and its key, both PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate(key, hostname, key, hostname, ca=True, hostnames=[hostname])
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


class FakeTLSTransport:
    """
    Stands for the TLS protocol a connection creator is given: records a
    failed hostname verification.
    """

    class factory:
        """
        The TLS factory Twisted asks for ALPN protocols: none here.
        """

        wrappedFactory = None

    def __init__(self) -> None:
        self.failures: list[Any] = []

    def failVerification(self, reason: Any) -> None:
        self.failures.append(reason)


class Handshake:
    """
    A TLS handshake between a client connection made by an
    L{IPolicyForHTTPS} and an in-memory server with C{cert_pem}.

    @ivar server_names: the SNI names the server saw.
    """

    def __init__(
        self, policy: IPolicyForHTTPS, hostname: bytes, cert_pem: bytes, key_pem: bytes
    ) -> None:
        self.server_names: list[bytes | None] = []
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem))
        context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem))
        context.set_tlsext_servername_callback(
            lambda conn: self.server_names.append(conn.get_servername())
        )
        self.server = SSL.Connection(context, None)
        self.server.set_accept_state()
        self.transport = FakeTLSTransport()
        creator = policy.creatorForNetloc(hostname, 443)
        self.client = creator.clientConnectionForTLS(self.transport)
        self.client.set_connect_state()

    def run(self) -> None:
        """
        Shuttle bytes until both sides are done.

        @raise SSL.Error: if either side refuses the handshake.
        """
        done = {"client": False, "server": False}
        for _ in range(20):
            for side, connection in (("client", self.client), ("server", self.server)):
                if not done[side]:
                    try:
                        connection.do_handshake()
                        done[side] = True
                    except SSL.WantReadError:
                        pass
            for source, sink in ((self.client, self.server), (self.server, self.client)):
                try:
                    sink.bio_write(source.bio_read(65536))
                except SSL.WantReadError:
                    pass
            if all(done.values()):
                return
        raise AssertionError("handshake did not finish")


class TLSPolicyTests(SynchronousTestCase):
    """
    L{tls_policy}: verified by default, against C{ssl_ca_file} if given,
    unverified (still with SNI) when C{ssl_verify} is false.
    """

    def setUp(self) -> None:
        self.cert, self.key = self_signed("upstream.test")
        self.ca_file = self.mktemp()
        with open(self.ca_file, "wb") as f:
            f.write(self.cert)

    def test_interface(self) -> None:
        """
        Every policy provides L{IPolicyForHTTPS}.
        """
        for conf in ({}, {"ssl_verify": False}, {"ssl_ca_file": self.ca_file}):
            verifyObject(IPolicyForHTTPS, tls_policy(conf))

    def test_verified_by_default(self) -> None:
        """
        By default the system trust store is used: a self-signed upstream
        is refused.
        """
        handshake = Handshake(tls_policy({}), b"upstream.test", self.cert, self.key)
        self.assertRaises(SSL.Error, handshake.run)

    def test_ca_file(self) -> None:
        """
        With C{ssl_ca_file}, an upstream certified by that bundle is
        accepted, its host name checked, and SNI sent.
        """
        handshake = Handshake(
            tls_policy({"ssl_ca_file": self.ca_file}), b"upstream.test", self.cert, self.key
        )
        handshake.run()
        self.assertEqual(handshake.transport.failures, [])
        self.assertEqual(handshake.server_names, [b"upstream.test"])

    def test_ca_file_wrong_host(self) -> None:
        """
        With C{ssl_ca_file}, a certificate for another host name fails
        verification.
        """
        handshake = Handshake(
            tls_policy({"ssl_ca_file": self.ca_file}), b"other.test", self.cert, self.key
        )
        try:
            handshake.run()
        except SSL.Error:
            return
        self.assertEqual(len(handshake.transport.failures), 1)

    def test_ca_file_not_trusted_elsewhere(self) -> None:
        """
        A bundle trusts its own certificates only: another self-signed
        upstream is refused.
        """
        other_cert, other_key = self_signed("upstream.test")
        handshake = Handshake(
            tls_policy({"ssl_ca_file": self.ca_file}), b"upstream.test", other_cert, other_key
        )
        self.assertRaises(SSL.Error, handshake.run)

    def test_unverified(self) -> None:
        """
        C{ssl_verify: false} accepts any certificate, for any host name,
        and still sends SNI.
        """
        policy = tls_policy({"ssl_verify": False, "ssl_ca_file": self.ca_file})
        other_cert, other_key = self_signed("elsewhere.test")
        handshake = Handshake(policy, b"upstream.test", other_cert, other_key)
        handshake.run()
        self.assertEqual(handshake.transport.failures, [])
        self.assertEqual(handshake.server_names, [b"upstream.test"])

    def test_ca_file_missing(self) -> None:
        """
        An C{ssl_ca_file} that does not exist raises L{OSError}.
        """
        self.assertRaises(OSError, tls_policy, {"ssl_ca_file": self.mktemp()})

    def test_ca_file_without_certificate(self) -> None:
        """
        An C{ssl_ca_file} holding no certificate raises L{ValueError}.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"nothing here\n")
        self.assertRaises(ValueError, tls_policy, {"ssl_ca_file": path})


class BytesProducerTests(SynchronousTestCase):
    """
    L{BytesProducer}: a body already in memory.
    """

    def test_interface(self) -> None:
        """
        It provides L{IBodyProducer} and knows its length.
        """
        producer = BytesProducer(b"hello")
        verifyObject(IBodyProducer, producer)
        self.assertEqual(producer.length, 5)

    def test_writes(self) -> None:
        """
        Producing writes the bytes in one go and is then done.
        """
        consumer = StringTransport()
        producer = BytesProducer(b'{"a":1}')
        self.assertIsNone(self.successResultOf(producer.startProducing(consumer)))
        self.assertEqual(consumer.value(), b'{"a":1}')
        producer.pauseProducing()
        producer.resumeProducing()
        producer.stopProducing()


class UpstreamClientTests(SynchronousTestCase):
    """
    L{UpstreamClient}: the pool follows the route's keep-alive settings;
    requests use the route's timeout.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def test_pool(self) -> None:
        """
        The pool is persistent with C{keepalive_pool} idle connections per
        host, closed after C{keepalive_timeout}, and never retries a
        request by itself.
        """
        client = UpstreamClient(self.reactor, dict(CONF, keepalive_pool=7, keepalive_timeout=2500))
        self.assertIs(client.pool.persistent, True)
        self.assertEqual(client.pool.maxPersistentPerHost, 7)
        self.assertEqual(client.pool.cachedConnectionTimeout, 2.5)
        self.assertIs(client.pool.retryAutomatically, False)

    def test_no_keepalive(self) -> None:
        """
        C{keepalive: false} makes a non-persistent pool.
        """
        client = UpstreamClient(self.reactor, dict(CONF, keepalive=False))
        self.assertIs(client.pool.persistent, False)

    def test_request(self) -> None:
        """
        A request connects with the route's timeout and sends the method,
        path, query, headers and body; its Deferred fires with the response
        as soon as the headers arrive.
        """
        client = UpstreamClient(self.reactor, CONF)
        d = client.request(
            "POST", "http://127.0.0.1:7751/v1/chat?x=1", Headers({b"X-Trace": [b"t"]}), b"{}"
        )
        self.assertNoResult(d)
        [(host, port, factory, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 7751, 5.0))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"POST /v1/chat?x=1 HTTP/1.1")
        self.assertIn(b"X-Trace: t", lines)
        self.assertIn(b"Content-Length: 2", lines)
        self.assertIn(b"Host: 127.0.0.1:7751", lines)
        self.assertEqual(body, b"{}")
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)

    def test_no_cookies(self) -> None:
        """
        Cookies set by an upstream are not sent back on later requests (the
        pool is shared by every client).
        """
        client = UpstreamClient(self.reactor, dict(CONF, keepalive=False))
        sent = []
        for _ in range(2):
            d = client.request("POST", "http://127.0.0.1:7751/v1/chat", Headers(), b"{}")
            factory = self.reactor.tcpClients[-1][2]
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            sent.append(transport.value())
            protocol.dataReceived(
                b"HTTP/1.1 200 OK\r\nSet-Cookie: s=1; Path=/\r\nContent-Length: 0\r\n\r\n"
            )
            self.successResultOf(d)
        self.assertNotIn(b"Cookie", sent[1])

    def test_timeout(self) -> None:
        """
        Without response headers within C{timeout}, the request fails.
        """
        client = UpstreamClient(self.reactor, dict(CONF, timeout=1500))
        d = client.request("POST", "http://127.0.0.1:7751/v1/chat", Headers(), b"{}")
        self.reactor.advance(1.4)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        failure = self.failureResultOf(d)
        self.assertTrue(
            failure.check(CancelledError, ConnectingCancelledError, ResponseNeverReceived), failure
        )

    def test_close(self) -> None:
        """
        Closing the client closes its idle connections.
        """
        client = UpstreamClient(self.reactor, CONF)
        self.successResultOf(client.close())
