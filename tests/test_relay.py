# -*- test-case-name: tests.test_relay -*-
"""
Tests for the relays of L{aiproxy.exchange}: L{StreamRelay} and
L{TimedStreamRelay} (L{aiproxy.exchange.relay}), L{HeldRelay}
(L{aiproxy.exchange.held}) and L{BufferedRelay}
(L{aiproxy.exchange.buffered}), each fed an upstream body by hand
(the L{FakeResponse} of C{tests.test_proxy}) and writing to a recorded
C{write}; how the body ended is what the basis' C{on_end} is told.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aiproxy.context import ExchangeContext
from aiproxy.exchange.buffered import BufferedRelay
from aiproxy.exchange.deadlines import Deadlines
from aiproxy.exchange.held import HeldFailure, HeldRelay
from aiproxy.exchange.record import Timings
from aiproxy.exchange.relay import (
    BODY_FAILED,
    COMPLETE,
    MAX_RESPONSE_BYTES,
    RELAY_BUG,
    Basis,
    Complete,
    Cut,
    Failed,
    StreamRelay,
    TimedStreamRelay,
)
from aiproxy.filters import BodyFilterChain, Replace, Terminate
from aiproxy.interfaces import IRelay, IStreamStage
from aiproxy.stream.observers import observer_for
from aiproxy.stream.protocols import OPENAI_CHAT, PASSTHROUGH
from aiproxy.stream.sse import SSEDecoder
from tests.helpers import log_events
from tests.test_multi import IN_BAND_ERROR, ROLE
from tests.test_proxy import DONE, USAGE, FakeResponse, ScriptedFilter, delta, sse

#: A whole OpenAI chat completion.
COMPLETION = json.dumps(
    {
        "model": "gpt-test-0",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }
).encode()


@implementer(IStreamStage)
class Stage:
    """
    A stream stage: each chunk becomes what C{on_chunk} makes of it, the
    end what C{on_finish} returns; it records what it saw.
    """

    def __init__(
        self,
        on_chunk: Callable[[bytes], Any] = lambda chunk: chunk,
        on_finish: Callable[[], Any] = lambda: b"",
    ) -> None:
        self.on_chunk = on_chunk
        self.on_finish = on_finish
        self.chunks: list[bytes] = []
        self.events: list[list[bytes]] = []
        self.done: list[bool] = []
        self.finished = 0

    def filter_chunk(self, chunk: bytes, context: Any) -> Any:
        self.chunks.append(chunk)
        self.events.append([event.data for event in context.events])
        self.done.append(context.done)
        return self.on_chunk(chunk)

    def finish(self, context: Any) -> Any:
        self.finished += 1
        self.events.append([event.data for event in context.events])
        return self.on_finish()


def upper() -> Stage:
    """
    A stage passing every chunk on in capitals, and C{<end>} at the end.
    """
    return Stage(lambda chunk: chunk.upper(), lambda: b"<end>")


class RelayCase(SynchronousTestCase):
    """
    A request's context, deadlines and clock, and a record of what a relay
    wrote and started.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.context = ExchangeContext("chat", "a", 0.0)
        self.context.protocol = self.context.upstream_protocol = OPENAI_CHAT
        self.deadlines = Deadlines(
            self.clock,
            {"timeout": 60000},
            lambda: False,
            lambda *limit: None,
            lambda *limit: None,
        )
        self.written: list[bytes] = []
        self.started: list[Any] = []
        self.outcomes: list[Any] = []
        self.response = FakeResponse()

    def write(self, data: bytes) -> None:
        """
        The downstream's writer: records C{data}, counted as sent.
        """
        self.written.append(data)
        self.context.bytes_out += len(data)

    def basis(self, limit: int | None = None) -> Basis:
        """
        What a relay works with: the test's context, clock and deadlines,
        C{limit} as C{max_response_bytes}, and its start recorded.
        """
        return Basis(
            self.context,
            self.clock,
            self.deadlines,
            limit,
            self.started.append,
            self.outcomes.append,
        )

    def stream_args(self, limit: int | None = None, idle_counts_all: bool = False) -> tuple:
        """
        The arguments of a stream relay of the context's protocol, writing
        to L{write}.
        """
        protocol = self.context.upstream_protocol or PASSTHROUGH
        return (
            self.basis(limit),
            SSEDecoder(),
            observer_for(protocol),
            self.write,
            idle_counts_all,
        )

    def watch(self, relay: Any) -> Any:
        """
        Deliver the body to C{relay} (its outcome is recorded by the basis).
        """
        self.response.deliverBody(relay)
        return relay

    @property
    def transport(self) -> Any:
        return self.response.transport


