# -*- test-case-name: tests.test_workers -*-
"""
The parent process of a gateway with worker processes: it serves no
request itself.

 - Start: it listens (L{aiproxy.workers.listeners.SharedListener}), writes
   the config it checked into its private directory and starts the
   workers on the listening sockets (L{aiproxy.workers.pool.WorkerPool}).
 - C{SIGHUP}: it reads and checks the config file once, as at start; an
   invalid one is logged, problem by problem, and nothing changes; a valid
   one replaces the copy the workers load and every worker gets
   C{SIGHUP} (streams in flight finish on the routes they began with).
 - C{SIGTERM} or C{SIGINT}: every worker gets C{SIGTERM} and drains; the
   parent closes its copies of the listeners, waits for the workers
   (killing those still running C{shutdown_grace_s} + L{STOP_MARGIN_S}
   after), and exits 0. A second signal makes the workers abort their
   requests at once.
 - C{/metrics} (C{metrics_listen}) is served by the parent, for the whole
   gateway (L{aiproxy.workers.metrics}).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.logger import ILogObserver, Logger

from aiproxy.config import Config, ConfigError
from aiproxy.lifecycle import FLUSH_TIMEOUT_S, SignalService
from aiproxy.routing.build import build_routes
from aiproxy.workers.listeners import SharedListener
from aiproxy.workers.pool import Launch, WorkerPool
from aiproxy.workers.sizing import local_budget_problems
from aiproxy.workers.snapshot import RunDirectory, read_config

if TYPE_CHECKING:
    from aiproxy.workers.metrics import WorkersMetrics

__all__ = ["STOP_MARGIN_S", "WorkerParent"]

log = Logger()

#: How long after C{shutdown_grace_s} a stopping worker is killed: its
#: drain may still flush its connections (up to C{FLUSH_TIMEOUT_S}) and
#: close its upstream pools.
STOP_MARGIN_S = FLUSH_TIMEOUT_S + 5.0

#: Environment variables systemd sets for the parent only.
_SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class WorkerParent(MultiService):
    """
    The parent's service tree: the shared listeners, the metrics listener
    (with C{metrics_listen}), the workers and the signal handlers.

    @ivar config: the config in force.
    @ivar pool: the L{WorkerPool}.
    @ivar listeners: the L{SharedListener}s.
    @ivar metrics: the L{aiproxy.workers.metrics.WorkersMetrics}, or L{None}.
    @ivar run: the L{RunDirectory}, once started.
    """

    def __init__(
        self,
        config: Config,
        text: str,
        path: str,
        reactor: Any,
        workers: int,
        listen: Sequence[str] = (),
        log_observer: ILogObserver | None = None,
        logger: str | None = None,
        install_signals: bool = False,
        workers_override: bool = False,
        python: str = sys.executable,
    ) -> None:
        """
        @param text: the text of the config file, as checked.
        @param path: the config file, read again on C{SIGHUP}.
        @param workers: how many worker processes.
        @param listen: endpoint strings overriding the config's C{listen}.
        @param log_observer: installed as the application's log observer.
        @param logger: the log observer factory of the workers (twistd's
            C{--logger}), by its fully qualified name.
        @param install_signals: handle C{SIGHUP}, C{SIGTERM} and C{SIGINT}.
        @param workers_override: C{--workers} overrides the config's.
        @param python: the interpreter running the workers.
        """
        from aiproxy.tap import with_backlog

        super().__init__()
        self.config = config
        self._text = text
        self.path = path
        self.reactor = reactor
        self.log_observer = log_observer
        self._logger = logger
        self._python = python
        self._listen_override = bool(listen)
        self._workers_override = workers_override
        self.run: RunDirectory | None = None
        if install_signals:
            # First: handled before the listeners listen.
            for number, callback, reactor_handles in (
                (signal.SIGHUP, self.reload, False),
                (signal.SIGTERM, lambda: self._terminate("SIGTERM"), True),
                (signal.SIGINT, lambda: self._terminate("SIGINT"), True),
            ):
                SignalService(number, reactor, callback, reactor_handles).setServiceParent(self)
        self.listeners = [
            SharedListener(reactor, with_backlog(endpoint)) for endpoint in listen or config.listen
        ]
        for listener in self.listeners:
            listener.setServiceParent(self)
        self.metrics: WorkersMetrics | None = None
        if config.metrics_listen:
            self._serve_metrics(config.metrics_listen)
        self.pool = WorkerPool(
            reactor,
            workers,
            self._launch,
            config.shutdown_grace_s + STOP_MARGIN_S,
            on_started=self._worker_started,
            on_ended=self._worker_ended,
        )
        self.pool.setServiceParent(self)

    def _serve_metrics(self, endpoint: str) -> None:
        from aiproxy.metrics import metrics_site
        from aiproxy.workers.metrics import WorkersMetrics

        metrics = self.metrics = WorkersMetrics()
        listener = StreamServerEndpointService(
            serverFromString(self.reactor, endpoint), metrics_site(metrics.registry)
        )
        listener._raiseSynchronously = True
        listener.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """
        Attach to the application, making C{log_observer} its log observer.
        """
        super().setServiceParent(parent)
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)

    # -- the workers -----------------------------------------------------------

    def startService(self) -> None:
        """
        Write the config the workers load, then listen (if not done yet)
        and start the workers.
        """
        self.run = RunDirectory()
        self.run.write_config(self._text)
        if self.metrics is not None:
            self.metrics.path = self.run.metrics_path
        log.info(
            "starting {count} worker process(es) on {listen}",
            count=self.pool.count,
            listen=", ".join(listener.endpoint for listener in self.listeners),
        )
        super().startService()

    def _launch(self, index: int) -> Launch:
        """
        How to start worker C{index}.
        """
        assert self.run is not None
        args = [self._python, "-m", "aiproxy.workers.child"]
        args += ["--config", self.run.config_path, "--index", str(index)]
        shared = [listener.shared for listener in self.listeners]
        for socket in shared:
            args += ["--socket", socket.argument()]
        if self._logger:
            args += ["--logger", self._logger]
        env = {name: value for name, value in os.environ.items() if name not in _SYSTEMD_VARIABLES}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self.metrics is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.run.metrics_path
        child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2}
        child_fds.update({socket.fd: socket.fd for socket in shared})
        return Launch(self._python, args, env, child_fds)

    def _worker_started(self, index: int, pid: int) -> None:
        if self.metrics is not None:
            self.metrics.workers.set(len(self.pool.pids))

    def _worker_ended(self, index: int, pid: int, restarting: bool) -> None:
        if self.metrics is not None:
            self.metrics.process_dead(pid)
            self.metrics.workers.set(len(self.pool.pids))
            if restarting:
                self.metrics.restarts.inc()

    # -- signals -----------------------------------------------------------------

    def reload(self) -> bool:
        """
        Check the config file; if valid, make it the workers' config and
        send them C{SIGHUP}.

        @return: whether the new config is in force.
        """
        if not self.running or self.pool.stopping or self.run is None:
            log.warn("not reloading {path}: the gateway is stopping", path=self.path)
            return False
        log.info("SIGHUP: checking {path}", path=self.path)
        try:
            text, config = self._check()
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload refused: {problem}", problem=problem, path=self.path)
            log.error(
                "invalid configuration {path}: {count} problem(s); still serving the previous "
                "configuration",
                path=self.path,
                count=len(e.problems),
            )
            self._count_reload("failure")
            return False
        self.run.write_config(text)
        self._warn_restart(config)
        self.config = config
        self.pool.stop_timeout_s = config.shutdown_grace_s + STOP_MARGIN_S
        count = self.pool.signal_all("HUP")
        log.info(
            "{path} is valid: {count} worker process(es) load it; requests in flight finish "
            "on the previous routes",
            path=self.path,
            count=count,
        )
        self._count_reload("success")
        return True

    def _check(self) -> tuple[str, Config]:
        """
        Read and check the config file as at start: its routes are built
        (then closed: the parent serves nothing) and its budgets are
        checked against the number of workers.

        @raise ConfigError: with every problem found.
        """
        text, config = read_config(self.path)
        table = build_routes(config, self.reactor)
        table.close().addErrback(lambda f: log.failure("closing checked routes failed", f))
        problems = local_budget_problems(config, self.pool.count)
        if problems:
            raise ConfigError(problems)
        return text, config

    def _warn_restart(self, config: Config) -> None:
        """
        Log the changes of a new config that apply only after a restart.
        """
        changed = []
        if config.listen != self.config.listen and not self._listen_override:
            changed.append("listen")
        if config.workers != self.config.workers and not self._workers_override:
            changed.append("workers")
        if config.metrics_listen != self.config.metrics_listen:
            changed.append("metrics_listen")
        for name in changed:
            log.warn("{name} changed in the config: restart aiproxy to apply it", name=name)

    def _count_reload(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reloads.labels(result=result).inc()

    def _terminate(self, name: str) -> None:
        """
        C{SIGTERM} or C{SIGINT}: stop the reactor, whose shutdown stops
        the workers; during the stop, make them abort what is left.
        """
        if self.pool.stopping:
            log.warn(
                "{signal} again: the workers abort their requests now",
                signal=name,
            )
            self.pool.signal_all("TERM")
            return
        log.info("{signal}: stopping the worker processes gracefully", signal=name)
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def stopService(self) -> Deferred[Any]:
        """
        Stop the workers (each drains), close the parent's listeners, and
        once every worker exited remove the private directory.
        """
        Service.stopService(self)
        stopped = [self.pool.stopService()]
        stopped += [
            maybeDeferred(service.stopService)
            for service in self
            if service is not self.pool and service.running
        ]
        d = gatherResults(stopped, consumeErrors=True)
        d.addBoth(self._stopped)
        return d

    def _stopped(self, result: object) -> object:
        if self.run is not None:
            self.run.remove()
            self.run = None
        log.info("all worker processes exited")
        return result
