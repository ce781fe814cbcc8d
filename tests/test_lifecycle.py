# -*- test-case-name: tests.test_lifecycle -*-
"""
Tests for L{aiproxy.lifecycle}: the exchange monitor, reload and drain,
their signal handlers and how L{aiproxy.tap.GatewayService} composes them;
without sockets, time driven by a L{Clock}.
"""

from __future__ import annotations

import gc
import json
import signal
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aiproxy.config import load_config, parse_config
from aiproxy.exchange.record import Timings
from aiproxy.interfaces import IExchangeMonitor
from aiproxy.lifecycle import SHUTDOWN_REASON, DrainService, ReloadService, freeze_startup_heap
from aiproxy.metrics import Metrics
from aiproxy.monitor import ExchangeMonitor
from aiproxy.routing.build import build_routes
from aiproxy.routing.routes import RouteTable
from aiproxy.tap import GatewayService
from tests.helpers import write_config
from tests.test_proxy import (
    API_KEY,
    CHAT,
    CHAT_STREAM,
    DONE,
    ENDPOINT,
    FakeUpstreamClient,
    Gateway,
    delta,
    json_response,
    make_table,
    parse_response,
    stream_response,
)


class ClosingClient(FakeUpstreamClient):
    """
    A fake upstream client that counts how often its pool was closed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    def close(self) -> Deferred[None]:
        self.closed += 1
        return super().close()


def with_closing_clients(table: RouteTable) -> RouteTable:
    """
    C{table} with every instance's client a L{ClosingClient}.
    """
    for route in table.routes:
        for instance in route.instances:
            instance.client = ClosingClient()  # type: ignore[assignment]
    return table


def route_document(route_id: str, uri: str, **fields: Any) -> dict[str, Any]:
    """
    A route document with an C{ai-proxy} to the test endpoint.
    """
    conf = {
        "provider": "openai",
        "auth": {"header": {"Authorization": f"Bearer {API_KEY}"}},
        "override": {"endpoint": ENDPOINT},
        **fields,
    }
    return {"id": route_id, "uri": uri, "plugins": {"ai-proxy": conf}}


def fake_build(config: Any, reactor: Any) -> RouteTable:
    """
    L{build_routes} with fake upstream clients.
    """
    return with_closing_clients(build_routes(config, MemoryReactorClock()))


def monitored(
    testcase: SynchronousTestCase, table: RouteTable, metrics: Metrics | None = None
) -> tuple[Gateway, ExchangeMonitor]:
    """
    A test L{Gateway} whose exchanges report to a new monitor.
    """
    gateway = Gateway(testcase, table)
    monitor = ExchangeMonitor(gateway.clock, metrics)
    gateway.resource.monitor = monitor
    gateway.resource._no_route.monitor = monitor
    return gateway, monitor


def closed_by_peer(gateway: Gateway) -> None:
    """
    The connection the gateway is closing (or was asked to close) is gone:
    what a real transport reports once it flushed and closed.
    """
    gateway.transport.disconnected = True  # type: ignore[attr-defined]
    gateway.channel.connectionLost(Failure(ConnectionDone()))


class StubExchange:
    """
    An exchange the monitor tracks.
    """


class FakeReactor(Clock):
    """
    A clock that records the reactor calls the signal handling makes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stops = 0
        self.from_thread: list[Any] = []

    def stop(self) -> None:
        self.stops += 1

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        f(*args)

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.from_thread.append(f)


