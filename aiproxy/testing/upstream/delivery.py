# -*- test-case-name: tests.test_mock_upstream -*-
"""
Sending a planned answer: pacing its head, body and stream writes, cutting it
short when asked, and pausing or stopping with the client's connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from http.client import responses
from itertools import islice

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from aiproxy.testing.upstream.bookkeeping import MockStats
from aiproxy.testing.upstream.controls import MockControls
from aiproxy.testing.upstream.replies import _EventStream, _Reply

__all__: list[str] = []

_log = Logger()


@implementer(IPushProducer)
class _Delivery:
    """
    Sends one L{_Reply} with the timing its controls ask for, as the
    producer of a stream so that a client that stops reading pauses it, and
    stops every timer when the client leaves.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        stats: MockStats,
        reply: _Reply,
        controls: MockControls,
    ) -> None:
        """
        @param request: The request to answer.
        @param clock: Schedules the delays.
        @param stats: Counts streams, events and aborts.
        @param reply: The answer.
        @param controls: The timing and write controls.
        """
        self._request = request
        self._clock = clock
        self._stats = stats
        self._reply = reply
        self._controls = controls
        stream = reply.body if isinstance(reply.body, _EventStream) else None
        self._streaming = stream is not None
        self._comments = list(stream.comments) if stream is not None else []
        self._events: Iterator[bytes] = stream.events if stream is not None else iter(())
        self._lookahead: list[bytes] = []
        self._call: IDelayedCall | None = None
        self._paused = False
        self._done = False

    def start(self) -> None:
        """
        Begin answering.
        """
        self._request.notifyFinish().addErrback(self._connection_lost)
        if self._streaming:
            self._stats.stream_started(self)
        self._after(self._controls.first_delay_ms, self._send_head)

    # IPushProducer

    def pauseProducing(self) -> None:
        """
        The client's connection is full: write nothing until resumed.
        """
        self._paused = True

    def resumeProducing(self) -> None:
        """
        The client's connection drained: carry on writing.
        """
        self._paused = False
        if self._call is None and not self._done:
            self._schedule(0, self._pump)

    def stopProducing(self) -> None:
        """
        The connection is going away.
        """
        self._abandon()

    # Steps

    def _after(self, delay_ms: int, step: Callable[[], None]) -> None:
        """
        @param delay_ms: Milliseconds to wait; 0 runs C{step} now.
        @param step: What to do then.
        """
        if delay_ms:
            self._schedule(delay_ms, step)
        else:
            step()

    def _schedule(self, delay_ms: int, step: Callable[[], None]) -> None:
        """
        @param delay_ms: Milliseconds to wait, at least one reactor turn.
        @param step: What to do then.
        """
        self._call = self._clock.callLater(delay_ms / 1000, self._run, step)

    def _run(self, step: Callable[[], None]) -> None:
        """
        @param step: A scheduled step, due now.
        """
        self._call = None
        step()

    def _send_head(self) -> None:
        """
        Send the status line and headers.
        """
        status = self._reply.status
        self._request.setResponseCode(status, responses.get(status, "Mock Status").encode("ascii"))
        for name, value in self._reply.headers.items():
            self._request.setHeader(name, value)
        self._request.write(b"")
        self._after(self._controls.body_delay_ms, self._send_body)

    def _send_body(self) -> None:
        """
        Send a whole body, or start the stream.
        """
        body = self._reply.body
        if not isinstance(body, bytes):
            self._request.registerProducer(self, True)
            self._pump()
            return
        self._done = True
        if self._reply.truncate:
            self._write(body[: len(body) // 2])
            self._drop()
        else:
            self._write(body)
            self._request.finish()

    def _pump(self) -> None:
        """
        Write the next step of the stream unless paused, and schedule the
        one after.
        """
        if self._paused:
            return
        self._step()
        if not self._done:
            self._schedule(self._controls.delay_ms, self._pump)

    def _step(self) -> None:
        """
        Write one comment or one burst of events; end the stream after the
        last.
        """
        if self._comments:
            self._write(self._comments.pop())
            return
        batch = self._take(self._controls.burst)
        self._write(b"".join(batch))
        self._stats.events_written(self, len(batch))
        if not self._lookahead:
            self._end()

    def _take(self, size: int) -> list[bytes]:
        """
        @param size: How many events to take.
        @return: Up to C{size} next events; one more stays in
            C{self._lookahead}, which is empty at the end of the stream.
        """
        wanted = size - len(self._lookahead)
        batch = self._lookahead + list(islice(self._events, wanted))
        self._lookahead = list(islice(self._events, 1))
        return batch

    def _write(self, data: bytes) -> None:
        """
        @param data: Bytes for one HTTP chunk, or two halves with
            C{split_events}.
        """
        if self._controls.split_events and len(data) > 1:
            middle = len(data) // 2
            self._request.write(data[:middle])
            self._request.write(data[middle:])
        else:
            self._request.write(data)

    def _end(self) -> None:
        """
        The stream's events are all written: finish it, or cut the
        connection when truncating.
        """
        self._done = True
        self._request.unregisterProducer()
        if self._reply.truncate:
            self._stats.stream_truncated(self)
            self._drop()
        else:
            self._stats.stream_finished(self)
            self._request.finish()

    def _drop(self) -> None:
        """
        Close the connection without ending the response. The bytes already
        written are flushed first, so the client sees all of them and then
        an incomplete body.
        """
        self._request.loseConnection()

    def _connection_lost(self, reason: Failure) -> None:
        """
        @param reason: Why the request's connection went away.
        """
        self._abandon()

    def _abandon(self) -> None:
        """
        The client left before the answer was complete: stop the timers and
        count the abort, once.
        """
        if self._done:
            return
        self._done = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._streaming:
            self._stats.stream_aborted(self)
        self._stats.requests_aborted += 1
        _log.debug("mock upstream: client left {path}", path=self._request.uri)
