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

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["ATTEMPT_TIMERS", "Deadlines", "Expired"]

#: The timers of one upstream attempt (the others run for the whole request).
ATTEMPT_TIMERS = ("read", "idle", "first_token", "commit")

#: What is told when a limit expired: its reason, status and message.
Expired = Callable[[str, int, str], object]


def _expired_after_the_end(reason: str, status: int, message: str) -> None:
    """
    A limit of a request that is over: nothing to do.
    """


def _not_paused() -> bool:
    return False


class Deadlines:
    """
    Named one-shot timers and the upstream activity they measure.

    @ivar last_chunk: when the upstream last sent anything (or the client's
        connection last resumed).
    @ivar last_data: when the upstream last sent an event or a body byte
        (comments do not count).
    """

    __slots__ = (
        "_clock",
        "_conf",
        "_paused",
        "_attempt_expired",
        "_request_expired",
        "_timers",
        "last_chunk",
        "last_data",
    )

    def __init__(
        self,
        clock: IReactorTime,
        conf: Mapping[str, Any],
        paused: Callable[[], bool],
        attempt_expired: Expired,
        request_expired: Expired,
    ) -> None:
        """
        @param conf: the route's C{ai-proxy} config (the limits).
        @param paused: whether the client's connection pauses the upstream
            read now.
        @param attempt_expired: told when an attempt's limit expired (the
            request may fall back).
        @param request_expired: told when the request's limit expired.
        """
        self._clock = clock
        self._conf = conf
        self._paused = paused
        self._attempt_expired = attempt_expired
        self._request_expired = request_expired
        self._timers: dict[str, IDelayedCall] = {}
        self.last_chunk = 0.0
        self.last_data = 0.0

    # -- the limits of a request and its attempts ---------------------------

    def arm_duration(self, started: float, stream: bool) -> None:
        """
        Enforce C{max_stream_duration_ms} from the request's start, by a
        timer (so a silent upstream is cut too); streams only, once.
        """
        limit = self._conf.get("max_stream_duration_ms")
        if limit is None or not stream:
            return
        remaining = started + limit / 1000.0 - self._clock.seconds()
        self.arm_once(
            "duration",
            max(remaining, 0.0),
            lambda: self._request_expired(
                "max_stream_duration_ms", 504, "max_stream_duration_ms exceeded"
            ),
        )

    def arm_waiting(self, stream: bool, keepalive: Callable[[], object]) -> None:
        """
        While no event has come from the attempt's upstream:
        C{first_token_timeout_ms} ends the wait (from the attempt's start);
        and until an upstream's first body byte,
        C{keepalive_comment_interval_ms} calls C{keepalive} for a streaming
        client (an SSE comment that keeps the connection through
        idle-timeout hops; it commits a 200 event stream, so no fallback
        follows it).
        """
        first_token = self._conf.get("first_token_timeout_ms")
        if first_token is not None:
            self.arm(
                "first_token",
                first_token / 1000.0,
                lambda: self._attempt_expired(
                    "first_token_timeout_ms", 504, "first_token_timeout_ms exceeded"
                ),
            )
        if stream and not self.active("keepalive"):
            self.arm_keepalive(keepalive)

    def arm_keepalive(self, keepalive: Callable[[], object]) -> None:
        """
        Call C{keepalive} every C{keepalive_comment_interval_ms}, if set,
        until the timer is cancelled (by the upstream's first byte or
        event, or the end of the request).
        """
        interval = self._conf.get("keepalive_comment_interval_ms")
        if interval is None:
            return
        self.arm("keepalive", interval / 1000.0, self._keepalive_tick, keepalive, interval / 1000.0)

    def _keepalive_tick(self, keepalive: Callable[[], object], interval: float) -> None:
        """
        Send a keep-alive comment, and the next one an interval later.
        """
        keepalive()
        self.arm("keepalive", interval, self._keepalive_tick, keepalive, interval)

    def arm_reads(self, stream: bool) -> None:
        """
        The upstream body began: C{timeout} between two reads and, for a
        stream, C{stream_idle_timeout_ms} between two events.
        """
        self.touch()
        self.arm_silence(
            "read",
            self._conf["timeout"],
            lambda: self.last_chunk,
            lambda: self._attempt_expired("timeout", 504, "upstream read timed out"),
        )
        idle = self._conf.get("stream_idle_timeout_ms")
        if idle is not None and stream:
            self.arm_silence(
                "idle",
                idle,
                lambda: self.last_data,
                lambda: self._attempt_expired(
                    "stream_idle_timeout_ms", 504, "stream_idle_timeout_ms exceeded"
                ),
            )

    # -- timers ---------------------------------------------------------------

    def touch(self) -> None:
        """
        Activity now: silence is measured from here.
        """
        self.last_chunk = self.last_data = self._clock.seconds()

    def arm(self, name: str, delay: float, call: Callable[..., object], *args: Any) -> None:
        """
        (Re)start the timer C{name}: C{call(*args)} in C{delay} seconds.
        """
        timer = self._timers.get(name)
        if timer is not None and timer.active():
            timer.cancel()
        self._timers[name] = self._clock.callLater(delay, call, *args)

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

    def let_go(self) -> None:
        """
        The request is over: stop every timer and drop the callbacks into
        it.
        """
        self.cancel_all()
        self._paused = _not_paused
        self._attempt_expired = self._request_expired = _expired_after_the_end

    def arm_silence(
        self, name: str, timeout_ms: int, since: Callable[[], float], expired: Callable[[], object]
    ) -> None:
        """
        The timer C{name}: C{expired()} once nothing happened for
        C{timeout_ms} since C{since()}, not counting time paused.
        """
        timeout = timeout_ms / 1000.0
        self.arm(name, timeout, self._check_silence, name, timeout, since, expired)

    def _check_silence(
        self,
        name: str,
        timeout: float,
        since: Callable[[], float],
        expired: Callable[[], object],
    ) -> None:
        """
        A silence timer is due: re-arm it while paused or when there was
        activity since, else it expired.
        """
        if self._paused():
            self.arm(name, timeout, self._check_silence, name, timeout, since, expired)
            return
        quiet = self._clock.seconds() - since()
        if quiet < timeout:
            self.arm(name, timeout - quiet, self._check_silence, name, timeout, since, expired)
            return
        expired()
