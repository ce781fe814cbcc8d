# -*- test-case-name: tests.test_sse -*-
"""
Tests for L{aiproxy.stream.sse}.
"""

from __future__ import annotations

from itertools import pairwise, product

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from aiproxy.stream.sse import SSEDecoder, SSEEvent
from tests.helpers import feed_all, log_events


def naive_decode(stream: bytes) -> list[SSEEvent]:
    """
    Decode a whole stream the slow, obvious way, as the rules read.

    Scan byte by byte for the leftmost boundary, then parse each block line
    by line. The bytes after the last boundary are an incomplete event.

    @param stream: The whole stream.
    @return: The events.
    """
    events = []
    start = 0
    pos = 0
    while pos < len(stream):
        if stream[pos : pos + 2] == b"\n\n":
            size = 2
        elif stream[pos : pos + 4] == b"\r\n\r\n":
            size = 4
        else:
            pos += 1
            continue
        event = naive_parse(stream[start:pos])
        if event is not None:
            events.append(event)
        pos += size
        start = pos
    return events


def naive_parse(block: bytes) -> SSEEvent | None:
    """
    Parse one block of L{naive_decode}.

    @param block: The bytes between two boundaries.
    @return: The event, or L{None} for a block without a field.
    """
    fields = []
    for line in block.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.startswith(b":") or b":" not in line:
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        fields.append((name.lower(), value))
    if not fields:
        return None
    event = SSEEvent(b"\n".join(value for name, value in fields if name == b"data"))
    for name, value in fields:
        if name == b"event":
            event.event = value.decode("utf-8", "replace")
        elif name == b"id":
            event.id = value.decode("utf-8", "replace")
        elif name == b"retry" and value and all(48 <= byte <= 57 for byte in value):
            try:
                event.retry = int(value)
            except ValueError:
                pass
    return event


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    """
    Cut a stream at the given offsets.

    @param stream: The bytes.
    @param cuts: Offsets, in any order, each within the stream.
    @return: The chunks, some of them possibly empty.
    """
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in pairwise(bounds)]


_TOKENS = [
    b"\r",
    b"\n",
    b":",
    b" ",
    b"data",
    b"Data",
    b"event",
    b"id",
    b"retry",
    b"1",
    b"x",
    b"\xc3\xa9",
    b"\xff",
    b"\r\n",
    b"\n\n",
    b"\r\n\r\n",
    b"\n\r\n",
    b"data: ",
    b"data: x\n\n",
]

streams = st.lists(st.sampled_from(_TOKENS), max_size=60).map(b"".join)


@st.composite
def chunked(
    draw: st.DrawFn, stream_strategy: st.SearchStrategy[bytes] = streams
) -> tuple[bytes, list[bytes]]:
    """
    Draw a stream and a split of it into chunks.
    """
    stream = draw(stream_strategy)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    return stream, split_at(stream, cuts)


class SSEEventTests(SynchronousTestCase):
    """
    Tests for L{SSEEvent}.
    """

    def test_defaults(self) -> None:
        """
        An event built from data alone is a C{message} without id or retry.
        """
        event = SSEEvent(b"x")
        self.assertEqual(
            (event.data, event.event, event.id, event.retry), (b"x", "message", None, None)
        )

    def test_equality(self) -> None:
        """
        Events are equal when all four attributes are.
        """
        self.assertEqual(SSEEvent(b"x", "e", "1", 5), SSEEvent(b"x", "e", "1", 5))
        self.assertNotEqual(SSEEvent(b"x", "e", "1", 5), SSEEvent(b"x", "e", "1", 6))
        self.assertNotEqual(SSEEvent(b"x"), b"x")

    def test_repr(self) -> None:
        """
        The repr shows every attribute.
        """
        self.assertEqual(
            repr(SSEEvent(b"x", "e", "1", 5)), "SSEEvent(b'x', event='e', id='1', retry=5)"
        )


