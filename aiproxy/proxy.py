# -*- test-case-name: tests.test_proxy -*-
"""
One proxied request, from the client's body to the last byte relayed back.

An L{Exchange} checks the client's request once, then makes one upstream
attempt after another: the route's balancer picks an instance, the request
is built for it (its URL, credentials and body changes) and sent with its
treq client. An attempt that fails before any output (an error status, a
transport failure, a stream failing before its first content while
C{stream_commit_ms} holds it) may fall back to another instance, as the
route's L{aiproxy.routes.FallbackPolicy} allows; otherwise the answer is
relayed: a streamed response chunk by chunk through the SSE decoder, the
protocol observer, the body filters and the flush writer; a non-streamed one
whole. The client's connection is the consumer of the upstream body
(backpressure), and one C{_stop_upstream} tears the upstream transfer down
whatever phase it is in.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.server import Request
from zope.interface import implementer

from aiproxy.accesslog import log_access
from aiproxy.context import ExchangeContext
from aiproxy.eventstream import EventStreamDecoder
from aiproxy.filters import BodyFilterChain, Reject, Terminate, open_chain
from aiproxy.protocols import (
    ANTHROPIC_MESSAGES,
    NULL_OBSERVER,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    PASSTHROUGH,
    STREAM_CONTENT,
    STREAM_ERROR,
    error_event,
    observer_for,
    stream_signal,
)
from aiproxy.request import (
    ClientError,
    apply_body_overrides,
    check_content_type,
    detect,
    parse_body,
    too_large_message,
    upstream_headers,
)
from aiproxy.routes import Instance, Route
from aiproxy.sse import SSEDecoder
from aiproxy.writer import make_writer

__all__ = ["Exchange"]

log = Logger()

#: Upstream response headers relayed to the client besides its content type.
_RELAYED_HEADERS = (b"x-request-id", b"request-id", b"retry-after", b"retry-after-ms")
_RELAYED_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-", b"ratelimit")

_STREAM_TYPES = (b"text/event-stream", b"application/vnd.amazon.eventstream")

#: How long a client connection closed after a cut response may take to
#: receive what was written to it before the channel times it out (and
#: aborts it, its abortTimeout later).
_CLOSE_GRACE_S = 15.0

#: Headers of a response whose first bytes are keep-alive comments.
_KEEPALIVE_HEADERS = (
    (b"content-type", [b"text/event-stream"]),
    (b"cache-control", [b"no-cache"]),
    (b"x-accel-buffering", [b"no"]),
)

#: Protocols whose streams end with their own event: one that ends without
#: it was cut short, whatever the HTTP framing says.
_TERMINATED_PROTOCOLS = frozenset({OPENAI_CHAT, ANTHROPIC_MESSAGES, OPENAI_RESPONSES})

#: The timers of one upstream attempt (the others run for the whole request).
_ATTEMPT_TIMERS = ("read", "idle", "first_token", "commit")

#: The status a stream failing before its first content counts as.
_HELD_FAILURE_STATUS = 502


class _Attempt:
    """
    One upstream attempt of an exchange.

    @ivar status: the upstream's status (L{None} until it answered, or if
        it never did; 502 for a held stream that failed before content).
    @ivar ended: when it failed (L{None} for the attempt that answers).
    """

    __slots__ = ("instance", "started", "status", "ended")

    def __init__(self, instance: Instance, started: float) -> None:
        self.instance = instance
        self.started = started
        self.status: int | None = None
        self.ended: float | None = None


def _ignore(*args: object) -> None:
    """
    A detached body receiver's callbacks.
    """


class _BodyReceiver(Protocol):
    """
    Receives an upstream response body for an L{Exchange}.
    """

    def __init__(self, on_start: Any, on_chunk: Any, on_end: Any) -> None:
        self._on_start = on_start
        self._on_end = on_end
        # Bound directly: one call per chunk on the hot path, not two.
        self.dataReceived = on_chunk  # type: ignore[method-assign]

    def connectionMade(self) -> None:
        self._on_start(self.transport)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._on_end(reason)

    def attach(self, on_chunk: Any, on_end: Any) -> None:
        """
        Send the rest of the body to C{on_chunk} and its end to C{on_end}.
        """
        self.dataReceived = on_chunk  # type: ignore[method-assign]
        self._on_end = on_end

    def detach(self) -> None:
        """
        Ignore whatever else this body does (its attempt was given up).
        """
        self.attach(_ignore, _ignore)
        self._on_start = _ignore


@implementer(IPushProducer)
class _Pacer:
    """
    The upstream body transport as the producer of the client's connection:
    a full client socket pauses the upstream read. The exchange sees whether
    it is paused, as a paused upstream is not a silent one.
    """

    __slots__ = ("_transport", "_on_resume", "paused")

    def __init__(self, transport: Any, on_resume: Any) -> None:
        self._transport = transport
        self._on_resume = on_resume
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self._on_resume()
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._transport.stopProducing()


class _Discard(Protocol):
    """
    Receives an upstream body nobody wants: stops the transfer at once.
    """

    def connectionMade(self) -> None:
        # deliverBody hands its protocol a producer (TransportProxyProducer),
        # not the ITransport that Twisted's Protocol declares.
        cast(IPushProducer, self.transport).stopProducing()


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class Exchange:
    """
    One client request proxied to the route's upstream instances.

    @ivar attempts: the upstream attempts so far, in order.
    """

    def __init__(
        self, route: Route, request: Request, clock: IReactorTime, monitor: Any = None
    ) -> None:
        """
        @param monitor: the gateway's L{aiproxy.interfaces.IExchangeMonitor},
            told when this exchange starts, streams and ends; or L{None}.
        """
        self.route = route
        self.request = request
        self.clock = clock
        self.monitor = monitor
        #: When the current attempt's request was sent, and the status it
        #: answered; when the first attempt was sent.
        self.upstream_started_at: float | None = None
        self.upstream_status: int | None = None
        self.first_sent_at: float | None = None
        #: Timed only when the monitor wants chunk timings (metrics on): the
        #: first upstream chunk, and the first body bytes to the client.
        self.first_chunk_at: float | None = None
        self.first_output_at: float | None = None
        self._observe_gap: Callable[[float], None] | None = None
        self.conf = route.conf
        self.context = ExchangeContext(route.id, route.instance_name, clock.seconds())
        self.attempts: list[_Attempt] = []
        #: The attempt in progress (L{None} between two).
        self._attempt: _Attempt | None = None
        self._selection: Any = None
        self._retries = 0
        #: Every instance the request could go to was tried.
        self._exhausted = False
        #: The client's request, checked once for every attempt.
        self._protocol = PASSTHROUGH
        self._body: dict[str, Any] = {}
        self._raw = b""
        self._query = ""
        self._client_stream = False
        self._receiver: _BodyReceiver | None = None
        #: Upstream chunks held back by C{stream_commit_ms} (L{None}: not
        #: holding), their size, and the decoder looking for content.
        self._held: list[bytes] | None = None
        self._held_size = 0
        self._held_decoder: SSEDecoder | None = None
        self._stream_reported = False
        self._upstream_d: Any = None
        self._body_transport: Any = None
        self._pacer: _Pacer | None = None
        self._timers: dict[str, IDelayedCall] = {}
        self._response_status = 200
        self._response_headers: list[tuple[bytes, list[bytes]]] = []
        self._stream = False
        self._received = 0
        self._max_bytes: int | None = self.conf.get("max_response_bytes")
        self._last_chunk = 0.0
        #: When the upstream last sent an event (comments do not count).
        self._last_data = 0.0
        #: No event (or non-stream byte) has come from upstream yet.
        self._awaiting_data = True
        #: Every upstream chunk restarts C{stream_idle_timeout_ms}, comments
        #: included (set for SSE by C{stream_idle_timeout_counts_comments}).
        self._idle_counts_all = bool(self.conf.get("stream_idle_timeout_counts_comments"))
        self._body_parts: list[bytes] = []
        self._chain: BodyFilterChain | None = None
        self._chain_opened = False
        self._decoder: Any = None
        self._observer: Any = None
        self._writer: Any = None
        #: No more bytes go to the client and the upstream is (being) stopped.
        self._ended = False
        #: The access record was written.
        self._logged = False

    # -- request --------------------------------------------------------

    def start(self) -> None:
        """
        Handle the request: answer it directly on a client error, else send
        it upstream.
        """
        request = self.request
        context = self.context
        context.method = request.method.decode("latin-1")
        context.path = request.path.decode("latin-1")
        request.notifyFinish().addCallbacks(self._client_finished, self._client_lost)
        if self.monitor is not None:
            self.monitor.exchange_started(self)
        try:
            if not self._prepare():
                return
            self._arm_duration_limit()
            instance = self._selection.next()
            if instance is None:
                # Every instance serving the protocol is out of use (weight
                # 0 beside others): APISIX's "all servers tried".
                self._respond_error(503, "no AI instance available")
                return
            self._try(instance)
        except ClientError as e:
            self._respond_error(e.status, e.message)
        except Exception:
            # A request filter (or a bug) failed: a JSON 500 and a true record.
            self._bug(Failure())

    def _prepare(self) -> bool:
        """
        Check the client's request and run the request filters, once for
        every attempt.

        @return: whether to go upstream (not when a request filter already
            answered).
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
                self._respond_json(result.status, result.body)
                return False
        self._protocol = protocol
        self._body = context.body
        self._raw = raw
        self._query = request.uri.partition(b"?")[2].decode("latin-1")
        self._selection = route.selection(request, protocol)
        return True

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
        now = self.clock.seconds()
        attempt = self._attempt = _Attempt(instance, now)
        self.attempts.append(attempt)
        if self.first_sent_at is None:
            self.first_sent_at = now
        self.upstream_started_at = now
        self._arm_waiting_timers()
        d = self._upstream_d = instance.client.request(method, url, headers, raw)
        d.addCallbacks(
            self._got_response,
            self._upstream_failed,
            callbackArgs=(attempt,),
            errbackArgs=(attempt,),
        )
        d.addErrback(self._bug)

    # -- falling back -----------------------------------------------------

    def _next_instance(self, status: int) -> Instance | None:
        """
        The instance to fall back to now that the current attempt failed
        with C{status} (APISIX's C{retry_on_error}), or L{None}: nothing was
        sent to the client yet, the route has several instances, the
        fallback policy allows C{status}, the attempt failed within
        C{retry_on_failure_within_ms}, C{max_retries} is not reached, and an
        instance is left (if not, L{_exhausted} is set).
        """
        route = self.route
        attempt = self._attempt
        if (
            self._ended
            or attempt is None
            or self.context.output_started
            or len(route.instances) < 2
            or not route.fallback.allows(status)
        ):
            return None
        policy = route.fallback
        elapsed = _ms(self.clock.seconds() - attempt.started)
        if policy.within_ms is not None and elapsed > policy.within_ms:
            log.warn(
                "ai instance {instance} failed after {elapsed}ms, exceeding "
                "retry_on_failure_within_ms {limit}, not retrying",
                instance=attempt.instance.name,
                elapsed=elapsed,
                limit=policy.within_ms,
            )
            return None
        if policy.max_retries is not None:
            self._retries += 1
            if self._retries > policy.max_retries:
                log.warn(
                    "reached max_retries {max_retries}, not retrying",
                    max_retries=policy.max_retries,
                )
                return None
        instance = self._selection.next()
        if instance is None:
            self._exhausted = True
            log.warn(
                "ai instance {instance} returned status {status}; no instance left to fall back to",
                instance=attempt.instance.name,
                status=status,
            )
            return None
        log.warn(
            "ai instance {instance} returned status {status}, falling back to {next_instance}",
            instance=attempt.instance.name,
            status=status,
            next_instance=instance.name,
        )
        return instance

    def _fall_back(self, status: int) -> bool:
        """
        Try the request on another instance if the failure of the current
        attempt with C{status} allows it.

        @return: whether a new attempt started.
        """
        instance = self._next_instance(status)
        if instance is None:
            return False
        self._switch_to(instance)
        return True

    def _switch_to(self, instance: Instance) -> None:
        """
        Give the current attempt up (its connection is closed, never
        pooled) and send the request to C{instance}.
        """
        attempt = self._attempt
        if attempt is not None:
            attempt.ended = self.clock.seconds()
        self._abort_attempt()
        self._reset_attempt()
        try:
            self._try(instance)
        except Exception:
            self._bug(Failure())

    def _abort_attempt(self) -> None:
        """
        Stop the current attempt's upstream transfer in whatever phase it
        is, without ending the exchange.
        """
        self._attempt = None
        for name in _ATTEMPT_TIMERS:
            self._cancel_timer(name)
        if self._receiver is not None:
            self._receiver.detach()
            self._receiver = None
        self._abort_transfer()
        if self._pacer is not None:
            self._pacer = None
            self.request.unregisterProducer()

    def _reset_attempt(self) -> None:
        """
        Forget what the given-up attempt received.
        """
        self._response_status = 200
        self._response_headers = []
        self._stream = False
        self._received = 0
        self._body_parts = []
        self._decoder = None
        self._observer = None
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
        self._awaiting_data = True
        self._idle_counts_all = bool(self.conf.get("stream_idle_timeout_counts_comments"))
        self._held = None
        self._held_size = 0
        self._held_decoder = None
        self.upstream_status = None
        self.first_chunk_at = None
        self.context.stream = self._client_stream
        self.context.reset_response()

    def _upstream_error(self, reason: str, status: int, message: str) -> None:
        """
        The current attempt failed (before or after output): fall back to
        another instance if allowed, else end the response as L{_cut} does
        (with 502 when every instance failed).
        """
        if self._ended:
            return
        if self._fall_back(status):
            return
        self._cut(reason, 502 if self._exhausted else status, message)

    # -- upstream answer ------------------------------------------------

    def _got_response(self, response: Any, attempt: _Attempt) -> None:
        """
        The upstream's status and headers arrived: fall back on a status
        that allows it, else relay the body.
        """
        if attempt is not self._attempt:
            response.deliverBody(_Discard())
            return
        self._upstream_d = None
        context = self.context
        context.upstream_response_time_ms = _ms(self.clock.seconds() - context.started)
        if self._ended:
            response.deliverBody(_Discard())
            return
        attempt.status = self.upstream_status = response.code
        if response.code >= 400:
            instance = self._next_instance(response.code)
            if instance is not None:
                # The error body is not read: the connection is closed.
                response.deliverBody(_Discard())
                self._switch_to(instance)
                return
        # Every instance failed: 502 with the last one's error body.
        self._response_status = 502 if self._exhausted else response.code
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        relayed = [(b"content-type", [content_type])] if content_type else []
        for name, values in response.headers.getAllRawHeaders():
            lower = name.lower()
            if lower in _RELAYED_HEADERS or lower.startswith(_RELAYED_PREFIXES):
                relayed.append((name, values))
        self._response_headers = relayed
        if response.code < 300 and content_type.lower().startswith(_STREAM_TYPES):
            self._start_stream(response, content_type)
        else:
            self._start_buffered(response)

    def _start_stream(self, response: Any, content_type: bytes) -> None:
        """
        Relay a streamed response chunk by chunk.
        """
        context = self.context
        context.stream = True
        self._stream = True
        self._response_headers += [
            (b"cache-control", [b"no-cache"]),
            (b"x-accel-buffering", [b"no"]),
        ]
        hold = False
        if content_type.lower().startswith(b"application/vnd.amazon.eventstream"):
            self._decoder = EventStreamDecoder()
            self._observer = NULL_OBSERVER
            # Binary framing has no comments: every chunk is activity.
            self._idle_counts_all = True
        else:
            self._decoder = SSEDecoder()
            self._observer = observer_for(context.protocol or PASSTHROUGH)
            hold = self._may_hold()
        if not hold:
            self._open_chain()
        self._writer = make_writer(self._send, self.clock, self.conf["streaming_flush_interval_ms"])
        self._arm_duration_limit()
        if self.monitor is not None and not self._stream_reported:
            self._stream_reported = True
            self._observe_gap = self.monitor.stream_started(self)
            if self._observe_gap is not None:
                # Chunk timings wanted: the body receiver built below gets
                # the timing wrapper (this instance attribute shadows the
                # method); without metrics the hot path is untouched.
                self._stream_chunk = self._timed_chunk  # type: ignore[method-assign]
        if hold:
            self._held = []
            self._held_size = 0
            self._held_decoder = SSEDecoder()
            receiver = _BodyReceiver(
                self._body_started, self._hold_chunk, self._guarded(self._held_ended)
            )
            commit_ms = self.route.fallback.commit_ms
            assert commit_ms is not None
            self._arm("commit", commit_ms / 1000.0, self._release)
        else:
            receiver = _BodyReceiver(
                self._body_started, self._stream_chunk, self._guarded(self._stream_ended)
            )
        self._receiver = receiver
        response.deliverBody(receiver)

    def _open_chain(self) -> None:
        """
        Start the body filters on the response that reaches the client
        (once: an attempt given up before output fed them nothing).
        """
        if self._chain_opened:
            return
        self._chain_opened = True
        context = self.context
        self._chain = open_chain(self.route.body_filters, context)
        context.wants_text = self._chain is not None or bool(
            (self.conf.get("logging") or {}).get("payloads")
        )

    # -- stream_commit_ms ---------------------------------------------------

    def _may_hold(self) -> bool:
        """
        Whether to hold this stream until its first content: the route has
        C{stream_commit_ms} and a failure before content could still fall
        back (several instances, 5xx allowed, retries left, nothing sent).
        """
        route = self.route
        policy = route.fallback
        return (
            policy.commit_ms is not None
            and len(route.instances) > 1
            and policy.allows(_HELD_FAILURE_STATUS)
            and (policy.max_retries is None or self._retries < policy.max_retries)
            and not self.context.output_started
        )

    def _hold_chunk(self, data: bytes) -> None:
        """
        A chunk of a held stream: kept back, and looked at for the first
        content event (release) or an in-band error (fall back).
        """
        if self._ended or self._held is None:
            return
        try:
            if self._observe_gap is not None:
                self._note_gap()
            decoder = self._held_decoder
            assert decoder is not None
            self._held_size += len(data)
            events = self._arrival(data, decoder, self._held_size)
            if events is None:
                return
            self._held.append(data)
            protocol = self.context.protocol or PASSTHROUGH
            for event in events:
                signal = stream_signal(protocol, event)
                if signal == STREAM_CONTENT:
                    self._release()
                    return
                if signal == STREAM_ERROR:
                    self._held_failed(event.data, None)
                    return
        except Exception:
            log.failure("holding a stream chunk failed")
            self._cut("internal_error", 502, "internal error while relaying the response")

    def _release(self) -> None:
        """
        Stop holding the stream (its first content came, or
        C{stream_commit_ms} is over): relay what was held, then the rest as
        usual.
        """
        held = self._held
        if held is None or self._ended:
            return
        self._held = None
        self._held_decoder = None
        self._cancel_timer("commit")
        if self._receiver is not None:
            self._receiver.attach(self._stream_chunk, self._guarded(self._stream_ended))
        try:
            self._open_chain()
        except Exception:
            log.failure("starting the body filters failed")
            self._cut("internal_error", 502, "internal error while relaying the response")
            return
        for chunk in held:
            Exchange._stream_chunk(self, chunk)
            if self._ended:
                return
        if (
            self._observe_gap is not None
            and self.first_output_at is None
            and self.context.bytes_out
        ):
            self.first_output_at = self.clock.seconds()

    def _held_ended(self, reason: Failure) -> None:
        """
        A held stream ended before its first content.
        """
        if self._ended:
            return
        self._body_transport = None
        if self._body_failed(reason):
            return
        self._held_failed(None, reason)

    def _held_failed(self, error: bytes | None, ended: Failure | None) -> None:
        """
        A held stream failed before content: an in-band C{error} event, or
        its end (C{ended}). Fall back if allowed; when every instance
        failed, answer 502 with the error; else relay the stream as it came.
        """
        attempt = self._attempt
        assert attempt is not None
        instance = self._next_instance(_HELD_FAILURE_STATUS)
        if instance is not None or self._exhausted:
            attempt.status = _HELD_FAILURE_STATUS
        if instance is not None:
            self._switch_to(instance)
            return
        if self._exhausted:
            self.context.abort_reason = "upstream_error"
            self._stop_upstream()
            self._response_status = 502
            self._response_headers = [(b"content-type", [b"application/json"])]
            self._finish_whole(_held_error_body(error))
            return
        self._release()
        if ended is not None and not self._ended:
            self._stream_ended(ended)

    def _start_buffered(self, response: Any) -> None:
        """
        Collect a non-streamed response, within C{max_response_bytes}.
        """
        limit = self._max_bytes
        # A body without Content-Length has the length UNKNOWN_LENGTH, a str.
        length = response.length if isinstance(response.length, int) else None
        if limit is not None and length is not None and length > limit:
            response.deliverBody(_Discard())
            self._cut("max_response_bytes", 502, "max_response_bytes exceeded")
            return
        response.deliverBody(
            _BodyReceiver(
                self._body_started, self._buffered_chunk, self._guarded(self._buffered_ended)
            )
        )

    def _body_started(self, transport: Any) -> None:
        """
        The upstream body transfer began: the client's connection now
        paces it, and reads are timed.
        """
        if self._ended:
            transport.stopProducing()
            return
        self._body_transport = transport
        self._pacer = _Pacer(transport, self._client_resumed)
        self.request.registerProducer(self._pacer, True)
        self._last_chunk = self._last_data = self.clock.seconds()
        self._arm_silence(
            "read",
            self.conf["timeout"],
            lambda: self._last_chunk,
            "timeout",
            "upstream read timed out",
        )
        idle = self.conf.get("stream_idle_timeout_ms")
        if idle is not None and self._stream:
            self._arm_silence(
                "idle",
                idle,
                lambda: self._last_data,
                "stream_idle_timeout_ms",
                "stream_idle_timeout_ms exceeded",
            )

    def _client_resumed(self) -> None:
        """
        The client's connection drained: the upstream read starts again, with
        whole C{timeout} and C{stream_idle_timeout_ms} windows ahead of it.
        """
        self._last_chunk = self._last_data = self.clock.seconds()

    def _buffered_chunk(self, data: bytes) -> None:
        """
        A piece of a non-streamed body.
        """
        if self._ended:
            return
        self._last_chunk = self.clock.seconds()
        if self._awaiting_data:
            self._first_data()
        self._received += len(data)
        limit = self._max_bytes
        if limit is not None and self._received > limit:
            self._cut("max_response_bytes", 502, "max_response_bytes exceeded")
            return
        self._body_parts.append(data)

    def _body_failed(self, reason: Failure) -> bool:
        """
        If the upstream body ended with an error (not a clean end), end the
        response as an upstream error.

        @return: whether it did.
        """
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            return False
        log.warn("upstream response body failed: {error}", error=reason.getErrorMessage())
        self._upstream_error(
            "upstream_error", 502, "upstream closed the connection before the response was complete"
        )
        return True

    def _buffered_ended(self, reason: Failure) -> None:
        """
        The non-streamed body is complete (or was cut).
        """
        if self._ended:
            return
        self._body_transport = None
        if self._body_failed(reason):
            return
        body = b"".join(self._body_parts)
        self._body_parts = []
        context = self.context
        context.ttft_ms = _ms(self.clock.seconds() - context.started)
        if context.output_started:
            # Keep-alive comments already sent a streamed 200: say it in-band.
            self._cut("upstream_error", 502, _upstream_error_message(self._response_status, body))
            return
        if self._response_status < 400:
            if context.protocol is not None:
                self._observer = observer_for(context.protocol)
                self._observer.observe_body(body, context)
            self._open_chain()
            chain = self._chain
            if chain is not None:
                context.done = True
                out = chain.filter_chunk(body, context)
                if isinstance(out, Terminate):
                    self._terminate(out)
                    return
                tail = chain.finish(context)
                if isinstance(tail, Terminate):
                    self._terminate(tail)
                    return
                body = out + tail
        self._finish_whole(body)

    def _finish_whole(self, body: bytes) -> None:
        """
        Send a whole response with its length and end the exchange.
        """
        self._set_headers()
        self.request.setHeader(b"content-length", b"%d" % len(body))
        self._write(body)
        self._end_cleanly()

    # -- the streaming hot path -----------------------------------------

    def _stream_chunk(self, data: bytes) -> None:
        """
        One chunk of a streamed body: decode, observe, filter, write.
        """
        if self._ended:
            return
        try:
            context = self.context
            self._received += len(data)
            events = self._arrival(data, self._decoder, self._received)
            if events is None:
                return
            if events:
                self._observer.observe_events(events, context)
            chain = self._chain
            if chain is not None:
                context.events = events
                out = chain.filter_chunk(data, context)
                if out.__class__ is not bytes:
                    self._terminate(out)  # type: ignore[arg-type]
                    return
                data = out  # type: ignore[assignment]
            if data:
                self._writer.write(data)
        except Exception:
            log.failure("relaying a stream chunk failed")
            self._cut("internal_error", 502, "internal error while relaying the response")

    def _arrival(self, data: bytes, decoder: Any, size: int) -> list[Any] | None:
        """
        What every upstream chunk of a stream gets, held or relayed: its
        time (TTFT, the end of keep-alive comments), the byte limit, and
        C{stream_idle_timeout_ms} activity.

        @param size: the stream's bytes so far, this chunk included.
        @return: the chunk's decoded events, or L{None} when the byte limit
            ended the response.
        """
        context = self.context
        now = self._last_chunk = self.clock.seconds()
        if context.ttft_ms is None:
            context.ttft_ms = _ms(now - context.started)
            # The upstream's own bytes reach the client from now on: a
            # comment of ours could land inside one of its events.
            self._cancel_timer("keepalive")
        limit = self._max_bytes
        if limit is not None and size > limit:
            self._cut("max_response_bytes", 502, "max_response_bytes exceeded")
            return None
        carried = decoder.pending
        events: list[Any] = decoder.feed(data)
        # A chunk that only held comments (or blank lines) is not activity
        # for stream_idle_timeout_ms; one that completes, continues or
        # starts an event is.
        if events or carried or decoder.pending or self._idle_counts_all:
            self._last_data = now
        if events and self._awaiting_data:
            self._first_data()
        return events

    def _stream_ended(self, reason: Failure) -> None:
        """
        The upstream body ended: normally, or cut short.
        """
        if self._ended:
            return
        self._body_transport = None
        context = self.context
        if self._body_failed(reason):
            return
        if self._received == 0:
            # Also after keep-alive comments: never a clean end without content.
            self._upstream_error("upstream_error", 502, "upstream returned an empty stream")
            return
        if not context.done and context.protocol in _TERMINATED_PROTOCOLS:
            self._upstream_error(
                "upstream_incomplete",
                502,
                "upstream ended the stream without its end-of-stream event",
            )
            return
        self._decoder.close()
        if self._chain is not None:
            context.events = []
            tail = self._chain.finish(context)
            if isinstance(tail, Terminate):
                self._terminate(tail)
                return
            if tail:
                self._writer.write(tail)
        self._writer.stop()
        if not context.output_started:
            self._set_headers()
        self._end_cleanly()

    # -- writing to the client ------------------------------------------

    def _set_headers(self) -> None:
        """
        Commit the upstream's status and relayed headers (before any byte).
        """
        request = self.request
        request.setResponseCode(self._response_status)
        for name, values in self._response_headers:
            request.responseHeaders.setRawHeaders(name, values)
        self.context.status = self._response_status
        self.context.output_started = True

    def _send(self, data: bytes) -> None:
        """
        The flush writers' sink: one C{request.write} (one HTTP chunk).
        """
        context = self.context
        if not context.output_started:
            self._set_headers()
        context.bytes_out += len(data)
        context.flushes += 1
        self.request.write(data)

    def _write(self, data: bytes) -> None:
        """
        Write a whole body (or its last bytes).
        """
        if data:
            self.context.bytes_out += len(data)
            self.context.flushes += 1
            self.request.write(data)

    def _respond_json(self, status: int, document: Any) -> None:
        """
        Answer with C{status} and a JSON body (only before any output).
        """
        self._response_status = status
        self._response_headers = [(b"content-type", [b"application/json"])]
        self._finish_whole(json.dumps(document).encode("utf-8"))

    def _respond_error(self, status: int, message: str) -> None:
        """
        Answer with C{status} and C{{"message": message}}.
        """
        self._respond_json(status, {"message": message})

    # -- ending -----------------------------------------------------------

    def _end_cleanly(self) -> None:
        """
        Finish the HTTP response normally.
        """
        self._ended = True
        self._cancel_timers()
        request = self.request
        request.unregisterProducer()
        if not request._disconnected:
            request.finish()

    def _fail(self, reason: str, status: int, message: str) -> None:
        """
        Stop the upstream and answer with an error status (nothing was sent).
        """
        self.context.abort_reason = reason
        self._stop_upstream()
        self._respond_error(status, message)

    def _cut(self, reason: str, status: int, message: str) -> None:
        """
        End the response early for C{reason}: before any output with
        C{status} and a JSON error; after output with a final error event in
        the client's protocol, and a closed connection instead of a clean
        end (never a C{[DONE]}).
        """
        if self._ended:
            return
        context = self.context
        context.abort_reason = reason
        log.warn(
            "aborting AI {kind}: {reason}",
            kind="stream" if context.stream else "request",
            reason=reason,
        )
        if not context.output_started:
            self._fail(reason, status, message)
            return
        self._stop_upstream()
        if self._writer is not None:
            self._writer.stop()
        self._write(
            self._event_break() + error_event(context.protocol or PASSTHROUGH, message, reason)
        )
        self._close_connection()

    def _event_break(self) -> bytes:
        """
        C{\\n\\n} when the bytes relayed so far end inside an SSE event (the
        upstream was cut mid-event), so that the error event after them is
        an event of its own; else nothing.
        """
        decoder = self._decoder
        if isinstance(decoder, SSEDecoder) and decoder.pending:
            return b"\n\n"
        return b""

    def _terminate(self, result: Terminate) -> None:
        """
        A body filter ended the response.
        """
        context = self.context
        context.abort_reason = result.reason
        self._stop_upstream()
        if not context.output_started:
            self._response_status = result.status
            self._response_headers = [(b"content-type", [result.content_type.encode("latin-1")])]
            self._finish_whole(result.data)
            return
        if self._writer is not None:
            self._writer.stop()
        self._write(result.data)
        self._end_cleanly()

    def _close_connection(self) -> None:
        """
        Drop the client connection after what was written, without the
        terminating chunk: the client sees a truncated response.
        """
        self._ended = True
        self._cancel_timers()
        request = self.request
        request.unregisterProducer()
        if not request._disconnected:
            channel = request.channel
            channel.loseConnection()
            # loseConnection waits until the client read everything written;
            # one that stopped reading would keep the connection and its
            # buffers for good, as the channel's idle timeout is off while a
            # request is unfinished: restart it, short. When it fires the
            # channel closes, then aborts after its abortTimeout (15 s).
            channel.setTimeout(_CLOSE_GRACE_S)
        self._log()

    def _stop_upstream(self) -> None:
        """
        Abort the upstream transfer in whatever phase it is; the connection
        is closed, never returned to the pool.
        """
        self._ended = True
        self._cancel_timers()
        self._abort_transfer()

    def _abort_transfer(self) -> None:
        """
        Abort the current upstream transfer: cancel the request before its
        response, or stop reading the body; either way its connection is
        closed.
        """
        if self._upstream_d is not None:
            # Not guarded by d.called: once connected, treq's Deferred has
            # fired and waits on the Agent's request Deferred, and cancel()
            # forwards to it (closing the connection). No response arrived
            # yet, or _got_response would have cleared _upstream_d.
            d, self._upstream_d = self._upstream_d, None
            d.cancel()
        if self._body_transport is not None:
            transport, self._body_transport = self._body_transport, None
            transport.stopProducing()

    # -- client side ------------------------------------------------------

    def _client_finished(self, _: object) -> None:
        """
        The response was fully written.
        """
        self._log()

    def _client_lost(self, reason: Failure) -> None:
        """
        The client's connection closed before the response was complete.
        """
        context = self.context
        if self._ended and context.abort_reason is not None:
            self._log()
            return
        if not self._ended:
            context.abort_reason = "client_disconnect"
            context.status = 499
            log.info("client disconnected during AI streaming, aborting upstream read")
            self._stop_upstream()
            if self._writer is not None:
                self._writer.discard()
        self._log()

    def _log(self) -> None:
        """
        Write the access record, once.
        """
        if self._logged:
            return
        self._logged = True
        context = self.context
        if context.status is None:
            context.status = self._response_status
        record = context.record()
        self._add_to_record(record)
        log_access(record)
        if self.monitor is not None:
            self.monitor.exchange_ended(self, record)

    def _add_to_record(self, record: dict[str, Any]) -> None:
        """
        Add the upstream attempts and the route's C{logging} extras to the
        access record.
        """
        now = self.clock.seconds()
        context = self.context
        record["attempts"] = [
            {
                "instance": attempt.instance.name,
                "status": attempt.status,
                "duration_ms": _ms(
                    (now if attempt.ended is None else attempt.ended) - attempt.started
                ),
            }
            for attempt in self.attempts
        ]
        logging = self.conf.get("logging")
        if logging:
            record.update(llm_logging_fields(context, logging, _ms(now - context.started)))

    # -- control and timing -------------------------------------------------

    def abort(self, reason: str) -> None:
        """
        End the exchange now (the gateway is shutting down): 503 before any
        output, else an error event in the client's protocol and a closed
        connection; the upstream transfer is stopped.
        """
        self._cut(reason, 503, "server shutting down")

    def _timed_chunk(self, data: bytes) -> None:
        """
        L{_stream_chunk} with timings, when the monitor wants them: the gap
        since the previous chunk, the first chunk's arrival and the first
        body bytes sent to the client.
        """
        if self._ended:
            return
        self._note_gap()
        if self.first_output_at is None:
            sent = self.context.bytes_out
            Exchange._stream_chunk(self, data)
            if self.context.bytes_out > sent:
                self.first_output_at = self.clock.seconds()
            return
        Exchange._stream_chunk(self, data)

    def _note_gap(self) -> None:
        """
        Time a chunk's arrival for the monitor: the first one's, else the
        gap since the previous one (before C{_last_chunk} moves on).
        """
        now = self.clock.seconds()
        if self.first_chunk_at is None:
            self.first_chunk_at = now
        elif self._observe_gap is not None:
            self._observe_gap(now - self._last_chunk)

    # -- upstream failures and timers -------------------------------------

    def _upstream_failed(self, failure: Failure, attempt: _Attempt) -> None:
        """
        No response from upstream: connect, send or header phase failed.
        """
        if attempt is not self._attempt:
            return
        self._upstream_d = None
        if self._ended:
            return
        self.context.upstream_response_time_ms = _ms(self.clock.seconds() - self.context.started)
        if failure.check(CancelledError, TimeoutError, ConnectingCancelledError) or _cancelled(
            failure
        ):
            log.warn("upstream request timed out")
            self._upstream_error("timeout", 504, "upstream timed out")
        elif failure.check(DNSLookupError, ConnectError):
            log.warn("connecting upstream failed: {error}", error=failure.getErrorMessage())
            self._upstream_error(
                "upstream_error", 502, f"failed to connect to upstream: {failure.getErrorMessage()}"
            )
        elif (tls := _tls_failure(failure)) is not None:
            log.warn("TLS with upstream failed: {error}", error=tls)
            self._upstream_error("upstream_error", 502, f"TLS with upstream failed: {tls}")
        else:
            log.warn("upstream request failed: {error}", error=_describe(failure))
            self._upstream_error(
                "upstream_error", 502, "upstream closed the connection without a response"
            )

    def _bug(self, failure: Failure) -> None:
        """
        A programming error in a callback: log it and answer 500 if possible.
        """
        log.failure("proxying a request failed", failure)
        self._cut("internal_error", 500, "internal error")

    def _arm(self, name: str, delay: float, call: Any) -> None:
        """
        (Re)start the timer C{name}.
        """
        timer = self._timers.get(name)
        if timer is not None and timer.active():
            timer.cancel()
        self._timers[name] = self.clock.callLater(delay, call)

    def _timer_active(self, name: str) -> bool:
        """
        Whether the timer C{name} is running.
        """
        timer = self._timers.get(name)
        return timer is not None and timer.active()

    def _cancel_timer(self, name: str) -> None:
        """
        Stop the timer C{name} if it is running.
        """
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _guarded(self, handler: Callable[[Failure], None]) -> Callable[[Failure], None]:
        """
        C{handler} for the end of an upstream body, run from the body
        protocol's C{connectionLost}: an exception in it (a body filter's
        final call) cuts the response instead of escaping into Twisted and
        leaving the client waiting.
        """

        def run(reason: Failure) -> None:
            try:
                handler(reason)
            except Exception:
                log.failure("ending the response failed")
                self._cut("internal_error", 502, "internal error while relaying the response")

        return run

    def _cancel_timers(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def _arm_duration_limit(self) -> None:
        """
        Enforce C{max_stream_duration_ms} from the request's start, by a
        timer (so a silent upstream is cut too); streams only.
        """
        limit = self.conf.get("max_stream_duration_ms")
        if limit is None or not self.context.stream or "duration" in self._timers:
            return
        remaining = self.context.started + limit / 1000.0 - self.clock.seconds()
        self._arm("duration", max(remaining, 0.0), self._duration_exceeded)

    def _duration_exceeded(self) -> None:
        self._cut("max_stream_duration_ms", 504, "max_stream_duration_ms exceeded")

    def _arm_silence(
        self, name: str, timeout_ms: int, since: Callable[[], float], reason: str, message: str
    ) -> None:
        """
        A timer that ends the response when nothing happened for
        C{timeout_ms} since C{since()} (504 before output, an error event
        after). Time during which the client's connection paused the upstream
        read does not count: a paused upstream is not a silent one.
        """
        timeout = timeout_ms / 1000.0

        def check() -> None:
            if self._pacer is not None and self._pacer.paused:
                self._arm(name, timeout, check)
                return
            quiet = self.clock.seconds() - since()
            if quiet < timeout:
                self._arm(name, timeout - quiet, check)
                return
            self._upstream_error(reason, 504, message)

        self._arm(name, timeout, check)

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
            self._arm(
                "first_token",
                first_token / 1000.0,
                lambda: self._upstream_error(
                    "first_token_timeout_ms", 504, "first_token_timeout_ms exceeded"
                ),
            )
        interval = self.conf.get("keepalive_comment_interval_ms")
        if interval is not None and self.context.stream and not self._timer_active("keepalive"):
            self._arm("keepalive", interval / 1000.0, self._keepalive)

    def _keepalive(self) -> None:
        """
        Send one keep-alive comment and schedule the next; they never reach
        the filters or the figures.
        """
        if self._ended or not self._awaiting_data or self._received:
            return
        if not self.context.output_started:
            self._response_status = 200
            self._response_headers = list(_KEEPALIVE_HEADERS)
            self._set_headers()
        self._write(b":\n\n")
        self._arm("keepalive", self.conf["keepalive_comment_interval_ms"] / 1000.0, self._keepalive)

    def _first_data(self) -> None:
        """
        The first event (or non-stream byte) arrived: stop waiting for it.
        """
        self._awaiting_data = False
        self._cancel_timer("first_token")
        self._cancel_timer("keepalive")


def llm_logging_fields(context: ExchangeContext, logging: Any, duration_ms: int) -> dict[str, Any]:
    """
    The access-record keys of a route's C{logging} options, as APISIX adds
    them: C{llm_summary} (C{summaries}); C{llm_request} and
    C{llm_response_text} (C{payloads}). The request part holds the
    conversation only (never headers, so never a credential).
    """
    fields: dict[str, Any] = {}
    if logging.get("summaries"):
        fields["llm_summary"] = {
            "model": context.llm_model or context.request_llm_model,
            "duration": duration_ms,
            "prompt_tokens": context.prompt_tokens,
            "completion_tokens": context.completion_tokens,
            "total_tokens": context.total_tokens,
            "upstream_response_time": context.upstream_response_time_ms,
            "stream": context.stream,
        }
    if logging.get("payloads"):
        body = context.body or {}
        fields["llm_request"] = {key: body[key] for key in _LOGGED_REQUEST_KEYS if key in body}
        fields["llm_response_text"] = {"content": context.text}
    return fields


#: The request body keys C{logging.payloads} records.
_LOGGED_REQUEST_KEYS = ("model", "system", "messages", "input", "prompt", "stream")


def _held_error_body(error: bytes | None) -> bytes:
    """
    The body of the 502 a held stream gets when every instance failed: its
    in-band error event's data when that is JSON, else a JSON message.
    """
    if error is not None:
        try:
            json.loads(error)
        except ValueError:
            message = f"upstream stream failed: {error.decode('utf-8', 'replace')}"
        else:
            return error
    else:
        message = "upstream ended the stream before any content"
    return json.dumps({"message": message}).encode("utf-8")


def _upstream_error_message(status: int, body: bytes) -> str:
    """
    What an upstream error body says, for an in-band error event.
    """
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return f"upstream returned status {status}: {error['message']}"
        if isinstance(document.get("message"), str):
            return f"upstream returned status {status}: {document['message']}"
    if status < 300:
        return "upstream returned a non-streamed response to a streamed request"
    return f"upstream returned status {status}"


def _cancelled(failure: Failure) -> bool:
    """
    Whether a treq/Agent failure wraps a cancellation (its timeout).
    """
    reasons = getattr(failure.value, "reasons", None) or []
    return any(r.check(CancelledError) for r in reasons)


#: The failures of a TLS handshake or of the certificate's name check.
_TLS_ERRORS = ("OpenSSL.SSL.Error", "service_identity.exceptions.VerificationError")


def _tls_failure(failure: Failure) -> str | None:
    """
    What went wrong with TLS when C{failure} is (or wraps) a TLS failure,
    as C{certificate verify failed}; else L{None}.
    """
    for reason in [failure, *(getattr(failure.value, "reasons", None) or [])]:
        if reason.check(*_TLS_ERRORS):
            entries = reason.value.args[0] if reason.value.args else None
            if isinstance(entries, list):
                details = [
                    str(entry[-1])
                    for entry in entries
                    if isinstance(entry, tuple) and entry and entry[-1]
                ]
                if details:
                    return "; ".join(details)
            return reason.getErrorMessage()
    return None


def _describe(failure: Failure) -> str:
    """
    A short description of a failure, with the reasons it wraps.
    """
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return failure.getErrorMessage()
