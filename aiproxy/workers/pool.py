# -*- test-case-name: tests.test_workers -*-
"""
The parent's worker processes: L{WorkerPool} starts them, restarts one
that dies (after L{FIRST_DELAY_S}, doubling up to L{MAX_DELAY_S}, back to
the first delay once a worker ran L{STABLE_AFTER_S}), sends them signals,
and on stop sends them C{SIGTERM} and waits until every one exited,
killing those still running after the stop timeout. No worker is started
or restarted once the stop began.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "FIRST_DELAY_S",
    "MAX_DELAY_S",
    "STABLE_AFTER_S",
    "Launch",
    "WorkerPool",
    "describe_exit",
]

log = Logger()

#: The delay before a dead worker's first restart.
FIRST_DELAY_S = 0.5

#: The longest delay between two restarts of a worker that keeps dying.
MAX_DELAY_S = 30.0

#: A worker that ran this long before it died is restarted after the first
#: delay again.
STABLE_AFTER_S = 60.0


@dataclass(frozen=True)
class Launch:
    """
    How to start one worker process (the arguments of C{spawnProcess}).

    @ivar args: its arguments, C{args[0]} included.
    @ivar child_fds: its file descriptors: the parent's descriptor, or
        C{"r"}/C{"w"} for a pipe.
    """

    executable: str
    args: Sequence[str]
    env: Mapping[str, str]
    child_fds: Mapping[int, int | str] = field(default_factory=dict)
    path: str | None = None


class _Phase(Enum):
    """
    Where a worker slot is: its process runs, a restart is due, or nothing.
    """

    RUNNING = "running"
    WAITING = "waiting"
    STOPPED = "stopped"


@dataclass
class _Slot:
    """
    One of the pool's N workers, across its restarts.

    @ivar delay: the delay before its next restart.
    """

    index: int
    phase: _Phase = _Phase.STOPPED
    process: IProcessTransport | None = None
    pid: int | None = None
    started: float = 0.0
    delay: float = FIRST_DELAY_S
    restart: IDelayedCall | None = None


def describe_exit(reason: Failure) -> str:
    """
    How a process ended, for a log line: C{"exit status 3"} or C{"signal 9
    (SIGKILL)"}.
    """
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exit status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                return f"signal {value.signal}"
            return f"signal {value.signal} ({name})"
        return f"exit status {value.exitCode}"
    return str(value)


class _WorkerProtocol(ProcessProtocol):
    """
    Tells the pool when its worker process ended. The worker writes to the
    parent's own stdout and stderr: no output comes through here.
    """

    def __init__(self, pool: WorkerPool, slot: _Slot) -> None:
        self._pool = pool
        self._slot = slot

    def processEnded(self, reason: Failure) -> None:
        self._pool._ended(self._slot, self, reason)


class WorkerPool(Service):
    """
    N worker processes, kept running until the service stops.

    @ivar count: how many workers run.
    @ivar stop_timeout_s: how long after C{SIGTERM} a worker may take to
        exit before it is killed.
    @ivar stopping: the stop began (no more starts or restarts).
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        launch: Callable[[int], Launch],
        stop_timeout_s: float,
        on_started: Callable[[int, int], None] | None = None,
        on_ended: Callable[[int, int, bool], None] | None = None,
    ) -> None:
        """
        @param reactor: an C{IReactorProcess} and C{IReactorTime} provider.
        @param launch: how to start the worker of an index (from 0).
        @param on_started: called with a worker's index and pid once it was
            started.
        @param on_ended: called with a worker's index and pid, and whether
            it will be restarted, once it ended.
        """
        self._reactor = reactor
        self.count = count
        self._launch = launch
        self.stop_timeout_s = stop_timeout_s
        self._on_started = on_started
        self._on_ended = on_ended
        self._slots = [_Slot(index) for index in range(count)]
        self._waiters: list[Deferred[None]] = []
        self.stopping = False

    @property
    def pids(self) -> list[int]:
        """
        The pids of the workers running now, by index.
        """
        return [
            slot.pid
            for slot in self._slots
            if slot.phase is _Phase.RUNNING and slot.pid is not None
        ]

    def startService(self) -> None:
        super().startService()
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        """
        Start the worker of C{slot}; if that fails, try again later.
        """
        slot.restart = None
        slot.started = self._reactor.seconds()
        launch = self._launch(slot.index)
        protocol = _WorkerProtocol(self, slot)
        try:
            process = self._reactor.spawnProcess(
                protocol,
                launch.executable,
                list(launch.args),
                env=dict(launch.env),
                path=launch.path,
                childFDs=dict(launch.child_fds),
            )
        except Exception:
            log.failure("starting worker {index} failed", index=slot.index)
            if not self.stopping:
                self._schedule(slot)
            return
        slot.phase = _Phase.RUNNING
        slot.process = process
        slot.pid = process.pid
        log.info("worker {index} started (pid {pid})", index=slot.index, pid=slot.pid)
        if self._on_started is not None and slot.pid is not None:
            self._on_started(slot.index, slot.pid)

    def _ended(self, slot: _Slot, protocol: _WorkerProtocol, reason: Failure) -> None:
        """
        The worker of C{slot} ended: restart it later, unless the pool is
        stopping.
        """
        pid = slot.pid
        slot.phase = _Phase.STOPPED
        slot.process = None
        slot.pid = None
        ran = self._reactor.seconds() - slot.started
        how = describe_exit(reason)
        if self.stopping:
            log.info("worker {index} (pid {pid}) exited: {how}", index=slot.index, pid=pid, how=how)
        else:
            log.warn(
                "worker {index} (pid {pid}) died after {ran:.1f} s: {how}; "
                "restarting it in {delay} s",
                index=slot.index,
                pid=pid,
                ran=ran,
                how=how,
                delay=self._schedule(slot),
            )
        if self._on_ended is not None and pid is not None:
            self._on_ended(slot.index, pid, not self.stopping)
        if self.stopping:
            self._wake()

    def _schedule(self, slot: _Slot) -> float:
        """
        Restart the worker of C{slot} after its delay, and double the delay
        of the next restart (a worker that ran long enough starts again
        from the first delay).

        @return: the delay.
        """
        if self._reactor.seconds() - slot.started >= STABLE_AFTER_S:
            slot.delay = FIRST_DELAY_S
        delay = slot.delay
        slot.delay = min(delay * 2, MAX_DELAY_S)
        slot.phase = _Phase.WAITING
        slot.restart = self._reactor.callLater(delay, self._spawn, slot)
        return delay

    def signal_all(self, name: str) -> int:
        """
        Send signal C{name} (C{"HUP"}, C{"TERM"}, C{"KILL"}) to every
        running worker.

        @return: to how many.
        """
        sent = 0
        for slot in self._slots:
            if slot.phase is _Phase.RUNNING and slot.process is not None:
                try:
                    slot.process.signalProcess(name)
                except ProcessExitedAlready:
                    continue
                sent += 1
        return sent

    def stopService(self) -> Deferred[None]:
        """
        Send C{SIGTERM} to every worker, cancel pending restarts, and fire
        once every worker exited (those running after C{stop_timeout_s}
        are killed).
        """
        super().stopService()
        self.stopping = True
        for slot in self._slots:
            if slot.phase is _Phase.WAITING and slot.restart is not None:
                if slot.restart.active():
                    slot.restart.cancel()
                slot.restart = None
                slot.phase = _Phase.STOPPED
        self.signal_all("TERM")
        return Deferred.fromCoroutine(self._wait_ended())

    async def _wait_ended(self) -> None:
        timer = self._reactor.callLater(self.stop_timeout_s, self._kill)
        try:
            await self._all_ended()
        finally:
            if timer.active():
                timer.cancel()

    def _all_ended(self) -> Deferred[None]:
        """
        Fires once no worker runs.
        """
        if not self.pids:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _wake(self) -> None:
        if self.pids:
            return
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _kill(self) -> None:
        """
        The stop timeout is over: kill the workers still running.
        """
        for slot in self._slots:
            if slot.phase is _Phase.RUNNING:
                log.warn(
                    "worker {index} (pid {pid}) still running {timeout} s after SIGTERM: "
                    "killing it",
                    index=slot.index,
                    pid=slot.pid,
                    timeout=self.stop_timeout_s,
                )
        self.signal_all("KILL")