class MonitorTests(SynchronousTestCase):
    """
    L{ExchangeMonitor} tracks the exchanges in flight.
    """

    def test_interface(self) -> None:
        """
        It provides L{IExchangeMonitor}.
        """
        verifyObject(IExchangeMonitor, ExchangeMonitor(Clock()))

    def test_in_flight(self) -> None:
        """
        An exchange is in flight from its start to its end.
        """
        gateway, monitor = monitored(self, make_table())
        upstream = gateway.stream()
        [exchange] = list(monitor.in_flight)
        self.assertIs(exchange.request, gateway.channel._channel.requests[0])
        upstream.data(delta("a"), DONE)
        upstream.end()
        self.assertEqual(monitor.in_flight, {})

    def test_ended_once(self) -> None:
        """
        A second end of the same exchange changes nothing.
        """
        metrics = Metrics()
        monitor = ExchangeMonitor(Clock(), metrics)
        exchange = StubExchange()
        monitor.exchange_started(exchange)
        monitor.exchange_ended(exchange, {"status": 200}, Timings(0.0))
        monitor.exchange_ended(exchange, {"status": 200}, Timings(0.0))
        self.assertEqual(metrics.in_flight._value.get(), 0)

    def test_when_idle(self) -> None:
        """
        C{when_idle} fires at once with nothing in flight, else when the
        last exchange ends.
        """
        gateway, monitor = monitored(self, make_table())
        self.successResultOf(monitor.when_idle())
        upstream = gateway.stream()
        idle = monitor.when_idle()
        self.assertNoResult(idle)
        upstream.data(delta("a"), DONE)
        upstream.end()
        self.successResultOf(idle)

    def test_when_idle_cancelled(self) -> None:
        """
        A cancelled C{when_idle} is forgotten: the end of the last exchange
        does not fire it again.
        """
        gateway, monitor = monitored(self, make_table())
        upstream = gateway.stream()
        idle = monitor.when_idle()
        idle.cancel()
        self.failureResultOf(idle)
        upstream.data(delta("a"), DONE)
        upstream.end()
        self.assertEqual(monitor._idle_waiters, [])

    def test_abort_all(self) -> None:
        """
        C{abort_all} aborts every exchange in flight with the shutdown
        reason.
        """
        gateway, monitor = monitored(self, make_table())
        gateway.stream()
        self.assertEqual(monitor.abort_all(SHUTDOWN_REASON), 1)
        self.assertEqual(gateway.record["abort_reason"], SHUTDOWN_REASON)
        self.assertEqual(monitor.in_flight, {})


class RetireTests(SynchronousTestCase):
    """
    A replaced route table's upstream pools are closed after its last
    exchange.
    """

    def test_unused(self) -> None:
        """
        A table no exchange uses is closed at once.
        """
        table = with_closing_clients(make_table())
        monitor = ExchangeMonitor(Clock())
        monitor.retire(table)
        self.assertEqual(table.routes[0].instances[0].client.closed, 1)  # type: ignore[attr-defined]
        self.assertEqual(monitor.retired_tables, [])

    def test_after_last_exchange(self) -> None:
        """
        A table with an exchange in flight is closed when it ends, not
        before.
        """
        table = with_closing_clients(make_table())
        gateway, monitor = monitored(self, table)
        gateway.send(CHAT_STREAM)
        call = table.routes[0].instances[0].client.last  # type: ignore[attr-defined]
        gateway.resource.set_table(with_closing_clients(make_table()))
        monitor.retire(table)
        self.assertEqual(table.routes[0].instances[0].client.closed, 0)  # type: ignore[attr-defined]
        self.assertEqual(monitor.retired_tables, [table])
        upstream = gateway.answer(stream_response())
        self.assertIs(table.routes[0].instances[0].client.last, call)  # type: ignore[attr-defined]
        upstream.data(delta("a"), DONE)
        upstream.end()
        self.assertEqual(table.routes[0].instances[0].client.closed, 1)  # type: ignore[attr-defined]
        self.assertEqual(monitor.retired_tables, [])
        self.successResultOf(monitor.wait_closed())


