# -*- test-case-name: tests.test_admission -*-
"""
Building the access side of a config: the consumer table, and each
route's C{key-auth} and C{ai-rate-limiting}, with every problem at its
field's path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiproxy.access.consumers import ConsumerTable
from aiproxy.access.keyauth import KeyAuth
from aiproxy.budget.limits import Budget, budget_problems
from aiproxy.budget.stores import CounterStores
from aiproxy.config import Config, ConfigError, ConsumerConfig, RouteConfig
from aiproxy.schema import format_path

__all__ = ["build_consumers", "route_access"]


def _budget(
    scope: str,
    conf: Mapping[str, Any],
    path: list[str | int],
    stores: CounterStores,
    instance_names: Sequence[str] | None,
    route_name: str = "consumer",
) -> Budget:
    """
    The L{Budget} of one C{ai-rate-limiting} config.

    @raise ConfigError: with its problems, at their paths.
    """
    problems = budget_problems(conf, instance_names)
    if problems:
        raise ConfigError([f"{format_path(path + where)}: {reason}" for where, reason in problems])
    try:
        store = stores.store(conf)
    except ValueError as e:  # e.g. a redis_cluster_nodes entry that is not host:port
        raise ConfigError([f"{format_path(path)}: {e}"]) from None
    return Budget(scope, conf, store, route_name)


def build_consumers(config: Config, stores: CounterStores) -> ConsumerTable:
    """
    The consumers of C{config}, each with its own budget.

    @raise ConfigError: with every problem of the consumers' budgets.
    """
    problems: list[str] = []

    def own_budget(index: int, consumer: ConsumerConfig) -> Budget | None:
        assert consumer.rate_limiting is not None
        path: list[str | int] = ["consumers", index, "plugins", "ai-rate-limiting"]
        try:
            return _budget(
                f"consumer:{consumer.username}", consumer.rate_limiting, path, stores, None
            )
        except ConfigError as e:
            problems.extend(e.problems)
            return None

    table = ConsumerTable.build(config.consumers, own_budget)
    if problems:
        raise ConfigError(problems)
    return table


def route_access(
    index: int,
    route: RouteConfig,
    instance_names: Sequence[str],
    consumers: ConsumerTable,
    stores: CounterStores,
) -> tuple[KeyAuth | None, Budget | None]:
    """
    A route's C{key-auth} and C{ai-rate-limiting}.

    @param instance_names: the route's instances' names.
    @raise ConfigError: with the problems of its budget.
    """
    key_auth = None if route.key_auth is None else KeyAuth(route.key_auth, consumers)
    budget = None
    if route.rate_limiting is not None:
        path: list[str | int] = ["routes", index, "plugins", "ai-rate-limiting"]
        multi = route.proxy_plugin == "ai-proxy-multi"
        budget = _budget(
            f"route:{route.id}",
            route.rate_limiting,
            path,
            stores,
            instance_names if multi else None,
            instance_names[0],
        )
    return key_auth, budget
