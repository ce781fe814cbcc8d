# -*- test-case-name: tests.test_convert -*-
"""
Tests for protocol conversion in the exchange (L{aiproxy.convert}): which
converter a request gets, the conversion stage of a stream (after the body
filters, before the client), whole answers and errors in the client's
protocol, and the no-output rule; driven without sockets through
L{tests.test_proxy.Gateway}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aiproxy.context import ExchangeContext
from aiproxy.convert import converter_for
from aiproxy.convert.anthropic_openai import ANTHROPIC_TO_OPENAI
from aiproxy.convert.openai_anthropic import OpenAIToAnthropic
from aiproxy.convert.stage import NO_OUTPUT, ConversionStage
from aiproxy.filters import Replace
from aiproxy.interfaces import IStreamStage
from aiproxy.routing.routes import RouteTable
from aiproxy.stream.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT, PASSTHROUGH
from aiproxy.stream.sse import SSEDecoder
from aiproxy.upstream.request import ClientError
from tests.test_proxy import (
    API_KEY,
    DONE,
    ENDPOINT,
    USAGE,
    Gateway,
    ScriptedFilter,
    delta,
    json_response,
    make_table,
    sse,
    stream_response,
    with_body_filters,
)

#: An Anthropic Messages request.
MESSAGES = {
    "model": "claude-test",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}
MESSAGES_STREAM = {**MESSAGES, "stream": True}

#: An Anthropic-style upstream endpoint (the route then speaks Messages).
MESSAGES_ENDPOINT = "http://upstream.test:7751/v1/messages"


def events_of(body: bytes) -> list[tuple[str, Any]]:
    """
    The SSE events of C{body}: (event type, parsed data or the raw text).
    """
    decoder = SSEDecoder()
    out = []
    for event in decoder.feed(body):
        try:
            data = json.loads(event.data)
        except ValueError:
            data = event.data.decode()
        out.append((event.event, data))
    return out


def anthropic_table() -> RouteTable:
    """
    A route taking Anthropic clients on C{/v1/messages} to an OpenAI
    upstream.
    """
    conf = {
        "provider": "openai",
        "auth": {"header": {"Authorization": f"Bearer {API_KEY}"}},
        "override": {"endpoint": ENDPOINT},
    }
    return make_table(
        routes=[{"id": "messages", "uri": "/v1/messages", "plugins": {"ai-proxy": conf}}]
    )


def anthropic_gateway(testcase: SynchronousTestCase) -> Gateway:
    """
    A gateway over L{anthropic_table}.
    """
    return Gateway(testcase, anthropic_table())


def openai_gateway(testcase: SynchronousTestCase) -> Gateway:
    """
    A gateway whose route takes OpenAI chat clients to an Anthropic
    Messages upstream.
    """
    return Gateway(
        testcase,
        make_table(
            {
                "provider": "anthropic",
                "auth": {"header": {"x-api-key": API_KEY}},
                "override": {"endpoint": MESSAGES_ENDPOINT},
            }
        ),
    )


class SelectionTests(SynchronousTestCase):
    """
    L{converter_for}: none when the provider speaks the client's protocol,
    else a converter to a protocol it speaks, else 400.
    """

    def target(self, **proxy: Any) -> Any:
        return make_table(proxy).routes[0].instances[0].target

    def test_native(self) -> None:
        """
        OpenAI chat to openai, Messages to anthropic and passthrough to
        anything go as they are.
        """
        self.assertIsNone(converter_for(self.target(), OPENAI_CHAT))
        self.assertIsNone(converter_for(self.target(), PASSTHROUGH))
        self.assertIsNone(converter_for(self.target(provider="anthropic"), ANTHROPIC_MESSAGES))
        # Without a /v1/messages endpoint an OpenAI client uses Anthropic's
        # OpenAI-compatible path, as in APISIX.
        self.assertIsNone(converter_for(self.target(provider="anthropic"), OPENAI_CHAT))

    def test_anthropic_client_on_openai(self) -> None:
        """
        An Anthropic client on an OpenAI-chat provider is converted.
        """
        for provider in ("openai", "deepseek", "openai-compatible"):
            self.assertIs(
                converter_for(self.target(provider=provider), ANTHROPIC_MESSAGES),
                ANTHROPIC_TO_OPENAI,
            )

    def test_openai_client_on_messages_endpoint(self) -> None:
        """
        An OpenAI chat client on an anthropic provider whose endpoint path
        ends in /v1/messages is converted, with the route's max_tokens as
        the default.
        """
        target = self.target(
            provider="anthropic",
            override={"endpoint": MESSAGES_ENDPOINT, "llm_options": {"max_tokens": 77}},
        )
        converter = converter_for(target, OPENAI_CHAT)
        self.assertIsInstance(converter, OpenAIToAnthropic)
        assert converter is not None
        context = ExchangeContext("r", "i", 0.0)
        body = converter.convert_request({"messages": [{"role": "user", "content": "x"}]}, context)
        self.assertEqual(body["max_tokens"], 77)
        self.assertIsNone(converter_for(target, ANTHROPIC_MESSAGES))

    def test_unsupported(self) -> None:
        """
        No converter fits: 400 naming the provider, the protocol and what
        the provider supports.
        """
        target = self.target(provider="deepseek")
        e = self.assertRaises(ClientError, converter_for, target, "openai-responses")
        self.assertEqual(e.status, 400)
        self.assertEqual(
            e.message,
            "provider deepseek does not support openai-responses protocol (supported: openai-chat)",
        )

    def test_unsupported_through_gateway(self) -> None:
        """
        The 400 reaches the client and nothing goes upstream.
        """
        gateway = Gateway(self, make_table({"provider": "deepseek"}))
        gateway.send({"input": "x", "model": "m"})
        response = gateway.response()
        self.assertEqual(response.status, 400)
        self.assertEqual(
            response.json()["message"],
            "provider deepseek does not support openai-embeddings protocol "
            "(supported: openai-chat)",
        )
        self.assertEqual(gateway.client.calls, [])


class StageTests(SynchronousTestCase):
    """
    L{ConversionStage}: a stream's events in the client's protocol.
    """

    def stage(self, decode: bool) -> tuple[ConversionStage, ExchangeContext]:
        context = ExchangeContext("r", "i", 0.0)
        context.protocol = ANTHROPIC_MESSAGES
        context.upstream_protocol = OPENAI_CHAT
        converter = ANTHROPIC_TO_OPENAI
        return ConversionStage(converter, converter.stream(context), decode), context

    def test_interface(self) -> None:
        """
        It is a stream stage.
        """
        self.assertTrue(verifyObject(IStreamStage, self.stage(True)[0]))

    def test_decodes_its_input(self) -> None:
        """
        With a stage before it, it decodes the bytes it gets (split anywhere)
        rather than the relay's events.
        """
        stage, context = self.stage(True)
        raw = delta("Hello") + DONE
        out = stage.filter_chunk(raw[:7], context) + stage.filter_chunk(raw[7:], context)
        out += stage.finish(context)  # type: ignore[operator]
        kinds = [kind for kind, _ in events_of(out)]
        self.assertEqual(kinds[0], "message_start")
        self.assertEqual(kinds[-1], "message_stop")
        self.assertIn("content_block_delta", kinds)

    def test_relay_events(self) -> None:
        """
        Alone, it converts the events the relay decoded (in the context).
        """
        stage, context = self.stage(False)
        context.events = SSEDecoder().feed(delta("Hi"))
        out = stage.filter_chunk(b"ignored", context)
        self.assertEqual([kind for kind, _ in events_of(out)][0], "message_start")

    def test_no_output(self) -> None:
        """
        A stream that gave nothing convertible ends with a 502 in the
        client's protocol, reason upstream_format.
        """
        stage, context = self.stage(True)
        self.assertEqual(stage.filter_chunk(b"event: other\ndata: {}\n\n", context), b"")
        result = stage.finish(context)
        assert not isinstance(result, bytes)
        self.assertEqual((result.status, result.reason), (502, "upstream_format"))
        document = json.loads(result.data)
        self.assertEqual(document["type"], "error")
        self.assertEqual(document["error"]["message"], NO_OUTPUT)


class AnthropicClientTests(SynchronousTestCase):
    """
    An Anthropic client on an OpenAI upstream, through the exchange.
    """

    def test_request(self) -> None:
        """
        The upstream gets an OpenAI chat request on the OpenAI path with
        the route's credentials; the client's Anthropic headers stay home.
        """
        gateway = anthropic_gateway(self)
        gateway.send(
            MESSAGES_STREAM,
            path=b"/v1/messages",
            headers={b"x-api-key": b"client-key", b"anthropic-version": b"2023-06-01"},
        )
        call = gateway.upstream
        self.assertEqual(call.url, ENDPOINT)
        body = json.loads(call.body)
        self.assertEqual(body["messages"], [{"role": "user", "content": "hi"}])
        self.assertEqual(body["max_completion_tokens"], 64)
        self.assertNotIn("max_tokens", body)
        self.assertEqual(body["stream_options"], {"include_usage": True})
        self.assertEqual(
            call.headers.getRawHeaders(b"authorization"), [f"Bearer {API_KEY}".encode()]
        )
        self.assertIsNone(call.headers.getRawHeaders(b"x-api-key"))
        self.assertIsNone(call.headers.getRawHeaders(b"anthropic-version"))

    def test_stream(self) -> None:
        """
        The OpenAI stream reaches the client as Anthropic events, in order,
        with message_stop once; the record has the upstream's usage.
        """
        gateway = anthropic_gateway(self)
        gateway.send(MESSAGES_STREAM, path=b"/v1/messages")
        upstream = gateway.answer(stream_response())
        upstream.data(delta("Hel"), delta("lo"))
        upstream.data(
            sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), USAGE, DONE
        )
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "text/event-stream")
        self.assertTrue(response.complete)
        events = events_of(response.body)
        kinds = [kind for kind, _ in events]
        self.assertEqual(kinds[0], "message_start")
        self.assertEqual(kinds[-2:], ["message_delta", "message_stop"])
        self.assertEqual(kinds.count("message_stop"), 1)
        text = "".join(
            data["delta"]["text"] for kind, data in events if kind == "content_block_delta"
        )
        self.assertEqual(text, "Hello")
        self.assertEqual(events[-2][1]["delta"]["stop_reason"], "end_turn")
        record = gateway.record
        self.assertEqual((record["prompt_tokens"], record["completion_tokens"]), (7, 3))
        self.assertIsNone(record["abort_reason"])

    def test_stream_other_format(self) -> None:
        """
        An upstream stream the converter cannot read (another format): 502
        in Anthropic's error shape, abort reason upstream_format.
        """
        gateway = anthropic_gateway(self)
        gateway.send(MESSAGES_STREAM, path=b"/v1/messages")
        upstream = gateway.answer(stream_response())
        upstream.data(b'event: surprise\ndata: {"x":1}\n\n')
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.json()["error"]["message"], NO_OUTPUT)
        self.assertEqual(gateway.record["abort_reason"], "upstream_format")

    def test_non_stream(self) -> None:
        """
        A whole OpenAI answer reaches the client as an Anthropic message.
        """
        gateway = anthropic_gateway(self)
        gateway.send(MESSAGES, path=b"/v1/messages")
        upstream = gateway.answer(json_response(b""))
        upstream.data(
            json.dumps(
                {
                    "id": "chatcmpl-1",
                    "model": "gpt-x",
                    "choices": [
                        {"message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
                }
            ).encode()
        )
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "application/json")
        document = response.json()
        self.assertEqual(document["type"], "message")
        self.assertEqual(document["content"], [{"type": "text", "text": "Hi"}])
        self.assertEqual(document["stop_reason"], "end_turn")
        self.assertEqual(document["usage"]["input_tokens"], 5)
        self.assertEqual(gateway.record["total_tokens"], 7)

    def test_upstream_error(self) -> None:
        """
        An OpenAI error body reaches the Anthropic client in Anthropic's
        shape, with the upstream's status.
        """
        gateway = anthropic_gateway(self)
        gateway.send(MESSAGES, path=b"/v1/messages")
        upstream = gateway.answer(json_response(b"", code=429))
        upstream.data(b'{"error":{"message":"slow down","type":"rate_limit","code":null}}')
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 429)
        self.assertEqual(
            response.json(),
            {"type": "error", "error": {"type": "rate_limit", "message": "slow down"}},
        )

    def test_gateway_error(self) -> None:
        """
        The gateway's own error (a connection refused) is in Anthropic's
        shape too.
        """
        from twisted.internet.error import ConnectionRefusedError

        gateway = anthropic_gateway(self)
        gateway.send(MESSAGES, path=b"/v1/messages")
        gateway.upstream.deferred.errback(ConnectionRefusedError())
        response = gateway.response()
        self.assertEqual(response.status, 502)
        document = response.json()
        self.assertEqual(document["type"], "error")
        self.assertIn("failed to connect to upstream", document["error"]["message"])

    def test_missing_messages(self) -> None:
        """
        An Anthropic body without messages: 400 in APISIX's shape, nothing
        upstream.
        """
        gateway = anthropic_gateway(self)
        gateway.send({"model": "m", "messages": []}, path=b"/v1/messages")
        response = gateway.response()
        self.assertEqual(response.status, 400)
        self.assertEqual(response.json(), {"error_msg": "missing messages"})
        self.assertEqual(gateway.client.calls, [])

    def test_filters_see_upstream_events(self) -> None:
        """
        Body filters run before the conversion: they see (and may change)
        the upstream's OpenAI events, and the client gets the converted
        result.
        """
        recorder = ScriptedFilter(
            lambda chunk, context: Replace(chunk.replace(b"secret", b"[redacted]"))
        )
        gateway = Gateway(self, with_body_filters(anthropic_table(), recorder))
        gateway.send(MESSAGES_STREAM, path=b"/v1/messages")
        upstream = gateway.answer(stream_response())
        upstream.data(delta("a secret"), DONE)
        upstream.end()
        self.assertIn(b'"a secret"', recorder.seen[0]["events"][0][1])
        text = "".join(
            data["delta"]["text"]
            for kind, data in events_of(gateway.response().body)
            if kind == "content_block_delta"
        )
        self.assertEqual(text, "a [redacted]")


class OpenAIClientTests(SynchronousTestCase):
    """
    An OpenAI chat client on an Anthropic Messages upstream.
    """

    def test_stream(self) -> None:
        """
        The request goes to the Messages endpoint in Anthropic's shape; the
        Anthropic stream reaches the client as OpenAI chunks ending with
        [DONE].
        """
        gateway = openai_gateway(self)
        gateway.send(
            {"model": "claude", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
        call = gateway.upstream
        self.assertEqual(call.url, MESSAGES_ENDPOINT)
        body = json.loads(call.body)
        self.assertEqual(body["max_tokens"], 4096)
        self.assertEqual(body["stream"], True)
        [message] = body["messages"]
        self.assertEqual(message["role"], "user")
        self.assertIn("hi", json.dumps(message["content"]))
        self.assertEqual(call.headers.getRawHeaders(b"x-api-key"), [API_KEY.encode()])
        upstream = gateway.answer(stream_response())
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "model": "claude",
                "usage": {"input_tokens": 4, "output_tokens": 0},
            },
        }
        upstream.data(
            b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n",
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n',
            b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
            b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":2}}\n\n',
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
        )
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        events = events_of(response.body)
        self.assertEqual(events[-1], ("message", "[DONE]"))
        chunks = [data for _, data in events[:-1]]
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
        )
        self.assertEqual(text, "Hi")
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        self.assertIn("stop", finishes)
        record = gateway.record
        self.assertEqual((record["prompt_tokens"], record["completion_tokens"]), (4, 2))

    def test_upstream_error(self) -> None:
        """
        An Anthropic error body reaches the OpenAI client in OpenAI's shape.
        """
        gateway = openai_gateway(self)
        gateway.send()
        upstream = gateway.answer(json_response(b"", code=529))
        upstream.data(b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}')
        upstream.end()
        response = gateway.response()
        self.assertEqual(response.status, 529)
        self.assertEqual(response.json()["error"]["message"], "busy")
        self.assertEqual(response.json()["error"]["type"], "overloaded_error")
