# -*- test-case-name: tests.test_workers -*-
"""
Tests for L{aiproxy.workers}: the pool of worker processes (restarts with
a growing delay, signals, the stop), the parent's reload check and
shutdown, the shared sockets, the summed metrics and the workers' log
lines; without processes or sockets, time driven by a clock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aiproxy.accesslog import ACCESS_NAMESPACE
from aiproxy.config import parse_config
from aiproxy.lifecycle import SignalService
from aiproxy.workers.child import ParentWatch
from aiproxy.workers.listeners import SharedPortEndpoint, SharedSocket, share_problem
from aiproxy.workers.logs import WorkerLogObserver
from aiproxy.workers.metrics import WorkersMetrics
from aiproxy.workers.parent import STOP_MARGIN_S, WorkerParent
from aiproxy.workers.pool import Launch, WorkerPool, describe_exit
from aiproxy.workers.snapshot import RunDirectory, read_config
from tests.helpers import log_events, write_config

ROUTE = """
  - id: {id}
    uri: {uri}
    plugins:
      ai-proxy:
        provider: openai
        auth: {{header: {{Authorization: "Bearer sk-test"}}}}
        override: {{endpoint: "http://127.0.0.1:7751/v1/chat/completions"}}
"""


def config_text(route_id: str = "chat", uri: str = "/v1/chat/completions", **top: Any) -> str:
    """
    A config of one route, with top-level keys C{top}.
    """
    head = "".join(f"{key}: {json.dumps(value)}\n" for key, value in top.items())
    return head + "routes:" + ROUTE.format(id=route_id, uri=uri)


# -- fakes ------------------------------------------------------------------------------


@implementer(IProcessTransport)
class FakeProcess:
    """
    A spawned process that runs until the test ends it.

    @ivar signals: the signals sent to it, by name.
    """

    def __init__(self, protocol: Any, pid: int, args: list[str], env: dict, fds: dict) -> None:
        self.protocol = protocol
        self.pid: int | None = pid
        self.args = args
        self.env = env
        self.child_fds = fds
        self.signals: list[str] = []

    def signalProcess(self, signalID: str | int) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(str(signalID))

    def end(self, code: int = 0, signal: int | None = None) -> None:
        """
        The process exits with C{code}, or is killed by C{signal}.
        """
        self.pid = None
        if code == 0 and signal is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(None if signal else code, signal))
        self.protocol.processEnded(reason)

    def closeStdin(self) -> None: ...
    def closeStdout(self) -> None: ...
    def closeStderr(self) -> None: ...
    def closeChildFD(self, descriptor: int) -> None: ...
    def writeToChild(self, childFD: int, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: Any) -> None: ...
    def getPeer(self) -> Any: ...
    def getHost(self) -> Any: ...


class FakeListeningPort:
    """
    The parent's copy of a TCP listener.
    """

    def __init__(self, port: int, backlog: int) -> None:
        self.port = port
        self.backlog = backlog
        self.reading = True
        self.listening = True
        self._shouldShutdown = True

    def stopReading(self) -> None:
        self.reading = False

    def fileno(self) -> int:
        return 7

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self) -> Any:
        self.listening = False
        return succeed(None)


@implementer(IReactorProcess)
class FakeReactor(MemoryReactorClock):
    """
    A memory reactor that spawns L{FakeProcess}es.

    @ivar processes: every process spawned, in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.ports: list[FakeListeningPort] = []
        self.fail_spawns = 0
        self.stops = 0

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: Any,
        args: Any = (),
        env: Any = None,
        path: Any = None,
        uid: Any = None,
        gid: Any = None,
        usePTY: bool = False,
        childFDs: Any = None,
    ) -> FakeProcess:
        if self.fail_spawns:
            self.fail_spawns -= 1
            raise OSError("no more processes")
        process = FakeProcess(processProtocol, 1000 + len(self.processes), args, env, childFDs)
        processProtocol.makeConnection(process)
        self.processes.append(process)
        return process

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        super().listenTCP(port, factory, backlog, interface)
        listening = FakeListeningPort(port or 40000 + len(self.ports), backlog)
        self.ports.append(listening)
        return listening

    def stop(self) -> None:
        self.stops += 1

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.callLater(0, f, *args, **kwargs)


def launch(index: int) -> Launch:
    return Launch("/bin/python", ["/bin/python", "-m", "w", str(index)], {"A": "1"}, {0: "w"})