class StreamRelayTests(RelayCase):
    """
    L{StreamRelay}: a stream, chunk by chunk.
    """

    def relay(
        self, stages: Sequence[IStreamStage] = (), limit: int | None = None, **kw: Any
    ) -> StreamRelay:
        relay = StreamRelay(*self.stream_args(limit, **kw))
        relay.open(stages)
        return self.watch(relay)

    def test_interface(self) -> None:
        """
        A stream relay provides L{IRelay}.
        """
        self.assertTrue(verifyObject(IRelay, StreamRelay(*self.stream_args())))

    def test_start(self) -> None:
        """
        The body's start hands its transport to C{on_start}, once.
        """
        self.relay()
        self.assertEqual(self.started, [self.transport])

    def test_complete(self) -> None:
        """
        Each upstream chunk is written as it is, at once; a stream ending
        cleanly after C{[DONE]} ends with L{COMPLETE}; the
        observer read its figures; the transport was not stopped.
        """
        relay = self.relay()
        chunks = [delta("Hel"), delta("lo") + USAGE[:10], USAGE[10:] + DONE]
        self.clock.advance(0.25)
        self.response.data(chunks[0])
        self.assertEqual(self.written, chunks[:1])
        self.response.data(*chunks[1:])
        self.assertEqual(self.written, chunks)
        self.assertEqual(self.outcomes, [])
        self.response.end()
        self.assertEqual(self.outcomes, [COMPLETE])
        self.assertIsInstance(self.outcomes[0], Complete)
        self.assertEqual(self.outcomes[0].body, b"")
        self.assertTrue(self.context.done)
        self.assertEqual(self.context.ttft_ms, 250)
        self.assertEqual(self.context.completion_tokens, 3)
        self.assertEqual(relay.received, sum(len(chunk) for chunk in chunks))
        self.assertTrue(relay.over)
        self.assertFalse(self.transport.stopped)

    def test_potential_data_loss(self) -> None:
        """
        A body without a length ending with the connection (potential data
        loss) after C{[DONE]} is a clean end.
        """
        self.relay()
        self.response.data(delta("a"), DONE)
        self.response.end(PotentialDataLoss())
        self.assertEqual(self.outcomes, [COMPLETE])

    def test_empty(self) -> None:
        """
        A stream ending without a byte failed: another instance may be
        tried.
        """
        self.relay()
        self.response.end()
        self.assertEqual(
            self.outcomes, [Failed("upstream_error", 502, "upstream returned an empty stream")]
        )
        self.assertEqual(self.written, [])

    def test_without_terminator(self) -> None:
        """
        A chat stream ending cleanly without C{[DONE]} was cut short.
        """
        self.relay()
        self.response.data(delta("a"))
        self.response.end()
        self.assertEqual(
            self.outcomes,
            [
                Failed(
                    "upstream_incomplete",
                    502,
                    "upstream ended the stream without its end-of-stream event",
                )
            ],
        )
        self.assertEqual(self.written, [delta("a")])

    def test_passthrough_without_terminator(self) -> None:
        """
        A passthrough stream has no terminator to wait for: its clean end
        is complete.
        """
        self.context.protocol = self.context.upstream_protocol = PASSTHROUGH
        self.relay()
        self.response.data(sse({"anything": 1}))
        self.response.end()
        self.assertEqual(self.outcomes, [COMPLETE])

    def test_body_failed(self) -> None:
        """
        A body ending with an error (even after C{[DONE]}) failed, with a
        warning.
        """
        events = log_events(self, "aiproxy.exchange.relay")
        for reason in (ConnectionLost(), ResponseFailed([Failure(ConnectionLost())])):
            self.outcomes.clear()
            self.response = FakeResponse()
            self.relay()
            self.response.data(delta("a"), DONE)
            self.response.end(reason)
            self.assertEqual(self.outcomes, [BODY_FAILED])
            self.assertIsInstance(self.outcomes[0], Failed)
        self.assertEqual(
            [event["log_format"] for event in events],
            ["upstream response body failed: {error}"] * 2,
        )

    def test_max_response_bytes(self) -> None:
        """
        The chunk that takes the body over C{max_response_bytes} is not
        written: the outcome is the L{Cut}, the transfer is stopped
        and nothing after is relayed.
        """
        relay = self.relay(limit=len(delta("a")) + 5)
        self.response.data(delta("a"))
        self.assertEqual(self.outcomes, [])
        self.response.data(delta("b"))
        self.assertEqual(self.outcomes, [MAX_RESPONSE_BYTES])
        self.assertIsInstance(self.outcomes[0], Cut)
        self.assertEqual(self.outcomes[0].reason, "max_response_bytes")
        self.assertEqual(self.written, [delta("a")])
        self.assertEqual(self.transport.calls, ["stop"])
        self.response.data(delta("c"))
        self.response.end()
        self.assertEqual(self.written, [delta("a")])
        self.assertEqual(self.outcomes, [MAX_RESPONSE_BYTES])
        self.assertTrue(relay.over)

    def test_at_limit(self) -> None:
        """
        A body of exactly C{max_response_bytes} is relayed whole.
        """
        body = [delta("a"), DONE]
        self.relay(limit=len(b"".join(body)))
        self.response.data(*body)
        self.response.end()
        self.assertEqual(self.outcomes, [COMPLETE])
        self.assertEqual(self.written, body)

    def test_replacing_stage(self) -> None:
        """
        A stage sees each chunk with its decoded events and replaces it;
        its end (with no events) writes its last bytes before the
        outcome.
        """
        stage = upper()
        self.relay([stage])
        self.response.data(delta("a"), b"data: [DO", b"NE]\n\n")
        self.response.end()
        self.assertEqual(
            self.written,
            [delta("a").upper(), b"DATA: [DO", b"NE]\n\n", b"<end>"],
        )
        self.assertEqual(stage.chunks, [delta("a"), b"data: [DO", b"NE]\n\n"])
        self.assertEqual(stage.events, [[delta("a")[6:-2]], [], [b"[DONE]"], []])
        self.assertEqual(stage.finished, 1)
        self.assertEqual(self.outcomes, [COMPLETE])

    def test_stage_holds_back(self) -> None:
        """
        A stage returning no bytes holds the chunk back: nothing is written.
        """
        self.relay([Stage(lambda chunk: b"")])
        self.response.data(delta("a"), DONE)
        self.response.end()
        self.assertEqual(self.written, [])
        self.assertEqual(self.outcomes, [COMPLETE])

    def test_stages_in_order(self) -> None:
        """
        Each stage gets what the one before it passed on.
        """
        second = Stage(lambda chunk: chunk + b"|2")
        self.relay([Stage(lambda chunk: chunk + b"|1"), second])
        self.response.data(b"x")
        self.assertEqual(second.chunks, [b"x|1"])
        self.assertEqual(self.written, [b"x|1|2"])

    def test_terminating_stage(self) -> None:
        """
        A stage's L{Terminate} ends the relay: the outcome is it, the
        transfer is stopped, the chunk is not written.
        """
        stop = Terminate(b"bye", reason="blocked")
        self.relay([Stage(lambda chunk: stop if b"bad" in chunk else chunk)])
        self.response.data(delta("good"), delta("bad"), delta("more"))
        self.assertEqual(self.outcomes, [stop])
        self.assertEqual(self.written, [delta("good")])
        self.assertTrue(self.transport.stopped)

    def test_terminating_at_finish(self) -> None:
        """
        A stage ending the stream with a L{Terminate} makes it the outcome.
        """
        stop = Terminate(b"", reason="late")
        self.relay([Stage(on_finish=lambda: stop)])
        self.response.data(delta("a"), DONE)
        self.response.end()
        self.assertEqual(self.outcomes, [stop])

    def test_body_filter_chain(self) -> None:
        """
        The body filter chain is a stream stage: its filters replace the
        chunks and see the stream's end.
        """
        body_filter = ScriptedFilter(lambda chunk, context: Replace(chunk.replace(b"Hi", b"Yo")))
        chain = BodyFilterChain([body_filter])
        self.assertTrue(verifyObject(IStreamStage, chain))
        self.relay([chain])
        self.response.data(delta("Hi"), DONE)
        self.response.end()
        self.assertEqual(self.written, [delta("Yo"), DONE])
        self.assertEqual(len(body_filter.finished), 1)
        self.assertTrue(body_filter.finished[0]["done"])
        self.assertEqual(self.outcomes, [COMPLETE])

    def test_stage_raises(self) -> None:
        """
        A stage raising ends the relay with L{RELAY_BUG}, logged, and
        stops the transfer.
        """

        def broken(chunk: bytes) -> bytes:
            raise ValueError("broken stage")

        self.relay([Stage(broken)])
        self.response.data(delta("a"))
        self.assertEqual(self.outcomes, [RELAY_BUG])
        self.assertTrue(self.transport.stopped)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_finish_raises(self) -> None:
        """
        A stage raising at the end ends the relay with L{RELAY_BUG} too.
        """

        def broken() -> bytes:
            raise ValueError("broken end")

        self.relay([Stage(on_finish=broken)])
        self.response.data(DONE)
        self.response.end()
        self.assertEqual(self.outcomes, [RELAY_BUG])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_stop(self) -> None:
        """
        C{stop()} stops the transfer once; nothing is relayed after and
        no outcome is told.
        """
        relay = self.relay()
        self.response.data(delta("a"))
        relay.stop()
        relay.stop()
        self.assertEqual(self.transport.calls, ["stop"])
        self.response.data(delta("b"), DONE)
        self.response.end()
        self.assertEqual(self.written, [delta("a")])
        self.assertEqual(self.outcomes, [])
        self.assertEqual(self.outcomes, [])

    def test_stop_before_start(self) -> None:
        """
        A relay stopped before its body started stops the transfer as
        soon as it starts, without handing it to C{on_start}.
        """
        relay = StreamRelay(*self.stream_args())
        relay.stop()
        self.watch(relay)
        self.assertEqual(self.transport.calls, ["stop"])
        self.assertEqual(self.started, [])

    def test_activity(self) -> None:
        """
        The first chunk stops the keep-alive comments and counts as a
        read; a comment is no data; the first event stops the first-token
        wait and is data.
        """
        deadlines = self.deadlines
        deadlines.arm("first_token", 10, lambda: None)
        deadlines.arm("keepalive", 10, lambda: None)
        self.relay()
        self.clock.advance(1)
        self.response.data(b": ping\n\n")
        self.assertFalse(deadlines.active("keepalive"))
        self.assertTrue(deadlines.active("first_token"))
        self.assertEqual((deadlines.last_chunk, deadlines.last_data), (1.0, 0.0))
        self.assertEqual(self.context.ttft_ms, 1000)
        self.clock.advance(1)
        self.response.data(delta("a"))
        self.assertFalse(deadlines.active("first_token"))
        self.assertEqual((deadlines.last_chunk, deadlines.last_data), (2.0, 2.0))
        self.assertEqual(self.context.ttft_ms, 1000)

    def test_comments_counted(self) -> None:
        """
        When every chunk counts (C{idle_counts_all}) a comment is data too.
        """
        self.relay(idle_counts_all=True)
        self.clock.advance(1)
        self.response.data(b": ping\n\n")
        self.assertEqual(self.deadlines.last_data, 1.0)

    def test_mid_event(self) -> None:
        """
        C{mid_event} says whether what was relayed ends inside an event.
        """
        relay = self.relay()
        self.assertFalse(relay.mid_event)
        self.response.data(b'data: {"a"')
        self.assertTrue(relay.mid_event)
        self.response.data(b":1}\n\n")
        self.assertFalse(relay.mid_event)


