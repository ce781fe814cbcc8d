"""
Tests for L{aiproxy.budget}: C{cost_expr}, the in-process counters, the
quotas of a budget and the config checks of C{ai-rate-limiting}.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aiproxy.budget.cost import CostExpressionError, compile_cost
from aiproxy.budget.limits import Budget, Quota, budget_problems, rule_value
from aiproxy.budget.store import LocalCounters
from aiproxy.budget.stores import CounterStores
from aiproxy.config import ConfigError, parse_config
from aiproxy.context import ExchangeContext
from aiproxy.workers.sizing import local_budget_problems


class CostExpressionTests(SynchronousTestCase):
    def test_sum_of_fields(self) -> None:
        cost = compile_cost("input_tokens + cache_creation_input_tokens + output_tokens")
        self.assertEqual(cost({"input_tokens": 3, "output_tokens": 4}), 7)
        self.assertEqual(
            cost({"input_tokens": 3, "output_tokens": 4, "cache_creation_input_tokens": 10}), 17
        )

    def test_arithmetic(self) -> None:
        cost = compile_cost("(prompt_tokens + 4 * completion_tokens) / 2 - -1")
        self.assertEqual(cost({"prompt_tokens": 2, "completion_tokens": 3}), 8)

    def test_missing_and_odd_fields_are_zero(self) -> None:
        cost = compile_cost("a + b + c + d")
        self.assertEqual(cost({"b": "7", "c": None, "d": True}), 0)

    def test_never_negative_nor_failing(self) -> None:
        self.assertEqual(compile_cost("0 - a")({"a": 5}), 0)
        self.assertEqual(compile_cost("a / b")({"a": 5}), 0)
        self.assertEqual(compile_cost("a * 1e308 * 1e308")({"a": 5}), 2**53)
        self.assertEqual(compile_cost("a * 1e308 * 1e308 - a * 1e308 * 1e308")({"a": 5}), 0)

    def test_refused(self) -> None:
        for expression in (
            "__import__('os').system('true')",
            "a.b",
            "a ** 2",
            "a[0]",
            "1 if a else 2",
            "'text'",
            "a and b",
            "a +",
            "lambda: 1",
            "a % 2",
            "True",
            "x" * 1001,
        ):
            with self.assertRaises(CostExpressionError, msg=expression):
                compile_cost(expression)

    def test_deep_nesting(self) -> None:
        self.assertEqual(compile_cost("(" * 50 + "a" + ")" * 50)({"a": 2}), 2)
        self.assertEqual(compile_cost("-" * 400 + "a")({"a": 2}), 2)

    @given(st.integers(0, 10**9), st.integers(0, 10**9))
    def test_sum_property(self, a: int, b: int) -> None:
        self.assertEqual(compile_cost("a + b")({"a": a, "b": b}), a + b)


class LocalCountersTests(SynchronousTestCase):
    def test_counts_until_expiry(self) -> None:
        clock = Clock()
        store = LocalCounters(clock.seconds)
        self.assertEqual(store.spent(["k", "j"]), [0, 0])
        store.charge([("k", 5, 10), ("j", 1, 3)])
        store.charge([("k", 7, 100)])
        self.assertEqual(store.spent(["k", "j"]), [12, 1])
        clock.advance(3)
        self.assertEqual(store.spent(["k", "j"]), [12, 0])
        clock.advance(7)
        self.assertEqual(store.spent(["k"]), [0])
        store.charge([("k", 2, 10)])
        self.assertEqual(store.spent(["k"]), [2])

    def test_sweeps_expired(self) -> None:
        clock = Clock()
        store = LocalCounters(clock.seconds)
        store.charge([(f"k{i}", 1, 1) for i in range(100)])
        clock.advance(61)
        store.charge([("new", 1, 10)])
        self.assertEqual(list(store._counts), ["new"])

    def test_stores(self) -> None:
        stores = CounterStores(Clock())
        self.assertIs(stores.store({"policy": "local"}), stores.local)
        self.assertEqual(self.successResultOf(stores.close()), [])


def budget(**conf: Any) -> Budget:
    full = {
        "limit_strategy": "total_tokens",
        "show_limit_quota_header": True,
        "allow_degradation": False,
        "rejected_code": 503,
        "policy": "local",
    }
    full.update(conf)
    return Budget("route:r", full, LocalCounters(Clock().seconds), "ai-proxy-openai")


class QuotaTests(SynchronousTestCase):
    def test_windows_aligned_on_the_epoch(self) -> None:
        quota = Quota("n", 10, 60, "aiproxy:rl:x")
        self.assertEqual(quota.window_of(125.5), (120, 180))
        self.assertEqual(quota.counter_key("alice", 179.9), "aiproxy:rl:x:alice:120")
        self.assertEqual(quota.counter_key("alice", 180), "aiproxy:rl:x:alice:180")

    def test_route_quota_named_per_instance(self) -> None:
        b = budget(
            limit=100, time_window=60, instances=[{"name": "a", "limit": 5, "time_window": 10}]
        )
        own = b.instance_quota("a")
        shared = b.instance_quota("b")
        assert own is not None and shared is not None
        self.assertEqual((own.name, own.limit, own.window), ("a", 5, 10))
        self.assertEqual(
            (shared.name, shared.limit, shared.counter), ("b", 100, "aiproxy:rl:route:r:#global")
        )
        self.assertEqual(b.route_quota and b.route_quota.name, "ai-proxy-openai")

    def test_only_instances(self) -> None:
        b = budget(instances=[{"name": "a", "limit": 5, "time_window": 10}])
        self.assertIsNone(b.instance_quota("b"))

    def test_rules(self) -> None:
        b = budget(
            rules=[
                {"count": 5, "time_window": 60, "key": "$consumer_name"},
                {
                    "count": 9,
                    "time_window": 60,
                    "key": "team-${http_x_team}",
                    "header_prefix": "team",
                },
            ]
        )
        self.assertEqual(
            [(q.name, q.limit, q.key) for q in b.rules],
            [("1", 5, "$consumer_name"), ("team", 9, "team-${http_x_team}")],
        )
        self.assertEqual(b.rejected_msg, "rate limit exceeded")

    def test_rule_value(self) -> None:
        values = {"consumer_name": "alice", "http_x_team": "blue"}
        self.assertEqual(
            rule_value("$consumer_name:${http_x_team}:$nothing", values.get), "alice:blue:"
        )
        long = rule_value("$consumer_name", lambda name: "x" * 500)
        self.assertTrue(long.startswith("sha256-"))
        self.assertEqual(len(long), 7 + 64)

    def test_costs(self) -> None:
        context = ExchangeContext("r", None, 0.0)
        context.set_usage({"input_tokens": 10, "cache_creation_input_tokens": 3})
        context.set_usage({"input_tokens": 0, "output_tokens": 4})
        self.assertEqual(budget(limit=1, time_window=1).cost(context), 14)
        self.assertEqual(
            budget(limit=1, time_window=1, limit_strategy="prompt_tokens").cost(context), 10
        )
        self.assertEqual(
            budget(limit=1, time_window=1, limit_strategy="completion_tokens").cost(context), 4
        )
        expression = budget(
            limit=1,
            time_window=1,
            limit_strategy="expression",
            cost_expr="input_tokens + cache_creation_input_tokens + output_tokens / 3",
        )
        self.assertEqual(expression.cost(context), 15)
        self.assertEqual(budget(limit=1, time_window=1).cost(ExchangeContext("r", None, 0.0)), 0)


def problems_of(plugin: dict, multi: bool = False, workers: Any = None) -> list[str]:
    if multi:
        proxy = {
            "ai-proxy-multi": {
                "instances": [
                    {
                        "name": name,
                        "provider": "openai",
                        "weight": 1,
                        "auth": {"header": {"a": "b"}},
                    }
                    for name in ("a", "b")
                ]
            }
        }
    else:
        proxy = {"ai-proxy": {"provider": "openai", "auth": {"header": {"a": "b"}}}}
    document: dict[str, Any] = {
        "routes": [
            {"uri": "/v1/chat/completions", "plugins": {**proxy, "ai-rate-limiting": plugin}}
        ]
    }
    if workers is not None:
        document["workers"] = workers
    try:
        config = parse_config(json.dumps(document), environ={})
    except ConfigError as e:
        return e.problems
    route = config.routes[0]
    names = ["a", "b"] if multi else None
    assert route.rate_limiting is not None
    return [f"{'.'.join(map(str, p))}: {r}" for p, r in budget_problems(route.rate_limiting, names)]


class ConfigProblemsTests(SynchronousTestCase):
    prefix = "routes[0].plugins.ai-rate-limiting"

    def test_needs_a_quota(self) -> None:
        self.assertEqual(
            problems_of({}),
            [f"{self.prefix}: one of limit with time_window, instances or rules is required"],
        )
        self.assertEqual(
            problems_of({"limit": 5}),
            [
                f"{self.prefix}: 'time_window' is a dependency of 'limit'",
                f"{self.prefix}: one of limit with time_window, instances or rules is required",
            ],
        )

    def test_expression_needs_cost_expr(self) -> None:
        self.assertEqual(
            problems_of({"limit": 5, "time_window": 1, "limit_strategy": "expression"}),
            [f"{self.prefix}.cost_expr: is a required property"],
        )

    def test_bad_cost_expr(self) -> None:
        self.assertEqual(
            problems_of(
                {
                    "limit": 5,
                    "time_window": 1,
                    "limit_strategy": "expression",
                    "cost_expr": "a ** 2",
                }
            ),
            [
                "cost_expr: unsupported Pow: only numbers, usage field names, + - * / and parentheses"
            ],
        )

    def test_unknown_instance(self) -> None:
        plugin = {"instances": [{"name": "c", "limit": 5, "time_window": 1}]}
        self.assertEqual(
            problems_of(plugin, multi=True), ["instances.0.name: no instance named 'c'"]
        )
        self.assertEqual(
            problems_of(plugin), ["instances: only an ai-proxy-multi route has instances to limit"]
        )

    def test_redis_needs_host(self) -> None:
        self.assertEqual(
            problems_of({"limit": 5, "time_window": 1, "policy": "redis"}),
            [f"{self.prefix}.redis_host: is a required property"],
        )

    def test_local_budget_with_workers(self) -> None:
        def problems(plugin: dict, workers: Any) -> list[str]:
            document = {
                "workers": workers,
                "routes": [
                    {
                        "uri": "/v1/chat/completions",
                        "plugins": {
                            "ai-proxy": {"provider": "openai", "auth": {"header": {"a": "b"}}},
                            "ai-rate-limiting": plugin,
                        },
                    }
                ],
            }
            config = parse_config(json.dumps(document), environ={})
            return local_budget_problems(config, config.workers)

        self.assertEqual(
            problems({"limit": 5, "time_window": 1}, 2),
            [
                f"{self.prefix}.policy: policy local counts per process and 2 worker processes"
                " would multiply the budget: use policy redis (or redis-cluster), or workers: 1"
            ],
        )
        redis = {"limit": 5, "time_window": 1, "policy": "redis", "redis_host": "r1"}
        self.assertEqual(problems(redis, 2), [])
        self.assertEqual(problems({"limit": 5, "time_window": 1}, 1), [])

    def test_local_budget_problems_of_override(self) -> None:
        config = parse_config(
            json.dumps(
                {
                    "consumers": [
                        {
                            "username": "a",
                            "plugins": {
                                "key-auth": {"key": "k" * 16},
                                "ai-rate-limiting": {"limit": 1, "time_window": 1},
                            },
                        }
                    ]
                }
            ),
            environ={},
        )
        self.assertEqual(local_budget_problems(config, 1), [])
        self.assertEqual(len(local_budget_problems(config, 3)), 1)
        self.assertTrue(local_budget_problems(config, 3)[0].startswith("consumers[0].plugins."))


class ExampleConfigTests(SynchronousTestCase):
    def test_team_config(self) -> None:
        """
        conf/aiproxy-team.yaml is valid, and its budgets count in Redis.
        """
        from pathlib import Path

        from aiproxy.config import load_config
        from aiproxy.routing.build import build_routes

        path = Path(__file__).resolve().parent.parent / "conf" / "aiproxy-team.yaml"
        environ = {"ALICE_KEY": "a" * 20, "BOB_KEY": "b" * 20, "OPENAI_API_KEY": "sk-x"}
        config = load_config(str(path), environ=environ)
        stores = CounterStores(Clock())
        shared = LocalCounters(Clock().seconds)
        stores.store = lambda conf: shared  # type: ignore[method-assign]
        table = build_routes(config, Clock(), plugins={}, stores=stores)
        route = table.routes[0]
        self.assertIsNotNone(route.key_auth)
        self.assertEqual(route.budget.conf["policy"], "redis")
        self.assertEqual([c.username for c in config.consumers], ["alice", "bob"])
