# -*- test-case-name: tests.test_chunk_paths -*-
"""
The chunked body of an upstream response, decoded in one pass per read.

Twisted's C{_ChunkedTransferDecoder} appends every read to a buffer and
runs one state method per chunk size, chunk and CRLF: with a stream event
per chunk, that is most of what relaying an event costs. L{decode_chunks}
decodes the chunks of a read in place and gives them to the decoder's own
callback, and leaves to the decoder (in the state it would have reached)
what it does not handle itself: a cut chunk-size line or CRLF, chunk
extensions, the last chunk and its trailers, and anything malformed.
"""

from __future__ import annotations

from twisted.web.http import _ChunkedTransferDecoder

__all__ = ["decode_chunks"]

_HEX_DIGITS = b"0123456789abcdefABCDEF"

#: The longest chunk-size line taken here (16 hex digits): a longer one is
#: the decoder's to refuse.
_SIZE_LINE = 18


def decode_chunks(decoder: _ChunkedTransferDecoder, data: bytes) -> bool:
    """
    Decode C{data}, the next read of the body C{decoder} decodes.

    @return: whether it was decoded (else the decoder must take it: it is
        not between chunks nor inside one with nothing buffered).
    """
    state = decoder.state
    if decoder._buffer or state == "TRAILER" or state == "FINISHED":
        return False
    deliver = decoder.dataCallback
    start = 0
    end = len(data)
    if state == "BODY":
        length = decoder.length
        if end < length:
            decoder.length = length - end
            deliver(data)
            return True
        decoder.state = state = "CRLF"
        deliver(data[:length])
        start = length
    if state == "CRLF":
        if data[start : start + 2] != b"\r\n":
            if start < end:
                decoder.dataReceived(data[start:])
            return True
        start += 2
        decoder.state = "CHUNK_LENGTH"
    find = data.find
    while start < end:
        eol = find(b"\r\n", start, start + _SIZE_LINE)
        if eol <= start:
            break
        size = data[start:eol]
        if size.translate(None, _HEX_DIGITS):
            break
        length = int(size, 16)
        if not length:
            break
        body = eol + 2
        body_end = body + length
        if body_end >= end:
            # The chunk goes on in the next reads (or only its CRLF does).
            if body_end == end:
                decoder.state = "CRLF"
            else:
                decoder.state = "BODY"
                decoder.length = body_end - end
            if body < end:
                deliver(data[body:])
            return True
        decoder.state = "CRLF"
        deliver(data[body:body_end])
        if data[body_end : body_end + 2] != b"\r\n":
            decoder.dataReceived(data[body_end:])
            return True
        decoder.state = "CHUNK_LENGTH"
        start = body_end + 2
    if start < end:
        decoder.dataReceived(data[start:])
    return True
