# -*- test-case-name: tests.test_admission -*-
"""
Whether a request is served: its consumer (C{key-auth}), then its token
budgets (C{ai-rate-limiting}, the route's and the consumer's own).

The counters a request could be charged are read once, before the first
attempt (one read per counter store), and the request is charged what it
used once it ends, in the window it ends in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from aiproxy.access.consumers import Consumer
from aiproxy.access.keyauth import CHALLENGE, KeyRefused, SentKey
from aiproxy.budget.limits import Budget, Quota, rule_value
from aiproxy.budget.store import StoreUnavailable
from aiproxy.exchange.errors import error_body
from aiproxy.exchange.failover import Failover
from aiproxy.routing.balancer import request_variable
from aiproxy.routing.routes import Instance, Route
from aiproxy.stream.protocols import detect_protocol
from aiproxy.upstream.request import ClientError

__all__ = ["Admission", "Refused", "client_error_body"]

log = Logger()

Headers = list[tuple[bytes, list[bytes]]]


class Refused(ClientError):
    """
    The request is not served: C{status} with C{body} and C{headers}.
    """

    def __init__(self, status: int, body: bytes, headers: Headers, reason: str) -> None:
        super().__init__(status, reason)
        self.reason = reason
        self.headers = headers
        self._body = body

    def body(self) -> bytes:
        return self._body


class _Tab:
    """
    One counter a request may be charged: its budget, quota, and the
    value of the quota's key for this request.

    @ivar spent: what the counter held when the request was admitted.
    """

    __slots__ = ("budget", "quota", "value", "spent", "instance")

    def __init__(self, budget: Budget, quota: Quota, value: str, instance: str | None) -> None:
        self.budget = budget
        self.quota = quota
        self.value = value
        self.instance = instance
        self.spent = 0

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.quota.limit


class Admission:
    """
    The access checks and budget of one request.

    @ivar consumer: the consumer calling (L{None}: the route has no
        C{key-auth}).
    @ivar sent_key: where the consumer's key was sent (never forwarded).
    @ivar exhausted: the instances whose quota is spent.
    """

    def __init__(self, route: Route, request: Any, now: Callable[[], float]) -> None:
        self._route = route
        self._request = request
        self._now = now
        self.consumer: Consumer | None = None
        self.sent_key: SentKey | None = None
        self._tabs: list[_Tab] = []
        self.exhausted: frozenset[str] = frozenset()
        self._degraded = False

    def authenticate(self, context: Any) -> None:
        """
        Find the consumer, when the route has C{key-auth}, and name it in
        C{context}.

        @raise Refused: 401 without a key, or with a key no consumer has,
            in the client's protocol on a converted route.
        """
        key_auth = self._route.key_auth
        if key_auth is None:
            return
        try:
            # Usually found when the request's head came in.
            found = getattr(self._request, "authenticated", None)
            self.consumer, self.sent_key = found or key_auth.authenticate(self._request)
        except KeyRefused as e:
            body = client_error_body(self._route, context.path, 401, e.message)
            raise Refused(401, body, [(b"www-authenticate", [CHALLENGE])], e.reason) from None
        context.consumer = self._request.consumer_name = self.consumer.username

    @property
    def budgeted(self) -> bool:
        """
        Whether any budget applies to the request.
        """
        return self._route.budget is not None or (
            self.consumer is not None and self.consumer.budget is not None
        )

    def _open_tabs(self) -> None:
        """
        The counters this request may be charged.
        """
        tabs = self._tabs
        budget = self._route.budget
        if budget is not None:
            for instance in self._route.instances:
                quota = budget.instance_quota(instance.name)
                if quota is not None:
                    tabs.append(_Tab(budget, quota, "", instance.name))
            self._rule_tabs(budget)
        own = self.consumer.budget if self.consumer is not None else None
        if own is not None:
            if own.route_quota is not None:
                tabs.append(_Tab(own, own.route_quota, "", None))
            self._rule_tabs(own)

    def _rule_tabs(self, budget: Budget) -> None:
        def variable(name: str) -> str | None:
            if name == "route_id":
                return self._route.id
            if name == "consumer_name":
                return self.consumer.username if self.consumer is not None else None
            return request_variable(self._request, name)

        for quota in budget.rules:
            assert quota.key is not None
            self._tabs.append(_Tab(budget, quota, rule_value(quota.key, variable), None))

    def check(self) -> Deferred[None] | None:
        """
        Read the counters of the request's budgets.

        @return: L{None} when they were read at once (local counters), else
            a Deferred firing when they are.
        @raise Refused: when a quota other than an instance's is spent, or a
            store is unavailable without C{allow_degradation} (also through
            the Deferred).
        """
        self._open_tabs()
        now = self._now()
        by_store: dict[int, tuple[Any, list[_Tab]]] = {}
        for tab in self._tabs:
            by_store.setdefault(id(tab.budget.store), (tab.budget.store, []))[1].append(tab)
        pending: list[Deferred[Any]] = []
        for store, tabs in by_store.values():
            result = store.spent([tab.quota.counter_key(tab.value, now) for tab in tabs])
            if isinstance(result, Deferred):
                result.addCallbacks(
                    self._read, self._unreadable, callbackArgs=(tabs,), errbackArgs=(tabs,)
                )
                pending.append(result)
            else:
                self._read(result, tabs)
        if not pending:
            self._judge()
            return None
        if len(pending) == 1:
            d = pending[0]
        else:
            d = gatherResults(pending, consumeErrors=True)
            d.addErrback(lambda failure: failure.value.subFailure)
        return d.addCallback(lambda _: self._judge())

    def _read(self, spent: list[int], tabs: list[_Tab]) -> None:
        for tab, value in zip(tabs, spent, strict=True):
            tab.spent = value

    def _unreadable(self, failure: Failure, tabs: list[_Tab]) -> None:
        """
        A store could not be read: refuse, or (C{allow_degradation}) let
        the request through uncounted.
        """
        failure.trap(StoreUnavailable)
        cause = failure.value.cause
        if all(tab.budget.allow_degradation for tab in tabs):
            log.warn("rate limiting degraded, request allowed: {cause}", cause=cause)
            for tab in tabs:
                tab.spent = 0
            return
        raise Refused(
            503, error_body(f"rate limiting unavailable: {cause}"), [], "budget_unavailable"
        )

    def _judge(self) -> None:
        """
        Refuse the request when a quota of its own is spent; note the
        instances whose quota is.
        """
        for tab in self._tabs:
            if tab.instance is None and tab.exhausted:
                self._refuse(tab.budget)
        self.exhausted = frozenset(
            tab.instance for tab in self._tabs if tab.instance is not None and tab.exhausted
        )

    def first(self, failover: Failover, protocol: str) -> Instance | None:
        """
        The first attempt's instance, for a request in C{protocol}: among
        those whose quota is not spent when the route's
        C{fallback_strategy} skips them (C{rate_limiting}).

        @return: L{None} when no instance serves the request.
        @raise Refused: when the instance's quota is spent, or every
            instance's.
        """
        route = self._route
        exhausted = self.exhausted
        skipped = exhausted if route.fallback.on_rate_limit else frozenset()
        instance = failover.first(route.selection(self._request, protocol, skipped))
        if (instance is None and skipped) or (instance is not None and instance.name in exhausted):
            assert route.budget is not None
            self._refuse(route.budget, None if instance is None else instance.name)
        return instance

    def _refuse(self, budget: Budget, instance: str | None = None) -> None:
        """
        @raise Refused: with C{budget}'s C{rejected_code} and
            C{rejected_msg}, and the quota headers.
        """
        raise Refused(
            budget.rejected_code,
            _json({"error_msg": budget.rejected_msg}),
            self.headers(instance),
            "rate_limited",
        )

    def headers(self, instance: str | None) -> Headers:
        """
        The C{X-AI-RateLimit-*} headers of an answer from C{instance}.
        """
        now = self._now()
        out: Headers = []
        for tab in self._tabs:
            if not tab.budget.show_headers:
                continue
            if tab.instance is not None and tab.instance != instance:
                continue
            quota = tab.quota
            reset = max(0, math.ceil(quota.window_of(now)[1] - now))
            limit, remaining, reset_name = quota.header_names
            out.append((limit, [b"%d" % quota.limit]))
            out.append((remaining, [b"%d" % max(0, quota.limit - tab.spent)]))
            out.append((reset_name, [b"%d" % reset]))
        return out

    def charge(self, context: Any) -> None:
        """
        Charge what the request used to its counters (in the window it
        ends in), once it has ended.
        """
        if not self._tabs:
            return
        served = context.instance
        now = self._now()
        by_store: dict[int, tuple[Any, list[tuple[str, int, int]]]] = {}
        for tab in self._tabs:
            if tab.instance is not None and tab.instance != served:
                continue
            amount = tab.budget.cost(context)
            if amount <= 0:
                continue
            quota = tab.quota
            ttl = max(1, math.ceil(quota.window_of(now)[1] - now))
            store = tab.budget.store
            by_store.setdefault(id(store), (store, []))[1].append(
                (quota.counter_key(tab.value, now), amount, ttl)
            )
        for store, charges in by_store.values():
            result = store.charge(charges)
            if isinstance(result, Deferred):
                result.addErrback(_charge_failed, store)


def client_error_body(route: Route, path: str, status: int, message: str) -> bytes:
    """
    An error body before the client's body is read: in the client's
    protocol (guessed from the path) when the route converts it, else
    C{{"message": ...}}.
    """
    try:
        converter = route.instances[0].converter(detect_protocol(path, {"messages": []}) or "")
    except ClientError:
        converter = None
    return error_body(message) if converter is None else converter.convert_error(status, message)


def _charge_failed(failure: Failure, store: Any) -> None:
    log.warn(
        "tokens not charged to {store}: {cause}",
        store=store.description,
        cause=failure.value.cause if failure.check(StoreUnavailable) else failure.getErrorMessage(),
    )


def _json(document: Any) -> bytes:
    return json.dumps(document).encode("utf-8")
