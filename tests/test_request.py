# -*- test-case-name: tests.test_request -*-
"""
Tests for L{aiproxy.upstream.request} and L{aiproxy.upstream.providers}: checking the client's
body, detecting its protocol and building the upstream URL, headers and body
(docs/architecture.md).
"""

from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from aiproxy.stream.protocols import (
    ANTHROPIC_MESSAGES,
    BEDROCK_CONVERSE,
    OPENAI_CHAT,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    PASSTHROUGH,
    detect_protocol,
)
from aiproxy.upstream import providers
from aiproxy.upstream.providers import PROVIDERS, UnsupportedProvider, get_provider
from aiproxy.upstream.request import (
    ClientError,
    Target,
    apply_body_overrides,
    check_content_type,
    deep_merge,
    detect,
    parse_body,
    too_large_message,
    upstream_headers,
    upstream_url,
)


def target(provider: str = "openai", **conf: Any) -> Target:
    """
    A target of C{provider} whose C{ai-proxy} config holds C{conf}.
    """
    conf.setdefault("auth", {})
    return Target(f"ai-proxy-{provider}", get_provider(provider), conf)


class ContentTypeTests(SynchronousTestCase):
    """
    L{check_content_type}: the body must claim to be JSON.
    """

    def test_missing(self) -> None:
        """
        A request without C{Content-Type} is treated as JSON.
        """
        check_content_type(None)

    def test_json(self) -> None:
        """
        C{application/json}, with or without parameters, is accepted.
        """
        check_content_type(b"application/json")
        check_content_type(b"application/json; charset=utf-8")

    def test_other(self) -> None:
        """
        Any other type is a 400 naming it, with APISIX's message.
        """
        for value in (
            b"text/plain",
            b"multipart/form-data; boundary=x",
            b"",
            b"application/x-www-form-urlencoded",
        ):
            error = self.assertRaises(ClientError, check_content_type, value)
            self.assertEqual(error.status, 400)
            self.assertEqual(
                error.message,
                f"unsupported content-type: {value.decode()}, only application/json is supported",
            )

    def test_too_large_message(self) -> None:
        """
        The 413 message names the size and the limit as APISIX does.
        """
        self.assertEqual(
            too_large_message(11, 10),
            "could not get body: request size 11 is greater than the maximum size 10 allowed",
        )


class ParseBodyTests(SynchronousTestCase):
    """
    L{parse_body}: the client's body must be a JSON object.
    """

    def refused(self, raw: bytes) -> str:
        """
        The message of the 400 refusing C{raw}.
        """
        error = self.assertRaises(ClientError, parse_body, raw)
        self.assertEqual(error.status, 400)
        return error.message

    def test_object(self) -> None:
        """
        A JSON object is parsed.
        """
        self.assertEqual(parse_body(b'{"model": "m", "n": 1.5}'), {"model": "m", "n": 1.5})

    def test_empty(self) -> None:
        """
        An empty (or blank) body is a 400 with APISIX's message.
        """
        for raw in (b"", b"  \r\n"):
            self.assertEqual(self.refused(raw), "could not get body: request body is empty")

    def test_invalid(self) -> None:
        """
        Invalid JSON is a 400 whose message starts as APISIX's does.
        """
        for raw in (b"{", b"{'a': 1}", b"\xff\xfe{", b'{"a": 1,}'):
            self.assertTrue(
                self.refused(raw).startswith("could not parse JSON request body: "), raw
            )

    def test_not_an_object(self) -> None:
        """
        A JSON value that is not an object is a 400.
        """
        for raw in (b"[1]", b'"x"', b"3", b"null"):
            self.assertTrue(self.refused(raw).startswith("could not parse JSON request body: "))

    def test_not_json_constants(self) -> None:
        """
        C{NaN}, C{Infinity} and numbers too large for a float are refused:
        they could not be sent upstream as JSON again.
        """
        for raw in (b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e400}'):
            self.assertTrue(
                self.refused(raw).startswith("could not parse JSON request body: "), raw
            )

    def test_surrogates(self) -> None:
        """
        A lone surrogate escape is refused (it cannot be encoded as UTF-8
        again); a valid surrogate pair is a normal character.
        """
        self.assertTrue(
            self.refused(b'{"a": "\\ud800"}').startswith("could not parse JSON request body: ")
        )
        self.assertEqual(parse_body(b'{"a": "\\ud83d\\ude00"}'), {"a": "\U0001f600"})

    def test_deep_nesting(self) -> None:
        """
        Nesting deeper than Python can parse is a 400, not a crash.
        """
        raw = b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        self.assertEqual(self.refused(raw), "could not parse JSON request body: nested too deeply")