# -- the pool -------------------------------------------------------------------------------


class PoolTests(SynchronousTestCase):
    """
    L{WorkerPool}: N workers, a dead one restarted after a growing delay,
    signals forwarded, and a stop that waits for every worker.
    """

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.events = log_events(self, "aiproxy.workers.pool")
        self.pool = WorkerPool(self.reactor, 2, launch, 40.0)
        self.pool.startService()

    def test_fakes(self) -> None:
        """
        The fakes provide the interfaces the pool uses.
        """
        self.assertTrue(verifyObject(IReactorProcess, self.reactor))
        self.assertTrue(verifyObject(IProcessTransport, self.reactor.processes[0]))

    def test_started(self) -> None:
        """
        Starting spawns one process per worker with its launch's
        arguments, environment and descriptors.
        """
        first, second = self.reactor.processes
        self.assertEqual(first.args, ["/bin/python", "-m", "w", "0"])
        self.assertEqual(second.args[-1], "1")
        self.assertEqual((first.env, first.child_fds), ({"A": "1"}, {0: "w"}))
        self.assertEqual(self.pool.pids, [1000, 1001])

    def test_restart_backoff(self) -> None:
        """
        A worker that dies is restarted after 0.5 s, then 1 s, 2 s... up to
        30 s between restarts while it keeps dying; each death is logged
        with its pid and how it ended.
        """
        delays = []
        for _ in range(9):
            process = self.reactor.processes[-1] if len(self.reactor.processes) > 2 else None
            process = process or self.reactor.processes[0]
            spawned = len(self.reactor.processes)
            process.end(signal=signal.SIGKILL)
            waited = 0.0
            while len(self.reactor.processes) == spawned:
                self.reactor.advance(0.25)
                waited += 0.25
            delays.append(waited)
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])
        died = [event for event in self.events if event["log_level"] is LogLevel.warn]
        self.assertEqual(died[0]["pid"], 1000)
        self.assertEqual(died[0]["how"], "signal 9 (SIGKILL)")
        self.assertEqual(died[0]["delay"], 0.5)
        self.assertEqual(self.pool.pids, [1010, 1001])

    def test_backoff_reset(self) -> None:
        """
        A worker that ran 60 s before it died is restarted after 0.5 s
        again.
        """
        self.reactor.processes[0].end(3)
        self.reactor.advance(0.5)
        self.reactor.processes[-1].end(3)
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.processes), 4)
        self.reactor.advance(60)
        self.reactor.processes[-1].end(3)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.processes), 5)
        self.assertEqual(self.events[-2]["how"], "exit status 3")

    def test_spawn_fails(self) -> None:
        """
        A worker that cannot be spawned is tried again later.
        """
        self.reactor.fail_spawns = 1
        self.reactor.processes[0].end(1)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.processes), 2)
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.processes), 3)
        self.flushLoggedErrors(OSError)

    def test_signal_all(self) -> None:
        """
        A signal goes to every running worker, not to one that exited.
        """
        first, second = self.reactor.processes
        self.assertEqual(self.pool.signal_all("HUP"), 2)
        second.pid = None
        self.assertEqual(self.pool.signal_all("HUP"), 1)
        self.assertEqual((first.signals, second.signals), (["HUP", "HUP"], ["HUP"]))

    def test_stop(self) -> None:
        """
        Stopping sends SIGTERM to every worker and fires once all exited;
        a worker exiting then is not restarted, nor is a pending restart
        made.
        """
        first, second = self.reactor.processes
        second.end(1)
        d = self.pool.stopService()
        self.assertEqual(first.signals, ["TERM"])
        self.assertNoResult(d)
        first.end(0)
        self.successResultOf(d)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(self.events[-1]["how"], "exit status 0")

    def test_stop_kills_stragglers(self) -> None:
        """
        A worker still running the stop timeout after SIGTERM is killed.
        """
        first, second = self.reactor.processes
        d = self.pool.stopService()
        second.end(0)
        self.reactor.advance(39)
        self.assertEqual(first.signals, ["TERM"])
        self.reactor.advance(1)
        self.assertEqual(first.signals, ["TERM", "KILL"])
        first.end(signal=signal.SIGKILL)
        self.successResultOf(d)

    def test_callbacks(self) -> None:
        """
        The pool tells when a worker started and ended, and whether it is
        restarted.
        """
        seen: list[tuple[Any, ...]] = []
        pool = WorkerPool(
            self.reactor,
            1,
            launch,
            1.0,
            on_started=lambda index, pid: seen.append(("started", index, pid)),
            on_ended=lambda index, pid, again: seen.append(("ended", index, pid, again)),
        )
        pool.startService()
        self.reactor.processes[-1].end(1)
        self.reactor.advance(0.5)
        pool.stopService()
        self.reactor.processes[-1].end(0)
        self.assertEqual(
            seen,
            [
                ("started", 0, 1002),
                ("ended", 0, 1002, True),
                ("started", 0, 1003),
                ("ended", 0, 1003, False),
            ],
        )

    def test_describe_exit(self) -> None:
        """
        Exits are described by status or by signal.
        """
        self.assertEqual(describe_exit(Failure(ProcessDone(0))), "exit status 0")
        self.assertEqual(describe_exit(Failure(ProcessTerminated(2))), "exit status 2")
        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(None, signal.SIGTERM))),
            "signal 15 (SIGTERM)",
        )


