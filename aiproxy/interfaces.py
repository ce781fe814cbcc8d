# -*- test-case-name: tests.test_filters -*-
"""
The seams of aiproxy: every pluggable part is a zope L{Interface}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from zope.interface import Attribute, Interface

__all__ = [
    "IBodyFilter",
    "IBodyFilterFactory",
    "IConverter",
    "ICounterStore",
    "IDownstream",
    "IExchange",
    "IExchangeMonitor",
    "IFilterPlugin",
    "IHealthProbe",
    "IRelay",
    "IRequestFilter",
    "IStreamConverter",
    "IStreamStage",
    "IUpstreamAuth",
]


class IBodyFilter(Interface):
    """
    A filter over the body one client receives: one provider per request.

    The chain calls L{filter_chunk} for every downstream chunk in order, then
    L{finish} once at the end of the stream (also for a non-streamed body,
    which is one chunk). Each call returns one of:
      - L{None}: pass the chunk on unchanged;
      - L{aiproxy.filters.Replace}: pass these bytes on instead (the next
        filter sees them); C{Replace(b"")} holds the chunk back entirely;
      - L{aiproxy.filters.Terminate}: stop the response here. If nothing has
        been sent yet the client gets C{status} and C{data} as the whole
        body; otherwise C{data} is sent as the last bytes and the response
        ends. The upstream transfer is aborted and no filter runs again.

    Filters must not block: they run on the reactor thread, on the hot path.
    """

    def filter_chunk(chunk: bytes, context: object) -> object:
        """
        Filter one downstream chunk.

        @param chunk: the bytes about to be sent (already replaced by an
            earlier filter, if any).
        @param context: the request's L{aiproxy.context.ExchangeContext}:
            C{events} (the decoded events of this chunk), C{text} (the
            response text so far), C{usage}, C{done}, C{ttft_ms}.
        @return: L{None}, a C{Replace} or a C{Terminate}.
        """

    def finish(context: object) -> object:
        """
        The stream has ended (C{context.done} tells whether the upstream
        finished it itself). Return L{None} or a C{Replace} whose bytes are
        sent before the end (e.g. text held back so far), or a C{Terminate}.
        """


class IBodyFilterFactory(Interface):
    """
    A route's configured body filter: makes one L{IBodyFilter} per request.
    """

    def body_filter(context: object) -> IBodyFilter | None:
        """
        Start filtering one response.

        @param context: the request's L{aiproxy.context.ExchangeContext}.
        @return: an L{IBodyFilter}, or L{None} to leave this response alone.
        """


class IRequestFilter(Interface):
    """
    A route's configured request filter: runs before the upstream call.
    """

    def filter_request(context: object) -> object:
        """
        Inspect or rewrite the request.

        @param context: the request's L{aiproxy.context.ExchangeContext};
            C{context.body} is the parsed JSON body and may be changed in
            place (call C{context.mark_body_changed()} after changing it).
        @return: L{None} to go on, or an L{aiproxy.filters.Reject} (status
            and JSON body) to answer the client without calling upstream.
        """


class IFilterPlugin(Interface):
    """
    A named plugin that a route can enable in its C{plugins} map.

    Built-in plugins provide it, and so do third-party packages that ship a
    dropin module in C{twisted/plugins/} whose object provides both
    L{twisted.plugin.IPlugin} and this interface (found with
    C{twisted.plugin.getPlugins(IFilterPlugin)}).
    """

    name = Attribute("The key naming this plugin in a route's C{plugins} map.")
    priority = Attribute(
        "An C{int}; plugins with a higher priority run first (as APISIX orders them)."
    )
    config_schema = Attribute("The JSON Schema (a C{dict}) of this plugin's config.")

    def configure(config: dict) -> object:
        """
        Prepare the plugin for one route, once, at config load.

        @param config: the route's config for this plugin, validated against
            C{config_schema} with defaults filled in.
        @return: an object providing L{IRequestFilter}, L{IBodyFilterFactory}
            or both.
        """


class IExchange(Interface):
    """
    One proxied request (L{aiproxy.exchange.Exchange}), as the gateway's
    monitor sees it.
    """

    route = Attribute("The L{aiproxy.routing.routes.Route} the request is served by.")
    context = Attribute("Its L{aiproxy.context.ExchangeContext}.")

    def abort(reason: str) -> None:
        """
        End the exchange now (the gateway is shutting down): 503 before any
        output, else an error event in the client's protocol and a closed
        connection; the upstream transfer is stopped.
        """


class IExchangeMonitor(Interface):
    """
    Sees every proxied request (an L{IExchange}) of the gateway: for the
    drain (which are in flight), the reload (which routes are still used)
    and the metrics. Called on the reactor thread.
    """

    in_flight = Attribute(
        "The exchanges started and not ended, in start order (a dict used as a set)."
    )

    def exchange_started(exchange: IExchange) -> None:
        """
        C{exchange} started; it will end with exactly one L{exchange_ended}.
        """

    def stream_started(exchange: IExchange) -> Callable[[float], None] | None:
        """
        C{exchange} began relaying a streamed response.

        @return: a function to call with the gap (seconds) before each
            upstream chunk after the first, or L{None} when nobody wants
            them: the exchange then costs nothing more per chunk.
        """

    def exchange_ended(exchange: IExchange, record: Mapping[str, Any], timings: Any) -> None:
        """
        C{exchange} ended.

        @param record: its access record.
        @param timings: its L{aiproxy.exchange.record.Timings}.
        """

    def request_refused(record: Mapping[str, Any]) -> None:
        """
        A request was refused before an exchange handled it (a 404, an early
        413, a malformed head); C{record} is its access record.
        """


class IStreamStage(Interface):
    """
    One stage of a stream relay between the protocol observer and the
    client (the body filter chain, a protocol converter): bytes in, bytes
    out, one chunk at a time, in order.
    """

    def filter_chunk(chunk: bytes, context: Any) -> Any:
        """
        Pass one chunk through.

        @param context: the request's L{aiproxy.context.ExchangeContext}
            (C{events} holds the chunk's decoded events).
        @return: the bytes to pass on (maybe empty), or an
            L{aiproxy.filters.Terminate} that ends the response.
        """

    def finish(context: Any) -> Any:
        """
        The stream ended: the last bytes to pass on, or a C{Terminate}.
        """


class IRelay(Interface):
    """
    Receives one upstream response body (it is the protocol given to
    C{deliverBody}) and passes it on to the client; how the body ended
    (L{aiproxy.exchange.relay.Complete}, C{Failed}, C{Cut} or a C{Terminate})
    is told once to the callable the relay was made with.
    """

    mid_event = Attribute(
        "Whether what was relayed to the client ends inside an event (an "
        "error event after it needs a blank line first)."
    )

    def stop() -> None:
        """
        Stop reading the body (its connection is closed, never pooled) and
        ignore whatever else it does; how it ended is not told after.
        """


class IDownstream(Interface):
    """
    The client's side of one request: the only object that writes to its
    HTTP response.
    """

    def prepare(status: int, headers: Any) -> None:
        """
        The status and headers (C{(name, [values])} pairs) to commit with
        the first byte.
        """

    def send(data: bytes) -> None:
        """
        Write C{data} now (one HTTP chunk), the head first if not sent.
        """

    def start_stream(interval_ms: int) -> Callable[[bytes], None]:
        """
        Begin relaying a stream through the flush writer of
        C{streaming_flush_interval_ms}; return its C{write}.
        """

    def discard() -> None:
        """
        Drop what the flush writer holds and stop it.
        """

    def keepalive() -> None:
        """
        Send one C{:} SSE comment (committing a 200 event stream first).
        """

    def respond(body: bytes) -> None:
        """
        Answer whole: the prepared head, and C{body} with its length (only
        before any output).
        """

    def finish(tail: bytes = b"") -> None:
        """
        End the response normally, after what the flush writer holds and
        C{tail}.
        """

    def cut(tail: bytes) -> None:
        """
        End the response early after output: C{tail} (an error event) after
        what the flush writer holds, then the connection closed without the
        terminating chunk.
        """

    def pace(transport: Any, on_resume: Callable[[], None]) -> None:
        """
        Let the client's connection pause and resume C{transport} (the
        upstream body, an C{IPushProducer}).
        """

    def unpace() -> None:
        """
        The upstream body no longer follows the client's connection.
        """

    paused = Attribute("Whether the client's connection pauses the upstream read now.")
    status = Attribute("The status committed, or to be committed.")

    def when_finished(finished: Callable[[Any], None], lost: Callable[[Any], None]) -> None:
        """
        Call C{finished} when the response was fully written, C{lost} when
        the client's connection closed before.
        """


class IHealthProbe(Interface):
    """
    Sends one active health-check probe to an instance of an
    C{ai-proxy-multi} route (L{aiproxy.routing.health.HealthChecker} calls it every
    interval). A probe carries only what the instance's C{checks.active}
    and C{auth} say: never anything of a client's request.
    """

    def probe(target: Any) -> Any:
        """
        Probe once.

        @param target: an L{aiproxy.routing.health.ProbeTarget}: C{kind}
            (C{http}, C{https} or C{tcp}), C{host}, C{port}, C{path},
            C{headers}, C{timeout} (seconds) and C{verify}.
        @return: a Deferred firing with the HTTP status of the answer
            (L{None} for a C{tcp} probe that connected), or failing with
            L{twisted.internet.defer.TimeoutError} when nothing came within
            C{timeout}, or with the connection's failure. It may be
            cancelled (the checker stops).
        """


class IStreamConverter(Interface):
    """
    Converts one upstream stream, event by event, into the client's
    protocol (one provider per stream: it keeps the stream's state).
    """

    def convert_events(events: Any, context: Any) -> bytes:
        """
        The client-protocol bytes (whole SSE events) for C{events}, the
        upstream's decoded events (L{aiproxy.stream.sse.SSEEvent}) of one
        chunk, in order; C{b""} when they give nothing yet.

        @param context: the request's L{aiproxy.context.ExchangeContext}.
        """

    def finish(context: Any) -> bytes:
        """
        The upstream stream ended: the last client-protocol bytes (e.g. an
        end event that was deferred).
        """


class IConverter(Interface):
    """
    Converts requests of one client protocol into another protocol that an
    upstream speaks, and its answers back (stateless, shared by the
    requests of a route).
    """

    client_protocol = Attribute(
        "The client protocol it converts from (e.g. C{anthropic-messages})."
    )
    upstream_protocol = Attribute("The protocol spoken upstream (e.g. C{openai-chat}).")

    def convert_request(body: Any, context: Any) -> Any:
        """
        The upstream request body (a new C{dict}) for the client's C{body}.

        @param context: the request's L{aiproxy.context.ExchangeContext}.
        @raise aiproxy.upstream.request.ClientError: a body it refuses (400).
        """

    def convert_headers(headers: Any, own_credentials: bool) -> None:
        """
        Adjust the upstream request headers (a C{twisted.web.http_headers.Headers},
        already without hop-by-hop headers, with the route's credentials)
        in place.

        @param own_credentials: the route supplies its own credentials.
        """

    def convert_answer(status: int, body: bytes, context: Any) -> bytes:
        """
        A whole upstream answer in the client's protocol: a success, or an
        error status whose body is converted to the client's error shape.
        """

    def convert_error(status: int, message: str) -> bytes:
        """
        The body of the gateway's own error C{message} (answered with
        C{status}) in the client's protocol.
        """

    def stream(context: Any) -> IStreamConverter:
        """
        A converter for one upstream stream.
        """


class IUpstreamAuth(Interface):
    """
    Authorizes each upstream request of an instance whose provider needs
    more than static headers (a signature over the final bytes, an access
    token fetched and cached).
    """

    def authorize(call: Any) -> Any:
        """
        The request with its credentials.

        @param call: the L{aiproxy.exchange.incoming.UpstreamCall} (method,
            URL, headers, body) as it will be sent.
        @return: a Deferred firing with the authorized call (a new Deferred
            per call: cancelling it must not disturb other requests, e.g.
            a token fetch they share), or failing with an
            L{aiproxy.upstream.request.ClientError} whose status and body
            the client gets (a credential that could not be obtained).
        """


class ICounterStore(Interface):
    """
    Where token counters live: in the process, or in Redis shared by every
    gateway. A counter is named by a key that includes its window, so it
    is never reset, only left to expire.

    Each method answers with a plain value when it can (the local store)
    or a L{Deferred}; a Deferred fails with
    L{aiproxy.budget.store.StoreUnavailable} when the store cannot be
    reached in time.
    """

    description = Attribute("Where the counters are, for messages (never a secret).")

    def spent(keys: Any) -> Any:
        """
        How much each counter of C{keys} (a sequence of C{str}) holds: a
        list of C{int}, 0 for a counter that does not exist.
        """

    def charge(charges: Any) -> Any:
        """
        Add to counters: C{charges} is a sequence of C{(key, amount,
        ttl_s)}; a counter created by it expires after C{ttl_s} seconds.
        Atomic per counter; L{None} or a Deferred firing with L{None}.
        """

    def close() -> Any:
        """
        Close the store's connections: a Deferred.
        """
