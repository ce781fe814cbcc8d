# -*- test-case-name: tests.test_downstream -*-
"""
Tests for L{aiproxy.exchange.downstream.Downstream}: the client's side of
one request, over a real L{twisted.web.server.Request} whose connection is
a L{StringTransport}, so the bytes the client gets (HTTP chunks included)
are parsed as it would; a L{Clock} runs the flush writer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from aiproxy.context import ExchangeContext
from aiproxy.exchange.downstream import CLOSE_GRACE_S, Downstream
from aiproxy.exchange.writer import ImmediateWriter, IntervalWriter
from aiproxy.interfaces import IDownstream
from tests.test_proxy import ClientTransport, FakeBodyTransport, ParsedResponse, parse_response

#: A head a test prepares.
JSON = ((b"content-type", [b"application/json"]), (b"x-request-id", [b"req-7"]))


class _Held(Resource):
    """
    Answers every request later: makes a L{Downstream} for it and leaves
    the response to the test.
    """

    isLeaf = True

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.made: list[tuple[Request, Downstream, ExchangeContext]] = []

    def render(self, request: Request) -> Any:
        context = ExchangeContext("chat", "a", self.clock.seconds())
        self.made.append((request, Downstream(request, context, self.clock), context))
        return NOT_DONE_YET


class DownstreamCase(SynchronousTestCase):
    """
    One client connection to a site, one request on it, and its
    L{Downstream}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.site_reactor = MemoryReactorClock()
        resource = _Held(self.clock)
        site = Site(resource, reactor=self.site_reactor)
        self.transport = ClientTransport()
        self.channel = site.buildProtocol(None)
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        [(self.request, self.downstream, self.context)] = resource.made

    @property
    def raw(self) -> bytes:
        return self.transport.value()

    def response(self) -> ParsedResponse:
        parsed = parse_response(self.raw)
        assert parsed is not None, f"no response yet: {self.raw!r}"
        return parsed


class HeadTests(DownstreamCase):
    """
    The status and headers go out with the first byte.
    """

    def test_interface(self) -> None:
        """
        A L{Downstream} provides L{IDownstream}.
        """
        self.assertTrue(verifyObject(IDownstream, self.downstream))

    def test_nothing_before_first_send(self) -> None:
        """
        A prepared head is not written until the first C{send}, which
        carries it with the first HTTP chunk and marks the output started
        with its status.
        """
        self.assertEqual(self.downstream.status, 200)
        self.downstream.prepare(201, JSON)
        self.assertEqual(self.downstream.status, 201)
        self.assertEqual(self.raw, b"")
        self.assertFalse(self.context.output_started)
        self.assertIsNone(self.context.status)
        self.downstream.send(b"hello")
        response = self.response()
        self.assertEqual(response.status, 201)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.header("x-request-id"), "req-7")
        self.assertEqual(response.header("transfer-encoding"), "chunked")
        self.assertEqual(response.chunks, [b"hello"])
        self.assertFalse(response.complete)
        self.assertTrue(self.context.output_started)
        self.assertEqual(self.context.status, 201)

    def test_each_send_one_chunk(self) -> None:
        """
        Every C{send} is one HTTP chunk; the head goes out once; the bytes
        and writes are counted.
        """
        self.downstream.send(b"one")
        self.downstream.send(b"three")
        response = self.response()
        self.assertEqual(response.chunks, [b"one", b"three"])
        self.assertEqual(self.raw.count(b"HTTP/1.1 "), 1)
        self.assertEqual((self.context.bytes_out, self.context.flushes), (8, 2))

    def test_prepare_after_output(self) -> None:
        """
        A head prepared after output started is not sent.
        """
        self.downstream.send(b"a")
        self.downstream.prepare(500, JSON)
        self.downstream.send(b"b")
        self.assertEqual(self.response().status, 200)
        self.assertEqual(self.raw.count(b"HTTP/1.1 "), 1)


class RespondTests(DownstreamCase):
    """
    L{Downstream.respond}: a whole answer.
    """

    def test_respond(self) -> None:
        """
        The prepared head and the body with its length: a complete,
        unchunked response; the request is finished.
        """
        body = b'{"message": "no"}'
        self.downstream.prepare(404, JSON)
        self.downstream.respond(body)
        response = self.response()
        self.assertEqual(response.status, 404)
        self.assertEqual(response.header("content-length"), str(len(body)))
        self.assertIsNone(response.header("transfer-encoding"))
        self.assertEqual(response.body, body)
        self.assertTrue(response.complete)
        self.assertTrue(self.request.finished)
        self.assertEqual(self.context.status, 404)
        self.assertEqual((self.context.bytes_out, self.context.flushes), (len(body), 1))

    def test_respond_empty(self) -> None:
        """
        An empty body is answered with a length of 0 and no write.
        """
        self.downstream.prepare(200, JSON)
        self.downstream.respond(b"")
        response = self.response()
        self.assertEqual(response.header("content-length"), "0")
        self.assertEqual(response.body, b"")
        self.assertTrue(response.complete)
        self.assertTrue(self.request.finished)
        self.assertEqual(self.context.flushes, 0)
        self.assertTrue(self.context.output_started)


