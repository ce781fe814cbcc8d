# -*- test-case-name: tests.test_failover -*-
"""
Tests for L{aiproxy.exchange.failover}: which instance each attempt of a
request goes to and whether a failed attempt may fall back, as a pure
object over routes built from config by the real loader and a L{Clock}'s
C{seconds}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from aiproxy.exchange.failover import HELD_FAILURE_STATUS, Attempt, Failover
from aiproxy.routing.balancer import Selection
from aiproxy.routing.routes import Instance, Route
from aiproxy.stream.protocols import OPENAI_CHAT, OPENAI_EMBEDDINGS
from tests.helpers import log_events
from tests.test_multi import instance, multi_table

#: The log namespace of the failover's warnings.
NAMESPACE = "aiproxy.exchange.failover"


def ranked(*names: str) -> list[dict[str, Any]]:
    """
    Instances tried in the order given: each one a priority level of its
    own, the first highest.
    """
    return [instance(name, priority=len(names) - index) for index, name in enumerate(names)]


def multi_route(names: Sequence[str | dict[str, Any]] = ("a", "b"), **plugin: Any) -> Route:
    """
    The C{ai-proxy-multi} route of a table built from config with the
    C{instances} named (or given whole) and the plugin fields C{plugin}.
    """
    return multi_table(list(names), **plugin).routes[0]


class FailoverCase(SynchronousTestCase):
    """
    A L{Clock} and the failover of one request on a route.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.events = log_events(self, NAMESPACE)
        self.selections: dict[Failover, Selection[Instance]] = {}

    def failover(self, route: Route, protocol: str = OPENAI_CHAT) -> Failover:
        """
        The attempts of one request of C{protocol} on C{route}, timed by the
        test's clock (its instance order is kept for L{start}).
        """
        failover = Failover(route, self.clock.seconds)
        self.selections[failover] = route.selection(None, protocol)
        return failover

    def start(self, failover: Failover) -> Attempt:
        """
        Begin the first attempt, on the instance the route picks first.
        """
        first = failover.first(self.selections[failover])
        assert first is not None
        return failover.begin(first)

    def fall_back(self, failover: Failover, status: int) -> Attempt:
        """
        The current attempt failed with C{status}: begin the next one, which
        must exist.
        """
        following = failover.next(status)
        self.assertIsNotNone(following, f"no fallback on {status}")
        assert following is not None
        failover.give_up()
        return failover.begin(following)

    def messages(self) -> list[str]:
        return [formatEvent(event) for event in self.events]


class FirstTests(FailoverCase):
    """
    The first attempt of a request.
    """

    def test_first(self) -> None:
        """
        C{first()} is the route's first pick (the highest priority); there
        is no attempt before C{begin()}, which records one on that instance
        starting now, without a status or an end.
        """
        failover = self.failover(multi_route(ranked("a", "b")))
        self.assertIsNone(failover.current)
        self.assertEqual(failover.attempts, [])
        self.clock.advance(3)
        first = failover.first(self.selections[failover])
        assert first is not None
        self.assertEqual(first.name, "a")
        attempt = failover.begin(first)
        self.assertIs(failover.current, attempt)
        self.assertEqual(failover.attempts, [attempt])
        self.assertIs(attempt.instance, first)
        self.assertEqual(attempt.started, 3.0)
        self.assertIsNone(attempt.status)
        self.assertIsNone(attempt.ended)
        self.assertFalse(failover.exhausted)

    def test_first_none_served(self) -> None:
        """
        C{first()} is L{None} when no instance of the route serves the
        request's protocol.
        """
        route = multi_route([instance("a", provider="deepseek")])
        failover = self.failover(route, OPENAI_EMBEDDINGS)
        self.assertIsNone(failover.first(self.selections[failover]))
        self.assertIsNone(failover.current)

    def test_next_before_any_attempt(self) -> None:
        """
        Without an attempt there is nothing to fall back from.
        """
        failover = self.failover(multi_route(fallback_strategy="http_5xx"))
        self.assertIsNone(failover.next(500))
        self.assertFalse(failover.exhausted)
        self.assertEqual(self.events, [])

    def test_fallbacks_from_the_selection(self) -> None:
        """
        The fallbacks come from the selection C{first()} was given: an
        instance it already gave is not tried again.
        """
        failover = self.failover(multi_route(ranked("a", "b", "c"), fallback_strategy="http_5xx"))
        self.start(failover)
        self.assertEqual(self.selections[failover].tried[0].name, "a")
        following = failover.next(500)
        assert following is not None
        self.assertEqual(following.name, "b")
        self.assertEqual([i.name for i in self.selections[failover].tried], ["a", "b"])


