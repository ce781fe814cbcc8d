# -*- test-case-name: tests.test_convert -*-
"""
Conversion as a stage of a stream: after the body filters (which see the
upstream's events), each chunk's events become events of the client's
protocol. A converted stream that ends without producing any output (the
upstream spoke another format) is answered 502.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from aiproxy.filters import Terminate
from aiproxy.interfaces import IConverter, IStreamConverter, IStreamStage
from aiproxy.stream.sse import SSEDecoder

__all__ = ["NO_OUTPUT", "ConversionStage"]

log = Logger()

#: The message of a converted stream that produced nothing.
NO_OUTPUT = (
    "streaming response completed without producing any output; "
    "the upstream likely returned a different stream format than the converter expects"
)


@implementer(IStreamStage)
class ConversionStage:
    """
    Converts a stream's chunks into the client's protocol.
    """

    __slots__ = ("_converter", "_stream", "_decoder", "_produced")

    def __init__(self, converter: IConverter, stream: IStreamConverter, decode: bool) -> None:
        """
        @param stream: the converter of this stream.
        @param decode: decode the chunks this stage gets (a stage before it
            may have changed them); else read the chunk's events from the
            context, as the relay decoded them.
        """
        self._converter = converter
        self._stream = stream
        self._decoder = SSEDecoder() if decode else None
        self._produced = False

    def filter_chunk(self, chunk: bytes, context: Any) -> bytes:
        decoder = self._decoder
        events = context.events if decoder is None else decoder.feed(chunk)
        if not events:
            return b""
        out: bytes = self._stream.convert_events(events, context)
        if out:
            self._produced = True
        return out

    def finish(self, context: Any) -> bytes | Terminate:
        if self._decoder is not None:
            self._decoder.close()
        tail: bytes = self._stream.finish(context)
        if tail or self._produced:
            return tail
        return self.no_output()

    @property
    def produced(self) -> bool:
        """
        Whether the stream gave any converted output so far.
        """
        return self._produced

    def no_output(self) -> Terminate:
        """
        The end of a converted stream that produced nothing: 502 in the
        client's protocol, reason C{upstream_format}.
        """
        log.error("converted stream produced no output: {reason}", reason="upstream_format")
        return Terminate(
            self._converter.convert_error(502, NO_OUTPUT), 502, reason="upstream_format"
        )
