# -*- test-case-name: tests.test_routes -*-
"""
Routes: matching a request path to a route, and everything a route needs
at run time (its instances, fallback policy and filters); they are built
once per config load by L{aiproxy.routing.build}.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, gatherResults

from aiproxy.convert import converter_for
from aiproxy.interfaces import IBodyFilterFactory, IConverter, IRequestFilter, IUpstreamAuth
from aiproxy.routing.balancer import Balancer, Selection, request_hash_key
from aiproxy.routing.health import HealthChecker
from aiproxy.stream.protocols import PASSTHROUGH
from aiproxy.upstream.client import UpstreamClient
from aiproxy.upstream.request import ClientError, Target, upstream_url

__all__ = ["FallbackPolicy", "Instance", "Route", "RouteTable"]

#: A C{.} or C{..} path segment, plain or percent-encoded.
_DOT_SEGMENT = re.compile(r"(?:^|/)(?:\.|%2e){1,2}(?:/|$)", re.IGNORECASE)


@dataclass
class Instance:
    """
    One upstream a route sends requests to: the single target of an
    C{ai-proxy} route (named C{ai-proxy-<provider>}), or one of the
    C{instances} of an C{ai-proxy-multi} route, with its own connection
    pool.

    @ivar target: the provider and the config requests are built from (the
        instance's fields over the plugin's shared ones).
    @ivar checker: its active health check, if it has one.
    @ivar auth: authorizes each request, when its provider needs more than
        the static C{auth.header} (a signature, an access token).
    """

    name: str
    target: Target
    client: UpstreamClient
    weight: int = 1
    priority: int = 0
    checker: HealthChecker | None = None
    auth: IUpstreamAuth | None = None
    _urls: dict[str, str] = field(default_factory=dict, repr=False)
    _converters: dict[str, IConverter | None] = field(default_factory=dict, repr=False)

    @property
    def healthy(self) -> bool:
        """
        Whether the health check (if any) says the instance can be used.
        """
        return self.checker is None or self.checker.healthy

    def converter(self, protocol: str) -> IConverter | None:
        """
        The converter of C{protocol} requests to this instance (L{None}:
        they go as they are); chosen once per protocol.

        @raise ClientError: 400 when the instance cannot serve C{protocol}.
        """
        try:
            return self._converters[protocol]
        except KeyError:
            converter = self._converters[protocol] = converter_for(self.target, protocol)
            return converter

    def accepts(self, protocol: str) -> bool:
        """
        Whether the instance serves C{protocol} requests (as they are, or
        converted).
        """
        try:
            self.converter(protocol)
        except ClientError:
            return False
        return True

    def upstream_url(
        self,
        protocol: str,
        client_path: str,
        client_query: str,
        body: Mapping[str, Any] | None = None,
    ) -> str:
        """
        The upstream URL of a request (see L{aiproxy.upstream.request.upstream_url});
        computed once per protocol unless it depends on the client's path or
        on the body (a provider with C{rules}, as bedrock).
        """
        if protocol == PASSTHROUGH or self.target.provider.rules is not None:
            return upstream_url(self.target, protocol, client_path, client_query, body)
        url = self._urls.get(protocol)
        if url is None:
            url = self._urls[protocol] = upstream_url(
                self.target, protocol, client_path, client_query
            )
        return url


@dataclass(frozen=True)
class FallbackPolicy:
    """
    When a failed attempt of an C{ai-proxy-multi} request is tried again on
    another instance.

    @ivar on_429: C{fallback_strategy} has C{http_429}.
    @ivar on_5xx: C{fallback_strategy} has C{http_5xx}.
    @ivar statuses: C{fallback_http_statuses}.
    @ivar max_retries: C{max_retries}: most fallbacks per request.
    @ivar within_ms: C{retry_on_failure_within_ms}: an attempt that failed
        later than this is not retried.
    @ivar commit_ms: C{stream_commit_ms}.
    """

    on_429: bool = False
    on_5xx: bool = False
    #: C{fallback_strategy} has C{rate_limiting} (or
    #: C{instance_health_and_rate_limiting}): instances whose token quota
    #: is spent are skipped.
    on_rate_limit: bool = False
    statuses: frozenset[int] = frozenset()
    max_retries: int | None = None
    within_ms: int | None = None
    commit_ms: int | None = None

    def allows(self, status: int) -> bool:
        """
        Whether a failure with C{status} may fall back.
        """
        if status in self.statuses:
            return True
        if status == 429:
            return self.on_429
        return self.on_5xx and 500 <= status < 600

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> FallbackPolicy:
        """
        The policy of an C{ai-proxy-multi} config. C{rate_limiting} and
        C{instance_health_and_rate_limiting} retry on no status: they skip
        the instances whose C{ai-rate-limiting} quota is spent (health is
        always used when instances have checks).
        """
        strategy = conf.get("fallback_strategy") or ()
        names = {strategy} if isinstance(strategy, str) else set(strategy)
        return cls(
            on_429="http_429" in names,
            on_5xx="http_5xx" in names,
            on_rate_limit=bool(names & {"rate_limiting", "instance_health_and_rate_limiting"}),
            statuses=frozenset(conf.get("fallback_http_statuses") or ()),
            max_retries=conf.get("max_retries"),
            within_ms=conf.get("retry_on_failure_within_ms"),
            commit_ms=conf.get("stream_commit_ms"),
        )


@dataclass
class Route:
    """
    One route, ready to serve.

    @ivar conf: the proxy plugin's config (limits, flush mode, timeouts).
    @ivar instances: where requests go: one for C{ai-proxy}, the
        C{instances} of C{ai-proxy-multi}.
    @ivar balancer: picks the instance of each attempt.
    @ivar fallback: when a failed attempt is tried again elsewhere.
    @ivar request_filters: request filters, highest priority first.
    @ivar body_filters: body-filter factories, highest priority first.
    @ivar key_auth: the route's L{aiproxy.access.keyauth.KeyAuth}, or
        L{None} (anyone may call).
    @ivar budget: the route's L{aiproxy.budget.limits.Budget}, or L{None}.
    """

    id: str
    uris: tuple[str, ...]
    methods: tuple[str, ...] | None
    conf: Mapping[str, Any]
    instances: tuple[Instance, ...]
    balancer: Balancer[Instance] = field(repr=False)
    fallback: FallbackPolicy = field(default_factory=FallbackPolicy)
    request_filters: Sequence[IRequestFilter] = ()
    body_filters: Sequence[IBodyFilterFactory] = ()
    key_auth: Any = None
    budget: Any = None
    _serving: dict[str, frozenset[int]] = field(default_factory=dict, repr=False)

    @property
    def instance_name(self) -> str | None:
        """
        The name in records of requests no instance was picked for: the
        only instance's, or L{None} when there are several.
        """
        return self.instances[0].name if len(self.instances) == 1 else None

    def serving(self, protocol: str) -> frozenset[int]:
        """
        The ids of the instances that serve C{protocol} requests (as they
        are, or converted); found once per protocol.
        """
        serving = self._serving.get(protocol)
        if serving is None:
            serving = frozenset(id(i) for i in self.instances if i.accepts(protocol))
            self._serving[protocol] = serving
        return serving

    def selection(
        self, request: Any, protocol: str, excluded: frozenset[str] = frozenset()
    ) -> Selection[Instance]:
        """
        Start picking instances for C{request}, among those that serve
        C{protocol} (as it is, or converted), but for those named in
        C{excluded}.
        """
        balancer = self.balancer
        key = None
        if balancer.algorithm == "chash":
            balancer_conf = self.conf.get("balancer") or {}
            hash_on = balancer_conf.get("hash_on", "vars")
            hash_key = balancer_conf.get("key")

            def key() -> str:
                return request_hash_key(request, hash_on, hash_key)

        serving = self.serving(protocol)
        if excluded:
            return balancer.selection(lambda i: id(i) in serving and i.name not in excluded, key)
        return balancer.selection(lambda i: id(i) in serving, key)


class RouteTable:
    """
    Finds the route of a request path: exact paths first, then the longest
    prefix (a path ending in C{*}, as C{/v1/*} or C{/v1*}); among equals,
    the first route in the file.
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._exact: dict[str, list[Route]] = {}
        prefixes: list[tuple[str, int, Route]] = []
        for order, route in enumerate(self.routes):
            for uri in route.uris:
                if uri.endswith("*"):
                    prefixes.append((uri[:-1], order, route))
                else:
                    self._exact.setdefault(uri, []).append(route)
        prefixes.sort(key=lambda item: (-len(item[0]), item[1]))
        self._prefixes = [(prefix, route) for prefix, _, route in prefixes]

    def match(self, path: str, method: str) -> Route | None:
        """
        The route serving C{method} C{path}, or L{None}. A path with a
        C{.} or C{..} segment (also percent-encoded) matches nothing: it
        would match a prefix route while naming a path outside it, and
        passthrough sends the client's path upstream as it is.
        """
        if ("." in path or "%" in path) and _DOT_SEGMENT.search(path):
            return None
        for route in self._exact.get(path, ()):
            if route.methods is None or method in route.methods:
                return route
        for prefix, route in self._prefixes:
            if path.startswith(prefix) and (route.methods is None or method in route.methods):
                return route
        return None

    @property
    def checkers(self) -> list[HealthChecker]:
        """
        The health checkers of every instance that has one.
        """
        return [
            instance.checker
            for route in self.routes
            for instance in route.instances
            if instance.checker is not None
        ]

    def close(self) -> Deferred[Any]:
        """
        Close every instance's idle upstream connections.
        """
        return gatherResults(
            [instance.client.close() for route in self.routes for instance in route.instances]
        )