class TimedStreamRelayTests(RelayCase):
    """
    L{TimedStreamRelay}: a stream relay timing its chunks.
    """

    def setUp(self) -> None:
        super().setUp()
        self.timings = Timings(0.0)
        self.gaps: list[float] = []

    def relay(self, stages: Sequence[IStreamStage] = ()) -> TimedStreamRelay:
        relay = TimedStreamRelay(
            *self.stream_args(), timings=self.timings, observe_gap=self.gaps.append
        )
        relay.open(stages)
        return self.watch(relay)

    def test_interface(self) -> None:
        """
        A timed stream relay provides L{IRelay}.
        """
        self.assertTrue(verifyObject(IRelay, self.relay()))

    def test_timings(self) -> None:
        """
        The first chunk's arrival and first output are timed; each later
        chunk's gap since the one before is observed.
        """
        self.relay()
        self.clock.advance(1)
        self.response.data(delta("a"))
        self.assertEqual((self.timings.first_chunk, self.timings.first_output), (1.0, 1.0))
        self.assertEqual(self.gaps, [])
        self.clock.advance(0.5)
        self.response.data(delta("b"))
        self.clock.advance(0.25)
        self.response.data(DONE)
        self.assertEqual(self.gaps, [0.5, 0.25])
        self.assertEqual((self.timings.first_chunk, self.timings.first_output), (1.0, 1.0))
        self.response.end()
        self.assertEqual(self.outcomes, [COMPLETE])

    def test_first_output_when_written(self) -> None:
        """
        A chunk a stage held back is not output: the first output is the
        first chunk that reached the client.
        """
        self.relay([Stage(lambda chunk: b"" if b"role" in chunk else chunk)])
        self.clock.advance(1)
        self.response.data(ROLE)
        self.assertEqual(self.timings.first_chunk, 1.0)
        self.assertIsNone(self.timings.first_output)
        self.clock.advance(1)
        self.response.data(delta("a"))
        self.assertEqual(self.timings.first_output, 2.0)

    def test_not_after_stop(self) -> None:
        """
        A stopped relay times nothing more.
        """
        relay = self.relay()
        self.response.data(delta("a"))
        relay.stop()
        self.clock.advance(1)
        self.response.data(delta("b"))
        self.assertEqual(self.gaps, [])


