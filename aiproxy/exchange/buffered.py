# -*- test-case-name: tests.test_relay -*-
"""
A whole (non-streamed) response body, collected within
C{max_response_bytes}, then observed and filtered as one chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.python.failure import Failure

from aiproxy.exchange.errors import upstream_error_message
from aiproxy.exchange.relay import (
    BODY_FAILED,
    MAX_RESPONSE_BYTES,
    Basis,
    Complete,
    Cut,
    Relay,
    failed_body,
    finish_stages,
)
from aiproxy.filters import Terminate
from aiproxy.interfaces import IStreamStage
from aiproxy.stream.protocols import observer_for

__all__ = ["BufferedRelay"]


class BufferedRelay(Relay):
    """
    Collects a whole body; at its end, observes it and runs it through the
    stream stages, and C{done} fires with the body to answer with.
    """

    def __init__(
        self, basis: Basis, status: int, open_stages: Callable[[], Sequence[IStreamStage]]
    ) -> None:
        """
        @param status: the status the client gets: a body is observed and
            filtered only under 400.
        @param open_stages: the stream stages of the response (opened on
            the first call).
        """
        super().__init__(basis)
        self._status = status
        self._open_stages = open_stages
        self._parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self.over:
            return
        self.deadlines.last_chunk = self.clock.seconds()
        if not self.received:
            self.deadlines.cancel("first_token")
            self.deadlines.cancel("keepalive")
        self.received += len(data)
        limit = self.limit
        if limit is not None and self.received > limit:
            self.end(MAX_RESPONSE_BYTES)
            return
        self._parts.append(data)

    def ended(self, reason: Failure) -> None:
        if failed_body(reason):
            self.end(BODY_FAILED)
            return
        body = b"".join(self._parts)
        self._parts = []
        context = self.context
        context.ttft_ms = int((self.clock.seconds() - context.started) * 1000)
        if context.output_started:
            # Keep-alive comments already sent a streamed 200: say it in-band.
            self.end(Cut("upstream_error", 502, upstream_error_message(self._status, body)))
            return
        if self._status < 400:
            self.end(self._filtered(body))
            return
        self.end(Complete(body))

    def _filtered(self, body: bytes) -> Complete | Terminate:
        """
        Observe a successful body and run it through the stream stages.
        """
        context = self.context
        if context.upstream_protocol is not None:
            observer_for(context.upstream_protocol).observe_body(body, context)
        stages = self._open_stages()
        if not stages:
            return Complete(body)
        context.done = True
        out: Any = body
        for stage in stages:
            out = stage.filter_chunk(out, context)
            if isinstance(out, Terminate):
                return out
        tail = finish_stages(stages, context)
        if isinstance(tail, Terminate):
            return tail
        return Complete(out + tail)