class MayFallBackTests(FailoverCase):
    """
    L{Failover.may_fall_back}: the route's policy per status.
    """

    def test_per_status(self) -> None:
        """
        C{http_429} allows 429 only, C{http_5xx} every 5xx only,
        C{fallback_http_statuses} its own statuses besides the strategy's,
        and no strategy allows nothing; a status allowed by
        C{may_fall_back} is one C{next()} falls back on.
        """
        statuses = (400, 404, 429, 500, 502, 503, 599)
        cases: list[tuple[dict[str, Any], set[int]]] = [
            ({}, set()),
            ({"fallback_strategy": "http_429"}, {429}),
            ({"fallback_strategy": "http_5xx"}, {500, 502, 503, 599}),
            ({"fallback_strategy": ["http_429", "http_5xx"]}, {429, 500, 502, 503, 599}),
            ({"fallback_http_statuses": [400, 502]}, {400, 502}),
            (
                {"fallback_strategy": "http_429", "fallback_http_statuses": [404]},
                {404, 429},
            ),
            ({"fallback_strategy": "instance_health_and_rate_limiting"}, set()),
        ]
        for plugin, allowed in cases:
            for status in statuses:
                failover = self.failover(multi_route(ranked("a", "b"), **plugin))
                self.start(failover)
                expected = status in allowed
                self.assertEqual(failover.may_fall_back(status), expected, (plugin, status))
                following = failover.next(status)
                self.assertEqual(following is not None, expected, (plugin, status))
                if following is not None:
                    self.assertEqual(following.name, "b")

    def test_single_instance(self) -> None:
        """
        A route with one instance never falls back, whatever its policy;
        its failure does not count as every instance failing.
        """
        route = multi_route(["a"], fallback_strategy="http_5xx", fallback_http_statuses=[429, 500])
        failover = self.failover(route)
        self.start(failover)
        for status in (429, 500, 503):
            self.assertFalse(failover.may_fall_back(status))
            self.assertIsNone(failover.next(status))
        self.assertFalse(failover.exhausted)
        self.assertEqual(self.events, [])

    def test_does_not_consume_retries(self) -> None:
        """
        Asking C{may_fall_back} any number of times consumes no retry:
        with C{max_retries: 1} the first C{next()} still falls back.
        """
        failover = self.failover(
            multi_route(ranked("a", "b", "c"), fallback_strategy="http_5xx", max_retries=1)
        )
        self.start(failover)
        for _ in range(5):
            self.assertTrue(failover.may_fall_back(500))
        following = failover.next(500)
        assert following is not None
        self.assertEqual(following.name, "b")


class MaxRetriesTests(FailoverCase):
    """
    C{max_retries}: the most fallbacks of one request, consumed by
    C{next()}.
    """

    def test_consumed_by_next(self) -> None:
        """
        With C{max_retries: 1} and three instances, one fallback is made;
        then C{may_fall_back} says no, the next C{next()} is L{None} with a
        warning, and the route is not exhausted (an instance is left).
        """
        failover = self.failover(
            multi_route(ranked("a", "b", "c"), fallback_strategy="http_5xx", max_retries=1)
        )
        self.start(failover)
        second = self.fall_back(failover, 500)
        self.assertEqual(second.instance.name, "b")
        self.assertFalse(failover.may_fall_back(500))
        self.assertIsNone(failover.next(503))
        self.assertFalse(failover.exhausted)
        self.assertEqual([a.instance.name for a in failover.attempts], ["a", "b"])
        self.assertIn("reached max_retries 1, not retrying", self.messages())

    def test_two(self) -> None:
        """
        With C{max_retries: 2}, two fallbacks are made, not three.
        """
        failover = self.failover(
            multi_route(ranked("a", "b", "c", "d"), fallback_strategy="http_5xx", max_retries=2)
        )
        self.start(failover)
        self.fall_back(failover, 500)
        self.assertTrue(failover.may_fall_back(500))
        self.fall_back(failover, 500)
        self.assertFalse(failover.may_fall_back(500))
        self.assertIsNone(failover.next(500))
        self.assertEqual([a.instance.name for a in failover.attempts], ["a", "b", "c"])

    def test_zero(self) -> None:
        """
        C{max_retries: 0} never falls back.
        """
        failover = self.failover(multi_route(fallback_strategy="http_5xx", max_retries=0))
        self.start(failover)
        self.assertFalse(failover.may_fall_back(500))
        self.assertIsNone(failover.next(500))
        self.assertFalse(failover.exhausted)

    def test_refused_status_consumes_nothing(self) -> None:
        """
        A failure whose status the policy does not allow consumes no retry.
        """
        failover = self.failover(
            multi_route(ranked("a", "b"), fallback_strategy="http_5xx", max_retries=1)
        )
        self.start(failover)
        self.assertIsNone(failover.next(400))
        self.assertIsNone(failover.next(429))
        self.assertTrue(failover.may_fall_back(500))
        self.assertEqual(self.fall_back(failover, 500).instance.name, "b")