class HeldRelayTests(RelayCase):
    """
    L{HeldRelay}: a stream held back until its first content.
    """

    def setUp(self) -> None:
        super().setUp()
        self.stages: Sequence[IStreamStage] = ()
        self.releases = 0
        self.failures: list[HeldFailure] = []

    def released(self) -> Sequence[IStreamStage]:
        self.releases += 1
        return self.stages

    def held(self, limit: int | None = None, stream: StreamRelay | None = None) -> HeldRelay:
        if stream is None:
            stream = StreamRelay(*self.stream_args(limit))
        held = HeldRelay(stream, self.released, self.failures.append)
        return self.watch(held)

    def test_interface(self) -> None:
        """
        A held relay provides L{IRelay}; its start is the stream's.
        """
        stream = StreamRelay(*self.stream_args())
        held = self.held(stream=stream)
        self.assertTrue(verifyObject(IRelay, held))
        self.assertEqual(self.started, [self.transport])

    def test_holds_until_content(self) -> None:
        """
        Chunks before content are held (their arrival is timed); the first
        content releases them in order, then the stream goes on.
        """
        self.held()
        self.clock.advance(0.5)
        self.response.data(ROLE)
        self.assertEqual(self.written, [])
        self.assertEqual(self.releases, 0)
        self.assertEqual(self.context.ttft_ms, 500)
        self.response.data(delta("Hi"))
        self.assertEqual(self.releases, 1)
        self.assertEqual(self.written, [ROLE, delta("Hi")])
        self.response.data(USAGE, DONE)
        self.response.end()
        self.assertEqual(self.written, [ROLE, delta("Hi"), USAGE, DONE])
        self.assertEqual(self.outcomes, [COMPLETE])
        self.assertEqual(self.failures, [])
        self.assertEqual(self.context.completion_tokens, 3)

    def test_released_through_stages(self) -> None:
        """
        What was held goes through the stages the release returns.
        """
        self.stages = [upper()]
        self.held()
        self.response.data(ROLE, delta("a"))
        self.assertEqual(self.written, [ROLE.upper(), delta("a").upper()])

    def test_release_fails(self) -> None:
        """
        A release whose stages cannot be opened ends the relay with
        L{RELAY_BUG}, logged; nothing held is relayed.
        """
        held = self.held()

        def broken() -> Sequence[IStreamStage]:
            raise ValueError("no filters")

        held._released = broken  # type: ignore[method-assign]
        self.response.data(ROLE, delta("a"), delta("b"))
        self.assertEqual(self.outcomes, [RELAY_BUG])
        self.assertEqual(self.written, [])
        self.assertTrue(self.transport.stopped)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_in_band_error(self) -> None:
        """
        An error event before content fires C{failed} with its data;
        nothing was written, no outcome is told.
        """
        self.held()
        self.response.data(ROLE, IN_BAND_ERROR)
        self.assertEqual(self.failures, [HeldFailure(IN_BAND_ERROR[len(b"data: ") : -2], None)])
        self.assertEqual(self.written, [])
        self.assertEqual(self.releases, 0)
        self.assertEqual(self.outcomes, [])

    def test_end_before_content(self) -> None:
        """
        A clean end before content fires C{failed} with the end; stopping
        the relay then does not touch the finished transfer.
        """
        held = self.held()
        self.response.data(ROLE, DONE)
        self.response.end()
        [failure] = self.failures
        self.assertIsNone(failure.error)
        assert failure.ended is not None
        self.assertTrue(failure.ended.check(ResponseDone))
        self.assertEqual(self.written, [])
        self.assertEqual(self.outcomes, [])
        held.stop()
        self.assertFalse(self.transport.stopped)

    def test_relay_end(self) -> None:
        """
        A stream that ended before content and is relayed anyway (no
        fallback left): released, then its end relayed, as it came.
        """
        held = self.held()
        self.response.data(ROLE, DONE)
        self.response.end()
        [failure] = self.failures
        assert failure.ended is not None
        held.release()
        held.relay_end(failure.ended)
        self.assertEqual(self.written, [ROLE, DONE])
        self.assertEqual(self.outcomes, [COMPLETE])

    def test_empty_end(self) -> None:
        """
        A stream ending cleanly without a byte fails as held too.
        """
        self.held()
        self.response.end()
        self.assertEqual(len(self.failures), 1)
        self.assertEqual(self.outcomes, [])

    def test_error_end_before_content(self) -> None:
        """
        A body ending with an error before content is the stream's
        failure, not a held one.
        """
        self.held()
        self.response.data(ROLE)
        self.response.end(ConnectionLost())
        self.assertEqual(self.failures, [])
        self.assertEqual(self.outcomes, [BODY_FAILED])

    def test_limit_while_holding(self) -> None:
        """
        C{max_response_bytes} counts held bytes: over it, the stream is
        cut, nothing written.
        """
        self.held(limit=len(ROLE) + 5)
        self.response.data(ROLE, ROLE, delta("a"))
        self.assertEqual(self.outcomes, [MAX_RESPONSE_BYTES])
        self.assertEqual(self.written, [])
        self.assertTrue(self.transport.stopped)
        self.assertEqual(self.releases, 0)

    def test_release_on_time(self) -> None:
        """
        Released before content (C{stream_commit_ms} is over), what was
        held goes out, and later chunks (an error event too) are relayed
        as they come.
        """
        held = self.held()
        self.response.data(ROLE)
        held.release()
        self.assertEqual(self.written, [ROLE])
        self.response.data(IN_BAND_ERROR)
        self.assertEqual(self.written, [ROLE, IN_BAND_ERROR])
        self.assertEqual(self.failures, [])
        held.release()
        self.assertEqual(self.releases, 1)

    def test_stop_while_holding(self) -> None:
        """
        Stopping a held relay stops the transfer; nothing fires after.
        """
        held = self.held()
        self.response.data(ROLE)
        held.stop()
        self.assertEqual(self.transport.calls, ["stop"])
        self.response.data(delta("a"))
        self.response.end()
        self.assertEqual((self.written, self.outcomes, self.failures), ([], [], []))

    def test_timed(self) -> None:
        """
        A held timed stream times its first chunk when it arrives, and its
        first output when it is released.
        """
        timings = Timings(0.0)
        gaps: list[float] = []
        stream = TimedStreamRelay(*self.stream_args(), timings=timings, observe_gap=gaps.append)
        self.held(stream=stream)
        self.clock.advance(1)
        self.response.data(ROLE)
        self.assertEqual((timings.first_chunk, timings.first_output), (1.0, None))
        self.clock.advance(0.5)
        self.response.data(delta("a"))
        self.assertEqual((timings.first_chunk, timings.first_output), (1.0, 1.5))
        self.assertEqual(gaps, [0.5])

    def test_mid_event(self) -> None:
        """
        C{mid_event} is the stream's.
        """
        held = self.held()
        self.response.data(ROLE, b'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: {')
        self.assertTrue(held.mid_event)


