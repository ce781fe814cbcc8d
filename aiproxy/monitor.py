# -*- test-case-name: tests.test_lifecycle -*-
"""
The gateway's view of its requests: which exchanges are in flight (for the
drain), which route tables they still use (for the reload), and the
metrics each one feeds when it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from aiproxy.exchange.record import Timings
from aiproxy.interfaces import IExchange, IExchangeMonitor
from aiproxy.routing.routes import RouteTable

if TYPE_CHECKING:
    from aiproxy.metrics import Metrics

__all__ = ["ExchangeMonitor"]

log = Logger()

_MISSING = object()


@implementer(IExchangeMonitor)
class ExchangeMonitor:
    """
    Tracks the exchanges in flight, closes retired route tables once their
    last exchange ended, and feeds the metrics (when there are any).

    @ivar metrics: the L{aiproxy.metrics.Metrics}, or L{None} when metrics
        are off.
    """

    def __init__(self, clock: IReactorTime, metrics: Metrics | None = None) -> None:
        self.clock = clock
        self.metrics = metrics
        self.in_flight: dict[IExchange, None] = {}
        self._streams: set[IExchange] = set()
        self._retired: list[tuple[RouteTable, set[IExchange]]] = []
        self._idle_waiters: list[Deferred[None]] = []
        self._closing: list[Deferred[Any]] = []

    # -- exchanges ----------------------------------------------------------

    def exchange_started(self, exchange: IExchange) -> None:
        self.in_flight[exchange] = None
        if self.metrics is not None:
            self.metrics.exchange_started()

    def stream_started(self, exchange: IExchange) -> Callable[[float], None] | None:
        metrics = self.metrics
        if metrics is None or exchange not in self.in_flight:
            return None
        self._streams.add(exchange)
        metrics.stream_started()
        return metrics.gap_observer(exchange.route.id)

    def exchange_ended(
        self, exchange: IExchange, record: Mapping[str, Any], timings: Timings
    ) -> None:
        if self.in_flight.pop(exchange, _MISSING) is _MISSING:
            return
        metrics = self.metrics
        if metrics is not None:
            metrics.exchange_ended()
            streamed = exchange in self._streams
            if streamed:
                self._streams.discard(exchange)
                metrics.stream_ended()
            self._observe(record, timings, streamed)
        if self._retired:
            self._release(exchange)
        if not self.in_flight and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

    def _observe(self, record: Mapping[str, Any], timings: Timings, streamed: bool) -> None:
        """
        Count a finished exchange in the metrics, with its timings.
        """
        assert self.metrics is not None
        started = timings.started
        ttft = upstream_ttft = gateway = None
        first_chunk = timings.first_chunk
        if streamed and first_chunk is not None:
            ttft = first_chunk - started
            if timings.sent is not None:
                upstream_ttft = first_chunk - timings.sent
                first_output = timings.first_output
                first_sent = timings.first_sent
                if first_output is not None and first_sent is not None:
                    # Failed attempts of a fallback are not the gateway's
                    # own latency: from the first attempt's sending only.
                    gateway = (first_sent - started) + (first_output - first_chunk)
        self.metrics.observe_record(
            record,
            duration=self.clock.seconds() - started,
            ttft=ttft,
            upstream_ttft=upstream_ttft,
            gateway_latency=gateway,
        )

    def request_refused(self, record: Mapping[str, Any]) -> None:
        """
        Count a request refused before an exchange handled it.
        """
        if self.metrics is not None:
            self.metrics.observe_record(record)

    # -- draining -----------------------------------------------------------

    def when_idle(self) -> Deferred[None]:
        """
        A Deferred that fires when no exchange is in flight (at once if none
        is). It may be cancelled.
        """
        if not self.in_flight:
            return succeed(None)

        def cancel(d: Deferred[None]) -> None:
            if d in self._idle_waiters:
                self._idle_waiters.remove(d)

        waiter: Deferred[None] = Deferred(cancel)
        self._idle_waiters.append(waiter)
        return waiter

    def abort_all(self, reason: str) -> int:
        """
        Abort every exchange in flight.

        @return: how many were aborted.
        """
        exchanges = list(self.in_flight)
        for exchange in exchanges:
            try:
                exchange.abort(reason)
            except Exception:
                log.failure("aborting a request failed")
        return len(exchanges)

    # -- reloading ------------------------------------------------------------

    def retire(self, table: RouteTable) -> None:
        """
        C{table} no longer serves new requests: close its upstream pools now
        if no exchange uses one of its routes, else after the last one
        ended.
        """
        routes = {id(route) for route in table.routes}
        users = {exchange for exchange in self.in_flight if id(exchange.route) in routes}
        if users:
            self._retired.append((table, users))
        else:
            self._close(table)

    def _release(self, exchange: IExchange) -> None:
        """
        C{exchange} ended: close the retired tables nobody uses any more.
        """
        still: list[tuple[RouteTable, set[IExchange]]] = []
        for table, users in self._retired:
            users.discard(exchange)
            if users:
                still.append((table, users))
            else:
                self._close(table)
        self._retired = still

    def _close(self, table: RouteTable) -> None:
        """
        Close a table's upstream connection pools.
        """
        d = table.close()
        d.addErrback(lambda f: log.failure("closing retired upstream pools failed", f))
        self._closing.append(d)
        d.addBoth(self._closed, d)

    def _closed(self, result: object, d: Deferred[Any]) -> object:
        if d in self._closing:
            self._closing.remove(d)
        return result

    @property
    def retired_tables(self) -> list[RouteTable]:
        """
        The retired tables still waiting for their last exchange.
        """
        return [table for table, _ in self._retired]

    def wait_closed(self) -> Deferred[Any]:
        """
        Fires when the retired tables' pools being closed are closed.
        """
        return gatherResults(list(self._closing))
