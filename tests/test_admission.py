"""
Tests for L{aiproxy.exchange.admission} through the gateway: key-auth
refusals, the key kept from the upstream, budgets refused, charged and
reset, per-instance quotas, and counters read asynchronously.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from aiproxy.budget.store import StoreUnavailable
from aiproxy.budget.stores import CounterStores
from aiproxy.config import parse_config
from aiproxy.interfaces import ICounterStore
from aiproxy.routing.build import build_routes
from aiproxy.routing.routes import RouteTable
from tests.test_proxy import (
    API_KEY,
    CHAT,
    CHAT_STREAM,
    ENDPOINT,
    FakeUpstreamClient,
    Gateway,
    json_response,
    sse,
)

ALICE = "alice-key-0123456789"
BOB = "bob-key-0123456789ab"
ANSWER = {
    "id": "1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10},
}


def proxy(**conf: Any) -> dict[str, Any]:
    base = {
        "provider": "openai",
        "auth": {"header": {"Authorization": f"Bearer {API_KEY}"}},
        "override": {"endpoint": ENDPOINT},
    }
    base.update(conf)
    return base


def multi(**conf: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "instances": [
            {**proxy(), "name": "a", "priority": 1, "weight": 1},
            {**proxy(), "name": "b", "priority": 0, "weight": 1},
        ]
    }
    base.update(conf)
    return base


def make_gateway(
    testcase: SynchronousTestCase,
    plugins: dict[str, Any],
    consumers: list[dict[str, Any]] | None = None,
    stores: CounterStores | None = None,
    uri: str = "/v1/chat/completions",
) -> Gateway:
    """
    A L{Gateway} over one route with C{plugins} and C{consumers} (alice
    and bob by default), counting in C{stores} on the gateway's clock.
    """
    clock = Clock()
    if consumers is None:
        consumers = [
            {"username": "alice", "plugins": {"key-auth": {"key": ALICE}}},
            {"username": "bob", "plugins": {"key-auth": {"key": BOB}}},
        ]
    document = {"consumers": consumers, "routes": [{"id": "chat", "uri": uri, "plugins": plugins}]}
    config = parse_config(json.dumps(document), environ={})
    if stores is None:
        stores = CounterStores(clock)
    table: RouteTable = build_routes(config, MemoryReactorClock(), plugins={}, stores=stores)
    for route in table.routes:
        for instance in route.instances:
            instance.client = FakeUpstreamClient()  # type: ignore[assignment]
    gateway = Gateway(testcase, table)
    gateway.clock = gateway.resource.clock = clock
    return gateway


def answer(gateway: Gateway, document: dict[str, Any] = ANSWER, client: Any = None) -> None:
    body = json.dumps(document).encode()
    call = (client or gateway.client).last
    response = json_response(body, length=len(body))
    call.deferred.callback(response)
    response.data(body)
    response.end()


class KeyAuthTests(SynchronousTestCase):
    def test_missing_key(self) -> None:
        gateway = make_gateway(self, {"key-auth": {}, "ai-proxy": proxy()})
        gateway.send(CHAT)
        response = gateway.response()
        self.assertEqual(response.status, 401)
        self.assertEqual(response.json(), {"message": "Missing API key in request"})
        self.assertEqual(response.header("www-authenticate"), 'Key realm="aiproxy"')
        self.assertEqual(gateway.client.calls, [])
        self.assertEqual(
            (gateway.record["consumer"], gateway.record["abort_reason"]), (None, "missing_key")
        )

    def test_invalid_key(self) -> None:
        gateway = make_gateway(self, {"key-auth": {}, "ai-proxy": proxy()})
        gateway.send(CHAT, headers={b"x-api-key": b"nobody-0123456789abcdef"})
        response = gateway.response()
        self.assertEqual(response.status, 401)
        self.assertEqual(response.json(), {"message": "Invalid API key in request"})
        self.assertEqual(gateway.record["abort_reason"], "invalid_key")

    def test_refused_before_the_body(self) -> None:
        """
        A request without a key is refused whatever its body.
        """
        gateway = make_gateway(self, {"key-auth": {}, "ai-proxy": proxy()})
        gateway.send(b"not json")
        self.assertEqual(gateway.response().status, 401)

    def test_converted_route_answers_in_the_client_protocol(self) -> None:
        gateway = make_gateway(self, {"key-auth": {}, "ai-proxy": proxy()}, uri="/v1/messages")
        gateway.send(
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
            path=b"/v1/messages",
        )
        response = gateway.response()
        self.assertEqual(response.status, 401)
        self.assertEqual(
            response.json(),
            {
                "type": "error",
                "error": {"type": "authentication_error", "message": "Missing API key in request"},
            },
        )

    def test_key_never_forwarded(self) -> None:
        gateway = make_gateway(self, {"key-auth": {"hide_credentials": False}, "ai-proxy": proxy()})
        gateway.send(
            CHAT,
            path=b"/v1/chat/completions?apikey=" + ALICE.encode() + b"&keep=1",
            headers={
                b"apikey": ALICE.encode(),
                b"authorization": b"Bearer " + ALICE.encode(),
                b"x-api-key": ALICE.encode(),
            },
        )
        call = gateway.upstream
        sent = [value for _, values in call.headers.getAllRawHeaders() for value in values]
        self.assertFalse([value for value in sent if ALICE.encode() in value])
        self.assertEqual(
            call.headers.getRawHeaders(b"authorization"), [f"Bearer {API_KEY}".encode()]
        )
        self.assertNotIn(ALICE, call.url)
        answer(gateway)
        self.assertEqual(gateway.response().status, 200)
        self.assertEqual(gateway.record["consumer"], "alice")
        self.assertNotIn(ALICE, json.dumps(gateway.record))
        self.assertFalse([m for m in gateway.messages() if ALICE in m])

    def test_passthrough_query_kept(self) -> None:
        """
        On passthrough, where the client's query goes upstream, only the
        key's parameter is dropped.
        """
        gateway = make_gateway(
            self,
            {"key-auth": {}, "ai-proxy": proxy(override={"endpoint": "http://u.test"})},
            uri="/v1/*",
        )
        gateway.send({"anything": 1}, path=b"/v1/other?apikey=" + BOB.encode() + b"&keep=1")
        self.assertEqual(gateway.upstream.url, "http://u.test/v1/other?keep=1")


class BudgetTests(SynchronousTestCase):
    def route(self, **limiting: Any) -> dict[str, Any]:
        return {"key-auth": {}, "ai-rate-limiting": limiting, "ai-proxy": proxy()}

    def call(self, gateway: Gateway, key: str = ALICE) -> Any:
        gateway.connect()
        gateway.send(CHAT, headers={b"apikey": key.encode()})
        return gateway.response() if gateway.raw else None

    def test_refused_once_spent(self) -> None:
        gateway = make_gateway(self, self.route(limit=15, time_window=60))
        self.call(gateway)
        answer(gateway)
        first = gateway.response()
        self.assertEqual(first.header("x-ai-ratelimit-limit-ai-proxy-openai"), "15")
        self.assertEqual(first.header("x-ai-ratelimit-remaining-ai-proxy-openai"), "15")
        self.assertEqual(first.header("x-ai-ratelimit-reset-ai-proxy-openai"), "60")
        gateway.clock.advance(1)
        self.call(gateway, BOB)
        answer(gateway)
        self.assertEqual(gateway.response().header("x-ai-ratelimit-remaining-ai-proxy-openai"), "5")
        refused = self.call(gateway)
        self.assertEqual(refused.status, 503)
        self.assertEqual(refused.json(), {"error_msg": "rate limit exceeded"})
        self.assertEqual(len(gateway.client.calls), 2)
        self.assertEqual(gateway.access_records()[-1]["abort_reason"], "rate_limited")
        # The next window is a new budget.
        gateway.clock.advance(59)
        self.call(gateway)
        self.assertEqual(len(gateway.client.calls), 3)

    def test_rejected_code_and_message(self) -> None:
        gateway = make_gateway(
            self,
            self.route(
                limit=1,
                time_window=60,
                rejected_code=429,
                rejected_msg="over",
                show_limit_quota_header=False,
            ),
        )
        self.call(gateway)
        answer(gateway)
        self.assertIsNone(gateway.response().header("x-ai-ratelimit-limit-ai-proxy-openai"))
        refused = self.call(gateway)
        self.assertEqual((refused.status, refused.json()), (429, {"error_msg": "over"}))

    def test_rules_per_consumer(self) -> None:
        gateway = make_gateway(
            self,
            self.route(
                rules=[
                    {"count": 10, "time_window": 60, "key": "$consumer_name", "header_prefix": "me"}
                ]
            ),
        )
        self.call(gateway)
        answer(gateway)
        self.assertEqual(self.call(gateway).status, 503)
        self.call(gateway, BOB)
        self.assertEqual(gateway.response().status if gateway.raw else None, None)
        answer(gateway)
        self.assertEqual(gateway.response().header("x-ai-ratelimit-remaining-me"), "10")

    def test_consumer_budget(self) -> None:
        consumers = [
            {
                "username": "alice",
                "plugins": {
                    "key-auth": {"key": ALICE},
                    "ai-rate-limiting": {
                        "limit": 4,
                        "time_window": 60,
                        "limit_strategy": "completion_tokens",
                    },
                },
            },
            {"username": "bob", "plugins": {"key-auth": {"key": BOB}}},
        ]
        gateway = make_gateway(self, {"key-auth": {}, "ai-proxy": proxy()}, consumers)
        self.call(gateway)
        answer(gateway)
        self.assertEqual(gateway.response().header("x-ai-ratelimit-limit-consumer"), "4")
        self.assertEqual(self.call(gateway).status, 503)
        self.call(gateway, BOB)
        self.assertEqual(len(gateway.client.calls), 2)

    def test_charged_on_a_cut_stream(self) -> None:
        gateway = make_gateway(self, self.route(limit=10, time_window=60))
        gateway.connect()
        gateway.send(CHAT_STREAM, headers={b"apikey": ALICE.encode()})
        from tests.test_proxy import stream_response

        response = gateway.answer(stream_response())
        response.data(
            sse({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": ANSWER["usage"]})
        )
        gateway.disconnect()
        self.assertEqual(gateway.record["total_tokens"], 10)
        self.assertEqual(self.call(gateway).status, 503)


class InstanceQuotaTests(SynchronousTestCase):
    def gateway(self, **conf: Any) -> Gateway:
        limiting = {"instances": [{"name": "a", "limit": 10, "time_window": 60}]}
        return make_gateway(self, {"ai-rate-limiting": limiting, "ai-proxy-multi": multi(**conf)})

    def clients(self, gateway: Gateway) -> tuple[FakeUpstreamClient, FakeUpstreamClient]:
        a, b = gateway.table.routes[0].instances
        return a.client, b.client  # type: ignore[return-value]

    def test_spent_instance_skipped(self) -> None:
        gateway = self.gateway()
        a, b = self.clients(gateway)
        gateway.send(CHAT)
        answer(gateway, client=a)
        self.assertEqual(gateway.response().header("x-ai-ratelimit-remaining-a"), "10")
        gateway.connect()
        gateway.send(CHAT)
        self.assertEqual((len(a.calls), len(b.calls)), (1, 1))
        answer(gateway, client=b)
        self.assertIsNone(gateway.response().header("x-ai-ratelimit-remaining-a"))

    def test_refused_without_rate_limiting_fallback(self) -> None:
        gateway = self.gateway(fallback_strategy=["http_5xx"])
        a, b = self.clients(gateway)
        gateway.send(CHAT)
        answer(gateway, client=a)
        gateway.connect()
        gateway.send(CHAT)
        self.assertEqual(gateway.response().status, 503)
        self.assertEqual(gateway.response().header("x-ai-ratelimit-remaining-a"), "0")
        self.assertEqual((len(a.calls), len(b.calls)), (1, 0))

    def test_every_instance_spent(self) -> None:
        limiting = {"limit": 10, "time_window": 60}
        gateway = make_gateway(self, {"ai-rate-limiting": limiting, "ai-proxy-multi": multi()})
        a, b = self.clients(gateway)
        gateway.send(CHAT)
        answer(gateway, client=a)
        gateway.connect()
        gateway.send(CHAT)
        self.assertEqual(gateway.response().status, 503)
        self.assertEqual((len(a.calls), len(b.calls)), (1, 0))


@implementer(ICounterStore)
class PendingStore:
    """
    A store whose reads the test answers.
    """

    description = "pending"

    def __init__(self) -> None:
        self.reads: list[Deferred[list[int]]] = []
        self.charges: list[Any] = []
        self.fail_with: str | None = None

    def spent(self, keys: Any) -> Deferred[list[int]]:
        if self.fail_with is not None:
            return fail(StoreUnavailable(self.fail_with))
        d: Deferred[list[int]] = Deferred()
        self.reads.append(d)
        return d

    def charge(self, charges: Any) -> Deferred[None]:
        self.charges.append(list(charges))
        if self.fail_with is not None:
            return fail(StoreUnavailable(self.fail_with))
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    def close(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


class SharedStoreTests(SynchronousTestCase):
    def gateway(self, store: PendingStore, **limiting: Any) -> Gateway:
        clock = Clock()
        stores = CounterStores(clock)
        stores.store = lambda conf: store  # type: ignore[method-assign]
        conf = {"limit": 10, "time_window": 60, "policy": "redis", "redis_host": "r.test"}
        conf.update(limiting)
        return make_gateway(self, {"ai-rate-limiting": conf, "ai-proxy": proxy()}, stores=stores)

    def test_waits_for_the_counters(self) -> None:
        store = PendingStore()
        gateway = self.gateway(store)
        gateway.send(CHAT)
        self.assertEqual(gateway.client.calls, [])
        store.reads[0].callback([3])
        answer(gateway)
        self.assertEqual(gateway.response().header("x-ai-ratelimit-remaining-ai-proxy-openai"), "7")
        [[(key, amount, ttl)]] = store.charges
        self.assertEqual((key, amount, ttl), ("aiproxy:rl:route:chat:#global::0", 10, 60))

    def test_spent_refused(self) -> None:
        store = PendingStore()
        gateway = self.gateway(store)
        gateway.send(CHAT)
        store.reads[0].callback([10])
        self.assertEqual(gateway.response().status, 503)
        self.assertEqual(gateway.client.calls, [])

    def test_client_left_while_reading(self) -> None:
        store = PendingStore()
        gateway = self.gateway(store)
        gateway.send(CHAT)
        gateway.disconnect()
        store.reads[0].callback([0])
        self.assertEqual(gateway.client.calls, [])
        self.assertEqual(gateway.record["status"], 499)

    def test_unavailable(self) -> None:
        store = PendingStore()
        store.fail_with = "redis r.test:6379 unreachable: Connection refused"
        gateway = self.gateway(store)
        gateway.send(CHAT)
        response = gateway.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(
            response.json(),
            {
                "message": "rate limiting unavailable: redis r.test:6379 unreachable: Connection refused"
            },
        )
        self.assertEqual(gateway.record["abort_reason"], "budget_unavailable")

    def test_degraded(self) -> None:
        store = PendingStore()
        store.fail_with = "redis r.test:6379 unreachable: Connection refused"
        gateway = self.gateway(store, allow_degradation=True)
        gateway.send(CHAT)
        answer(gateway)
        self.assertEqual(gateway.response().status, 200)
        self.assertTrue(
            [
                m
                for m in gateway.messages()
                if m.startswith("rate limiting degraded, request allowed: redis r.test")
            ]
        )
        self.assertTrue(
            [m for m in gateway.messages() if m.startswith("tokens not charged to pending")]
        )