class DetectTests(SynchronousTestCase):
    """
    Protocol detection, first match wins (docs/architecture.md).
    """

    def test_table(self) -> None:
        """
        The documented table, in order.
        """
        cases = [
            ("/model/m/converse", {"messages": []}, BEDROCK_CONVERSE),
            ("/model/m/converse", {"input": "x"}, OPENAI_EMBEDDINGS),
            ("/v1/messages", {"messages": [], "input": "x"}, ANTHROPIC_MESSAGES),
            ("/v1/messages", {"model": "claude"}, ANTHROPIC_MESSAGES),
            ("/v1/responses", {"input": "hi", "messages": []}, OPENAI_RESPONSES),
            ("/v1/responses", {"messages": []}, OPENAI_CHAT),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, OPENAI_CHAT),
            ("/anything", {"messages": {}}, OPENAI_CHAT),
            ("/v1/embeddings", {"input": ["a", "b"]}, OPENAI_EMBEDDINGS),
            ("/v1/chat/completions", {"input": "x"}, OPENAI_EMBEDDINGS),
            ("/v1/models", {"limit": 5}, PASSTHROUGH),
            ("/v1/chat/completions", {"messages": "hi"}, PASSTHROUGH),
        ]
        for path, body, expected in cases:
            self.assertEqual(detect(path, body), expected, (path, body))

    def test_empty_object(self) -> None:
        """
        C{{}} matches no protocol: 400 with APISIX's message.
        """
        self.assertIsNone(detect_protocol("/v1/chat/completions", {}))
        error = self.assertRaises(ClientError, detect, "/v1/chat/completions", {})
        self.assertEqual(
            (error.status, error.message), (400, "no matching AI protocol for the request")
        )


class ProviderTests(SynchronousTestCase):
    """
    L{get_provider} and what each provider serves.
    """

    def test_unsupported(self) -> None:
        """
        A provider this version does not serve raises L{UnsupportedProvider}.
        """
        # Every provider the schema names is served: take one out.
        served = {name: provider for name, provider in PROVIDERS.items() if name != "bedrock"}
        self.patch(providers, "PROVIDERS", served)
        for name in ("bedrock", "nope"):
            self.assertRaises(UnsupportedProvider, get_provider, name)

    def test_serves(self) -> None:
        """
        A provider serves the protocols it has a path for, and passthrough.
        """
        self.assertTrue(get_provider("openai").serves(OPENAI_RESPONSES))
        self.assertTrue(get_provider("deepseek").serves(PASSTHROUGH))
        self.assertFalse(get_provider("deepseek").serves(OPENAI_RESPONSES))
        self.assertTrue(get_provider("anthropic").serves(ANTHROPIC_MESSAGES))
        self.assertFalse(get_provider("openai").serves(ANTHROPIC_MESSAGES))

    def test_names(self) -> None:
        """
        Each provider is registered under its own name.
        """
        for name, provider in PROVIDERS.items():
            self.assertEqual(provider.name, name)


