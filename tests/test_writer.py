# -*- test-case-name: tests.test_writer -*-
"""
Tests for L{aiproxy.exchange.writer}: the two flush modes of
C{streaming_flush_interval_ms}, driven by a L{Clock}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aiproxy.exchange.writer import MAX_PENDING, ImmediateWriter, IntervalWriter, make_writer


class ImmediateWriterTests(SynchronousTestCase):
    """
    C{streaming_flush_interval_ms: 0}: every chunk is written at once.
    """

    def test_each_chunk(self) -> None:
        """
        N chunks become N writes, in order, without any timer.
        """
        clock = Clock()
        writes: list[bytes] = []
        writer = make_writer(writes.append, clock, 0)
        self.assertIsInstance(writer, ImmediateWriter)
        for i in range(5):
            writer.write(b"chunk%d" % i)
            self.assertEqual(len(writes), i + 1)
        self.assertEqual(writes, [b"chunk0", b"chunk1", b"chunk2", b"chunk3", b"chunk4"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_nothing_pending(self) -> None:
        """
        C{flush}, C{stop} and C{discard} have nothing to do.
        """
        writes: list[bytes] = []
        writer = ImmediateWriter(writes.append)
        writer.write(b"a")
        writer.flush()
        writer.stop()
        writer.discard()
        self.assertEqual(writes, [b"a"])


class IntervalWriterTests(SynchronousTestCase):
    """
    C{streaming_flush_interval_ms > 0}: chunks are coalesced and written
    every interval while something is pending.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.writes: list[bytes] = []
        self.writer = make_writer(self.writes.append, self.clock, 10)

    def test_made(self) -> None:
        """
        A positive interval makes an L{IntervalWriter}.
        """
        self.assertIsInstance(self.writer, IntervalWriter)

    def test_first_chunk_at_once(self) -> None:
        """
        The first chunk is written at once: the first token is never delayed.
        """
        self.writer.write(b"first")
        self.assertEqual(self.writes, [b"first"])

    def test_burst_coalesced(self) -> None:
        """
        Chunks arriving within the interval after a write are held and
        written together at the tick an interval after the first of them,
        not before.
        """
        self.writer.write(b"a")
        for chunk in (b"b", b"c", b"d"):
            self.clock.advance(0.002)
            self.writer.write(chunk)
        self.assertEqual(self.writes, [b"a"])
        self.clock.advance(0.005)
        self.assertEqual(self.writes, [b"a"])
        self.clock.advance(0.001)
        self.assertEqual(self.writes, [b"a", b"bcd"])

    def test_slow_stream_no_timer(self) -> None:
        """
        Chunks an interval apart or more are each written at once, and no
        timer is ever set.
        """
        for index, gap in enumerate((0.0, 0.01, 0.02, 0.5)):
            self.clock.advance(gap)
            self.writer.write(b"%d" % index)
            self.assertEqual(len(self.writes), index + 1)
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_after_the_loop(self) -> None:
        """
        Once a tick found nothing, the next chunk is written at once, as the
        last write was an interval ago.
        """
        self.writer.write(b"a")
        self.writer.write(b"b")
        self.clock.advance(0.01)
        self.clock.advance(0.01)
        self.assertEqual(self.writes, [b"a", b"b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(0.001)
        self.writer.write(b"c")
        self.assertEqual(self.writes, [b"a", b"b", b"c"])

    def test_loop_stops_when_idle(self) -> None:
        """
        A tick that finds nothing pending stops the loop: no timer is left.
        """
        self.writer.write(b"a")
        self.writer.write(b"b")
        self.clock.advance(0.01)
        self.assertEqual(self.writes, [b"a", b"b"])
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(0.01)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.writes, [b"a", b"b"])

    def test_single_chunk_no_extra_tick(self) -> None:
        """
        One lone chunk is written at once; the first tick finds nothing and
        ends the loop.
        """
        self.writer.write(b"a")
        self.clock.advance(0.01)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.writes, [b"a"])

    def test_after_quiet_period(self) -> None:
        """
        A chunk arriving after the loop stopped is written at once again.
        """
        self.writer.write(b"a")
        self.clock.advance(1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.writer.write(b"b")
        self.assertEqual(self.writes, [b"a", b"b"])
        self.writer.write(b"c")
        self.assertEqual(self.writes, [b"a", b"b"])
        self.clock.advance(0.01)
        self.assertEqual(self.writes, [b"a", b"b", b"c"])

    def test_max_pending(self) -> None:
        """
        Pending bytes reaching C{MAX_PENDING} are written at once, without
        waiting for the tick.
        """
        self.writer.write(b"a")
        half = b"x" * (MAX_PENDING // 2)
        self.writer.write(half)
        self.assertEqual(self.writes, [b"a"])
        self.writer.write(half + b"y")
        self.assertEqual(self.writes, [b"a", half + half + b"y"])

    def test_stop_flushes(self) -> None:
        """
        C{stop} writes what is pending and leaves no timer.
        """
        self.writer.write(b"a")
        self.writer.write(b"b")
        self.writer.write(b"c")
        self.writer.stop()
        self.assertEqual(self.writes, [b"a", b"bc"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1)
        self.assertEqual(self.writes, [b"a", b"bc"])

    def test_discard(self) -> None:
        """
        C{discard} drops what is pending and leaves no timer.
        """
        self.writer.write(b"a")
        self.writer.write(b"b")
        self.writer.discard()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1)
        self.assertEqual(self.writes, [b"a"])

    def test_flush(self) -> None:
        """
        C{flush} writes what is pending as one chunk; with nothing pending
        it writes nothing.
        """
        self.writer.write(b"a")
        self.writer.flush()
        self.assertEqual(self.writes, [b"a"])
        self.writer.write(b"b")
        self.writer.write(b"c")
        self.writer.flush()
        self.assertEqual(self.writes, [b"a", b"bc"])

    @given(
        st.lists(
            st.tuples(
                st.binary(min_size=1, max_size=20), st.sampled_from([0, 0.001, 0.004, 0.01, 0.05])
            ),
            max_size=30,
        )
    )
    def test_bytes_in_order(self, chunks: list[tuple[bytes, float]]) -> None:
        """
        Whatever the timing, the writes hold exactly the chunks' bytes in
        order, no write is empty, and after C{stop} no timer is left.
        """
        clock = Clock()
        writes: list[bytes] = []
        writer = IntervalWriter(writes.append, clock, 0.01)
        for data, gap in chunks:
            clock.advance(gap)
            writer.write(data)
        writer.stop()
        self.assertEqual(b"".join(writes), b"".join(data for data, _ in chunks))
        self.assertNotIn(b"", writes)
        self.assertLessEqual(len(writes), len(chunks))
        self.assertEqual(clock.getDelayedCalls(), [])


class ModesTests(SynchronousTestCase):
    """
    The two modes are observably different.
    """

    def burst(self, interval_ms: int) -> list[bytes]:
        """
        The writes made for a burst of five chunks, one every 1 ms, then
        a quiet second.
        """
        clock = Clock()
        writes: list[bytes] = []
        writer = make_writer(writes.append, clock, interval_ms)
        for i in range(5):
            writer.write(b"%d" % i)
            clock.advance(0.001)
        clock.advance(1)
        writer.stop()
        return writes

    def test_burst(self) -> None:
        """
        A burst of 5 chunks is 5 writes at 0 ms, 2 writes at 10 ms (the
        first at once, the rest coalesced), with the same bytes.
        """
        self.assertEqual(self.burst(0), [b"0", b"1", b"2", b"3", b"4"])
        self.assertEqual(self.burst(10), [b"0", b"1234"])
