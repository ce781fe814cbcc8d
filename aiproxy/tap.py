# -*- test-case-name: tests.test_tap -*-
"""
C{twistd aiproxy}: command-line options and the service tree.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.reflect import fullyQualifiedName

from aiproxy import __version__
from aiproxy.budget.stores import process_stores
from aiproxy.config import Config, ConfigError
from aiproxy.lifecycle import DrainService, ReloadService, freeze_startup_heap
from aiproxy.logs import text_observer
from aiproxy.monitor import ExchangeMonitor
from aiproxy.routing.build import build_routes
from aiproxy.routing.health import HealthService
from aiproxy.routing.routes import RouteTable
from aiproxy.server import GatewayResource, GatewaySite
from aiproxy.workers.sizing import local_budget_problems, worker_count

__all__ = [
    "DEFAULT_BACKLOG",
    "MAX_WORKERS",
    "GatewayService",
    "Options",
    "makeService",
    "with_backlog",
    "workers_setting",
]

log = Logger()


#: The most worker processes, as the config's schema allows.
MAX_WORKERS = 256


def _refuse(lines: Sequence[str]) -> NoReturn:
    """
    Print why the gateway cannot start, one line each on stderr (without
    twistd's usage text), and exit with twistd's status for bad options.
    """
    for line in lines:
        print(line, file=sys.stderr)
    raise SystemExit(1)


def workers_setting(value: str) -> int | str:
    """
    The C{workers} setting a C{--workers} value means: a number from 1 to
    L{MAX_WORKERS}, or C{"auto"}.

    @raise ValueError: it means none.
    """
    if value.strip().lower() == "auto":
        return "auto"
    number = int(value)
    if not 1 <= number <= MAX_WORKERS:
        raise ValueError(value)
    return number


class Options(usage.Options):
    """
    C{twistd aiproxy --config PATH [--listen ENDPOINT ...] [--workers N|auto]}.
    """

    synopsis = "--config PATH [--listen ENDPOINT ...] [--workers N|auto]"
    longdesc = (
        "Serve the routes of an aiproxy YAML config. Invalid configs are refused "
        "with one '<json path>: <reason>' line per problem."
    )
    optParameters = [["config", "c", None, "Path to the YAML config file (required)."]]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["workers"] = None

    def opt_workers(self, value: str) -> None:
        """
        Worker processes serving the listeners: a number (1 to 256), or
        auto for one per core; overrides the config's workers (1: a single
        process).
        """
        try:
            self["workers"] = workers_setting(value)
        except ValueError:
            _refuse([f"--workers: {value!r} is neither a number from 1 to {MAX_WORKERS} nor auto"])

    def opt_listen(self, endpoint: str) -> None:
        """
        Listen on this Twisted server endpoint string instead of the
        config's C{listen} (repeatable).
        """
        self["listen"].append(endpoint)

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"aiproxy {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        """
        Load and check the config, the number of workers and the
        endpoints; on a problem, print the problems and exit 1.
        """
        if not self["config"]:
            raise usage.UsageError("--config PATH is required")
        from twisted.internet import reactor

        from aiproxy.workers.snapshot import read_config

        path = self["config"]
        try:
            self["text"], self["parsed"] = read_config(path)
            self["routes"] = build_routes(self["parsed"], reactor)
            workers = self["workers"] if self["workers"] is not None else self["parsed"].workers
            problems = local_budget_problems(self["parsed"], workers)
            if problems:
                raise ConfigError(problems)
        except ConfigError as e:
            _refuse([f"{path}: invalid configuration", *e.problems])
        workers = self["workers"] if self["workers"] is not None else self["parsed"].workers
        self["worker_count"] = worker_count(workers)
        self._check_listen(reactor)

    def _check_listen(self, reactor: Any) -> None:
        """
        Refuse endpoints the gateway cannot listen on (or, with workers,
        cannot share), found before listening.
        """
        from aiproxy.workers.listeners import share_problem

        endpoints = list(self["listen"] or self["parsed"].listen)
        problems = []
        for index, endpoint in enumerate(endpoints):
            problem = _listen_problem(reactor, endpoint)
            if problem is None and self["worker_count"] > 1:
                problem = share_problem(endpoint)
            if problem is None:
                continue
            if self["listen"]:
                where = "--listen"
            else:
                where = "listen" if len(endpoints) == 1 else f"listen[{index}]"
            problems.append(f"{where}: {problem}")
        if problems and not self["listen"]:
            problems.insert(0, f"{self['config']}: invalid configuration")
        if problems:
            _refuse(problems)


#: The listen backlog of TCP, SSL and UNIX endpoints that do not set one:
#: Twisted's default of 50 drops connections (SYN retries cost a second or
#: more) when many clients arrive at once.
DEFAULT_BACKLOG = 1024


def with_backlog(endpoint: str) -> str:
    """
    C{endpoint} with C{backlog=DEFAULT_BACKLOG} added when it is a TCP, SSL
    or UNIX endpoint string without a backlog of its own.
    """
    kind = endpoint.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={DEFAULT_BACKLOG}"
    return endpoint


def _listen_problem(reactor: Any, endpoint: str) -> str | None:
    """
    Why the gateway cannot listen on C{endpoint}, known before listening:
    chiefly a C{systemd:} endpoint whose socket systemd did not pass (the
    process was not started by its socket unit, or not as the main process).
    """
    try:
        serverFromString(reactor, endpoint)
    except (KeyError, IndexError):
        return (
            f"cannot listen on {endpoint!r}: no such socket was passed by systemd "
            "(LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID must name this process; "
            "start it through its .socket unit)"
        )
    except Exception as e:
        return f"cannot listen on {endpoint!r}: {e}"
    return None


class GatewayService(MultiService):
    """
    The whole gateway: listeners over one L{GatewayResource}, the metrics
    listener (with C{metrics_listen}), the health checks of the routes in
    force, the reload (with a config path) and the drain; on stop the
    listeners stop, the drain waits for the requests in flight, then the
    routes' upstream pools are closed.

    A worker process runs it on the sockets its parent passed
    (C{endpoints}), recording metrics its parent serves.

    @ivar monitor: the L{ExchangeMonitor} every exchange reports to.
    @ivar metrics: the L{aiproxy.metrics.Metrics}, or L{None}.
    """

    def __init__(
        self,
        config: Config,
        table: RouteTable,
        reactor: Any,
        listen: list[str] | None = None,
        log_observer: ILogObserver | None = None,
        config_path: str | None = None,
        install_signals: bool = False,
        endpoints: Sequence[IStreamServerEndpoint] | None = None,
        serve_metrics: bool = True,
    ) -> None:
        """
        @param listen: endpoint strings overriding the config's C{listen}.
        @param log_observer: installed as the application's log observer.
        @param config_path: the file C{SIGHUP} reloads (no reload without).
        @param install_signals: the gateway is the process's: handle
            C{SIGHUP} (reload) and C{SIGTERM} (drain, exit 0) and freeze
            the start-up heap (L{freeze_startup_heap}) once the reactor
            runs.
        @param endpoints: server endpoints to serve on instead of any
            endpoint string (a worker's adopted sockets).
        @param serve_metrics: serve C{/metrics} on C{metrics_listen}; a
            worker records its metrics but does not serve them.
        """
        super().__init__()
        self.config = config
        self.log_observer = log_observer
        self.reactor = reactor
        self._process = install_signals
        self._listen_override = bool(listen) or endpoints is not None
        self._serve_metrics = serve_metrics
        self.metrics = None
        if config.metrics_listen:
            from aiproxy.metrics import Metrics

            self.metrics = Metrics()
        self.monitor = ExchangeMonitor(reactor, self.metrics)
        self.resource = GatewayResource(table, reactor, self.monitor)
        self.site = GatewaySite(self.resource, reactor=reactor)
        self.site.apply_limits(config)
        self.drain = DrainService(
            self.monitor,
            reactor,
            config.shutdown_grace_s,
            self.site,
            install_signal=install_signals,
        )
        self.drain.setServiceParent(self)
        self.health = HealthService(table.checkers)
        self.health.setServiceParent(self)
        self.reloader: ReloadService | None = None
        if config_path is not None:
            self.reloader = ReloadService(
                config_path,
                self.resource,
                self.monitor,
                reactor,
                on_reloaded=self._reloaded,
                install_signal=install_signals,
            )
            # Before the listeners: its SIGHUP handler is installed first.
            self.reloader.setServiceParent(self)
        if endpoints is None:
            endpoints = [
                serverFromString(reactor, with_backlog(endpoint))
                for endpoint in listen or config.listen
            ]
        for endpoint in endpoints:
            listener = StreamServerEndpointService(endpoint, self.site)
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
        if self.metrics is not None and serve_metrics:
            from aiproxy.metrics import metrics_site

            assert config.metrics_listen is not None
            listener = StreamServerEndpointService(
                serverFromString(reactor, config.metrics_listen), metrics_site(self.metrics)
            )
            listener._raiseSynchronously = True
            listener.setServiceParent(self)

    def _reloaded(self, config: Config) -> None:
        """
        A new config is in force: its routes' health checks replace the old
        ones', C{shutdown_grace_s} applies, and changes that need a restart
        are logged.
        """
        self.health.use(self.resource.table.checkers)
        self.drain.grace_s = config.shutdown_grace_s
        self.site.apply_limits(config)
        if config.listen != self.config.listen and not self._listen_override:
            log.warn("listen changed in the config: restart aiproxy to apply it")
        if config.metrics_listen != self.config.metrics_listen and self._serve_metrics:
            log.warn("metrics_listen changed in the config: restart aiproxy to apply it")
        self.config = config

    def startService(self) -> None:
        super().startService()
        if self._process:
            # The process is this gateway's alone.
            self.reactor.callWhenRunning(freeze_startup_heap)

    def setServiceParent(self, parent: Any) -> None:
        """
        Attach to the application, making C{log_observer} its log observer.
        """
        super().setServiceParent(parent)
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)

    def stopService(self) -> Deferred[Any]:
        d = maybeDeferred(super().stopService)
        d.addCallback(
            lambda _: gatherResults(
                [
                    self.resource.table.close(),
                    self.monitor.wait_closed(),
                    process_stores(self.reactor).close(),
                ]
            )
        )
        return d


def makeService(options: Options) -> MultiService:
    """
    Build the gateway from parsed options: a L{GatewayService}, or with
    more than one worker the parent of the worker processes
    (L{aiproxy.workers.parent.WorkerParent}). Unless twistd was told where
    to log, it logs with L{aiproxy.logs.text_observer} (access records as
    bare JSON lines on stdout); the workers log to the same stdout, or with
    twistd's C{--logger}.
    """
    from twisted.internet import reactor

    parent = getattr(options, "parent", None) or {}
    default_logging = parent.get("logfile") in (None, "-") and not parent.get("logger")
    observer = text_observer() if default_logging else None
    if options["worker_count"] > 1:
        from aiproxy.workers.parent import WorkerParent

        # The parent serves nothing: the routes were built to check them.
        options["routes"].close()
        logger = parent.get("logger")
        return WorkerParent(
            options["parsed"],
            options["text"],
            os.path.abspath(options["config"]),
            reactor,
            options["worker_count"],
            options["listen"],
            observer,
            logger=logger if isinstance(logger, str | None) else fullyQualifiedName(logger),
            install_signals=True,
            workers_override=options["workers"] is not None,
        )
    return GatewayService(
        options["parsed"],
        options["routes"],
        reactor,
        options["listen"],
        observer,
        config_path=options["config"],
        install_signals=True,
    )
