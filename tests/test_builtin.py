# -*- test-case-name: tests.test_builtin -*-
"""
Tests for the built-in plugins (L{aiproxy.builtin}): their interfaces,
config errors, request-side behaviour, and response filters driven through
a real exchange without sockets (L{tests.test_proxy.Gateway}).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aiproxy.builtin import BUILTINS
from aiproxy.builtin.prompt_decorator import decorate
from aiproxy.builtin.prompt_guard import NOT_ALLOWED, PROHIBITED, UNRECOGNIZED, messages_of
from aiproxy.config import ConfigError
from aiproxy.context import ExchangeContext
from aiproxy.filters import Reject, Replace, Terminate
from aiproxy.interfaces import IBodyFilter, IBodyFilterFactory, IFilterPlugin, IRequestFilter
from aiproxy.plugins import BUILTIN_PLUGINS, available_plugins
from aiproxy.stream.protocols import (
    ANTHROPIC_MESSAGES,
    BEDROCK_CONVERSE,
    OPENAI_CHAT,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    PASSTHROUGH,
)
from aiproxy.stream.sse import SSEDecoder
from tests.helpers import log_events
from tests.test_proxy import (
    CHAT,
    DONE,
    Gateway,
    ScriptedFilter,
    TaggingPlugin,
    json_response,
    make_table,
    stream_response,
)

ANTHROPIC_ENDPOINT = "http://upstream.test:7751/v1/messages"


def configure(name: str, config: dict[str, Any]) -> Any:
    """
    Validate C{config} as the loader does (defaults filled) and configure
    the built-in C{name} with it.
    """
    table = make_table(plugins={name: config}, filter_plugins=BUILTINS)
    route = table.routes[0]
    configured = route.request_filters + route.body_filters
    assert len(configured) == 1, configured
    return configured[0]


def config_problems(plugins: dict[str, Any]) -> list[str]:
    """
    The problem lines of a route with these filter plugins.
    """
    try:
        make_table(plugins=plugins, filter_plugins=BUILTINS)
    except ConfigError as e:
        return e.problems
    raise AssertionError("the config was accepted")


def chunk(
    text: str | None = None, finish: str | None = None, role: bool = False, index: int = 0
) -> bytes:
    """
    An OpenAI C{chat.completion.chunk} event.
    """
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    document = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-test-0",
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def completion(text: str) -> bytes:
    """
    A non-streamed OpenAI C{chat.completion} whose message is C{text}.
    """
    document = {
        "id": "x",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
    }
    return json.dumps(document).encode()


def anthropic(kind: str, **fields: Any) -> bytes:
    """
    An Anthropic messages stream event.
    """
    return (
        b"event: "
        + kind.encode()
        + b"\ndata: "
        + json.dumps({"type": kind, **fields}).encode()
        + b"\n\n"
    )


def anthropic_delta(text: str, index: int = 0) -> bytes:
    return anthropic("content_block_delta", index=index, delta={"type": "text_delta", "text": text})


ANTHROPIC_HEAD = anthropic(
    "message_start",
    message={
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [],
    },
) + anthropic("content_block_start", index=0, content_block={"type": "text", "text": ""})
ANTHROPIC_TAIL = (
    anthropic("content_block_stop", index=0)
    + anthropic("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 3})
    + anthropic("message_stop")
)
ANTHROPIC_REQUEST = {
    "model": "claude-test",
    "max_tokens": 10,
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


def halves(*events: bytes) -> list[bytes]:
    """
    Every event split in two chunks in its middle.
    """
    out = []
    for event in events:
        middle = len(event) // 2
        out += [event[:middle], event[middle:]]
    return out


def decode(body: bytes) -> list[Any]:
    """
    The events of a stream body as C{(event, parsed data)}; every data is
    JSON or C{[DONE]}, and the stream ends at an event boundary.
    """
    decoder = SSEDecoder()
    events = decoder.feed(body)
    assert decoder.pending == 0, body
    return [
        (e.event, e.data.decode() if e.data == b"[DONE]" else json.loads(e.data)) for e in events
    ]


def openai_text(body: bytes) -> str:
    """
    The content text of an OpenAI chat stream.
    """
    return "".join(
        choice["delta"].get("content") or ""
        for _, data in decode(body)
        if isinstance(data, dict)
        for choice in data.get("choices", [])
    )


def anthropic_text(body: bytes) -> str:
    """
    The text of an Anthropic messages stream.
    """
    return "".join(
        data["delta"]["text"] for kind, data in decode(body) if kind == "content_block_delta"
    )


def anthropic_table(plugins: dict[str, Any]) -> Any:
    """
    A route serving Anthropic messages clients from an Anthropic upstream.
    """
    conf = {
        "provider": "anthropic",
        "auth": {"header": {"x-api-key": "k"}},
        "override": {"endpoint": ANTHROPIC_ENDPOINT},
        "streaming_flush_interval_ms": 0,
    }
    route = {"id": "claude", "uri": "/v1/messages", "plugins": {"ai-proxy": conf, **plugins}}
    return make_table(routes=[route], filter_plugins=BUILTINS)


class PluginTests(SynchronousTestCase):
    """
    The built-ins as plugins.
    """

    def test_provide_interface(self) -> None:
        """
        Every built-in provides L{IFilterPlugin}, with APISIX's priorities
        where APISIX has the plugin.
        """
        for plugin in BUILTINS:
            self.assertTrue(verifyObject(IFilterPlugin, plugin))
        priorities = {plugin.name: plugin.priority for plugin in BUILTINS}
        self.assertEqual(
            priorities,
            {
                "ai-prompt-guard": 1072,
                "ai-prompt-decorator": 1070,
                "ai-response-guard": 1030,
                "ai-response-redact": 1025,
            },
        )

    def test_registered(self) -> None:
        """
        The built-ins are registered and available by name.
        """
        self.assertEqual(BUILTIN_PLUGINS, BUILTINS)
        available = available_plugins()
        for plugin in BUILTINS:
            self.assertIs(available[plugin.name], plugin)

    def test_configured_providers(self) -> None:
        """
        The request plugins configure to L{IRequestFilter} providers, the
        response plugins to L{IBodyFilterFactory} providers whose filters
        provide L{IBodyFilter}.
        """
        guard = configure("ai-prompt-guard", {"deny_patterns": ["x"]})
        self.assertTrue(verifyObject(IRequestFilter, guard))
        decorator = configure(
            "ai-prompt-decorator", {"prepend": [{"role": "system", "content": "s"}]}
        )
        self.assertTrue(verifyObject(IRequestFilter, decorator))
        context = ExchangeContext("r", "i", 0.0)
        context.protocol = OPENAI_CHAT
        context.upstream_protocol = OPENAI_CHAT
        for name, config in [
            ("ai-response-guard", {"deny_patterns": ["x"]}),
            ("ai-response-redact", {"rules": [{"pattern": "x"}]}),
        ]:
            factory = configure(name, config)
            self.assertTrue(verifyObject(IBodyFilterFactory, factory))
            self.assertTrue(verifyObject(IBodyFilter, factory.body_filter(context)))

    def test_unsupported_protocol(self) -> None:
        """
        The response plugins leave responses they cannot read alone: no
        filter for an embeddings or Responses request.
        """
        for name, config in [
            ("ai-response-guard", {"deny_patterns": ["x"]}),
            ("ai-response-redact", {"rules": [{"pattern": "x"}]}),
        ]:
            factory = configure(name, config)
            for protocol in (OPENAI_EMBEDDINGS, OPENAI_RESPONSES, PASSTHROUGH):
                context = ExchangeContext("r", "i", 0.0)
                context.protocol = protocol
                context.upstream_protocol = protocol
                self.assertIsNone(factory.body_filter(context))

    def test_unsupported_protocol_warned_once(self) -> None:
        """
        A response plugin warns once per protocol it cannot read, in its
        own log namespace, not once per request.
        """
        plugins: list[tuple[str, dict[str, Any]]] = [
            ("ai-response-guard", {"deny_patterns": ["x"]}),
            ("ai-response-redact", {"rules": [{"pattern": "x"}]}),
        ]
        for name, config in plugins:
            module = "aiproxy.builtin." + name.removeprefix("ai-").replace("-", "_")
            events = log_events(self, module)
            factory = configure(name, config)
            for protocol in (OPENAI_EMBEDDINGS, OPENAI_EMBEDDINGS, PASSTHROUGH, OPENAI_CHAT):
                context = ExchangeContext("r", "i", 0.0)
                context.protocol = protocol
                context.upstream_protocol = protocol
                factory.body_filter(context)
            self.assertEqual(
                [(e["log_level"], e["protocol"]) for e in events],
                [(LogLevel.warn, OPENAI_EMBEDDINGS), (LogLevel.warn, PASSTHROUGH)],
            )
            self.assertIn(name + " does not read", formatEvent(events[0]))

    def test_defaults(self) -> None:
        """
        The loader fills in the documented defaults.
        """
        guard = configure("ai-response-guard", {"deny_patterns": ["x"]})
        self.assertEqual(
            (guard.deny_code, guard.deny_message, guard.hold_back_chars),
            (200, "your request is rejected", 64),
        )
        redact = configure("ai-response-redact", {"rules": [{"pattern": "x"}]})
        self.assertEqual((redact.replacements, redact.hold_back_chars), (["[REDACTED]"], 64))
        prompt = configure("ai-prompt-guard", {})
        self.assertEqual(
            (
                prompt.match_all_roles,
                prompt.match_all_history,
                prompt.allow,
                prompt.deny,
                prompt.fail_mode,
            ),
            (False, False, [], [], "skip"),
        )


class ConfigErrorTests(SynchronousTestCase):
    """
    Config problems of the built-ins, at their JSON paths.
    """

    def test_invalid_deny_pattern(self) -> None:
        """
        A deny pattern that does not compile is reported at its index.
        """
        problems = config_problems({"ai-prompt-guard": {"deny_patterns": ["ok", "(bad"]}})
        self.assertEqual(len(problems), 1)
        self.assertTrue(
            problems[0].startswith(
                "routes[0].plugins.ai-prompt-guard.deny_patterns[1]: invalid regular expression: "
            ),
            problems,
        )

    def test_every_bad_pattern(self) -> None:
        """
        Every bad pattern of every plugin is reported, each at its path.
        """
        problems = config_problems(
            {
                "ai-prompt-guard": {"allow_patterns": ["[a"], "deny_patterns": ["(b"]},
                "ai-response-guard": {"deny_patterns": ["a", "*x"]},
                "ai-response-redact": {
                    "rules": [{"pattern": "(?P<n>x)", "replacement": r"\g<m>"}, {"pattern": "("}]
                },
            }
        )
        paths = sorted(problem.split(": ")[0] for problem in problems)
        self.assertEqual(
            paths,
            [
                "routes[0].plugins.ai-prompt-guard.allow_patterns[0]",
                "routes[0].plugins.ai-prompt-guard.deny_patterns[0]",
                "routes[0].plugins.ai-response-guard.deny_patterns[1]",
                "routes[0].plugins.ai-response-redact.rules[0].replacement",
                "routes[0].plugins.ai-response-redact.rules[1].pattern",
            ],
        )

    def test_empty_match(self) -> None:
        """
        A response pattern matching the empty string is refused.
        """
        problems = config_problems({"ai-response-redact": {"rules": [{"pattern": "a*"}]}})
        self.assertEqual(
            problems,
            [
                "routes[0].plugins.ai-response-redact.rules[0].pattern: invalid regular expression: it matches the empty string"
            ],
        )

    def test_schema_errors(self) -> None:
        """
        Schema violations are reported like every other config error.
        """
        problems = config_problems(
            {
                "ai-prompt-decorator": {},
                "ai-response-guard": {"deny_patterns": ["x"], "deny_code": 700, "colour": 1},
            }
        )
        self.assertEqual(
            problems,
            [
                "routes[0].plugins.ai-prompt-decorator: at least one of 'prepend' or 'append' is required",
                "routes[0].plugins.ai-response-guard.colour: unknown key 'colour'",
                "routes[0].plugins.ai-response-guard.deny_code: 700 is greater than the maximum of 599",
            ],
        )

    def test_unknown_plugin(self) -> None:
        """
        A plugin name that is neither built in nor installed is an error.
        """
        problems = config_problems({"ai-no-such-plugin": {}})
        self.assertEqual(
            problems, ["routes[0].plugins.ai-no-such-plugin: unknown plugin 'ai-no-such-plugin'"]
        )


def guard_context(body: dict[str, Any], protocol: str = OPENAI_CHAT) -> Any:
    return SimpleNamespace(body=body, protocol=protocol)


class PromptGuardTests(SynchronousTestCase):
    """
    C{ai-prompt-guard}, as APISIX's.
    """

    def test_deny(self) -> None:
        """
        A last user message matching a deny pattern gets 400 with APISIX's
        message.
        """
        guard = configure("ai-prompt-guard", {"deny_patterns": [r"pass(word)?"]})
        result = guard.filter_request(
            guard_context({"messages": [{"role": "user", "content": "my password"}]})
        )
        self.assertEqual(result, Reject(400, {"message": PROHIBITED}))
        self.assertIsNone(
            guard.filter_request(
                guard_context({"messages": [{"role": "user", "content": "hello"}]})
            )
        )

    def test_allow_first(self) -> None:
        """
        With allow patterns, a prompt matching none gets 400; allow is
        checked before deny.
        """
        guard = configure(
            "ai-prompt-guard", {"allow_patterns": ["weather"], "deny_patterns": ["rain"]}
        )
        self.assertEqual(
            guard.filter_request(
                guard_context({"messages": [{"role": "user", "content": "hello"}]})
            ),
            Reject(400, {"message": NOT_ALLOWED}),
        )
        self.assertEqual(
            guard.filter_request(
                guard_context({"messages": [{"role": "user", "content": "weather: rain"}]})
            ),
            Reject(400, {"message": PROHIBITED}),
        )
        self.assertIsNone(
            guard.filter_request(
                guard_context({"messages": [{"role": "user", "content": "weather?"}]})
            )
        )

    def test_last_message_only(self) -> None:
        """
        By default only the last message is checked, and only if it is the
        user's.
        """
        guard = configure("ai-prompt-guard", {"deny_patterns": ["bad"]})
        history = [{"role": "user", "content": "bad"}, {"role": "user", "content": "fine"}]
        self.assertIsNone(guard.filter_request(guard_context({"messages": history})))
        last_system = [{"role": "user", "content": "fine"}, {"role": "system", "content": "bad"}]
        self.assertIsNone(guard.filter_request(guard_context({"messages": last_system})))

    def test_all_history_and_roles(self) -> None:
        """
        C{match_all_conversation_history} checks every message, and
        C{match_all_roles} every role.
        """
        history = [{"role": "user", "content": "bad"}, {"role": "user", "content": "fine"}]
        guard = configure(
            "ai-prompt-guard", {"deny_patterns": ["bad"], "match_all_conversation_history": True}
        )
        self.assertEqual(
            guard.filter_request(guard_context({"messages": history})),
            Reject(400, {"message": PROHIBITED}),
        )
        system = [{"role": "system", "content": "bad"}, {"role": "user", "content": "fine"}]
        self.assertIsNone(guard.filter_request(guard_context({"messages": system})))
        guard = configure(
            "ai-prompt-guard",
            {
                "deny_patterns": ["bad"],
                "match_all_conversation_history": True,
                "match_all_roles": True,
            },
        )
        self.assertEqual(
            guard.filter_request(guard_context({"messages": system})),
            Reject(400, {"message": PROHIBITED}),
        )

    def test_joined_with_spaces(self) -> None:
        """
        The checked texts are joined with spaces, text parts too.
        """
        guard = configure(
            "ai-prompt-guard",
            {"deny_patterns": ["one two three"], "match_all_conversation_history": True},
        )
        messages = [
            {"role": "user", "content": "one"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "two"},
                    {"type": "image_url", "image_url": {}},
                    {"type": "text", "text": "three"},
                ],
            },
        ]
        self.assertEqual(
            guard.filter_request(guard_context({"messages": messages})),
            Reject(400, {"message": PROHIBITED}),
        )

    def test_fail_mode(self) -> None:
        """
        A request in no chat format passes, unless C{fail_mode} is
        C{error}.
        """
        passthrough = guard_context({"prompt": "bad"}, PASSTHROUGH)
        self.assertIsNone(
            configure("ai-prompt-guard", {"deny_patterns": ["bad"]}).filter_request(passthrough)
        )
        strict = configure("ai-prompt-guard", {"deny_patterns": ["bad"], "fail_mode": "error"})
        self.assertEqual(strict.filter_request(passthrough), Reject(400, {"message": UNRECOGNIZED}))

    def test_messages_of(self) -> None:
        """
        The messages of each protocol, as C{(role, text)}.
        """
        self.assertEqual(
            messages_of(
                ANTHROPIC_MESSAGES,
                {
                    "system": "sys",
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                },
            ),
            [("system", "sys"), ("user", "a")],
        )
        self.assertEqual(
            messages_of(
                OPENAI_RESPONSES,
                {
                    "instructions": "be",
                    "input": [
                        {"role": "assistant", "content": "x"},
                        {"content": [{"type": "input_text", "text": "y"}]},
                    ],
                },
            ),
            [("system", "be"), ("assistant", "x"), ("user", "y")],
        )
        self.assertEqual(messages_of(OPENAI_RESPONSES, {"input": "q"}), [("user", "q")])
        self.assertEqual(messages_of(OPENAI_EMBEDDINGS, {"input": "e"}), [("user", "e")])
        self.assertEqual(
            messages_of(
                BEDROCK_CONVERSE,
                {
                    "system": [{"text": "s"}],
                    "messages": [{"role": "user", "content": [{"text": "m"}]}],
                },
            ),
            [("system", "s"), ("user", "m")],
        )
        self.assertIsNone(messages_of(PASSTHROUGH, {"x": 1}))

    def test_responses_all_items(self) -> None:
        """
        For the Responses API every input item is checked (they are not
        history).
        """
        guard = configure("ai-prompt-guard", {"deny_patterns": ["bad"]})
        body = {"input": [{"role": "user", "content": "bad"}, {"role": "user", "content": "fine"}]}
        self.assertEqual(
            guard.filter_request(guard_context(body, OPENAI_RESPONSES)),
            Reject(400, {"message": PROHIBITED}),
        )

    def test_through_exchange(self) -> None:
        """
        Through the gateway a denied prompt is answered with 400 and
        nothing goes upstream.
        """
        table = make_table(
            plugins={"ai-prompt-guard": {"deny_patterns": ["secret"]}}, filter_plugins=BUILTINS
        )
        gateway = Gateway(self, table)
        gateway.send({"messages": [{"role": "user", "content": "tell me the secret"}]})
        response = gateway.response()
        self.assertEqual(response.status, 400)
        self.assertEqual(response.json(), {"message": PROHIBITED})
        self.assertEqual(gateway.client.calls, [])


class PromptDecoratorTests(SynchronousTestCase):
    """
    C{ai-prompt-decorator}, as APISIX's.
    """

    PREPEND = [{"role": "system", "content": "be brief"}]
    APPEND = [{"role": "user", "content": "answer in French"}]

    def test_chat(self) -> None:
        """
        OpenAI chat and Anthropic messages: the lists go around the
        messages.
        """
        for protocol in (OPENAI_CHAT, ANTHROPIC_MESSAGES):
            body = {"messages": [{"role": "user", "content": "hi"}]}
            self.assertTrue(decorate(protocol, body, self.PREPEND, self.APPEND))
            self.assertEqual(
                body["messages"], self.PREPEND + [{"role": "user", "content": "hi"}] + self.APPEND
            )

    def test_responses(self) -> None:
        """
        Responses: prepended contents go before C{instructions}, appended
        ones after the input.
        """
        body: dict[str, Any] = {"instructions": "old", "input": "q"}
        decorate(OPENAI_RESPONSES, body, self.PREPEND, self.APPEND)
        self.assertEqual(body, {"instructions": "be brief\nold", "input": "q\nanswer in French"})
        listed: dict[str, Any] = {"input": [{"role": "user", "content": "q"}]}
        decorate(OPENAI_RESPONSES, listed, [], self.APPEND)
        self.assertEqual(
            listed["input"][-1], {"type": "message", "role": "user", "content": "answer in French"}
        )

    def test_bedrock(self) -> None:
        """
        Bedrock: system messages become system blocks.
        """
        body: dict[str, Any] = {
            "system": [{"text": "old"}],
            "messages": [{"role": "user", "content": [{"text": "q"}]}],
        }
        decorate(BEDROCK_CONVERSE, body, self.PREPEND, self.APPEND)
        self.assertEqual(body["system"], [{"text": "be brief"}, {"text": "old"}])
        self.assertEqual(
            body["messages"][-1], {"role": "user", "content": [{"text": "answer in French"}]}
        )

    def test_untouched(self) -> None:
        """
        Embeddings and passthrough requests are left alone.
        """
        for protocol in (OPENAI_EMBEDDINGS, PASSTHROUGH):
            body = {"input": "x"}
            self.assertFalse(decorate(protocol, body, self.PREPEND, self.APPEND))
            self.assertEqual(body, {"input": "x"})

    def test_through_exchange(self) -> None:
        """
        Through the gateway, the decorated body goes upstream; the guard
        (higher priority) checks the client's own last message.
        """
        plugins = {
            "ai-prompt-decorator": {"prepend": self.PREPEND, "append": self.APPEND},
            "ai-prompt-guard": {"deny_patterns": ["French"]},
        }
        gateway = Gateway(self, make_table(plugins=plugins, filter_plugins=BUILTINS))
        gateway.send(CHAT)
        sent = json.loads(gateway.upstream.body)
        self.assertEqual(sent["messages"], self.PREPEND + CHAT["messages"] + self.APPEND)


class ResponseGuardTests(SynchronousTestCase):
    """
    C{ai-response-guard} on real exchanges.
    """

    def gateway(self, **config: Any) -> Gateway:
        conf = {"deny_patterns": ["forbidden"], **config}
        table = make_table(
            {"streaming_flush_interval_ms": 0},
            plugins={"ai-response-guard": conf},
            filter_plugins=BUILTINS,
        )
        return Gateway(self, table)

    def test_clean_stream_unchanged(self) -> None:
        """
        A stream without a match reaches the client byte for byte, chunk by
        chunk.
        """
        gateway = self.gateway()
        upstream = gateway.stream()
        chunks = [chunk("", role=True), chunk("all "), chunk("fine"), chunk(finish="stop"), DONE]
        upstream.data(*chunks)
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.chunks, chunks)
        self.assertTrue(response.complete)

    def test_split_match_after_output(self) -> None:
        """
        A match split across two chunks is found before its first half is
        sent: the client gets the text before it, then a refusal chunk and
        C{[DONE]}; the upstream is aborted.
        """
        gateway = self.gateway(deny_message="no can do")
        upstream = gateway.stream()
        upstream.data(chunk("", role=True), chunk("this is forb"))
        upstream.data(chunk("idden stuff"), chunk(" more"))
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        self.assertTrue(upstream.transport.stopped)
        events = decode(response.body)
        self.assertEqual(openai_text(response.body), "this is no can do")
        self.assertNotIn(b"forb", response.body)
        self.assertEqual(events[-1], ("message", "[DONE]"))
        self.assertEqual(events[-2][1]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(events[-2][1]["id"], "chatcmpl-1")
        self.assertEqual(gateway.record["abort_reason"], "ai_response_guard")

    def test_split_mid_event(self) -> None:
        """
        Upstream chunks that end in the middle of events change nothing.
        """
        gateway = self.gateway()
        upstream = gateway.stream()
        upstream.data(*halves(chunk("", role=True), chunk("a forbi"), chunk("dden b")))
        response = gateway.response()
        self.assertEqual(openai_text(response.body), "a your request is rejected")
        self.assertTrue(upstream.transport.stopped)

    def test_hit_before_output(self) -> None:
        """
        A hit before anything was sent answers C{deny_code} with a whole
        refusal stream.
        """
        gateway = self.gateway(deny_code=403)
        upstream = gateway.stream()
        upstream.data(chunk("", role=True) + chunk("forbidden"))
        response = gateway.response()
        self.assertEqual(response.status, 403)
        self.assertEqual(response.header("content-type"), "text/event-stream")
        self.assertEqual(openai_text(response.body), "your request is rejected")
        self.assertEqual(decode(response.body)[-1], ("message", "[DONE]"))
        self.assertTrue(upstream.transport.stopped)

    def test_held_text_released_at_end(self) -> None:
        """
        Text held as a possible match start is released when the choice
        finishes.
        """
        gateway = self.gateway()
        upstream = gateway.stream()
        upstream.data(chunk("", role=True), chunk("go for"), chunk(finish="stop"), DONE)
        upstream.end()
        response = gateway.response()
        self.assertEqual(openai_text(response.body), "go for")
        self.assertEqual(decode(response.body)[-1], ("message", "[DONE]"))
        self.assertTrue(response.complete)

    def test_non_stream(self) -> None:
        """
        A non-streamed answer with a match is replaced by a
        C{chat.completion} refusal with C{deny_code}.
        """
        gateway = self.gateway(deny_code=451)
        gateway.send(CHAT)
        body = completion("so forbidden")
        upstream = gateway.answer(json_response(body, length=len(body)))
        upstream.data(body)
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 451)
        refusal = response.json()
        self.assertEqual(refusal["object"], "chat.completion")
        self.assertEqual(
            refusal["choices"][0]["message"],
            {"role": "assistant", "content": "your request is rejected"},
        )

    def test_anthropic_after_output(self) -> None:
        """
        An Anthropic stream is ended with the refusal in the open block,
        then C{content_block_stop}, C{message_delta} and C{message_stop}.
        """
        gateway = Gateway(
            self, anthropic_table({"ai-response-guard": {"deny_patterns": ["forbidden"]}})
        )
        gateway.send(ANTHROPIC_REQUEST, path=b"/v1/messages")
        upstream = gateway.answer(stream_response())
        upstream.data(ANTHROPIC_HEAD, anthropic_delta("it is forbi"), anthropic_delta("dden"))
        response = gateway.response()
        self.assertTrue(response.complete)
        kinds = [kind for kind, _ in decode(response.body)]
        self.assertEqual(
            kinds,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
        )
        self.assertEqual(anthropic_text(response.body), "it is your request is rejected")


class ResponseRedactTests(SynchronousTestCase):
    """
    C{ai-response-redact} on real exchanges.
    """

    EMAIL = {"pattern": r"[\w.+-]+@[\w-]+\.[\w.]+", "replacement": "[email]"}

    def gateway(self, **config: Any) -> Gateway:
        conf = {"rules": [self.EMAIL], **config}
        table = make_table(
            {"streaming_flush_interval_ms": 0},
            plugins={"ai-response-redact": conf},
            filter_plugins=BUILTINS,
        )
        return Gateway(self, table)

    def test_split_secret(self) -> None:
        """
        An address split across two upstream chunks is redacted; every
        event the client gets is valid SSE and JSON.
        """
        gateway = self.gateway()
        upstream = gateway.stream()
        upstream.data(
            chunk("", role=True),
            chunk("write to user@exa"),
            chunk("mple.com today"),
            chunk(finish="stop"),
            DONE,
        )
        upstream.end()
        response = gateway.response()
        self.assertTrue(response.complete)
        self.assertEqual(openai_text(response.body), "write to [email] today")
        self.assertNotIn(b"user@", response.body)
        self.assertNotIn(b"mple.com", response.body)
        self.assertEqual(decode(response.body)[-1], ("message", "[DONE]"))

    def test_split_mid_event(self) -> None:
        """
        Upstream writes split in the middle of events (and of the secret)
        still give whole, valid events and the redacted text.
        """
        gateway = self.gateway()
        upstream = gateway.stream()
        upstream.data(
            *halves(
                chunk("", role=True),
                chunk("a@"),
                chunk("b.co"),
                chunk("m x"),
                chunk(finish="stop"),
                DONE,
            )
        )
        upstream.end()
        response = gateway.response()
        self.assertEqual(openai_text(response.body), "[email] x")
        for body_chunk in response.chunks:
            self.assertTrue(body_chunk.endswith(b"\n\n"), body_chunk)

    def test_release_at_once(self) -> None:
        """
        Text that cannot start a match goes on with its own chunk,
        unchanged.
        """
        gateway = self.gateway()
        upstream = gateway.stream()
        upstream.data(chunk("", role=True), chunk("hello, "))
        self.assertEqual(gateway.response().chunks, [chunk("", role=True), chunk("hello, ")])

    def test_groups_and_rules(self) -> None:
        """
        Several rules, and replacements using groups.
        """
        gateway = self.gateway(
            rules=[
                {"pattern": r"(sk-)\w{8,}", "replacement": r"\1****"},
                {"pattern": r"\d{3}-\d{4}", "replacement": "###-####"},
            ]
        )
        upstream = gateway.stream()
        upstream.data(
            chunk("key sk-abcdefgh call 555-"), chunk("1234 now"), chunk(finish="stop"), DONE
        )
        upstream.end()
        self.assertEqual(openai_text(gateway.response().body), "key sk-**** call ###-#### now")

    def test_non_stream(self) -> None:
        """
        A non-streamed answer is redacted with a correct length.
        """
        gateway = self.gateway()
        gateway.send(CHAT)
        body = completion("mail a@b.com")
        upstream = gateway.answer(json_response(body, length=len(body)))
        upstream.data(body)
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json()["choices"][0]["message"]["content"], "mail [email]")
        self.assertEqual(int(response.header("content-length") or 0), len(response.body))

    def test_anthropic(self) -> None:
        """
        Anthropic text deltas are redacted; held text is released before
        C{content_block_stop}.
        """
        gateway = Gateway(self, anthropic_table({"ai-response-redact": {"rules": [self.EMAIL]}}))
        gateway.send(ANTHROPIC_REQUEST, path=b"/v1/messages")
        upstream = gateway.answer(stream_response())
        upstream.data(
            ANTHROPIC_HEAD, anthropic_delta("hi a@"), anthropic_delta("b.com"), ANTHROPIC_TAIL
        )
        upstream.end()
        response = gateway.response()
        self.assertEqual(anthropic_text(response.body), "hi [email]")
        kinds = [kind for kind, _ in decode(response.body)]
        self.assertEqual(kinds[-3:], ["content_block_stop", "message_delta", "message_stop"])


class CompositionTests(SynchronousTestCase):
    """
    Several filters on one route.
    """

    def test_priority_order(self) -> None:
        """
        The guard (1030) runs before the redactor (1025): it sees the
        upstream's text, not the redacted one.
        """
        plugins = {
            "ai-response-redact": {"rules": [{"pattern": "forbidden", "replacement": "[x]"}]},
            "ai-response-guard": {"deny_patterns": ["forbidden"]},
        }
        gateway = Gateway(
            self,
            make_table(
                {"streaming_flush_interval_ms": 0}, plugins=plugins, filter_plugins=BUILTINS
            ),
        )
        upstream = gateway.stream()
        upstream.data(chunk("", role=True), chunk("a "), chunk("forbidden b"))
        self.assertEqual(openai_text(gateway.response().body), "a your request is rejected")

    def test_replace_feeds_next(self) -> None:
        """
        A lower-priority filter receives the redactor's output.
        """
        tagger = TaggingPlugin("tagger", 1)
        plugins = {
            "ai-response-redact": {"rules": [{"pattern": "secret", "replacement": "***"}]},
            "tagger": {},
        }
        table = make_table(
            {"streaming_flush_interval_ms": 0}, plugins=plugins, filter_plugins=[*BUILTINS, tagger]
        )
        gateway = Gateway(self, table)
        upstream = gateway.stream()
        upstream.data(chunk("a secret b"))
        [sent] = gateway.response().chunks
        self.assertEqual(sent, chunk("a *** b") + b"|tagger")

    def test_terminate_stops_chain(self) -> None:
        """
        After the guard terminated, lower-priority filters see nothing more
        and their final call is not made.
        """
        recorder = ScriptedFilter()

        class Factory:
            def body_filter(self, context: Any) -> Any:
                return recorder

        from zope.interface import directlyProvides

        factory = Factory()
        directlyProvides(factory, IBodyFilterFactory)
        table = make_table(
            {"streaming_flush_interval_ms": 0},
            plugins={"ai-response-guard": {"deny_patterns": ["bad"]}},
            filter_plugins=BUILTINS,
        )
        table.routes[0].body_filters = [*table.routes[0].body_filters, factory]
        gateway = Gateway(self, table)
        upstream = gateway.stream()
        upstream.data(chunk("ok"), chunk("bad!"), chunk("more"))
        upstream.end()
        self.assertEqual([seen["chunk"] for seen in recorder.seen], [chunk("ok")])
        self.assertEqual(recorder.finished, [])

    def test_guard_then_redact_stream(self) -> None:
        """
        With both response plugins, a clean stream is redacted and ends
        properly.
        """
        plugins = {
            "ai-response-redact": {"rules": [{"pattern": r"\d{4}-\d{4}", "replacement": "****"}]},
            "ai-response-guard": {"deny_patterns": ["forbidden"]},
        }
        gateway = Gateway(
            self,
            make_table(
                {"streaming_flush_interval_ms": 0}, plugins=plugins, filter_plugins=BUILTINS
            ),
        )
        upstream = gateway.stream()
        upstream.data(
            *halves(
                chunk("", role=True),
                chunk("card 1234-"),
                chunk("5678 ok"),
                chunk(finish="stop"),
                DONE,
            )
        )
        upstream.end()
        response = gateway.response()
        self.assertTrue(response.complete)
        self.assertEqual(openai_text(response.body), "card **** ok")
        self.assertEqual(decode(response.body)[-1], ("message", "[DONE]"))


class FilterUnitTests(SynchronousTestCase):
    """
    The response filters called directly.
    """

    def test_replace_types(self) -> None:
        """
        Results are L{None}, L{Replace} or L{Terminate}.
        """
        factory = configure("ai-response-guard", {"deny_patterns": ["bad"]})
        context = ExchangeContext("r", "i", 0.0)
        context.protocol = OPENAI_CHAT
        context.upstream_protocol = OPENAI_CHAT
        context.output_started = True
        body_filter = factory.body_filter(context)
        self.assertIsNone(body_filter.filter_chunk(chunk("fine "), context))
        self.assertIsInstance(body_filter.filter_chunk(chunk("b"), context), Replace)
        result = body_filter.filter_chunk(chunk("ad"), context)
        self.assertIsInstance(result, Terminate)
        self.assertEqual(result.status, 200)
        self.assertEqual(body_filter.filter_chunk(chunk("x"), context), Replace(b""))
        self.assertIsNone(body_filter.finish(context))

    def test_rewrite_unusual_escapes(self) -> None:
        """
        An event whose text is escaped differently from C{json.dumps}
        (C{\\/}, upper-case C{\\u} escapes) is re-serialised whole, and
        stays valid JSON with the redacted text.
        """
        factory = configure(
            "ai-response-redact", {"rules": [{"pattern": r"\w+@\w+\.com", "replacement": "[e]"}]}
        )
        context = ExchangeContext("r", "i", 0.0)
        context.protocol = OPENAI_CHAT
        context.upstream_protocol = OPENAI_CHAT
        body_filter = factory.body_filter(context)
        raw = b'data: {"choices":[{"index":0,"delta":{"content":"a\\/b \\u00E9 x@y.com."}}]}\n\n'
        result = body_filter.filter_chunk(raw, context)
        self.assertIsInstance(result, Replace)
        [(_, document)] = decode(result.data)
        self.assertEqual(document["choices"][0]["delta"]["content"], "a/b \u00e9 [e].")


class DocsExamplesTests(SynchronousTestCase):
    """
    The YAML examples of the plugin documentation are configs aiproxy
    accepts.
    """

    def test_examples_load(self) -> None:
        """
        Every YAML block of C{docs/plugins.md} and C{docs/plugins/*.md}
        loads: whole configs as they are, plugin fragments inside a route.
        """
        import re
        from pathlib import Path

        import yaml
        from twisted.internet.testing import MemoryReactorClock

        from aiproxy.config import parse_config
        from aiproxy.routing.build import build_routes

        docs = Path(__file__).resolve().parent.parent / "docs"
        pages = [docs / "plugins.md", *sorted((docs / "plugins").glob("*.md"))]
        checked = 0
        for page in pages:
            for block in re.findall(r"^```yaml\n(.*?)^```", page.read_text("utf-8"), re.M | re.S):
                document = yaml.safe_load(block)
                if "routes" not in document:
                    proxy = {
                        "provider": "openai",
                        "auth": {"header": {"Authorization": "Bearer k"}},
                    }
                    document = {
                        "routes": [
                            {
                                "uri": "/v1/chat/completions",
                                "plugins": {"ai-proxy": proxy, **document},
                            }
                        ]
                    }
                config = parse_config(yaml.safe_dump(document), environ={"OPENAI_API_KEY": "sk-x"})
                build_routes(config, MemoryReactorClock())
                checked += 1
        self.assertGreaterEqual(checked, 5)
