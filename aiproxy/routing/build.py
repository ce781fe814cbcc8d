# -*- test-case-name: tests.test_routes -*-
"""
Building the route table of a validated config: each route's instances
(target, upstream client, health check), fallback policy and filters, with
every problem found reported at once with its field's path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from OpenSSL import crypto

from aiproxy.access.consumers import ConsumerTable
from aiproxy.budget.stores import CounterStores, process_stores
from aiproxy.config import Config, ConfigError, RouteConfig
from aiproxy.interfaces import (
    IBodyFilterFactory,
    IFilterPlugin,
    IHealthProbe,
    IRequestFilter,
    IUpstreamAuth,
)
from aiproxy.plugins import PluginConfigError
from aiproxy.routing.access import build_consumers, route_access
from aiproxy.routing.balancer import Balancer, hash_key_problem
from aiproxy.routing.health import HealthChecker, HTTPProbe, ProbeTarget, parse_header_lines
from aiproxy.routing.routes import FallbackPolicy, Instance, Route, RouteTable
from aiproxy.schema import format_path
from aiproxy.upstream.client import UpstreamClient
from aiproxy.upstream.gcp import gcp_auth
from aiproxy.upstream.gcp_account import load_service_account
from aiproxy.upstream.providers import Provider, UnsupportedProvider, get_provider
from aiproxy.upstream.request import Target, default_base_url

__all__ = ["build_routes"]


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
    problems: list[str] = []
    rules = provider.rules
    if rules is not None:
        problems.extend(
            f"{format_path(path + list(where))}: {reason}" for where, reason in rules.problems(conf)
        )
    elif provider.base_url is None and not (conf.get("override") or {}).get("endpoint"):
        problems.append(
            f"{format_path(path + ['override', 'endpoint'])}: required for provider '{provider.name}'"
        )
    # Caught here rather than as a UnicodeEncodeError on every request.
    problems.extend(
        f"{format_path(path + ['auth', 'header', name])}: a header value must be ISO-8859-1 text"
        for name, value in ((conf.get("auth") or {}).get("header") or {}).items()
        if not value.isascii() and not _latin1(value)
    )
    gcp = (conf.get("auth") or {}).get("gcp")
    if gcp is not None:
        # The key is loaded at start-up: a bad one is a config error.
        try:
            load_service_account(gcp)
        except ValueError as e:
            where = format_path(path + ["auth", "gcp", "service_account_json"])
            problems.append(f"{where}: {e}")
    return provider, problems


def _auth(target: Target, reactor: Any, client: UpstreamClient) -> IUpstreamAuth | None:
    """
    What authorizes the target's requests beyond static headers (bedrock:
    a SigV4 signer), as its provider's rules say; else, with C{auth.gcp},
    a Google access token fetched through the instance's C{client}.
    """
    rules = target.provider.rules
    auth = rules.auth(target.conf, reactor) if rules is not None else None
    if auth is None and (target.conf.get("auth") or {}).get("gcp") is not None:
        auth = gcp_auth(target.conf, client, reactor)
    return auth


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
    endpoint = (conf.get("override") or {}).get("endpoint") or default_base_url(target) or ""
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
        client = _client(reactor, conf, path)
        instances.append(
            Instance(
                name=target.name,
                target=target,
                client=client,
                weight=item["weight"],
                priority=item.get("priority", 0),
                checker=checker,
                auth=_auth(target, reactor, client),
            )
        )
    return tuple(instances)


def _build_route(
    index: int,
    route: RouteConfig,
    reactor: Any,
    plugins: Mapping[str, IFilterPlugin],
    probe: IHealthProbe | None,
    consumers: ConsumerTable,
    stores: CounterStores,
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
        target = Target(name, provider, conf)
        client = _client(reactor, conf, path)
        instances: tuple[Instance, ...] = (
            Instance(name, target, client, auth=_auth(target, reactor, client)),
        )
        fallback = FallbackPolicy()
    else:
        instances = _build_instances(route.id, conf, path, reactor, probe)
        fallback = FallbackPolicy.from_conf(conf)
    request_filters, body_filters = _configure_plugins(route, plugins, path[:-1])
    key_auth, budget = route_access(
        index, route, [instance.name for instance in instances], consumers, stores
    )
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
        key_auth=key_auth,
        budget=budget,
    )


def build_routes(
    config: Config,
    reactor: Any,
    plugins: Mapping[str, IFilterPlugin] | None = None,
    probe: IHealthProbe | None = None,
    stores: CounterStores | None = None,
) -> RouteTable:
    """
    Build the route table of a validated config. Health checkers are built
    but not started (see L{aiproxy.routing.health.HealthService}).

    @param plugins: filter plugins by name; the installed ones by default.
    @param probe: sends the health-check probes; over the network with
        C{reactor} by default.
    @param stores: where budgets count; the process's by default.
    @raise ConfigError: with every route problem found.
    """
    if plugins is None:
        from aiproxy.plugins import available_plugins

        plugins = available_plugins()
    if stores is None:
        stores = process_stores(reactor)
    routes: list[Route] = []
    problems: list[str] = []
    try:
        consumers = build_consumers(config, stores)
    except ConfigError as e:
        problems.extend(e.problems)
        consumers = ConsumerTable()
    for index, route in enumerate(config.routes):
        try:
            routes.append(_build_route(index, route, reactor, plugins, probe, consumers, stores))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return RouteTable(routes)
