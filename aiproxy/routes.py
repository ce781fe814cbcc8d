# -*- test-case-name: tests.test_routes -*-
"""
Routes: matching a request path to a route, and everything a route needs
at run time (its target, upstream client and filters), built once per
config load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from OpenSSL import crypto
from twisted.internet.defer import Deferred, gatherResults

from aiproxy.balancer import Balancer, Selection, hash_key_problem, request_hash_key
from aiproxy.config import Config, ConfigError, RouteConfig
from aiproxy.health import HealthChecker, HTTPProbe, ProbeTarget, parse_header_lines
from aiproxy.interfaces import IBodyFilterFactory, IFilterPlugin, IHealthProbe, IRequestFilter
from aiproxy.plugins import PluginConfigError
from aiproxy.protocols import PASSTHROUGH
from aiproxy.providers import Provider, UnsupportedProvider, get_provider
from aiproxy.request import Target, upstream_url
from aiproxy.schema import format_path
from aiproxy.upstream import UpstreamClient

__all__ = ["FallbackPolicy", "Instance", "Route", "RouteTable", "build_routes"]

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
    """

    name: str
    target: Target
    client: UpstreamClient
    weight: int = 1
    priority: int = 0
    checker: HealthChecker | None = None
    _urls: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def healthy(self) -> bool:
        """
        Whether the health check (if any) says the instance can be used.
        """
        return self.checker is None or self.checker.healthy

    def upstream_url(self, protocol: str, client_path: str, client_query: str) -> str:
        """
        The upstream URL of a request (see L{aiproxy.request.upstream_url});
        computed once per protocol unless it depends on the client's path.
        """
        if protocol == PASSTHROUGH:
            return upstream_url(self.target, protocol, client_path, client_query)
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
        C{instance_health_and_rate_limiting} retry on no status: aiproxy has
        no rate-limiting plugin whose state they would consult (health is
        always used when instances have checks).
        """
        strategy = conf.get("fallback_strategy") or ()
        names = {strategy} if isinstance(strategy, str) else set(strategy)
        return cls(
            on_429="http_429" in names,
            on_5xx="http_5xx" in names,
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

    @property
    def instance_name(self) -> str | None:
        """
        The name in records of requests no instance was picked for: the
        only instance's, or L{None} when there are several.
        """
        return self.instances[0].name if len(self.instances) == 1 else None

    def selection(self, request: Any, protocol: str) -> Selection[Instance]:
        """
        Start picking instances for C{request}, among those whose provider
        serves C{protocol}.
        """
        balancer = self.balancer
        key = None
        if balancer.algorithm == "chash":
            balancer_conf = self.conf.get("balancer") or {}
            hash_on = balancer_conf.get("hash_on", "vars")
            hash_key = balancer_conf.get("key")

            def key() -> str:
                return request_hash_key(request, hash_on, hash_key)

        return balancer.selection(lambda i: i.target.provider.serves(protocol), key)


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


def _configure_plugins(
    route: RouteConfig, plugins: Mapping[str, IFilterPlugin], path: list[str | int]
) -> tuple[list[IRequestFilter], list[IBodyFilterFactory]]:
    """
    Configure a route's filter plugins, highest priority first (file order
    among equals).

    @param path: the route's C{plugins} path, for messages.
    @raise ConfigError: for a plugin that is not installed, or whose
        C{configure} refused its config with L{PluginConfigError} (each
        problem at its path), L{ValueError} or L{re.error}.
    """
    request_filters: list[IRequestFilter] = []
    body_filters: list[IBodyFilterFactory] = []
    unknown = [name for name in route.plugins if name not in plugins]
    if unknown:
        raise ConfigError(
            [f"{format_path(path + [name])}: unknown plugin {name!r}" for name in unknown]
        )
    ordered = sorted(route.plugins.items(), key=lambda item: -plugins[item[0]].priority)
    problems: list[str] = []
    for name, conf in ordered:
        try:
            configured = plugins[name].configure(dict(conf))
        except PluginConfigError as e:
            # A config the schema allows but the plugin cannot use (a bad
            # regex), each problem at its own path.
            problems.extend(
                f"{format_path(path + [name, *where])}: {_one_line(reason)}"
                for where, reason in e.problems
            )
            continue
        except (ValueError, re.error) as e:
            problems.append(f"{format_path(path + [name])}: {_one_line(e)}")
            continue
        if IRequestFilter.providedBy(configured):
            request_filters.append(configured)
        if IBodyFilterFactory.providedBy(configured):
            body_filters.append(configured)
    if problems:
        raise ConfigError(problems)
    return request_filters, body_filters


def _latin1(value: str) -> bool:
    """
    Whether C{value} can be sent as an HTTP header value.
    """
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _one_line(error: Exception | str) -> str:
    """
    The message of C{error} on one line.
    """
    return " ".join(str(error).split()) or type(error).__name__


#: The C{ai-proxy-multi} fields that are not shared by its instances.
_MULTI_ONLY = frozenset(
    {
        "_meta",
        "instances",
        "balancer",
        "fallback_strategy",
        "fallback_http_statuses",
        "max_retries",
        "retry_on_failure_within_ms",
        "stream_commit_ms",
    }
)

#: The fields of an C{ai-proxy-multi} instance that make its target.
_INSTANCE_FIELDS = ("provider", "provider_conf", "auth", "options", "override")


def _target_problems(
    conf: Mapping[str, Any], path: list[str | int]
) -> tuple[Provider | None, list[str]]:
    """
    Check the provider rules of one target (an C{ai-proxy} config or an
    C{ai-proxy-multi} instance).

    @param path: the config's path, for messages.
    @return: the provider (L{None} when it is not served) and the problems.
    """
    try:
        provider = get_provider(conf["provider"])
    except UnsupportedProvider as e:
        return None, [f"{format_path(path + ['provider'])}: {e}"]
    problems = []
    if provider.base_url is None and not (conf.get("override") or {}).get("endpoint"):
        problems.append(
            f"{format_path(path + ['override', 'endpoint'])}: required for provider '{provider.name}'"
        )
    # Caught here rather than as a UnicodeEncodeError on every request.
    problems.extend(
        f"{format_path(path + ['auth', 'header', name])}: a header value must be ISO-8859-1 text"
        for name, value in ((conf.get("auth") or {}).get("header") or {}).items()
        if not value.isascii() and not _latin1(value)
    )
    return provider, problems


def _client(reactor: Any, conf: Mapping[str, Any], path: list[str | int]) -> UpstreamClient:
    """
    An upstream client with the plugin's keep-alive, timeout and TLS fields.

    @raise ConfigError: for an C{ssl_ca_file} that cannot be used.
    """
    try:
        return UpstreamClient(reactor, conf)
    except (OSError, ValueError) as e:
        raise ConfigError([f"{format_path(path + ['ssl_ca_file'])}: {_one_line(e)}"]) from None
    except crypto.Error:
        raise ConfigError(
            [
                f"{format_path(path + ['ssl_ca_file'])}: {conf['ssl_ca_file']} holds an invalid certificate"
            ]
        ) from None


def _probe_target(target: Target, active: Mapping[str, Any]) -> ProbeTarget:
    """
    Where and how an instance's C{checks.active} probes it: the host and
    port of its endpoint (or provider), with the instance's credentials as
    APISIX sends them (C{auth.header} as headers, C{auth.query} in the
    path), and nothing else.
    """
    conf = target.conf
    endpoint = (conf.get("override") or {}).get("endpoint") or target.provider.base_url or ""
    parts = urlsplit(endpoint)
    port = active.get("port") or parts.port or (443 if parts.scheme == "https" else 80)
    auth = conf.get("auth") or {}
    path = active.get("http_path", "/")
    if auth.get("query"):
        path += ("&" if "?" in path else "?") + urlencode(auth["query"])
    headers = parse_header_lines(active.get("req_headers") or ())
    given = {name.lower() for name, _ in headers}
    for name, value in (auth.get("header") or {}).items():
        if name.lower().encode("latin-1") not in given:
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
    if active.get("host"):
        headers = [(n, v) for n, v in headers if n.lower() != b"host"]
        headers.append((b"Host", active["host"].encode("idna")))
    return ProbeTarget(
        kind=active.get("type", "http"),
        host=parts.hostname or "",
        port=int(port),
        path=path,
        headers=tuple(headers),
        timeout=float(active.get("timeout", 1)),
        verify=bool(active.get("https_verify_certificate", True)),
    )


def _build_instances(
    route_id: str,
    conf: Mapping[str, Any],
    path: list[str | int],
    reactor: Any,
    probe: IHealthProbe | None,
) -> tuple[Instance, ...]:
    """
    The instances of an C{ai-proxy-multi} config, each with its own
    upstream client and, if it has C{checks.active} and is not alone, its
    health checker.

    @raise ConfigError: with every problem of the instances.
    """
    shared = {key: value for key, value in conf.items() if key not in _MULTI_ONLY}
    problems: list[str] = []
    targets: list[tuple[Mapping[str, Any], Target]] = []
    for position, item in enumerate(conf["instances"]):
        item_path = path + ["instances", position]
        target_conf = {**shared, **{k: item[k] for k in _INSTANCE_FIELDS if k in item}}
        provider, found = _target_problems(target_conf, item_path)
        problems.extend(found)
        if provider is not None:
            targets.append((item, Target(item["name"], provider, target_conf)))
    balancer = conf.get("balancer") or {}
    if balancer.get("algorithm") == "chash":
        problem = hash_key_problem(balancer.get("hash_on", "vars"), balancer.get("key"))
        if problem is not None:
            problems.append(f"{format_path(path + ['balancer', 'key'])}: {problem}")
    if problems:
        raise ConfigError(problems)
    checked = len(targets) > 1
    instances = []
    for item, target in targets:
        checker = None
        active = (item.get("checks") or {}).get("active")
        if active is not None and checked:
            if probe is None:
                probe = HTTPProbe(reactor, conf)
            checker = HealthChecker(
                target.name, route_id, _probe_target(target, active), active, probe, reactor
            )
        instances.append(
            Instance(
                name=target.name,
                target=target,
                client=_client(reactor, conf, path),
                weight=item["weight"],
                priority=item.get("priority", 0),
                checker=checker,
            )
        )
    return tuple(instances)


def _build_route(
    index: int,
    route: RouteConfig,
    reactor: Any,
    plugins: Mapping[str, IFilterPlugin],
    probe: IHealthProbe | None = None,
) -> Route:
    """
    Build one route.

    @raise ConfigError: for a provider this version does not serve, a
        missing endpoint, an unusable C{chash} key, or an C{ssl_ca_file}
        that cannot be read (each at its path).
    """
    path: list[str | int] = ["routes", index, "plugins", route.proxy_plugin]
    conf = route.proxy
    if route.proxy_plugin == "ai-proxy":
        provider, problems = _target_problems(conf, path)
        if problems:
            raise ConfigError(problems)
        assert provider is not None
        name = f"ai-proxy-{provider.name}"
        instances: tuple[Instance, ...] = (
            Instance(name, Target(name, provider, conf), _client(reactor, conf, path)),
        )
        fallback = FallbackPolicy()
    else:
        instances = _build_instances(route.id, conf, path, reactor, probe)
        fallback = FallbackPolicy.from_conf(conf)
    request_filters, body_filters = _configure_plugins(route, plugins, path[:-1])
    algorithm = (conf.get("balancer") or {}).get("algorithm", "roundrobin")
    return Route(
        id=route.id,
        uris=route.uris,
        methods=route.methods,
        conf=conf,
        instances=instances,
        balancer=Balancer(instances, algorithm),
        fallback=fallback,
        request_filters=request_filters,
        body_filters=body_filters,
    )


def build_routes(
    config: Config,
    reactor: Any,
    plugins: Mapping[str, IFilterPlugin] | None = None,
    probe: IHealthProbe | None = None,
) -> RouteTable:
    """
    Build the route table of a validated config. Health checkers are built
    but not started (see L{aiproxy.health.HealthService}).

    @param plugins: filter plugins by name; the installed ones by default.
    @param probe: sends the health-check probes; over the network with
        C{reactor} by default.
    @raise ConfigError: with every route problem found.
    """
    if plugins is None:
        from aiproxy.plugins import available_plugins

        plugins = available_plugins()
    routes: list[Route] = []
    problems: list[str] = []
    for index, route in enumerate(config.routes):
        try:
            routes.append(_build_route(index, route, reactor, plugins, probe))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return RouteTable(routes)