class BufferedRelayTests(RelayCase):
    """
    L{BufferedRelay}: a whole body.
    """

    def setUp(self) -> None:
        super().setUp()
        self.stages: Sequence[IStreamStage] = ()
        self.opened = 0

    def open_stages(self) -> Sequence[IStreamStage]:
        self.opened += 1
        return self.stages

    def relay(self, status: int = 200, limit: int | None = None) -> BufferedRelay:
        relay = BufferedRelay(self.basis(limit), status, self.open_stages)
        return self.watch(relay)

    def test_interface(self) -> None:
        """
        A buffered relay provides L{IRelay} and never ends inside an event.
        """
        relay = self.relay()
        self.assertTrue(verifyObject(IRelay, relay))
        self.assertFalse(relay.mid_event)
        self.assertEqual(self.started, [self.transport])

    def test_collects(self) -> None:
        """
        The body is collected, then the outcome is all of it; it was
        observed (usage, model); its first byte is the time to first
        token.
        """
        self.relay()
        self.clock.advance(0.5)
        self.response.data(COMPLETION[:20], COMPLETION[20:])
        self.assertEqual(self.outcomes, [])
        self.response.end()
        self.assertEqual(self.outcomes, [Complete(COMPLETION)])
        self.assertEqual((self.context.prompt_tokens, self.context.completion_tokens), (7, 3))
        self.assertEqual(self.context.llm_model, "gpt-test-0")
        self.assertEqual(self.context.ttft_ms, 500)
        self.assertEqual(self.opened, 1)

    def test_first_byte(self) -> None:
        """
        The first byte stops the first-token wait and the keep-alive
        comments, and every chunk counts as a read.
        """
        self.deadlines.arm("first_token", 10, lambda: None)
        self.deadlines.arm("keepalive", 10, lambda: None)
        self.relay()
        self.clock.advance(2)
        self.response.data(b"{")
        self.assertFalse(self.deadlines.active("first_token"))
        self.assertFalse(self.deadlines.active("keepalive"))
        self.assertEqual(self.deadlines.last_chunk, 2.0)

    def test_filtered(self) -> None:
        """
        A successful body goes through the stages as one finished chunk.
        """
        stage = upper()
        self.stages = [stage]
        self.relay()
        self.response.data(COMPLETION)
        self.response.end()
        self.assertEqual(self.outcomes, [Complete(COMPLETION.upper() + b"<end>")])
        self.assertEqual(stage.chunks, [COMPLETION])
        self.assertEqual(stage.done, [True])

    def test_terminated(self) -> None:
        """
        A stage's L{Terminate} is the outcome.
        """
        stop = Terminate(b'{"blocked": true}', status=403)
        self.stages = [Stage(lambda chunk: stop)]
        self.relay()
        self.response.data(COMPLETION)
        self.response.end()
        self.assertEqual(self.outcomes, [stop])

    def test_terminated_at_finish(self) -> None:
        """
        A stage's L{Terminate} at the end is the outcome too.
        """
        stop = Terminate(b"late")
        self.stages = [Stage(on_finish=lambda: stop)]
        self.relay()
        self.response.data(COMPLETION)
        self.response.end()
        self.assertEqual(self.outcomes, [stop])

    def test_error_status(self) -> None:
        """
        An error body (400 and up) is neither observed nor filtered.
        """
        self.stages = [upper()]
        for status in (400, 503):
            self.outcomes.clear()
            self.response = FakeResponse()
            self.relay(status)
            self.response.data(COMPLETION)
            self.response.end()
            self.assertEqual(self.outcomes, [Complete(COMPLETION)])
        self.assertEqual(self.opened, 0)
        self.assertIsNone(self.context.prompt_tokens)

    def test_after_output(self) -> None:
        """
        When output already started (keep-alive comments), the body is cut
        with an error saying what the upstream said.
        """
        self.context.output_started = True
        self.relay(500)
        self.response.data(b'{"error": {"message": "boom"}}')
        self.response.end()
        self.assertEqual(
            self.outcomes, [Cut("upstream_error", 502, "upstream returned status 500: boom")]
        )
        self.assertEqual(self.opened, 0)

    def test_after_output_success(self) -> None:
        """
        A whole successful body after keep-alive comments is cut too: the
        client asked for a stream.
        """
        self.context.output_started = True
        self.relay(200)
        self.response.data(COMPLETION)
        self.response.end()
        self.assertEqual(
            self.outcomes,
            [
                Cut(
                    "upstream_error",
                    502,
                    "upstream returned a non-streamed response to a streamed request",
                )
            ],
        )

    def test_limit(self) -> None:
        """
        Over C{max_response_bytes} the body is cut and its transfer
        stopped.
        """
        self.relay(limit=10)
        self.response.data(b"x" * 6)
        self.assertEqual(self.outcomes, [])
        self.response.data(b"y" * 6)
        self.assertEqual(self.outcomes, [MAX_RESPONSE_BYTES])
        self.assertTrue(self.transport.stopped)
        self.response.end()
        self.assertEqual(self.outcomes, [MAX_RESPONSE_BYTES])

    def test_body_failed(self) -> None:
        """
        A body ending with an error failed.
        """
        self.relay()
        self.response.data(COMPLETION[:10])
        self.response.end(ResponseFailed([Failure(ConnectionLost())]))
        self.assertEqual(self.outcomes, [BODY_FAILED])

    def test_stop(self) -> None:
        """
        A stopped buffered relay stops the transfer and never fires.
        """
        relay = self.relay()
        self.response.data(COMPLETION[:10])
        relay.stop()
        self.response.data(COMPLETION[10:])
        self.response.end()
        self.assertEqual(self.outcomes, [])
        self.assertEqual(self.transport.calls, ["stop"])