class BodyOverrideTests(SynchronousTestCase):
    """
    L{apply_body_overrides}: options, llm_options, request_body, model
    removal and usage in streams, reporting whether anything changed.
    """

    def apply(
        self, body: dict, protocol: str = OPENAI_CHAT, provider: str = "openai", **conf: Any
    ) -> bool:
        """
        Apply C{conf}'s overrides to C{body} in place.
        """
        return apply_body_overrides(body, protocol, target(provider, **conf))

    def test_unchanged(self) -> None:
        """
        Without overrides the body is unchanged and the result is false, so
        the client's bytes go upstream untouched.
        """
        body = {"model": "m", "messages": [], "stream": False}
        self.assertFalse(self.apply(body))
        self.assertEqual(body, {"model": "m", "messages": [], "stream": False})

    def test_options_overwrite(self) -> None:
        """
        C{options} overwrite top-level keys flat: an object is replaced, not
        merged.
        """
        body = {"model": "client", "temperature": 1, "metadata": {"a": 1}, "messages": []}
        options = {"model": "gpt-4o", "temperature": 0, "metadata": {"b": 2}, "top_p": 0.5}
        self.assertTrue(self.apply(body, options=options))
        self.assertEqual(
            body,
            {
                "model": "gpt-4o",
                "temperature": 0,
                "metadata": {"b": 2},
                "top_p": 0.5,
                "messages": [],
            },
        )

    def test_options_same_values(self) -> None:
        """
        C{options} already equal to the client's values change nothing.
        """
        body = {"model": "gpt-4o", "messages": [], "metadata": {"a": [1]}}
        self.assertFalse(self.apply(body, options={"model": "gpt-4o", "metadata": {"a": [1]}}))

    def test_options_types_differ(self) -> None:
        """
        A value equal in Python but of another JSON type (C{1} vs C{true})
        is a change: the configured value is sent.
        """
        body = {"messages": [], "logprobs": 1}
        self.assertTrue(self.apply(body, options={"logprobs": True}))
        self.assertIs(body["logprobs"], True)

    def test_max_tokens_mapping(self) -> None:
        """
        C{override.llm_options.max_tokens} sets the provider's own field
        for the protocol, over the client's value.
        """
        cases = [
            ("openai", OPENAI_CHAT, "max_completion_tokens"),
            ("openai", OPENAI_RESPONSES, "max_output_tokens"),
            ("deepseek", OPENAI_CHAT, "max_tokens"),
            ("openai-compatible", OPENAI_CHAT, "max_tokens"),
            ("openai-compatible", OPENAI_RESPONSES, "max_output_tokens"),
            ("aimlapi", OPENAI_CHAT, "max_tokens"),
            ("openrouter", OPENAI_CHAT, "max_tokens"),
            ("gemini", OPENAI_CHAT, "max_completion_tokens"),
            ("azure-openai", OPENAI_CHAT, "max_tokens"),
            ("anthropic", ANTHROPIC_MESSAGES, "max_tokens"),
            ("anthropic", OPENAI_CHAT, "max_tokens"),
        ]
        for provider, protocol, field in cases:
            body = {"messages": [], field: 5}
            self.assertTrue(
                self.apply(body, protocol, provider, override={"llm_options": {"max_tokens": 100}})
            )
            self.assertEqual(body[field], 100, (provider, protocol))
            self.assertEqual([k for k in body if "max" in k], [field], (provider, protocol))

    def test_max_tokens_replaces_client_max_tokens(self) -> None:
        """
        Where the provider's field is C{max_completion_tokens} (openai,
        gemini), the configured limit also removes a client C{max_tokens}:
        OpenAI refuses a body carrying both, as APISIX knows.
        """
        for provider in ("openai", "gemini"):
            body = {"messages": [], "max_tokens": 5}
            self.assertTrue(
                self.apply(
                    body, OPENAI_CHAT, provider, override={"llm_options": {"max_tokens": 100}}
                )
            )
            self.assertEqual(body, {"messages": [], "max_completion_tokens": 100}, provider)
        body = {"messages": [], "max_tokens": 5}
        self.apply(body, OPENAI_CHAT, "deepseek", override={"llm_options": {"max_tokens": 100}})
        self.assertEqual(body, {"messages": [], "max_tokens": 100})

    def test_max_tokens_ignored(self) -> None:
        """
        A protocol without a C{max_tokens} field (embeddings, passthrough)
        is left alone.
        """
        for protocol in (OPENAI_EMBEDDINGS, PASSTHROUGH):
            body = {"input": "x"}
            self.assertFalse(
                self.apply(body, protocol, override={"llm_options": {"max_tokens": 9}})
            )
            self.assertEqual(body, {"input": "x"})

    def test_request_body_client_wins(self) -> None:
        """
        Without force, C{request_body} fills in what the client left out:
        objects are merged recursively, the client's scalars and arrays win.
        """
        body = {"messages": [1], "temperature": 1, "metadata": {"a": 1}, "stop": ["x"]}
        patch = {
            "temperature": 0,
            "seed": 7,
            "metadata": {"a": 2, "b": 3},
            "stop": ["y", "z"],
            "messages": [],
        }
        self.assertTrue(self.apply(body, override={"request_body": {"openai-chat": patch}}))
        self.assertEqual(
            body,
            {
                "messages": [1],
                "temperature": 1,
                "seed": 7,
                "metadata": {"a": 1, "b": 3},
                "stop": ["x"],
            },
        )

    def test_request_body_force(self) -> None:
        """
        With force, C{request_body} values win; objects still merge
        recursively and arrays are replaced wholesale.
        """
        body = {"messages": [1], "temperature": 1, "metadata": {"a": 1, "c": 4}, "stop": ["x", "w"]}
        patch = {"temperature": 0, "metadata": {"a": 2, "b": 3}, "stop": ["y"]}
        override = {"request_body": {"openai-chat": patch}, "request_body_force_override": True}
        self.assertTrue(self.apply(body, override=override))
        self.assertEqual(
            body,
            {
                "messages": [1],
                "temperature": 0,
                "metadata": {"a": 2, "b": 3, "c": 4},
                "stop": ["y"],
            },
        )

    def test_request_body_by_protocol(self) -> None:
        """
        Only the patch of the request's protocol applies.
        """
        body = {"messages": []}
        override = {"request_body": {"openai-responses": {"store": False}}}
        self.assertFalse(self.apply(body, override=override))
        self.assertEqual(body, {"messages": []})

    def test_request_body_after_llm_options(self) -> None:
        """
        C{request_body} is merged after C{llm_options}, so with force it
        has the last word.
        """
        body = {"messages": []}
        override = {
            "llm_options": {"max_tokens": 100},
            "request_body": {"openai-chat": {"max_completion_tokens": 7}},
            "request_body_force_override": True,
        }
        self.apply(body, override=override)
        self.assertEqual(body["max_completion_tokens"], 7)

    def test_request_body_not_aliased(self) -> None:
        """
        The merged values are copies: changing the body later does not
        change the route's config.
        """
        patch = {"metadata": {"tags": ["a"]}}
        conf_patch = copy.deepcopy(patch)
        body: dict[str, Any] = {"messages": []}
        self.apply(body, override={"request_body": {"openai-chat": conf_patch}})
        body["metadata"]["tags"].append("b")
        self.assertEqual(conf_patch, patch)

    def test_model_removed(self) -> None:
        """
        azure-openai takes the model from its URL: C{model} is removed from
        the body (also one set by C{options}).
        """
        body = {"model": "m", "messages": []}
        self.assertTrue(self.apply(body, provider="azure-openai"))
        self.assertEqual(body, {"messages": []})
        body = {"messages": []}
        self.assertFalse(self.apply(body, provider="azure-openai"))
        self.assertTrue(self.apply(body, provider="azure-openai", options={"model": "x"}))
        self.assertNotIn("model", body)

    def test_include_usage(self) -> None:
        """
        Streamed OpenAI chat gets C{stream_options.include_usage: true},
        keeping the client's other stream options.
        """
        body = {"messages": [], "stream": True, "stream_options": {"x": 1}}
        self.assertTrue(self.apply(body))
        self.assertEqual(body["stream_options"], {"x": 1, "include_usage": True})
        body = {"messages": [], "stream": True, "stream_options": {"include_usage": False}}
        self.assertTrue(self.apply(body))
        self.assertIs(body["stream_options"]["include_usage"], True)

    def test_include_usage_present(self) -> None:
        """
        A streamed chat request already asking for usage is unchanged.
        """
        body = {"messages": [], "stream": True, "stream_options": {"include_usage": True}}
        self.assertFalse(self.apply(body))

    def test_include_usage_only_streamed_chat(self) -> None:
        """
        Non-streamed chat and streamed requests of other protocols get no
        C{stream_options}.
        """
        for protocol, body in [
            (OPENAI_CHAT, {"messages": []}),
            (OPENAI_CHAT, {"messages": [], "stream": False}),
            (OPENAI_RESPONSES, {"input": "x", "stream": True}),
            (ANTHROPIC_MESSAGES, {"messages": [], "stream": True}),
            (PASSTHROUGH, {"x": 1, "stream": True}),
        ]:
            self.assertFalse(self.apply(body, protocol), (protocol, body))
            self.assertNotIn("stream_options", body)

    def test_include_usage_options_stream(self) -> None:
        """
        A stream turned on by C{options} also asks for usage.
        """
        body = {"messages": []}
        self.assertTrue(self.apply(body, options={"stream": True}))
        self.assertEqual(body["stream_options"], {"include_usage": True})


