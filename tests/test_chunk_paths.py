"""
Tests for the chunked-body shortcuts of both legs: L{decode_chunks} on the
upstream's reads and the chunks L{Downstream} frames itself for the client.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import Request, Response
from twisted.web.client import readBody
from twisted.web.http import _ChunkedTransferDecoder, _MalformedChunkedDataError
from twisted.web.http_headers import Headers

from aiproxy.upstream import agent
from aiproxy.upstream.agent import UpstreamProtocol
from aiproxy.upstream.chunks import decode_chunks
from tests.test_downstream import DownstreamCase


def _chunked(bodies: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(body), body) for body in bodies)


def _decode(reads: list[bytes], own: bool) -> tuple[list[bytes], list[bytes], str]:
    """
    What a chunked decoder delivers of C{reads}, with L{decode_chunks} in
    front of it (C{own}) or alone: the pieces, what followed the last chunk,
    and C{"error"} if it refused the body (else its state).
    """
    pieces: list[bytes] = []
    rest: list[bytes] = []
    decoder = _ChunkedTransferDecoder(pieces.append, rest.append)
    try:
        for data in reads:
            if decoder.state == "FINISHED":
                # The response's parser takes what follows.
                rest.append(data)
                continue
            if not (own and decode_chunks(decoder, data)):
                decoder.dataReceived(data)
    except _MalformedChunkedDataError:
        return pieces, rest, "error"
    return pieces, rest, decoder.state


def _cut(wire: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(wire)) for cut in cuts})
    reads = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    return [read for read in reads if read]


_CHUNKS = st.lists(
    st.tuples(st.binary(min_size=1, max_size=40), st.sampled_from([b"", b";ext=1", b";x"])),
    max_size=10,
)


class DecodeChunksTests(SynchronousTestCase):
    """
    L{decode_chunks} in front of Twisted's decoder delivers what the
    decoder alone does, read by read.
    """

    @given(
        _CHUNKS,
        st.sampled_from([b"", b"X-Trailer: 1\r\n"]),
        st.sampled_from([b"", b"extra"]),
        st.lists(st.integers(min_value=0, max_value=500), max_size=10),
    )
    def test_same_as_twisted(
        self, chunks: list[tuple[bytes, bytes]], trailer: bytes, extra: bytes, cuts: list[int]
    ) -> None:
        """
        Any chunked body (extensions, trailers and bytes after it
        included), cut into reads anywhere, gives the same pieces, the same
        rest and the same final state.
        """
        wire = b"".join(b"%x%b\r\n%b\r\n" % (len(body), ext, body) for body, ext in chunks)
        wire += b"0\r\n" + trailer + b"\r\n" + extra
        reads = _cut(wire, cuts)
        self.assertEqual(_decode(reads, own=True), _decode(reads, own=False))

    @given(
        st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=5),
        st.integers(min_value=0, max_value=200),
        st.sampled_from([b"zz\r\n", b"3\r\nabcXY", b"+3\r\nabc\r\n", b"\r\n", b"1" * 30]),
        st.lists(st.integers(min_value=0, max_value=300), max_size=6),
    )
    def test_malformed(self, bodies: list[bytes], at: int, bad: bytes, cuts: list[int]) -> None:
        """
        A malformed body is refused the same way, after the same pieces.
        """
        wire = _chunked(bodies)
        wire = wire[: min(at, len(wire))] + bad
        reads = _cut(wire, cuts)
        self.assertEqual(_decode(reads, own=True), _decode(reads, own=False))

    def test_taken(self) -> None:
        """
        Whole chunks (upper-case sizes too) are decoded in place; a read
        after the last chunk is left to the decoder.
        """
        pieces: list[bytes] = []
        decoder = _ChunkedTransferDecoder(pieces.append, lambda rest: None)
        self.assertTrue(decode_chunks(decoder, _chunked([b"a", b"x" * 26]).replace(b"1a", b"1A")))
        self.assertEqual(pieces, [b"a", b"x" * 26])
        self.assertTrue(decode_chunks(decoder, b"0\r\n\r\n"))
        self.assertEqual(decoder.state, "FINISHED")
        self.assertFalse(decode_chunks(decoder, b"more"))


class UpstreamReadsTests(SynchronousTestCase):
    """
    A chunked response reaches the body protocol the same, whatever
    L{UpstreamProtocol} decodes itself and whatever Twisted's decoder
    does.
    """

    HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    def _body(self, reads: list[bytes]) -> bytes:
        """
        The body of the response C{reads} carry (its head included).
        """
        protocol = UpstreamProtocol()
        protocol.makeConnection(StringTransport())
        request = Request(b"GET", b"/", Headers({b"host": [b"up"]}), None)
        bodies: list[bytes] = []
        protocol.request(request).addCallback(readBody).addCallback(bodies.append)
        for data in reads:
            protocol.dataReceived(data)
        [body] = bodies
        return body

    @given(
        st.lists(st.binary(min_size=1, max_size=40), max_size=12),
        st.lists(st.integers(min_value=0, max_value=500), max_size=8),
    )
    def test_any_reads(self, bodies: list[bytes], cuts: list[int]) -> None:
        """
        Any chunked body, its head and it cut into reads anywhere, gives
        the same body.
        """
        wire = self.HEAD + _chunked(bodies) + b"0\r\n\r\n"
        self.assertEqual(self._body(_cut(wire, cuts)), b"".join(bodies))

    def test_with_the_head(self) -> None:
        """
        The chunks in the read of the head are decoded in one pass too.
        """
        decoded: list[bytes] = []

        def counted(decoder: _ChunkedTransferDecoder, data: bytes) -> bool:
            decoded.append(data)
            return decode_chunks(decoder, data)

        self.patch(agent, "decode_chunks", counted)
        chunks = _chunked([b"a" * 10, b"b" * 20])
        body = self._body([self.HEAD + chunks, b"0\r\n\r\n"])
        self.assertEqual(body, b"a" * 10 + b"b" * 20)
        self.assertEqual(decoded[0], chunks)

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
