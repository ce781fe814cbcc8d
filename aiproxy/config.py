# -*- test-case-name: tests.test_config -*-
"""
The configuration file: YAML, C{${ENV}} substitution, JSON Schema validation
with defaults, and the immutable objects the rest of aiproxy reads.

Every problem is reported as C{<json path>: <reason>}, all of them at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import yaml

from aiproxy.access.consumers import consumer_problems
from aiproxy.schema import Problem, format_path, load_schema, path_key, schema_problems

__all__ = [
    "DEFAULT_LISTEN",
    "PROXY_PLUGINS",
    "ACCESS_PLUGINS",
    "Config",
    "ConfigError",
    "ConsumerConfig",
    "RouteConfig",
    "load_config",
    "parse_config",
]

DEFAULT_LISTEN = "tcp:port=9080:interface=127.0.0.1"
PROXY_PLUGINS = ("ai-proxy", "ai-proxy-multi")
#: Plugins that decide whether a request is served, before any filter.
ACCESS_PLUGINS = ("key-auth", "ai-rate-limiting")

#: C{${NAME}} or C{${NAME:-default}}.
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """
    The configuration is invalid.

    @ivar problems: one C{"<json path>: <reason>"} line per problem.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class RouteConfig:
    """
    One validated route.

    @ivar id: the route's C{id}, or C{route-<index>}.
    @ivar uris: exact paths, or prefixes ending in C{/*}.
    @ivar methods: allowed HTTP methods, or L{None} for any.
    @ivar proxy_plugin: C{ai-proxy} or C{ai-proxy-multi}.
    @ivar proxy: that plugin's config, defaults filled in.
    @ivar plugins: the filter plugins' configs by name, defaults filled in.
    @ivar key_auth: the C{key-auth} config, or L{None} (anyone may call).
    @ivar rate_limiting: the C{ai-rate-limiting} config, or L{None}.
    """

    id: str
    uris: tuple[str, ...]
    methods: tuple[str, ...] | None
    proxy_plugin: str
    proxy: Mapping[str, Any]
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    key_auth: Mapping[str, Any] | None = None
    rate_limiting: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ConsumerConfig:
    """
    One validated consumer.

    @ivar key_auth: its C{key-auth} config (C{key} or C{key_sha256}).
    @ivar rate_limiting: its own C{ai-rate-limiting} budget, or L{None}.
    """

    username: str
    key_auth: Mapping[str, Any]
    rate_limiting: Mapping[str, Any] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """
    A whole validated configuration file.

    @ivar workers: worker processes (C{"auto"}: one per core).
    @ivar client_header_timeout: seconds for a whole request head.
    @ivar client_body_timeout: seconds for a request body, extended by one
        per C{client_body_min_rate} bytes received.
    @ivar max_client_connections: client connections open at once, at most.
    """

    listen: tuple[str, ...]
    routes: tuple[RouteConfig, ...]
    metrics_listen: str | None = None
    shutdown_grace_s: float = 30.0
    source: str | None = None
    consumers: tuple[ConsumerConfig, ...] = ()
    workers: int | str = 1
    client_header_timeout: float = 30.0
    client_body_timeout: float = 30.0
    client_body_min_rate: int = 500
    max_client_connections: int = 10000


def _yaml_reason(error: yaml.YAMLError) -> str:
    """
    A one-line description of a YAML syntax error.
    """
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or (str(error).splitlines() or [""])[0]
    problem = _one_line(problem)
    if mark is None:
        return problem
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