class RetryWindowTests(FailoverCase):
    """
    C{retry_on_failure_within_ms}: an attempt that failed later than this
    does not fall back.
    """

    def test_older_than_window(self) -> None:
        """
        An attempt that failed 101 ms after it started, with a 100 ms
        window, does not fall back (a warning says why) though
        C{may_fall_back} said it could, and consumes no retry.
        """
        failover = self.failover(
            multi_route(
                ranked("a", "b"),
                fallback_strategy="http_5xx",
                retry_on_failure_within_ms=100,
                max_retries=1,
            )
        )
        self.start(failover)
        self.clock.advance(0.101)
        self.assertTrue(failover.may_fall_back(500))
        self.assertIsNone(failover.next(500))
        self.assertFalse(failover.exhausted)
        self.assertEqual(
            self.messages(),
            [
                "ai instance a failed after 101ms, exceeding "
                "retry_on_failure_within_ms 100, not retrying"
            ],
        )
        self.assertTrue(failover.may_fall_back(500))

    def test_within_window(self) -> None:
        """
        An attempt that failed exactly at the window's end falls back.
        """
        failover = self.failover(
            multi_route(
                ranked("a", "b"), fallback_strategy="http_5xx", retry_on_failure_within_ms=100
            )
        )
        self.start(failover)
        self.clock.advance(0.1)
        following = failover.next(500)
        assert following is not None
        self.assertEqual(following.name, "b")

    def test_from_the_current_attempt(self) -> None:
        """
        The window is measured from the start of the attempt that failed,
        not of the request.
        """
        failover = self.failover(
            multi_route(
                ranked("a", "b", "c"), fallback_strategy="http_5xx", retry_on_failure_within_ms=100
            )
        )
        self.start(failover)
        self.clock.advance(0.09)
        self.fall_back(failover, 500)
        self.clock.advance(0.09)
        third = self.fall_back(failover, 500)
        self.assertEqual(third.instance.name, "c")
        self.clock.advance(0.2)
        self.assertIsNone(failover.next(500))


class ExhaustedTests(FailoverCase):
    """
    L{Failover.exhausted}: every instance was tried.
    """

    def test_no_instance_left(self) -> None:
        """
        When the last instance failed too, C{next()} is L{None}, the
        failover is exhausted and a warning says so; each fallback was
        warned about, naming both instances.
        """
        failover = self.failover(multi_route(ranked("a", "b"), fallback_strategy="http_5xx"))
        self.start(failover)
        self.fall_back(failover, 500)
        self.assertFalse(failover.exhausted)
        self.assertIsNone(failover.next(503))
        self.assertTrue(failover.exhausted)
        self.assertEqual(
            self.messages(),
            [
                "ai instance a returned status 500, falling back to b",
                "ai instance b returned status 503; no instance left to fall back to",
            ],
        )

    def test_not_for_refused_status(self) -> None:
        """
        A failure the policy does not fall back on leaves the failover not
        exhausted, even on the last instance.
        """
        failover = self.failover(multi_route(ranked("a", "b"), fallback_strategy="http_5xx"))
        self.start(failover)
        self.fall_back(failover, 500)
        self.assertIsNone(failover.next(400))
        self.assertFalse(failover.exhausted)