_JSON_KEYS = st.sampled_from(["a", "b", "c", "d"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["x", "y", 1.5]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_JSON_KEYS, inner, max_size=3),
    max_leaves=12,
)
_OBJECTS = st.dictionaries(_JSON_KEYS, _JSON, max_size=4)


def applied(target: Any, patch: dict) -> bool:
    """
    Whether every leaf of C{patch} is in C{target}: objects on both sides
    compared recursively, anything else by value.
    """
    for key, value in patch.items():
        if key not in target:
            return False
        if isinstance(value, dict) and isinstance(target[key], dict):
            if not applied(target[key], value):
                return False
        elif json.dumps(target[key], sort_keys=True) != json.dumps(value, sort_keys=True):
            return False
    return True


def kept(original: dict, merged: dict) -> bool:
    """
    Whether every non-object value of C{original} (and each object's
    values, recursively) is still in C{merged}.
    """
    for key, value in original.items():
        if isinstance(value, dict) and isinstance(merged[key], dict):
            if not kept(value, merged[key]):
                return False
        elif json.dumps(merged[key], sort_keys=True) != json.dumps(value, sort_keys=True):
            return False
    return True


class DeepMergeTests(SynchronousTestCase):
    """
    Properties of L{deep_merge}.
    """

    @given(_OBJECTS, _OBJECTS)
    def test_force_applies_patch(self, target: dict, patch: dict) -> None:
        """
        With force, every leaf of the patch ends up in the target.
        """
        deep_merge(target, patch, True)
        self.assertTrue(applied(target, patch))

    @given(_OBJECTS, _OBJECTS)
    def test_no_force_keeps_client(self, target: dict, patch: dict) -> None:
        """
        Without force, nothing the target had is overwritten, and every key
        of the patch is present afterwards.
        """
        original = copy.deepcopy(target)
        deep_merge(target, patch, False)
        self.assertTrue(kept(original, target))
        self.assertTrue(set(patch) <= set(target))

    @given(_OBJECTS, _OBJECTS, st.booleans())
    def test_other_keys_untouched(self, target: dict, patch: dict, force: bool) -> None:
        """
        Keys the patch does not name keep their values.
        """
        original = copy.deepcopy(target)
        deep_merge(target, patch, force)
        for key in set(original) - set(patch):
            self.assertEqual(json.dumps(target[key]), json.dumps(original[key]))

    @given(_OBJECTS, _OBJECTS, st.booleans())
    def test_changed_flag(self, target: dict, patch: dict, force: bool) -> None:
        """
        The result says whether the target changed (JSON types included),
        and merging the same patch again changes nothing.
        """
        before = json.dumps(target, sort_keys=True)
        changed = deep_merge(target, patch, force)
        self.assertEqual(changed, json.dumps(target, sort_keys=True) != before)
        self.assertFalse(deep_merge(target, patch, force))

    @given(_OBJECTS, _OBJECTS, st.booleans())
    def test_patch_not_shared(self, target: dict, patch: dict, force: bool) -> None:
        """
        The patch is neither changed nor shared with the target.
        """
        original = copy.deepcopy(patch)
        deep_merge(target, patch, force)
        self.assertEqual(json.dumps(patch, sort_keys=True), json.dumps(original, sort_keys=True))

        def mutate(node: Any) -> None:
            if isinstance(node, dict):
                for value in node.values():
                    mutate(value)
                node["mutated"] = True
            elif isinstance(node, list):
                node.append("mutated")

        mutate(target)
        self.assertEqual(json.dumps(patch, sort_keys=True), json.dumps(original, sort_keys=True))


