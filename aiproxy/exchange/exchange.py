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

import copy
import json
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from aiproxy.accesslog import log_access
from aiproxy.context import ExchangeContext
from aiproxy.exchange.buffered import BufferedRelay
from aiproxy.exchange.deadlines import Deadlines
from aiproxy.exchange.downstream import Downstream
from aiproxy.exchange.errors import error_body, held_error_body
from aiproxy.exchange.failover import HELD_FAILURE_STATUS, Attempt, Failover
from aiproxy.exchange.held import HeldFailure, HeldRelay
from aiproxy.exchange.record import Timings, exchange_record
from aiproxy.exchange.relay import Complete, Cut, Failed, Outcome, StreamRelay, TimedStreamRelay
from aiproxy.filters import Reject, Terminate, open_chain
from aiproxy.interfaces import IExchange, IExchangeMonitor, IRelay, IStreamStage
from aiproxy.routing.routes import Instance, Route
from aiproxy.stream.eventstream import EventStreamDecoder
from aiproxy.stream.protocols import NULL_OBSERVER, PASSTHROUGH, error_event, observer_for
from aiproxy.stream.sse import SSEDecoder
from aiproxy.upstream.client import DiscardBody
from aiproxy.upstream.failures import classify
from aiproxy.upstream.request import (
    ClientError,
    apply_body_overrides,
    check_content_type,
    detect,
    parse_body,
    too_large_message,
    upstream_headers,
)

__all__ = ["Exchange", "Phase"]

log = Logger()

#: Upstream response headers relayed to the client besides its content type.
_RELAYED_HEADERS = (b"x-request-id", b"request-id", b"retry-after", b"retry-after-ms")
_RELAYED_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-", b"ratelimit")

_STREAM_TYPES = (b"text/event-stream", b"application/vnd.amazon.eventstream")
_EVENTSTREAM = b"application/vnd.amazon.eventstream"

_JSON = ((b"content-type", [b"application/json"]),)

#: The monitor was not asked yet whether it wants stream timings.
_UNASKED: Any = object()


class Phase(Enum):
    """
    Where an exchange is.
    """

    #: Checking the client's request, running the request filters.
    PREPARING = "preparing"
    #: An attempt was sent; its status and headers are awaited.
    WAITING = "waiting"
    #: A stream is held back until its first content (C{stream_commit_ms}).
    HOLDING = "holding"
    #: A stream is relayed to the client.
    RELAYING = "relaying"
    #: A whole body is being collected.
    COLLECTING = "collecting"
    #: Nothing more goes to the client; the upstream is stopped.
    ENDED = "ended"
    #: The access record was written.
    RECORDED = "recorded"


_OVER = frozenset({Phase.ENDED, Phase.RECORDED})


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