class AbortTests(SynchronousTestCase):
    """
    L{aiproxy.proxy.Exchange.abort}: the end of the grace period.
    """

    def test_before_output(self) -> None:
        """
        Before any output the client gets 503 with a JSON error, and the
        upstream request is cancelled.
        """
        gateway, monitor = monitored(self, make_table())
        gateway.send(CHAT_STREAM)
        [exchange] = list(monitor.in_flight)
        exchange.abort(SHUTDOWN_REASON)
        response = gateway.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json(), {"message": "server shutting down"})
        self.assertTrue(gateway.upstream.cancelled)
        self.assertEqual(gateway.record["abort_reason"], SHUTDOWN_REASON)
        self.assertEqual(gateway.record["status"], 503)

    def test_after_output(self) -> None:
        """
        After output the client gets an error event in its protocol (never
        a C{[DONE]}) and the connection closes without the terminating
        chunk; the upstream transfer stops.
        """
        gateway, monitor = monitored(self, make_table({"streaming_flush_interval_ms": 0}))
        upstream = gateway.stream()
        upstream.data(delta("Hel"))
        [exchange] = list(monitor.in_flight)
        exchange.abort(SHUTDOWN_REASON)
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete)
        self.assertTrue(gateway.closed)
        last = response.chunks[-1]
        self.assertIn(b'"error"', last)
        self.assertIn(b"server shutting down", last)
        self.assertNotIn(b"[DONE]", response.body)
        self.assertTrue(upstream.transport.stopped)
        self.assertEqual(gateway.record["abort_reason"], SHUTDOWN_REASON)

    def test_after_end(self) -> None:
        """
        Aborting an exchange that already ended does nothing.
        """
        gateway, monitor = monitored(self, make_table())
        upstream = gateway.stream()
        [exchange] = list(monitor.in_flight)
        upstream.data(delta("a"), DONE)
        upstream.end()
        before = gateway.raw
        exchange.abort(SHUTDOWN_REASON)
        self.assertEqual(gateway.raw, before)
        self.assertIsNone(gateway.record["abort_reason"])
        self.assertTrue(gateway.response().complete)


class ReloadTests(SynchronousTestCase):
    """
    L{ReloadService}: a valid config replaces the routes for new requests;
    an invalid one is logged and changes nothing.
    """

    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write(
            {
                "routes": [
                    route_document("old", "/v1/chat/completions", streaming_flush_interval_ms=0)
                ]
            }
        )
        self.table = fake_build(load_config(str(self.path)), None)
        self.gateway, self.monitor = monitored(self, self.table)
        self.reloaded: list[Any] = []
        self.reloader = ReloadService(
            str(self.path),
            self.gateway.resource,
            self.monitor,
            MemoryReactorClock(),
            on_reloaded=self.reloaded.append,
            build=fake_build,
        )
        self.reloader.startService()

    def write(self, document: Any) -> None:
        write_config(self.path.parent, document, self.path.name)

    def test_new_routes(self) -> None:
        """
        After a valid reload a new request uses the new routes (the removed
        route 404s, the new one is served), while a stream that started
        before completes on the old route; the old pools are closed after
        it.
        """
        gateway = self.gateway
        upstream = gateway.stream()
        upstream.data(delta("Hel"))
        self.write({"routes": [route_document("new", "/v2/chat/completions")]})
        self.assertTrue(self.reloader.reload())
        self.assertEqual([route.id for route in gateway.resource.table.routes], ["new"])
        self.assertEqual(len(self.reloaded), 1)
        upstream.data(delta("lo"), DONE)
        upstream.end()
        response = gateway.response()
        self.assertTrue(response.complete)
        self.assertEqual(response.chunks, [delta("Hel"), delta("lo"), DONE])
        self.assertEqual(self.table.routes[0].instances[0].client.closed, 1)  # type: ignore[attr-defined]
        gateway.connect()
        gateway.send(CHAT)
        self.assertEqual(gateway.response().status, 404)
        gateway.connect()
        gateway.send(CHAT, path=b"/v2/chat/completions")
        new_client = gateway.resource.table.routes[0].instances[0].client
        self.assertEqual(len(new_client.calls), 1)  # type: ignore[attr-defined]

    def test_invalid(self) -> None:
        """
        An invalid config is refused: each problem is logged at error level
        and the routes stay.
        """
        events: list[dict[str, Any]] = self.gateway.events
        self.write(
            {
                "routes": [
                    route_document("bad", "/v1/chat/completions", streaming_flush_interval_ms=-1)
                ]
            }
        )
        self.assertFalse(self.reloader.reload())
        self.assertIs(self.gateway.resource.table, self.table)
        self.assertEqual(self.reloaded, [])
        errors = [e for e in events if e.get("log_level") == LogLevel.error and "problem" in e]
        self.assertEqual(
            [e["problem"] for e in errors],
            [
                "routes[0].plugins.ai-proxy.streaming_flush_interval_ms: -1 is less than the minimum of 0"
            ],
        )
        self.assertEqual(self.table.routes[0].instances[0].client.closed, 0)  # type: ignore[attr-defined]

    def test_unreadable(self) -> None:
        """
        A config file that is gone or not YAML is refused the same way.
        """
        self.write("routes: [")
        self.assertFalse(self.reloader.reload())
        self.path.unlink()
        self.assertFalse(self.reloader.reload())
        self.assertIs(self.gateway.resource.table, self.table)

    def test_metrics(self) -> None:
        """
        Reloads are counted by result.
        """
        metrics = Metrics()
        self.monitor.metrics = metrics
        self.assertTrue(self.reloader.reload())
        self.write("routes: [")
        self.assertFalse(self.reloader.reload())
        self.assertEqual(metrics.reloads.labels(result="success")._value.get(), 1)
        self.assertEqual(metrics.reloads.labels(result="failure")._value.get(), 1)

    def test_stopped(self) -> None:
        """
        A stopping gateway does not reload.
        """
        self.reloader.stopService()
        self.assertFalse(self.reloader.reload())
        self.assertIs(self.gateway.resource.table, self.table)

    def test_no_credentials_logged(self) -> None:
        """
        Neither a reload nor its refusal logs the routes' credentials.
        """
        self.reloader.reload()
        self.write({"routes": [route_document("bad", "/v1/x", timeout=0)]})
        self.reloader.reload()
        self.assertNotIn(API_KEY, json.dumps([str(e) for e in self.gateway.events]))