class StreamTests(DownstreamCase):
    """
    L{Downstream.start_stream}, L{Downstream.finish} and
    L{Downstream.discard}.
    """

    def test_immediate(self) -> None:
        """
        With an interval of 0 every write is one HTTP chunk at once, and
        C{finish} ends the response with the terminating chunk.
        """
        write = self.downstream.start_stream(0)
        self.assertIsInstance(self.downstream.writer, ImmediateWriter)
        write(b"a")
        self.assertEqual(self.response().chunks, [b"a"])
        write(b"b")
        write(b"c")
        self.assertEqual(self.response().chunks, [b"a", b"b", b"c"])
        self.downstream.finish()
        response = self.response()
        self.assertTrue(response.complete)
        self.assertEqual(response.chunks, [b"a", b"b", b"c"])
        self.assertEqual(self.context.flushes, 3)

    def test_interval(self) -> None:
        """
        With an interval of 10 ms the first write goes out at once, the
        next ones within the interval are written together at the next
        tick, and C{finish} flushes what is pending before the end, leaving
        no timer.
        """
        write = self.downstream.start_stream(10)
        self.assertIsInstance(self.downstream.writer, IntervalWriter)
        write(b"a")
        self.assertEqual(self.response().chunks, [b"a"])
        write(b"b")
        write(b"c")
        self.assertEqual(self.response().chunks, [b"a"])
        self.clock.advance(0.01)
        self.assertEqual(self.response().chunks, [b"a", b"bc"])
        write(b"d")
        write(b"e")
        self.assertEqual(self.response().chunks, [b"a", b"bc"])
        self.downstream.finish()
        response = self.response()
        self.assertTrue(response.complete)
        self.assertEqual(response.chunks, [b"a", b"bc", b"de"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.context.bytes_out, self.context.flushes), (5, 3))

    def test_finish_tail(self) -> None:
        """
        C{finish(tail)} writes the pending bytes, then C{tail} as the last
        chunk.
        """
        write = self.downstream.start_stream(10)
        write(b"a")
        write(b"b")
        self.downstream.finish(b"[tail]")
        response = self.response()
        self.assertTrue(response.complete)
        self.assertEqual(response.chunks, [b"a", b"b", b"[tail]"])

    def test_finish_without_output(self) -> None:
        """
        C{finish} with nothing written commits the prepared head and ends
        an empty response.
        """
        self.downstream.prepare(202, JSON)
        self.downstream.finish()
        response = self.response()
        self.assertEqual(response.status, 202)
        self.assertEqual(response.body, b"")
        self.assertTrue(response.complete)
        self.assertEqual(self.context.status, 202)

    def test_discard(self) -> None:
        """
        C{discard} drops what the writer holds and stops its loop: nothing
        more is written.
        """
        write = self.downstream.start_stream(10)
        write(b"a")
        write(b"dropped")
        self.downstream.discard()
        self.assertIsNone(self.downstream.writer)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1)
        self.assertEqual(self.response().chunks, [b"a"])

    def test_new_stream_discards(self) -> None:
        """
        Starting a stream drops what the previous writer held (an attempt
        given up).
        """
        first = self.downstream.start_stream(10)
        first(b"a")
        first(b"dropped")
        second = self.downstream.start_stream(0)
        second(b"b")
        self.clock.advance(1)
        self.assertEqual(self.response().chunks, [b"a", b"b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CutTests(DownstreamCase):
    """
    L{Downstream.cut}: an honest early end.
    """

    def test_cut(self) -> None:
        """
        The pending bytes, then the tail, then the connection is closing
        without the terminating chunk; the channel's timeout is restarted
        short so a client that stopped reading cannot keep it.
        """
        write = self.downstream.start_stream(10)
        write(b"a")
        write(b"b")
        self.downstream.cut(b"data: error\n\n")
        response = self.response()
        self.assertEqual(response.chunks, [b"a", b"b", b"data: error\n\n"])
        self.assertFalse(response.complete)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.request.finished)
        self.assertEqual(self.channel.timeOut, CLOSE_GRACE_S)
        self.assertEqual(
            [call.getTime() for call in self.site_reactor.getDelayedCalls()], [CLOSE_GRACE_S]
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cut_without_tail(self) -> None:
        """
        An empty tail writes nothing more.
        """
        self.downstream.send(b"a")
        self.downstream.cut(b"")
        self.assertEqual(self.response().chunks, [b"a"])
        self.assertEqual(self.context.flushes, 1)
        self.assertTrue(self.transport.disconnecting)

    def test_cut_after_client_left(self) -> None:
        """
        Cutting after the client left writes nothing and does not fail.
        """
        write = self.downstream.start_stream(10)
        write(b"a")
        write(b"pending")
        written = self.raw
        self.channel.connectionLost(Failure(ConnectionDone("client left")))
        self.downstream.cut(b"tail")
        self.assertEqual(self.raw, written)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_finish_after_client_left(self) -> None:
        """
        Finishing after the client left writes nothing and does not fail.
        """
        self.downstream.send(b"a")
        written = self.raw
        self.channel.connectionLost(Failure(ConnectionDone("client left")))
        self.downstream.finish(b"tail")
        self.assertEqual(self.raw, written)
        self.assertFalse(self.request.finished)


class KeepaliveTests(DownstreamCase):
    """
    L{Downstream.keepalive}: SSE comments before the upstream's bytes.
    """

    def test_commits_event_stream(self) -> None:
        """
        The first comment commits a 200 event stream (whatever head was
        prepared) and each one is the C{:} comment.
        """
        self.downstream.prepare(503, JSON)
        self.downstream.keepalive()
        self.downstream.keepalive()
        response = self.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "text/event-stream")
        self.assertEqual(response.header("cache-control"), "no-cache")
        self.assertEqual(response.header("x-accel-buffering"), "no")
        self.assertIsNone(response.header("x-request-id"))
        self.assertEqual(response.chunks, [b":\n\n", b":\n\n"])
        self.assertEqual(self.downstream.status, 200)
        self.assertEqual((self.context.status, self.context.bytes_out), (200, 6))

    def test_after_output(self) -> None:
        """
        A comment after output is only the comment.
        """
        self.downstream.prepare(201, JSON)
        self.downstream.send(b"x")
        self.downstream.keepalive()
        response = self.response()
        self.assertEqual(response.status, 201)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.chunks, [b"x", b":\n\n"])