# (stream, expected events); the stream is fed whole, byte by byte, and in
# every two-chunk split.
_CASES: dict[str, tuple[bytes, list[SSEEvent]]] = {
    "lf": (b"data: a\n\ndata: b\n\n", [SSEEvent(b"a"), SSEEvent(b"b")]),
    "crlf": (b"data: a\r\n\r\ndata: b\r\n\r\n", [SSEEvent(b"a"), SSEEvent(b"b")]),
    "mixed line endings": (
        b"data: a\r\ndata: b\n\ndata: c\n\r\n\r\n",
        [SSEEvent(b"a\nb"), SSEEvent(b"c")],
    ),
    "lf then crlf blank line is not a boundary": (
        b"data: a\n\r\ndata: b\n\n",
        [SSEEvent(b"a\nb")],
    ),
    "crlf line then lf blank line": (b"data: a\r\n\ndata: b\n\n", [SSEEvent(b"a"), SSEEvent(b"b")]),
    "lone cr is not a line end": (b"data: a\rb\r\r\n\n", [SSEEvent(b"a\rb\r")]),
    "comment": (b": note\ndata: a\n\n", [SSEEvent(b"a")]),
    "comment-only block": (b": keep-alive\n\ndata: a\n\n", [SSEEvent(b"a")]),
    "empty blocks": (b"\n\n\n\n\r\n\r\ndata: a\n\n\n\n", [SSEEvent(b"a")]),
    "line without colon ignored": (b"data\ndata: a\nfoo\n\n", [SSEEvent(b"a")]),
    "block of lines without colon": (b"data\n\n", []),
    "field name case": (b"DATA: a\nEvent: e\nID: 1\n\n", [SSEEvent(b"a", "e", "1")]),
    "one leading space stripped": (b"data:  a\ndata:b\n\n", [SSEEvent(b" a\nb")]),
    "multi-line data": (b"data: a\ndata:\ndata: c\n\n", [SSEEvent(b"a\n\nc")]),
    "empty data line": (b"data:\n\n", [SSEEvent(b"")]),
    "event id retry": (
        b"event: delta\nid: 7\nretry: 3000\ndata: x\n\n",
        [SSEEvent(b"x", "delta", "7", 3000)],
    ),
    "last field wins": (b"event: a\nevent: b\nid: 1\nid: 2\n\n", [SSEEvent(b"", "b", "2")]),
    "invalid retry ignored": (
        b"retry: 1.5\ndata: a\n\nretry: -1\ndata: b\n\nretry: 12x\nretry: 40\ndata: c\n\n",
        [SSEEvent(b"a"), SSEEvent(b"b"), SSEEvent(b"c", retry=40)],
    ),
    "retry beyond int conversion ignored": (
        b"retry: 5\nretry: " + b"9" * 5000 + b"\n\n",
        [SSEEvent(b"", retry=5)],
    ),
    "event without data": (b"event: ping\n\n", [SSEEvent(b"", "ping")]),
    "unknown field is a field": (b"foo: bar\n\n", [SSEEvent(b"")]),
    "value with colons": (b'data: {"a":"b:c"}\n\n', [SSEEvent(b'{"a":"b:c"}')]),
    "done": (b"data: [DONE]\n\n", [SSEEvent(b"[DONE]")]),
    "utf-8 bytes intact": (
        'data: {"t":"café 日本 🚀"}\nevent: é\n\n'.encode(),
        [SSEEvent('{"t":"café 日本 🚀"}'.encode(), "é")],
    ),
    "invalid utf-8": (b"data: \xff\xfe\nid: \xff\n\n", [SSEEvent(b"\xff\xfe", id="\ufffd")]),
    "leftmost boundary wins": (b"data: a\r\n\r\n\ndata: b\n\n", [SSEEvent(b"a"), SSEEvent(b"b")]),
    "incomplete last event": (b"data: a\n\ndata: b\n", [SSEEvent(b"a")]),
}


