# -*- test-case-name: tests.test_deadlines -*-
"""
The timers of one request, on an injected clock.

Request timers run for the whole request (C{max_stream_duration_ms}, the
keep-alive comments); attempt timers for one upstream attempt (C{timeout}
between reads, C{stream_idle_timeout_ms}, C{first_token_timeout_ms},
C{stream_commit_ms}) and go with it in one L{Deadlines.drop_attempt}. A
silence timer does not count time during which the client's full socket
paused the upstream read: a paused upstream is not a silent one.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["ATTEMPT_TIMERS", "Deadlines"]

#: The timers of one upstream attempt (the others run for the whole request).
ATTEMPT_TIMERS = ("read", "idle", "first_token", "commit")


class Deadlines:
    """
    Named one-shot timers and the upstream activity they measure.

    @ivar last_chunk: when the upstream last sent anything (or the client's
        connection last resumed).
    @ivar last_data: when the upstream last sent an event or a body byte
        (comments do not count).
    """

    __slots__ = ("_clock", "_paused", "_timers", "last_chunk", "last_data")

    def __init__(self, clock: IReactorTime, paused: Callable[[], bool]) -> None:
        """
        @param paused: whether the client's connection pauses the upstream
            read now.
        """
        self._clock = clock
        self._paused = paused
        self._timers: dict[str, IDelayedCall] = {}
        self.last_chunk = 0.0
        self.last_data = 0.0

    def touch(self) -> None:
        """
        Activity now: silence is measured from here.
        """
        self.last_chunk = self.last_data = self._clock.seconds()

    def arm(self, name: str, delay: float, call: Callable[[], object]) -> None:
        """
        (Re)start the timer C{name}: C{call} in C{delay} seconds.
        """
        timer = self._timers.get(name)
        if timer is not None and timer.active():
            timer.cancel()
        self._timers[name] = self._clock.callLater(delay, call)

    def arm_once(self, name: str, delay: float, call: Callable[[], object]) -> None:
        """
        Start the timer C{name} unless it was started before.
        """
        if name not in self._timers:
            self.arm(name, delay, call)

    def active(self, name: str) -> bool:
        """
        Whether the timer C{name} is running.
        """
        timer = self._timers.get(name)
        return timer is not None and timer.active()

    def cancel(self, name: str) -> None:
        """
        Stop the timer C{name} if it is running.
        """
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def drop_attempt(self) -> None:
        """
        Stop the timers of the current upstream attempt.
        """
        for name in ATTEMPT_TIMERS:
            self.cancel(name)

    def cancel_all(self) -> None:
        """
        Stop every timer (the request ended).
        """
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def arm_silence(
        self, name: str, timeout_ms: int, since: Callable[[], float], expired: Callable[[], object]
    ) -> None:
        """
        The timer C{name}: C{expired()} once nothing happened for
        C{timeout_ms} since C{since()}, not counting time paused.
        """
        timeout = timeout_ms / 1000.0
        clock = self._clock

        def check() -> None:
            if self._paused():
                self.arm(name, timeout, check)
                return
            quiet = clock.seconds() - since()
            if quiet < timeout:
                self.arm(name, timeout - quiet, check)
                return
            expired()

        self.arm(name, timeout, check)
