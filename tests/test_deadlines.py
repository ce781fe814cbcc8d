# -*- test-case-name: tests.test_deadlines -*-
"""
Tests for L{aiproxy.exchange.deadlines.Deadlines}: the named timers of one
request on a L{Clock}, and the silence timers that do not count time the
client's connection paused the upstream read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aiproxy.exchange.deadlines import ATTEMPT_TIMERS, Deadlines


class DeadlinesCase(SynchronousTestCase):
    """
    A L{Deadlines} on a L{Clock}, a switch for whether the client's
    connection pauses the upstream, and a record of the timers that fired.
    """

    #: The route's limits the deadlines read.
    conf: dict[str, Any] = {"timeout": 1000}

    def setUp(self) -> None:
        self.clock = Clock()
        self.is_paused = False
        self.fired: list[str] = []
        self.expired: list[tuple[str, str, int, str]] = []
        self.deadlines = self.make(self.conf)

    def make(self, conf: dict[str, Any]) -> Deadlines:
        """
        Deadlines over C{conf} recording the limits that expired, as
        C{("attempt" or "request", reason, status, message)}.
        """
        return Deadlines(
            self.clock,
            conf,
            lambda: self.is_paused,
            lambda *limit: self.expired.append(("attempt", *limit)),
            lambda *limit: self.expired.append(("request", *limit)),
        )

    def call(self, name: str) -> Callable[[], None]:
        """
        A timer callback recording C{name} when it fires.
        """
        return lambda: self.fired.append(name)

    def pending(self) -> int:
        """
        How many calls are scheduled on the clock.
        """
        return len([call for call in self.clock.getDelayedCalls() if call.active()])


class ArmTests(DeadlinesCase):
    """
    L{Deadlines.arm}, L{Deadlines.arm_once}, L{Deadlines.active} and
    L{Deadlines.cancel}.
    """

    def test_arm(self) -> None:
        """
        An armed timer calls its function once, after its delay, and is
        then no longer active.
        """
        self.deadlines.arm("read", 1.0, self.call("read"))
        self.assertTrue(self.deadlines.active("read"))
        self.clock.advance(0.75)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.25)
        self.assertEqual(self.fired, ["read"])
        self.assertFalse(self.deadlines.active("read"))
        self.clock.advance(10)
        self.assertEqual(self.fired, ["read"])

    def test_rearm_replaces(self) -> None:
        """
        Arming a running timer again replaces it: only the new call runs,
        after the new delay counted from now, and one call is scheduled.
        """
        self.deadlines.arm("read", 1.0, self.call("old"))
        self.clock.advance(0.5)
        self.deadlines.arm("read", 1.0, self.call("new"))
        self.assertEqual(self.pending(), 1)
        self.clock.advance(0.75)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.25)
        self.assertEqual(self.fired, ["new"])
        self.clock.advance(10)
        self.assertEqual(self.fired, ["new"])

    def test_rearm_after_firing(self) -> None:
        """
        A timer that fired can be armed again.
        """
        self.deadlines.arm("keepalive", 1.0, self.call("first"))
        self.clock.advance(1)
        self.deadlines.arm("keepalive", 1.0, self.call("second"))
        self.assertTrue(self.deadlines.active("keepalive"))
        self.clock.advance(1)
        self.assertEqual(self.fired, ["first", "second"])

    def test_names_apart(self) -> None:
        """
        Timers of different names run side by side.
        """
        self.deadlines.arm("read", 2.0, self.call("read"))
        self.deadlines.arm("idle", 1.0, self.call("idle"))
        self.clock.advance(2)
        self.assertEqual(self.fired, ["idle", "read"])

    def test_arm_once(self) -> None:
        """
        C{arm_once} starts a timer that was never started, and does not
        re-arm it, neither while it runs nor after it fired.
        """
        self.deadlines.arm_once("duration", 1.0, self.call("first"))
        self.clock.advance(0.5)
        self.deadlines.arm_once("duration", 5.0, self.call("second"))
        self.clock.advance(0.5)
        self.assertEqual(self.fired, ["first"])
        self.deadlines.arm_once("duration", 1.0, self.call("third"))
        self.assertFalse(self.deadlines.active("duration"))
        self.clock.advance(10)
        self.assertEqual(self.fired, ["first"])

    def test_arm_once_after_cancel(self) -> None:
        """
        A cancelled timer is forgotten: C{arm_once} starts it again.
        """
        self.deadlines.arm_once("duration", 1.0, self.call("first"))
        self.deadlines.cancel("duration")
        self.deadlines.arm_once("duration", 2.0, self.call("second"))
        self.clock.advance(2)
        self.assertEqual(self.fired, ["second"])

    def test_active(self) -> None:
        """
        C{active} is false for a timer never armed, true while one runs,
        false once cancelled.
        """
        self.assertFalse(self.deadlines.active("read"))
        self.deadlines.arm("read", 1.0, self.call("read"))
        self.assertTrue(self.deadlines.active("read"))
        self.deadlines.cancel("read")
        self.assertFalse(self.deadlines.active("read"))

    def test_cancel(self) -> None:
        """
        A cancelled timer never fires and leaves nothing scheduled; the
        others go on; cancelling an unknown or fired timer does nothing.
        """
        self.deadlines.arm("read", 1.0, self.call("read"))
        self.deadlines.arm("idle", 1.0, self.call("idle"))
        self.deadlines.cancel("read")
        self.deadlines.cancel("unknown")
        self.assertEqual(self.pending(), 1)
        self.clock.advance(1)
        self.assertEqual(self.fired, ["idle"])
        self.deadlines.cancel("idle")
        self.assertEqual(self.pending(), 0)


class DropTests(DeadlinesCase):
    """
    L{Deadlines.drop_attempt} and L{Deadlines.cancel_all}.
    """

    NAMES = ("read", "idle", "first_token", "commit", "duration", "keepalive")

    def arm_all(self) -> None:
        for name in self.NAMES:
            self.deadlines.arm(name, 1.0, self.call(name))

    def test_attempt_timers(self) -> None:
        """
        The attempt timers are C{read}, C{idle}, C{first_token} and
        C{commit}.
        """
        self.assertEqual(set(ATTEMPT_TIMERS), {"read", "idle", "first_token", "commit"})

    def test_drop_attempt(self) -> None:
        """
        C{drop_attempt} stops exactly the attempt's timers: the request's
        C{duration} and C{keepalive} timers still run and fire.
        """
        self.arm_all()
        self.deadlines.drop_attempt()
        self.assertEqual(
            [name for name in self.NAMES if self.deadlines.active(name)],
            ["duration", "keepalive"],
        )
        self.assertEqual(self.pending(), 2)
        self.clock.advance(1)
        self.assertEqual(sorted(self.fired), ["duration", "keepalive"])

    def test_drop_attempt_rearm(self) -> None:
        """
        After C{drop_attempt}, the next attempt's timers are armed afresh.
        """
        self.deadlines.arm("first_token", 1.0, self.call("old"))
        self.deadlines.drop_attempt()
        self.deadlines.arm("first_token", 2.0, self.call("new"))
        self.clock.advance(2)
        self.assertEqual(self.fired, ["new"])

    def test_cancel_all(self) -> None:
        """
        C{cancel_all} stops every timer: nothing fires, nothing is left
        scheduled, none is active.
        """
        self.arm_all()
        self.deadlines.cancel_all()
        self.assertEqual(self.pending(), 0)
        self.assertEqual([name for name in self.NAMES if self.deadlines.active(name)], [])
        self.clock.advance(10)
        self.assertEqual(self.fired, [])

    def test_cancel_all_forgets(self) -> None:
        """
        After C{cancel_all}, C{arm_once} can start a timer again.
        """
        self.deadlines.arm_once("duration", 1.0, self.call("first"))
        self.deadlines.cancel_all()
        self.deadlines.arm_once("duration", 1.0, self.call("second"))
        self.clock.advance(1)
        self.assertEqual(self.fired, ["second"])


class SilenceTests(DeadlinesCase):
    """
    L{Deadlines.arm_silence} and L{Deadlines.touch}.
    """

    def arm_read(self, timeout_ms: int = 1000) -> None:
        """
        A C{read} silence timer measured from C{last_chunk}.
        """
        deadlines = self.deadlines
        deadlines.arm_silence("read", timeout_ms, lambda: deadlines.last_chunk, self.call("silent"))

    def test_touch(self) -> None:
        """
        C{touch} sets both activity times to now.
        """
        self.assertEqual((self.deadlines.last_chunk, self.deadlines.last_data), (0.0, 0.0))
        self.clock.advance(2.5)
        self.deadlines.touch()
        self.assertEqual((self.deadlines.last_chunk, self.deadlines.last_data), (2.5, 2.5))

    def test_fires_after_quiet_time(self) -> None:
        """
        With no activity, the silence timer fires once the quiet time is
        over, once.
        """
        self.clock.advance(3)
        self.deadlines.touch()
        self.arm_read()
        self.clock.advance(0.5)
        self.assertEqual(self.fired, [])
        self.assertTrue(self.deadlines.active("read"))
        self.clock.advance(0.5)
        self.assertEqual(self.fired, ["silent"])
        self.assertFalse(self.deadlines.active("read"))
        self.clock.advance(10)
        self.assertEqual(self.fired, ["silent"])

    def test_pushed_back_by_activity(self) -> None:
        """
        Activity (C{last_chunk} moved) pushes the deadline back: the timer
        fires the quiet time after the last activity, not after it was
        armed.
        """
        self.deadlines.touch()
        self.arm_read()
        self.clock.advance(0.5)
        self.deadlines.last_chunk = self.clock.seconds()
        self.clock.advance(0.5)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.25)
        self.deadlines.last_chunk = self.clock.seconds()
        self.clock.advance(0.75)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.25)
        self.assertEqual(self.fired, ["silent"])
        self.assertEqual(self.clock.seconds(), 2.25)

    def test_measured_from_since(self) -> None:
        """
        The timer measures from what C{since} says: a C{last_data} timer
        fires though C{last_chunk} keeps moving.
        """
        deadlines = self.deadlines
        deadlines.touch()
        deadlines.arm_silence("idle", 1000, lambda: deadlines.last_data, self.call("idle"))
        for _ in range(4):
            self.clock.advance(0.25)
            deadlines.last_chunk = self.clock.seconds()
        self.assertEqual(self.fired, ["idle"])

    def test_not_while_paused(self) -> None:
        """
        While the client's connection pauses the upstream the timer does
        not fire, however long; once resumed it fires at its next check.
        """
        self.deadlines.touch()
        self.arm_read()
        self.is_paused = True
        self.clock.advance(1)
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.fired, [])
        self.assertTrue(self.deadlines.active("read"))
        self.is_paused = False
        self.clock.advance(1)
        self.assertEqual(self.fired, ["silent"])

    def test_resume_restarts_quiet_time(self) -> None:
        """
        A resume that counts as activity (the pacer touches on resume)
        gives the upstream the whole quiet time again after it.
        """
        self.deadlines.touch()
        self.arm_read()
        self.is_paused = True
        self.clock.advance(3.5)
        self.is_paused = False
        self.deadlines.touch()
        self.clock.advance(0.5)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.25)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.25)
        self.assertEqual(self.fired, ["silent"])
        self.assertEqual(self.clock.seconds(), 4.5)

    def test_cancelled(self) -> None:
        """
        A silence timer is cancelled like any other, also after it
        re-armed itself.
        """
        self.deadlines.touch()
        self.arm_read()
        self.clock.advance(0.5)
        self.deadlines.last_chunk = self.clock.seconds()
        self.clock.advance(0.5)
        self.assertTrue(self.deadlines.active("read"))
        self.deadlines.drop_attempt()
        self.assertEqual(self.pending(), 0)
        self.clock.advance(10)
        self.assertEqual(self.fired, [])


class LimitTests(DeadlinesCase):
    """
    The route's limits armed by name: C{max_stream_duration_ms} for the
    request, C{first_token_timeout_ms}, C{timeout} and
    C{stream_idle_timeout_ms} for an attempt, and the keep-alive comments.
    """

    def test_duration(self) -> None:
        """
        C{max_stream_duration_ms} is measured from the request's start and
        tells the request (not the attempt) when it expired; arming it
        again does not restart it.
        """
        deadlines = self.make({"max_stream_duration_ms": 1000})
        self.clock.advance(0.25)
        deadlines.arm_duration(0.0, True)
        self.clock.advance(0.5)
        deadlines.arm_duration(0.75, True)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.25)
        self.assertEqual(
            self.expired,
            [("request", "max_stream_duration_ms", 504, "max_stream_duration_ms exceeded")],
        )
        self.clock.advance(10)
        self.assertEqual(len(self.expired), 1)

    def test_duration_already_over(self) -> None:
        """
        A duration limit already over when armed expires at once.
        """
        deadlines = self.make({"max_stream_duration_ms": 1000})
        self.clock.advance(2)
        deadlines.arm_duration(0.0, True)
        self.clock.advance(0)
        self.assertEqual([limit[1] for limit in self.expired], ["max_stream_duration_ms"])

    def test_duration_streams_only(self) -> None:
        """
        The duration limit is for streams only, and only when configured.
        """
        self.make({"max_stream_duration_ms": 1000}).arm_duration(0.0, False)
        self.make({}).arm_duration(0.0, True)
        self.assertEqual(self.pending(), 0)
        self.clock.advance(10)
        self.assertEqual(self.expired, [])

    def test_first_token(self) -> None:
        """
        C{first_token_timeout_ms} tells the attempt when it expired; the
        next attempt's wait restarts it.
        """
        deadlines = self.make({"first_token_timeout_ms": 500})
        deadlines.arm_waiting(False, self.call("keepalive"))
        self.clock.advance(0.25)
        deadlines.arm_waiting(False, self.call("keepalive"))
        self.clock.advance(0.25)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.25)
        self.assertEqual(
            self.expired,
            [("attempt", "first_token_timeout_ms", 504, "first_token_timeout_ms exceeded")],
        )
        self.assertEqual(self.fired, [])

    def test_keepalive(self) -> None:
        """
        While waiting for a stream, the keep-alive is called every
        C{keepalive_comment_interval_ms} until its timer is cancelled; a
        second wait does not restart a running keep-alive timer; there is
        none for a non-stream.
        """
        deadlines = self.make({"keepalive_comment_interval_ms": 200})
        deadlines.arm_waiting(True, self.call("keepalive"))
        self.clock.advance(0.125)
        deadlines.arm_waiting(True, self.call("again"))
        self.clock.advance(0.075)
        self.assertEqual(self.fired, ["keepalive"])
        self.clock.advance(0.2)
        self.clock.advance(0.2)
        self.assertEqual(self.fired, ["keepalive"] * 3)
        deadlines.cancel("keepalive")
        self.clock.advance(1)
        self.assertEqual(self.fired, ["keepalive"] * 3)
        self.make({"keepalive_comment_interval_ms": 200}).arm_waiting(False, self.call("never"))
        self.clock.advance(1)
        self.assertEqual(self.fired, ["keepalive"] * 3)
        self.assertEqual(self.expired, [])

    def test_keepalive_unset(self) -> None:
        """
        Without C{keepalive_comment_interval_ms} no keep-alive is armed.
        """
        self.deadlines.arm_keepalive(self.call("keepalive"))
        self.assertFalse(self.deadlines.active("keepalive"))
        self.deadlines.arm_waiting(True, self.call("keepalive"))
        self.assertEqual(self.pending(), 0)

    def test_reads(self) -> None:
        """
        When the body begins, activity is now, and C{timeout} between two
        reads tells the attempt when it expired.
        """
        deadlines = self.make({"timeout": 1000})
        self.clock.advance(5)
        deadlines.arm_reads(True)
        self.assertEqual((deadlines.last_chunk, deadlines.last_data), (5.0, 5.0))
        self.assertFalse(deadlines.active("idle"))
        self.clock.advance(0.5)
        deadlines.last_chunk = self.clock.seconds()
        self.clock.advance(0.5)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.5)
        self.assertEqual(self.expired, [("attempt", "timeout", 504, "upstream read timed out")])

    def test_idle(self) -> None:
        """
        C{stream_idle_timeout_ms} (streams only) is measured from the last
        data: reads of comments alone (C{last_chunk} moving) do not stop
        it.
        """
        deadlines = self.make({"timeout": 1000, "stream_idle_timeout_ms": 500})
        deadlines.arm_reads(True)
        self.clock.advance(0.25)
        deadlines.last_chunk = self.clock.seconds()
        self.clock.advance(0.25)
        self.assertEqual(
            self.expired,
            [("attempt", "stream_idle_timeout_ms", 504, "stream_idle_timeout_ms exceeded")],
        )
        self.assertTrue(deadlines.active("read"))
        other = self.make({"timeout": 1000, "stream_idle_timeout_ms": 500})
        other.arm_reads(False)
        self.assertFalse(other.active("idle"))
