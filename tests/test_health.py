# -*- test-case-name: tests.test_health -*-
"""
Tests for L{aiproxy.routing.health}: active health checks driven by a L{Clock} and
a fake probe, and how a route's instances get their checkers.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aiproxy.config import PROXY_PLUGINS, parse_config
from aiproxy.interfaces import IHealthProbe
from aiproxy.routing.build import build_routes
from aiproxy.routing.health import HealthChecker, HealthService, HTTPProbe, ProbeTarget
from aiproxy.schema import load_schema, schema_problems
from aiproxy.tap import GatewayService
from tests.helpers import log_events

#: The defaults APISIX's health checker fills in (the schema does too).
DEFAULTS: dict[str, Any] = {}
schema_problems(
    {"instances": [{"name": "a", "provider": "openai", "auth": {}, "weight": 1,
                    "checks": {"active": DEFAULTS}}]},
    load_schema("ai-proxy-multi"),
)  # fmt: skip

TARGET = ProbeTarget("http", "upstream.test", 7751, "/v1/models", ((b"x-probe", b"1"),))


@implementer(IHealthProbe)
class FakeProbe:
    """
    A probe whose answers the test gives: each probe's Deferred is kept in
    C{calls} until the test fires it.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[ProbeTarget, Deferred[int | None]]] = []
        self.cancelled: list[ProbeTarget] = []

    def probe(self, target: ProbeTarget) -> Deferred[int | None]:
        d: Deferred[int | None] = Deferred(lambda d: self.cancelled.append(target))
        self.calls.append((target, d))
        return d

    def answer(self, result: int | None | Exception) -> None:
        """
        Fire the last probe with a status, or fail it.
        """
        _, d = self.calls[-1]
        if isinstance(result, Exception):
            d.errback(Failure(result))
        else:
            d.callback(result)


