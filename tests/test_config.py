# -*- test-case-name: tests.test_config -*-
"""
Tests for L{aiproxy.config} and L{aiproxy.schema}: loading, validating and
defaulting the YAML configuration file (docs/configuration.md).
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aiproxy.config import (
    DEFAULT_LISTEN,
    PROXY_PLUGINS,
    Config,
    ConfigError,
    load_config,
    parse_config,
)
from aiproxy.schema import format_path, load_schema

#: A filter plugin's schema, as a plugin would declare it.
FILTER_SCHEMA = {
    "type": "object",
    "properties": {
        "deny_patterns": {"type": "array", "items": {"type": "string"}, "default": []},
        "deny_code": {"type": "integer", "default": 200},
    },
    "additionalProperties": False,
}

SCHEMAS: dict[str, Any] = {name: load_schema(name) for name in PROXY_PLUGINS}
SCHEMAS["test-guard"] = FILTER_SCHEMA

#: One problem line: a JSON path (plain keys, indexes, quoted keys) or
#: C{(root)}, then C{": "} and a one-line reason.
PROBLEM_LINE = re.compile(
    r'(?:\(root\)|(?:[A-Za-z0-9_$-]+|\[\d+\]|\["(?:[^"\\]|\\.)*"\])'
    r'(?:\.[A-Za-z0-9_$-]+|\[\d+\]|\["(?:[^"\\]|\\.)*"\])*)'
    r": \S[^\n\r]*"
)

MINIMAL_ROUTE = """
routes:
  - uri: /v1/chat/completions
    plugins:
      ai-proxy:
        provider: openai
        auth: {header: {Authorization: "Bearer sk-test"}}
