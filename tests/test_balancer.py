# -*- test-case-name: tests.test_balancer -*-
"""
Tests for L{aiproxy.routing.balancer}: which instance a request goes to first, and
which one next when an attempt fails.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from aiproxy.routing.balancer import (
    HASH_VARIABLES,
    Balancer,
    hash_key_problem,
    request_hash_key,
    request_variable,
)


@dataclass
class Node:
    """
    An instance as the balancer sees it.
    """

    name: str
    weight: int = 1
    priority: int = 0
    healthy: bool = True


def picks(balancer: Balancer[Node], count: int, **kw: object) -> list[str]:
    """
    The first pick of C{count} requests in a row.
    """
    result = []
    for _ in range(count):
        picked = balancer.selection(**kw).next()  # type: ignore[arg-type]
        result.append(picked.name if picked else None)
    return result


def order(balancer: Balancer[Node], **kw: object) -> list[str]:
    """
    Every instance one request would try, in order.
    """
    selection = balancer.selection(**kw)  # type: ignore[arg-type]
    tried = []
    while (picked := selection.next()) is not None:
        tried.append(picked.name)
    return tried


class RoundRobinTests(SynchronousTestCase):
    """
    Smooth weighted round robin within a priority level.
    """

    def test_smooth_weights(self) -> None:
        """
        Weights 5, 1, 1 give nginx's interleaved sequence, then repeat.
        """
        balancer = Balancer([Node("a", 5), Node("b", 1), Node("c", 1)])
        self.assertEqual(picks(balancer, 14), list("aabacaa") * 2)

    def test_equal_weights(self) -> None:
        """
        Equal weights take turns in config order.
        """
        balancer = Balancer([Node("a"), Node("b"), Node("c")])
        self.assertEqual(picks(balancer, 6), list("abcabc"))

    def test_shares(self) -> None:
        """
        Over many requests each instance gets its weight's share, exactly
        per cycle of the weights' sum.
        """
        balancer = Balancer([Node("a", 3), Node("b", 2), Node("c", 5)])
        self.assertEqual(Counter(picks(balancer, 1000)), {"a": 300, "b": 200, "c": 500})

    def test_fallback_order(self) -> None:
        """
        A request that fails everywhere tries each instance of the level
        once, the picked one first.
        """
        balancer = Balancer([Node("a", 2), Node("b", 1), Node("c", 1)])
        self.assertEqual(order(balancer), ["a", "b", "c"])
        tried = order(balancer)
        self.assertEqual(sorted(tried), ["a", "b", "c"])
        self.assertEqual(len(tried), 3)

    def test_deterministic(self) -> None:
        """
        Two balancers over the same instances pick the same sequence.
        """
        nodes = [Node("a", 4), Node("b", 3), Node("c", 1)]
        self.assertEqual(picks(Balancer(nodes), 40), picks(Balancer(nodes), 40))


class WeightZeroTests(SynchronousTestCase):
    """
    Weight 0 as in APISIX's C{resty.roundrobin}.
    """

    def test_never_beside_positive(self) -> None:
        """
        An instance of weight 0 is never picked while its level has one of
        positive weight, not even as a fallback: the next level comes first.
        """
        balancer = Balancer([Node("a", 1), Node("z", 0), Node("low", 1, priority=-1)])
        self.assertEqual(picks(balancer, 5), ["a"] * 5)
        self.assertEqual(order(balancer), ["a", "low"])

    def test_all_zero(self) -> None:
        """
        A level whose instances all weigh 0 is balanced evenly.
        """
        balancer = Balancer([Node("a", 0), Node("b", 0)])
        self.assertEqual(picks(balancer, 4), list("abab"))

    def test_alone(self) -> None:
        """
        A single instance is always picked, whatever its weight, and only
        once per request.
        """
        balancer = Balancer([Node("a", 0)])
        self.assertEqual(order(balancer), ["a"])


class PriorityTests(SynchronousTestCase):
    """
    Levels by priority, highest first.
    """

    def test_highest_first(self) -> None:
        """
        Requests go to the highest level only; a lower level is tried once
        every instance above it was.
        """
        balancer = Balancer(
            [Node("low", 1, priority=0), Node("high1", 1, priority=10), Node("high2", 1, 10)]
        )
        self.assertEqual(picks(balancer, 4), ["high1", "high2", "high1", "high2"])
        self.assertEqual(order(balancer), ["high1", "high2", "low"])

    def test_negative_priorities(self) -> None:
        """
        Priorities are plain integers: 0 before -1.
        """
        balancer = Balancer([Node("b", priority=-1), Node("a", priority=0)])
        self.assertEqual(order(balancer), ["a", "b"])


class UsableTests(SynchronousTestCase):
    """
    Instances a request cannot use: unhealthy ones, or those whose provider
    does not serve its protocol.
    """

    def test_unhealthy_skipped(self) -> None:
        """
        An unhealthy instance is neither picked nor tried as a fallback.
        """
        nodes = [Node("a"), Node("b", healthy=False), Node("c")]
        balancer = Balancer(nodes)
        self.assertEqual(picks(balancer, 4), list("acac"))
        self.assertEqual(order(balancer), ["a", "c"])

    def test_all_unhealthy(self) -> None:
        """
        When no instance is healthy, health is ignored (APISIX: "all
        upstream nodes is unhealthy, use default").
        """
        nodes = [Node("a", healthy=False), Node("b", healthy=False)]
        balancer = Balancer(nodes)
        selection = balancer.selection()
        self.assertTrue(selection.all_unhealthy)
        self.assertEqual(order(balancer), ["a", "b"])

    def test_unhealthy_level(self) -> None:
        """
        A level whose instances are all unhealthy is passed over.
        """
        balancer = Balancer([Node("high", priority=1, healthy=False), Node("low")])
        self.assertEqual(order(balancer), ["low"])

    def test_usable(self) -> None:
        """
        The request's own predicate (the protocol) leaves instances out.
        """
        balancer = Balancer([Node("a"), Node("b"), Node("c")])
        self.assertEqual(order(balancer, usable=lambda node: node.name != "b"), ["a", "c"])
        self.assertEqual(order(balancer, usable=lambda node: False), [])


class ConsistentHashTests(SynchronousTestCase):
    """
    C{chash}: a key keeps its instance.
    """

    def test_stable(self) -> None:
        """
        The same key always picks the same instance, and two balancers over
        the same instances agree (the hash is not Python's randomised one).
        """
        nodes = [Node("a"), Node("b"), Node("c")]
        first = Balancer(nodes, "chash")
        second = Balancer(nodes, "chash")
        for key in ("alice", "bob", "10.0.0.1", ""):
            names = {first.selection(key=lambda: key).next().name for _ in range(5)}  # type: ignore[union-attr]
            self.assertEqual(len(names), 1)
            self.assertEqual(
                names,
                {second.selection(key=lambda: key).next().name},  # type: ignore[union-attr]
            )

    def test_spread(self) -> None:
        """
        Many keys spread over every instance, in rough proportion to the
        weights.
        """
        balancer = Balancer([Node("a", 1), Node("b", 1), Node("c", 2)], "chash")
        counts = Counter(
            balancer.selection(key=lambda i=i: f"user-{i}").next().name  # type: ignore[misc, union-attr]
            for i in range(4000)
        )
        self.assertEqual(set(counts), {"a", "b", "c"})
        self.assertGreater(counts["c"], counts["a"])
        self.assertGreater(counts["c"], counts["b"])
        for name in counts:
            self.assertGreater(counts[name], 500)

    def test_consistent(self) -> None:
        """
        An instance going unhealthy only moves the keys it had: every other
        key keeps its instance.
        """
        nodes = [Node("a"), Node("b"), Node("c")]
        balancer = Balancer(nodes, "chash")
        keys = [f"k{i}" for i in range(300)]
        before = {k: balancer.selection(key=lambda k=k: k).next().name for k in keys}  # type: ignore[misc, union-attr]
        nodes[1].healthy = False
        after = {k: balancer.selection(key=lambda k=k: k).next().name for k in keys}  # type: ignore[misc, union-attr]
        for key in keys:
            if before[key] != "b":
                self.assertEqual(after[key], before[key])
            else:
                self.assertIn(after[key], ("a", "c"))

    def test_fallback_walks_the_ring(self) -> None:
        """
        A retry moves on to another instance; every instance is tried once.
        """
        balancer = Balancer([Node("a"), Node("b"), Node("c")], "chash")
        tried = order(balancer, key=lambda: "some-user")
        self.assertEqual(sorted(tried), ["a", "b", "c"])
        self.assertEqual(tried, order(balancer, key=lambda: "some-user"))

    def test_key_asked_once(self) -> None:
        """
        The key is computed once per request, at the first pick.
        """
        asked = []
        balancer = Balancer([Node("a"), Node("b")], "chash")
        selection = balancer.selection(key=lambda: asked.append(1) or "k")  # type: ignore[func-returns-value]
        self.assertEqual(asked, [])
        selection.next()
        selection.next()
        self.assertEqual(asked, [1])

    def test_priorities(self) -> None:
        """
        Hashing happens within the highest level first.
        """
        balancer = Balancer(
            [Node("low1", priority=0), Node("high", priority=5), Node("low2", priority=0)], "chash"
        )
        self.assertEqual(order(balancer, key=lambda: "x")[0], "high")


class ClientRequest(DummyRequest):
    """
    A L{DummyRequest} with the cookies of a real request.
    """

    received_cookies: dict[bytes, bytes] = {}

    def getCookie(self, key: bytes) -> bytes | None:
        return self.received_cookies.get(key)


def request(
    uri: bytes = b"/v1/chat/completions?user=alice",
    headers: dict[bytes, bytes] | None = None,
) -> ClientRequest:
    """
    A request from 192.0.2.7 with C{uri} and C{headers}.
    """
    path, _, query = uri.partition(b"?")
    req = ClientRequest(path.lstrip(b"/").split(b"/"))
    req.uri = uri
    req.path = path
    req.args = {}
    for pair in query.split(b"&") if query else []:
        name, _, value = pair.partition(b"=")
        req.args.setdefault(name, []).append(value)
    for name, value in (headers or {}).items():
        req.requestHeaders.setRawHeaders(name, [value])
    req.client = type("Address", (), {"host": "192.0.2.7", "port": 40000})()
    return req


class HashKeyTests(SynchronousTestCase):
    """
    The request variables C{chash} hashes, and the config check of C{key}.
    """

    def test_variables(self) -> None:
        """
        The variables aiproxy resolves, as nginx names them.
        """
        req = request(
            b"/v1/chat/completions?user=alice&n=1",
            {b"host": b"Gateway.Test:9080", b"x-user-id": b"u1", b"cookie": b"session=s1"},
        )
        self.assertEqual(request_variable(req, "uri"), "/v1/chat/completions")
        self.assertEqual(
            request_variable(req, "request_uri"), "/v1/chat/completions?user=alice&n=1"
        )
        self.assertEqual(request_variable(req, "query_string"), "user=alice&n=1")
        self.assertEqual(request_variable(req, "remote_addr"), "192.0.2.7")
        self.assertEqual(request_variable(req, "remote_port"), "40000")
        self.assertEqual(request_variable(req, "host"), "gateway.test")
        self.assertEqual(request_variable(req, "arg_user"), "alice")
        self.assertIsNone(request_variable(req, "arg_missing"))
        self.assertEqual(request_variable(req, "http_x_user_id"), "u1")
        self.assertIsNone(request_variable(req, "unknown"))
        self.assertTrue(request_variable(req, "hostname"))

    def test_hash_keys(self) -> None:
        """
        Each C{hash_on}; a key that resolves to nothing falls back to the
        client's address, and so does C{consumer} (aiproxy has none).
        """
        req = request(headers={b"x-user-id": b"u1"})
        self.assertEqual(request_hash_key(req, "vars", "arg_user"), "alice")
        self.assertEqual(request_hash_key(req, "vars", "arg_other"), "192.0.2.7")
        self.assertEqual(request_hash_key(req, "header", "X-User-Id"), "u1")
        self.assertEqual(request_hash_key(req, "header", "x-missing"), "192.0.2.7")
        self.assertEqual(request_hash_key(req, "consumer", None), "192.0.2.7")
        self.assertEqual(
            request_hash_key(req, "vars_combinations", "$arg_user-${http_x_user_id}"), "alice-u1"
        )
        self.assertEqual(request_hash_key(req, "vars_combinations", "$arg_none"), "192.0.2.7")

    def test_cookie(self) -> None:
        """
        C{hash_on: cookie} hashes the named cookie's value.
        """
        req = request(headers={b"cookie": b"a=1; session=s1"})
        req.received_cookies = {b"a": b"1", b"session": b"s1"}
        self.assertEqual(request_hash_key(req, "cookie", "session"), "s1")

    def test_problems(self) -> None:
        """
        A C{key} chash cannot use is a config problem; C{consumer} needs
        none.
        """
        self.assertIsNone(hash_key_problem("consumer", None))
        for name in HASH_VARIABLES + ("arg_user",):
            self.assertIsNone(hash_key_problem("vars", name))
        self.assertIsNone(hash_key_problem("header", "X-User-Id"))
        self.assertIsNone(hash_key_problem("cookie", "session"))
        self.assertIsNone(hash_key_problem("vars_combinations", "$remote_addr${http_x_user}"))
        self.assertIn("required", hash_key_problem("vars", None) or "")
        self.assertIn("unsupported variable 'http_x'", hash_key_problem("vars", "http_x") or "")
        self.assertIn("invalid header name", hash_key_problem("header", "x y") or "")
        self.assertIn("names no variable", hash_key_problem("vars_combinations", "abc") or "")
        self.assertIn(
            "unsupported variable 'bogus'", hash_key_problem("vars_combinations", "$bogus") or ""
        )
