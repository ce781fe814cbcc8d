# -*- test-case-name: tests.test_writer -*-
"""
The two flush modes of C{streaming_flush_interval_ms}.

On a Twisted transport "flushing" means handing bytes to
C{request.write()}: each call becomes one HTTP chunk, and the transport
sends what it was given on the reactor's next write pass. There is no
separate flush call, so the modes differ in how many writes (HTTP chunks,
usually C{send()} calls) a burst of upstream chunks becomes:

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
    """

    __slots__ = ("_sink", "_interval", "_pending", "_size", "_loop")

    def __init__(self, sink: Callable[[bytes], None], clock: IReactorTime, interval: float) -> None:
        self._sink = sink
        self._interval = interval
        self._pending: list[bytes] = []
        self._size = 0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def write(self, data: bytes) -> None:
        """
        Write C{data} now if nothing was written within the interval, else
        queue it for the next tick.
        """
        if not self._loop.running:
            self._sink(data)
            self._loop.start(self._interval, now=False)
            return
        self._pending.append(data)
        self._size += len(data)
        if self._size >= MAX_PENDING:
            self.flush()

    def _tick(self) -> None:
        """
        Write what is pending; stop ticking when nothing is.
        """
        if self._pending:
            self.flush()
        else:
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
        if self._loop.running:
            self._loop.stop()


def make_writer(
    sink: Callable[[bytes], None], clock: IReactorTime, interval_ms: int
) -> ImmediateWriter | IntervalWriter:
    """
    The writer for a route's C{streaming_flush_interval_ms}.
    """
    if interval_ms > 0:
        return IntervalWriter(sink, clock, interval_ms / 1000.0)
    return ImmediateWriter(sink)
