"""
Tests for the chunked-body shortcuts of both legs: L{whole_chunks} on the
upstream's reads and the chunks L{Downstream} frames itself for the client.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import Request, Response
from twisted.web.client import readBody
from twisted.web.http_headers import Headers

from aiproxy.upstream.agent import UpstreamProtocol, whole_chunks
from tests.test_downstream import DownstreamCase


def _chunked(bodies: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(body), body) for body in bodies)


class WholeChunksTests(SynchronousTestCase):
    """
    L{whole_chunks} takes a read of whole chunks and leaves anything else
    to Twisted's decoder.
    """

    def test_whole(self) -> None:
        """
        Whole chunks give their bodies, in order, upper-case sizes too.
        """
        data = _chunked([b"data: 1\n\n", b"x" * 26]).replace(b"1a\r\n", b"1A\r\n")
        self.assertEqual(whole_chunks(data), [b"data: 1\n\n", b"x" * 26])

    def test_not_whole(self) -> None:
        """
        A cut chunk, the last chunk, an extension, a bad size or a missing
        CRLF after a chunk: L{None}.
        """
        for data in (
            _chunked([b"abc"])[:-1],
            _chunked([b"abc"]) + b"4\r\nab",
            _chunked([b"abc"]) + b"0\r\n\r\n",
            b"3;ext=1\r\nabc\r\n",
            b"+3\r\nabc\r\n",
            b"0x3\r\nabc\r\n",
            b" 3\r\nabc\r\n",
            b"3\r\nabcXY",
            b"\r\nabc\r\n",
            b"1" * 20 + b"\r\n",
        ):
            self.assertIsNone(whole_chunks(data), data)


class UpstreamReadsTests(SynchronousTestCase):
    """
    A chunked response reaches the body protocol the same, whatever
    L{UpstreamProtocol} decodes itself and whatever Twisted's decoder
    does.
    """

    def _response(self, reads: list[bytes]) -> tuple[bytes, list[Response]]:
        protocol = UpstreamProtocol()
        protocol.makeConnection(StringTransport())
        request = Request(b"GET", b"/", Headers({b"host": [b"up"]}), None)
        responses: list[Response] = []
        protocol.request(request).addCallback(responses.append)
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        protocol.dataReceived(head)
        [response] = responses
        bodies: list[bytes] = []
        readBody(response).addCallback(bodies.append)
        for data in reads:
            protocol.dataReceived(data)
        return (bodies[0] if bodies else b""), responses

    @given(
        st.lists(st.binary(min_size=1, max_size=40), max_size=12),
        st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    )
    def test_any_reads(self, bodies: list[bytes], cuts: list[int]) -> None:
        """
        Any chunked body, cut into reads anywhere, gives the same body.
        """
        wire = _chunked(bodies) + b"0\r\n\r\n"
        points = sorted({min(cut, len(wire)) for cut in cuts})
        reads = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
        body, _ = self._response([read for read in reads if read])
        self.assertEqual(body, b"".join(bodies))

    def test_malformed_after_whole(self) -> None:
        """
        A malformed chunk after whole ones fails the body as Twisted's
        decoder does.
        """
        protocol = UpstreamProtocol()
        protocol.makeConnection(StringTransport())
        request = Request(b"GET", b"/", Headers({b"host": [b"up"]}), None)
        responses: list[Response] = []
        protocol.request(request).addCallback(responses.append)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        failures: list[object] = []
        readBody(responses[0]).addErrback(failures.append)
        protocol.dataReceived(_chunked([b"ok"]))
        protocol.dataReceived(b"zz\r\nab\r\n")
        self.assertEqual(len(failures), 1)


class DownstreamChunksTests(DownstreamCase):
    """
    After the head, L{Downstream} frames the chunks itself, as
    C{Request.write} would.
    """

    def test_counted(self) -> None:
        """
        The request counts the bytes sent, as with C{Request.write}.
        """
        self.downstream.send(b"one")
        self.downstream.send(b"three")
        self.assertEqual(self.request.sentLength, 8)
        self.assertEqual(self.response().chunks, [b"one", b"three"])

    def test_empty(self) -> None:
        """
        Sending nothing writes nothing (never a terminating chunk).
        """
        self.downstream.send(b"one")
        before = self.raw
        self.downstream.send(b"")
        self.assertEqual(self.raw, before)
        self.downstream.send(b"two")
        self.assertEqual(self.response().chunks, [b"one", b"two"])
        self.assertFalse(self.response().complete)

    def test_client_gone(self) -> None:
        """
        Once the client is gone, nothing more is written.
        """
        self.downstream.send(b"one")
        before = self.raw
        self.request.connectionLost(Exception("gone"))
        self.downstream.send(b"two")
        self.assertEqual(self.raw, before)


class HeadRequestTests(DownstreamCase):
    """
    A C{HEAD} request's answer has no body, even when one is sent.
    """

    def test_no_body(self) -> None:
        """
        The C{HEAD} response carries no chunk.
        """
        self.request.method = b"HEAD"
        self.downstream.send(b"one")
        self.downstream.send(b"two")
        self.assertNotIn(b"one", self.raw)
        self.assertNotIn(b"two", self.raw)
