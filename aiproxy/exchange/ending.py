# -*- test-case-name: tests.test_proxy -*-
"""
How an L{aiproxy.exchange.Exchange} ends: answered whole, finished, ended
early with an honest ending, terminated by a filter, aborted, or left by
its client; and its access record, written once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aiproxy.context import ExchangeContext
from aiproxy.exchange.admission import Admission
from aiproxy.exchange.answer import Relays
from aiproxy.exchange.deadlines import Deadlines
from aiproxy.exchange.downstream import Downstream
from aiproxy.exchange.errors import error_body
from aiproxy.exchange.failover import Failover
from aiproxy.exchange.phase import OVER, Phase
from aiproxy.exchange.record import Timings, log_record
from aiproxy.filters import Terminate
from aiproxy.interfaces import IConverter, IExchangeMonitor, IRelay
from aiproxy.stream.protocols import PASSTHROUGH, error_event

__all__ = ["ExchangeEnding"]

log = Logger()


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class ExchangeEnding:
    """
    The endings of an exchange (the base of L{aiproxy.exchange.Exchange}).
    """

    phase: Phase
    context: ExchangeContext
    conf: Any
    clock: IReactorTime
    monitor: IExchangeMonitor | None
    timings: Timings
    deadlines: Deadlines
    downstream: Downstream
    failover: Failover
    admission: Admission
    relays: Relays
    _upstream_d: Any
    _relay: IRelay | None
    _converter: IConverter | None

    def _answer(
        self, body: bytes, status: int | None = None, content_type: bytes = b"application/json"
    ) -> None:
        """
        Answer whole, and end the exchange: C{body} with the prepared head,
        or with C{status} and C{content_type}.
        """
        self.phase = Phase.ENDED
        self.deadlines.cancel_all()
        if status is not None:
            self.downstream.prepare(status, ((b"content-type", [content_type]),))
        self.downstream.respond(body)

    def _stop(self) -> None:
        """
        End the exchange's work: its timers, and the upstream transfer in
        whatever phase it is (its connection is closed, never pooled).
        """
        self.phase = Phase.ENDED
        self.deadlines.cancel_all()
        self._stop_upstream()

    def _stop_upstream(self) -> None:
        """
        Abort the current upstream transfer: cancel the request before its
        response, or stop reading the body.
        """
        if self.timings.upstream_ended is None:
            self.timings.upstream_ended = self.clock.seconds()
        if self._upstream_d is not None:
            # Not guarded by d.called: once connected, treq's Deferred has fired and
            # waits on the Agent's, and cancel() forwards to it (closing the connection).
            d, self._upstream_d = self._upstream_d, None
            d.cancel()
        if self._relay is not None:
            relay, self._relay = self._relay, None
            relay.stop()

    def _end_early(self, reason: str, status: int, message: str) -> None:
        """
        End the response early for C{reason}: before any output with
        C{status} and a JSON error; after output with a final error event in
        the client's protocol and a closed connection instead of a clean
        end (never a C{[DONE]}).
        """
        if self.phase in OVER:
            return
        context = self.context
        context.abort_reason = reason
        log.warn(
            "aborting AI {kind}: {reason}",
            kind="stream" if context.stream else "request",
            reason=reason,
        )
        mid_event = self._relay is not None and self._relay.mid_event
        self._stop()
        if not context.output_started:
            converter = self._converter
            body = (
                error_body(message)
                if converter is None
                else converter.convert_error(status, message)
            )
            self._answer(body, status)
            return
        # The error event must be an event of its own, even after an upstream
        # cut inside one.
        event = error_event(context.protocol or PASSTHROUGH, message, reason)
        self.downstream.cut(b"\n\n" + event if mid_event else event)
        self._record()

    def _terminate(self, result: Terminate) -> None:
        """
        A stream stage (a body filter) ended the response.
        """
        self.context.abort_reason = result.reason
        self._stop()
        if self.context.output_started:
            self.downstream.finish(result.data)
            return
        self._answer(result.data, result.status, result.content_type.encode("latin-1"))

    def abort(self, reason: str) -> None:
        """
        End the exchange now (the gateway is shutting down; L{IExchange.abort}).
        """
        self._end_early(reason, 503, "server shutting down")

    def _bug(self, failure: Failure) -> None:
        """
        A programming error in a callback: log it and answer 500 if possible.
        """
        log.failure("proxying a request failed", failure)
        self._end_early("internal_error", 500, "internal error")

    def _client_lost(self, reason: Failure) -> None:
        """
        The client's connection closed before the response was complete.
        """
        if self.phase not in OVER:
            context = self.context
            context.abort_reason = "client_disconnect"
            context.status = 499
            log.info("client disconnected during AI streaming, aborting upstream read")
            self._stop()
            self.downstream.discard()
        self._record()

    def _record(self) -> None:
        """
        Write the access record, once.
        """
        if self.phase is Phase.RECORDED:
            return
        self.phase = Phase.RECORDED
        context = self.context
        if context.status is None:
            context.status = self.downstream.status
        if self.timings.upstream_ended is not None:
            # APISIX's $upstream_response_time: until the upstream's answer ended.
            context.upstream_response_time_ms = _ms(self.timings.upstream_ended - context.started)
        now = self.clock.seconds()
        record = log_record(context, self.failover.records(now), self.conf.get("logging"), now)
        self.admission.charge(context)
        if self.monitor is not None:
            self.monitor.exchange_ended(self, record, self.timings)  # type: ignore[arg-type]
        self._let_go()

    def _let_go(self) -> None:
        """
        Nothing of the exchange runs any more: its parts let go of the
        callbacks into it, so that it is freed as soon as the last event
        of its request is handled, not by the garbage collector (which
        runs more often the more such cycles there are).
        """
        self.deadlines.let_go()
        self.relays.let_go()
        self._relay = None