class DrainTests(SynchronousTestCase):
    """
    L{DrainService.stopService}: requests in flight finish within the
    grace period, the rest is aborted, and the stop waits for the client
    connections to close.
    """

    def drain(self, grace: float = 30.0, **proxy: Any) -> tuple[Gateway, DrainService]:
        gateway, monitor = monitored(self, make_table({"streaming_flush_interval_ms": 0, **proxy}))
        drain = DrainService(monitor, gateway.clock, grace, gateway.site)
        drain.startService()
        return gateway, drain

    def test_nothing_in_flight(self) -> None:
        """
        Without requests or connections the stop is immediate.
        """
        drain = DrainService(ExchangeMonitor(Clock()), Clock(), 30.0)
        drain.startService()
        self.successResultOf(drain.stopService())
        self.assertTrue(drain.draining)

    def test_idle_connection_closed(self) -> None:
        """
        An idle keep-alive connection is closed at once.
        """
        gateway, drain = self.drain()
        stopped = drain.stopService()
        self.assertTrue(gateway.closed)
        self.assertNoResult(stopped)
        closed_by_peer(gateway)
        gateway.clock.advance(0.05)
        self.successResultOf(stopped)

    def test_stream_finishes(self) -> None:
        """
        A stream in flight runs to its normal end; its connection then
        closes (no keep-alive during a drain) and the stop completes.
        """
        gateway, drain = self.drain()
        upstream = gateway.stream()
        upstream.data(delta("Hel"))
        stopped = drain.stopService()
        self.assertFalse(gateway.closed)
        gateway.clock.advance(10)
        upstream.data(delta("lo"), DONE)
        upstream.end()
        response = gateway.response()
        self.assertTrue(response.complete)
        self.assertEqual(response.chunks, [delta("Hel"), delta("lo"), DONE])
        self.assertTrue(gateway.closed)
        self.assertNoResult(stopped)
        closed_by_peer(gateway)
        gateway.clock.advance(0.05)
        self.successResultOf(stopped)
        self.assertIsNone(gateway.record["abort_reason"])

    def test_grace_over(self) -> None:
        """
        A stream still running after C{shutdown_grace_s} is aborted with an
        error event and its connection closed.
        """
        gateway, drain = self.drain(grace=2.0)
        upstream = gateway.stream()
        upstream.data(delta("Hel"))
        stopped = drain.stopService()
        gateway.clock.advance(1.9)
        self.assertFalse(gateway.closed)
        gateway.clock.advance(0.1)
        response = gateway.response()
        self.assertFalse(response.complete)
        self.assertIn(b"server shutting down", response.chunks[-1])
        self.assertTrue(upstream.transport.stopped)
        self.assertEqual(gateway.record["abort_reason"], SHUTDOWN_REASON)
        closed_by_peer(gateway)
        gateway.clock.advance(0.05)
        self.successResultOf(stopped)

    def test_zero_grace(self) -> None:
        """
        With C{shutdown_grace_s: 0} what is in flight is aborted at once; a
        request without output gets a 503.
        """
        gateway, drain = self.drain(grace=0)
        gateway.send(CHAT_STREAM)
        drain.stopService()
        gateway.clock.advance(0)
        self.assertEqual(gateway.response().status, 503)

    def test_hurry(self) -> None:
        """
        C{hurry} (a second SIGTERM) ends the grace period at once.
        """
        gateway, drain = self.drain()
        upstream = gateway.stream()
        upstream.data(delta("Hel"))
        drain.stopService()
        drain.hurry()
        self.assertEqual(gateway.record["abort_reason"], SHUTDOWN_REASON)

    def test_flush_timeout(self) -> None:
        """
        A connection that never closes does not hold the exit for longer
        than C{flush_timeout_s}.
        """
        gateway, drain = self.drain()
        drain.flush_timeout_s = 1.0
        stopped = drain.stopService()
        gateway.clock.pump([0.05] * 19)
        self.assertNoResult(stopped)
        gateway.clock.pump([0.05] * 2)
        self.successResultOf(stopped)

    def test_no_keepalive(self) -> None:
        """
        A response that ends during the drain closes its connection instead
        of keeping it alive; no timer is left behind.
        """
        gateway, drain = self.drain()
        gateway.send(CHAT)
        drain.stopService()
        body = b'{"model":"m","choices":[]}'
        upstream = gateway.answer(json_response(body))
        upstream.data(body)
        upstream.end()
        self.assertEqual(parse_response(gateway.raw).body, body)  # type: ignore[union-attr]
        self.assertTrue(gateway.closed)
        closed_by_peer(gateway)
        gateway.clock.advance(0.05)
        self.assertEqual(gateway.pending_timers(), [])


