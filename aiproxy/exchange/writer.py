# -*- test-case-name: tests.test_writer -*-
"""
The two flush modes of C{streaming_flush_interval_ms}.

On a Twisted transport "flushing" means handing bytes to
C{request.write()}: each call becomes one HTTP chunk, and a TCP client
connection (eager, L{aiproxy.tcp.send_eagerly}) sends what the upstream
read being handled wrote to it in one C{send()} once that read was
handled. There is no separate flush call, so the modes differ in how many
writes (HTTP chunks) a burst of upstream chunks becomes, and how many
C{send()} calls when the burst spans several reads:

  - C{0} (L{ImmediateWriter}): each upstream chunk is written at once, one
    write per chunk;
  - C{N > 0} (L{IntervalWriter}): chunks arriving within N ms of the last
    write are coalesced and a L{LoopingCall} writes them every N ms while
    something is pending. A chunk arriving after a quiet period is written
    at once, so the first token is never delayed, and the loop stops when
    a tick finds nothing pending, so an idle stream costs no wake-ups.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

__all__ = ["MAX_PENDING", "ImmediateWriter", "IntervalWriter", "make_writer"]

#: Pending bytes above which an interval writer writes without waiting.
MAX_PENDING = 64 * 1024


class ImmediateWriter:
    """
    Write every chunk at once.
    """

    __slots__ = ("write",)

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self.write = sink

    def flush(self) -> None:
        """
        Nothing is ever pending.
        """

    def stop(self) -> None:
        """
        Nothing to stop.
        """

    def discard(self) -> None:
        """
        Nothing is pending.
        """


class IntervalWriter:
    """
    Coalesce chunks and write them every C{interval} seconds.

    A chunk coming C{interval} or more after the previous write is written
    at once; one coming sooner is held, and a L{LoopingCall} writes what is
    held every C{interval} until a tick finds nothing. So a steady stream
    slower than the interval costs no timer at all, and a burst one write
    per interval.
    """

    __slots__ = ("_sink", "_clock", "_interval", "_pending", "_size", "_loop", "_written")

    def __init__(self, sink: Callable[[bytes], None], clock: IReactorTime, interval: float) -> None:
        self._sink = sink
        self._clock = clock
        self._interval = interval
        self._pending: list[bytes] = []
        self._size = 0
        #: The ticks while something may be pending (made when first needed,
        #: dropped when stopped: it and the writer refer to each other).
        self._loop: LoopingCall | None = None
        #: When the last write was made.
        self._written = -interval

    def write(self, data: bytes) -> None:
        """
        Write C{data} now if nothing was written within the interval, else
        hold it for the next tick.
        """
        loop = self._loop
        if loop is None or not loop.running:
            now = self._clock.seconds()
            if now - self._written >= self._interval:
                self._written = now
                self._sink(data)
                return
            if loop is None:
                loop = self._loop = LoopingCall(self._tick)
                loop.clock = self._clock
            loop.start(self._interval, now=False)
        self._pending.append(data)
        self._size += len(data)
        if self._size >= MAX_PENDING:
            self.flush()

    def _tick(self) -> None:
        """
        Write what is held; stop ticking when nothing is.
        """
        if self._pending:
            self._written = self._clock.seconds()
            self.flush()
        elif self._loop is not None:
            self._loop.stop()

    def flush(self) -> None:
        """
        Write everything pending as one chunk.
        """
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending = []
            self._size = 0
            self._sink(data)

    def stop(self) -> None:
        """
        Write what is pending and stop the loop (end of response).
        """
        self.flush()
        self.discard()

    def discard(self) -> None:
        """
        Drop what is pending and stop the loop (the client is gone).
        """
        self._pending = []
        self._size = 0
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()


def make_writer(
    sink: Callable[[bytes], None], clock: IReactorTime, interval_ms: int
) -> ImmediateWriter | IntervalWriter:
    """
    The writer for a route's C{streaming_flush_interval_ms}.
    """
    if interval_ms > 0:
        return IntervalWriter(sink, clock, interval_ms / 1000.0)
    return ImmediateWriter(sink)
