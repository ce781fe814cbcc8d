# -*- test-case-name: tests.test_budget -*-
"""
One C{ai-rate-limiting} config as a L{Budget}: its quotas, what a request
costs, and how a refusal reads.

A quota counts tokens per fixed window of C{time_window} seconds, aligned
on the epoch so that every gateway sharing the counters agrees on the
windows. Its counter's key holds the window's start, so a new window is a
new counter and an old one is left to expire.

Quotas come in three kinds, as in APISIX: the C{limit}/C{time_window} of
the whole route (one counter, whichever instance serves), the
C{instances} entries (one counter per named instance; for an instance not
named, the route's quota applies) and C{rules} (one counter per value of
the rule's C{key}, e.g. per consumer).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiproxy.budget.cost import CostExpressionError, compile_cost
from aiproxy.interfaces import ICounterStore

__all__ = ["Budget", "Quota", "budget_problems", "rule_value"]

#: A C{$name} or C{${name}} variable in a rule's C{key}.
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")

#: The message of a refused request, when C{rejected_msg} is not set.
DEFAULT_REJECTED_MSG = "rate limit exceeded"


@dataclass(frozen=True)
class Quota:
    """
    One budget: C{limit} tokens per C{window} seconds.

    @ivar name: the C{<name>} of its C{X-AI-RateLimit-*-<name>} headers.
    @ivar counter: the start of its counters' keys.
    @ivar key: the rule's C{key} template (L{None}: one counter).
    """

    name: str
    limit: int
    window: int
    counter: str
    key: str | None = None
    #: The names of its three headers, encoded once.
    header_names: tuple[bytes, bytes, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name = self.name.encode("latin-1")
        object.__setattr__(
            self,
            "header_names",
            tuple(
                b"x-ai-ratelimit-" + kind + b"-" + name
                for kind in (b"limit", b"remaining", b"reset")
            ),
        )

    def window_of(self, now: float) -> tuple[int, int]:
        """
        The start and end (epoch seconds) of the window C{now} is in.
        """
        start = int(now // self.window) * self.window
        return start, start + self.window

    def counter_key(self, value: str, now: float) -> str:
        """
        The key of the counter of C{value} (a rule key's value, or C{""})
        in the window of C{now}.
        """
        return f"{self.counter}:{value}:{self.window_of(now)[0]}"


def _cost(conf: Mapping[str, Any]) -> Callable[[Any], int]:
    """
    What a request costs under C{conf}'s C{limit_strategy}, from its
    L{aiproxy.context.ExchangeContext}.

    @raise CostExpressionError: for a C{cost_expr} that cannot be compiled.
    """
    strategy = conf["limit_strategy"]
    if strategy == "expression":
        expression = compile_cost(conf["cost_expr"])
        return lambda context: math.ceil(expression(context.usage or {}))
    name = strategy

    def counted(context: Any) -> int:
        value = getattr(context, name)
        if value is None and name == "total_tokens":
            value = (context.prompt_tokens or 0) + (context.completion_tokens or 0)
        return int(value or 0)

    return counted


def rule_value(template: str, variable: Callable[[str], str | None]) -> str:
    """
    A rule's C{key} with its variables filled in (an unknown or empty one
    is empty); a long value is shortened to its digest.
    """
    value = _VARIABLE.sub(lambda m: variable(m.group(1) or m.group(2)) or "", template)
    if len(value) > 128:
        value = "sha256-" + hashlib.sha256(value.encode("utf-8")).hexdigest()
    return value


class Budget:
    """
    The quotas of one C{ai-rate-limiting} config, on a route or a consumer.

    @ivar store: where its counters live.
    @ivar route_quota: the C{limit}/C{time_window} quota, or L{None}.
    @ivar instance_quotas: the C{instances} quotas by instance name.
    @ivar rules: the C{rules} quotas.
    @ivar cost: what a request costs, from its context.
    """

    def __init__(
        self,
        scope: str,
        conf: Mapping[str, Any],
        store: ICounterStore,
        route_name: str = "consumer",
    ) -> None:
        """
        @param scope: names the counters (C{route:<id>} or
            C{consumer:<username>}); gateways sharing a store share the
            counters of equal scopes.
        @param route_name: the header name of the route's quota when no
            instance name applies.
        @raise CostExpressionError: for a bad C{cost_expr}.
        """
        self.conf = conf
        self.store = store
        self.scope = scope
        self.cost = _cost(conf)
        self.show_headers: bool = conf["show_limit_quota_header"]
        self.allow_degradation: bool = conf["allow_degradation"]
        self.rejected_code: int = conf["rejected_code"]
        self.rejected_msg: str = conf.get("rejected_msg") or DEFAULT_REJECTED_MSG
        prefix = f"aiproxy:rl:{scope}"
        self._named: dict[str, Quota] = {}
        self.route_quota = None
        if "limit" in conf:
            self.route_quota = Quota(
                route_name, conf["limit"], conf["time_window"], f"{prefix}:#global"
            )
        self.instance_quotas = {
            entry["name"]: Quota(
                entry["name"],
                entry["limit"],
                entry["time_window"],
                f"{prefix}:instance:{entry['name']}",
            )
            for entry in conf.get("instances") or ()
        }
        self.rules = tuple(
            Quota(
                rule.get("header_prefix") or str(position + 1),
                rule["count"],
                rule["time_window"],
                f"{prefix}:rule:{position + 1}",
                rule["key"],
            )
            for position, rule in enumerate(conf.get("rules") or ())
        )

    def instance_quota(self, instance: str | None) -> Quota | None:
        """
        The quota charged when C{instance} serves: its own, or the
        route's (named after the instance).
        """
        own = self.instance_quotas.get(instance) if instance is not None else None
        if own is not None:
            return own
        route = self.route_quota
        if route is None or instance is None:
            return route
        named = self._named.get(instance)
        if named is None:
            named = self._named[instance] = Quota(
                instance, route.limit, route.window, route.counter
            )
        return named


def budget_problems(
    conf: Mapping[str, Any], instance_names: Sequence[str] | None
) -> list[tuple[list[str | int], str]]:
    """
    What the schema cannot see in an C{ai-rate-limiting} config: a
    C{cost_expr} that is not arithmetic, an instance name the route does
    not have (or C{instances} where there are no named instances).

    @param instance_names: the route's C{ai-proxy-multi} instance names,
        L{None} on an C{ai-proxy} route or a consumer.
    @return: C{(path relative to the config, reason)} pairs.
    """
    problems: list[tuple[list[str | int], str]] = []
    if conf.get("limit_strategy") == "expression" and "cost_expr" in conf:
        try:
            compile_cost(conf["cost_expr"])
        except CostExpressionError as e:
            problems.append((["cost_expr"], str(e)))
    for position, entry in enumerate(conf.get("instances") or ()):
        if instance_names is None:
            problems.append((["instances"], "only an ai-proxy-multi route has instances to limit"))
            break
        if entry["name"] not in instance_names:
            problems.append(
                (["instances", position, "name"], f"no instance named {entry['name']!r}")
            )
    return problems
