# -*- test-case-name: tests.test_relay -*-
"""
C{stream_commit_ms}: a stream held back until its first content.

While a stream of an C{ai-proxy-multi} route could still fall back to
another instance, nothing of it reaches the client until a content event
arrives (or C{stream_commit_ms} is over): a stream that fails before (an
in-band error event, or an end without content) can then be retried
elsewhere as if it had failed with a 502.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aiproxy.exchange.relay import RELAY_BUG, StreamRelay, TimedStreamRelay, clean_end
from aiproxy.interfaces import IRelay, IStreamStage
from aiproxy.stream.protocols import PASSTHROUGH, STREAM_CONTENT, STREAM_ERROR, stream_signal
from aiproxy.stream.sse import SSEDecoder

__all__ = ["HeldFailure", "HeldRelay"]

log = Logger()


@dataclass(frozen=True, slots=True)
class HeldFailure:
    """
    A held stream failed before its first content: an in-band error event
    (its C{error} data), or its end (C{ended}, a clean one).
    """

    error: bytes | None
    ended: Failure | None


@implementer(IRelay)
class HeldRelay(Protocol):
    """
    Holds a stream back for a L{StreamRelay}, then hands it over (how the
    stream ends is told by the stream relay).
    """

    def __init__(
        self,
        stream: StreamRelay,
        released: Callable[[], Sequence[IStreamStage]],
        failed: Callable[[HeldFailure], None],
    ) -> None:
        """
        @param released: called when the stream is released, before what
            was held is relayed: returns the stream stages to relay through.
        @param failed: told when the stream fails before its first content
            (the stream relay then tells nothing).
        """
        self._stream = stream
        self._released = released
        self._failed = failed
        self._held: list[bytes] | None = []
        self._size = 0
        self._decoder = SSEDecoder()
        self._body_over = False

    def connectionMade(self) -> None:
        self._stream.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        stream = self._stream
        if self._held is None:
            stream.dataReceived(data)
            return
        if stream.over:
            return
        try:
            if isinstance(stream, TimedStreamRelay):
                stream.note_arrival()
            self._size += len(data)
            events = stream.arrival(data, self._decoder, self._size)
            if events is None:
                return
            self._held.append(data)
            protocol = stream.context.upstream_protocol or PASSTHROUGH
            for event in events:
                signal = stream_signal(protocol, event)
                if signal == STREAM_CONTENT:
                    self.release()
                    return
                if signal == STREAM_ERROR:
                    self._failed(HeldFailure(event.data, None))
                    return
        except Exception:
            log.failure("holding a stream chunk failed")
            stream.end(RELAY_BUG)

    def release(self) -> None:
        """
        Stop holding: relay what was held, then the rest as it comes.
        """
        held = self._held
        stream = self._stream
        if held is None or stream.over:
            return
        self._held = None
        try:
            stream.open(self._released())
        except Exception:
            log.failure("starting the body filters failed")
            stream.end(RELAY_BUG)
            return
        for chunk in held:
            stream.relay_chunk(chunk)
            if stream.over:
                return
        if isinstance(stream, TimedStreamRelay):
            stream.note_output(0)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        stream = self._stream
        if self._held is not None and not stream.over and clean_end(reason):
            self._body_over = True
            self._failed(HeldFailure(None, reason))
            return
        stream.connectionLost(reason)

    def relay_end(self, reason: Failure) -> None:
        """
        Relay the end of a stream released after it ended.
        """
        self._stream.connectionLost(reason)

    def stop(self) -> None:
        """
        Stop the stream (its transfer, unless it already ended).
        """
        if self._body_over:
            self._stream.over = True
        else:
            self._stream.stop()

    @property
    def mid_event(self) -> bool:
        return self._stream.mid_event
