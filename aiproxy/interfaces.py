# -*- test-case-name: tests.test_filters -*-
"""
The seams of aiproxy: every pluggable part is a zope L{Interface}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import Attribute, Interface

__all__ = [
    "IBodyFilter",
    "IExchangeMonitor",
    "IBodyFilterFactory",
    "IFilterPlugin",
    "IHealthProbe",
    "IRequestFilter",
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


class IExchangeMonitor(Interface):
    """
    Sees every proxied request (L{aiproxy.proxy.Exchange}) of the gateway:
    for the drain (which are in flight), the reload (which routes are still
    used) and the metrics. Called on the reactor thread.
    """

    in_flight = Attribute(
        "The exchanges started and not ended, in start order (a dict used as a set)."
    )

    def exchange_started(exchange: Any) -> None:
        """
        C{exchange} started; it will end with exactly one L{exchange_ended}.
        """

    def stream_started(exchange: Any) -> Callable[[float], None] | None:
        """
        C{exchange} began relaying a streamed response.

        @return: a function to call with the gap (seconds) before each
            upstream chunk after the first, or L{None} when nobody wants
            them: the exchange then costs nothing more per chunk.
        """

    def exchange_ended(exchange: Any, record: Any) -> None:
        """
        C{exchange} ended; C{record} is its access record.
        """


class IHealthProbe(Interface):
    """
    Sends one active health-check probe to an instance of an
    C{ai-proxy-multi} route (L{aiproxy.health.HealthChecker} calls it every
    interval). A probe carries only what the instance's C{checks.active}
    and C{auth} say: never anything of a client's request.
    """

    def probe(target: Any) -> Any:
        """
        Probe once.

        @param target: an L{aiproxy.health.ProbeTarget}: C{kind}
            (C{http}, C{https} or C{tcp}), C{host}, C{port}, C{path},
            C{headers}, C{timeout} (seconds) and C{verify}.
        @return: a Deferred firing with the HTTP status of the answer
            (L{None} for a C{tcp} probe that connected), or failing with
            L{twisted.internet.defer.TimeoutError} when nothing came within
            C{timeout}, or with the connection's failure. It may be
            cancelled (the checker stops).
        """
