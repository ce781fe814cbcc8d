# -*- test-case-name: tests.test_proxy -*-
"""
One proxied request, from the client's body to its access record.

An L{Exchange} checks the client's request once, then makes one upstream
attempt after another (L{Failover}): each one sends the request shaped for
its instance and hands the answer to a relay, a stream relay (held back
first while C{stream_commit_ms} allows a fallback) or a buffered one,
which writes to the L{Downstream}. An attempt that fails before any output
may fall back to another instance; otherwise the response ends, cleanly or
early with an honest ending. The timers of the request and of each attempt
are L{Deadlines}; the phase of the request is one L{Phase}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from aiproxy.context import ExchangeContext
from aiproxy.exchange.admission import Admission, Refused
from aiproxy.exchange.answer import SSE, Relays, relayed_head
from aiproxy.exchange.deadlines import Deadlines
from aiproxy.exchange.downstream import Downstream
from aiproxy.exchange.ending import ExchangeEnding
from aiproxy.exchange.errors import error_body, held_error_body
from aiproxy.exchange.failover import HELD_FAILURE_STATUS, Attempt, Failover
from aiproxy.exchange.held import HeldFailure, HeldRelay
from aiproxy.exchange.incoming import ClientRequest, send
from aiproxy.exchange.phase import OVER, Phase
from aiproxy.exchange.record import Timings
from aiproxy.exchange.relay import Complete, Cut, Failed, Outcome
from aiproxy.interfaces import IConverter, IExchange, IExchangeMonitor, IRelay, IStreamStage
from aiproxy.routing.routes import Instance, Route
from aiproxy.stream.protocols import BEDROCK_CONVERSE
from aiproxy.upstream.client import DiscardBody
from aiproxy.upstream.failures import classify
from aiproxy.upstream.request import ClientError

__all__ = ["Exchange", "Phase"]

log = Logger()


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


@implementer(IExchange)
class Exchange(ExchangeEnding):
    """
    One client request proxied to the route's upstream instances.

    @ivar phase: where the exchange is.
    @ivar timings: when its steps happened, for the monitor.
    """

    def __init__(
        self,
        route: Route,
        request: Request,
        clock: IReactorTime,
        monitor: IExchangeMonitor | None = None,
    ) -> None:
        """
        @param monitor: told when this exchange starts, streams and ends.
        """
        self.route = route
        self.conf = route.conf
        self.request = request
        self.clock = clock
        self.monitor = monitor
        self.context = context = ExchangeContext(route.id, route.instance_name, clock.seconds())
        self.timings = Timings(context.started)
        self.phase = Phase.PREPARING
        self.downstream = Downstream(request, context, clock)
        self.deadlines = Deadlines(
            clock,
            self.conf,
            lambda: self.downstream.paused,
            self._attempt_failed,
            self._end_early,
        )
        self.relays = Relays(
            context,
            clock,
            self.conf,
            self.deadlines,
            self.downstream,
            route.body_filters,
            lambda: None if monitor is None else monitor.stream_started(self),
            self._relay_ended,
        )
        self.failover = Failover(route, clock.seconds)
        self.admission = Admission(route, request, clock.seconds)
        self._client: ClientRequest | None = None
        self._upstream_d: Any = None
        self._relay: IRelay | None = None
        #: Converts the current attempt's answer to the client's protocol.
        self._converter: IConverter | None = None

    def start(self) -> None:
        """
        Handle the request: answer a client error directly, else go upstream.
        """
        request = self.request
        context = self.context
        context.method = request.method.decode("latin-1")
        context.path = request.path.decode("latin-1")
        self.downstream.when_finished(lambda _: self._record(), self._client_lost)
        if self.monitor is not None:
            self.monitor.exchange_started(self)
        self._step(self._prepare)

    def _step(self, step: Callable[[], Instance | None]) -> None:
        """
        Try the instance C{step} gives, if any; a refusal it raises is
        answered, and anything else it raises (a request filter's failure,
        a bug) is a JSON 500 with a true record.
        """
        try:
            instance = step()
            if instance is not None:
                self._try(instance)
        except ClientError as e:
            self._refuse(e)
        except Exception:
            self._bug(Failure())

    def _refuse(self, error: ClientError) -> None:
        """
        Answer a refused request.
        """
        if isinstance(error, Refused):
            self.context.abort_reason = error.reason
            self.downstream.extra_headers = error.headers
        self._answer(error.body(), error.status)

    def _prepare(self) -> Instance | None:
        """
        Find the consumer, check the client's request and run the request
        filters, once; then read the budgets' counters.

        @return: the first attempt's instance (L{None}: the client was
            answered, or the counters are being read).
        @raise ClientError: when the client's request is refused.
        """
        route, context, admission = self.route, self.context, self.admission
        admission.authenticate(context)
        client = self._client = ClientRequest(self.request, route, context, admission.sent_key)
        rejected = client.filter(route.request_filters, context)
        if rejected is not None:
            self._answer(json.dumps(rejected.body).encode("utf-8"), rejected.status)
            return None
        self.deadlines.arm_duration(context.started, client.stream)
        if admission.budgeted:
            d = admission.check()
            if d is not None:
                d.addCallbacks(self._admitted, self._admitted)
                return None
        return self._pick()

    def _admitted(self, result: object) -> None:
        """
        The counters were read (or not): go on, unless the client left.
        """
        if self.phase is Phase.PREPARING:
            self._step(result.raiseException if isinstance(result, Failure) else self._pick)

    def _pick(self) -> Instance | None:
        """
        The first attempt's instance (L{Admission.first}).
        """
        assert self._client is not None
        instance = self.admission.first(self.failover, self._client.protocol)
        if instance is None:
            # Every instance serving the protocol is out of use (weight 0
            # beside others): APISIX's "all servers tried".
            self._answer(error_body("no AI instance available"), 503)
        return instance

    def _try(self, instance: Instance) -> None:
        """
        Send the request to C{instance}, shaped for it.
        """
        assert self._client is not None
        call = self._client.upstream_call(instance, self.context)
        self._converter = instance.converter(self._client.protocol)
        attempt = self.failover.begin(instance)
        self.downstream.extra_headers = self.admission.headers(instance.name)
        self.timings.attempt_sent(attempt.started)
        self.phase = Phase.WAITING
        # SSE comments cannot go into a binary (EventStream) answer.
        sse = self.context.stream and self._client.protocol != BEDROCK_CONVERSE
        self.deadlines.arm_waiting(sse, self.downstream.keepalive)
        d = self._upstream_d = send(instance, call)
        d.addCallbacks(
            self._got_response,
            self._request_failed,
            callbackArgs=(attempt,),
            errbackArgs=(attempt,),
        )
        d.addErrback(self._bug)

    def _switch_to(self, instance: Instance) -> None:
        """
        Give the current attempt up (its connection is closed, never
        pooled) and send the request to C{instance}.
        """
        self.failover.give_up()
        self.deadlines.drop_attempt()
        self._stop_upstream()
        self.downstream.unpace()
        self.downstream.discard()
        self._step(lambda: instance)

    def _attempt_failed(self, reason: str, status: int, message: str) -> None:
        """
        The current attempt failed (before or after output): fall back to
        another instance if allowed, else end the response early (with 502
        when every instance failed).
        """
        if self.phase in OVER:
            return
        instance = None if self.context.output_started else self.failover.next(status)
        if instance is not None:
            self._switch_to(instance)
            return
        self._end_early(reason, 502 if self.failover.exhausted else status, message)

    def _request_failed(self, failure: Failure, attempt: Attempt) -> None:
        """
        No response from upstream: the connect, send or header phase failed.
        """
        if attempt.ended is not None or self.phase in OVER:
            return
        self._upstream_d = None
        self.timings.upstream_ended = self.clock.seconds()
        if failure.check(ClientError):
            self._answer(failure.value.body(), failure.value.status)
            return
        self._attempt_failed(*classify(failure))

    def _got_response(self, response: Any, attempt: Attempt) -> None:
        """
        The upstream's status and headers arrived: fall back on a status
        that allows it, else relay the body.
        """
        if attempt.ended is not None or self.phase in OVER:
            response.deliverBody(DiscardBody())
            return
        self._upstream_d = None
        attempt.status = code = response.code
        if code >= 400:
            instance = None if self.context.output_started else self.failover.next(code)
            if instance is not None:
                # The error body is not read: the connection is closed.
                response.deliverBody(DiscardBody())
                self._switch_to(instance)
                return
        # Every instance failed: 502 with the last one's error body.
        status = 502 if self.failover.exhausted else code
        headers, framing = relayed_head(response, self._converter is not None)
        self.downstream.prepare(status, headers)
        self._deliver(response, status, framing)

    def _deliver(self, response: Any, status: int, framing: bytes | None) -> None:
        """
        Relay the body: collected whole (within C{max_response_bytes}), or
        a stream chunk by chunk (an SSE stream held back first when
        C{stream_commit_ms} allows a fallback).
        """
        context = self.context
        relay: Any
        if framing is None:
            relay = self.relays.buffered(status, response.length, self._converter)
            if relay is None:
                response.deliverBody(DiscardBody())
                self._end_early("max_response_bytes", 502, "max_response_bytes exceeded")
                return
            self.phase = Phase.COLLECTING
        else:
            context.stream = True
            hold = framing == SSE and not context.output_started and self.failover.may_hold()
            stages = () if hold else self.relays.stream_stages(self._converter)
            relay = stream = self.relays.stream(framing, self.timings)
            self.deadlines.arm_duration(context.started, True)
            if hold:
                relay = HeldRelay(stream, self._released, self._held_failed)
                self.deadlines.arm("commit", self.failover.commit_s, relay.release)
            else:
                stream.open(stages)
            self.phase = Phase.HOLDING if hold else Phase.RELAYING
        self._relay = relay
        response.deliverBody(relay)

    def _released(self) -> Sequence[IStreamStage]:
        """
        The held stream is released: it is relayed through these stages.
        """
        self.deadlines.cancel("commit")
        self.phase = Phase.RELAYING
        return self.relays.stream_stages(self._converter)

    def _held_failed(self, failure: HeldFailure) -> None:
        """
        A held stream failed before content. Fall back if allowed; when
        every instance failed, answer 502 with the error; else relay the
        stream as it came.
        """
        held = self._relay
        if self.phase in OVER or not isinstance(held, HeldRelay):
            return
        failover = self.failover
        try:
            instance = None if self.context.output_started else failover.next(HELD_FAILURE_STATUS)
            if (instance is not None or failover.exhausted) and failover.current is not None:
                failover.current.status = HELD_FAILURE_STATUS
            if instance is not None:
                self._switch_to(instance)
            elif failover.exhausted:
                self.context.abort_reason = "upstream_error"
                self._stop()
                self._answer(held_error_body(failure.error), 502)
            else:
                held.release()
                if failure.ended is not None and self.phase not in OVER:
                    held.relay_end(failure.ended)
        except Exception:
            self._bug(Failure())

    def _relay_ended(self, outcome: Outcome) -> None:
        """
        The relay's body ended: end the response as its outcome says.
        """
        if self.phase in OVER:
            return
        self.timings.upstream_ended = self.clock.seconds()
        try:
            if isinstance(outcome, Complete):
                if self.phase is Phase.COLLECTING:
                    self._answer(outcome.body)
                else:
                    self._stop()
                    self.downstream.finish()
            elif isinstance(outcome, Failed):
                self._attempt_failed(outcome.reason, outcome.status, outcome.message)
            elif isinstance(outcome, Cut):
                self._end_early(outcome.reason, outcome.status, outcome.message)
            else:
                self._terminate(outcome)
        except Exception:
            self._bug(Failure())
