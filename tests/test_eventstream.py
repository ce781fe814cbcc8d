# -*- test-case-name: tests.test_eventstream -*-
"""
Tests for L{aiproxy.stream.eventstream}.
"""

from __future__ import annotations

import struct
import zlib
from datetime import UTC, datetime
from itertools import pairwise
from uuid import UUID

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from aiproxy.stream.eventstream import EventStreamDecoder, EventStreamMessage, encode_message
from tests.helpers import feed_all, log_events


def header(name: bytes, kind: int, value: bytes = b"") -> bytes:
    """
    Encode one header of any type.

    @param name: The header name.
    @param kind: The type byte.
    @param value: The encoded value, length prefix included where the type
        has one.
    @return: The header's bytes.
    """
    return bytes([len(name)]) + name + bytes([kind]) + value


def frame(headers: bytes, payload: bytes, total: int | None = None) -> bytes:
    """
    Frame a message with correct CRCs.

    @param headers: The encoded headers section.
    @param payload: The payload.
    @param total: A total length to declare instead of the real one.
    @return: The message's bytes.
    """
    if total is None:
        total = 16 + len(headers) + len(payload)
    prelude = struct.pack(">II", total, len(headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


_CHUNK = encode_message(
    {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
    b'{"bytes":"eyJ0eXBlIjoiY29udGVudF9ibG9ja19kZWx0YSJ9"}',
)


class EncodeMessageTests(SynchronousTestCase):
    """
    Tests for L{encode_message}.
    """

    def test_layout(self) -> None:
        """
        A message is its prelude (total length, headers length, CRC of both),
        string headers, the payload and a CRC of everything before it.
        """
        message = encode_message({"a": "xy"}, b"hi")
        headers = b"\x01a\x07\x00\x02xy"
        self.assertEqual(message, frame(headers, b"hi"))
        self.assertEqual(message[:8], struct.pack(">II", 16 + len(headers) + 2, len(headers)))

    def test_empty(self) -> None:
        """
        A message without headers or payload is sixteen bytes with both CRCs.
        """
        self.assertEqual(encode_message({}, b""), bytes.fromhex("000000100000000005c248eb7d98c8ff"))


class EventStreamDecoderTests(SynchronousTestCase):
    """
    Tests for L{EventStreamDecoder}.
    """

    def test_round_trip(self) -> None:
        """
        Encoded messages decode to their headers and payloads.
        """
        messages = [
            ({":event-type": "chunk", ":message-type": "event"}, b'{"bytes":"e30="}'),
            ({}, b""),
            ({"name": "välue"}, bytes(range(256))),
        ]
        stream = b"".join(encode_message(h, p) for h, p in messages)
        self.assertEqual(
            feed_all(EventStreamDecoder(), [stream]),
            [EventStreamMessage(h, p) for h, p in messages],  # type: ignore[arg-type]
        )

    def test_messages_returned_by_completing_chunk(self) -> None:
        """
        L{EventStreamDecoder.feed} returns the messages the chunk completes.
        """
        decoder = EventStreamDecoder()
        self.assertEqual(decoder.feed(_CHUNK[:5]), [])
        self.assertEqual(decoder.feed(_CHUNK[5:-1]), [])
        [message] = decoder.feed(_CHUNK[-1:] + _CHUNK[:20])
        self.assertEqual(message.headers[":event-type"], "chunk")
        self.assertEqual(len(decoder.feed(_CHUNK[20:])), 1)
        self.assertIsNone(decoder.error)

    def test_header_types(self) -> None:
        """
        Every header type decodes to its Python value.
        """
        uuid = UUID("12345678-1234-5678-1234-567812345678")
        headers = b"".join(
            [
                header(b"t", 0),
                header(b"f", 1),
                header(b"byte", 2, b"\xff"),
                header(b"short", 3, struct.pack(">h", -2)),
                header(b"int", 4, struct.pack(">i", 40972)),
                header(b"long", 5, struct.pack(">q", -(2**40))),
                header(b"bytes", 6, b"\x00\x03\x00\x01\x02"),
                header(b"string", 7, b"\x00\x05" + "café".encode()),
                header(b"time", 8, struct.pack(">q", 1_700_000_000_123)),
                header(b"uuid", 9, uuid.bytes),
            ]
        )
        [message] = feed_all(EventStreamDecoder(), [frame(headers, b"p")])
        self.assertEqual(
            message.headers,
            {
                "t": True,
                "f": False,
                "byte": -1,
                "short": -2,
                "int": 40972,
                "long": -(2**40),
                "bytes": b"\x00\x01\x02",
                "string": "café",
                "time": datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC),
                "uuid": uuid,
            },
        )
        self.assertEqual(message.payload, b"p")

    def test_bad_prelude_crc(self) -> None:
        """
        A bad prelude CRC sets C{error}, logs a warning, and stops decoding:
        messages before it are returned, later input is ignored.
        """
        warnings = log_events(self, "aiproxy.stream.eventstream")
        bad = bytearray(_CHUNK)
        bad[8] ^= 1
        decoder = EventStreamDecoder()
        self.assertEqual(len(decoder.feed(_CHUNK + bytes(bad))), 1)
        self.assertEqual(decoder.error, "bad prelude CRC")
        self.assertEqual(decoder.feed(_CHUNK), [])
        self.assertEqual(decoder.close(), [])
        [warning] = warnings
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["error"], "bad prelude CRC")

    def test_bad_message_crc(self) -> None:
        """
        A payload that does not match the message CRC sets C{error}.
        """
        bad = bytearray(_CHUNK)
        bad[-6] ^= 0x20
        decoder = EventStreamDecoder()
        self.assertEqual(decoder.feed(bytes(bad)), [])
        self.assertEqual(decoder.error, "bad message CRC")
        self.assertEqual(decoder.feed(_CHUNK), [])

    def test_bad_lengths(self) -> None:
        """
        A total length below sixteen bytes or above the cap, or a headers
        length beyond the message, sets C{error} from the prelude alone.
        """
        cases = [
            (frame(b"", b"", total=15)[:12], "bad message length 15"),
            (frame(b"", b"x" * 100)[:12], "bad message length 116"),
            (
                struct.pack(">II", 20, 5)
                + struct.pack(">I", zlib.crc32(struct.pack(">II", 20, 5))),
                "bad headers length 5",
            ),
        ]
        for prelude, error in cases:
            decoder = EventStreamDecoder(max_message_size=100)
            self.assertEqual(decoder.feed(prelude), [])
            self.assertEqual(decoder.error, error)

    def test_size_cap(self) -> None:
        """
        A message exactly at C{max_message_size} decodes; one byte more is an
        error.
        """
        decoder = EventStreamDecoder(max_message_size=116)
        self.assertEqual(len(decoder.feed(frame(b"", b"x" * 100))), 1)
        self.assertEqual(decoder.feed(frame(b"", b"x" * 101)), [])
        self.assertEqual(decoder.error, "bad message length 117")

    def test_bad_headers(self) -> None:
        """
        An unknown header type, a header running past the headers section,
        or a timestamp out of range sets C{error}.
        """
        cases = [
            (header(b"x", 10), "bad header type 10"),
            (header(b"x", 4, b"\x00\x00"), "truncated header"),
            (header(b"x", 7, b"\x00\x09abc"), "truncated header"),
            (header(b"x", 6, b"\x00"), "truncated header"),
            (header(b"x", 9, b"\x00" * 15), "truncated header"),
            (b"\x05ab", "truncated header"),
            (header(b"x", 8, struct.pack(">q", 2**62)), "timestamp header out of range"),
        ]
        for headers, error in cases:
            decoder = EventStreamDecoder()
            self.assertEqual(decoder.feed(frame(headers, b"p")), [])
            self.assertEqual(decoder.error, error)

    def test_incomplete_message_at_close(self) -> None:
        """
        L{EventStreamDecoder.close} drops an incomplete message with a
        warning giving its size.
        """
        warnings = log_events(self, "aiproxy.stream.eventstream")
        decoder = EventStreamDecoder()
        decoder.feed(_CHUNK + _CHUNK[:30])
        self.assertEqual(decoder.close(), [])
        [warning] = warnings
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(
            warning["log_format"], "dropping incomplete stream frame at EOF, size: {size}"
        )
        self.assertEqual(warning["size"], 30)

    def test_close_after_complete_messages(self) -> None:
        """
        L{EventStreamDecoder.close} after complete messages warns about
        nothing.
        """
        warnings = log_events(self, "aiproxy.stream.eventstream")
        decoder = EventStreamDecoder()
        decoder.feed(_CHUNK)
        self.assertEqual(decoder.close(), [])
        self.assertEqual(warnings, [])

    def test_large_message_in_small_chunks(self) -> None:
        """
        A large message fed in small chunks is decoded once complete.
        """
        payload = bytes(range(256)) * 400
        stream = encode_message({"k": "v"}, payload)
        decoder = EventStreamDecoder()
        messages = []
        for i in range(0, len(stream), 13):
            messages.extend(decoder.feed(stream[i : i + 13]))
        self.assertEqual(messages, [EventStreamMessage({"k": "v"}, payload)])

    @given(
        st.lists(
            st.tuples(
                st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=20), max_size=4),
                st.binary(max_size=100),
            ),
            max_size=5,
        ),
        st.data(),
    )
    def test_chunking_invariance(
        self, messages: list[tuple[dict[str, str], bytes]], data: st.DataObject
    ) -> None:
        """
        Any split of a stream into chunks yields the messages it encodes.
        """
        stream = b"".join(encode_message(h, p) for h, p in messages)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        bounds = [0, *cuts, len(stream)]
        chunks = [stream[a:b] for a, b in pairwise(bounds)]
        decoder = EventStreamDecoder()
        self.assertEqual(
            feed_all(decoder, chunks),
            [EventStreamMessage(h, p) for h, p in messages],  # type: ignore[arg-type]
        )
        self.assertIsNone(decoder.error)

    @given(st.lists(st.binary(max_size=64), max_size=8))
    def test_arbitrary_bytes(self, chunks: list[bytes]) -> None:
        """
        Arbitrary bytes never make the decoder raise.
        """
        feed_all(EventStreamDecoder(), chunks)

    @given(st.binary(max_size=64), st.binary(max_size=40), st.integers(0, 200))
    def test_corrupted_frames(self, headers: bytes, payload: bytes, flip: int) -> None:
        """
        Frames with arbitrary header bytes, or with one bit flipped, never
        make the decoder raise; a frame with a flipped bit yields no message.
        """
        good = frame(headers, payload)
        feed_all(EventStreamDecoder(), [good])
        bad = bytearray(good)
        bad[flip % len(bad)] ^= 1 << (flip % 8)
        self.assertEqual(feed_all(EventStreamDecoder(), [bytes(bad)]), [])
