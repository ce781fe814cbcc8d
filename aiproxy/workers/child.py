# -*- test-case-name: tests.test_workers -*-
"""
A worker process: C{python -m aiproxy.workers.child --config PATH --index N
--socket FD:FAMILY:BACKLOG ...}, started by the parent
(L{aiproxy.workers.parent}), never by hand.

It runs the same L{aiproxy.tap.GatewayService} as a single process, on
the sockets it adopts instead of listening, with the same signals:
C{SIGHUP} reloads its config (the copy the parent checked), C{SIGTERM}
drains and exits 0. C{SIGINT} is ignored: a Ctrl-C in a terminal reaches
the parent too, which stops its workers with C{SIGTERM}. The worker also
stops, draining, when its parent is gone (the pipe on its stdin reaches
its end). Its metrics are written to C{PROMETHEUS_MULTIPROC_DIR}, served by
the parent.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

__all__ = ["ParentWatch", "main"]


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    from aiproxy.workers.listeners import SharedSocket

    parser = argparse.ArgumentParser(
        prog="python -m aiproxy.workers.child",
        description="An aiproxy worker process (started by twistd aiproxy --workers N).",
    )
    parser.add_argument("--config", required=True, help="the config the parent checked")
    parser.add_argument("--index", type=int, required=True, help="the worker's index, from 0")
    parser.add_argument(
        "--socket",
        type=SharedSocket.parse,
        action="append",
        default=[],
        help="a listening socket passed by the parent: FD:FAMILY:BACKLOG (repeatable)",
    )
    parser.add_argument("--logger", help="the log observer factory (twistd's --logger)")
    return parser.parse_args(argv)


@implementer(IReadDescriptor)
class ParentWatch:
    """
    Reads the pipe the parent holds open (the worker's stdin) and calls
    C{gone} once it reaches its end: the parent exited, however it ended.
    """

    def __init__(self, reactor: Any, fd: int, gone: Callable[[], None]) -> None:
        from twisted.internet import fdesc

        self._reactor = reactor
        self._fd = fd
        self._gone = gone
        fdesc.setNonBlocking(fd)
        reactor.addReader(self)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "ParentWatch"

    def doRead(self) -> Any:
        from twisted.internet import fdesc

        return fdesc.readFromFD(self._fd, lambda data: None)

    def connectionLost(self, reason: Any) -> None:
        self._reactor.removeReader(self)
        # The end of the pipe, not the reactor letting go of every
        # descriptor as it shuts down.
        if reason.check(ConnectionDone):
            self._gone()


def _observer(logger: str | None) -> Any:
    from twisted.python.reflect import namedAny

    from aiproxy.logs import text_observer

    if logger:
        return namedAny(logger)()
    return text_observer()


def _start(arguments: argparse.Namespace, reactor: Any) -> Any:
    """
    Build and start the worker's gateway.

    @raise ConfigError: the config cannot be served.
    """
    from aiproxy.config import load_config
    from aiproxy.routing.build import build_routes
    from aiproxy.tap import GatewayService
    from aiproxy.workers.listeners import SharedPortEndpoint

    config = load_config(arguments.config)
    table = build_routes(config, reactor)
    service = GatewayService(
        config,
        table,
        reactor,
        config_path=arguments.config,
        install_signals=True,
        endpoints=[SharedPortEndpoint(reactor, shared) for shared in arguments.socket],
        serve_metrics=False,
    )
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    return service


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run one worker until it is stopped.

    @return: the exit status: 0 after a drain, 1 when it could not start
        (the parent starts it again later).
    """
    # A SIGHUP sent while the worker starts is held until its reload
    # handler is installed: it then reloads the newest config.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    arguments = _arguments(argv)
    from twisted.internet import reactor
    from twisted.internet.error import ReactorNotRunning
    from twisted.logger import Logger, globalLogBeginner

    from aiproxy.config import ConfigError
    from aiproxy.workers.logs import WorkerLogObserver

    log = Logger(namespace="aiproxy.workers.child")
    observer = WorkerLogObserver(_observer(arguments.logger), arguments.index, os.getpid())
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    try:
        _start(arguments, reactor)
    except ConfigError as e:
        for problem in e.problems:
            log.error("cannot start: {problem}", problem=problem)
        return 1
    except Exception:
        log.failure("cannot start")
        return 1

    def parent_gone() -> None:
        log.warn("the parent process is gone: stopping")
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    ParentWatch(reactor, 0, parent_gone)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