class SSEDecoderTests(SynchronousTestCase):
    """
    Tests for L{SSEDecoder}.
    """

    def test_rules(self) -> None:
        """
        Each case yields its events whether fed whole, byte by byte, or in
        any two chunks, and agrees with the naive reference decoder.
        """
        for name, (stream, expected) in _CASES.items():
            with self.subTest(name):
                self.assertEqual(naive_decode(stream), expected)
                self.assertEqual(feed_all(SSEDecoder(), [stream]), expected)
                bytewise = [stream[i : i + 1] for i in range(len(stream))]
                self.assertEqual(feed_all(SSEDecoder(), bytewise), expected)
                for cut in range(len(stream) + 1):
                    self.assertEqual(feed_all(SSEDecoder(), [stream[:cut], stream[cut:]]), expected)

    def test_events_returned_by_completing_chunk(self) -> None:
        """
        L{SSEDecoder.feed} returns the events the chunk completes, and
        carries the rest over.
        """
        decoder = SSEDecoder()
        self.assertEqual(decoder.feed(b"data: a\n\ndata: "), [SSEEvent(b"a")])
        self.assertEqual(decoder.pending, 6)
        self.assertEqual(decoder.feed(b"b\n"), [])
        self.assertEqual(decoder.pending, 8)
        self.assertEqual(decoder.feed(b"\n"), [SSEEvent(b"b")])
        self.assertEqual(decoder.pending, 0)

    def test_boundary_across_chunks(self) -> None:
        """
        A C{\\r\\n\\r\\n} boundary split over several chunks is found.
        """
        decoder = SSEDecoder()
        self.assertEqual(decoder.feed(b"data: a\r"), [])
        self.assertEqual(decoder.feed(b"\n"), [])
        self.assertEqual(decoder.feed(b"\r"), [])
        self.assertEqual(decoder.feed(b"\ndata: b\r\n\r\n"), [SSEEvent(b"a"), SSEEvent(b"b")])

    def test_incomplete_event_at_close(self) -> None:
        """
        L{SSEDecoder.close} drops an incomplete event with a warning giving
        its size, and returns no events.
        """
        warnings = log_events(self, "aiproxy.stream.sse")
        decoder = SSEDecoder()
        decoder.feed(b"data: a\n\ndata: partial")
        self.assertEqual(decoder.close(), [])
        self.assertEqual(decoder.pending, 0)
        [warning] = warnings
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(
            warning["log_format"], "dropping incomplete stream frame at EOF, size: {size}"
        )
        self.assertEqual(warning["size"], 13)

    def test_close_after_complete_events(self) -> None:
        """
        L{SSEDecoder.close} after complete events, or after trailing blank
        lines, warns about nothing.
        """
        warnings = log_events(self, "aiproxy.stream.sse")
        for stream in [b"", b"data: a\n\n", b"data: a\n\n\n", b"data: a\r\n\r\n\r\n\r"]:
            decoder = SSEDecoder()
            decoder.feed(stream)
            self.assertEqual(decoder.close(), [])
        self.assertEqual(warnings, [])

    def test_remainder_cap(self) -> None:
        """
        An incomplete event growing beyond C{max_remainder} is dropped with a
        warning, up to its boundary; decoding resumes after it.
        """
        warnings = log_events(self, "aiproxy.stream.sse")
        decoder = SSEDecoder(max_remainder=16)
        self.assertEqual(decoder.feed(b"data: a\n\ndata: 0123456789"), [SSEEvent(b"a")])
        self.assertEqual(warnings, [])
        self.assertEqual(decoder.feed(b'abc,"k":"v"}'), [])
        self.assertLessEqual(decoder.pending, 3)
        self.assertEqual(decoder.feed(b"more"), [])
        self.assertEqual(decoder.feed(b"\r\n"), [])
        self.assertEqual(decoder.feed(b"\r\ndata: b\n\n"), [SSEEvent(b"b")])
        [warning] = warnings
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["log_format"], "stream remainder exceeded {limit} bytes, dropping")
        self.assertEqual(warning["limit"], 16)
        self.assertEqual(decoder.close(), [])
        self.assertEqual(len(warnings), 1)

    def test_remainder_cap_in_one_chunk(self) -> None:
        """
        A chunk that leaves more than C{max_remainder} bytes after its last
        event drops them; the next boundary ends the dropped event.
        """
        warnings = log_events(self, "aiproxy.stream.sse")
        decoder = SSEDecoder(max_remainder=8)
        self.assertEqual(decoder.feed(b"data: a\n\ndata: 0123456789"), [SSEEvent(b"a")])
        self.assertEqual(len(warnings), 1)
        self.assertEqual(decoder.feed(b"\n\ndata: b\n\n"), [SSEEvent(b"b")])

    def test_remainder_cap_dropped_at_close(self) -> None:
        """
        An event still being dropped at the end of the stream is not warned
        about twice.
        """
        warnings = log_events(self, "aiproxy.stream.sse")
        decoder = SSEDecoder(max_remainder=4)
        decoder.feed(b"data: 0123456789")
        self.assertEqual(decoder.close(), [])
        self.assertEqual(len(warnings), 1)
        self.assertEqual(decoder.feed(b"data: a\n\n"), [SSEEvent(b"a")])

    def test_remainder_within_cap(self) -> None:
        """
        An incomplete event of exactly C{max_remainder} bytes is kept.
        """
        decoder = SSEDecoder(max_remainder=9)
        self.assertEqual(decoder.feed(b"data: abc"), [])
        self.assertEqual(decoder.feed(b"\n\n"), [SSEEvent(b"abc")])

    def test_large_event_in_small_chunks(self) -> None:
        """
        A large multi-line event fed in small chunks is decoded once
        complete.
        """
        stream = b"".join(b"data: line %d\n" % i for i in range(2000)) + b"\n"
        decoder = SSEDecoder()
        events = []
        for i in range(0, len(stream), 7):
            events.extend(decoder.feed(stream[i : i + 7]))
        self.assertEqual(events, [SSEEvent(b"\n".join(b"line %d" % i for i in range(2000)))])

    @settings(max_examples=500)
    @given(chunked())
    def test_chunking_invariance(self, case: tuple[bytes, list[bytes]]) -> None:
        """
        Any split of a stream into chunks yields the events of the whole.
        """
        stream, chunks = case
        self.assertEqual(feed_all(SSEDecoder(), chunks), feed_all(SSEDecoder(), [stream]))

    @settings(max_examples=1000)
    @given(chunked())
    def test_matches_naive_reference(self, case: tuple[bytes, list[bytes]]) -> None:
        """
        The decoder yields exactly the events of a byte-by-byte, leftmost
        boundary scan, on streams rich in CR, LF, colons and field names.
        """
        stream, chunks = case
        self.assertEqual(feed_all(SSEDecoder(), chunks), naive_decode(stream))

    def test_exhaustive_short_streams(self) -> None:
        """
        Every stream of up to six tokens among LF, CR, CRLF, a data line and
        a colon decodes like the naive reference, fed whole and byte by byte.
        """
        tokens = [b"\n", b"\r", b"\r\n", b"data:a", b":"]
        for size in range(7):
            for combination in product(tokens, repeat=size):
                stream = b"".join(combination)
                expected = naive_decode(stream)
                self.assertEqual(feed_all(SSEDecoder(), [stream]), expected, stream)
                bytewise = [stream[i : i + 1] for i in range(len(stream))]
                self.assertEqual(feed_all(SSEDecoder(), bytewise), expected, stream)

    @given(chunked(st.binary(max_size=200)))
    def test_arbitrary_bytes(self, case: tuple[bytes, list[bytes]]) -> None:
        """
        Arbitrary bytes never make the decoder raise, and agree with the
        reference.
        """
        stream, chunks = case
        self.assertEqual(feed_all(SSEDecoder(), chunks), naive_decode(stream))
