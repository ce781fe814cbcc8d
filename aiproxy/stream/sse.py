# -*- test-case-name: tests.test_sse -*-
"""
Incremental Server-Sent Events decoder.

The proxy relays upstream bytes unchanged and runs this decoder beside them
to see the events (usage, text, filters). It is fed whatever the transport
delivers and returns the events each chunk completes; any split of the same
bytes into chunks yields the same events.

Framing rules: an event ends at the leftmost C{\\n\\n} or C{\\r\\n\\r\\n}; its
lines are split on C{\\n} with one trailing C{\\r} stripped; lines starting
with C{:} are comments and lines without a colon are ignored; field names are
lower-cased and one leading space of the value is stripped; C{data} lines are
joined with C{\\n}; C{event}, C{id} and C{retry} (digits only) set the other
attributes. A block without any field, such as a C{: keep-alive} comment,
yields no event.
"""

from __future__ import annotations

from twisted.logger import Logger

__all__ = ["SSEDecoder", "SSEEvent"]

_log = Logger()

_LF = b"\n"
_CR = b"\r"
_LFLF = b"\n\n"
_CRLFCRLF = b"\r\n\r\n"
_DATA = b"data: "
_CRLF = b"\r\n"
# Membership of an int is a plain memchr, faster than that of a bytes.
_CR_BYTE = 0x0D
_LF_BYTE = 0x0A


class SSEEvent:
    """
    One decoded event.

    @ivar event: The event type, C{"message"} unless an C{event} field set it.
    @ivar data: The C{data} lines joined with C{b"\\n"}, undecoded.
    @ivar id: The last C{id} field of the event, or L{None}.
    @ivar retry: The last valid C{retry} field, in milliseconds, or L{None}.
    """

    __slots__ = ("event", "data", "id", "retry")

    event: str
    data: bytes
    id: str | None
    retry: int | None

    def __init__(
        self,
        data: bytes,
        event: str = "message",
        id: str | None = None,
        retry: int | None = None,
    ) -> None:
        """
        @param data: The event's data.
        @param event: The event type.
        @param id: The event id.
        @param retry: The reconnection time in milliseconds.
        """
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SSEEvent):
            return NotImplemented
        return (
            self.data == other.data
            and self.event == other.event
            and self.id == other.id
            and self.retry == other.retry
        )

    def __repr__(self) -> str:
        return (
            f"SSEEvent({self.data!r}, event={self.event!r}, id={self.id!r}, retry={self.retry!r})"
        )


def _parse_lines(lines: list[bytes]) -> SSEEvent | None:
    """
    Parse the lines of one event block.

    @param lines: The block's lines, without line terminators; empty lines
        are ignored.
    @return: The event, or L{None} when the block holds no field.
    """
    data: list[bytes] = []
    event = "message"
    event_id: str | None = None
    retry: int | None = None
    has_field = False
    for line in lines:
        colon = line.find(b":")
        if colon <= 0:
            # No colon (ignored), a comment, or an empty line.
            continue
        has_field = True
        name = line[:colon].lower()
        value = line[colon + 1 :]
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
        elif name == b"id":
            event_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            try:
                retry = int(value)
            except ValueError:
                # More digits than int() converts: not a usable delay either.
                pass
    if not has_field:
        return None
    return SSEEvent(_LF.join(data), event, event_id, retry)


def _decode_blocks(body: bytes) -> list[SSEEvent]:
    """
    Decode complete blocks of any shape, the general path.

    Turning every C{\\r\\n\\r\\n} into C{\\n\\n} may move a boundary across
    a blank line, but yields the same events as the leftmost scan.

    @param body: One or more blocks, ending with a boundary.
    @return: The events, in order.
    """
    events = []
    for block in body.replace(_CRLFCRLF, _LFLF).split(_LFLF):
        event = _parse_lines([line[:-1] if line[-1:] == _CR else line for line in block.split(_LF)])
        if event is not None:
            events.append(event)
    return events


def _clean_cr(body: bytes) -> bool:
    """
    Check that L{bytes.splitlines} reads C{body} as the framing rules do.

    That holds when every C{\\r} is followed by C{\\n}, and an empty
    C{\\r\\n} line comes after a C{\\r\\n} line or a blank line: otherwise
    C{\\n\\r\\n} would read as a boundary.

    @param body: The bytes to check.
    @return: Whether L{bytes.splitlines} gives the lines, an empty one at
        each boundary.
    """
    i = body.find(_CR)
    while i >= 0:
        if body[i + 1 : i + 2] != _LF:
            return False
        if body[i - 1 : i] == _LF and body[i - 2 : i - 1] not in _CRLF:
            return False
        i = body.find(_CR, i + 2)
    return True


def _first_boundary_end(data: bytes) -> int:
    """
    Find the end of the leftmost event boundary.

    @param data: Some bytes.
    @return: The offset just past the leftmost boundary, or C{-1}.
    """
    lf = data.find(_LFLF)
    crlf = data.find(_CRLFCRLF)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 4
    if lf >= 0:
        return lf + 2
    return -1