# -- the parent ----------------------------------------------------------------------------


class ParentTests(SynchronousTestCase):
    """
    L{WorkerParent}: the listeners, the workers' launch, the reload check
    and the stop.
    """

    def setUp(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        self.patch(tempfile, "tempdir", str(base))
        self.directory = base / "etc"
        self.reactor = FakeReactor()
        self.events = log_events(self, "aiproxy.workers.parent")

    def parent(self, text: str, **kwargs: Any) -> WorkerParent:
        path = write_config(self.directory, text)
        parent = WorkerParent(
            parse_config(text, environ={}), text, str(path), self.reactor, 2, **kwargs
        )
        parent.startService()
        self.addCleanup(self.remove_run, parent)
        return parent

    def remove_run(self, parent: WorkerParent) -> None:
        if parent.run is not None:
            parent.run.remove()

    def test_listen(self) -> None:
        """
        The parent listens on the config's endpoints with the backlog
        added, never reads from them, and passes them to every worker.
        """
        parent = self.parent(config_text(listen="tcp:port=9080:interface=127.0.0.1"))
        [port] = self.reactor.ports
        self.assertEqual((port.port, port.backlog, port.reading), (9080, 1024, False))
        self.assertFalse(port._shouldShutdown)
        self.assertEqual(len(self.reactor.processes), 2)
        args = self.reactor.processes[1].args
        self.assertEqual(args[1:3], ["-m", "aiproxy.workers.child"])
        assert parent.run is not None
        self.assertEqual(args[args.index("--config") + 1], parent.run.config_path)
        self.assertEqual(args[args.index("--index") + 1], "1")
        self.assertEqual(args[args.index("--socket") + 1], "7:INET:1024")
        self.assertEqual(self.reactor.processes[1].child_fds, {0: "w", 1: 1, 2: 2, 7: 7})
        with open(parent.run.config_path, encoding="utf-8") as f:
            self.assertEqual(f.read(), parent._text)

    def test_environment(self) -> None:
        """
        The workers' environment is the parent's without systemd's
        socket variables; with C{metrics_listen} it names the directory of
        the metrics files.
        """
        self.patch(os, "environ", {"LISTEN_FDS": "1", "LISTEN_PID": "1", "KEEP": "x"})
        parent = self.parent(config_text(metrics_listen="tcp:9191"), listen=["tcp:0"])
        env = self.reactor.processes[0].env
        assert parent.run is not None
        self.assertEqual(env, {"KEEP": "x", "PROMETHEUS_MULTIPROC_DIR": parent.run.metrics_path})
        self.assertEqual(type(self.reactor.tcpServers[1][1]).__name__, "MetricsSite")
        self.patch(os, "environ", {"PROMETHEUS_MULTIPROC_DIR": "/elsewhere"})
        self.parent(config_text())
        self.assertEqual(self.reactor.processes[-1].env, {})

    def test_invalid_reload(self) -> None:
        """
        An invalid config is refused: each problem logged at error level,
        no worker signalled, the workers' copy unchanged.
        """
        parent = self.parent(config_text())
        write_config(self.directory, config_text(shutdown_grace_s=-1))
        self.assertFalse(parent.reload())
        errors = [e for e in self.events if e["log_level"] is LogLevel.error]
        self.assertEqual(errors[0]["problem"], "shutdown_grace_s: -1 is less than the minimum of 0")
        self.assertIn("still serving the previous", errors[-1]["log_format"])
        self.assertEqual([p.signals for p in self.reactor.processes], [[], []])
        assert parent.run is not None
        with open(parent.run.config_path, encoding="utf-8") as f:
            self.assertEqual(f.read(), config_text())

    def test_local_budget_reload(self) -> None:
        """
        A config whose budgets are counted per process is refused on
        reload when workers are running.
        """
        parent = self.parent(config_text())
        text = config_text().replace(
            "      ai-proxy:",
            "      ai-rate-limiting: {limit: 10, time_window: 60}\n      ai-proxy:",
        )
        write_config(self.directory, text)
        self.assertFalse(parent.reload())
        self.assertIn("policy local", self.events[-2]["problem"])

    def test_valid_reload(self) -> None:
        """
        A valid config replaces the workers' copy, then every worker gets
        SIGHUP; changes that need a restart are logged; the new grace
        applies to the stop.
        """
        parent = self.parent(config_text())
        new = config_text("other", workers=3, listen="tcp:1", shutdown_grace_s=2)
        write_config(self.directory, new)
        self.assertTrue(parent.reload())
        self.assertEqual([p.signals for p in self.reactor.processes], [["HUP"], ["HUP"]])
        assert parent.run is not None
        with open(parent.run.config_path, encoding="utf-8") as f:
            self.assertEqual(f.read(), new)
        warned = [e["name"] for e in self.events if e["log_level"] is LogLevel.warn]
        self.assertEqual(warned, ["listen", "workers"])
        self.assertEqual(parent.pool.stop_timeout_s, 2 + STOP_MARGIN_S)

    def test_overrides_not_warned(self) -> None:
        """
        C{listen} and C{workers} changes are not worth a warning when the
        command line overrides them.
        """
        parent = self.parent(config_text(), listen=["tcp:0"], workers_override=True)
        write_config(self.directory, config_text(workers=3, listen="tcp:1"))
        self.assertTrue(parent.reload())
        self.assertEqual([e for e in self.events if e["log_level"] is LogLevel.warn], [])

    def test_reload_metrics(self) -> None:
        """
        With metrics, the parent counts the reloads by result.
        """
        parent = self.parent(config_text(metrics_listen="tcp:9191"))
        parent.reload()
        write_config(self.directory, "routes: [")
        parent.reload()
        assert parent.metrics is not None
        text = generate_latest(parent.metrics.registry).decode()
        self.assertIn('aiproxy_config_reloads_total{result="success"} 1.0', text)
        self.assertIn('aiproxy_config_reloads_total{result="failure"} 1.0', text)
        self.assertIn("aiproxy_workers 2.0", text)

    def test_terminate(self) -> None:
        """
        The first SIGTERM stops the reactor (whose shutdown stops the
        workers); one during the stop makes the workers abort at once.
        """
        parent = self.parent(config_text())
        parent._terminate("SIGTERM")
        self.assertEqual(self.reactor.stops, 1)
        parent.stopService()
        parent._terminate("SIGINT")
        self.assertEqual(self.reactor.stops, 1)
        self.assertEqual([p.signals for p in self.reactor.processes], [["TERM", "TERM"]] * 2)

    def test_stop(self) -> None:
        """
        Stopping sends SIGTERM to the workers, closes the parent's copy of
        the listeners at once, and removes the private directory once every
        worker exited.
        """
        parent = self.parent(config_text())
        assert parent.run is not None
        run = parent.run.path
        d = parent.stopService()
        self.assertFalse(self.reactor.ports[0].listening)
        self.assertNoResult(d)
        self.assertTrue(os.path.isdir(run))
        for process in self.reactor.processes:
            process.end(0)
        self.successResultOf(d)
        self.assertFalse(os.path.exists(run))
        self.assertFalse(parent.reload())

    def test_signals(self) -> None:
        """
        With C{install_signals} the parent handles SIGHUP, SIGTERM and
        SIGINT.
        """
        for number in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
        parent = self.parent(config_text(), install_signals=True)
        numbers = [s._signal for s in parent if isinstance(s, SignalService)]
        self.assertEqual(numbers, [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])


class SignalServiceTests(SynchronousTestCase):
    """
    L{SignalService}: a signal calls a function on the reactor thread.
    """

    def test_signal(self) -> None:
        """
        A handler is installed at start (or once the reactor runs, for a
        signal the reactor handles), and calls the function through
        C{callFromThread}.
        """
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        reactor = FakeReactor()
        called: list[bool] = []
        SignalService(signal.SIGUSR1, reactor, lambda: called.append(True)).startService()
        handler: Any = signal.getsignal(signal.SIGUSR1)
        handler(signal.SIGUSR1, None)
        self.assertEqual(called, [])
        reactor.advance(0)
        self.assertEqual(called, [True])


class EarlySignalTests(SynchronousTestCase):
    """
    From the moment a gateway listens, no signal meets its default action.
    """

    def setUp(self) -> None:
        for number in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
            signal.signal(number, signal.SIG_DFL)
        self.reactor = FakeReactor()
        self.handlers: list[tuple[Any, ...]] = []
        listen = self.reactor.listenTCP

        def listening(*args: Any, **kwargs: Any) -> Any:
            self.handlers.append(
                tuple(signal.getsignal(n) for n in (signal.SIGHUP, signal.SIGTERM))
            )
            return listen(*args, **kwargs)

        self.reactor.listenTCP = listening  # type: ignore[method-assign]

    def test_gateway(self) -> None:
        """
        A single process's privileged start installs its SIGHUP and
        SIGTERM handlers before its listeners listen.
        """
        from aiproxy.routing.build import build_routes
        from aiproxy.tap import GatewayService

        config = parse_config(config_text(), environ={})
        service = GatewayService(
            config,
            build_routes(config, self.reactor),
            self.reactor,
            ["tcp:0"],
            config_path="x.yaml",
            install_signals=True,
        )
        service.privilegedStartService()
        [handlers] = self.handlers
        self.assertNotIn(signal.SIG_DFL, handlers)

    def test_parent(self) -> None:
        """
        So does the parent of worker processes.
        """
        text = config_text()
        parent = WorkerParent(
            parse_config(text, environ={}), text, "x.yaml", self.reactor, 2, install_signals=True
        )
        parent.privilegedStartService()
        [handlers] = self.handlers
        self.assertNotIn(signal.SIG_DFL, handlers)
        self.assertIsNot(signal.getsignal(signal.SIGINT), signal.SIG_DFL)


# -- sockets, the config copy, metrics, logs -------------------------------------------------


class SharedSocketTests(SynchronousTestCase):
    """
    The sockets passed to workers.
    """

    def test_argument(self) -> None:
        """
        A socket is passed as C{FD:FAMILY:BACKLOG} and read back.
        """
        shared = SharedSocket(5, "INET6", 1024)
        self.assertEqual(shared.argument(), "5:INET6:1024")
        self.assertEqual(SharedSocket.parse("5:INET6:1024"), shared)
        self.assertRaises(ValueError, SharedSocket.parse, "5:IPX:1")
        self.assertRaises(ValueError, SharedSocket.parse, "5")

    def test_shareable(self) -> None:
        """
        TCP, UNIX and systemd listeners can be shared; TLS ones cannot.
        """
        for endpoint in ("tcp:80", "tcp6:80", "unix:/run/a.sock", "systemd:domain=INET:index=0"):
            self.assertIsNone(share_problem(endpoint))
        self.assertIn("terminate TLS", share_problem("ssl:443:privateKey=k") or "")

    def test_adopt(self) -> None:
        """
        A worker adopts a TCP socket with C{adoptStreamPort}, then closes
        the descriptor it was given, once.
        """
        adopted: list[tuple[int, int, Any]] = []
        reactor: Any = FakeReactor()

        def adopt(fd: int, family: int, factory: Any) -> str:
            adopted.append((fd, family, factory))
            return "port"

        reactor.adoptStreamPort = adopt
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        endpoint = SharedPortEndpoint(reactor, SharedSocket(write, "INET", 1024))
        self.assertEqual(self.successResultOf(endpoint.listen("factory")), "port")
        self.assertEqual(adopted, [(write, socket.AF_INET, "factory")])
        self.assertRaises(OSError, os.fstat, write)
        self.failureResultOf(endpoint.listen("factory"), RuntimeError)


class RunDirectoryTests(SynchronousTestCase):
    """
    The parent's private directory and the config copy.
    """

    def test_directory(self) -> None:
        """
        The directory is private, holds the config copy (replaced whole)
        and the metrics directory, and is removed at the end.
        """
        base = self.mktemp()
        os.mkdir(base)
        run = RunDirectory(base)
        self.assertEqual(os.stat(run.path).st_mode & 0o777, 0o700)
        run.write_config("one")
        run.write_config("two")
        self.assertEqual(sorted(os.listdir(run.path)), ["config.yaml", "metrics"])
        with open(run.config_path, encoding="utf-8") as f:
            self.assertEqual(f.read(), "two")
        run.remove()
        self.assertEqual(os.listdir(base), [])

    def test_read_config(self) -> None:
        """
        L{read_config} returns the text it validated.
        """
        path = write_config(self.mktemp(), config_text())
        text, config = read_config(str(path), environ={})
        self.assertEqual(text, config_text())
        self.assertEqual(config.routes[0].id, "chat")


class WorkersMetricsTests(SynchronousTestCase):
    """
    C{/metrics} of the parent: the workers' files summed.
    """

    def write(self, path: str, kind: str, pid: int, name: str, sample: str, value: float) -> None:
        values = MmapedDict(os.path.join(path, f"{kind}_{pid}.db"))
        values.write_value(mmap_key(name, sample, [], [], "help"), value, 0.0)
        values.close()

    def test_sum(self) -> None:
        """
        Counters are summed over every worker, dead ones included; live
        gauges over the live workers only; the workers' reload counts are
        left out, the parent counting reloads itself.
        """
        path = self.mktemp()
        os.mkdir(path)
        metrics = WorkersMetrics(path)
        for pid, requests in ((11, 3.0), (12, 4.0)):
            self.write(path, "counter", pid, "aiproxy_requests", "aiproxy_requests_total", requests)
            self.write(
                path, "gauge_livesum", pid, "aiproxy_active_streams", "aiproxy_active_streams", 1
            )
        self.write(path, "counter", 11, "aiproxy_config_reloads", "aiproxy_config_reloads_total", 9)
        text = generate_latest(metrics.registry).decode()
        self.assertIn("aiproxy_requests_total 7.0", text)
        self.assertIn("aiproxy_active_streams 2.0", text)
        self.assertNotIn("aiproxy_config_reloads_total 9.0", text)
        metrics.process_dead(12)
        text = generate_latest(metrics.registry).decode()
        self.assertIn("aiproxy_requests_total 7.0", text)
        self.assertIn("aiproxy_active_streams 1.0", text)

    def test_no_directory(self) -> None:
        """
        Before the directory is known, only the parent's own metrics show.
        """
        text = generate_latest(WorkersMetrics().registry).decode()
        self.assertIn("aiproxy_workers 0.0", text)
        WorkersMetrics().process_dead(1)


class WorkerLogTests(SynchronousTestCase):
    """
    A worker's log lines name it.
    """

    def setUp(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.observer = WorkerLogObserver(self.seen.append, 1, 4242)  # type: ignore[arg-type]

    def test_text(self) -> None:
        """
        A text line carries the worker's index and pid before its usual
        system; every event carries them as keys.
        """
        self.observer(
            {
                "log_format": "hello",
                "log_namespace": "aiproxy.x",
                "log_level": LogLevel.info,
                "log_time": 0,
            }
        )
        self.observer({"log_format": "legacy", "log_system": "-", "log_time": 0})
        first, second = (formatEventAsClassicLogText(event) or "" for event in self.seen)
        self.assertIn("[worker 1 pid 4242 aiproxy.x#info] hello", first)
        self.assertIn("[worker 1 pid 4242 -] legacy", second)
        self.assertEqual((self.seen[0]["worker"], self.seen[0]["worker_pid"]), (1, 4242))

    def test_access_record(self) -> None:
        """
        An access record gains the key C{worker}: the worker's pid.
        """
        event = {"log_namespace": ACCESS_NAMESPACE, "access_json": '{"status":200}'}
        self.observer(event)
        self.assertEqual(json.loads(self.seen[0]["access_json"]), {"status": 200, "worker": 4242})
        self.assertEqual(event["access_json"], '{"status":200}')


class ParentWatchTests(SynchronousTestCase):
    """
    A worker notices its parent is gone.
    """

    def test_gone(self) -> None:
        """
        The end of the pipe from the parent calls C{gone}; the reactor
        letting go of its descriptors at shutdown does not.
        """
        reactor = FakeReactor()
        gone: list[bool] = []
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        watch = ParentWatch(reactor, read, lambda: gone.append(True))
        self.assertIn(watch, reactor.getReaders())
        watch.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(gone, [])
        os.close(write)
        reason = watch.doRead()
        watch.connectionLost(Failure(reason))
        self.assertEqual(gone, [True])
        self.assertTrue(reason.check(ConnectionDone) if isinstance(reason, Failure) else True)