def _substitute(
    node: Any, environ: Mapping[str, str], path: list[str | int], problems: list[Problem]
) -> Any:
    """
    Replace C{${VAR}} (or C{${VAR:-default}}) in every string of a parsed
    YAML document.

    @param problems: a problem is appended per unset variable.
    """
    if isinstance(node, str):

        def lookup(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name not in environ:
                if default is not None:
                    return default
                problems.append((path, f"environment variable {name} is not set"))
                return ""
            return environ[name]

        return _ENV_REFERENCE.sub(lookup, node) if "${" in node else node
    if isinstance(node, list):
        return [_substitute(item, environ, path + [i], problems) for i, item in enumerate(node)]
    if isinstance(node, dict):
        return {k: _substitute(v, environ, path + [str(k)], problems) for k, v in node.items()}
    return node


def _route_problems(
    index: int,
    route: dict,
    plugin_schemas: Mapping[str, Mapping[str, Any]],
    skip: list[list[str | int]],
) -> Iterator[Problem]:
    """
    Validate one route's C{plugins} map against each named plugin's schema.

    @param skip: paths already reported.
    """
    plugins = route.get("plugins")
    prefix: list[str | int] = ["routes", index, "plugins"]
    if not isinstance(plugins, dict):
        return
    proxies = [name for name in PROXY_PLUGINS if name in plugins]
    if len(proxies) != 1:
        yield prefix, "exactly one of 'ai-proxy' or 'ai-proxy-multi' is required"
    for name, conf in plugins.items():
        schema = plugin_schemas.get(name)
        if schema is None:
            yield prefix + [str(name)], f"unknown plugin {name!r}"
            continue
        if conf is None:
            conf = plugins[name] = {}
        yield from schema_problems(conf, schema, prefix + [name], skip)
    multi = plugins.get("ai-proxy-multi")
    instances = multi.get("instances") if isinstance(multi, dict) else None
    if isinstance(instances, list):
        seen: list[Any] = []
        for position, instance in enumerate(instances):
            name = instance.get("name") if isinstance(instance, dict) else None
            if name is None:
                continue
            if name in seen:
                yield (
                    prefix + ["ai-proxy-multi", "instances", position, "name"],
                    f"duplicate instance name {name!r}",
                )
            seen.append(name)


def _build_route(index: int, route: dict) -> RouteConfig:
    """
    Turn one validated route document into a L{RouteConfig}.
    """
    plugins = dict(route["plugins"])
    proxy_plugin = next(name for name in PROXY_PLUGINS if name in plugins)
    proxy = plugins.pop(proxy_plugin)
    key_auth = plugins.pop("key-auth", None)
    rate_limiting = plugins.pop("ai-rate-limiting", None)
    methods = route.get("methods")
    return RouteConfig(
        id=route.get("id", f"route-{index}"),
        uris=tuple(route["uris"]) if "uris" in route else (route["uri"],),
        methods=tuple(methods) if methods else None,
        proxy_plugin=proxy_plugin,
        proxy=proxy,
        plugins=plugins,
        key_auth=key_auth,
        rate_limiting=rate_limiting,
    )


def _build_consumer(consumer: dict) -> ConsumerConfig:
    """
    Turn one validated consumer document into a L{ConsumerConfig}.
    """
    plugins = consumer["plugins"]
    return ConsumerConfig(
        username=consumer["username"],
        key_auth=plugins["key-auth"],
        rate_limiting=plugins.get("ai-rate-limiting"),
        labels=consumer.get("labels", {}),
    )


def default_plugin_schemas() -> dict[str, Mapping[str, Any]]:
    """
    The schemas of the proxy plugins and every installed filter plugin.
    """
    from aiproxy.plugins import plugin_schemas

    schemas: dict[str, Mapping[str, Any]] = {
        name: load_schema(name) for name in PROXY_PLUGINS + ACCESS_PLUGINS
    }
    schemas.update(plugin_schemas())
    return schemas


def parse_config(
    text: str,
    environ: Mapping[str, str] | None = None,
    plugin_schemas: Mapping[str, Mapping[str, Any]] | None = None,
    source: str | None = None,
) -> Config:
    """
    Parse and validate a configuration document.

    @param text: the YAML text.
    @param environ: variables for C{${VAR}}; L{os.environ} by default.
    @param plugin_schemas: config schemas by plugin name; the installed
        plugins' by default.
    @param source: where the text came from, for messages.
    @raise ConfigError: with every problem found.
    """
    if environ is None:
        environ = os.environ
    if plugin_schemas is None:
        plugin_schemas = default_plugin_schemas()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"(root): invalid YAML: {_yaml_reason(e)}"]) from None
    except (ValueError, OverflowError) as e:
        # An out-of-range value the resolver recognised, e.g. 2001-13-45.
        raise ConfigError([f"(root): invalid YAML: {_one_line(str(e))}"]) from None
    except RecursionError:
        raise ConfigError(["(root): invalid YAML: nested too deeply"]) from None
    if document is None:
        document = {}
    try:
        return _validate(document, environ, plugin_schemas, source)
    except RecursionError:
        raise ConfigError(["(root): the document is nested too deeply"]) from None


def _one_line(text: str) -> str:
    """
    C{text} on one line (a problem is always exactly one line).
    """
    return " ".join(text.split()) or "unknown error"


#: Endpoint types whose strings can be parsed without side effects or an
#: environment (systemd endpoints need the sockets systemd passes).
_PARSED_ENDPOINTS = frozenset({"tcp", "tcp6", "unix", "ssl"})