@implementer(IExchange)
class Exchange:
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
        self.deadlines = Deadlines(clock, lambda: self.downstream.paused)
        self.failover: Failover | None = None
        self._protocol = PASSTHROUGH
        self._body: dict[str, Any] = {}
        self._raw = b""
        self._query = ""
        self._client_stream = False
        self._upstream_d: Any = None
        self._relay: IRelay | None = None
        self._stages: Sequence[IStreamStage] | None = None
        self._observe_gap: Callable[[float], None] | None = _UNASKED

    # -- the request ----------------------------------------------------------

    def start(self) -> None:
        """
        Handle the request: answer it directly on a client error, else send
        it upstream.
        """
        request = self.request
        context = self.context
        context.method = request.method.decode("latin-1")
        context.path = request.path.decode("latin-1")
        self.downstream.when_finished(self._client_finished, self._client_lost)
        if self.monitor is not None:
            self.monitor.exchange_started(self)
        try:
            failover = self._prepare()
            if failover is None:
                return
            self._arm_duration_limit()
            instance = failover.first()
            if instance is None:
                # Every instance serving the protocol is out of use (weight
                # 0 beside others): APISIX's "all servers tried".
                self._answer_error(503, "no AI instance available")
                return
            self._try(instance)
        except ClientError as e:
            self._answer_error(e.status, e.message)
        except Exception:
            # A request filter (or a bug) failed: a JSON 500 and a true record.
            self._bug(Failure())

    def _prepare(self) -> Failover | None:
        """
        Check the client's request and run the request filters, once for
        every attempt.

        @return: the request's attempts, or L{None} when a request filter
            already answered.
        @raise ClientError: when the client's request is refused.
        """
        request = self.request
        context = self.context
        route = self.route
        raw = request.content.read() if request.content is not None else b""
        context.bytes_in = len(raw)
        if len(raw) > self.conf["max_req_body_size"]:
            raise ClientError(413, too_large_message(len(raw), self.conf["max_req_body_size"]))
        check_content_type(request.getHeader(b"content-type"))
        body = parse_body(raw)
        protocol = detect(context.path, body)
        serving = [i for i in route.instances if i.target.provider.serves(protocol)]
        if not serving:
            providers = ", ".join(dict.fromkeys(i.target.provider.name for i in route.instances))
            raise ClientError(400, f"{protocol} requests are not supported by provider {providers}")
        if len(route.instances) == 1:
            context.provider = serving[0].target.provider.name
        context.protocol = protocol
        context.body = body
        context.stream = self._client_stream = body.get("stream") is True
        model = body.get("model")
        context.request_llm_model = model if isinstance(model, str) else None
        for request_filter in route.request_filters:
            result = request_filter.filter_request(context)
            if isinstance(result, Reject):
                self.downstream.prepare(result.status, _JSON)
                self._answer(json.dumps(result.body).encode("utf-8"))
                return None
        self._protocol = protocol
        self._body = context.body
        self._raw = raw
        self._query = request.uri.partition(b"?")[2].decode("latin-1")
        self.failover = Failover(route, route.selection(request, protocol), self.clock.seconds)
        return self.failover

    # -- attempts ---------------------------------------------------------------

    def _try(self, instance: Instance) -> None:
        """
        Send the request to C{instance}: a fresh upstream request from the
        checked body, with the instance's URL, credentials and body changes.
        """
        context = self.context
        target = instance.target
        protocol = self._protocol
        body = self._body
        if len(self.route.instances) > 1:
            # Each instance changes the body its own way (options, model).
            body = copy.deepcopy(body)
        context.instance = instance.name
        context.provider = target.provider.name
        changed = apply_body_overrides(body, protocol, target) or context.body_changed
        context.body = body
        model = body.get("model")
        if isinstance(model, str):
            context.llm_model = model
        raw = self._raw
        if changed:
            raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        url = instance.upstream_url(protocol, context.path, self._query)
        headers = upstream_headers(
            self.request.requestHeaders.getAllRawHeaders(), target.conf["auth"]
        )
        method = context.method if protocol == PASSTHROUGH else "POST"
        assert self.failover is not None
        attempt = self.failover.begin(instance)
        timings = self.timings
        if timings.first_sent is None:
            timings.first_sent = attempt.started
        timings.sent = attempt.started
        self.phase = Phase.WAITING
        self._arm_waiting_timers()
        d = self._upstream_d = instance.client.request(method, url, headers, raw)
        d.addCallbacks(
            self._got_response,
            self._request_failed,
            callbackArgs=(attempt,),
            errbackArgs=(attempt,),
        )
        d.addErrback(self._bug)

    def _current(self, attempt: Attempt) -> bool:
        """
        Whether C{attempt} is the one in progress of a running exchange.
        """
        assert self.failover is not None
        return (
            attempt is self.failover.current and attempt.ended is None and self.phase not in _OVER
        )

    def _fallback(self, status: int) -> Instance | None:
        """
        The instance to fall back to after the current attempt failed with
        C{status} (nothing was sent to the client yet), or L{None}.
        """
        if self.phase in _OVER or self.context.output_started or self.failover is None:
            return None
        return self.failover.next(status)

    def _switch_to(self, instance: Instance) -> None:
        """
        Give the current attempt up (its connection is closed, never
        pooled) and send the request to C{instance}.
        """
        assert self.failover is not None
        self.failover.give_up()
        self.deadlines.drop_attempt()
        self._stop_upstream()
        self.downstream.unpace()
        self.downstream.discard()
        self.timings.first_chunk = None
        self.context.stream = self._client_stream
        self.context.reset_response()
        try:
            self._try(instance)
        except Exception:
            self._bug(Failure())

    def _attempt_failed(self, reason: str, status: int, message: str) -> None:
        """
        The current attempt failed (before or after output): fall back to
        another instance if allowed, else end the response early (with 502
        when every instance failed).
        """
        if self.phase in _OVER:
            return
        instance = self._fallback(status)
        if instance is not None:
            self._switch_to(instance)
            return
        assert self.failover is not None
        self._end_early(reason, 502 if self.failover.exhausted else status, message)

    def _request_failed(self, failure: Failure, attempt: Attempt) -> None:
        """
        No response from upstream: the connect, send or header phase failed.
        """
        if not self._current(attempt):
            return
        self._upstream_d = None
        context = self.context
        context.upstream_response_time_ms = _ms(self.clock.seconds() - context.started)
        self._attempt_failed(*classify(failure))

    # -- the answer -------------------------------------------------------------

    def _got_response(self, response: Any, attempt: Attempt) -> None:
        """
        The upstream's status and headers arrived: fall back on a status
        that allows it, else relay the body.
        """
        if not self._current(attempt):
            response.deliverBody(DiscardBody())
            return
        self._upstream_d = None
        context = self.context
        context.upstream_response_time_ms = _ms(self.clock.seconds() - context.started)
        attempt.status = code = response.code
        if code >= 400:
            instance = self._fallback(code)
            if instance is not None:
                # The error body is not read: the connection is closed.
                response.deliverBody(DiscardBody())
                self._switch_to(instance)
                return
        assert self.failover is not None
        # Every instance failed: 502 with the last one's error body.
        status = 502 if self.failover.exhausted else code
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        headers = [(b"content-type", [content_type])] if content_type else []
        for name, values in response.headers.getAllRawHeaders():
            lower = name.lower()
            if lower in _RELAYED_HEADERS or lower.startswith(_RELAYED_PREFIXES):
                headers.append((name, values))
        if code < 300 and content_type.lower().startswith(_STREAM_TYPES):
            headers += [(b"cache-control", [b"no-cache"]), (b"x-accel-buffering", [b"no"])]
            self.downstream.prepare(status, headers)
            self._relay_stream(response, content_type)
        else:
            self.downstream.prepare(status, headers)
            self._collect(response, status)

    def _relay_stream(self, response: Any, content_type: bytes) -> None:
        """
        Relay a streamed response chunk by chunk (held back first when
        C{stream_commit_ms} allows a fallback).
        """
        context = self.context
        context.stream = True
        conf = self.conf
        assert self.failover is not None
        if content_type.lower().startswith(_EVENTSTREAM):
            decoder: Any = EventStreamDecoder()
            observer: Any = NULL_OBSERVER
            # Binary framing has no comments: every chunk is activity.
            idle_counts_all = True
            hold = False
        else:
            decoder = SSEDecoder()
            observer = observer_for(context.protocol or PASSTHROUGH)
            idle_counts_all = bool(conf.get("stream_idle_timeout_counts_comments"))
            hold = not context.output_started and self.failover.may_hold()
        stages = () if hold else self._open_stages()
        write = self.downstream.start_stream(conf["streaming_flush_interval_ms"])
        self._arm_duration_limit()
        observe_gap = self._stream_observer()
        args: tuple[Any, ...] = (
            context,
            self.clock,
            self.deadlines,
            conf.get("max_response_bytes"),
            self._body_started,
            decoder,
            observer,
            write,
            idle_counts_all,
        )
        stream = (
            StreamRelay(*args)
            if observe_gap is None
            else TimedStreamRelay(*args, timings=self.timings, observe_gap=observe_gap)
        )
        stream.done.addCallback(self._relay_ended).addErrback(self._bug)
        if hold:
            held = self._relay = HeldRelay(stream, self._released)
            held.failed.addCallback(self._held_failed, held).addErrback(self._bug)
            self.phase = Phase.HOLDING
            self.deadlines.arm("commit", self.failover.commit_s, held.release)
            response.deliverBody(held)
        else:
            stream.open(stages)
            self._relay = stream
            self.phase = Phase.RELAYING
            response.deliverBody(stream)

    def _collect(self, response: Any, status: int) -> None:
        """
        Collect a non-streamed response, within C{max_response_bytes}.
        """
        limit = self.conf.get("max_response_bytes")
        # A body without Content-Length has the length UNKNOWN_LENGTH, a str.
        length = response.length if isinstance(response.length, int) else None
        if limit is not None and length is not None and length > limit:
            response.deliverBody(DiscardBody())
            self._end_early("max_response_bytes", 502, "max_response_bytes exceeded")
            return
        relay = BufferedRelay(
            self.context,
            self.clock,
            self.deadlines,
            limit,
            self._body_started,
            status,
            self._open_stages,
        )
        relay.done.addCallback(self._relay_ended).addErrback(self._bug)
        self._relay = relay
        self.phase = Phase.COLLECTING
        response.deliverBody(relay)

    def _stream_observer(self) -> Callable[[float], None] | None:
        """
        The monitor's chunk-gap observer (asked once, at the first stream).
        """
        if self._observe_gap is _UNASKED:
            monitor = self.monitor
            self._observe_gap = None if monitor is None else monitor.stream_started(self)
        return self._observe_gap

    def _open_stages(self) -> Sequence[IStreamStage]:
        """
        The stream stages of the response that reaches the client: its body
        filter chain, opened once (an attempt given up before output fed
        them nothing).
        """
        stages = self._stages
        if stages is None:
            context = self.context
            chain = open_chain(self.route.body_filters, context)
            stages = self._stages = () if chain is None else (chain,)
            context.wants_text = chain is not None or bool(
                (self.conf.get("logging") or {}).get("payloads")
            )
        return stages

    def _body_started(self, transport: IPushProducer) -> None:
        """
        The upstream body transfer began: the client's connection now
        paces it, and reads are timed.
        """
        deadlines = self.deadlines
        self.downstream.pace(transport, deadlines.touch)
        deadlines.arm_silence(
            "read",
            self.conf["timeout"],
            lambda: deadlines.last_chunk,
            lambda: self._attempt_failed("timeout", 504, "upstream read timed out"),
        )
        idle = self.conf.get("stream_idle_timeout_ms")
        if idle is not None and self.phase in (Phase.HOLDING, Phase.RELAYING):
            deadlines.arm_silence(
                "idle",
                idle,
                lambda: deadlines.last_data,
                lambda: self._attempt_failed(
                    "stream_idle_timeout_ms", 504, "stream_idle_timeout_ms exceeded"
                ),
            )

    # -- stream_commit_ms -------------------------------------------------------

    def _released(self) -> Sequence[IStreamStage] | None:
        """
        The held stream is released: its stages, or L{None} when opening
        them failed (the response was ended).
        """
        self.deadlines.cancel("commit")
        self.phase = Phase.RELAYING
        try:
            return self._open_stages()
        except Exception:
            log.failure("starting the body filters failed")
            self._end_early("internal_error", 502, "internal error while relaying the response")
            return None

    def _held_failed(self, failure: HeldFailure, held: HeldRelay) -> None:
        """
        A held stream failed before content. Fall back if allowed; when
        every instance failed, answer 502 with the error; else relay the
        stream as it came.
        """
        if self.phase in _OVER:
            return
        assert self.failover is not None
        attempt = self.failover.current
        assert attempt is not None
        instance = self._fallback(HELD_FAILURE_STATUS)
        if instance is not None or self.failover.exhausted:
            attempt.status = HELD_FAILURE_STATUS
        if instance is not None:
            self._switch_to(instance)
        elif self.failover.exhausted:
            self.context.abort_reason = "upstream_error"
            self._stop()
            self.downstream.prepare(502, _JSON)
            self._answer(held_error_body(failure.error))
        else:
            held.release()
            if failure.ended is not None and self.phase not in _OVER:
                held.relay_end(failure.ended)

    # -- endings ----------------------------------------------------------------

    def _relay_ended(self, outcome: Outcome) -> None:
        """
        The relay's body ended: end the response as its outcome says.
        """
        if self.phase in _OVER:
            return
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

    def _answer(self, body: bytes) -> None:
        """
        Answer whole with the prepared head and C{body}; the exchange ends.
        """
        self.phase = Phase.ENDED
        self.deadlines.cancel_all()
        self.downstream.respond(body)

    def _answer_error(self, status: int, message: str) -> None:
        """
        Answer with C{status} and C{{"message": message}}.
        """
        self.downstream.prepare(status, _JSON)
        self._answer(error_body(message))

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
        if self._upstream_d is not None:
            # Not guarded by d.called: once connected, treq's Deferred has
            # fired and waits on the Agent's request Deferred, and cancel()
            # forwards to it (closing the connection).
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
        if self.phase in _OVER:
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
            self._answer_error(status, message)
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
        self.downstream.prepare(
            result.status, ((b"content-type", [result.content_type.encode("latin-1")]),)
        )
        self._answer(result.data)

    def abort(self, reason: str) -> None:
        """
        End the exchange now (the gateway is shutting down): 503 before any
        output, else an error event in the client's protocol and a closed
        connection; the upstream transfer is stopped.
        """
        self._end_early(reason, 503, "server shutting down")

    def _bug(self, failure: Failure) -> None:
        """
        A programming error in a callback: log it and answer 500 if possible.
        """
        log.failure("proxying a request failed", failure)
        self._end_early("internal_error", 500, "internal error")

    # -- the client side --------------------------------------------------------

    def _client_finished(self, _: object) -> None:
        """
        The response was fully written.
        """
        self._record()

    def _client_lost(self, reason: Failure) -> None:
        """
        The client's connection closed before the response was complete.
        """
        if self.phase not in _OVER:
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
        now = self.clock.seconds()
        attempts = [] if self.failover is None else self.failover.records(now)
        record = exchange_record(context, attempts, self.conf.get("logging"), now)
        log_access(record)
        if self.monitor is not None:
            self.monitor.exchange_ended(self, record, self.timings)

    # -- timers -----------------------------------------------------------------

    def _arm_duration_limit(self) -> None:
        """
        Enforce C{max_stream_duration_ms} from the request's start, by a
        timer (so a silent upstream is cut too); streams only.
        """
        limit = self.conf.get("max_stream_duration_ms")
        if limit is None or not self.context.stream:
            return
        remaining = self.context.started + limit / 1000.0 - self.clock.seconds()
        self.deadlines.arm_once(
            "duration",
            max(remaining, 0.0),
            lambda: self._end_early(
                "max_stream_duration_ms", 504, "max_stream_duration_ms exceeded"
            ),
        )

    def _arm_waiting_timers(self) -> None:
        """
        While no event has come from the attempt's upstream:
        C{first_token_timeout_ms} ends the wait (from the attempt's start);
        and until an upstream's first body byte,
        C{keepalive_comment_interval_ms} sends C{:} SSE comments to a
        streaming client so idle-timeout hops keep the connection (they
        commit a 200 event-stream response, so no fallback follows them).
        """
        first_token = self.conf.get("first_token_timeout_ms")
        if first_token is not None:
            self.deadlines.arm(
                "first_token",
                first_token / 1000.0,
                lambda: self._attempt_failed(
                    "first_token_timeout_ms", 504, "first_token_timeout_ms exceeded"
                ),
            )
        interval = self.conf.get("keepalive_comment_interval_ms")
        if interval is not None and self.context.stream and not self.deadlines.active("keepalive"):
            self.deadlines.arm("keepalive", interval / 1000.0, self._keepalive)

    def _keepalive(self) -> None:
        """
        Send one keep-alive comment and schedule the next; they never reach
        the filters or the figures.
        """
        if self.phase in _OVER:
            return
        self.downstream.keepalive()
        self.deadlines.arm(
            "keepalive", self.conf["keepalive_comment_interval_ms"] / 1000.0, self._keepalive
        )