class URLTests(SynchronousTestCase):
    """
    L{upstream_url}: endpoint, default paths and query rules.
    """

    def url(
        self,
        protocol: str = OPENAI_CHAT,
        provider: str = "openai",
        path: str = "/v1/chat/completions",
        query: str = "",
        **conf: Any,
    ) -> str:
        """
        The upstream URL of a request to C{path?query}.
        """
        return upstream_url(target(provider, **conf), protocol, path, query)

    def test_provider_defaults(self) -> None:
        """
        Without C{override.endpoint}, the provider's host and its path for
        the protocol are used; the client's query is not forwarded.
        """
        cases = [
            ("openai", OPENAI_CHAT, "https://api.openai.com/v1/chat/completions"),
            ("openai", OPENAI_RESPONSES, "https://api.openai.com/v1/responses"),
            ("openai", OPENAI_EMBEDDINGS, "https://api.openai.com/v1/embeddings"),
            ("deepseek", OPENAI_CHAT, "https://api.deepseek.com/chat/completions"),
            ("aimlapi", OPENAI_CHAT, "https://api.aimlapi.com/chat/completions"),
            ("openrouter", OPENAI_CHAT, "https://openrouter.ai/api/v1/chat/completions"),
            (
                "gemini",
                OPENAI_CHAT,
                "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions",
            ),
            ("anthropic", ANTHROPIC_MESSAGES, "https://api.anthropic.com/v1/messages"),
            ("anthropic", OPENAI_CHAT, "https://api.anthropic.com/v1/chat/completions"),
        ]
        for provider, protocol, expected in cases:
            self.assertEqual(self.url(protocol, provider, query="x=1"), expected)

    def test_endpoint_path_verbatim(self) -> None:
        """
        An endpoint with a path is used as it is, whatever the client's path.
        """
        self.assertEqual(
            self.url(path="/anything", override={"endpoint": "http://127.0.0.1:7751/custom/chat"}),
            "http://127.0.0.1:7751/custom/chat",
        )

    def test_endpoint_root_path(self) -> None:
        """
        C{/} is a path too (as in APISIX): it is sent as it is.
        """
        self.assertEqual(self.url(override={"endpoint": "http://h:1/"}), "http://h:1/")

    def test_endpoint_without_path(self) -> None:
        """
        An endpoint without a path gets the provider's default path.
        """
        self.assertEqual(
            self.url(OPENAI_RESPONSES, override={"endpoint": "http://h:1"}),
            "http://h:1/v1/responses",
        )
        self.assertEqual(
            self.url(provider="deepseek", override={"endpoint": "https://proxy.example"}),
            "https://proxy.example/chat/completions",
        )

    def test_auth_query(self) -> None:
        """
        C{auth.query} parameters are added to the URL.
        """
        url = self.url(auth={"query": {"key": "secret"}})
        self.assertEqual(url, "https://api.openai.com/v1/chat/completions?key=secret")

    def test_endpoint_query(self) -> None:
        """
        The endpoint's query is kept and merged with C{auth.query}; on a
        conflict the endpoint's value wins, as in APISIX.
        """
        url = self.url(
            override={
                "endpoint": "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=1&k=e"
            },
            auth={"query": {"k": "a", "key": "s"}},
            query="api-version=evil",
        )
        parts = urlsplit(url)
        self.assertEqual(parts.path, "/openai/deployments/d/chat/completions")
        self.assertEqual(
            sorted(parse_qsl(parts.query)), [("api-version", "1"), ("k", "e"), ("key", "s")]
        )

    def test_passthrough(self) -> None:
        """
        Passthrough keeps the client's path and query on the upstream host.
        """
        self.assertEqual(
            self.url(PASSTHROUGH, path="/v1/models", query="limit=5&after=m"),
            "https://api.openai.com/v1/models?limit=5&after=m",
        )

    def test_passthrough_endpoint(self) -> None:
        """
        Passthrough with an endpoint goes to the endpoint's host with the
        client's path; the endpoint's query is kept, the client's goes over it.
        """
        url = self.url(
            PASSTHROUGH,
            path="/v1/files",
            query="v=2&limit=1",
            override={"endpoint": "http://h:1/ignored?v=1&api-version=x"},
        )
        parts = urlsplit(url)
        self.assertEqual((parts.netloc, parts.path), ("h:1", "/v1/files"))
        self.assertEqual(
            sorted(parse_qsl(parts.query)), [("api-version", "x"), ("limit", "1"), ("v", "2")]
        )

    def test_passthrough_auth_query_wins(self) -> None:
        """
        A passthrough client cannot override C{auth.query} parameters.
        """
        url = self.url(
            PASSTHROUGH,
            path="/v1/models",
            query="key=evil&limit=5",
            auth={"query": {"key": "good"}},
        )
        self.assertEqual(sorted(parse_qsl(urlsplit(url).query)), [("key", "good"), ("limit", "5")])