def _last_boundary_end(data: bytes) -> int:
    """
    Find the end of the rightmost event boundary.

    It ends where the leftmost scan's last boundary ends, or after blank
    lines that follow it, which hold no event.

    @param data: Some bytes.
    @return: The offset just past the rightmost boundary, or C{0}.
    """
    end = data.rfind(_LFLF) + 2
    if _CR_BYTE in data:
        crlf = data.rfind(_CRLFCRLF)
        if crlf >= 0 and crlf + 4 > end:
            return crlf + 4
    return end if end > 1 else 0


class SSEDecoder:
    """
    Decode a stream of Server-Sent Events fed in arbitrary chunks.

    Bytes after the last complete event are carried over as a list of
    chunks, joined only when a new chunk completes an event: a large event
    arriving in many small reads is not copied again on every read.
    """

    __slots__ = ("_limit", "_max_remainder", "_parts", "_pending")

    def __init__(self, max_remainder: int = 1024 * 1024) -> None:
        """
        @param max_remainder: The most bytes an incomplete event may hold;
            a larger one is dropped with a warning, up to its boundary.
        """
        self._max_remainder = max_remainder
        self._parts: list[bytes] = []
        self._pending = 0
        self._limit = max_remainder

    @property
    def pending(self) -> int:
        """
        The number of bytes carried over to the next L{feed}.
        """
        return self._pending

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """
        Decode the next bytes of the stream.

        @param chunk: The bytes, split anywhere.
        @return: The events this chunk completes, in stream order.
        """
        parts = self._parts
        # Every boundary ends with a line feed; without one the chunk only
        # adds to the carried bytes.
        end = 0
        if _LF_BYTE in chunk:
            # The end of the last boundary: every complete event lies before it.
            end = chunk.rfind(_LFLF) + 2
            if _CR_BYTE in chunk:
                crlf_end = chunk.rfind(_CRLFCRLF) + 4
                if crlf_end > end and crlf_end > 3:
                    end = crlf_end
            if end < 2:
                end = 0
                if parts and chunk[:1] in _CRLF:
                    # A boundary across the junction starts the chunk and
                    # ends in its first three bytes.
                    tail = b"".join(parts[-3:])[-3:]
                    end = _last_boundary_end(tail + chunk[:3]) - len(tail)
        if end <= 0:
            if chunk:
                parts.append(chunk)
                self._pending += len(chunk)
                if self._pending > self._limit:
                    self._drop()
            return []

        if parts:
            parts.append(chunk[:end])
            body = b"".join(parts)
            parts.clear()
            self._pending = 0
            if self._limit < 0:
                self._limit = self._max_remainder
                body = body[_first_boundary_end(body) :]
        else:
            body = chunk[:end]
        rest = chunk[end:]
        if rest:
            parts.append(rest)
            self._pending = len(rest)
            if self._pending > self._limit:
                self._drop()

        if _CR_BYTE not in body:
            if body[:6] == _DATA and body.find(_LF_BYTE) == len(body) - 2:
                # One event of one data line, as most writes are.
                return [SSEEvent(body[6:-2])]
            lines = body.split(_LF)
            lines.pop()
        elif _clean_cr(body):
            lines = body.splitlines()
        else:
            return _decode_blocks(body)
        # Each empty line ends a block; most blocks are one data line.
        events = []
        first = None
        block: list[bytes] | None = None
        for line in lines:
            if line:
                if first is None:
                    first = line
                elif block is None:
                    block = [first, line]
                else:
                    block.append(line)
            elif first is not None:
                if block is None and first[:6] == _DATA:
                    events.append(SSEEvent(first[6:]))
                else:
                    event = _parse_lines([first] if block is None else block)
                    if event is not None:
                        events.append(event)
                    block = None
                first = None
        return events

    def _drop(self) -> None:
        """
        Drop the carried bytes of an event grown beyond the size limit.

        Until the event's boundary only its last three bytes are kept, to
        find that boundary across chunks; a negative limit marks that state.
        """
        if self._limit >= 0:
            _log.warn(
                "stream remainder exceeded {limit} bytes, dropping", limit=self._max_remainder
            )
            self._limit = -1
        parts = self._parts
        tail = b"".join(parts[-3:])[-3:]
        parts[:] = [tail]
        self._pending = len(tail)

    def close(self) -> list[SSEEvent]:
        """
        End the stream; an incomplete event is dropped with a warning.

        @return: No events: an event is only complete at its boundary.
        """
        buf = b"".join(self._parts)
        self._parts.clear()
        self._pending = 0
        if self._limit < 0:
            self._limit = self._max_remainder
        elif buf.strip(_CRLF):
            _log.warn("dropping incomplete stream frame at EOF, size: {size}", size=len(buf))
        return []
