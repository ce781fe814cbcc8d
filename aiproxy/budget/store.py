# -*- test-case-name: tests.test_budget -*-
"""
The in-process counter store (C{policy: local}) and the failure every
store reports when it cannot be reached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from aiproxy.interfaces import ICounterStore

__all__ = ["LocalCounters", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """
    A counter store could not be reached, or did not answer in time.

    @ivar cause: what happened, for the client's 503 and the log (never a
        secret).
    """

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@implementer(ICounterStore)
class LocalCounters:
    """
    Counters in this process's memory, answered synchronously; expired
    counters are dropped as new windows are charged.
    """

    description = "local"

    def __init__(self, now: Callable[[], float]) -> None:
        """
        @param now: the current time in seconds.
        """
        self._now = now
        self._counts: dict[str, list[float]] = {}
        self._sweep_at = 0.0

    def spent(self, keys: Sequence[str]) -> list[int]:
        now = self._now()
        out = []
        for key in keys:
            entry = self._counts.get(key)
            out.append(0 if entry is None or entry[1] <= now else int(entry[0]))
        return out

    def charge(self, charges: Sequence[tuple[str, int, int]]) -> None:
        now = self._now()
        counts = self._counts
        for key, amount, ttl_s in charges:
            entry = counts.get(key)
            if entry is None or entry[1] <= now:
                counts[key] = [amount, now + ttl_s]
            else:
                entry[0] += amount
        if now >= self._sweep_at:
            self._sweep_at = now + 60
            for key in [key for key, entry in counts.items() if entry[1] <= now]:
                del counts[key]

    def close(self) -> Deferred[None]:
        return succeed(None)