def forwarded(client: list[tuple[bytes, list[bytes]]], **auth: Any) -> dict[bytes, list[bytes]]:
    """
    The upstream headers built from C{client} with C{auth}, lower-cased.
    """
    headers = upstream_headers(client, auth)
    return {name.lower(): values for name, values in headers.getAllRawHeaders()}


class HeaderTests(SynchronousTestCase):
    """
    L{upstream_headers}: what the client's headers become upstream.
    """

    def test_dropped(self) -> None:
        """
        Hop-by-hop headers, C{host}, C{content-length} and C{accept-encoding}
        are dropped; the others are kept with all their values.
        """
        client = [
            (name, [b"v"])
            for name in (
                b"Connection",
                b"Keep-Alive",
                b"TE",
                b"Trailer",
                b"Transfer-Encoding",
                b"Upgrade",
                b"Proxy-Authorization",
                b"Proxy-Connection",
                b"Host",
                b"Content-Length",
                b"Accept-Encoding",
            )
        ]
        client += [
            (b"X-Request-Id", [b"r1"]),
            (b"Anthropic-Version", [b"2023-06-01"]),
            (b"X-Multi", [b"a", b"b"]),
        ]
        self.assertEqual(
            forwarded(client),
            {
                b"x-request-id": [b"r1"],
                b"anthropic-version": [b"2023-06-01"],
                b"x-multi": [b"a", b"b"],
                b"content-type": [b"application/json"],
            },
        )

    def test_connection_listed(self) -> None:
        """
        Headers named in the client's C{Connection} header are hop-by-hop
        too, whatever their case.
        """
        client = [
            (b"Connection", [b"keep-alive, X-Hop-One", b"x-hop-two"]),
            (b"X-Hop-One", [b"1"]),
            (b"X-HOP-TWO", [b"2"]),
            (b"X-Kept", [b"3"]),
        ]
        self.assertEqual(
            forwarded(client), {b"x-kept": [b"3"], b"content-type": [b"application/json"]}
        )

    def test_auth_header_wins(self) -> None:
        """
        C{auth.header} replaces a client header of the same name, whatever
        the case on either side.
        """
        client = [(b"AUTHORIZATION", [b"Bearer client"]), (b"x-api-key", [b"client"])]
        headers = forwarded(client, header={"authorization": "Bearer route", "X-Api-Key": "route"})
        self.assertEqual(headers[b"authorization"], [b"Bearer route"])
        self.assertEqual(headers[b"x-api-key"], [b"route"])

    def test_client_credentials_dropped(self) -> None:
        """
        When the route supplies credentials, the client's C{authorization},
        C{cookie}, C{x-api-key} and C{api-key} are not forwarded.
        """
        client = [
            (b"Authorization", [b"Bearer client"]),
            (b"Cookie", [b"session=1"]),
            (b"X-Api-Key", [b"k"]),
            (b"Api-Key", [b"k"]),
            (b"User-Agent", [b"ua"]),
        ]
        for auth in ({"header": {"X-Custom-Auth": "route"}}, {"query": {"key": "route"}}):
            headers = forwarded(client, **auth)
            for name in (b"authorization", b"cookie", b"x-api-key", b"api-key"):
                self.assertNotIn(name, headers, auth)
            self.assertEqual(headers[b"user-agent"], [b"ua"])

    def test_client_credentials_without_route_credentials(self) -> None:
        """
        A route without credentials forwards the client's own.
        """
        client = [(b"Authorization", [b"Bearer client"]), (b"Cookie", [b"c=1"])]
        headers = forwarded(client)
        self.assertEqual(headers[b"authorization"], [b"Bearer client"])
        self.assertEqual(headers[b"cookie"], [b"c=1"])

    def test_content_type_forced(self) -> None:
        """
        The upstream always gets C{content-type: application/json}.
        """
        headers = forwarded([(b"Content-Type", [b"application/json; charset=utf-8"])])
        self.assertEqual(headers, {b"content-type": [b"application/json"]})

    def test_from_twisted_headers(self) -> None:
        """
        The client's L{Headers} can be passed as they come from a request.
        """
        client = Headers({b"Host": [b"gw"], b"X-Trace": [b"t"]})
        headers = forwarded(list(client.getAllRawHeaders()), header={"Authorization": "Bearer k"})
        self.assertEqual(
            headers,
            {
                b"x-trace": [b"t"],
                b"authorization": [b"Bearer k"],
                b"content-type": [b"application/json"],
            },
        )
