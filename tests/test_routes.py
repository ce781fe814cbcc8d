# -*- test-case-name: tests.test_routes -*-
"""
Tests for L{aiproxy.routing.routes}: matching request paths to routes and building
routes (targets, upstream clients, filter plugins) from a validated config.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aiproxy.config import PROXY_PLUGINS, ConfigError, parse_config
from aiproxy.interfaces import IBodyFilterFactory, IFilterPlugin, IRequestFilter
from aiproxy.routing.build import build_routes
from aiproxy.routing.routes import Route, RouteTable
from aiproxy.schema import load_schema
from aiproxy.stream.protocols import OPENAI_CHAT, PASSTHROUGH
from aiproxy.upstream import providers


@implementer(IRequestFilter)
class RecordingRequestFilter:
    """
    A request filter that does nothing; it remembers its plugin's name.
    """

    def __init__(self, name: str, config: dict) -> None:
        self.name = name
        self.config = config

    def filter_request(self, context: object) -> None:
        return None


@implementer(IBodyFilterFactory)
class RecordingBodyFilterFactory:
    """
    A body-filter factory that never filters; it remembers its plugin's name.
    """

    def __init__(self, name: str, config: dict) -> None:
        self.name = name
        self.config = config

    def body_filter(self, context: object) -> None:
        return None


@implementer(IRequestFilter, IBodyFilterFactory)
class BothFilter(RecordingRequestFilter):
    """
    A configured plugin that is both a request and a body filter.
    """

    def body_filter(self, context: object) -> None:
        return None


@implementer(IFilterPlugin)
class FakePlugin:
    """
    A filter plugin as a third-party package would ship it.

    @ivar configured: the configs passed to L{configure}.
    """

    config_schema = {
        "type": "object",
        "properties": {"level": {"type": "integer", "default": 1}, "pattern": {"type": "string"}},
        "additionalProperties": False,
    }

    def __init__(self, name: str, priority: int, kind: type = RecordingRequestFilter) -> None:
        self.name = name
        self.priority = priority
        self.kind = kind
        self.configured: list[dict] = []

    def configure(self, config: dict) -> object:
        self.configured.append(config)
        if "pattern" in config:
            re.compile(config["pattern"])
        return self.kind(self.name, config)


def make_plugins() -> dict[str, FakePlugin]:
    """
    Three fake plugins of different kinds and priorities.
    """
    return {
        "low": FakePlugin("low", 10),
        "high": FakePlugin("high", 2000),
        "body-mid": FakePlugin("body-mid", 500, RecordingBodyFilterFactory),
        "both": FakePlugin("both", 1000, BothFilter),
        "also-low": FakePlugin("also-low", 10),
    }


def config_of(routes: list[dict[str, Any]], plugins: dict[str, FakePlugin] | None = None) -> Any:
    """
    A validated config with C{routes}, knowing the schemas of C{plugins}.
    """
    schemas: dict[str, Any] = {name: load_schema(name) for name in PROXY_PLUGINS}
    for name, plugin in (plugins or {}).items():
        schemas[name] = plugin.config_schema
    return parse_config(
        yaml.safe_dump({"routes": routes}, sort_keys=False), environ={}, plugin_schemas=schemas
    )


def route_doc(uri: str | list[str], provider: str = "openai", **extra: Any) -> dict[str, Any]:
    """
    One route document on C{uri} (or C{uris}) to C{provider}.
    """
    proxy: dict[str, Any] = {
        "provider": provider,
        "auth": {"header": {"Authorization": "Bearer k"}},
    }
    plugins = extra.pop("plugins", {})
    proxy.update(extra.pop("proxy", {}))
    doc: dict[str, Any] = {"plugins": {"ai-proxy": proxy, **plugins}, **extra}
    doc["uris" if isinstance(uri, list) else "uri"] = uri
    return doc


def table_of(*routes: dict[str, Any]) -> RouteTable:
    """
    The route table of a config holding C{routes}.
    """
    return build_routes(config_of(list(routes)), MemoryReactorClock(), plugins={})


class MatchTests(SynchronousTestCase):
    """
    L{RouteTable.match}: exact paths first, then the longest prefix, then
    file order; C{methods} filters.
    """

    def ids(self, table: RouteTable, *paths: str, method: str = "POST") -> list[str | None]:
        """
        The id of the route matching each path, or L{None}.
        """
        found = [table.match(path, method) for path in paths]
        return [route.id if route else None for route in found]

    def test_exact(self) -> None:
        """
        An exact path matches only itself.
        """
        table = table_of(route_doc("/v1/chat/completions", id="chat"))
        self.assertEqual(
            self.ids(table, "/v1/chat/completions", "/v1/chat/completions/x", "/v1/chat", "/"),
            ["chat", None, None, None],
        )

    def test_prefix(self) -> None:
        """
        A path ending in C{/*} matches everything under it.
        """
        table = table_of(route_doc("/v1/*", id="v1"))
        self.assertEqual(
            self.ids(table, "/v1/", "/v1/chat/completions", "/v2/chat", "/v1x"),
            ["v1", "v1", None, None],
        )

    def test_bare_star_prefix(self) -> None:
        """
        A path ending in C{*} without a slash is a plain string prefix, as
        in APISIX (C{/v1*} matches C{/v1} and C{/v1beta/x}).
        """
        table = table_of(route_doc("/v1*", id="v1"))
        self.assertEqual(self.ids(table, "/v1", "/v1beta/x", "/v2"), ["v1", "v1", None])

    def test_catch_all(self) -> None:
        """
        C{/*} matches every path.
        """
        table = table_of(route_doc("/*", id="all"))
        self.assertEqual(self.ids(table, "/", "/anything/at/all"), ["all", "all"])

    def test_exact_before_prefix(self) -> None:
        """
        An exact path wins over a prefix listed earlier in the file.
        """
        table = table_of(route_doc("/v1/*", id="prefix"), route_doc("/v1/chat", id="exact"))
        self.assertEqual(self.ids(table, "/v1/chat", "/v1/other"), ["exact", "prefix"])

    def test_longest_prefix(self) -> None:
        """
        The longest matching prefix wins, whatever the file order.
        """
        table = table_of(
            route_doc("/*", id="all"),
            route_doc("/v1/*", id="v1"),
            route_doc("/v1/chat/*", id="chat"),
        )
        self.assertEqual(
            self.ids(table, "/v1/chat/x", "/v1/embeddings", "/v2"), ["chat", "v1", "all"]
        )

    def test_file_order(self) -> None:
        """
        Among routes with the same path, the first in the file wins.
        """
        table = table_of(
            route_doc("/a", id="first"),
            route_doc("/a", id="second"),
            route_doc("/p/*", id="p1"),
            route_doc("/p/*", id="p2"),
        )
        self.assertEqual(self.ids(table, "/a", "/p/x"), ["first", "p1"])

    def test_uris(self) -> None:
        """
        A route with several paths matches each of them.
        """
        table = table_of(route_doc(["/a", "/b/*"], id="multi"))
        self.assertEqual(self.ids(table, "/a", "/b/c", "/c"), ["multi", "multi", None])

    def test_methods(self) -> None:
        """
        A route with C{methods} matches only those methods; a request with
        another method falls through to the next candidate.
        """
        table = table_of(
            route_doc("/a", id="get-only", methods=["GET"]),
            route_doc("/a", id="any"),
            route_doc("/b/*", id="post-only", methods=["POST"]),
        )
        self.assertEqual(self.ids(table, "/a", method="GET"), ["get-only"])
        self.assertEqual(self.ids(table, "/a", method="POST"), ["any"])
        self.assertEqual(self.ids(table, "/b/x", method="POST"), ["post-only"])
        self.assertEqual(self.ids(table, "/b/x", method="GET"), [None])

    def test_dot_segments(self) -> None:
        """
        A path with C{.} or C{..} segments, plain or percent-encoded,
        matches no route (it could leave a prefix route's scope upstream);
        dots inside names are fine.
        """
        table = table_of(route_doc("/v1/*", id="v1"), route_doc("/*", id="all"))
        self.assertEqual(
            self.ids(
                table,
                "/v1/../admin",
                "/v1/%2e%2E/admin",
                "/v1/.%2e",
                "/v1/./chat",
                "/..",
                "/v1/%2E/x",
            ),
            [None] * 6,
        )
        self.assertEqual(
            self.ids(table, "/v1/models/gpt-4.1", "/v1/.well-known", "/v1/a..b", "/v1/100%25"),
            ["v1"] * 4,
        )

    def test_no_routes(self) -> None:
        """
        An empty table matches nothing.
        """
        self.assertIsNone(RouteTable([]).match("/", "GET"))


class BuildRoutesTests(SynchronousTestCase):
    """
    L{build_routes} turns a validated config into ready routes, refusing
    what this version cannot serve.
    """

    def build(self, *routes: dict[str, Any]) -> RouteTable:
        """
        Build the routes of a config holding C{routes}.
        """
        return build_routes(config_of(list(routes)), MemoryReactorClock(), plugins={})

    def problems(self, *routes: dict[str, Any]) -> list[str]:
        """
        The problems of building C{routes}.
        """
        return self.assertRaises(ConfigError, self.build, *routes).problems

    def test_route(self) -> None:
        """
        A route carries its id, paths, methods, config and target; the
        target of an C{ai-proxy} route is named C{ai-proxy-<provider>}.
        """
        table = self.build(route_doc("/a", id="chat", methods=["POST"], proxy={"timeout": 5}))
        [route] = table.routes
        self.assertIsInstance(route, Route)
        self.assertEqual((route.id, route.uris, route.methods), ("chat", ("/a",), ("POST",)))
        self.assertEqual(route.conf["timeout"], 5)
        [instance] = route.instances
        self.assertEqual(instance.name, "ai-proxy-openai")
        self.assertEqual(instance.target.name, "ai-proxy-openai")
        self.assertEqual(instance.target.provider.name, "openai")
        self.assertIs(instance.target.conf, route.conf)
        self.assertEqual((route.request_filters, route.body_filters), ([], []))

    def test_unsupported_provider(self) -> None:
        """
        A provider the schema knows but this version does not serve is a
        problem at the route's C{provider}.
        """
        # Every provider the schema names is served: take one out.
        served = {name: p for name, p in providers.PROVIDERS.items() if name != "bedrock"}
        self.patch(providers, "PROVIDERS", served)
        self.assertEqual(
            self.problems(route_doc("/a", "bedrock")),
            [
                "routes[0].plugins.ai-proxy.provider: provider 'bedrock' is not supported by this version"
            ],
        )

    def test_endpoint_required(self) -> None:
        """
        C{openai-compatible} and C{azure-openai} have no default host: they
        need C{override.endpoint}.
        """
        for provider in ("openai-compatible", "azure-openai"):
            self.assertEqual(
                self.problems(route_doc("/a", provider)),
                [
                    f"routes[0].plugins.ai-proxy.override.endpoint: required for provider '{provider}'"
                ],
            )
            self.build(route_doc("/a", provider, proxy={"override": {"endpoint": "http://h:1/x"}}))

    def test_every_route_problem(self) -> None:
        """
        The problems of every route are reported together.
        """
        self.assertEqual(
            self.problems(
                route_doc("/a", "bedrock"), route_doc("/b"), route_doc("/c", "openai-compatible")
            ),
            [
                "routes[0].plugins.ai-proxy.provider_conf.region: required for provider 'bedrock'",
                "routes[0].plugins.ai-proxy.auth.aws: required for provider 'bedrock'",
                "routes[2].plugins.ai-proxy.override.endpoint: required for provider 'openai-compatible'",
            ],
        )

    def test_ca_file_missing(self) -> None:
        """
        An C{ssl_ca_file} that cannot be read is a problem at that field.
        """
        path = self.mktemp()
        [problem] = self.problems(route_doc("/a", proxy={"ssl_ca_file": path}))
        self.assertTrue(problem.startswith("routes[0].plugins.ai-proxy.ssl_ca_file: "), problem)
        self.assertIn("No such file", problem)

    def test_ca_file_invalid(self) -> None:
        """
        An C{ssl_ca_file} without a certificate, or with a broken one, is a
        problem at that field, not a crash.
        """
        empty = self.mktemp()
        with open(empty, "w") as f:
            f.write("not a certificate\n")
        broken = self.mktemp()
        with open(broken, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        for path in (empty, broken):
            [problem] = self.problems(route_doc("/a", proxy={"ssl_ca_file": path}))
            self.assertTrue(problem.startswith("routes[0].plugins.ai-proxy.ssl_ca_file: "), problem)
            self.assertIn(path, problem)

    def test_header_value_not_sendable(self) -> None:
        """
        An C{auth.header} value that cannot be sent in HTTP (not
        ISO-8859-1) is a problem at that header, not an error per request.
        """
        self.assertEqual(
            self.problems(
                route_doc("/a", proxy={"auth": {"header": {"Authorization": "Bearer \u2603"}}})
            ),
            [
                "routes[0].plugins.ai-proxy.auth.header.Authorization: a header value must be ISO-8859-1 text"
            ],
        )
        self.build(route_doc("/a", proxy={"auth": {"header": {"X-Name": "caf\u00e9"}}}))

    def test_upstream_url(self) -> None:
        """
        An instance's upstream URL follows L{aiproxy.upstream.request.upstream_url}:
        the same URL whatever the client's path and query, except for
        passthrough, which keeps them.
        """
        [route] = self.build(route_doc("/v1/*", proxy={"auth": {"query": {"key": "k"}}})).routes
        [instance] = route.instances
        for path, query in (("/v1/chat/completions", "a=1"), ("/v1/other", "")):
            self.assertEqual(
                instance.upstream_url(OPENAI_CHAT, path, query),
                "https://api.openai.com/v1/chat/completions?key=k",
            )
        self.assertEqual(
            instance.upstream_url(PASSTHROUGH, "/v1/models", "limit=2"),
            "https://api.openai.com/v1/models?limit=2&key=k",
        )
        self.assertEqual(
            instance.upstream_url(PASSTHROUGH, "/v1/files", ""),
            "https://api.openai.com/v1/files?key=k",
        )

    def test_close(self) -> None:
        """
        Closing the table closes every route's idle connections.
        """
        table = self.build(route_doc("/a"), route_doc("/b"))
        self.successResultOf(table.close())


class PluginTests(SynchronousTestCase):
    """
    A route's filter plugins are configured once and ordered by priority.
    """

    def test_fake_plugin_provides_interface(self) -> None:
        """
        The test's plugin provides L{IFilterPlugin}, and what it configures
        provides the filter interfaces.
        """
        plugin = FakePlugin("x", 1, BothFilter)
        verifyObject(IFilterPlugin, plugin)
        configured = plugin.configure({})
        verifyObject(IRequestFilter, configured)
        verifyObject(IBodyFilterFactory, configured)
        verifyObject(IBodyFilterFactory, RecordingBodyFilterFactory("y", {}))

    def test_priority_order(self) -> None:
        """
        Request and body filters are listed highest priority first, with
        file order among equal priorities; a plugin providing both kinds is
        in both lists.
        """
        plugins = make_plugins()
        names = ["low", "body-mid", "high", "also-low", "both"]
        doc = route_doc("/a", plugins={name: {} for name in names})
        [route] = build_routes(config_of([doc], plugins), MemoryReactorClock(), plugins).routes
        self.assertEqual(
            [f.name for f in route.request_filters], ["high", "both", "low", "also-low"]
        )
        self.assertEqual([f.name for f in route.body_filters], ["both", "body-mid"])

    def test_configured_with_defaults(self) -> None:
        """
        C{configure} gets the route's config with the plugin schema's
        defaults filled in, once per route.
        """
        plugins = make_plugins()
        docs = [
            route_doc("/a", plugins={"low": {}}),
            route_doc("/b", plugins={"low": {"level": 3}}),
        ]
        build_routes(config_of(docs, plugins), MemoryReactorClock(), plugins)
        self.assertEqual(plugins["low"].configured, [{"level": 1}, {"level": 3}])
        self.assertEqual(plugins["high"].configured, [])

    def test_not_installed(self) -> None:
        """
        A plugin named by the config but missing from the installed plugins
        is a problem at its path, not a crash.
        """
        plugins = make_plugins()
        config = config_of([route_doc("/a", plugins={"low": {}})], plugins)
        error = self.assertRaises(ConfigError, build_routes, config, MemoryReactorClock(), {})
        self.assertEqual(error.problems, ["routes[0].plugins.low: unknown plugin 'low'"])

    def test_configure_refuses(self) -> None:
        """
        A plugin whose C{configure} refuses a config the schema allowed (a
        bad regex) gives a problem at the plugin's path.
        """
        plugins = make_plugins()
        config = config_of([route_doc("/a", plugins={"low": {"pattern": "("}})], plugins)
        error = self.assertRaises(ConfigError, build_routes, config, MemoryReactorClock(), plugins)
        [problem] = error.problems
        self.assertTrue(problem.startswith("routes[0].plugins.low: "), problem)
