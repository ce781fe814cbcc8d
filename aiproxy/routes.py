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

from OpenSSL import crypto
from twisted.internet.defer import Deferred, gatherResults

from aiproxy.config import Config, ConfigError, RouteConfig
from aiproxy.interfaces import IBodyFilterFactory, IFilterPlugin, IRequestFilter
from aiproxy.plugins import PluginConfigError
from aiproxy.protocols import PASSTHROUGH
from aiproxy.providers import UnsupportedProvider, get_provider
from aiproxy.request import Target, upstream_url
from aiproxy.schema import format_path
from aiproxy.upstream import UpstreamClient

__all__ = ["Route", "RouteTable", "build_routes"]

#: A C{.} or C{..} path segment, plain or percent-encoded.
_DOT_SEGMENT = re.compile(r"(?:^|/)(?:\.|%2e){1,2}(?:/|$)", re.IGNORECASE)


@dataclass
class Route:
    """
    One route, ready to serve.

    @ivar conf: the proxy plugin's config (limits, flush mode, timeouts).
    @ivar request_filters: request filters, highest priority first.
    @ivar body_filters: body-filter factories, highest priority first.
    """

    id: str
    uris: tuple[str, ...]
    methods: tuple[str, ...] | None
    conf: Mapping[str, Any]
    target: Target
    client: UpstreamClient
    request_filters: Sequence[IRequestFilter] = ()
    body_filters: Sequence[IBodyFilterFactory] = ()
    _urls: dict[str, str] = field(default_factory=dict, repr=False)

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

    def close(self) -> Deferred[Any]:
        """
        Close every route's idle upstream connections.
        """
        return gatherResults([route.client.close() for route in self.routes])


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


def _build_route(
    index: int, route: RouteConfig, reactor: Any, plugins: Mapping[str, IFilterPlugin]
) -> Route:
    """
    Build one route.

    @raise ConfigError: for a provider this version does not serve, or an
        C{ssl_ca_file} that cannot be read.
    """
    path: list[str | int] = ["routes", index, "plugins", route.proxy_plugin]
    conf = route.proxy
    if route.proxy_plugin != "ai-proxy":
        raise ConfigError([f"{format_path(path)}: ai-proxy-multi is not supported by this version"])
    try:
        provider = get_provider(conf["provider"])
    except UnsupportedProvider as e:
        raise ConfigError([f"{format_path(path + ['provider'])}: {e}"]) from None
    if provider.base_url is None and not (conf.get("override") or {}).get("endpoint"):
        raise ConfigError(
            [
                f"{format_path(path + ['override', 'endpoint'])}: required for provider '{provider.name}'"
            ]
        )
    unsendable = [
        name
        for name, value in ((conf.get("auth") or {}).get("header") or {}).items()
        if not value.isascii() and not _latin1(value)
    ]
    if unsendable:
        # Caught here rather than as a UnicodeEncodeError on every request.
        raise ConfigError(
            [
                f"{format_path(path + ['auth', 'header', name])}: "
                "a header value must be ISO-8859-1 text"
                for name in unsendable
            ]
        )
    try:
        client = UpstreamClient(reactor, conf)
    except (OSError, ValueError) as e:
        raise ConfigError([f"{format_path(path + ['ssl_ca_file'])}: {_one_line(e)}"]) from None
    except crypto.Error:
        raise ConfigError(
            [
                f"{format_path(path + ['ssl_ca_file'])}: {conf['ssl_ca_file']} holds an invalid certificate"
            ]
        ) from None
    request_filters, body_filters = _configure_plugins(route, plugins, path[:-1])
    return Route(
        id=route.id,
        uris=route.uris,
        methods=route.methods,
        conf=conf,
        target=Target(f"ai-proxy-{provider.name}", provider, conf),
        client=client,
        request_filters=request_filters,
        body_filters=body_filters,
    )


def build_routes(
    config: Config, reactor: Any, plugins: Mapping[str, IFilterPlugin] | None = None
) -> RouteTable:
    """
    Build the route table of a validated config.

    @param plugins: filter plugins by name; the installed ones by default.
    @raise ConfigError: with every route problem found.
    """
    if plugins is None:
        from aiproxy.plugins import available_plugins

        plugins = available_plugins()
    routes: list[Route] = []
    problems: list[str] = []
    for index, route in enumerate(config.routes):
        try:
            routes.append(_build_route(index, route, reactor, plugins))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return RouteTable(routes)
