# -*- test-case-name: tests.test_relay -*-
"""
The upstream's answer as the client gets it: which of its headers are
relayed, whether its body is a stream, and the relay that fits it (a
stream's decoder and protocol observer, its flush writer and stages).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime

from aiproxy.context import ExchangeContext
from aiproxy.convert.stage import ConversionStage
from aiproxy.exchange.buffered import BufferedRelay
from aiproxy.exchange.deadlines import Deadlines
from aiproxy.exchange.downstream import Downstream
from aiproxy.exchange.record import Timings
from aiproxy.exchange.relay import Basis, Outcome, StreamRelay, TimedStreamRelay
from aiproxy.filters import open_chain
from aiproxy.interfaces import IBodyFilterFactory, IConverter, IStreamStage
from aiproxy.stream.eventstream import EventStreamDecoder
from aiproxy.stream.observers import NULL_OBSERVER, observer_for
from aiproxy.stream.protocols import BEDROCK_CONVERSE, PASSTHROUGH
from aiproxy.stream.sse import SSEDecoder

__all__ = ["EVENTSTREAM", "SSE", "Relays", "relayed_head"]

#: Upstream response headers relayed to the client besides its content type.
_RELAYED_HEADERS = (b"x-request-id", b"request-id", b"retry-after", b"retry-after-ms")
_RELAYED_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-", b"ratelimit")

#: The two stream framings, by content type.
SSE = b"text/event-stream"
EVENTSTREAM = b"application/vnd.amazon.eventstream"

Headers = list[tuple[bytes, list[bytes]]]

#: The monitor was not asked yet whether it wants stream timings.
_UNASKED: Any = object()


def _over(outcome: Outcome) -> None:
    """
    How a relay of a request that is over ended: nothing to do.
    """


def _nothing() -> None:
    """
    A stream of a request that is over started: nothing to do.
    """


def relayed_head(response: Any, converted: bool) -> tuple[Headers, bytes | None]:
    """
    The headers of an upstream response that the client gets, and its
    stream framing (L{SSE} or L{EVENTSTREAM}; L{None} for a whole body:
    an error status, or any other content type).

    @param converted: the answer is converted to the client's protocol (a
        whole one is JSON, whatever the upstream's content type).
    """
    content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
    client_type = content_type
    if converted and not content_type.lower().startswith(SSE):
        client_type = b"application/json"
    headers = [(b"content-type", [client_type])] if client_type else []
    for name, values in response.headers.getAllRawHeaders():
        lower = name.lower()
        if lower in _RELAYED_HEADERS or lower.startswith(_RELAYED_PREFIXES):
            headers.append((name, values))
    lower_type = content_type.lower()
    framing = None
    if response.code < 300:
        framing = next((f for f in (SSE, EVENTSTREAM) if lower_type.startswith(f)), None)
    if framing is not None:
        headers += [(b"cache-control", [b"no-cache"]), (b"x-accel-buffering", [b"no"])]
    return headers, framing


class Relays:
    """
    Makes the relays of one exchange's attempts, over its downstream,
    deadlines and stream stages.
    """

    def __init__(
        self,
        context: ExchangeContext,
        clock: IReactorTime,
        conf: Mapping[str, Any],
        deadlines: Deadlines,
        downstream: Downstream,
        body_filters: Sequence[IBodyFilterFactory],
        stream_started: Callable[[], Callable[[float], None] | None],
        on_end: Callable[[Outcome], None],
    ) -> None:
        """
        @param stream_started: tells the monitor that a stream began (asked
            once, at the first stream): returns the function to call with
            each chunk gap, or L{None} when nobody wants them.
        @param on_end: told how each relay's body ended.
        """
        self._on_end = on_end
        self._context = context
        self._clock = clock
        self._conf = conf
        self._deadlines = deadlines
        self._downstream = downstream
        self._body_filters = body_filters
        self._stages: Sequence[IStreamStage] | None = None
        self._stream_started = stream_started
        self._observe_gap: Callable[[float], None] | None = _UNASKED

    def let_go(self) -> None:
        """
        The request is over: drop the callbacks into it.
        """
        self._on_end = _over
        self._stream_started = _nothing

    def stages(self) -> Sequence[IStreamStage]:
        """
        The body filter stages of the response that reaches the client: its
        filter chain, opened once (an attempt given up before output fed
        them nothing).
        """
        stages = self._stages
        if stages is None:
            context = self._context
            chain = open_chain(self._body_filters, context)
            stages = self._stages = () if chain is None else (chain,)
            context.wants_text = chain is not None or bool(
                (self._conf.get("logging") or {}).get("payloads")
            )
        return stages

    def stream_stages(self, converter: IConverter | None) -> Sequence[IStreamStage]:
        """
        The stages of a stream: the body filters, then the conversion to
        the client's protocol when C{converter} is set.
        """
        stages = self.stages()
        if converter is None:
            return stages
        conversion = ConversionStage(converter, converter.stream(self._context), bool(stages))
        return (*stages, conversion)

    def _basis(self, stream: bool) -> Basis:
        """
        The basis of a relay (of a stream, or of a whole body).
        """
        return Basis(
            self._context,
            self._clock,
            self._deadlines,
            self._conf.get("max_response_bytes"),
            lambda transport: self._started(transport, stream),
            self._on_end,
        )

    def _started(self, transport: IPushProducer, stream: bool) -> None:
        """
        An upstream body transfer began: the client's connection now paces
        it, and reads are timed.
        """
        self._downstream.pace(transport, self._deadlines.touch)
        self._deadlines.arm_reads(stream)

    def stream(self, framing: bytes, timings: Timings) -> StreamRelay:
        """
        The relay of a stream in C{framing} (its stages not open yet),
        writing through a new flush writer; timed (into C{timings}) when the
        monitor wants the chunk gaps.
        """
        if self._observe_gap is _UNASKED:
            self._observe_gap = self._stream_started()
        observe_gap = self._observe_gap
        context = self._context
        conf = self._conf
        decoder: Any
        if framing == EVENTSTREAM:
            decoder = EventStreamDecoder()
            # Bedrock's frames are read beside; any other is relayed unread.
            bedrock = context.upstream_protocol == BEDROCK_CONVERSE
            observer: Any = observer_for(BEDROCK_CONVERSE) if bedrock else NULL_OBSERVER
            # Binary framing has no comments: every chunk is activity.
            idle_counts_all = True
        else:
            decoder = SSEDecoder()
            observer = observer_for(context.upstream_protocol or PASSTHROUGH)
            idle_counts_all = bool(conf.get("stream_idle_timeout_counts_comments"))
        args = (
            self._basis(True),
            decoder,
            observer,
            self._downstream.start_stream(conf["streaming_flush_interval_ms"]),
            idle_counts_all,
        )
        if observe_gap is None:
            return StreamRelay(*args)
        return TimedStreamRelay(*args, timings=timings, observe_gap=observe_gap)

    def buffered(
        self, status: int, length: object, converter: IConverter | None
    ) -> BufferedRelay | None:
        """
        The relay of a whole body answered with C{status} (converted to the
        client's protocol by C{converter}), or L{None} when its declared
        C{length} is over C{max_response_bytes}.
        """
        limit = self._conf.get("max_response_bytes")
        # A body without Content-Length has the length UNKNOWN_LENGTH, a str.
        if limit is not None and isinstance(length, int) and length > limit:
            return None
        return BufferedRelay(self._basis(False), status, self.stages, converter)
