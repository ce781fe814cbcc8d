# -*- test-case-name: tests.test_failover -*-
"""
Which instance each attempt of a request goes to, and whether a failed
attempt may fall back to another: the one copy of the fallback rules of an
C{ai-proxy-multi} route (APISIX's C{fallback_strategy},
C{fallback_http_statuses}, C{max_retries} and
C{retry_on_failure_within_ms}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from aiproxy.routing.balancer import Selection
from aiproxy.routing.routes import Instance, Route

__all__ = ["HELD_FAILURE_STATUS", "Attempt", "Failover"]

log = Logger()

#: The status a stream failing before its first content counts as.
HELD_FAILURE_STATUS = 502


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class Attempt:
    """
    One upstream attempt of a request.

    @ivar status: the upstream's status (L{None} until it answered, or if
        it never did; 502 for a held stream that failed before content).
    @ivar ended: when it was given up (L{None} for the attempt that answers).
    """

    __slots__ = ("instance", "started", "status", "ended")

    def __init__(self, instance: Instance, started: float) -> None:
        self.instance = instance
        self.started = started
        self.status: int | None = None
        self.ended: float | None = None

    def record(self, now: float) -> dict[str, Any]:
        """
        The attempt as the access record lists it.
        """
        end = now if self.ended is None else self.ended
        return {
            "instance": self.instance.name,
            "status": self.status,
            "duration_ms": _ms(end - self.started),
        }


class Failover:
    """
    The attempts of one request: picks each one's instance from the
    route's selection and decides whether a failure falls back.

    @ivar attempts: the attempts so far, in order.
    @ivar exhausted: every instance the request could go to was tried.
    """

    def __init__(self, route: Route, now: Callable[[], float]) -> None:
        """
        @param now: the clock's C{seconds}.
        """
        self._policy = route.fallback
        self._several = len(route.instances) > 1
        self._selection: Selection[Instance] | None = None
        self._now = now
        self._retries = 0
        self.attempts: list[Attempt] = []
        self.exhausted = False

    @property
    def current(self) -> Attempt | None:
        """
        The latest attempt (L{None} before the first).
        """
        return self.attempts[-1] if self.attempts else None

    def first(self, selection: Selection[Instance]) -> Instance | None:
        """
        The instance of the first attempt, or L{None} when every instance
        serving the request is out of use.

        @param selection: the request's instance order (priority, weights,
            health), consumed one instance per attempt.
        """
        self._selection = selection
        return selection.next()

    def begin(self, instance: Instance) -> Attempt:
        """
        Record a new attempt on C{instance}, starting now.
        """
        attempt = Attempt(instance, self._now())
        self.attempts.append(attempt)
        return attempt

    def may_fall_back(self, status: int) -> bool:
        """
        Whether a failure with C{status} of the current attempt could fall
        back (before the retry window and the instances left are looked
        at): the route has several instances, its policy allows C{status}
        and C{max_retries} is not reached.
        """
        policy = self._policy
        return (
            self._several
            and policy.allows(status)
            and (policy.max_retries is None or self._retries < policy.max_retries)
        )

    def may_hold(self) -> bool:
        """
        Whether to hold a stream back until its first content
        (C{stream_commit_ms}): a failure before content could still fall
        back.
        """
        return self._policy.commit_ms is not None and self.may_fall_back(HELD_FAILURE_STATUS)

    @property
    def commit_s(self) -> float:
        """
        C{stream_commit_ms} in seconds (only when L{may_hold}).
        """
        commit_ms = self._policy.commit_ms
        assert commit_ms is not None
        return commit_ms / 1000.0

    def next(self, status: int) -> Instance | None:
        """
        The instance to fall back to now that the current attempt failed
        with C{status} (APISIX's C{retry_on_error}), or L{None}. Consumes a
        retry; sets L{exhausted} when no instance is left.
        """
        attempt = self.current
        selection = self._selection
        if attempt is None or selection is None or not self._several:
            return None
        if not self._policy.allows(status):
            return None
        policy = self._policy
        elapsed = _ms(self._now() - attempt.started)
        if policy.within_ms is not None and elapsed > policy.within_ms:
            log.warn(
                "ai instance {instance} failed after {elapsed}ms, exceeding "
                "retry_on_failure_within_ms {limit}, not retrying",
                instance=attempt.instance.name,
                elapsed=elapsed,
                limit=policy.within_ms,
            )
            return None
        if policy.max_retries is not None:
            self._retries += 1
            if self._retries > policy.max_retries:
                log.warn(
                    "reached max_retries {max_retries}, not retrying",
                    max_retries=policy.max_retries,
                )
                return None
        instance = selection.next()
        if instance is None:
            self.exhausted = True
            log.warn(
                "ai instance {instance} returned status {status}; no instance left to fall back to",
                instance=attempt.instance.name,
                status=status,
            )
            return None
        log.warn(
            "ai instance {instance} returned status {status}, falling back to {next_instance}",
            instance=attempt.instance.name,
            status=status,
            next_instance=instance.name,
        )
        return instance

    def give_up(self) -> None:
        """
        The current attempt is abandoned for another (its time ends now).
        """
        attempt = self.current
        if attempt is not None and attempt.ended is None:
            attempt.ended = self._now()

    def records(self, now: float) -> list[dict[str, Any]]:
        """
        The attempts as the access record lists them, at C{now}.
        """
        return [attempt.record(now) for attempt in self.attempts]
