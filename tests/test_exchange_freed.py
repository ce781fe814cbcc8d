# -*- test-case-name: tests.test_exchange_freed -*-
"""
An exchange that ended lets go of everything (L{Deadlines.let_go},
L{Relays.let_go}, C{ExchangeEnding._let_go}): no timer of it is left on
the clock, and it is freed by reference counting alone, without the
garbage collector (which these tests switch off).

The gateway, fake upstream and clock are those of C{tests.test_proxy};
C{tests.test_proxy}, C{tests.test_deadlines} and C{tests.test_timeouts}
are over 450 lines, hence this module.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aiproxy.context import ExchangeContext
from aiproxy.exchange.answer import Relays
from aiproxy.exchange.deadlines import Deadlines
from aiproxy.interfaces import IExchangeMonitor
from tests.test_proxy import CHAT, DONE, USAGE, Gateway, delta, json_response
from tests.test_timeouts import gateway_for

#: Limits that keep timers armed while a stream runs.
LIMITS = {
    "timeout": 30000,
    "stream_idle_timeout_ms": 5000,
    "max_stream_duration_ms": 60000,
}


class Owner:
    """
    Stands for an exchange: the callbacks it gives its parts are its bound
    methods, and it holds those parts (a reference cycle until they let go).
    """

    parts: list[Any]

    def paused(self) -> bool:
        return False

    def expired(self, reason: str, status: int, message: str) -> None: ...

    def fire(self) -> None: ...

    def since(self) -> float:
        return 0.0

    def stream_started(self) -> None: ...

    def ended(self, outcome: Any) -> None: ...


@implementer(IExchangeMonitor)
class WeakMonitor:
    """
    A monitor that keeps only weak references to the exchanges it sees, and
    asks for chunk gaps (so the exchange's stream callback is used).
    """

    def __init__(self) -> None:
        self.in_flight: dict[Any, None] = {}
        self.started: list[weakref.ref[Any]] = []
        self.ended = 0

    def exchange_started(self, exchange: Any) -> None:
        self.started.append(weakref.ref(exchange))

    def stream_started(self, exchange: Any) -> Callable[[float], None] | None:
        return lambda gap: None

    def exchange_ended(self, exchange: Any, record: Any, timings: Any) -> None:
        self.ended += 1

    def request_refused(self, record: Any) -> None: ...


class NoCollectorCase(SynchronousTestCase):
    """
    The garbage collector is off during each test: only reference counting
    frees anything.
    """

    def setUp(self) -> None:
        gc.collect()
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)


class PartsLetGoTests(NoCollectorCase):
    """
    L{Deadlines.let_go} and L{Relays.let_go} drop the exchange's callbacks.
    """

    def test_deadlines(self) -> None:
        """
        After C{let_go}, no timer of the deadlines is left, and an owner
        holding them (whose methods they were given) is freed.
        """
        clock = Clock()
        owner = Owner()
        deadlines = Deadlines(
            clock,
            {**LIMITS, "first_token_timeout_ms": 1000, "keepalive_comment_interval_ms": 500},
            owner.paused,
            owner.expired,
            owner.expired,
        )
        owner.parts = [deadlines]
        deadlines.arm("read", 1.0, owner.fire)
        deadlines.arm_silence("idle", 1000, owner.since, owner.fire)
        deadlines.arm_waiting(True, owner.fire)
        deadlines.arm_duration(clock.seconds(), True)
        self.assertEqual(len(clock.getDelayedCalls()), 5)
        ref = weakref.ref(owner)
        deadlines.let_go()
        self.assertEqual(clock.getDelayedCalls(), [])
        del owner, deadlines
        self.assertIsNone(ref())

    def test_deadlines_held(self) -> None:
        """
        Without C{let_go}, that owner is kept by the cycle (the test above
        can fail).
        """
        owner = Owner()
        owner.parts = [Deadlines(Clock(), LIMITS, owner.paused, owner.expired, owner.expired)]
        ref = weakref.ref(owner)
        del owner
        self.assertIsNotNone(ref())
        gc.collect()
        self.assertIsNone(ref())

    def test_relays(self) -> None:
        """
        After C{let_go}, the relays no longer hold the callbacks of an owner
        holding them.
        """
        clock = Clock()
        owner = Owner()
        deadlines = Deadlines(clock, LIMITS, lambda: False, lambda *_: None, lambda *_: None)
        context = ExchangeContext("route", "instance", 0.0)
        downstream: Any = None
        relays = Relays(
            context, clock, LIMITS, deadlines, downstream, [], owner.stream_started, owner.ended
        )
        owner.parts = [relays]
        ref = weakref.ref(owner)
        relays.let_go()
        del owner, relays
        self.assertIsNone(ref())


class ExchangeFreedTests(NoCollectorCase):
    """
    An exchange through the gateway, once over, leaves no timer and is
    freed as soon as nothing outside it refers to it.
    """

    def setUp(self) -> None:
        super().setUp()
        self.monitor = WeakMonitor()
        verifyObject(IExchangeMonitor, self.monitor)

    def gateway(self, **proxy: Any) -> Gateway:
        """
        A gateway whose exchanges report to the weak monitor.
        """
        gateway = gateway_for(self, **{**LIMITS, **proxy})
        gateway.resource.monitor = self.monitor
        return gateway

    def assert_freed(self, gateway: Gateway) -> None:
        """
        The one exchange ended, left no timer, and is gone once the fake
        upstream client forgets its calls (as treq forgets a request); the
        gateway itself is still there.
        """
        self.assertEqual(self.monitor.ended, 1)
        self.assertEqual(gateway.clock.getDelayedCalls(), [])
        [ref] = self.monitor.started
        gateway.client.calls.clear()
        self.assertIsNone(ref())

    def test_stream(self) -> None:
        """
        A stream relayed to its end.
        """
        gateway = self.gateway()
        upstream = gateway.stream()
        upstream.data(delta("Hel"), delta("lo"))
        self.assertNotEqual(gateway.pending_timers(), [])
        upstream.data(USAGE, DONE)
        upstream.end()
        [ref] = self.monitor.started
        self.assertIsNotNone(ref())
        del upstream
        self.assert_freed(gateway)

    def test_answer(self) -> None:
        """
        An answer that is not streamed.
        """
        gateway = self.gateway()
        gateway.send(CHAT)
        upstream = gateway.answer(json_response(b'{"id":"x"}', length=10))
        upstream.data(b'{"id":"x"}')
        upstream.end()
        del upstream
        self.assertEqual(gateway.response().status, 200)
        self.assert_freed(gateway)

    def test_cut_by_timer(self) -> None:
        """
        A stream cut by its idle timeout.
        """
        gateway = self.gateway()
        upstream = gateway.stream()
        upstream.data(delta("Hel"))
        gateway.clock.advance(5)
        self.assertTrue(gateway.closed)
        gateway.disconnect()
        del upstream
        self.assert_freed(gateway)

    def test_client_left(self) -> None:
        """
        A stream whose client went away.
        """
        gateway = self.gateway()
        upstream = gateway.stream()
        upstream.data(delta("Hel"))
        gateway.disconnect()
        self.assertTrue(upstream.transport.stopped)
        del upstream
        self.assert_freed(gateway)