class SignalTests(SynchronousTestCase):
    """
    C{SIGHUP} reloads, C{SIGTERM} drains; the handlers run the work on the
    reactor thread.
    """

    def setUp(self) -> None:
        for number in (signal.SIGHUP, signal.SIGTERM):
            self.addCleanup(signal.signal, number, signal.getsignal(number))

    def test_installed_when_running(self) -> None:
        """
        With C{install_signal} the handlers are installed once the reactor
        runs, and a signal schedules the service's work on the reactor
        thread.
        """
        reactor = FakeReactor()
        drain = DrainService(ExchangeMonitor(reactor), reactor, 30.0, install_signal=True)
        reloader = ReloadService(
            "x.yaml", None, ExchangeMonitor(reactor), reactor, install_signal=True
        )
        drain.startService()
        reloader.startService()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # type: ignore[operator]
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)  # type: ignore[operator]
        self.assertEqual(reactor.from_thread, [drain.on_signal, reloader.on_signal])

    def test_sighup_at_once(self) -> None:
        """
        The SIGHUP handler is installed at start, before the reactor runs
        (SIGHUP's default action would kill the process); the SIGTERM one
        waits for the reactor, which installs its own first.
        """
        reactor = FakeReactor()
        waiting: list[Any] = []
        reactor.callWhenRunning = lambda f, *a: waiting.append(f)  # type: ignore[method-assign]
        before = signal.getsignal(signal.SIGTERM)
        ReloadService(
            "x.yaml", None, ExchangeMonitor(reactor), reactor, install_signal=True
        ).startService()
        DrainService(ExchangeMonitor(reactor), reactor, 30.0, install_signal=True).startService()
        self.assertNotIn(signal.getsignal(signal.SIGHUP), (signal.SIG_DFL, signal.SIG_IGN))
        self.assertIs(signal.getsignal(signal.SIGTERM), before)
        self.assertEqual(len(waiting), 1)
        waiting[0]()
        self.assertIsNot(signal.getsignal(signal.SIGTERM), before)

    def test_not_installed(self) -> None:
        """
        Without C{install_signal} nothing is installed.
        """
        before = signal.getsignal(signal.SIGTERM)
        reactor = FakeReactor()
        DrainService(ExchangeMonitor(reactor), reactor, 30.0).startService()
        self.assertIs(signal.getsignal(signal.SIGTERM), before)

    def test_sigterm_stops_reactor(self) -> None:
        """
        The first SIGTERM stops the reactor (whose shutdown runs the drain);
        one during the drain aborts what is left.
        """
        reactor = FakeReactor()
        monitor = ExchangeMonitor(reactor)
        drain = DrainService(monitor, reactor, 30.0)
        drain.startService()
        drain.on_signal()
        self.assertEqual(reactor.stops, 1)
        hurried: list[bool] = []
        drain.hurry = lambda: hurried.append(True)  # type: ignore[method-assign]
        drain.draining = True
        drain.on_signal()
        self.assertEqual((reactor.stops, hurried), (1, [True]))

    def test_sighup_reloads(self) -> None:
        """
        SIGHUP's work is a reload.
        """
        reloader = ReloadService("x.yaml", None, ExchangeMonitor(Clock()), Clock())
        calls: list[bool] = []
        reloader.reload = lambda: calls.append(True) or True  # type: ignore[method-assign]
        reloader.on_signal()
        self.assertEqual(calls, [True])