class PaceTests(DownstreamCase):
    """
    L{Downstream.pace}: a full client socket pauses the upstream read.
    """

    def setUp(self) -> None:
        super().setUp()
        self.upstream = FakeBodyTransport()
        self.downstream.pace(self.upstream, lambda: self.upstream.calls.append("on_resume"))

    def test_pause_resume(self) -> None:
        """
        The client transport pausing the channel pauses the upstream and
        C{paused} says so; resuming calls C{on_resume} first, then resumes
        the upstream.
        """
        producer = self.transport.producer
        assert producer is not None
        self.assertFalse(self.downstream.paused)
        producer.pauseProducing()
        self.assertTrue(self.downstream.paused)
        self.assertEqual(self.upstream.calls, ["pause"])
        producer.resumeProducing()
        self.assertFalse(self.downstream.paused)
        self.assertEqual(self.upstream.calls, ["pause", "on_resume", "resume"])

    def test_stop(self) -> None:
        """
        The channel stopping its producer stops the upstream.
        """
        producer = self.transport.producer
        assert producer is not None
        producer.stopProducing()
        self.assertEqual(self.upstream.calls, ["stop"])

    def test_unpace(self) -> None:
        """
        After C{unpace} the client's connection no longer reaches the
        upstream, and C{paused} is false.
        """
        producer = self.transport.producer
        assert producer is not None
        producer.pauseProducing()
        self.downstream.unpace()
        self.assertFalse(self.downstream.paused)
        producer.resumeProducing()
        producer.pauseProducing()
        self.assertEqual(self.upstream.calls, ["pause"])

    def test_unregistered_at_finish(self) -> None:
        """
        Finishing the response unregisters the upstream.
        """
        producer = self.transport.producer
        assert producer is not None
        self.downstream.send(b"a")
        self.downstream.finish()
        self.assertTrue(self.response().complete)
        producer.pauseProducing()
        self.assertEqual(self.upstream.calls, [])
        self.assertFalse(self.downstream.paused)

    def test_unpace_after_client_left(self) -> None:
        """
        The upstream is let go of after the client left too.
        """
        self.channel.connectionLost(Failure(ConnectionDone("client left")))
        self.downstream.unpace()
        self.assertFalse(self.downstream.paused)

    def test_not_paced(self) -> None:
        """
        Without C{pace} nothing is paused.
        """
        other = Downstream(self.request, ExchangeContext("chat", None, 0.0), self.clock)
        self.assertFalse(other.paused)
        other.unpace()
        producer = self.transport.producer
        assert producer is not None
        producer.pauseProducing()
        self.assertEqual(self.upstream.calls, ["pause"])
        self.assertFalse(other.paused)


class WhenFinishedTests(DownstreamCase):
    """
    L{Downstream.when_finished}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.finished: list[object] = []
        self.lost: list[Failure] = []
        self.downstream.when_finished(self.finished.append, self.lost.append)

    def test_finished(self) -> None:
        """
        C{finished} is called once the response was written whole.
        """
        self.downstream.send(b"a")
        self.assertEqual(self.finished, [])
        self.downstream.finish()
        self.assertEqual(len(self.finished), 1)
        self.assertEqual(self.lost, [])

    def test_lost(self) -> None:
        """
        C{lost} is called when the client's connection closed before.
        """
        self.downstream.send(b"a")
        self.channel.connectionLost(Failure(ConnectionDone("client left")))
        self.assertEqual(self.finished, [])
        self.assertEqual(len(self.lost), 1)
        self.assertTrue(self.lost[0].check(ConnectionDone))