class CheckerTests(SynchronousTestCase):
    """
    L{HealthChecker} with APISIX's defaults unless a test says otherwise.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.probe = FakeProbe()
        self.events = log_events(self)

    def checker(self, **active: Any) -> HealthChecker:
        conf = json.loads(json.dumps(DEFAULTS))
        for name, value in active.items():
            if isinstance(value, dict):
                conf[name].update(value)
            else:
                conf[name] = value
        checker = HealthChecker("a", "chat", TARGET, conf, self.probe, self.clock)
        checker.start()
        self.addCleanup(checker.stop)
        return checker

    def answer_all(self, checker: HealthChecker, results: list[Any]) -> None:
        """
        Answer the probe in flight with each of C{results}, one interval
        apart.
        """
        for result in results:
            self.probe.answer(result)
            self.clock.advance(1)

    def messages(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def test_defaults(self) -> None:
        """
        The schema fills in APISIX's defaults.
        """
        self.assertEqual(DEFAULTS["type"], "http")
        self.assertEqual(DEFAULTS["timeout"], 1)
        self.assertEqual(DEFAULTS["http_path"], "/")
        self.assertEqual(
            DEFAULTS["healthy"], {"interval": 1, "http_statuses": [200, 302], "successes": 2}
        )
        self.assertEqual(
            DEFAULTS["unhealthy"],
            {
                "interval": 1,
                "http_statuses": [429, 404, 500, 501, 502, 503, 504, 505],
                "http_failures": 5,
                "tcp_failures": 2,
                "timeouts": 3,
            },
        )

    def test_probes_every_interval(self) -> None:
        """
        The first probe goes at once, the next one interval after the
        previous one ended; never two at a time; the target is probed as
        configured.
        """
        checker = self.checker(healthy={"interval": 5})
        self.assertEqual(len(self.probe.calls), 1)
        self.assertIs(self.probe.calls[0][0], TARGET)
        self.clock.advance(10)
        self.assertEqual(len(self.probe.calls), 1)
        self.probe.answer(200)
        self.clock.advance(4.9)
        self.assertEqual(len(self.probe.calls), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.probe.calls), 2)
        self.assertTrue(checker.healthy)

    def test_http_failures(self) -> None:
        """
        Five statuses of C{unhealthy.http_statuses} in a row make the
        instance unhealthy, with a warning naming it; then it is probed
        every C{unhealthy.interval}.
        """
        checker = self.checker(unhealthy={"interval": 3})
        self.answer_all(checker, [500, 404, 503, 429])
        self.assertTrue(checker.healthy)
        self.probe.answer(502)
        self.assertFalse(checker.healthy)
        self.assertIn(
            "ai instance a of route chat is unhealthy: health check status 502", self.messages()
        )
        # LoopingCall keeps to its grid from the start: t=6, then t=9.
        self.clock.advance(1.9)
        self.assertEqual(len(self.probe.calls), 5)
        self.clock.advance(0.1)
        self.assertEqual(len(self.probe.calls), 6)
        self.probe.answer(500)
        self.clock.advance(2.9)
        self.assertEqual(len(self.probe.calls), 6)
        self.clock.advance(0.1)
        self.assertEqual(len(self.probe.calls), 7)

    def test_recovery(self) -> None:
        """
        Two successes in a row make an unhealthy instance healthy again.
        """
        checker = self.checker(unhealthy={"http_failures": 1})
        self.answer_all(checker, [500])
        self.assertFalse(checker.healthy)
        self.answer_all(checker, [200, 500, 200])
        self.assertFalse(checker.healthy)
        self.answer_all(checker, [302])
        self.assertTrue(checker.healthy)
        self.assertIn("ai instance a of route chat is healthy again", self.messages())

    def test_success_resets_failures(self) -> None:
        """
        Failures count only in a row: a success in between starts over.
        """
        checker = self.checker()
        self.answer_all(checker, [500] * 4 + [200] + [500] * 4)
        self.assertTrue(checker.healthy)
        self.answer_all(checker, [500])
        self.assertFalse(checker.healthy)

    def test_other_statuses(self) -> None:
        """
        A status in neither list counts neither way.
        """
        checker = self.checker(unhealthy={"http_failures": 2})
        self.answer_all(checker, [500, 418, 201, 500])
        self.assertFalse(checker.healthy)

    def test_timeouts(self) -> None:
        """
        Three probes without an answer in time make the instance unhealthy.
        """
        checker = self.checker()
        self.answer_all(checker, [TimeoutError(), TimeoutError()])
        self.assertTrue(checker.healthy)
        self.answer_all(checker, [TimeoutError()])
        self.assertFalse(checker.healthy)
        self.assertIn("timed out", self.messages()[-1])

    def test_tcp_failures(self) -> None:
        """
        Two failed connections make the instance unhealthy; a C{tcp} probe
        that connects (L{None}) is a success.
        """
        checker = self.checker(unhealthy={"tcp_failures": 2}, healthy={"successes": 1})
        self.answer_all(checker, [ConnectionRefusedError(), ConnectionRefusedError()])
        self.assertFalse(checker.healthy)
        self.answer_all(checker, [None])
        self.assertTrue(checker.healthy)

    def test_stop(self) -> None:
        """
        Stopping cancels the probe in flight and no other follows; the
        Deferred fires once the checker is idle; it can start again.
        """
        checker = self.checker()
        d = checker.stop()
        self.successResultOf(d)
        self.assertEqual(self.probe.cancelled, [TARGET])
        self.assertTrue(checker.healthy)
        self.clock.advance(10)
        self.assertEqual(len(self.probe.calls), 1)
        checker.start()
        self.assertEqual(len(self.probe.calls), 2)

    def test_probe_error_logged(self) -> None:
        """
        A bug in counting a result is logged, and probing goes on.
        """
        checker = HealthChecker("a", "chat", TARGET, DEFAULTS, self.probe, self.clock)
        checker._answered = lambda status: 1 / 0  # type: ignore[method-assign]
        checker.start()
        self.addCleanup(checker.stop)
        self.probe.answer(200)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.probe.calls), 2)


class ServiceTests(SynchronousTestCase):
    """
    L{HealthService} runs the checkers of the route table in force.
    """

    def test_start_stop_use(self) -> None:
        """
        Checkers start with the service and stop with it; L{use} swaps in
        another table's checkers, stopping the old ones.
        """
        clock = Clock()
        probe = FakeProbe()
        old = [HealthChecker(n, "r", TARGET, DEFAULTS, probe, clock) for n in "ab"]
        new = [HealthChecker("c", "r", TARGET, DEFAULTS, probe, clock)]
        service = HealthService(old)
        self.assertFalse(any(checker.running for checker in old))
        service.startService()
        self.assertTrue(all(checker.running for checker in old))
        self.successResultOf(service.use(new))
        self.assertFalse(any(checker.running for checker in old))
        self.assertTrue(new[0].running)
        self.successResultOf(service.stopService())
        self.assertFalse(new[0].running)
        service.use(old)
        self.assertFalse(any(checker.running for checker in old))


class ProbeTests(SynchronousTestCase):
    """
    The network probe.
    """

    def test_interface(self) -> None:
        """
        L{HTTPProbe} provides L{IHealthProbe}.
        """
        verifyObject(IHealthProbe, HTTPProbe(MemoryReactorClock()))

    def test_http_connects(self) -> None:
        """
        An HTTP probe connects to the target's host and port; one that gets
        no answer in C{timeout} fails with L{TimeoutError}.
        """
        reactor = MemoryReactorClock()
        d = HTTPProbe(reactor).probe(ProbeTarget("http", "127.0.0.1", 7751, "/", timeout=2))
        [(host, port, *_)] = reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 7751))
        reactor.advance(2)
        self.failureResultOf(d, TimeoutError)

    def test_url(self) -> None:
        """
        The probe URL brackets an IPv6 host.
        """
        self.assertEqual(ProbeTarget("https", "::1", 443, "/x").url, "https://[::1]:443/x")


def config_of(instances: list[dict[str, Any]], **plugin: Any) -> Any:
    """
    A config with one C{ai-proxy-multi} route over C{instances}.
    """
    document = {
        "routes": [
            {
                "id": "chat",
                "uri": "/v1/chat/completions",
                "plugins": {"ai-proxy-multi": {"instances": instances, **plugin}},
            }
        ]
    }
    schemas = {name: load_schema(name) for name in PROXY_PLUGINS}
    return parse_config(json.dumps(document), environ={}, plugin_schemas=schemas)


def build(instances: list[dict[str, Any]], **plugin: Any) -> Any:
    """
    The route table of one C{ai-proxy-multi} route with C{instances}.
    """
    config = config_of(instances, **plugin)
    return build_routes(config, MemoryReactorClock(), plugins={}, probe=FakeProbe())


def instance(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "weight": 1,
        "auth": {"header": {"Authorization": f"Bearer key-{name}"}},
        **fields,
    }


class RouteCheckerTests(SynchronousTestCase):
    """
    Which instances get a checker, and what it probes.
    """

    def test_probe_target(self) -> None:
        """
        The probe goes to the endpoint's host and port (or C{port}), with
        C{http_path}, the instance's C{auth.query} and C{auth.header}, the
        configured C{req_headers}, and C{host} as its Host header: nothing
        of any client's request.
        """
        table = build(
            [
                instance(
                    "a",
                    auth={"header": {"Authorization": "Bearer key-a"}, "query": {"key": "q"}},
                    override={"endpoint": "https://llm.test:8443/v1/chat/completions"},
                    checks={
                        "active": {
                            "type": "https",
                            "http_path": "/v1/models?x=1",
                            "req_headers": ["X-Probe: yes"],
                            "host": "probe.test",
                            "timeout": 2.5,
                            "https_verify_certificate": False,
                        }
                    },
                ),
                instance("b", checks={"active": {"type": "tcp", "port": 9000}}),
                instance("c"),
            ]
        )
        a, b, c = table.routes[0].instances
        self.assertEqual(
            a.checker.target,
            ProbeTarget(
                kind="https",
                host="llm.test",
                port=8443,
                path="/v1/models?x=1&key=q",
                headers=(
                    (b"X-Probe", b"yes"),
                    (b"Authorization", b"Bearer key-a"),
                    (b"Host", b"probe.test"),
                ),
                timeout=2.5,
                verify=False,
            ),
        )
        self.assertEqual(
            (b.checker.target.kind, b.checker.target.host, b.checker.target.port),
            ("tcp", "api.openai.com", 9000),
        )
        self.assertIsNone(c.checker)
        self.assertEqual(table.checkers, [a.checker, b.checker])
        self.assertFalse(a.checker.running)

    def test_single_instance(self) -> None:
        """
        A route with one instance has no checker (APISIX builds none: it is
        always used).
        """
        table = build([instance("a", checks={"active": {"http_path": "/v1/models"}})])
        self.assertIsNone(table.routes[0].instances[0].checker)

    def test_health_read_by_selection(self) -> None:
        """
        An instance whose checker says unhealthy is not picked.
        """
        table = build([instance("a", checks={"active": {}}), instance("b")])
        route = table.routes[0]
        route.instances[0].checker.healthy = False
        picked = [route.balancer.selection().next().name for _ in range(3)]
        self.assertEqual(picked, ["b", "b", "b"])


class GatewayHealthTests(SynchronousTestCase):
    """
    The gateway runs the health checks of the routes in force.
    """

    def test_lifecycle(self) -> None:
        """
        Checks start with the gateway; a reload stops the old table's and
        starts the new one's; stopping the gateway stops them.
        """
        instances = [instance("a", checks={"active": {}}), instance("b")]
        config = config_of(instances)
        old = build(instances)
        new = build(instances)
        service = GatewayService(config, old, MemoryReactorClock(), ["tcp:0"])
        [old_checker] = old.checkers
        [new_checker] = new.checkers
        self.assertFalse(old_checker.running)
        service.startService()
        self.assertTrue(old_checker.running)
        service.resource.set_table(new)
        service._reloaded(config)
        self.assertFalse(old_checker.running)
        self.assertTrue(new_checker.running)
        self.successResultOf(service.stopService())
        self.assertFalse(new_checker.running)