class RecordsTests(FailoverCase):
    """
    L{Failover.give_up} and the attempts as the access record lists them.
    """

    def test_give_up(self) -> None:
        """
        C{give_up()} ends the current attempt now, once: a later call does
        not move its end; without an attempt it does nothing.
        """
        failover = self.failover(multi_route(ranked("a", "b"), fallback_strategy="http_5xx"))
        failover.give_up()
        self.assertEqual(failover.attempts, [])
        attempt = self.start(failover)
        self.clock.advance(0.25)
        failover.give_up()
        self.assertEqual(attempt.ended, 0.25)
        self.clock.advance(1)
        failover.give_up()
        self.assertEqual(attempt.ended, 0.25)

    def test_records(self) -> None:
        """
        Each attempt is listed with its instance, status and duration: a
        given-up one until it was given up, the current one until C{now}.
        """
        failover = self.failover(multi_route(ranked("a", "b"), fallback_strategy="http_5xx"))
        first = self.start(failover)
        self.clock.advance(0.25)
        first.status = 500
        second = self.fall_back(failover, 500)
        self.clock.advance(0.5)
        second.status = 200
        self.assertEqual(
            failover.records(1.0),
            [
                {"instance": "a", "status": 500, "duration_ms": 250},
                {"instance": "b", "status": 200, "duration_ms": 750},
            ],
        )
        self.assertEqual(
            failover.records(2.0)[1], {"instance": "b", "status": 200, "duration_ms": 1750}
        )

    def test_record_without_status(self) -> None:
        """
        An attempt that never answered is listed with a status of L{None}.
        """
        failover = self.failover(multi_route(["a"]))
        self.start(failover)
        self.assertEqual(
            failover.records(0.0625), [{"instance": "a", "status": None, "duration_ms": 62}]
        )


class HoldTests(FailoverCase):
    """
    L{Failover.may_hold} and L{Failover.commit_s}: C{stream_commit_ms}.
    """

    def test_with_commit(self) -> None:
        """
        With C{stream_commit_ms} and a policy falling back on a 502, a
        stream is held, for C{stream_commit_ms} in seconds.
        """
        failover = self.failover(multi_route(fallback_strategy="http_5xx", stream_commit_ms=250))
        self.start(failover)
        self.assertTrue(failover.may_hold())
        self.assertEqual(failover.commit_s, 0.25)

    def test_without_commit(self) -> None:
        """
        Without C{stream_commit_ms} nothing is held, and there is no commit
        time to ask for.
        """
        failover = self.failover(multi_route(fallback_strategy="http_5xx"))
        self.start(failover)
        self.assertTrue(failover.may_fall_back(HELD_FAILURE_STATUS))
        self.assertFalse(failover.may_hold())
        self.assertRaises(AssertionError, lambda: failover.commit_s)

    def test_held_failure_status(self) -> None:
        """
        A held stream's failure counts as a 502: it is held only when the
        policy falls back on that status.
        """
        self.assertEqual(HELD_FAILURE_STATUS, 502)
        cases: list[tuple[dict[str, Any], bool]] = [
            ({"fallback_strategy": "http_429"}, False),
            ({"fallback_http_statuses": [502]}, True),
            ({"fallback_http_statuses": [500]}, False),
            ({}, False),
        ]
        for plugin, held in cases:
            failover = self.failover(multi_route(stream_commit_ms=100, **plugin))
            self.start(failover)
            self.assertEqual(failover.may_hold(), held, plugin)

    def test_not_without_fallback(self) -> None:
        """
        A single instance, or no retry left, is never held.
        """
        single = self.failover(
            multi_route(["a"], fallback_strategy="http_5xx", stream_commit_ms=100)
        )
        self.start(single)
        self.assertFalse(single.may_hold())
        failover = self.failover(
            multi_route(
                ranked("a", "b", "c"),
                fallback_strategy="http_5xx",
                stream_commit_ms=100,
                max_retries=1,
            )
        )
        self.start(failover)
        self.assertTrue(failover.may_hold())
        self.fall_back(failover, HELD_FAILURE_STATUS)
        self.assertFalse(failover.may_hold())
