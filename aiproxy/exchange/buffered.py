# -*- test-case-name: tests.test_relay -*-
"""
A whole (non-streamed) response body, collected within
C{max_response_bytes}, then observed and filtered as one chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from aiproxy.exchange.errors import upstream_error_message
from aiproxy.exchange.relay import (
    BODY_FAILED,
    MAX_RESPONSE_BYTES,
    Basis,
    Complete,
    Cut,
    Outcome,
    Relay,
    failed_body,
    finish_stages,
)
from aiproxy.filters import Terminate
from aiproxy.interfaces import IConverter, IStreamStage
from aiproxy.stream.observers import observer_for

__all__ = ["BufferedRelay"]

log = Logger()


class BufferedRelay(Relay):
    """
    Collects a whole body; at its end, observes it and runs it through the
    stream stages, and ends with the body to answer with.
    """

    def __init__(
        self,
        basis: Basis,
        status: int,
        open_stages: Callable[[], Sequence[IStreamStage]],
        converter: IConverter | None = None,
    ) -> None:
        """
        @param status: the status the client gets: a body is observed and
            filtered only under 400.
        @param open_stages: the stream stages of the response (opened on
            the first call).
        @param converter: converts the answer (or a body filter's) to the
            client's protocol.
        """
        super().__init__(basis)
        self._status = status
        self._open_stages = open_stages
        self._converter = converter
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
        outcome = self._filtered(body) if self._status < 400 else Complete(body)
        self.end(outcome if self._converter is None else self._converted(outcome))

    def _converted(self, outcome: Complete | Terminate) -> Outcome:
        """
        The answer (or a body filter's) in the client's protocol; a 500 when
        the upstream's answer cannot be converted.
        """
        assert self._converter is not None
        convert = self._converter.convert_answer
        try:
            if isinstance(outcome, Complete):
                return Complete(convert(self._status, outcome.body, self.context))
            data = convert(outcome.status, outcome.data, self.context)
            return replace(outcome, data=data, content_type="application/json")
        except ValueError as e:
            log.warn("converting the upstream's answer failed: {error}", error=str(e))
            return Cut("upstream_format", 500, f"could not convert the upstream's answer: {e}")

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
