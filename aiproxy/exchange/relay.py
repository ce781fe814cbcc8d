# -*- test-case-name: tests.test_relay -*-
"""
Relays: each receives one upstream response body (it is the protocol given
to C{deliverBody}) and passes it on to the client, then says how it ended
(an outcome, to its basis' C{on_end}).

A L{StreamRelay} is a sequence of stages, one chunk at a time: the
decoder (SSE or AWS EventStream), the protocol observer (figures, text),
the stream stages (the body filter chain; a protocol converter is one more
stage), and the downstream's flush writer. L{TimedStreamRelay} is the same
relay timing each chunk for the metrics. The held and buffered relays live
in L{aiproxy.exchange.held} and L{aiproxy.exchange.buffered}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from zope.interface import implementer

from aiproxy.context import ExchangeContext
from aiproxy.convert.stage import ConversionStage
from aiproxy.exchange.deadlines import Deadlines
from aiproxy.filters import Terminate
from aiproxy.interfaces import IRelay, IStreamStage
from aiproxy.stream.protocols import (
    ANTHROPIC_MESSAGES,
    BEDROCK_CONVERSE,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
)
from aiproxy.stream.sse import SSEDecoder

__all__ = [
    "BODY_FAILED",
    "Basis",
    "COMPLETE",
    "RELAY_BUG",
    "Cut",
    "Failed",
    "Relay",
    "StreamRelay",
    "TimedStreamRelay",
    "clean_end",
    "failed_body",
    "finish_stages",
    "terminated",
]

log = Logger()

#: Protocols whose streams end with their own event: one that ends without
#: it was cut short, whatever the HTTP framing says.
_TERMINATED_PROTOCOLS = frozenset(
    {OPENAI_CHAT, ANTHROPIC_MESSAGES, OPENAI_RESPONSES, BEDROCK_CONVERSE}
)


@dataclass(frozen=True, slots=True)
class Failed:
    """
    Outcome: the upstream attempt failed; another instance may be tried.
    """

    reason: str
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class Cut:
    """
    Outcome: end the response early (no fallback).
    """

    reason: str
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class Complete:
    """
    Outcome: the body ended normally; C{body} is a whole response's
    (a stream's was relayed already).
    """

    body: bytes = b""


#: A stream relayed to its end.
COMPLETE = Complete()

#: A body that ended with an error rather than a clean end.
BODY_FAILED = Failed(
    "upstream_error", 502, "upstream closed the connection before the response was complete"
)

#: A relay's own failure (a body filter or observer raised).
RELAY_BUG = Cut("internal_error", 502, "internal error while relaying the response")

MAX_RESPONSE_BYTES = Cut("max_response_bytes", 502, "max_response_bytes exceeded")

#: How a relay's body ended.
Outcome = Complete | Failed | Cut | Terminate


def clean_end(reason: Failure) -> bool:
    """
    Whether an upstream body ended normally.
    """
    return isinstance(reason.value, (ResponseDone, PotentialDataLoss))


def failed_body(reason: Failure) -> bool:
    """
    Whether an upstream body ended with an error (not a clean end); logged.
    """
    if clean_end(reason):
        return False
    log.warn("upstream response body failed: {error}", error=reason.getErrorMessage())
    return True


def finish_stages(
    stages: Sequence[IStreamStage], context: ExchangeContext, tail: bytes = b""
) -> bytes | Terminate:
    """
    End C{stages} in order, after C{tail}: what each one still holds goes
    through the stages after it.

    @return: the last bytes for the client, or the C{Terminate} of a stage.
    """
    for index, stage in enumerate(stages):
        if tail:
            out = stage.filter_chunk(tail, context)
            if isinstance(out, Terminate):
                return terminated(stages, index, out, context)
            tail = out
        end = stage.finish(context)
        if isinstance(end, Terminate):
            return terminated(stages, index, end, context)
        tail += end
    return tail


def terminated(
    stages: Sequence[IStreamStage], index: int, result: Terminate, context: ExchangeContext
) -> Terminate:
    """
    The C{Terminate} stage C{index} returned, with its data passed through
    (and ending) the stages after it: a body filter's last bytes reach a
    converted stream's client in the client's protocol.
    """
    rest = stages[index + 1 :]
    if not rest:
        return result
    data = finish_stages(rest, context, result.data)
    return data if isinstance(data, Terminate) else replace(result, data=data)


@dataclass(slots=True)
class Basis:
    """
    What every relay of an exchange works with.

    @ivar limit: C{max_response_bytes}.
    @ivar on_start: told when the body starts (the client's connection
        paces it, reads are timed).
    @ivar on_end: told once how the body ended (an outcome), unless the
        relay was stopped first.
    """

    context: ExchangeContext
    clock: IReactorTime
    deadlines: Deadlines
    limit: int | None
    on_start: Callable[[IPushProducer], None]
    on_end: Callable[[Outcome], None]


@implementer(IRelay)
class Relay(Protocol):
    """
    What every relay shares: the start of the body (handed to its basis'
    C{on_start}), C{stop()}, the byte limit and telling how the body ended.
    """

    def __init__(self, basis: Basis) -> None:
        self.context = basis.context
        self.clock = basis.clock
        self.deadlines = basis.deadlines
        self.limit = basis.limit
        self._on_start = basis.on_start
        self._on_end = basis.on_end
        #: How the body ended was told.
        self.reported = False
        #: The body ended, or the relay was stopped: nothing more is done.
        self.over = False
        #: Body bytes received so far.
        self.received = 0

    def connectionMade(self) -> None:
        # deliverBody hands its protocol a producer (TransportProxyProducer),
        # not the ITransport that Twisted's Protocol declares.
        transport = cast(IPushProducer, self.transport)
        if self.over:
            transport.stopProducing()
            return
        self._on_start(transport)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.over:
            return
        self.over = True
        try:
            self.ended(reason)
        except Exception:
            log.failure("ending the response failed")
            self.end(RELAY_BUG)

    def ended(self, reason: Failure) -> None:
        """
        The body ended (normally or not): tell how.
        """
        raise NotImplementedError()

    def end(self, outcome: Outcome) -> None:
        """
        Say how the body ended (once); an early end stops the transfer.
        """
        if not self.over:
            self.stop()
        if not self.reported:
            self.reported = True
            self._on_end(outcome)

    def stop(self) -> None:
        """
        Stop reading the body (its connection is closed, never pooled) and
        ignore whatever else it does.
        """
        if self.over:
            return
        self.over = True
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    @property
    def mid_event(self) -> bool:
        """
        Whether what was relayed ends inside an event.
        """
        return False


class StreamRelay(Relay):
    """
    Relays a streamed body chunk by chunk: decode, observe, the stream
    stages, write.
    """

    def __init__(
        self,
        basis: Basis,
        decoder: Any,
        observer: Any,
        write: Callable[[bytes], None],
        idle_counts_all: bool,
    ) -> None:
        """
        @param decoder: an SSE or EventStream decoder (C{feed}, C{pending},
            C{close}).
        @param observer: the client protocol's observer.
        @param write: the downstream flush writer's C{write}.
        @param idle_counts_all: every chunk restarts
            C{stream_idle_timeout_ms}, comments included.
        """
        super().__init__(basis)
        self.decoder = decoder
        self._observer = observer
        self._write = write
        self._idle_counts_all = idle_counts_all
        self._stages: Sequence[IStreamStage] = ()
        self._conversion: ConversionStage | None = None
        #: No event has come yet (the first one stops the first-token wait).
        self._awaiting = True

    def open(self, stages: Sequence[IStreamStage]) -> None:
        """
        Relay through C{stages}, in order, between the observer and the
        writer.
        """
        self._stages = stages
        if stages and isinstance(stages[-1], ConversionStage):
            self._conversion = stages[-1]

    def arrival(self, data: bytes, decoder: Any, size: int) -> list[Any] | None:
        """
        What every upstream chunk of a stream gets, held or relayed: its
        time (TTFT, the end of keep-alive comments), the byte limit and
        C{stream_idle_timeout_ms} activity.

        @param size: the stream's bytes so far, this chunk included.
        @return: the chunk's decoded events, or L{None} when the byte limit
            ended the response.
        """
        context = self.context
        deadlines = self.deadlines
        now = deadlines.last_chunk = self.clock.seconds()
        if context.ttft_ms is None:
            context.ttft_ms = int((now - context.started) * 1000)
            # The upstream's own bytes reach the client from now on: a
            # comment of ours could land inside one of its events.
            deadlines.cancel("keepalive")
        limit = self.limit
        if limit is not None and size > limit:
            self.end(MAX_RESPONSE_BYTES)
            return None
        carried = decoder.pending
        events: list[Any] = decoder.feed(data)
        # A chunk that only held comments (or blank lines) is not activity
        # for stream_idle_timeout_ms; one that completes, continues or
        # starts an event is.
        if events or carried or decoder.pending or self._idle_counts_all:
            deadlines.last_data = now
        if events and self._awaiting:
            self._awaiting = False
            deadlines.cancel("first_token")
            deadlines.cancel("keepalive")
        return events

    def dataReceived(self, data: bytes) -> None:
        if self.over:
            return
        try:
            context = self.context
            self.received += len(data)
            events = self.arrival(data, self.decoder, self.received)
            if events is None:
                return
            if events:
                self._observer.observe_events(events, context)
            if self._stages:
                context.events = events
                for stage in self._stages:
                    out = stage.filter_chunk(data, context)
                    if out.__class__ is not bytes:
                        stages = self._stages
                        self.end(terminated(stages, stages.index(stage), out, context))
                        return
                    data = out
            if data:
                self._write(data)
        except Exception:
            log.failure("relaying a stream chunk failed")
            self.end(RELAY_BUG)

    #: The relay of one chunk, untimed (L{TimedStreamRelay} times around it).
    relay_chunk = dataReceived

    def ended(self, reason: Failure) -> None:
        context = self.context
        if failed_body(reason):
            self.end(BODY_FAILED)
        elif self.received == 0:
            # Also after keep-alive comments: never a clean end without content.
            self.end(Failed("upstream_error", 502, "upstream returned an empty stream"))
        elif not context.done and context.upstream_protocol in _TERMINATED_PROTOCOLS:
            conversion = self._conversion
            if conversion is not None and not conversion.produced:
                # The upstream spoke another format than the converter reads.
                self.end(conversion.no_output())
                return
            self.end(
                Failed(
                    "upstream_incomplete",
                    502,
                    "upstream ended the stream without its end-of-stream event",
                )
            )
        else:
            self.decoder.close()
            if self._stages:
                context.events = []
                tail = finish_stages(self._stages, context)
                if isinstance(tail, Terminate):
                    self.end(tail)
                    return
                if tail:
                    self._write(tail)
            self.end(COMPLETE)

    @property
    def mid_event(self) -> bool:
        decoder = self.decoder
        return isinstance(decoder, SSEDecoder) and bool(decoder.pending)


class TimedStreamRelay(StreamRelay):
    """
    A L{StreamRelay} that times its chunks for the metrics: the gap since
    the previous one, the first one's arrival, and the first body bytes
    sent to the client (into C{timings}).
    """

    def __init__(self, *args: Any, timings: Any, observe_gap: Callable[[float], None]) -> None:
        super().__init__(*args)
        self.timings = timings
        self._observe_gap = observe_gap

    def note_arrival(self) -> None:
        """
        Time a chunk's arrival: the first one's, else the gap since the
        previous one (before C{last_chunk} moves on).
        """
        now = self.clock.seconds()
        timings = self.timings
        if timings.first_chunk is None:
            timings.first_chunk = now
        else:
            self._observe_gap(now - self.deadlines.last_chunk)

    def note_output(self, sent: int) -> None:
        """
        Time the first body bytes sent, if the client got more than C{sent}.
        """
        if self.timings.first_output is None and self.context.bytes_out > sent:
            self.timings.first_output = self.clock.seconds()

    def dataReceived(self, data: bytes) -> None:
        if self.over:
            return
        self.note_arrival()
        sent = self.context.bytes_out
        self.relay_chunk(data)
        self.note_output(sent)
