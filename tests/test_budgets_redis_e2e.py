# -*- test-case-name: tests.test_budgets_redis_e2e -*-
"""
End-to-end tests of C{ai-rate-limiting} with C{policy: redis}: real
C{twistd aiproxy} daemons counting in a real C{redis-server} (see
L{tests.redis_server}), the mock upstream in the test's reactor.

Skipped without C{redis-server}, unless C{CI=true}.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import DeferredList
from twisted.trial.unittest import TestCase

from tests.daemon import (
    ROUTE_API_KEY,
    Daemon,
    MockServer,
    in_thread,
    start_daemon,
    start_mock,
    wait_until,
)
from tests.helpers import write_config
from tests.redis_server import RedisServer, redis_skip_reason, start_redis
from tests.test_budgets_e2e import (
    ALICE_KEY,
    BOB_KEY,
    CONSUMERS,
    RATE_LIMITED,
    assert_no_keys,
    call,
    quota,
    record_count,
    route,
)

#: The Redis password: given to the daemons through the environment, never
#: printed.
REDIS_PASSWORD = "redis-e2e-Pw-4f8a2c9e7b1d3605"

#: What each request costs: the mock's 10 prompt + 5 completion tokens.
COST = 15

NAME = "ai-proxy-openai"


def redis_budget(redis: RedisServer, **fields: Any) -> dict[str, Any]:
    """
    C{ai-rate-limiting} fields counting in C{redis}, its password written
    as C{${REDIS_PASSWORD}}.
    """
    conf = redis.conf(**fields)
    conf["redis_password"] = "${REDIS_PASSWORD}"
    return conf


async def start_gateway(testcase: TestCase, routes: Sequence[Mapping[str, Any]]) -> Daemon:
    """
    A daemon serving C{routes} to the consumers, with the Redis password in
    its environment.
    """
    return await start_daemon(
        testcase,
        config={"consumers": CONSUMERS, "routes": list(routes)},
        env={"REDIS_PASSWORD": REDIS_PASSWORD},
    )


def counters(redis: RedisServer, route_id: str) -> dict[str, int]:
    """
    The route's counters in Redis, by key. Blocking.
    """
    keys = redis.command("KEYS", f"aiproxy:rl:route:{route_id}:*")
    return {key: int(redis.command("GET", key)) for key in keys}


def spent(redis: RedisServer, route_id: str) -> int:
    """
    The tokens charged to the route in Redis, all counters together.
    Blocking.
    """
    return sum(counters(redis, route_id).values())


async def charged(redis: RedisServer, route_id: str, expected: int) -> None:
    """
    Wait until Redis holds C{expected} tokens for the route (a request is
    charged after its answer ended).
    """
    await wait_until(
        lambda: spent(redis, route_id) == expected,
        5,
        what=f"{expected} tokens charged to {route_id}",
    )


def assert_secrets_kept(
    testcase: TestCase, daemons: list[Daemon], mock: MockServer, *secrets: str
) -> None:
    """
    No consumer key nor C{secrets} (the Redis password) in any daemon's
    output, nor upstream.
    """
    for daemon in daemons:
        assert_no_keys(testcase, daemon, mock)
        for secret in (REDIS_PASSWORD, *secrets):
            testcase.assertNotIn(secret, daemon.output)
    for request in mock.requests():
        testcase.assertNotIn(REDIS_PASSWORD, str(request))


class SharedBudgetTests(TestCase):
    """
    Two gateways counting in one Redis enforce one budget.
    """

    skip = redis_skip_reason()

    async def test_alternating(self) -> None:
        """
        Requests sent in turn to two daemons: each answer's remaining
        header shows what both daemons spent; once the budget is spent
        both refuse; the total charged in Redis exceeds the limit by less
        than one request's tokens, in a counter that expires with its
        window. A reload of one daemon raising the limit keeps the counter:
        that daemon serves again up to its new limit, the other still
        refuses.
        """
        redis = await start_redis(self, password=REDIS_PASSWORD)
        mock = await start_mock(self)
        limit = 100
        routes = [route(mock, "shared", {}, redis_budget(redis, limit=limit, time_window=86400))]
        daemons = [await start_gateway(self, routes), await start_gateway(self, routes)]
        served = 0
        refused = 0
        turn = 0
        while refused < 2:
            daemon = daemons[turn % 2]
            key = (ALICE_KEY, BOB_KEY)[turn // 2 % 2]
            response = await in_thread(call, daemon, "shared", key, "bearer")
            turn += 1
            limit_seen, remaining, _ = quota(response, NAME)
            self.assertEqual(limit_seen, limit)
            self.assertEqual(remaining, max(0, limit - COST * served), turn)
            if response.status == 200:
                served += 1
                await charged(redis, "shared", COST * served)
            else:
                self.assertEqual((response.status, response.json()), (503, RATE_LIMITED))
                refused += 1
            self.assertLess(turn, 20)
        self.assertEqual(served, -(-limit // COST))
        total = spent(redis, "shared")
        self.assertEqual(total, COST * served)
        self.assertLess(total, limit + COST)
        [key] = counters(redis, "shared")
        ttl = redis.command("TTL", key)
        self.assertTrue(0 < ttl <= 86400, ttl)
        # Both daemons served, and both refused.
        for daemon in daemons:
            statuses = {r["status"] for r in daemon.access_records()}
            self.assertEqual(statuses, {200, 503})
        self.assertEqual(mock.stats()["requests"], served)

        # A reload raising the limit: the counter in Redis is kept, and the
        # new limit applies to what was already spent.
        raised = [route(mock, "shared", {}, redis_budget(redis, limit=200, time_window=86400))]
        write_config(daemons[0].config.parent, {"consumers": CONSUMERS, "routes": raised})
        daemons[0].signal("HUP")
        await daemons[0].wait_for_line("reloaded")
        response = await in_thread(call, daemons[0], "shared", ALICE_KEY)
        self.assertEqual(response.status, 200)
        self.assertEqual(quota(response, NAME)[:2], (200, 200 - total))
        await charged(redis, "shared", total + COST)
        response = await in_thread(call, daemons[1], "shared", ALICE_KEY)
        self.assertEqual(response.status, 503)
        self.assertEqual(quota(response, NAME)[:2], (limit, 0))
        assert_secrets_kept(self, daemons, mock)

    async def test_concurrent(self) -> None:
        """
        Requests sent in pairs, one to each daemon at the same moment,
        with slow answers: the total charged never exceeds the limit by
        more than the one pair admitted before either was charged; every
        request admitted was charged.
        """
        redis = await start_redis(self, password=REDIS_PASSWORD)
        mock = await start_mock(self)
        limit = 100
        routes = [route(mock, "burst", {}, redis_budget(redis, limit=limit, time_window=86400))]
        daemons = [await start_gateway(self, routes), await start_gateway(self, routes)]
        slow = {"x-mock-first-delay-ms": "100"}
        statuses: list[int] = []
        for _ in range(8):
            results = await DeferredList(
                [
                    in_thread(call, daemon, "burst", key, headers=slow)
                    for daemon, key in zip(daemons, (ALICE_KEY, BOB_KEY), strict=True)
                ],
                fireOnOneErrback=True,
                consumeErrors=True,
            )
            statuses += [response.status for _, response in results]
            served = statuses.count(200)
            await charged(redis, "burst", COST * served)
        served = statuses.count(200)
        self.assertEqual(set(statuses), {200, 503})
        self.assertGreaterEqual(served * COST, limit)
        total = spent(redis, "burst")
        self.assertEqual(total, served * COST)
        self.assertLess(total, limit + 2 * COST)
        assert_secrets_kept(self, daemons, mock)

    async def test_overflowing_cost(self) -> None:
        """
        A C{cost_expr} overflowing to infinity spends the shared budget:
        Redis takes the charge (no warning), and the other daemon refuses
        the next request.
        """
        redis = await start_redis(self, password=REDIS_PASSWORD)
        mock = await start_mock(self)
        budget = redis_budget(
            redis,
            limit=1000,
            time_window=86400,
            limit_strategy="expression",
            cost_expr="prompt_tokens * 1e308 * 10",
        )
        routes = [route(mock, "huge", {}, budget)]
        daemons = [await start_gateway(self, routes), await start_gateway(self, routes)]
        response = await in_thread(call, daemons[0], "huge", ALICE_KEY)
        self.assertEqual(response.status, 200)
        await record_count(daemons[0], 1)
        await wait_until(lambda: spent(redis, "huge") >= 1000, 5, what="the charge")
        response = await in_thread(call, daemons[1], "huge", ALICE_KEY)
        self.assertEqual((response.status, response.json()), (503, RATE_LIMITED))
        self.assertEqual(quota(response, NAME)[:2], (1000, 0))
        for daemon in daemons:
            self.assertNotIn("tokens not charged", daemon.output)
            self.assertNotIn("Unhandled error", daemon.output)
        assert_secrets_kept(self, daemons, mock)


class RedisOutageTests(TestCase):
    """
    Redis unreachable, not answering, refusing the password, and back.
    """

    skip = redis_skip_reason()

    async def test_outage_and_recovery(self) -> None:
        """
        Redis killed: with C{allow_degradation: false} a request is refused
        with 503 JSON naming the cause (and C{budget_unavailable} in its
        record), with C{true} it is served and a warning is logged. Redis
        paused: the same within C{redis_timeout}. Redis started again on
        its port: the daemon reconnects and counting resumes from zero (the
        new server kept nothing). A wrong Redis password: 503, naming the
        refusal. No password is ever printed.
        """
        redis = await start_redis(self, password=REDIS_PASSWORD)
        mock = await start_mock(self)
        window = {"limit": 1000, "time_window": 86400, "redis_timeout": 300}
        wrong_password = "wrong-redis-Pw-0a9b8c7d6e"
        wrong = redis.conf(**window)
        wrong["redis_password"] = wrong_password
        daemon = await start_gateway(
            self,
            [
                route(mock, "strict", {}, redis_budget(redis, **window)),
                route(mock, "lenient", {}, redis_budget(redis, allow_degradation=True, **window)),
                route(mock, "wrong", {}, wrong),
            ],
        )
        count = 0

        async def send(route_id: str) -> Any:
            nonlocal count
            response = await in_thread(call, daemon, route_id, ALICE_KEY)
            count += 1
            await record_count(daemon, count)
            return response

        for route_id in ("strict", "lenient"):
            response = await send(route_id)
            self.assertEqual(response.status, 200)
            self.assertEqual(quota(response, NAME)[1], 1000)
        await charged(redis, "strict", COST)
        await charged(redis, "lenient", COST)

        response = await send("wrong")
        self.assertEqual(response.status, 503)
        message = response.json()["message"]
        self.assertTrue(message.startswith("rate limiting unavailable: "), message)
        self.assertIn(f"redis 127.0.0.1:{redis.port}", message)
        self.assertIn("WRONGPASS", message)
        self.assertNotIn(wrong_password, message)

        # Killed.
        await redis.kill()
        response = await send("strict")
        self.assertEqual(response.status, 503)
        self.assertEqual(response.headers["content-type"], "application/json")
        message = response.json()["message"]
        self.assertTrue(message.startswith("rate limiting unavailable: "), message)
        self.assertIn(f"redis 127.0.0.1:{redis.port}", message)
        self.assertEqual(daemon.access_records()[-1]["abort_reason"], "budget_unavailable")
        response = await send("lenient")
        self.assertEqual(response.status, 200)
        await daemon.wait_for_line("rate limiting degraded, request allowed")
        served_upstream = mock.stats()["requests"]

        # Back, empty: counting resumes.
        await redis.start()
        started = time.monotonic()

        async def strict_served() -> bool:
            nonlocal count
            response = await in_thread(call, daemon, "strict", ALICE_KEY)
            count += 1
            return response.status == 200

        while not await strict_served():
            self.assertLess(time.monotonic() - started, 10, "no reconnection to Redis")
        await record_count(daemon, count)
        await charged(redis, "strict", COST)
        response = await send("strict")
        self.assertEqual(response.status, 200)
        self.assertEqual(quota(response, NAME)[1], 1000 - COST)
        await charged(redis, "strict", 2 * COST)
        response = await send("lenient")
        self.assertEqual(quota(response, NAME)[1], 1000)
        await charged(redis, "lenient", COST)

        # Paused: no answer within redis_timeout.
        redis.pause()
        try:
            started = time.monotonic()
            response = await send("strict")
            elapsed = time.monotonic() - started
            self.assertEqual(response.status, 503)
            self.assertIn("300 ms", response.json()["message"])
            self.assertLess(elapsed, 3)
            response = await send("lenient")
            self.assertEqual(response.status, 200)
        finally:
            redis.resume()
        self.assertGreater(mock.stats()["requests"], served_upstream)
        assert_secrets_kept(self, [daemon], mock, wrong_password)

    async def test_charge_lost_while_down(self) -> None:
        """
        A stream admitted while Redis is up, ending while it is down: its
        charge fails with a warning (the stream itself is unharmed), and
        the daemon goes on once Redis is back.
        """
        redis = await start_redis(self, password=REDIS_PASSWORD)
        mock = await start_mock(self)
        budget = redis_budget(redis, limit=1000, time_window=86400, redis_timeout=300)
        daemon = await start_gateway(self, [route(mock, "slow", {}, budget)])
        stream = {"model": "gpt-e2e", "messages": [{"role": "user", "content": "hi"}]}
        pending = in_thread(
            call,
            daemon,
            "slow",
            ALICE_KEY,
            body={**stream, "stream": True},
            headers={"x-mock-events": "10", "x-mock-delay-ms": "100"},
        )
        await wait_until(lambda: mock.stats()["requests"] == 1, 5, what="the stream to start")
        await redis.kill()
        response = await pending
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        await daemon.wait_for_line("tokens not charged to redis")
        await redis.start()

        async def served() -> bool:
            return (await in_thread(call, daemon, "slow", ALICE_KEY)).status == 200

        started = time.monotonic()
        while not await served():
            self.assertLess(time.monotonic() - started, 10, "no reconnection to Redis")
        await charged(redis, "slow", COST)
        assert_secrets_kept(self, [daemon], mock)
        self.assertNotIn(ROUTE_API_KEY, daemon.output)
