# -*- test-case-name: tests.test_budget -*-
"""
The counter stores of a process: one in-process store, and one per
distinct Redis (or Redis Cluster). They outlive config reloads, so that a
reload does not reset the budgets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, gatherResults

from aiproxy.budget.store import LocalCounters
from aiproxy.interfaces import ICounterStore

__all__ = ["CounterStores", "process_stores"]


class CounterStores:
    """
    The counter stores of one reactor.

    @ivar local: the in-process store (C{policy: local}).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.local = LocalCounters(reactor.seconds)
        self._shared: dict[Any, ICounterStore] = {}

    def store(self, conf: Mapping[str, Any]) -> ICounterStore:
        """
        The store of an C{ai-rate-limiting} config's C{policy}.
        """
        if conf["policy"] == "local":
            return self.local
        from aiproxy.budget.redis import counter_store

        store = counter_store(conf, self._reactor)
        self._shared[id(store)] = store
        return store

    def close(self) -> Deferred[Any]:
        """
        Close the connections of the shared stores.
        """
        stores, self._shared = list(self._shared.values()), {}
        return gatherResults([store.close() for store in stores])


_PROCESS: dict[int, CounterStores] = {}


def process_stores(reactor: Any) -> CounterStores:
    """
    The stores of this process for C{reactor}, made on first use.
    """
    stores = _PROCESS.get(id(reactor))
    if stores is None:
        stores = _PROCESS[id(reactor)] = CounterStores(reactor)
    return stores