@cache
def _endpoint_plugin_prefixes() -> frozenset[str]:
    """
    The endpoint types installed plugins add (e.g. C{le:}), looked up once.
    """
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    return frozenset(
        parser.prefix.lower() for parser in getPlugins(IStreamServerEndpointStringParser)
    )


def _endpoint_problem(description: str) -> str | None:
    """
    What is wrong with a server endpoint string, as far as can be told
    before listening: an unknown type, or arguments its parser refuses
    (a port that is not a number, an unknown option, an C{ssl:} key that
    cannot be read).
    """
    from twisted.internet.endpoints import serverFromString

    kind = description.split(":", 1)[0].strip().lower()
    if kind in _PARSED_ENDPOINTS:
        try:
            serverFromString(None, description)
        except Exception as e:  # each parser raises its own kind
            return f"invalid endpoint {description!r}: {_one_line(str(e))}"
        return None
    if kind == "systemd":
        return None
    if kind not in _endpoint_plugin_prefixes():
        return f"invalid endpoint {description!r}: unknown endpoint type {kind!r}"
    return None


def _endpoint_problems(
    document: Mapping[str, Any], reported: list[list[str | int]]
) -> Iterator[Problem]:
    """
    Check the C{listen} and C{metrics_listen} endpoint strings that passed
    the schema.

    @param reported: paths already reported.
    """
    listen = document.get("listen")
    candidates: list[tuple[list[str | int], Any]] = []
    if isinstance(listen, str):
        candidates.append((["listen"], listen))
    elif isinstance(listen, list):
        candidates.extend((["listen", i], item) for i, item in enumerate(listen))
    candidates.append((["metrics_listen"], document.get("metrics_listen")))
    for path, description in candidates:
        if not isinstance(description, str) or not description:
            continue
        if any(path[: len(done)] == done for done in reported):
            continue
        problem = _endpoint_problem(description)
        if problem is not None:
            yield path, problem


def _validate(
    document: Any,
    environ: Mapping[str, str],
    plugin_schemas: Mapping[str, Mapping[str, Any]],
    source: str | None,
) -> Config:
    """
    Substitute variables in a parsed document, validate it and build the
    L{Config}.

    @raise ConfigError: with every problem found.
    """
    problems: list[Problem] = []
    document = _substitute(document, environ, [], problems)
    unset = [path for path, _ in problems]
    problems.extend(schema_problems(document, load_schema("config"), skip=unset))
    if isinstance(document, dict):
        problems.extend(_endpoint_problems(document, [path for path, _ in problems]))
    routes = document.get("routes") if isinstance(document, dict) else None
    if isinstance(routes, list):
        ids = []
        for index, route in enumerate(routes):
            if isinstance(route, dict):
                problems.extend(_route_problems(index, route, plugin_schemas, unset))
                route_id = route.get("id", f"route-{index}")
                if route_id in ids:
                    problems.append((["routes", index, "id"], f"duplicate route id {route_id!r}"))
                ids.append(route_id)
    if isinstance(document, dict):
        reported = [path for path, _ in problems]
        problems.extend(
            (path, message)
            for path, message in consumer_problems(document.get("consumers"))
            if not any(path[: len(done)] == done for done in reported)
        )
    if problems:
        problems.sort(key=lambda problem: path_key(problem[0]))
        raise ConfigError([f"{format_path(path)}: {message}" for path, message in problems])
    listen = document["listen"]
    config = Config(
        listen=(listen,) if isinstance(listen, str) else tuple(listen),
        routes=tuple(_build_route(i, r) for i, r in enumerate(document["routes"])),
        metrics_listen=document.get("metrics_listen"),
        shutdown_grace_s=float(document["shutdown_grace_s"]),
        source=source,
        consumers=tuple(_build_consumer(c) for c in document["consumers"]),
        workers=document["workers"],
        client_header_timeout=float(document["client_header_timeout"]),
        client_body_timeout=float(document["client_body_timeout"]),
        client_body_min_rate=document["client_body_min_rate"],
        max_client_connections=document["max_client_connections"],
    )
    return config


def load_config(
    path: str,
    environ: Mapping[str, str] | None = None,
    plugin_schemas: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """
    Read, parse and validate the configuration file at C{path}.

    @raise ConfigError: with every problem found, or if the file cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"(root): cannot read {path}: {e.strerror}"]) from None
    return parse_config(text, environ, plugin_schemas, source=path)