"""


def parse(text: str, environ: dict[str, str] | None = None) -> Config:
    """
    Parse C{text} with the proxy plugins and C{test-guard} installed and
    an empty (or the given) environment.
    """
    return parse_config(text, environ=environ or {}, plugin_schemas=SCHEMAS)


def one_route(plugin: str = "ai-proxy", **fields: Any) -> str:
    """
    A config document with one route whose proxy plugin has C{fields}
    on top of a valid minimum.
    """
    if plugin == "ai-proxy":
        conf: dict[str, Any] = {
            "provider": "openai",
            "auth": {"header": {"Authorization": "Bearer k"}},
        }
    else:
        conf = {"instances": [{"name": "a", "provider": "openai", "auth": {}, "weight": 1}]}
    conf.update(fields)
    return yaml.safe_dump({"routes": [{"uri": "/v1/chat/completions", "plugins": {plugin: conf}}]})


class ProblemsMixin:
    """
    Helpers asserting on the problems of an invalid config.
    """

    def problems(self, text: str, environ: dict[str, str] | None = None) -> list[str]:
        """
        The problem lines of an invalid config.
        """
        error = self.assertRaises(ConfigError, parse, text, environ)  # type: ignore[attr-defined]
        for line in error.problems:
            self.assertRegex(line, PROBLEM_LINE)  # type: ignore[attr-defined]
        self.assertEqual(str(error), "\n".join(error.problems))  # type: ignore[attr-defined]
        return error.problems


class DefaultsTests(SynchronousTestCase, ProblemsMixin):
    """
    Defaults are filled in from the schemas.
    """

    def test_empty_document(self) -> None:
        """
        An empty file is a valid config with no routes, listening on the
        default endpoint, with a 30 s shutdown grace and no metrics listener.
        """
        config = parse("")
        self.assertEqual(config.routes, ())
        self.assertEqual(config.listen, ("tcp:port=9080:interface=127.0.0.1",))
        self.assertEqual(DEFAULT_LISTEN, "tcp:port=9080:interface=127.0.0.1")
        self.assertEqual(config.shutdown_grace_s, 30.0)
        self.assertIsNone(config.metrics_listen)

    def test_listen_string_and_list(self) -> None:
        """
        C{listen} may be one endpoint string or a list of them.
        """
        self.assertEqual(parse("listen: unix:/tmp/a.sock").listen, ("unix:/tmp/a.sock",))
        config = parse("listen: ['tcp:8080', 'tcp:8081']")
        self.assertEqual(config.listen, ("tcp:8080", "tcp:8081"))

    def test_endpoints_checked(self) -> None:
        """
        Endpoint strings are parsed at load time: an unknown type or bad
        arguments are problems at their path, before anything listens.
        """
        self.assertEqual(
            self.problems("listen: 'tcp:port=abc'"),
            [
                "listen: invalid endpoint 'tcp:port=abc': invalid literal for int() with base 10: 'abc'"
            ],
        )
        self.assertEqual(
            self.problems("listen: ['tcp:1', 'nope:1']\nmetrics_listen: 'tcp:port=1:bogus=2'"),
            [
                "listen[1]: invalid endpoint 'nope:1': unknown endpoint type 'nope'",
                "metrics_listen: invalid endpoint 'tcp:port=1:bogus=2': "
                "_parseTCP() got an unexpected keyword argument 'bogus'",
            ],
        )
        key = self.mktemp()
        [problem] = self.problems(f"listen: 'ssl:port=8443:privateKey={key}'")
        self.assertTrue(
            problem.startswith(f"listen: invalid endpoint 'ssl:port=8443:privateKey={key}': "),
            problem,
        )

    def test_endpoints_accepted(self) -> None:
        """
        Valid TCP, IPv6, UNIX and systemd endpoint strings are accepted (a
        systemd endpoint is not resolved before systemd passes its sockets).
        """
        config = parse(
            "listen: ['tcp:port=9080:interface=127.0.0.1', 'tcp6:port=1:interface=\\:\\:1', "
            "'unix:/tmp/aiproxy.sock', 'systemd:domain=INET:index=0']"
        )
        self.assertEqual(len(config.listen), 4)

    def test_top_level_fields(self) -> None:
        """
        C{metrics_listen} and C{shutdown_grace_s} are read as given.
        """
        config = parse("metrics_listen: tcp:9091\nshutdown_grace_s: 2.5\n")
        self.assertEqual(config.metrics_listen, "tcp:9091")
        self.assertEqual(config.shutdown_grace_s, 2.5)

    def test_ai_proxy_defaults(self) -> None:
        """
        Every default of docs/configuration.md is filled in, and the optional
        limits stay unset.
        """
        route = parse(MINIMAL_ROUTE).routes[0]
        self.assertEqual(route.proxy_plugin, "ai-proxy")
        conf = route.proxy
        self.assertEqual(conf["timeout"], 30000)
        self.assertEqual(conf["max_req_body_size"], 64 * 1024 * 1024)
        self.assertIs(conf["keepalive"], True)
        self.assertEqual(conf["keepalive_timeout"], 60000)
        self.assertEqual(conf["keepalive_pool"], 30)
        self.assertEqual(conf["streaming_flush_interval_ms"], 10)
        self.assertIs(conf["ssl_verify"], True)
        self.assertEqual(conf["logging"], {"summaries": False, "payloads": False})
        for unset in (
            "max_stream_duration_ms",
            "max_response_bytes",
            "first_token_timeout_ms",
            "stream_idle_timeout_ms",
            "keepalive_comment_interval_ms",
            "ssl_ca_file",
        ):
            self.assertNotIn(unset, conf)

    def test_partial_logging(self) -> None:
        """
        A C{logging} object with one field gets the other one's default.
        """
        conf = parse(one_route(logging={"payloads": True})).routes[0].proxy
        self.assertEqual(conf["logging"], {"summaries": False, "payloads": True})

    def test_override_force_default(self) -> None:
        """
        C{override.request_body_force_override} defaults to false.
        """
        conf = parse(one_route(override={"endpoint": "http://h/v1/x"})).routes[0].proxy
        self.assertIs(conf["override"]["request_body_force_override"], False)

    def test_given_values_kept(self) -> None:
        """
        Values given in the file replace the defaults.
        """
        conf = (
            parse(one_route(timeout=5, streaming_flush_interval_ms=0, ssl_verify=False))
            .routes[0]
            .proxy
        )
        self.assertEqual(conf["timeout"], 5)
        self.assertEqual(conf["streaming_flush_interval_ms"], 0)
        self.assertIs(conf["ssl_verify"], False)

    def test_multi_defaults(self) -> None:
        """
        C{ai-proxy-multi} gets the shared limits' defaults, a round-robin
        balancer hashing on vars, the default fallback strategy, and
        priority 0 on each instance.
        """
        route = parse(one_route("ai-proxy-multi")).routes[0]
        self.assertEqual(route.proxy_plugin, "ai-proxy-multi")
        conf = route.proxy
        self.assertEqual(conf["balancer"], {"algorithm": "roundrobin", "hash_on": "vars"})
        self.assertEqual(conf["fallback_strategy"], "instance_health_and_rate_limiting")
        self.assertEqual(conf["instances"][0]["priority"], 0)
        self.assertEqual(conf["timeout"], 30000)
        self.assertEqual(conf["streaming_flush_interval_ms"], 10)
        self.assertEqual(conf["keepalive_pool"], 30)

    def test_filter_plugin_defaults(self) -> None:
        """
        A filter plugin's config gets its own schema's defaults; a plugin
        named with no config (YAML null) gets all of them.
        """
        text = MINIMAL_ROUTE + "      test-guard:\n"
        route = parse(text).routes[0]
        self.assertEqual(route.plugins, {"test-guard": {"deny_patterns": [], "deny_code": 200}})
        self.assertNotIn("ai-proxy", route.plugins)


class RouteTests(SynchronousTestCase, ProblemsMixin):
    """
    Route fields: id, uri/uris, methods.
    """

    def test_default_ids(self) -> None:
        """
        A route without C{id} is called C{route-<index>}, counting from 0.
        """
        doc = yaml.safe_load(MINIMAL_ROUTE)
        route = doc["routes"][0]
        doc["routes"] = [route, dict(route, id="chat"), route]
        config = parse(yaml.safe_dump(doc))
        self.assertEqual([r.id for r in config.routes], ["route-0", "chat", "route-2"])

    def test_duplicate_ids(self) -> None:
        """
        Two routes with the same id are an error at the second one, also
        when one of them has the default id.
        """
        doc = yaml.safe_load(MINIMAL_ROUTE)
        route = doc["routes"][0]
        doc["routes"] = [dict(route, id="a"), dict(route, id="a")]
        self.assertEqual(
            self.problems(yaml.safe_dump(doc)), ["routes[1].id: duplicate route id 'a'"]
        )
        doc["routes"] = [dict(route, id="route-1"), route]
        self.assertEqual(
            self.problems(yaml.safe_dump(doc)), ["routes[1].id: duplicate route id 'route-1'"]
        )

    def test_uri(self) -> None:
        """
        C{uri} gives a route one path.
        """
        self.assertEqual(parse(MINIMAL_ROUTE).routes[0].uris, ("/v1/chat/completions",))

    def test_uris(self) -> None:
        """
        C{uris} gives a route several paths, in order.
        """
        text = MINIMAL_ROUTE.replace("uri: /v1/chat/completions", "uris: [/a, '/b/*']")
        self.assertEqual(parse(text).routes[0].uris, ("/a", "/b/*"))

    def test_uri_and_uris(self) -> None:
        """
        A route needs exactly one of C{uri} and C{uris}.
        """
        both = MINIMAL_ROUTE.replace("uri: /v1/chat/completions", "uri: /a\n    uris: [/b]")
        neither = MINIMAL_ROUTE.replace("uri: /v1/chat/completions", "id: x")
        for text in (both, neither):
            self.assertEqual(
                self.problems(text), ["routes[0]: exactly one of 'uri' or 'uris' is required"]
            )

    def test_relative_uri(self) -> None:
        """
        A path must start with C{/}.
        """
        text = MINIMAL_ROUTE.replace("uri: /v1/chat/completions", "uri: v1/chat")
        [problem] = self.problems(text)
        self.assertTrue(problem.startswith("routes[0].uri: 'v1/chat' does not match"), problem)

    def test_methods(self) -> None:
        """
        C{methods} restricts a route to those methods; without it any
        method matches (L{None}).
        """
        self.assertIsNone(parse(MINIMAL_ROUTE).routes[0].methods)
        text = MINIMAL_ROUTE.replace("  - uri:", "  - methods: [POST, GET]\n    uri:")
        self.assertEqual(parse(text).routes[0].methods, ("POST", "GET"))

    def test_bad_method(self) -> None:
        """
        An unknown (or lower-case) method name is an error at its index.
        """
        text = MINIMAL_ROUTE.replace("  - uri:", "  - methods: [POST, get]\n    uri:")
        [problem] = self.problems(text)
        self.assertTrue(problem.startswith("routes[0].methods[1]: 'get' is not one of"), problem)

    def test_missing_plugins(self) -> None:
        """
        A route without C{plugins} is an error naming the missing field.
        """
        self.assertEqual(
            self.problems("routes: [{uri: /a}]"), ["routes[0].plugins: is a required property"]
        )


class ProblemTests(SynchronousTestCase, ProblemsMixin):
    """
    Invalid configs are refused with one C{<json path>: <reason>} line per
    problem, all of them at once.
    """

    def test_spec_example(self) -> None:
        """
        The documented example line, exactly.
        """
        self.assertEqual(
            self.problems(one_route(streaming_flush_interval_ms=-1)),
            [
                "routes[0].plugins.ai-proxy.streaming_flush_interval_ms: -1 is less than the minimum of 0"
            ],
        )

    def test_every_problem_at_once(self) -> None:
        """
        Problems in several routes and at the top level are all reported.
        """
        doc = yaml.safe_load(one_route(timeout=0))
        bad = yaml.safe_load(one_route(keepalive_pool=0))["routes"][0]
        bad["plugins"]["ai-proxy"]["provider"] = "nope"
        doc["routes"].append(bad)
        doc["shutdown_grace_s"] = -1
        problems = self.problems(yaml.safe_dump(doc))
        self.assertEqual(len(problems), 4, problems)
        joined = "\n".join(problems)
        self.assertIn(
            "routes[0].plugins.ai-proxy.timeout: 0 is less than the minimum of 1", problems
        )
        self.assertIn(
            "routes[1].plugins.ai-proxy.keepalive_pool: 0 is less than the minimum of 1", problems
        )
        self.assertIn("routes[1].plugins.ai-proxy.provider: 'nope' is not one of", joined)
        self.assertIn("shutdown_grace_s: -1 is less than the minimum of 0", problems)

    def test_unknown_top_level_key(self) -> None:
        """
        An unknown top-level key is an error at that key.
        """
        self.assertEqual(self.problems("routs: []"), ["routs: unknown key 'routs'"])

    def test_unknown_route_key(self) -> None:
        """
        An unknown route key is an error at that key.
        """
        text = MINIMAL_ROUTE.replace("  - uri:", "  - upstream: {}\n    uri:")
        self.assertEqual(self.problems(text), ["routes[0].upstream: unknown key 'upstream'"])

    def test_unknown_plugin(self) -> None:
        """
        An unknown plugin name is an error at that plugin.
        """
        text = MINIMAL_ROUTE + "      ai-nope: {}\n"
        self.assertEqual(
            self.problems(text), ["routes[0].plugins.ai-nope: unknown plugin 'ai-nope'"]
        )

    def test_unknown_proxy_field(self) -> None:
        """
        An unknown field of C{ai-proxy} is an error at that field.
        """
        self.assertEqual(
            self.problems(one_route(tiemout=5)),
            ["routes[0].plugins.ai-proxy.tiemout: unknown key 'tiemout'"],
        )

    def test_filter_plugin_validated(self) -> None:
        """
        A filter plugin's config is validated against its own schema.
        """
        text = MINIMAL_ROUTE + "      test-guard: {deny_code: x}\n"
        self.assertEqual(
            self.problems(text),
            ["routes[0].plugins.test-guard.deny_code: 'x' is not of type 'integer'"],
        )

    def test_exactly_one_proxy_plugin(self) -> None:
        """
        A route needs exactly one of C{ai-proxy} and C{ai-proxy-multi}.
        """
        message = "routes[0].plugins: exactly one of 'ai-proxy' or 'ai-proxy-multi' is required"
        neither = "routes: [{uri: /a, plugins: {test-guard: {}}}]"
        self.assertEqual(self.problems(neither), [message])
        doc = yaml.safe_load(one_route())
        doc["routes"][0]["plugins"].update(
            yaml.safe_load(one_route("ai-proxy-multi"))["routes"][0]["plugins"]
        )
        self.assertEqual(self.problems(yaml.safe_dump(doc)), [message])

    def test_required_fields(self) -> None:
        """
        C{provider} and C{auth} are required, each reported at its own path.
        """
        text = "routes: [{uri: /a, plugins: {ai-proxy: {}}}]"
        self.assertEqual(
            self.problems(text),
            [
                "routes[0].plugins.ai-proxy.auth: is a required property",
                "routes[0].plugins.ai-proxy.provider: is a required property",
            ],
        )

    def test_providers(self) -> None:
        """
        Every provider of docs/configuration.md is accepted by the schema.
        """
        for provider in (
            "openai deepseek aimlapi anthropic openai-compatible azure-openai "
            "openrouter gemini vertex-ai bedrock"
        ).split():
            parse(one_route(provider=provider))
        [problem] = self.problems(one_route(provider="thegrid"))
        self.assertTrue(
            problem.startswith("routes[0].plugins.ai-proxy.provider: 'thegrid' is not one of")
        )

    def test_bounds(self) -> None:
        """
        The bounds of docs/configuration.md: the edge values are accepted, one
        past them is an error at the field.
        """
        cases = [
            ("timeout", 1, 0),
            ("timeout", 600000, 600001),
            ("max_req_body_size", 1, 0),
            ("max_stream_duration_ms", 1, 0),
            ("max_response_bytes", 1, 0),
            ("keepalive_timeout", 1000, 999),
            ("keepalive_pool", 1, 0),
            ("streaming_flush_interval_ms", 0, -1),
            ("first_token_timeout_ms", 1, 0),
            ("stream_idle_timeout_ms", 1, 0),
            ("keepalive_comment_interval_ms", 1, 0),
        ]
        for name, good, bad in cases:
            for plugin in PROXY_PLUGINS:
                self.assertEqual(
                    parse(one_route(plugin, **{name: good})).routes[0].proxy[name], good
                )
                [problem] = self.problems(one_route(plugin, **{name: bad}))
                self.assertTrue(
                    problem.startswith(f"routes[0].plugins.{plugin}.{name}: {bad} is "),
                    (name, problem),
                )

    def test_types(self) -> None:
        """
        Integer fields refuse strings and fractions; boolean fields refuse
        strings.
        """
        self.assertEqual(
            self.problems(one_route(timeout="30")),
            ["routes[0].plugins.ai-proxy.timeout: '30' is not of type 'integer'"],
        )
        self.assertEqual(
            self.problems(one_route(timeout=1.5)),
            ["routes[0].plugins.ai-proxy.timeout: 1.5 is not of type 'integer'"],
        )
        self.assertEqual(
            self.problems(one_route(keepalive="yes")),
            ["routes[0].plugins.ai-proxy.keepalive: 'yes' is not of type 'boolean'"],
        )

    def test_shutdown_grace(self) -> None:
        """
        C{shutdown_grace_s} is a non-negative number.
        """
        self.assertEqual(parse("shutdown_grace_s: 0").shutdown_grace_s, 0.0)
        self.assertEqual(
            self.problems("shutdown_grace_s: -1"),
            ["shutdown_grace_s: -1 is less than the minimum of 0"],
        )

    def test_meta_accepted(self) -> None:
        """
        APISIX's C{_meta} is accepted on both proxy plugins.
        """
        for plugin in PROXY_PLUGINS:
            parse(one_route(plugin, _meta={"disable": False, "priority": 3}))

    def test_request_body_keyed_by_protocol(self) -> None:
        """
        C{override.request_body} takes objects keyed by protocol names only.
        """
        parse(
            one_route(
                override={"request_body": {"openai-chat": {"temperature": 0}, "passthrough": {}}}
            )
        )
        self.assertEqual(
            self.problems(one_route(override={"request_body": {"temperature": 0}})),
            [
                "routes[0].plugins.ai-proxy.override.request_body.temperature: unknown key 'temperature'"
            ],
        )
        self.assertEqual(
            self.problems(one_route(override={"request_body": {"openai-chat": 1}})),
            [
                "routes[0].plugins.ai-proxy.override.request_body.openai-chat: 1 is not of type 'object'"
            ],
        )

    def test_llm_options(self) -> None:
        """
        C{override.llm_options} only knows C{max_tokens}, an integer >= 1.
        """
        parse(one_route(override={"llm_options": {"max_tokens": 1}}))
        self.assertEqual(
            self.problems(one_route(override={"llm_options": {"max_tokens": 0}})),
            [
                "routes[0].plugins.ai-proxy.override.llm_options.max_tokens: 0 is less than the minimum of 1"
            ],
        )
        self.assertEqual(
            self.problems(one_route(override={"llm_options": {"temperature": 1}})),
            [
                "routes[0].plugins.ai-proxy.override.llm_options.temperature: unknown key 'temperature'"
            ],
        )

    def test_endpoint_scheme(self) -> None:
        """
        C{override.endpoint} must be an http(s) URL.
        """
        [problem] = self.problems(one_route(override={"endpoint": "ftp://h/x"}))
        self.assertTrue(
            problem.startswith("routes[0].plugins.ai-proxy.override.endpoint: 'ftp://h/x'"), problem
        )

    def test_auth_shape(self) -> None:
        """
        C{auth} knows C{header}, C{query}, C{aws} and C{gcp}; header values
        are strings.
        """
        self.assertEqual(
            self.problems(one_route(auth={"token": "x"})),
            ["routes[0].plugins.ai-proxy.auth.token: unknown key 'token'"],
        )
        self.assertEqual(
            self.problems(one_route(auth={"header": {"Authorization": 5}})),
            ["routes[0].plugins.ai-proxy.auth.header.Authorization: 5 is not of type 'string'"],
        )
        self.assertEqual(
            self.problems(one_route(auth={"aws": {"access_key_id": "a"}})),
            ["routes[0].plugins.ai-proxy.auth.aws.secret_access_key: is a required property"],
        )

    def test_bad_header_name(self) -> None:
        """
        A header name with characters outside C{[a-zA-Z0-9._-]} is refused,
        and its path stays on one unambiguous line.
        """
        [problem] = self.problems(one_route(auth={"header": {"Bad Name": "x"}}))
        self.assertTrue(
            problem.startswith("routes[0].plugins.ai-proxy.auth.header: 'Bad Name' does not match")
        )

    def test_unique_instance_names(self) -> None:
        """
        The instances of an C{ai-proxy-multi} route need unique names.
        """
        instance = {"name": "a", "provider": "openai", "auth": {}, "weight": 1}
        text = one_route("ai-proxy-multi", instances=[instance, dict(instance, name="b"), instance])
        self.assertEqual(
            self.problems(text),
            ["routes[0].plugins.ai-proxy-multi.instances[2].name: duplicate instance name 'a'"],
        )

    def test_instance_fields(self) -> None:
        """
        An instance needs C{name}, C{provider}, C{auth} and C{weight}.
        """
        text = one_route("ai-proxy-multi", instances=[{"name": "a"}])
        self.assertEqual(
            self.problems(text),
            [
                "routes[0].plugins.ai-proxy-multi.instances[0].auth: is a required property",
                "routes[0].plugins.ai-proxy-multi.instances[0].provider: is a required property",
                "routes[0].plugins.ai-proxy-multi.instances[0].weight: is a required property",
            ],
        )

    def test_instances_not_a_list(self) -> None:
        """
        C{instances} of the wrong type is one problem, not a crash.
        """
        self.assertEqual(
            self.problems(one_route("ai-proxy-multi", instances=5)),
            ["routes[0].plugins.ai-proxy-multi.instances: 5 is not of type 'array'"],
        )

    def test_fallback_strategy(self) -> None:
        """
        C{fallback_strategy} is one of APISIX's strings or a list of
        C{rate_limiting|http_429|http_5xx}.
        """
        parse(one_route("ai-proxy-multi", fallback_strategy="http_5xx"))
        parse(one_route("ai-proxy-multi", fallback_strategy=["http_429", "http_5xx"]))
        [problem] = self.problems(one_route("ai-proxy-multi", fallback_strategy="sometimes"))
        self.assertTrue(problem.startswith("routes[0].plugins.ai-proxy-multi.fallback_strategy: "))

    def test_invalid_yaml(self) -> None:
        """
        A YAML syntax error is one problem at the root, naming its line.
        """
        problems = self.problems("routes: [\n  {uri: /a\n")
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("(root): invalid YAML: "), problems)
        self.assertIn("(line ", problems[0])

    def test_invalid_yaml_value(self) -> None:
        """
        A YAML value PyYAML cannot construct (an impossible date) is a
        config problem, not a crash.
        """
        [problem] = self.problems("shutdown_grace_s: 2001-13-45")
        self.assertTrue(problem.startswith("(root): invalid YAML: "), problem)

    def test_not_a_mapping(self) -> None:
        """
        A document that is not a mapping is one problem at the root.
        """
        self.assertEqual(self.problems("- 1"), ["(root): [1] is not of type 'object'"])

    def test_odd_keys(self) -> None:
        """
        Keys that are not plain names still give one-line problems with an
        unambiguous path.
        """
        self.assertEqual(self.problems("1: x"), ["1: unknown key '1'"])
        self.assertEqual(self.problems('"a.b": x'), ["[\"a.b\"]: unknown key 'a.b'"])
        self.assertEqual(self.problems('"a\\nb": x'), ["[\"a\\nb\"]: unknown key 'a\\nb'"])


class EnvironmentTests(SynchronousTestCase, ProblemsMixin):
    """
    C{${VAR}} references are replaced from the environment at load time.
    """

    def test_substituted(self) -> None:
        """
        C{${VAR}} inside a string is replaced by the variable's value.
        """
        text = one_route(auth={"header": {"Authorization": "Bearer ${API_KEY}"}})
        conf = parse(text, {"API_KEY": "sk-123"}).routes[0].proxy
        self.assertEqual(conf["auth"]["header"]["Authorization"], "Bearer sk-123")

    def test_several(self) -> None:
        """
        Several references in one string are all replaced.
        """
        config = parse(
            "listen: 'tcp:port=${PORT}:interface=${HOST}'", {"PORT": "1", "HOST": "127.0.0.1"}
        )
        self.assertEqual(config.listen, ("tcp:port=1:interface=127.0.0.1",))

    def test_missing(self) -> None:
        """
        A missing variable is an error at the value's path naming the
        variable; every missing variable is reported.
        """
        text = one_route(
            auth={"header": {"Authorization": "Bearer ${API_KEY}"}},
            override={"endpoint": "${BASE}/v1"},
        )
        self.assertEqual(
            self.problems(text),
            [
                "routes[0].plugins.ai-proxy.auth.header.Authorization: environment variable API_KEY is not set",
                "routes[0].plugins.ai-proxy.override.endpoint: environment variable BASE is not set",
            ],
        )

    def test_default(self) -> None:
        """
        C{${VAR:-default}} gives the default when the variable is unset and
        the value when it is set (even empty).
        """
        text = "listen: '${LISTEN:-tcp:9999}'"
        self.assertEqual(parse(text).listen, ("tcp:9999",))
        self.assertEqual(parse(text, {"LISTEN": "tcp:1"}).listen, ("tcp:1",))
        self.assertEqual(parse("metrics_listen: 'tcp:${E:-}9'").metrics_listen, "tcp:9")

    def test_not_in_keys(self) -> None:
        """
        Only values are substituted: a reference in a key stays as written.
        """
        self.assertEqual(
            self.problems("'${K}': 1", {"K": "listen"}), ["[\"${K}\"]: unknown key '${K}'"]
        )

    def test_os_environ(self) -> None:
        """
        Without C{environ}, L{os.environ} is used.
        """
        self.patch(os, "environ", {"AIPROXY_TEST_LISTEN": "tcp:4242"})
        config = parse_config("listen: ${AIPROXY_TEST_LISTEN}", plugin_schemas=SCHEMAS)
        self.assertEqual(config.listen, ("tcp:4242",))


class LoadConfigTests(SynchronousTestCase):
    """
    L{load_config} reads a file.
    """

    def test_file(self) -> None:
        """
        A readable file is parsed and remembered as the config's source.
        """
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(MINIMAL_ROUTE)
        config = load_config(path, environ={}, plugin_schemas=SCHEMAS)
        self.assertEqual(config.source, path)
        self.assertEqual(len(config.routes), 1)

    def test_missing_file(self) -> None:
        """
        A missing file is a config problem naming it.
        """
        path = self.mktemp()
        error = self.assertRaises(ConfigError, load_config, path, {}, SCHEMAS)
        self.assertEqual(error.problems, [f"(root): cannot read {path}: No such file or directory"])


class FormatPathTests(SynchronousTestCase):
    """
    L{format_path} renders JSON paths.
    """

    def test_paths(self) -> None:
        """
        Keys are joined with dots, indexes in brackets, the empty path is
        C{(root)}, and odd keys are quoted.
        """
        self.assertEqual(format_path([]), "(root)")
        self.assertEqual(
            format_path(["routes", 0, "plugins", "ai-proxy"]), "routes[0].plugins.ai-proxy"
        )
        self.assertEqual(format_path(["auth", "header", "x.y"]), 'auth.header["x.y"]')
        self.assertEqual(format_path(["a", ""]), 'a[""]')


#: Keys a random document is built from: real ones, so that it gets deep
#: into the schemas, and arbitrary text.
_KEYS = st.sampled_from(
    [
        "listen",
        "routes",
        "uri",
        "uris",
        "id",
        "methods",
        "plugins",
        "ai-proxy",
        "ai-proxy-multi",
        "test-guard",
        "provider",
        "auth",
        "header",
        "query",
        "options",
        "override",
        "endpoint",
        "timeout",
        "instances",
        "name",
        "weight",
        "request_body",
        "openai-chat",
        "llm_options",
        "max_tokens",
        "logging",
        "shutdown_grace_s",
        "metrics_listen",
        "_meta",
        "balancer",
    ]
) | st.text(max_size=8)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=False)
    | st.sampled_from(["openai", "/v1/chat", "/a/*", "http://h/v1", "${X}", "${X:-d}", "POST"])
    | st.text(max_size=10)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=25,
)


class RandomDocumentTests(SynchronousTestCase):
    """
    Whatever the file holds, loading it validates or raises L{ConfigError}
    whose every line is C{<path>: <reason>}.
    """

    def check(self, text: str) -> None:
        """
        Parse C{text}: a valid config or well-formed problems, nothing else.
        """
        try:
            config = parse(text, {"X": "x"})
        except ConfigError as e:
            self.assertTrue(e.problems)
            for line in e.problems:
                self.assertRegex(line, PROBLEM_LINE)
                self.assertIsNotNone(PROBLEM_LINE.fullmatch(line), line)
        else:
            self.assertIsInstance(config, Config)

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(_KEYS, _VALUES, max_size=4))
    def test_random_documents(self, document: dict[str, Any]) -> None:
        """
        Random YAML mappings never crash the loader.
        """
        self.check(yaml.safe_dump(document))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.fixed_dictionaries(
                {
                    "uri": st.sampled_from(["/a", "b"]),
                    "plugins": st.dictionaries(_KEYS, _VALUES, max_size=3),
                },
                optional={"id": _VALUES},
            ),
            max_size=3,
        )
    )
    def test_random_routes(self, routes: list[dict[str, Any]]) -> None:
        """
        Random routes and plugin configs never crash the loader.
        """
        self.check(yaml.safe_dump({"routes": routes}))

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=60))
    def test_random_text(self, text: str) -> None:
        """
        Random text (mostly not YAML) never crashes the loader.
        """
        self.check(text)

    def test_deep_nesting(self) -> None:
        """
        A document nested deeper than Python's recursion limit is a problem,
        not a crash.
        """
        self.check("listen: " + "[" * 5000 + "]" * 5000)