class GatewayServiceTests(SynchronousTestCase):
    """
    L{GatewayService} composes the listeners, metrics, reload and drain.
    """

    def config(self, **top: Any) -> Any:
        document = {"routes": [route_document("chat", "/v1/chat/completions")], **top}
        return parse_config(json.dumps(document), environ={})

    def test_without_metrics(self) -> None:
        """
        Without C{metrics_listen}: no metrics and no metrics listener; the
        exchanges report to the monitor.
        """
        reactor = MemoryReactorClock()
        config = self.config()
        service = GatewayService(config, fake_build(config, reactor), reactor, ["tcp:0"])
        self.assertIsNone(service.metrics)
        self.assertIsNone(service.monitor.metrics)
        self.assertIs(service.resource.monitor, service.monitor)
        self.assertIsNone(service.reloader)
        service.startService()
        self.assertEqual(len(reactor.tcpServers), 1)

    def test_with_metrics(self) -> None:
        """
        With C{metrics_listen} a second listener serves the metrics.
        """
        reactor = MemoryReactorClock()
        config = self.config(metrics_listen="tcp:9191:interface=127.0.0.1")
        service = GatewayService(
            config, fake_build(config, reactor), reactor, ["tcp:0"], config_path="x.yaml"
        )
        self.assertIsNotNone(service.metrics)
        self.assertIs(service.monitor.metrics, service.metrics)
        service.startService()
        self.assertEqual([server[0] for server in reactor.tcpServers], [0, 9191])
        self.assertEqual(type(reactor.tcpServers[1][1]).__name__, "MetricsSite")
        self.assertIsNotNone(service.reloader)

    def test_heap_frozen(self) -> None:
        """
        The gateway of a process freezes the start-up heap once the reactor
        runs; one embedded in another program (no signals) leaves it.
        """
        for own in (True, False):
            reactor = MemoryReactorClock()
            config = self.config()
            service = GatewayService(
                config, fake_build(config, reactor), reactor, ["tcp:0"], install_signals=own
            )
            self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))
            service.startService()
            hooks = [hook for hook, _, _ in reactor.whenRunningHooks]
            self.assertEqual(freeze_startup_heap in hooks, own)

    def test_freeze(self) -> None:
        """
        L{freeze_startup_heap} moves every tracked object out of the
        collector's generations.
        """
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        kept = [[index] for index in range(1000)]
        freeze_startup_heap()
        self.assertGreaterEqual(gc.get_freeze_count(), len(kept))
        self.assertEqual(gc.get_count()[0], 0)

    def test_reloaded_grace(self) -> None:
        """
        A reload applies the new C{shutdown_grace_s}.
        """
        reactor = MemoryReactorClock()
        config = self.config()
        service = GatewayService(config, fake_build(config, reactor), reactor, ["tcp:0"])
        service._reloaded(self.config(shutdown_grace_s=5))
        self.assertEqual(service.drain.grace_s, 5.0)

    def test_stop_closes_pools(self) -> None:
        """
        Stopping drains, then closes the routes' upstream pools.
        """
        reactor = MemoryReactorClock()
        config = self.config()
        table = fake_build(config, reactor)
        service = GatewayService(config, table, reactor, ["tcp:0"])
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual(table.routes[0].instances[0].client.closed, 1)  # type: ignore[attr-defined]
        self.assertTrue(service.drain.draining)
