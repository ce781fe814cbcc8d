# -*- test-case-name: tests.test_tap -*-
"""
C{twistd aiproxy}: command-line options and the service tree.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from aiproxy import __version__
from aiproxy.config import Config, ConfigError, load_config
from aiproxy.lifecycle import DrainService, ReloadService
from aiproxy.logs import text_observer
from aiproxy.monitor import ExchangeMonitor
from aiproxy.routing.build import build_routes
from aiproxy.routing.health import HealthService
from aiproxy.routing.routes import RouteTable
from aiproxy.server import GatewayResource, GatewaySite

__all__ = ["DEFAULT_BACKLOG", "GatewayService", "Options", "makeService", "with_backlog"]

log = Logger()


class Options(usage.Options):
    """
    C{twistd aiproxy --config PATH [--listen ENDPOINT ...]}.
    """

    synopsis = "--config PATH [--listen ENDPOINT ...]"
    longdesc = (
        "Serve the routes of an aiproxy YAML config. Invalid configs are refused "
        "with one '<json path>: <reason>' line per problem."
    )
    optParameters = [["config", "c", None, "Path to the YAML config file (required)."]]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

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
        if not self["config"]:
            raise usage.UsageError("--config PATH is required")
        from twisted.internet import reactor

        try:
            self["parsed"] = load_config(self["config"])
            self["routes"] = build_routes(self["parsed"], reactor)
        except ConfigError as e:
            raise usage.UsageError(_problems(self["config"], e)) from None
        for endpoint in self["listen"] or self["parsed"].listen:
            problem = _listen_problem(reactor, endpoint)
            if problem is not None:
                raise usage.UsageError(problem)


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


def _problems(path: str, error: ConfigError) -> str:
    """
    The message of an invalid config: one problem per line.
    """
    return f"invalid configuration {path}:\n" + "\n".join(error.problems)


class GatewayService(MultiService):
    """
    The whole gateway: listeners over one L{GatewayResource}, the metrics
    listener (with C{metrics_listen}), the health checks of the routes in
    force, the reload (with a config path) and the drain; on stop the
    listeners stop, the drain waits for the requests in flight, then the
    routes' upstream pools are closed.

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
    ) -> None:
        """
        @param listen: endpoint strings overriding the config's C{listen}.
        @param log_observer: installed as the application's log observer.
        @param config_path: the file C{SIGHUP} reloads (no reload without).
        @param install_signals: handle C{SIGHUP} (reload) and C{SIGTERM}
            (drain, exit 0) once the reactor runs.
        """
        super().__init__()
        self.config = config
        self.log_observer = log_observer
        self.reactor = reactor
        self._listen_override = bool(listen)
        self.metrics = None
        if config.metrics_listen:
            from aiproxy.metrics import Metrics

            self.metrics = Metrics()
        self.monitor = ExchangeMonitor(reactor, self.metrics)
        self.resource = GatewayResource(table, reactor, self.monitor)
        self.site = GatewaySite(self.resource, reactor=reactor)
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
        for endpoint in listen or config.listen:
            listener = StreamServerEndpointService(
                serverFromString(reactor, with_backlog(endpoint)), self.site
            )
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
        if self.metrics is not None:
            from aiproxy.metrics import metrics_site

            assert config.metrics_listen is not None
            listener = StreamServerEndpointService(
                serverFromString(reactor, config.metrics_listen), metrics_site(self.metrics)
            )
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
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
            self.reloader.setServiceParent(self)

    def _reloaded(self, config: Config) -> None:
        """
        A new config is in force: its routes' health checks replace the old
        ones', C{shutdown_grace_s} applies, and changes that need a restart
        are logged.
        """
        self.health.use(self.resource.table.checkers)
        self.drain.grace_s = config.shutdown_grace_s
        if config.listen != self.config.listen and not self._listen_override:
            log.warn("listen changed in the config: restart aiproxy to apply it")
        if config.metrics_listen != self.config.metrics_listen:
            log.warn("metrics_listen changed in the config: restart aiproxy to apply it")
        self.config = config

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
            lambda _: gatherResults([self.resource.table.close(), self.monitor.wait_closed()])
        )
        return d


def makeService(options: Options) -> GatewayService:
    """
    Build the gateway from parsed options. Unless twistd was told where to
    log, it logs with L{aiproxy.logs.text_observer} (access records as bare
    JSON lines on stdout).
    """
    from twisted.internet import reactor

    parent = getattr(options, "parent", None) or {}
    default_logging = parent.get("logfile") in (None, "-") and not parent.get("logger")
    return GatewayService(
        options["parsed"],
        options["routes"],
        reactor,
        options["listen"],
        text_observer() if default_logging else None,
        config_path=options["config"],
        install_signals=True,
    )
