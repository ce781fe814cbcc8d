# -*- test-case-name: tests.test_downstream -*-
"""
The client's side of one request: the only code that touches its
L{twisted.web.server.Request}.

A L{Downstream} commits the status and headers with the first byte, writes
a stream through the flush writer of C{streaming_flush_interval_ms},
answers whole bodies with their length, ends cleanly or cuts the response
with an honest ending (the connection closed without the terminating
chunk), and lets a full client socket pause the upstream read (the pacer
registered as the request's producer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.web.server import Request
from zope.interface import implementer

from aiproxy.context import ExchangeContext
from aiproxy.exchange.writer import ImmediateWriter, IntervalWriter, make_writer
from aiproxy.interfaces import IDownstream
from aiproxy.tcp import batch, send_eagerly

__all__ = ["CLOSE_GRACE_S", "Downstream"]

#: How long a client connection closed after a cut response may take to
#: receive what was written to it before the channel times it out (and
#: aborts it, its abortTimeout later).
CLOSE_GRACE_S = 15.0

#: Headers of a response whose first bytes are keep-alive comments.
_KEEPALIVE_HEADERS = (
    (b"content-type", [b"text/event-stream"]),
    (b"cache-control", [b"no-cache"]),
    (b"x-accel-buffering", [b"no"]),
)

Headers = Sequence[tuple[bytes, list[bytes]]]


@implementer(IPushProducer)
class _Pacer:
    """
    The upstream body transport as the producer of the client's connection:
    a full client socket pauses the upstream read.
    """

    __slots__ = ("_transport", "_on_resume", "paused")

    def __init__(self, transport: IPushProducer, on_resume: Callable[[], None]) -> None:
        self._transport = transport
        self._on_resume = on_resume
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self._on_resume()
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._transport.stopProducing()


def _chunked_transport(request: Request) -> Any:
    """
    The client's transport when the response of C{request}, whose head is
    written, is chunked (so neither to a C{HEAD} nor without a body) with
    nothing between its C{write} and the chunks (no encoder), else L{None}.
    """
    if (
        getattr(request, "chunked", False)
        and getattr(request, "_encoder", None) is None
        and not getattr(request, "_inFakeHead", False)
    ):
        return request.channel.transport
    return None


@implementer(IDownstream)
class Downstream:
    """
    Writes one response to the client.

    @ivar writer: the flush writer of the stream being relayed (L{None}
        outside a stream).
    """

    def __init__(self, request: Request, context: ExchangeContext, clock: IReactorTime) -> None:
        self._request = request
        self._context = context
        self._clock = clock
        self._status = 200
        self._headers: Headers = ()
        #: Headers every answer carries besides the prepared ones (the
        #: budgets' quota headers, a refusal's challenge).
        self.extra_headers: Headers = ()
        self._pacer: _Pacer | None = None
        self.writer: ImmediateWriter | IntervalWriter | None = None
        #: The client's transport once the response is a plain chunked one
        #: (L{send} frames the chunks itself), else L{None}.
        self._chunks_to: Any = None
        channel = getattr(request, "channel", None)
        if channel is not None:
            # The first token goes out in the turn it arrives in.
            send_eagerly(channel.transport)

    # -- the head ---------------------------------------------------------

    def prepare(self, status: int, headers: Headers) -> None:
        """
        The status and headers to commit with the first byte.
        """
        self._status = status
        self._headers = headers

    @property
    def status(self) -> int:
        """
        The status committed, or to be committed.
        """
        return self._status

    def _commit(self) -> None:
        request = self._request
        request.setResponseCode(self._status)
        for name, values in self._headers:
            request.responseHeaders.setRawHeaders(name, values)
        for name, values in self.extra_headers:
            request.responseHeaders.setRawHeaders(name, values)
        # The request holds them now (a stream may last long).
        self._headers = self.extra_headers = ()
        self._context.status = self._status
        self._context.output_started = True

    # -- writing ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """
        One HTTP chunk, the head first if not sent (by C{request.write};
        later chunks are framed here, as it would).
        """
        context = self._context
        context.bytes_out += len(data)
        context.flushes += 1
        request = self._request
        transport = self._chunks_to
        if transport is not None and data and not request._disconnected and not request.finished:
            # What Request.write does for a chunked body, in one call.
            request.sentLength += len(data)
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            return
        if context.output_started:
            request.write(data)
            return
        self._commit()
        # The head and the first bytes in one packet.
        with batch():
            request.write(data)
        self._chunks_to = _chunked_transport(request)

    def start_stream(self, interval_ms: int) -> Callable[[bytes], None]:
        """
        Begin relaying a stream through the flush writer of C{interval_ms}.

        @return: the writer's C{write}, for the relay's hot path.
        """
        self.discard()
        writer = self.writer = make_writer(self.send, self._clock, interval_ms)
        return writer.write

    def discard(self) -> None:
        """
        Drop what the flush writer holds and stop it (the client is gone,
        or the attempt whose stream it relayed was given up).
        """
        if self.writer is not None:
            self.writer.discard()
            self.writer = None

    def _flush(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.stop()

    def keepalive(self) -> None:
        """
        Send one C{:} SSE comment, committing a 200 event stream first.
        """
        if not self._context.output_started:
            self.prepare(200, _KEEPALIVE_HEADERS)
        self.send(b":\n\n")

    # -- ending -------------------------------------------------------------

    def respond(self, body: bytes) -> None:
        """
        Answer whole: the prepared head and C{body} with its length (only
        before any output).
        """
        self._commit()
        self._request.setHeader(b"content-length", b"%d" % len(body))
        with batch():
            if body:
                self.send(body)
            self.finish()

    def finish(self, tail: bytes = b"") -> None:
        """
        End the response normally, after what the flush writer holds and
        C{tail}.
        """
        self._flush()
        if tail:
            self.send(tail)
        elif not self._context.output_started:
            self._commit()
        request = self._request
        if not request._disconnected:
            request.unregisterProducer()
            request.finish()

    def cut(self, tail: bytes) -> None:
        """
        End the response early after output: what the flush writer holds,
        then C{tail} (an error event), then the connection is dropped
        without the terminating chunk, so the client sees a truncated
        response.
        """
        self._flush()
        if tail:
            self.send(tail)
        request = self._request
        if not request._disconnected:
            request.unregisterProducer()
            channel = request.channel
            channel.loseConnection()
            # loseConnection waits until the client read everything written;
            # one that stopped reading would keep the connection and its
            # buffers for good, as the channel's idle timeout is off while a
            # request is unfinished: restart it, short. When it fires the
            # channel closes, then aborts after its abortTimeout (15 s).
            channel.setTimeout(CLOSE_GRACE_S)

    # -- pacing -------------------------------------------------------------

    def pace(self, transport: IPushProducer, on_resume: Callable[[], None]) -> None:
        """
        Let the client's connection pause and resume C{transport} (the
        upstream body); C{on_resume} is called before each resume.
        """
        self._pacer = _Pacer(transport, on_resume)
        self._request.registerProducer(self._pacer, True)

    def unpace(self) -> None:
        """
        The upstream body no longer follows the client's connection.
        """
        if self._pacer is not None:
            self._pacer = None
            if not self._request._disconnected:
                self._request.unregisterProducer()

    @property
    def paused(self) -> bool:
        """
        Whether the client's connection pauses the upstream read now.
        """
        return self._pacer is not None and self._pacer.paused

    def when_finished(self, finished: Callable[[Any], None], lost: Callable[[Any], None]) -> None:
        """
        Call C{finished} when the response was fully written, C{lost} when
        the client's connection closed before.
        """
        self._request.notifyFinish().addCallbacks(finished, lost)
