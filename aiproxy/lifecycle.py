# -*- test-case-name: tests.test_lifecycle -*-
"""
The gateway's life under a service manager: reloading the config on
C{SIGHUP} (L{ReloadService}) and draining on C{SIGTERM} (L{DrainService}),
both over the L{aiproxy.monitor.ExchangeMonitor} that knows which requests
are in flight.

Reload: the new config is read and checked whole; if valid, new requests
use the new routes at once while requests in flight finish on the routes
they started with, and the old routes' upstream connection pools are closed
after the last of those requests ended; if invalid, every problem is logged
and the old config stays.

Drain: C{SIGTERM} stops the reactor the usual way, but without re-raising
the signal (the process exits 0), and the gateway's C{stopService} waits:
the listeners stop accepting, keep-alive connections are closed once their
response is complete, requests in flight run on for up to
C{shutdown_grace_s}, what is left is aborted (a client that got output
gets its protocol's error event, never a silent cut), and the exit waits
until the clients' connections have flushed their last bytes and closed. A
second C{SIGTERM} aborts what is left at once.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from aiproxy.config import Config, ConfigError, load_config
from aiproxy.monitor import ExchangeMonitor
from aiproxy.routing.build import build_routes
from aiproxy.routing.routes import RouteTable

if TYPE_CHECKING:
    from aiproxy.server import GatewaySite

__all__ = [
    "DrainService",
    "ReloadService",
    "SHUTDOWN_REASON",
    "SignalService",
    "freeze_startup_heap",
]

log = Logger()

#: The C{abort_reason} of requests aborted at the end of a drain.
SHUTDOWN_REASON = "shutdown"

#: How long the drain waits for client connections to flush and close
#: after the last request ended, before letting the process exit anyway.
FLUSH_TIMEOUT_S = 5.0

#: How often the drain looks at the client connections while they close.
_POLL_S = 0.05


def freeze_startup_heap() -> None:
    """
    Take what start-up made (modules, schemas, the config and its routes)
    out of the garbage collector's sight (C{gc.freeze}): a full collection
    then scans only what requests made, not the hundred thousand objects
    that live as long as the process. Called once, as the reactor starts;
    routes built by a reload are left to the collector, which frees them
    once they are no longer in use.
    """
    gc.collect()
    gc.freeze()


class _SignalHandling(Service):
    """
    A service that installs a handler for one signal, calling C{on_signal} on the
    reactor thread. A signal the reactor handles itself (C{SIGTERM}) gets
    ours once the reactor runs, after its own, so that ours wins; another
    (C{SIGHUP}, whose default action kills the process) gets it at once.
    A service added before the listeners installs it already in its
    privileged start (L{_install_early}): from the moment clients can
    connect, no signal meets its default action, which ends the process;
    the work itself waits for the reactor to run.
    """

    _signal: int
    _reactor: Any
    _install_signal: bool
    _reactor_handles: bool = False

    def privilegedStartService(self) -> None:
        # Signal services are added before the listeners.
        super().privilegedStartService()
        self._install_early()

    def startService(self) -> None:
        super().startService()
        self._install_handler()

    def _install_handler(self) -> None:
        if not self._install_signal:
            return

        def install() -> None:
            signal.signal(self._signal, self._handler)

        if self._reactor_handles:
            self._reactor.callWhenRunning(install)
        else:
            install()

    def _install_early(self) -> None:
        """
        Install the handler now, even for a signal the reactor handles
        (L{_install_handler} installs it again after the reactor's).
        """
        if self._install_signal:
            signal.signal(self._signal, self._handler)

    def _handler(self, number: int, frame: object) -> None:
        self._reactor.callFromThread(self.on_signal)

    def on_signal(self) -> None:
        raise NotImplementedError()


class SignalService(_SignalHandling):
    """
    Calls a function, on the reactor thread, each time one signal arrives;
    the handler is installed when the service starts (see
    L{_SignalHandling}).
    """

    def __init__(
        self,
        number: int,
        reactor: Any,
        callback: Callable[[], object],
        reactor_handles: bool = False,
    ) -> None:
        """
        @param number: the signal.
        @param reactor_handles: the reactor installs a handler of its own
            for it (C{SIGTERM}, C{SIGINT}): ours is installed after.
        """
        self._signal = number
        self._reactor = reactor
        self._callback = callback
        self._reactor_handles = reactor_handles
        self._install_signal = True

    def on_signal(self) -> None:
        self._callback()


class ReloadService(_SignalHandling):
    """
    Reloads the config on C{SIGHUP} (or L{reload}).

    @ivar path: the config file.
    """

    _signal = signal.SIGHUP

    def __init__(
        self,
        path: str,
        resource: Any,
        monitor: ExchangeMonitor,
        reactor: Any,
        on_reloaded: Callable[[Config], None] | None = None,
        install_signal: bool = False,
        load: Callable[[str], Config] = load_config,
        build: Callable[[Config, Any], RouteTable] = build_routes,
    ) -> None:
        """
        @param resource: the L{aiproxy.server.GatewayResource} whose table
            is replaced.
        @param on_reloaded: called with each new valid config, after the
            routes were replaced.
        @param install_signal: handle C{SIGHUP} once the reactor runs.
        @param load: reads and validates a config file.
        @param build: builds its route table.
        """
        self.path = path
        self.resource = resource
        self.monitor = monitor
        self._reactor = reactor
        self._on_reloaded = on_reloaded
        self._install_signal = install_signal
        self._load = load
        self._build = build
        self.reloads = 0

    def on_signal(self) -> None:
        log.info("SIGHUP: reloading {path}", path=self.path)
        self.reload()

    def reload(self) -> bool:
        """
        Read, check and apply the config file.

        @return: whether the new config is in force.
        """
        if not self.running:
            log.warn("not reloading {path}: the gateway is stopping", path=self.path)
            return False
        metrics = self.monitor.metrics
        try:
            config = self._load(self.path)
            table = self._build(config, self._reactor)
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload refused: {problem}", problem=problem, path=self.path)
            log.error(
                "invalid configuration {path}: {count} problem(s); still serving the previous configuration",
                path=self.path,
                count=len(e.problems),
            )
            if metrics is not None:
                metrics.reloads.labels(result="failure").inc()
            return False
        old = self.resource.table
        self.resource.set_table(table)
        self.monitor.retire(old)
        self.reloads += 1
        if metrics is not None:
            metrics.reloads.labels(result="success").inc()
        log.info(
            "reloaded {path}: {count} route(s); {in_flight} request(s) in flight finish on the previous routes",
            path=self.path,
            count=len(table.routes),
            in_flight=len(self.monitor.in_flight),
        )
        if self._on_reloaded is not None:
            self._on_reloaded(config)
        return True


class DrainService(_SignalHandling):
    """
    On stop: stop taking new work, let requests in flight finish for up to
    C{grace_s}, abort the rest, and wait for the clients' connections to
    flush and close. Handles C{SIGTERM} by stopping the reactor (which
    stops the services) without re-raising the signal: the process exits 0.

    @ivar grace_s: C{shutdown_grace_s}; a reload may change it.
    @ivar draining: the drain began.
    """

    _signal = signal.SIGTERM
    _reactor_handles = True

    def __init__(
        self,
        monitor: ExchangeMonitor,
        reactor: Any,
        grace_s: float,
        site: GatewaySite | None = None,
        install_signal: bool = False,
        flush_timeout_s: float = FLUSH_TIMEOUT_S,
    ) -> None:
        """
        @param reactor: stopped on C{SIGTERM}; its clock times the drain.
        @param site: the L{aiproxy.server.GatewaySite} whose connections
            are closed once idle.
        @param install_signal: handle C{SIGTERM} once the reactor runs.
        """
        self.monitor = monitor
        self._reactor = reactor
        self.grace_s = grace_s
        self.site = site
        self._install_signal = install_signal
        self.flush_timeout_s = flush_timeout_s
        self.draining = False
        self._waiting: Deferred[None] | None = None

    def on_signal(self) -> None:
        """
        C{SIGTERM}: begin the drain by stopping the reactor; a second one
        aborts what is left at once.
        """
        if self.draining:
            log.warn(
                "SIGTERM again: aborting {count} request(s) now", count=len(self.monitor.in_flight)
            )
            self.hurry()
            return
        log.info("SIGTERM: shutting down gracefully")
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass

    def hurry(self) -> None:
        """
        End the grace period now.
        """
        if self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        """
        Wait for the requests in flight, abort the rest, then wait for the
        connections to close.
        """
        self.draining = True
        clock = self._reactor
        monitor = self.monitor
        started = clock.seconds()
        count = len(monitor.in_flight)
        self._close_idle(first=True)
        if count:
            log.info(
                "draining: {count} request(s) in flight, waiting up to {grace} s",
                count=count,
                grace=self.grace_s,
            )
            self._waiting = monitor.when_idle()
            timer = clock.callLater(self.grace_s, self.hurry)
            try:
                await self._waiting
            except CancelledError:
                pass
            finally:
                self._waiting = None
                if timer.active():
                    timer.cancel()
            aborted = monitor.abort_all(SHUTDOWN_REASON) if monitor.in_flight else 0
            if aborted:
                log.warn(
                    "shutdown_grace_s ({grace} s) over: aborted {count} request(s)",
                    grace=self.grace_s,
                    count=aborted,
                )
        await self._connections_closed()
        log.info(
            "drained in {seconds:.3f} s ({count} request(s) were in flight)",
            seconds=clock.seconds() - started,
            count=count,
        )

    def _close_idle(self, first: bool = False) -> int:
        """
        Close the site's idle client connections (on the first call, make
        every other one close after its current response).

        @return: how many are still open.
        """
        if self.site is None:
            return 0
        return self.site.close_idle(first)

    async def _connections_closed(self) -> None:
        """
        Wait until the site's connections have flushed what was written and
        closed (each closes once its last response is complete), for at most
        C{flush_timeout_s}.
        """
        deadline = self._reactor.seconds() + self.flush_timeout_s
        while self._close_idle():
            if self._reactor.seconds() >= deadline:
                log.warn(
                    "{count} client connection(s) still open at exit",
                    count=self._close_idle(),
                )
                return
            await _sleep(self._reactor, _POLL_S)


def _sleep(clock: Any, seconds: float) -> Deferred[None]:
    """
    A Deferred firing after C{seconds} on C{clock}.
    """
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    return d
