# -*- test-case-name: tests.test_eventstream -*-
"""
Incremental decoder of the AWS EventStream framing.

Bedrock streams responses as C{application/vnd.amazon.eventstream}: binary
messages, each a prelude (total length, headers length, prelude CRC32),
typed headers, a payload and a CRC32 of the whole message. The decoder is
fed whatever the transport delivers and returns the messages each chunk
completes; a framing error stops it for the rest of the stream.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from struct import Struct
from uuid import UUID
from zlib import crc32

from twisted.logger import Logger

__all__ = ["EventStreamDecoder", "EventStreamMessage", "encode_message"]

_log = Logger()

_PRELUDE = Struct(">III")
_UINT32 = Struct(">I")
_UINT16 = Struct(">H")
# The fixed-size header values, by type: 2 byte, 3 short, 4 int, 5 long,
# 8 timestamp (milliseconds since the epoch).
_INTEGERS = {2: Struct(">b"), 3: Struct(">h"), 4: Struct(">i"), 5: Struct(">q"), 8: Struct(">q")}
_PRELUDE_SIZE = 12
_OVERHEAD = _PRELUDE_SIZE + 4
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class EventStreamMessage:
    """
    One decoded message.

    @ivar headers: The headers, values decoded by type: C{bool}, C{int}
        (byte, short, int, long), C{bytes}, C{str}, L{datetime} (UTC) for a
        timestamp, L{UUID}.
    @ivar payload: The payload.
    """

    __slots__ = ("headers", "payload")

    headers: dict[str, object]
    payload: bytes

    def __init__(self, headers: dict[str, object], payload: bytes) -> None:
        """
        @param headers: The decoded headers.
        @param payload: The payload.
        """
        self.headers = headers
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EventStreamMessage):
            return NotImplemented
        return self.headers == other.headers and self.payload == other.payload

    def __repr__(self) -> str:
        return f"EventStreamMessage({self.headers!r}, {self.payload!r})"


class _FramingError(Exception):
    """
    The stream is not valid EventStream framing.
    """


def _decode_headers(data: bytes, start: int, end: int) -> dict[str, object]:
    """
    Decode a message's headers section.

    @param data: The buffer holding the message.
    @param start: The offset of the first header.
    @param end: The offset just past the last header.
    @return: The headers.
    @raise _FramingError: A header is truncated or of an unknown type.
    """
    headers: dict[str, object] = {}
    pos = start
    while pos < end:
        name_end = pos + 1 + data[pos]
        if name_end + 1 > end:
            raise _FramingError("truncated header")
        name = data[pos + 1 : name_end].decode("utf-8", "replace")
        kind = data[name_end]
        pos = name_end + 1
        value: object
        if kind == 0 or kind == 1:
            value = kind == 0
        elif kind in _INTEGERS:
            size = _INTEGERS[kind].size
            if pos + size > end:
                raise _FramingError("truncated header")
            (number,) = _INTEGERS[kind].unpack_from(data, pos)
            pos += size
            if kind == 8:
                try:
                    value = _EPOCH + timedelta(milliseconds=number)
                except OverflowError:
                    raise _FramingError("timestamp header out of range") from None
            else:
                value = number
        elif kind == 6 or kind == 7:
            if pos + 2 > end:
                raise _FramingError("truncated header")
            (size,) = _UINT16.unpack_from(data, pos)
            pos += 2
            if pos + size > end:
                raise _FramingError("truncated header")
            raw = data[pos : pos + size]
            pos += size
            value = raw if kind == 6 else raw.decode("utf-8", "replace")
        elif kind == 9:
            if pos + 16 > end:
                raise _FramingError("truncated header")
            value = UUID(bytes=data[pos : pos + 16])
            pos += 16
        else:
            raise _FramingError(f"bad header type {kind}")
        headers[name] = value
    return headers


class EventStreamDecoder:
    """
    Decode a stream of EventStream messages fed in arbitrary chunks.

    Incomplete bytes are kept as a list of chunks, joined once the message
    they start is complete: the prelude says how many bytes that takes.

    @ivar error: Why decoding stopped (a bad CRC, an impossible length, a
        bad header), or L{None}. Once set, L{feed} ignores its input.
    """

    __slots__ = ("_max_message_size", "_needed", "_parts", "_pending", "error")

    def __init__(self, max_message_size: int = 16 * 1024 * 1024) -> None:
        """
        @param max_message_size: The largest total length a message may
            declare; a larger one is a framing error.
        """
        self._max_message_size = max_message_size
        self._parts: list[bytes] = []
        self._pending = 0
        self._needed = _PRELUDE_SIZE
        self.error: str | None = None

    @property
    def pending(self) -> int:
        """
        The number of bytes of an incomplete message carried over to the
        next L{feed}.
        """
        return self._pending

    def feed(self, chunk: bytes) -> list[EventStreamMessage]:
        """
        Decode the next bytes of the stream.

        @param chunk: The bytes, split anywhere.
        @return: The messages this chunk completes, in stream order; after a
            framing error, none.
        """
        if self.error is not None or not chunk:
            return []
        parts = self._parts
        parts.append(chunk)
        self._pending += len(chunk)
        if self._pending < self._needed:
            return []
        buf = b"".join(parts) if len(parts) > 1 else chunk
        parts.clear()
        messages = []
        pos = 0
        size = len(buf)
        needed = _PRELUDE_SIZE
        try:
            while size - pos >= _PRELUDE_SIZE:
                total, headers_size, prelude_crc = _PRELUDE.unpack_from(buf, pos)
                if crc32(buf[pos : pos + 8]) != prelude_crc:
                    raise _FramingError("bad prelude CRC")
                if total < _OVERHEAD or total > self._max_message_size:
                    raise _FramingError(f"bad message length {total}")
                if headers_size > total - _OVERHEAD:
                    raise _FramingError(f"bad headers length {headers_size}")
                if size - pos < total:
                    needed = total
                    break
                end = pos + total - 4
                crc = crc32(memoryview(buf)[pos + 8 : end], prelude_crc)
                if crc != _UINT32.unpack_from(buf, end)[0]:
                    raise _FramingError("bad message CRC")
                headers_end = pos + _PRELUDE_SIZE + headers_size
                headers = _decode_headers(buf, pos + _PRELUDE_SIZE, headers_end)
                messages.append(EventStreamMessage(headers, buf[headers_end:end]))
                pos = end + 4
        except _FramingError as e:
            self.error = str(e)
            self._pending = 0
            self._needed = _PRELUDE_SIZE
            _log.warn("event stream framing error, ignoring the rest: {error}", error=self.error)
            return messages
        if pos < size:
            parts.append(buf[pos:])
        self._pending = size - pos
        self._needed = needed
        return messages

    def close(self) -> list[EventStreamMessage]:
        """
        End the stream; an incomplete message is dropped with a warning.

        @return: No messages: a message is only complete with its CRC.
        """
        if self._pending:
            _log.warn("dropping incomplete stream frame at EOF, size: {size}", size=self._pending)
        self._parts.clear()
        self._pending = 0
        self._needed = _PRELUDE_SIZE
        return []


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """
    Encode one message with string headers.

    @param headers: Header names (up to 255 bytes) and string values (up to
        65535 bytes).
    @param payload: The payload.
    @return: The framed message.
    """
    encoded = []
    for name, value in headers.items():
        raw_name = name.encode("utf-8")
        raw_value = value.encode("utf-8")
        encoded.append(
            bytes([len(raw_name)]) + raw_name + b"\x07" + _UINT16.pack(len(raw_value)) + raw_value
        )
    header_bytes = b"".join(encoded)
    prelude = _UINT32.pack(_OVERHEAD + len(header_bytes) + len(payload)) + _UINT32.pack(
        len(header_bytes)
    )
    message = prelude + _UINT32.pack(crc32(prelude)) + header_bytes + payload
    return message + _UINT32.pack(crc32(message))
