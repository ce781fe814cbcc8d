# -*- test-case-name: tests.test_multi -*-
"""
Tests for C{ai-proxy-multi} routes, without sockets: how they are built,
which instance each attempt goes to, when a failed attempt falls back to
another instance, and C{stream_commit_ms}.

They drive a real L{aiproxy.server.GatewayRequest} with the fake upstream
clients and the L{Clock} of L{tests.test_proxy}.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from aiproxy.config import ConfigError
from aiproxy.lifecycle import ExchangeMonitor
from aiproxy.metrics import Metrics
from aiproxy.routing.routes import FallbackPolicy, RouteTable
from aiproxy.server import GatewayResource, GatewaySite
from aiproxy.stream.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    PASSTHROUGH,
    STREAM_CONTENT,
    STREAM_ERROR,
    stream_signal,
)
from aiproxy.stream.sse import SSEEvent
from tests.test_proxy import (
    CHAT,
    CHAT_STREAM,
    DONE,
    USAGE,
    FakeResponse,
    FakeUpstreamClient,
    Gateway,
    ScriptedFilter,
    UpstreamCall,
    delta,
    json_response,
    make_table,
    sse,
    stream_response,
    with_body_filters,
)

#: A chat chunk with only the role: not content.
ROLE = sse({"model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
#: An OpenAI-shaped error reported inside a stream.
IN_BAND_ERROR = sse({"error": {"message": "overloaded", "type": "server_error"}})


def instance(name: str, **fields: Any) -> dict[str, Any]:
    """
    An instance on C{http://<name>.test}, with its own key and model.
    """
    return {
        "name": name,
        "provider": "openai",
        "weight": 1,
        "auth": {"header": {"Authorization": f"Bearer key-{name}"}},
        "options": {"model": f"model-{name}"},
        "override": {"endpoint": f"http://{name}.test/v1/chat/completions"},
        **fields,
    }


def multi_route(instances: Sequence[dict[str, Any]], **plugin: Any) -> dict[str, Any]:
    return {
        "id": "chat",
        "uri": "/v1/chat/completions",
        "plugins": {"ai-proxy-multi": {"instances": list(instances), **plugin}},
    }


def multi_table(names: Sequence[str | dict[str, Any]] = ("a", "b"), **plugin: Any) -> RouteTable:
    """
    A table with one C{ai-proxy-multi} route over C{names} (instance names,
    or whole instance documents), its clients fake.
    """
    instances = [instance(n) if isinstance(n, str) else n for n in names]
    return make_table(routes=[multi_route(instances, **plugin)])


class MultiGateway(Gateway):
    """
    A L{Gateway} that tells the instances' upstream calls apart.
    """

    def client_of(self, name: str) -> FakeUpstreamClient:
        for instance in self.table.routes[0].instances:
            if instance.name == name:
                return instance.client  # type: ignore[return-value]
        raise KeyError(name)

    def calls(self) -> list[tuple[str, UpstreamCall]]:
        """
        Every upstream call, in order, with the instance it went to.
        """
        calls = [
            (instance.name, call)
            for instance in self.table.routes[0].instances
            for call in instance.client.calls  # type: ignore[attr-defined]
        ]
        return sorted(calls, key=lambda item: item[1].number)  # type: ignore[attr-defined]

    def names(self) -> list[str]:
        return [name for name, _ in self.calls()]

    @property
    def current(self) -> UpstreamCall:
        return self.calls()[-1][1]

    def fail(self, status: int, body: bytes = b'{"error": "nope"}') -> FakeResponse:
        """
        The current attempt's upstream answers C{status} with C{body}; if
        the exchange reads the body, it gets it whole.
        """
        response = json_response(body, status, length=len(body))
        self.current.deferred.callback(response)
        if response.protocol is not None and not response.transport.stopped:
            response.data(body)
            response.end()
        return response

    def ok(self, body: bytes = b'{"ok": true}') -> FakeResponse:
        return self.fail(200, body)

    def stream_answer(self) -> FakeResponse:
        return self.answer_current(stream_response())

    def answer_current(self, response: FakeResponse) -> FakeResponse:
        self.current.deferred.callback(response)
        return response

    def warnings(self) -> list[str]:
        return [m for m in self.messages() if m.startswith("ai instance")]


#: Numbers the upstream calls of every fake client in the order they are made.
_NUMBERS = itertools.count()


class _NumberingClient(FakeUpstreamClient):
    """
    A fake upstream client whose calls carry a number, in the order they
    were made across all clients.
    """

    def request(self, *args: Any, **kw: Any) -> Any:
        d = super().request(*args, **kw)
        self.last.number = next(_NUMBERS)  # type: ignore[attr-defined]
        return d


def gateway_for(testcase: SynchronousTestCase, table: RouteTable) -> MultiGateway:
    for route in table.routes:
        for item in route.instances:
            item.client = _NumberingClient()  # type: ignore[assignment]
    return MultiGateway(testcase, table)


# ==============================================================================


class BuildTests(SynchronousTestCase):
    """
    A multi route's instances, from config.
    """

    def test_instances(self) -> None:
        """
        Each instance has its own target (its fields over the plugin's
        shared ones) and its own upstream client; the route keeps its order
        and reports no single instance name.
        """
        table = multi_table([instance("a"), instance("b", priority=3, weight=5)], timeout=1234)
        route = table.routes[0]
        a, b = route.instances
        self.assertEqual((a.name, b.name), ("a", "b"))
        self.assertEqual((b.weight, b.priority, a.priority), (5, 3, 0))
        self.assertEqual(a.target.conf["timeout"], 1234)
        self.assertEqual(b.target.conf["auth"], {"header": {"Authorization": "Bearer key-b"}})
        self.assertEqual(b.target.conf["options"], {"model": "model-b"})
        self.assertNotIn("instances", a.target.conf)
        self.assertIsNot(a.client, b.client)
        self.assertIsNone(route.instance_name)

    def test_real_clients(self) -> None:
        """
        Without the test's fakes, every instance gets its own upstream pool
        with the plugin's keep-alive settings.
        """
        from twisted.internet.testing import MemoryReactorClock

        from aiproxy.config import PROXY_PLUGINS, parse_config
        from aiproxy.routing.build import build_routes
        from aiproxy.schema import load_schema

        document = {"routes": [multi_route([instance("a"), instance("b")], keepalive_pool=7)]}
        schemas = {name: load_schema(name) for name in PROXY_PLUGINS}
        config = parse_config(json.dumps(document), environ={}, plugin_schemas=schemas)
        a, b = build_routes(config, MemoryReactorClock(), plugins={}).routes[0].instances
        self.assertIsNot(a.client.pool, b.client.pool)
        self.assertEqual(a.client.pool.maxPersistentPerHost, 7)

    def problems(self, *instances: dict[str, Any], **plugin: Any) -> list[str]:
        return self.assertRaises(ConfigError, multi_table, list(instances), **plugin).problems

    def test_provider_rules(self) -> None:
        """
        Every provider rule of C{ai-proxy} applies to each instance, at the
        instance's path; all problems are reported at once.
        """
        self.assertEqual(
            self.problems(
                instance("a"),
                instance("b", provider="bedrock"),
                {
                    "name": "c",
                    "provider": "openai-compatible",
                    "weight": 1,
                    "auth": {"header": {"X-Key": "caf\u00e9\u2603"}},
                },
            ),
            [
                "routes[0].plugins.ai-proxy-multi.instances[1].provider_conf.region: "
                "required for provider 'bedrock'",
                "routes[0].plugins.ai-proxy-multi.instances[1].auth.aws: "
                "required for provider 'bedrock'",
                "routes[0].plugins.ai-proxy-multi.instances[2].override.endpoint: "
                "required for provider 'openai-compatible'",
                "routes[0].plugins.ai-proxy-multi.instances[2].auth.header.X-Key: "
                "a header value must be ISO-8859-1 text",
            ],
        )

    def test_chash_key(self) -> None:
        """
        C{chash} needs a C{key} it can use (except with C{hash_on:
        consumer}).
        """
        [problem] = self.problems(instance("a"), instance("b"), balancer={"algorithm": "chash"})
        self.assertEqual(
            problem,
            "routes[0].plugins.ai-proxy-multi.balancer.key: "
            "required when balancer.algorithm is chash and hash_on is vars",
        )
        [problem] = self.problems(
            instance("a"), balancer={"algorithm": "chash", "hash_on": "vars", "key": "nope"}
        )
        self.assertIn("unsupported variable 'nope'", problem)
        multi_table(balancer={"algorithm": "chash", "hash_on": "consumer"})

    def test_ssl_ca_file(self) -> None:
        """
        A shared C{ssl_ca_file} that cannot be read is one problem, at the
        plugin's field, not one per instance.
        """
        [problem] = self.problems(instance("a"), instance("b"), ssl_ca_file="/nonexistent.pem")
        self.assertTrue(
            problem.startswith("routes[0].plugins.ai-proxy-multi.ssl_ca_file: "), problem
        )

    def test_fallback_policy(self) -> None:
        """
        C{fallback_strategy}: C{http_429}/C{http_5xx} retry those statuses;
        C{instance_health_and_rate_limiting} and C{rate_limiting} retry none
        (no rate-limiting plugin to consult); C{fallback_http_statuses} add
        statuses of their own.
        """
        cases = {
            "instance_health_and_rate_limiting": (False, False),
            "http_429": (True, False),
            "http_5xx": (False, True),
            ("rate_limiting",): (False, False),
            ("rate_limiting", "http_429", "http_5xx"): (True, True),
        }
        for strategy, (on_429, on_5xx) in cases.items():
            conf = {
                "fallback_strategy": list(strategy) if isinstance(strategy, tuple) else strategy
            }
            policy = FallbackPolicy.from_conf(conf)
            self.assertEqual((policy.allows(429), policy.allows(503)), (on_429, on_5xx), strategy)
            self.assertFalse(policy.allows(400))
        policy = FallbackPolicy.from_conf({"fallback_http_statuses": [400, 408]})
        self.assertEqual([s for s in (400, 408, 429, 500) if policy.allows(s)], [400, 408])


class SelectionTests(SynchronousTestCase):
    """
    Which instance a request goes to first.
    """

    def first_picks(self, table: RouteTable, count: int, **kw: Any) -> list[str]:
        gateway = gateway_for(self, table)
        for _ in range(count):
            gateway.connect()
            gateway.send(CHAT, **kw)
            gateway.ok()
        return gateway.names()

    def test_weighted_round_robin(self) -> None:
        """
        Smooth weighted round robin across requests: weights 2 and 1 give
        C{a b a}, again and again.
        """
        table = multi_table([instance("a", weight=2), instance("b", weight=1)])
        self.assertEqual(self.first_picks(table, 6), list("abaaba"))

    def test_priority(self) -> None:
        """
        The higher priority level takes every request while it works.
        """
        table = multi_table([instance("low", priority=0), instance("high", priority=1)])
        self.assertEqual(self.first_picks(table, 3), ["high"] * 3)

    def test_weight_zero(self) -> None:
        """
        An instance of weight 0 gets no request beside one of positive
        weight.
        """
        table = multi_table([instance("a"), instance("z", weight=0)])
        self.assertEqual(self.first_picks(table, 3), ["a"] * 3)

    def test_chash_header(self) -> None:
        """
        C{chash} on a header: the same header value always goes to the same
        instance.
        """
        table = multi_table(
            ["a", "b", "c"], balancer={"algorithm": "chash", "hash_on": "header", "key": "x-user"}
        )
        for user in (b"alice", b"bob", b"carol"):
            picks = self.first_picks(table, 4, headers={b"x-user": user})
            self.assertEqual(len(set(picks[-4:])), 1, picks)

    def test_protocol(self) -> None:
        """
        An instance that cannot serve the request's protocol (as it is, or
        converted) is not picked.
        """
        claude = instance("claude", provider="anthropic", options={})
        claude["override"] = {"endpoint": "http://claude.test"}
        route = multi_route([instance("a"), claude])
        route["uri"] = "/v1/*"
        gateway = gateway_for(self, make_table(routes=[route]))
        for _ in range(2):
            gateway.connect()
            gateway.send({"model": "r", "input": "hi"}, path=b"/v1/responses")
            gateway.ok()
        gateway.connect()
        gateway.send({"model": "e", "input": "x"}, path=b"/v1/embeddings")
        gateway.ok()
        self.assertEqual(gateway.names(), ["a", "a", "a"])

    def test_not_served(self) -> None:
        """
        A protocol no instance serves (as it is, or converted) is refused
        with 400 before any upstream call, as the first instance says; the
        record names no instance.
        """
        route = multi_route([instance("a", provider="deepseek"), instance("b", provider="aimlapi")])
        route["uri"] = "/v1/*"
        gateway = gateway_for(self, make_table(routes=[route]))
        gateway.send({"input": "x"}, path=b"/v1/embeddings")
        self.assertEqual(gateway.names(), [])
        response = gateway.response()
        self.assertEqual(response.status, 400)
        self.assertEqual(
            response.json()["message"],
            "provider deepseek does not support openai-embeddings protocol "
            "(supported: openai-chat)",
        )
        self.assertEqual(gateway.record["instance"], None)
        self.assertEqual(gateway.record["attempts"], [])

    def test_unhealthy_skipped(self) -> None:
        """
        An instance its health check marked unhealthy gets no request, and
        is not a fallback either; when every instance is unhealthy, all are
        used.
        """
        table = multi_table(["a", "b"], fallback_strategy="http_5xx")
        a, b = table.routes[0].instances
        a.checker = type("Checker", (), {"healthy": False})()  # type: ignore[assignment]
        gateway = gateway_for(self, table)
        gateway.send(CHAT)
        gateway.fail(500)
        self.assertEqual(gateway.names(), ["b"])
        self.assertEqual(gateway.response().status, 502)
        b.checker = type("Checker", (), {"healthy": False})()  # type: ignore[assignment]
        gateway.connect()
        gateway.send(CHAT)
        gateway.ok()
        self.assertEqual(gateway.names(), ["b", "a"])


class FallbackTests(SynchronousTestCase):
    """
    When a failed attempt is tried again on another instance.
    """

    def test_5xx_falls_back(self) -> None:
        """
        With C{http_5xx}, a 500 from the first instance sends a fresh
        request to the second (its own URL, key and model; the same
        messages); the client gets the second's answer; the failed
        attempt's connection is closed, not pooled; a warning names both
        instances; the record names the answering instance and lists both
        attempts.
        """
        gateway = gateway_for(self, multi_table(fallback_strategy="http_5xx"))
        gateway.send(CHAT, headers={b"x-trace": b"t1"})
        first = gateway.current
        gateway.clock.advance(0.05)
        failed = gateway.fail(500)
        self.assertTrue(failed.transport.stopped)
        gateway.clock.advance(0.1)
        gateway.ok(b'{"answer": 2}')
        [(_, a), (_, b)] = gateway.calls()
        self.assertEqual(
            (a.url, b.url),
            ("http://a.test/v1/chat/completions", "http://b.test/v1/chat/completions"),
        )
        self.assertEqual(b.headers.getRawHeaders(b"authorization"), [b"Bearer key-b"])
        self.assertEqual(b.headers.getRawHeaders(b"x-trace"), [b"t1"])
        self.assertEqual(json.loads(a.body)["model"], "model-a")
        self.assertEqual(json.loads(b.body), {**CHAT, "model": "model-b"})
        self.assertIs(a, first)
        response = gateway.response()
        self.assertEqual((response.status, response.body), (200, b'{"answer": 2}'))
        self.assertEqual(
            gateway.warnings(), ["ai instance a returned status 500, falling back to b"]
        )
        record = gateway.record
        self.assertEqual(
            (record["instance"], record["status"], record["abort_reason"]), ("b", 200, None)
        )
        self.assertEqual(record["llm_model"], "model-b")
        self.assertEqual(
            record["attempts"],
            [
                {"instance": "a", "status": 500, "duration_ms": 50},
                {"instance": "b", "status": 200, "duration_ms": 100},
            ],
        )

    def test_default_strategy_no_retry(self) -> None:
        """
        The default C{instance_health_and_rate_limiting} retries on no
        status: the 500 reaches the client as it is.
        """
        gateway = gateway_for(self, multi_table())
        gateway.send(CHAT)
        gateway.fail(500, b"broken")
        self.assertEqual(gateway.names(), ["a"])
        response = gateway.response()
        self.assertEqual((response.status, response.body), (500, b"broken"))
        self.assertEqual(gateway.warnings(), [])

    def test_429(self) -> None:
        """
        C{http_429} retries a 429 but not a 5xx.
        """
        gateway = gateway_for(self, multi_table(fallback_strategy="http_429"))
        gateway.send(CHAT)
        gateway.fail(429)
        gateway.ok()
        self.assertEqual(gateway.names(), ["a", "b"])
        gateway.connect()
        gateway.send(CHAT)
        gateway.fail(503, b"down")
        # The fallback was b's turn of the round robin too (as nginx counts).
        self.assertEqual(gateway.names(), ["a", "b", "b"])
        self.assertEqual(gateway.response().status, 503)

    def test_list_strategy(self) -> None:
        """
        The list form combines reasons; C{rate_limiting} alone retries
        nothing.
        """
        gateway = gateway_for(self, multi_table(fallback_strategy=["rate_limiting"]))
        gateway.send(CHAT)
        gateway.fail(429)
        self.assertEqual(gateway.response().status, 429)
        gateway = gateway_for(
            self, multi_table(["a", "b", "c"], fallback_strategy=["http_429", "http_5xx"])
        )
        gateway.send(CHAT)
        gateway.fail(429)
        gateway.fail(502)
        gateway.ok()
        self.assertEqual(gateway.names(), ["a", "b", "c"])
        self.assertEqual(gateway.response().status, 200)

    def test_4xx_not_retried(self) -> None:
        """
        A 4xx other than 429 is never retried by a strategy.
        """
        gateway = gateway_for(self, multi_table(fallback_strategy=["http_429", "http_5xx"]))
        gateway.send(CHAT)
        gateway.fail(400, b"bad")
        self.assertEqual(gateway.names(), ["a"])
        self.assertEqual(gateway.response().status, 400)

    def test_fallback_http_statuses(self) -> None:
        """
        C{fallback_http_statuses} makes more statuses fall back, whatever
        the strategy.
        """
        gateway = gateway_for(self, multi_table(fallback_http_statuses=[400, 404]))
        gateway.send(CHAT)
        gateway.fail(404)
        gateway.ok()
        self.assertEqual(gateway.names(), ["a", "b"])
        self.assertEqual(gateway.response().status, 200)

    def test_max_retries(self) -> None:
        """
        C{max_retries} caps the fallbacks: with 1 and three failing
        instances, the second failure reaches the client as it is (APISIX:
        "500, not 502").
        """
        gateway = gateway_for(
            self, multi_table(["a", "b", "c"], fallback_strategy="http_5xx", max_retries=1)
        )
        gateway.send(CHAT)
        gateway.fail(500, b"first")
        gateway.fail(503, b"second")
        self.assertEqual(gateway.names(), ["a", "b"])
        response = gateway.response()
        self.assertEqual((response.status, response.body), (503, b"second"))
        self.assertIn("reached max_retries 1, not retrying", gateway.messages())

    def test_max_retries_zero(self) -> None:
        """
        C{max_retries: 0} never falls back.
        """
        gateway = gateway_for(self, multi_table(fallback_strategy="http_5xx", max_retries=0))
        gateway.send(CHAT)
        gateway.fail(500)
        self.assertEqual(gateway.names(), ["a"])
        self.assertEqual(gateway.response().status, 500)

    def test_retry_on_failure_within_ms(self) -> None:
        """
        An attempt that failed later than C{retry_on_failure_within_ms} is
        not retried; one that failed in time is.
        """
        table = multi_table(fallback_strategy="http_5xx", retry_on_failure_within_ms=100)
        gateway = gateway_for(self, table)
        gateway.send(CHAT)
        gateway.clock.advance(0.101)
        gateway.fail(500, b"slow")
        self.assertEqual(gateway.names(), ["a"])
        self.assertEqual(gateway.response().body, b"slow")
        self.assertIn(
            "ai instance a failed after 101ms, exceeding retry_on_failure_within_ms 100, not retrying",
            gateway.messages(),
        )
        gateway.connect()
        gateway.send(CHAT)
        gateway.clock.advance(0.1)
        gateway.fail(500, b"fast")
        self.assertEqual(gateway.names(), ["a", "b", "a"])

    def test_single_instance_never_retries(self) -> None:
        """
        A route with one instance returns its failure as it is, whatever
        the strategy.
        """
        gateway = gateway_for(
            self, multi_table(["a"], fallback_strategy="http_5xx", fallback_http_statuses=[500])
        )
        gateway.send(CHAT)
        gateway.fail(500, b"only")
        response = gateway.response()
        self.assertEqual((response.status, response.body), (500, b"only"))
        self.assertEqual(gateway.record["instance"], "a")
        self.assertEqual(len(gateway.record["attempts"]), 1)

    def test_all_fail(self) -> None:
        """
        When every instance failed, the client gets 502 with the last
        upstream error body (and its content type).
        """
        gateway = gateway_for(self, multi_table(fallback_strategy="http_5xx"))
        gateway.send(CHAT)
        gateway.fail(500, b'{"error": "a down"}')
        gateway.fail(503, b'{"error": "b down"}')
        response = gateway.response()
        self.assertEqual((response.status, response.body), (502, b'{"error": "b down"}'))
        self.assertEqual(response.header("content-type"), "application/json")
        record = gateway.record
        self.assertEqual(record["status"], 502)
        self.assertEqual([a["status"] for a in record["attempts"]], [500, 503])
        self.assertEqual(record["instance"], "b")

    def test_transport_failures(self) -> None:
        """
        A refused connection counts as a 5xx (502) and a timeout as a 504:
        both fall back with C{http_5xx}; their attempts have no status.
        When every instance failed so, 502 with the last message.
        """
        gateway = gateway_for(self, multi_table(["a", "b", "c"], fallback_strategy="http_5xx"))
        gateway.send(CHAT)
        gateway.current.deferred.errback(Failure(ConnectionRefusedError("a.test")))
        gateway.current.deferred.errback(Failure(CancelledError()))
        gateway.current.deferred.errback(Failure(ConnectionRefusedError("c.test")))
        self.assertEqual(gateway.names(), ["a", "b", "c"])
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertIn("failed to connect to upstream", response.json()["message"])
        self.assertEqual([a["status"] for a in gateway.record["attempts"]], [None, None, None])
        self.assertEqual(
            gateway.warnings()[:2],
            [
                "ai instance a returned status 502, falling back to b",
                "ai instance b returned status 504, falling back to c",
            ],
        )

    def test_read_timeout_before_output(self) -> None:
        """
        A body that stops coming before anything reached the client falls
        back; the given-up transfer is stopped.
        """
        gateway = gateway_for(self, multi_table(fallback_strategy="http_5xx", timeout=1000))
        gateway.send(CHAT)
        slow = gateway.answer_current(json_response(b"", 200, length=100))
        slow.data(b'{"par')
        gateway.clock.advance(1.0)
        self.assertTrue(slow.transport.stopped)
        gateway.ok()
        self.assertEqual(gateway.names(), ["a", "b"])
        self.assertEqual(gateway.response().status, 200)

    def test_empty_stream_before_output(self) -> None:
        """
        A stream that ends without a byte sent nothing to the client: it
        falls back too.
        """
        gateway = gateway_for(self, multi_table(fallback_strategy="http_5xx"))
        gateway.send(CHAT_STREAM)
        empty = gateway.stream_answer()
        empty.end()
        upstream = gateway.stream_answer()
        upstream.data(delta("hi"), DONE)
        upstream.end()
        self.assertEqual(gateway.names(), ["a", "b"])
        self.assertEqual(gateway.response().status, 200)
        self.assertEqual(gateway.record["attempts"][0]["status"], 200)

    def test_no_retry_after_output(self) -> None:
        """
        Once bytes reached the client nothing is retried: a stream cut
        after output ends with an error event.
        """
        gateway = gateway_for(self, multi_table(fallback_strategy="http_5xx"))
        gateway.send(CHAT_STREAM)
        upstream = gateway.stream_answer()
        upstream.data(delta("Hel"))
        upstream.end(ResponseFailed([Failure(ConnectionRefusedError())]))
        self.assertEqual(gateway.names(), ["a"])
        self.assertEqual(gateway.response().status, 200)
        self.assertIn(b'"error"', gateway.response().body)
        self.assertEqual(gateway.record["abort_reason"], "upstream_error")

    def test_client_leaves(self) -> None:
        """
        A client that leaves during an attempt cancels it and no other
        starts.
        """
        gateway = gateway_for(self, multi_table(fallback_strategy="http_5xx"))
        gateway.send(CHAT)
        call = gateway.current
        gateway.disconnect()
        self.assertTrue(call.cancelled)
        self.assertEqual(gateway.names(), ["a"])
        self.assertEqual(gateway.record["status"], 499)
        self.assertEqual(gateway.record["attempts"], [
            {"instance": "a", "status": None, "duration_ms": 0}])  # fmt: skip

    def test_client_leaves_between(self) -> None:
        """
        A client that leaves during the second attempt cancels that one.
        """
        gateway = gateway_for(self, multi_table(fallback_strategy="http_5xx"))
        gateway.send(CHAT)
        gateway.fail(500)
        second = gateway.current
        gateway.disconnect()
        self.assertTrue(second.cancelled)
        self.assertEqual(gateway.names(), ["a", "b"])
        self.assertEqual(gateway.record["abort_reason"], "client_disconnect")

    def test_priority_fallback(self) -> None:
        """
        A lower priority level is tried once every instance above failed.
        """
        table = multi_table(
            [instance("h1", priority=2), instance("h2", priority=2), instance("low")],
            fallback_strategy="http_5xx",
        )
        gateway = gateway_for(self, table)
        gateway.send(CHAT)
        gateway.fail(500)
        gateway.fail(500)
        gateway.ok()
        self.assertEqual(gateway.names(), ["h1", "h2", "low"])

    def test_filters_see_one_response(self) -> None:
        """
        Body filters see the answering attempt only, once.
        """
        table = with_body_filters(multi_table(fallback_strategy="http_5xx"), ScriptedFilter())
        gateway = gateway_for(self, table)
        [factory] = table.routes[0].body_filters
        seen = factory.filters[0]  # type: ignore[attr-defined]
        gateway.send(CHAT)
        gateway.fail(500)
        gateway.ok(b'{"ok": 2}')
        self.assertEqual([s["chunk"] for s in seen.seen], [b'{"ok": 2}'])
        self.assertEqual(len(seen.finished), 1)

    def test_metrics(self) -> None:
        """
        The requests counter names the answering instance; the attempts
        counter has one sample per attempt.
        """
        metrics = Metrics()
        table = multi_table(fallback_strategy="http_5xx")
        gateway = gateway_for(self, table)
        monitor = ExchangeMonitor(gateway.clock, metrics)
        gateway.resource = GatewayResource(table, gateway.clock, monitor)
        gateway.site = GatewaySite(gateway.resource, reactor=gateway.site_reactor)
        gateway.connect()
        gateway.send(CHAT)
        gateway.fail(500)
        gateway.ok()
        registry = metrics.registry
        self.assertEqual(
            registry.get_sample_value(
                "aiproxy_requests_total",
                {"route": "chat", "instance": "b", "status": "200", "request_type": "ai_chat"},
            ),
            1,
        )
        for name, status in (("a", "500"), ("b", "200")):
            self.assertEqual(
                registry.get_sample_value(
                    "aiproxy_upstream_attempts_total",
                    {"route": "chat", "instance": name, "status": status},
                ),
                1,
            )


class StreamCommitTests(SynchronousTestCase):
    """
    C{stream_commit_ms}: a stream is held until its first content, so that
    a failure before it can still fall back.
    """

    def gateway(self, **plugin: Any) -> MultiGateway:
        plugin.setdefault("fallback_strategy", "http_5xx")
        plugin.setdefault("stream_commit_ms", 500)
        plugin.setdefault("streaming_flush_interval_ms", 0)
        gateway = gateway_for(self, multi_table(**plugin))
        gateway.send(CHAT_STREAM)
        return gateway

    def test_hold_until_content(self) -> None:
        """
        A role-only chunk is held; the first content releases everything
        held, in order, and the stream goes on as usual.
        """
        gateway = self.gateway()
        upstream = gateway.stream_answer()
        upstream.data(ROLE)
        self.assertEqual(gateway.raw, b"")
        upstream.data(delta("Hi"))
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.chunks, [ROLE, delta("Hi")])
        upstream.data(USAGE, DONE)
        upstream.end()
        response = gateway.response()
        self.assertTrue(response.complete)
        self.assertEqual(response.body, ROLE + delta("Hi") + USAGE + DONE)
        self.assertEqual(gateway.record["completion_tokens"], 3)
        self.assertEqual(gateway.names(), ["a"])

    def test_in_band_error_falls_back(self) -> None:
        """
        An error event before content counts as a 5xx: the held bytes are
        dropped, the connection closed, and the second instance answers.
        """
        gateway = self.gateway()
        first = gateway.stream_answer()
        first.data(ROLE, IN_BAND_ERROR)
        self.assertTrue(first.transport.stopped)
        second = gateway.stream_answer()
        second.data(ROLE, delta("ok"), DONE)
        second.end()
        response = gateway.response()
        self.assertEqual(response.body, ROLE + delta("ok") + DONE)
        self.assertEqual(gateway.names(), ["a", "b"])
        self.assertEqual(
            [(a["instance"], a["status"]) for a in gateway.record["attempts"]],
            [("a", 502), ("b", 200)],
        )
        self.assertIn("ai instance a returned status 502, falling back to b", gateway.warnings())

    def test_end_before_content_falls_back(self) -> None:
        """
        A stream ending before content counts as a 5xx too.
        """
        gateway = self.gateway()
        first = gateway.stream_answer()
        first.data(ROLE, DONE)
        first.end()
        second = gateway.stream_answer()
        second.data(delta("ok"), DONE)
        second.end()
        self.assertEqual(gateway.response().body, delta("ok") + DONE)

    def test_cut_before_content_falls_back(self) -> None:
        """
        A connection lost before content falls back.
        """
        gateway = self.gateway()
        first = gateway.stream_answer()
        first.data(ROLE)
        first.end(ResponseFailed([Failure(ConnectionRefusedError())]))
        second = gateway.stream_answer()
        second.data(delta("ok"), DONE)
        second.end()
        self.assertEqual(gateway.response().body, delta("ok") + DONE)

    def test_time_up(self) -> None:
        """
        When C{stream_commit_ms} is over the held bytes go out and the
        stream goes on as usual: a later error is not retried.
        """
        gateway = self.gateway()
        upstream = gateway.stream_answer()
        upstream.data(ROLE)
        gateway.clock.advance(0.5)
        self.assertEqual(gateway.response().chunks, [ROLE])
        upstream.data(IN_BAND_ERROR)
        upstream.end()
        self.assertEqual(gateway.names(), ["a"])
        self.assertIn(IN_BAND_ERROR, gateway.response().body)

    def test_all_fail(self) -> None:
        """
        When every instance failed before content, 502 with the last error
        event's data.
        """
        gateway = self.gateway()
        gateway.stream_answer().data(IN_BAND_ERROR)
        second = gateway.stream_answer()
        second.data(ROLE, DONE)
        second.end()
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertEqual(
            response.json(), {"message": "upstream ended the stream before any content"}
        )

    def test_all_fail_error_body(self) -> None:
        """
        The last in-band error's JSON is the 502's body.
        """
        gateway = self.gateway()
        first = gateway.stream_answer()
        first.data(ROLE, DONE)
        first.end()
        gateway.stream_answer().data(IN_BAND_ERROR)
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertEqual(
            response.json(), {"error": {"message": "overloaded", "type": "server_error"}}
        )
        self.assertEqual(gateway.record["abort_reason"], "upstream_error")

    def test_no_fallback_relays(self) -> None:
        """
        When the failure may not fall back (the attempt was too slow), the
        held stream is relayed as it came.
        """
        gateway = self.gateway(retry_on_failure_within_ms=100)
        upstream = gateway.stream_answer()
        gateway.clock.advance(0.2)
        upstream.data(ROLE, IN_BAND_ERROR)
        self.assertEqual(gateway.names(), ["a"])
        self.assertEqual(gateway.response().body, ROLE + IN_BAND_ERROR)

    def test_not_held_without_5xx(self) -> None:
        """
        No hold when a failure could not fall back anyway (no 5xx in the
        strategy, or a single instance): the role chunk goes out at once.
        """
        gateway = self.gateway(fallback_strategy="http_429")
        gateway.stream_answer().data(ROLE)
        self.assertEqual(gateway.response().chunks, [ROLE])
        gateway = gateway_for(
            self,
            multi_table(
                ["a"],
                fallback_strategy="http_5xx",
                stream_commit_ms=500,
                streaming_flush_interval_ms=0,
            ),
        )
        gateway.send(CHAT_STREAM)
        gateway.stream_answer().data(ROLE)
        self.assertEqual(gateway.response().chunks, [ROLE])

    def test_held_limits(self) -> None:
        """
        Limits hold while a stream is held: C{max_response_bytes} counts
        held bytes; the client leaving stops the held attempt.
        """
        gateway = self.gateway(max_response_bytes=len(ROLE) + 5)
        upstream = gateway.stream_answer()
        upstream.data(ROLE, ROLE)
        self.assertEqual(gateway.response().status, 502)
        self.assertEqual(gateway.names(), ["a"])
        gateway = self.gateway()
        upstream = gateway.stream_answer()
        upstream.data(ROLE)
        gateway.disconnect()
        self.assertTrue(upstream.transport.stopped)
        self.assertEqual(gateway.record["status"], 499)
        self.assertEqual(gateway.pending_timers(), [])

    def test_filters_after_release(self) -> None:
        """
        Body filters see the held chunks when they are released, one by
        one, and never those of a failed attempt.
        """
        table = with_body_filters(
            multi_table(fallback_strategy="http_5xx", stream_commit_ms=500), ScriptedFilter()
        )
        gateway = gateway_for(self, table)
        seen = table.routes[0].body_filters[0].filters[0]  # type: ignore[attr-defined]
        gateway.send(CHAT_STREAM)
        gateway.stream_answer().data(ROLE, IN_BAND_ERROR)
        upstream = gateway.stream_answer()
        upstream.data(ROLE)
        self.assertEqual(seen.seen, [])
        upstream.data(delta("x"))
        self.assertEqual([s["chunk"] for s in seen.seen], [ROLE, delta("x")])


class StreamSignalTests(SynchronousTestCase):
    """
    L{stream_signal}: what counts as content, and as an in-band error.
    """

    def test_openai_chat(self) -> None:
        """
        Text, reasoning, refusal and tool-call deltas are content; a role or
        an empty text is not; an C{error} object is an error.
        """

        def signal(delta: dict[str, Any]) -> str | None:
            data = json.dumps({"choices": [{"index": 0, "delta": delta}]}).encode()
            return stream_signal(OPENAI_CHAT, SSEEvent(data))

        self.assertIsNone(signal({"role": "assistant", "content": ""}))
        self.assertIsNone(signal({"content": None, "tool_calls": []}))
        for content in (
            {"content": "x"},
            {"reasoning_content": "think"},
            {"reasoning": "think"},
            {"refusal": "no"},
            {"tool_calls": [{"index": 0, "function": {"name": "f"}}]},
        ):
            self.assertEqual(signal(content), STREAM_CONTENT, content)
        self.assertEqual(
            stream_signal(OPENAI_CHAT, SSEEvent(b'{"error":{"message":"x"}}')), STREAM_ERROR
        )
        self.assertIsNone(stream_signal(OPENAI_CHAT, SSEEvent(b"[DONE]")))

    def test_anthropic(self) -> None:
        """
        Text, thinking and tool-input deltas and tool-use blocks are
        content; C{message_start} and pings are not; C{event: error} is an
        error.
        """

        def event(kind: str, document: dict[str, Any]) -> SSEEvent:
            return SSEEvent(json.dumps(document).encode(), kind)

        self.assertIsNone(
            stream_signal(ANTHROPIC_MESSAGES, event("message_start", {"message": {}}))
        )
        self.assertIsNone(stream_signal(ANTHROPIC_MESSAGES, event("ping", {})))
        self.assertIsNone(
            stream_signal(
                ANTHROPIC_MESSAGES,
                event("content_block_start", {"content_block": {"type": "text", "text": ""}}),
            )
        )
        self.assertEqual(
            stream_signal(
                ANTHROPIC_MESSAGES,
                event("content_block_start", {"content_block": {"type": "tool_use"}}),
            ),
            STREAM_CONTENT,
        )
        for piece in ({"text": "x"}, {"thinking": "t"}, {"partial_json": "{"}):
            self.assertEqual(
                stream_signal(ANTHROPIC_MESSAGES, event("content_block_delta", {"delta": piece})),
                STREAM_CONTENT,
            )
        self.assertEqual(stream_signal(ANTHROPIC_MESSAGES, event("error", {})), STREAM_ERROR)

    def test_responses(self) -> None:
        """
        Output and reasoning deltas and function calls are content;
        C{response.created} is not; C{error} and C{response.failed} are
        errors.
        """

        def event(kind: str, document: dict[str, Any]) -> SSEEvent:
            return SSEEvent(json.dumps(document).encode(), kind)

        self.assertIsNone(stream_signal(OPENAI_RESPONSES, event("response.created", {})))
        self.assertEqual(
            stream_signal(OPENAI_RESPONSES, event("response.output_text.delta", {"delta": "x"})),
            STREAM_CONTENT,
        )
        self.assertIsNone(
            stream_signal(OPENAI_RESPONSES, event("response.output_text.delta", {"delta": ""}))
        )
        self.assertEqual(
            stream_signal(
                OPENAI_RESPONSES,
                event("response.output_item.added", {"item": {"type": "function_call"}}),
            ),
            STREAM_CONTENT,
        )
        for kind in ("error", "response.failed"):
            self.assertEqual(stream_signal(OPENAI_RESPONSES, event(kind, {})), STREAM_ERROR)

    def test_passthrough(self) -> None:
        """
        In a passthrough stream any event is content but C{[DONE]} and an
        error object.
        """
        self.assertEqual(stream_signal(PASSTHROUGH, SSEEvent(b"hello")), STREAM_CONTENT)
        self.assertIsNone(stream_signal(PASSTHROUGH, SSEEvent(b"[DONE]")))
        self.assertEqual(stream_signal(PASSTHROUGH, SSEEvent(b'{"error": "x"}')), STREAM_ERROR)
