# -*- test-case-name: tests.test_bedrock -*-
"""
Tests for provider C{bedrock}: L{aiproxy.upstream.sigv4} (AWS's SigV4 test
vectors and botocore's signer), L{aiproxy.upstream.bedrock} (the Converse
URL and body), its config checks, L{aiproxy.stream.observers.BedrockObserver},
the mock's Converse dialects, the upstream requests the gateway sends, and
one end-to-end run through the real daemon.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from aiproxy.config import ConfigError
from aiproxy.context import ExchangeContext
from aiproxy.exchange.incoming import UpstreamCall
from aiproxy.interfaces import IUpstreamAuth
from aiproxy.stream.eventstream import EventStreamDecoder, EventStreamMessage, encode_message
from aiproxy.stream.observers import BEDROCK_OBSERVER, BedrockObserver, observer_for
from aiproxy.stream.protocols import BEDROCK_CONVERSE, error_event
from aiproxy.testing.upstream.controls import MockControls
from aiproxy.testing.upstream.dialects import _Converse, _ConverseStream, _Turn
from aiproxy.testing.upstream.replies import _EventStream, _plan
from aiproxy.upstream.bedrock import converse_path
from aiproxy.upstream.providers import get_provider
from aiproxy.upstream.sigv4 import AWSCredentials, SigV4Auth, sign
from tests.daemon import http_call, in_thread, start_daemon, start_mock
from tests.helpers import build_table
from tests.test_proxy import Gateway, json_response, make_table

VECTORS = Path(__file__).resolve().parent / "data" / "aws-sigv4"

ACCESS_KEY = "AKIDEXAMPLEBEDROCK"
SECRET_KEY = "bedrock-secret-key-never-logged-0123456789"
SESSION_TOKEN = "bedrock-session-token-never-logged"
REGION = "eu-central-1"

#: A model id holding every character that must be percent-encoded.
MODEL_ARN = (
    "arn:aws:bedrock:eu-central-1:123456789012:inference-profile/"
    "eu.anthropic.claude-3-5-sonnet-20240620-v1:0"
)
ENCODED_ARN = (
    "arn%3Aaws%3Abedrock%3Aeu-central-1%3A123456789012%3Ainference-profile%2F"
    "eu.anthropic.claude-3-5-sonnet-20240620-v1%3A0"
)

#: 2024-05-01T12:30:45Z, the signing time of the unit tests.
SIGNING_TIME = 1714566645.0

CONVERSE = {
    "model": MODEL_ARN,
    "messages": [{"role": "user", "content": [{"text": "hi"}]}],
    "inferenceConfig": {"temperature": 0.5},
}
CONVERSE_STREAM = {**CONVERSE, "stream": True}


def bedrock_conf(**fields: Any) -> dict[str, Any]:
    """
    An C{ai-proxy} config of provider C{bedrock} (with a session token),
    C{fields} over it.
    """
    conf: dict[str, Any] = {
        "provider": "bedrock",
        "provider_conf": {"region": REGION},
        "auth": {
            "aws": {
                "access_key_id": ACCESS_KEY,
                "secret_access_key": SECRET_KEY,
                "session_token": SESSION_TOKEN,
            }
        },
    }
    conf.update(fields)
    return conf


def botocore_authorization(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    credentials: AWSCredentials,
    region: str,
    stamp: str,
    patch: Any,
) -> str:
    """
    The C{Authorization} botocore's C{SigV4Auth} gives a request with
    C{headers} (without its own signature headers) at C{stamp}
    (C{YYYYMMDDTHHMMSSZ}).
    """
    when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ")
    patch(botocore.auth, "get_current_datetime", lambda *args, **kwargs: when)
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    signer = botocore.auth.SigV4Auth(
        Credentials(
            credentials.access_key_id, credentials.secret_access_key, credentials.session_token
        ),
        "bedrock",
        region,
    )
    signer.add_auth(request)
    return str(request.headers["Authorization"])


def check_signature(
    testcase: SynchronousTestCase, method: str, url: str, headers: Mapping[str, str], body: bytes
) -> None:
    """
    Fail unless C{headers} (lower-cased names) sign the request as botocore
    does with the test credentials, over every header they say they sign.
    """
    authorization = headers["authorization"]
    signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
    testcase.assertIn("host", signed)
    testcase.assertIn("x-amz-content-sha256", signed)
    testcase.assertEqual(headers["x-amz-content-sha256"], hashlib.sha256(body).hexdigest())
    given = {
        name: headers[name]
        for name in signed
        if name not in ("x-amz-date", "x-amz-security-token", "authorization")
    }
    credentials = AWSCredentials(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)
    expected = botocore_authorization(
        method, url, given, body, credentials, REGION, headers["x-amz-date"], testcase.patch
    )
    testcase.assertEqual(authorization, expected)


# -- SigV4 ----------------------------------------------------------------------------------


def _parse_request(text: str) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """
    The method, path, headers and body of a test suite's C{request.txt};
    a header line starting with blanks continues the previous value.
    """
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    method, rest = lines[0].split(" ", 1)
    path = rest.rsplit(" ", 1)[0]
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[:1] in (" ", "\t") and headers:
            name, value = headers.pop()
            headers.append((name, value + "\n" + line))
        else:
            name, _, value = line.partition(":")
            headers.append((name, value))
    return method, path, headers, body.encode("utf-8")


class SigV4VectorTests(SynchronousTestCase):
    """
    L{sign} against AWS's SigV4 test suite (C{tests/data/aws-sigv4}).
    """

    def test_vectors(self) -> None:
        """
        For every header-signing case, the canonical request, the string to
        sign, the signature and the C{Authorization} header are the
        suite's, byte for byte.
        """
        cases = sorted(path for path in VECTORS.iterdir() if path.is_dir())
        self.assertGreaterEqual(len(cases), 30)
        for case in cases:
            context = json.loads((case / "context.json").read_text("utf-8"))
            method, path, headers, body = _parse_request((case / "request.txt").read_text("utf-8"))
            host = next(value for name, value in headers if name.lower() == "host")
            raw = context["credentials"]
            credentials = AWSCredentials(
                raw["access_key_id"], raw["secret_access_key"], raw.get("token")
            )
            when = datetime.datetime.strptime(context["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=datetime.UTC
            )
            signature = sign(
                method,
                f"https://{host}{path}",
                headers,
                body,
                credentials,
                context["region"],
                context["service"],
                when,
                sign_body=context["sign_body"],
                normalize=context["normalize"],
            )
            expected = {
                "canonical_request": (case / "header-canonical-request.txt").read_text("utf-8"),
                "string_to_sign": (case / "header-string-to-sign.txt").read_text("utf-8"),
                "signature": (case / "header-signature.txt").read_text("utf-8").strip(),
            }
            self.assertEqual(
                {name: getattr(signature, name) for name in expected}, expected, case.name
            )
            signed_request = (case / "header-signed-request.txt").read_text("utf-8")
            authorization = dict(signature.headers)["authorization"]
            self.assertIn(f"Authorization:{authorization}\n", signed_request, case.name)


def _call(url: str, body: bytes, **headers: str) -> UpstreamCall:
    raw = Headers({b"content-type": [b"application/json"]})
    for name, value in headers.items():
        raw.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    return UpstreamCall("POST", url, raw, body)


def _header_dict(headers: Headers) -> dict[str, str]:
    return {
        name.decode().lower(): b",".join(values).decode()
        for name, values in headers.getAllRawHeaders()
    }


class SigV4AuthTests(SynchronousTestCase):
    """
    L{SigV4Auth}, the authorizer of bedrock instances.
    """

    def authorize(self, call: UpstreamCall, token: str | None = SESSION_TOKEN) -> UpstreamCall:
        clock = Clock()
        clock.advance(SIGNING_TIME)
        auth = SigV4Auth(AWSCredentials(ACCESS_KEY, SECRET_KEY, token), REGION, "bedrock", clock)
        signed: UpstreamCall = self.successResultOf(auth.authorize(call))
        return signed

    def test_interface(self) -> None:
        """
        L{SigV4Auth} provides L{IUpstreamAuth}; its C{repr} holds no secret.
        """
        auth = SigV4Auth(
            AWSCredentials(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN), REGION, "x", Clock()
        )
        self.assertTrue(verifyObject(IUpstreamAuth, auth))
        self.assertNotIn(SECRET_KEY, repr(auth))
        self.assertNotIn(SESSION_TOKEN, repr(auth))
        self.assertIn(ACCESS_KEY, repr(auth))

    def test_headers(self) -> None:
        """
        The authorized call has C{host}, C{x-amz-date} from the clock,
        C{x-amz-content-sha256} of the body, the session token and a
        signature over them; method, URL and body are unchanged.
        """
        body = b'{"messages":[]}'
        url = f"https://bedrock-runtime.{REGION}.amazonaws.com/model/{ENCODED_ARN}/converse"
        call = _call(url, body)
        signed = self.authorize(call)
        self.assertEqual((signed.method, signed.url, signed.body), (call.method, url, body))
        headers = _header_dict(signed.headers)
        self.assertEqual(headers["host"], f"bedrock-runtime.{REGION}.amazonaws.com")
        self.assertEqual(headers["x-amz-date"], "20240501T123045Z")
        self.assertEqual(headers["x-amz-content-sha256"], hashlib.sha256(body).hexdigest())
        self.assertEqual(headers["x-amz-security-token"], SESSION_TOKEN)
        self.assertTrue(
            headers["authorization"].startswith(
                f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20240501/{REGION}/bedrock/aws4_request, "
                "SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;"
                "x-amz-security-token, Signature="
            ),
            headers["authorization"],
        )
        # The call given is not changed.
        self.assertFalse(call.headers.hasHeader(b"authorization"))

    def test_botocore(self) -> None:
        """
        The signature is botocore's for the same request: an ARN in the
        path (signed double-encoded), a query, a forwarded header, with and
        without a session token, on a default and on another port.
        """
        body = json.dumps({"messages": [{"role": "user", "content": [{"text": "é"}]}]}).encode()
        for url in [
            f"https://bedrock-runtime.{REGION}.amazonaws.com/model/{ENCODED_ARN}/converse-stream",
            f"http://127.0.0.1:8443/model/{ENCODED_ARN}/converse?b=2&a=1%202",
            "https://bedrock-runtime.eu-central-1.amazonaws.com:443/model/m/converse",
        ]:
            for token in (SESSION_TOKEN, None):
                signed = self.authorize(_call(url, body, x_custom="  a   b "), token)
                headers = _header_dict(signed.headers)
                given = {
                    name: value
                    for name, value in headers.items()
                    if name not in ("x-amz-date", "x-amz-security-token", "authorization")
                }
                credentials = AWSCredentials(ACCESS_KEY, SECRET_KEY, token)
                expected = botocore_authorization(
                    "POST", url, given, body, credentials, REGION, "20240501T123045Z", self.patch
                )
                self.assertEqual(headers["authorization"], expected, (url, token))

    def test_client_signature_headers_dropped(self) -> None:
        """
        A client's own C{authorization}, C{x-amz-date} or
        C{x-amz-security-token} never reaches the upstream: the
        authorizer's replace them, and without a session token there is
        none.
        """
        call = _call(
            "https://bedrock-runtime.eu-central-1.amazonaws.com/model/m/converse",
            b"{}",
            authorization="Bearer client",
            x_amz_date="19990101T000000Z",
            x_amz_security_token="client-token",
        )
        headers = _header_dict(self.authorize(call, token=None).headers)
        self.assertNotIn("x-amz-security-token", headers)
        self.assertEqual(headers["x-amz-date"], "20240501T123045Z")
        self.assertTrue(headers["authorization"].startswith("AWS4-HMAC-SHA256 "))


# -- URL and body ---------------------------------------------------------------------------


class ConversePathTests(SynchronousTestCase):
    """
    L{converse_path}.
    """

    def test_encoded(self) -> None:
        """
        The model is percent-encoded whole: C{:} and C{/} of an ARN too.
        """
        self.assertEqual(converse_path(MODEL_ARN, False), f"/model/{ENCODED_ARN}/converse")
        self.assertEqual(converse_path("a b", True), "/model/a%20b/converse-stream")


class ConfigTests(SynchronousTestCase):
    """
    The config rules of provider C{bedrock}.
    """

    def test_served(self) -> None:
        """
        C{bedrock} is served: it speaks bedrock-converse only, and its
        instance is signed with SigV4 for service C{bedrock} in the region.
        """
        provider = get_provider("bedrock")
        self.assertTrue(provider.serves(BEDROCK_CONVERSE))
        self.assertEqual(list(provider.paths), [BEDROCK_CONVERSE])
        table = build_table({"uri": "/converse", "plugins": {"ai-proxy": bedrock_conf()}})
        instance = table.routes[0].instances[0]
        self.assertEqual(instance.name, "ai-proxy-bedrock")
        self.assertIsInstance(instance.auth, SigV4Auth)
        assert isinstance(instance.auth, SigV4Auth)
        self.assertEqual((instance.auth.region, instance.auth.service), (REGION, "bedrock"))

    def test_missing(self) -> None:
        """
        Without C{provider_conf.region} and C{auth.aws} a route is refused,
        each problem at its path, in C{ai-proxy} and C{ai-proxy-multi}.
        """
        bare = {"provider": "bedrock", "auth": {"header": {"x-key": "k"}}}
        multi = {
            "instances": [
                {"name": "a", "weight": 1, **bedrock_conf()},
                {"name": "b", "weight": 1, **bare},
            ]
        }
        with self.assertRaises(ConfigError) as raised:
            build_table(
                {"uri": "/converse", "plugins": {"ai-proxy": bare}},
                {"uri": "/multi/converse", "plugins": {"ai-proxy-multi": multi}},
            )
        self.assertEqual(
            raised.exception.problems,
            [
                "routes[0].plugins.ai-proxy.provider_conf.region: required for provider 'bedrock'",
                "routes[0].plugins.ai-proxy.auth.aws: required for provider 'bedrock'",
                "routes[1].plugins.ai-proxy-multi.instances[1].provider_conf.region: "
                "required for provider 'bedrock'",
                "routes[1].plugins.ai-proxy-multi.instances[1].auth.aws: "
                "required for provider 'bedrock'",
            ],
        )

    def test_bad_region(self) -> None:
        """
        A region that is not a region name (it would make another host) is
        refused.
        """
        conf = bedrock_conf(provider_conf={"region": "evil.example/x"})
        with self.assertRaises(ConfigError) as raised:
            build_table({"uri": "/converse", "plugins": {"ai-proxy": conf}})
        self.assertEqual(
            raised.exception.problems,
            [
                "routes[0].plugins.ai-proxy.provider_conf.region: "
                "'evil.example/x' is not an AWS region name"
            ],
        )

    def test_incomplete_aws(self) -> None:
        """
        C{auth.aws} without its secret is refused by the schema.
        """
        conf = bedrock_conf(auth={"aws": {"access_key_id": ACCESS_KEY}})
        with self.assertRaises(ConfigError) as raised:
            build_table({"uri": "/converse", "plugins": {"ai-proxy": conf}})
        self.assertEqual(
            raised.exception.problems,
            ["routes[0].plugins.ai-proxy.auth.aws.secret_access_key: is a required property"],
        )


class UpstreamRequestTests(SynchronousTestCase):
    """
    The request the gateway sends to Bedrock (a fake upstream client
    records it), and the client errors.
    """

    def gateway(self, **fields: Any) -> Gateway:
        conf = bedrock_conf(**fields)
        routes = [{"id": "bedrock", "uri": "/*", "plugins": {"ai-proxy": conf}}]
        gateway = Gateway(self, make_table(routes=routes))
        instance = gateway.table.routes[0].instances[0]
        assert isinstance(instance.auth, SigV4Auth)
        clock = Clock()
        clock.advance(SIGNING_TIME)
        instance.auth._clock = clock
        return gateway

    def check(self, gateway: Gateway, path: str) -> dict[str, Any]:
        """
        The upstream call went to C{path} on the region's host, signed;
        its body, parsed.
        """
        call = gateway.upstream
        self.assertEqual(call.method, "POST")
        self.assertEqual(call.url, f"https://bedrock-runtime.{REGION}.amazonaws.com{path}")
        headers = _header_dict(call.headers)
        self.assertEqual(headers["x-amz-date"], "20240501T123045Z")
        self.assertEqual(headers["x-amz-security-token"], SESSION_TOKEN)
        self.assertNotIn("cookie", headers)
        self.assertNotIn("x-api-key", headers)
        check_signature(self, call.method, call.url, headers, call.body)
        body: dict[str, Any] = json.loads(call.body)
        return body

    def test_converse(self) -> None:
        """
        A Converse request: the model ARN percent-encoded in the path, the
        body without C{model}, C{override.llm_options.max_tokens} in
        C{inferenceConfig.maxTokens} beside the client's settings, the
        client's credentials not forwarded; the answer's text and usage
        are read.
        """
        gateway = self.gateway(override={"llm_options": {"max_tokens": 64}})
        gateway.send(
            CONVERSE,
            path=b"/model/x/converse",
            headers={b"cookie": b"session=1", b"x-api-key": b"client-key"},
        )
        body = self.check(gateway, f"/model/{ENCODED_ARN}/converse")
        self.assertEqual(
            body,
            {
                "messages": CONVERSE["messages"],
                "inferenceConfig": {"temperature": 0.5, "maxTokens": 64},
            },
        )
        answer = _Converse().complete(_Turn(1, {}, MockControls(events=3)))
        answer["usage"]["cacheReadInputTokens"] = 4
        raw = json.dumps(answer).encode()
        response = gateway.answer(json_response(raw))
        response.data(raw)
        response.end()
        self.assertEqual(gateway.response().json(), answer)
        record = gateway.record
        self.assertEqual(
            (
                record["prompt_tokens"],
                record["completion_tokens"],
                record["total_tokens"],
                record["cache_read_input_tokens"],
            ),
            (10, 3, 13, 4),
        )

    def test_converse_stream(self) -> None:
        """
        A streamed request goes to C{/converse-stream}, without C{model} or
        C{stream} in the body; C{inferenceConfig} is made for the max tokens.
        """
        gateway = self.gateway(override={"llm_options": {"max_tokens": 32}})
        body = {key: value for key, value in CONVERSE_STREAM.items() if key != "inferenceConfig"}
        gateway.send(body, path=b"/converse")
        sent = self.check(gateway, f"/model/{ENCODED_ARN}/converse-stream")
        self.assertEqual(
            sent, {"messages": CONVERSE["messages"], "inferenceConfig": {"maxTokens": 32}}
        )

    def test_options_model(self) -> None:
        """
        C{options.model} names the model in the path over the body's.
        """
        gateway = self.gateway(options={"model": "amazon.nova-lite-v1:0"})
        gateway.send(CONVERSE, path=b"/converse")
        body = self.check(gateway, "/model/amazon.nova-lite-v1%3A0/converse")
        self.assertNotIn("model", body)

    def test_endpoint(self) -> None:
        """
        An C{override.endpoint} without a path gets the Converse path; one
        with a path is used verbatim.
        """
        for endpoint, url in [
            ("http://127.0.0.1:7751", f"http://127.0.0.1:7751/model/{ENCODED_ARN}/converse"),
            ("http://127.0.0.1:7751/fixed/converse", "http://127.0.0.1:7751/fixed/converse"),
        ]:
            gateway = self.gateway(override={"endpoint": endpoint})
            gateway.send(CONVERSE, path=b"/converse")
            self.assertEqual(gateway.upstream.url, url)

    def test_no_model(self) -> None:
        """
        Neither the route nor the body names a model, and the endpoint has
        no path: 400 with APISIX's message, nothing sent upstream.
        """
        gateway = self.gateway()
        gateway.send({"messages": CONVERSE["messages"]}, path=b"/converse")
        response = gateway.response()
        self.assertEqual(response.status, 400)
        self.assertEqual(
            response.json(),
            {
                "error_msg": "could not resolve upstream path: ensure the route or request body "
                "specifies a model, or that override.endpoint includes a path"
            },
        )
        self.assertEqual(gateway.client.calls, [])

    def test_no_model_endpoint_path(self) -> None:
        """
        Without a model, an endpoint with a path is enough.
        """
        gateway = self.gateway(override={"endpoint": "http://127.0.0.1:7751/model/m/converse"})
        gateway.send({"messages": CONVERSE["messages"]}, path=b"/converse")
        self.assertEqual(gateway.upstream.url, "http://127.0.0.1:7751/model/m/converse")

    def test_openai_chat_refused(self) -> None:
        """
        An OpenAI chat body on a path that does not end in C{/converse}:
        400, bedrock speaks bedrock-converse only.
        """
        gateway = self.gateway()
        gateway.send({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        response = gateway.response()
        self.assertEqual(response.status, 400)
        self.assertIn(
            "provider bedrock does not support openai-chat protocol (supported: bedrock-converse)",
            response.body.decode(),
        )
        self.assertEqual(gateway.client.calls, [])


# -- the observer ---------------------------------------------------------------------------


def _event(kind: str, payload: Any, message_type: str = "event") -> EventStreamMessage:
    headers: dict[str, object] = {
        ":message-type": message_type,
        ":content-type": "application/json",
    }
    if message_type == "event":
        headers[":event-type"] = kind
    else:
        headers[":exception-type"] = kind
    return EventStreamMessage(headers, json.dumps(payload).encode())


class ObserverTests(SynchronousTestCase):
    """
    L{BedrockObserver}, registered for bedrock-converse.
    """

    def context(self, wants_text: bool = True) -> ExchangeContext:
        context = ExchangeContext("r", "i", 0.0)
        context.wants_text = wants_text
        return context

    def test_registered(self) -> None:
        """
        The bedrock-converse observer is L{BEDROCK_OBSERVER}.
        """
        self.assertIs(observer_for(BEDROCK_CONVERSE), BEDROCK_OBSERVER)
        self.assertIsInstance(BEDROCK_OBSERVER, BedrockObserver)

    def test_body(self) -> None:
        """
        A Converse answer: its text blocks, a tool use, and its usage with
        the cache figures.
        """
        context = self.context()
        answer = {
            "output": {
                "message": {
                    "role": "assistant",
                    "content": [
                        {"text": "Hello "},
                        {"toolUse": {"toolUseId": "t", "name": "f", "input": {}}},
                        {"text": "world"},
                    ],
                }
            },
            "stopReason": "tool_use",
            "usage": {
                "inputTokens": 11,
                "outputTokens": 7,
                "totalTokens": 30,
                "cacheReadInputTokens": 5,
                "cacheWriteInputTokens": 3,
            },
        }
        BEDROCK_OBSERVER.observe_body(json.dumps(answer).encode(), context)
        self.assertEqual(context.text, "Hello world")
        self.assertTrue(context.has_tool_calls)
        self.assertEqual(
            (
                context.prompt_tokens,
                context.completion_tokens,
                context.total_tokens,
                context.cache_read_input_tokens,
                context.cache_creation_input_tokens,
            ),
            (11, 7, 30, 5, 3),
        )

    def test_stream(self) -> None:
        """
        A ConverseStream: the deltas' text, C{messageStop} ends it, the
        C{metadata} usage is recorded.
        """
        context = self.context()
        BEDROCK_OBSERVER.observe_events(
            [
                _event("messageStart", {"role": "assistant"}),
                _event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi "}}),
            ],
            context,
        )
        self.assertEqual(context.text, "Hi ")
        self.assertFalse(context.done)
        BEDROCK_OBSERVER.observe_events(
            [
                _event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "there"}}),
                _event("contentBlockStop", {"contentBlockIndex": 0}),
                _event("messageStop", {"stopReason": "end_turn"}),
            ],
            context,
        )
        self.assertTrue(context.done)
        BEDROCK_OBSERVER.observe_events(
            [
                _event(
                    "metadata",
                    {"usage": {"inputTokens": 3, "outputTokens": 2, "totalTokens": 5}},
                )
            ],
            context,
        )
        self.assertEqual(context.text, "Hi there")
        self.assertEqual((context.prompt_tokens, context.completion_tokens), (3, 2))
        self.assertEqual(context.total_tokens, 5)
        self.assertTrue(context.done)

    def test_text_only_when_wanted(self) -> None:
        """
        Without a filter asking for the text, deltas are not collected.
        """
        context = self.context(wants_text=False)
        BEDROCK_OBSERVER.observe_events(
            [_event("contentBlockDelta", {"delta": {"text": "x"}})], context
        )
        self.assertEqual(context.text, "")

    def test_tool_use(self) -> None:
        """
        A tool-use block start marks the response as having tool calls.
        """
        context = self.context()
        start = {"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": "t", "name": "f"}}}
        BEDROCK_OBSERVER.observe_events([_event("contentBlockStart", start)], context)
        self.assertTrue(context.has_tool_calls)

    def test_exception(self) -> None:
        """
        An C{exception} (or C{error}) message marks the stream as not
        ended well; its payload is not read.
        """
        for message_type in ("exception", "error"):
            context = self.context()
            context.done = True
            payload = {"message": "secret detail"}
            BEDROCK_OBSERVER.observe_events(
                [_event("throttlingException", payload, message_type)], context
            )
            self.assertFalse(context.done)
            self.assertEqual(context.text, "")
            self.assertIsNone(context.usage)

    def test_sse_events_ignored(self) -> None:
        """
        Anything but an EventStream message (an SSE event) is ignored.
        """
        context = self.context()

        class SSEEvent:
            event = "message"
            data = b"{}"

        BEDROCK_OBSERVER.observe_events([SSEEvent()], context)
        self.assertFalse(context.done)


class ErrorEventTests(SynchronousTestCase):
    """
    L{error_event} for a Bedrock client.
    """

    def test_exception_frame(self) -> None:
        """
        A cut ConverseStream ends with one EventStream C{exception} message
        (C{internalServerException}) holding the reason, as Bedrock ends a
        failed stream; the observer counts it as a failure.
        """
        raw = error_event(BEDROCK_CONVERSE, "max_stream_duration_ms exceeded", "x")
        decoder = EventStreamDecoder()
        [message] = decoder.feed(raw)
        self.assertEqual(decoder.pending, 0)
        self.assertEqual(
            message.headers,
            {
                ":exception-type": "internalServerException",
                ":content-type": "application/json",
                ":message-type": "exception",
            },
        )
        self.assertEqual(
            json.loads(message.payload), {"message": "max_stream_duration_ms exceeded"}
        )
        context = ExchangeContext("r", "i", 0.0)
        context.done = True
        BEDROCK_OBSERVER.observe_events([message], context)
        self.assertFalse(context.done)


# -- the mock -------------------------------------------------------------------------------


class MockDialectTests(SynchronousTestCase):
    """
    The mock upstream's Converse and ConverseStream dialects.
    """

    def test_converse(self) -> None:
        """
        C{/converse} answers a Converse JSON body, even with C{stream}.
        """
        turn = _Turn(1, {"stream": True}, MockControls(events=2, text="ab"))
        reply = _plan(turn, _Converse(), {})
        self.assertEqual(reply.headers["content-type"], "application/json")
        assert isinstance(reply.body, bytes)
        answer = json.loads(reply.body)
        self.assertEqual(answer["output"]["message"]["content"], [{"text": "ab"}])
        self.assertEqual(answer["usage"], {"inputTokens": 10, "outputTokens": 2, "totalTokens": 12})

    def test_converse_stream(self) -> None:
        """
        C{/converse-stream} streams EventStream frames (no C{stream} needed):
        C{messageStart}, a C{contentBlockDelta} per piece,
        C{contentBlockStop}, C{messageStop}, C{metadata} with the usage.
        """
        turn = _Turn(1, {}, MockControls(events=3, text="abc"))
        reply = _plan(turn, _ConverseStream(), {})
        self.assertEqual(reply.headers["content-type"], "application/vnd.amazon.eventstream")
        assert isinstance(reply.body, _EventStream)
        frames = list(reply.body.events)
        self.assertEqual(reply.body.comments, [])
        messages = EventStreamDecoder().feed(b"".join(frames))
        self.assertEqual(len(messages), len(frames))
        self.assertEqual(
            [message.headers[":event-type"] for message in messages],
            ["messageStart"]
            + ["contentBlockDelta"] * 3
            + ["contentBlockStop", "messageStop", "metadata"],
        )
        self.assertEqual(
            frames[1],
            encode_message(
                {
                    ":event-type": "contentBlockDelta",
                    ":content-type": "application/json",
                    ":message-type": "event",
                },
                b'{"contentBlockIndex":0,"delta":{"text":"a"}}',
            ),
        )
        self.assertEqual(
            json.loads(messages[-1].payload)["usage"],
            {"inputTokens": 10, "outputTokens": 3, "totalTokens": 13},
        )


# -- end to end -----------------------------------------------------------------------------


class EndToEndTests(TestCase):
    """
    The real daemon with a bedrock route sending to the mock upstream.
    """

    async def test_converse_stream(self) -> None:
        """
        A ConverseStream through the daemon: the client reads the mock's
        EventStream frames unchanged, frame by frame; the mock got a signed
        request on the Converse path of the encoded ARN, without C{model} or
        C{stream}, with C{inferenceConfig.maxTokens}; the access record has
        the usage. A Converse request afterwards: the whole answer and its
        usage.
        """
        mock = await start_mock(self)
        conf = bedrock_conf(
            override={"endpoint": mock.url(""), "llm_options": {"max_tokens": 50}},
            streaming_flush_interval_ms=0,
        )
        daemon = await start_daemon(
            self, [{"id": "bedrock", "uri": "/bedrock/*", "plugins": {"ai-proxy": conf}}]
        )
        text = "Bedrock streams binary frames."
        response = await in_thread(
            http_call,
            daemon.port,
            path="/bedrock/converse",
            body=CONVERSE_STREAM,
            headers={"x-mock-text": text, "x-mock-events": "4"},
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "application/vnd.amazon.eventstream")
        decoder = EventStreamDecoder()
        messages = []
        for chunk in response.chunks:
            messages.extend(decoder.feed(chunk))
        self.assertIsNone(decoder.error)
        self.assertEqual(decoder.pending, 0)
        kinds = [message.headers[":event-type"] for message in messages]
        self.assertEqual(
            kinds,
            ["messageStart"]
            + ["contentBlockDelta"] * 4
            + ["contentBlockStop", "messageStop", "metadata"],
        )
        deltas = [json.loads(m.payload)["delta"]["text"] for m in messages[1:5]]
        self.assertEqual("".join(deltas), text)

        recorded = mock.requests()[-1]
        self.assertEqual(recorded["path"], f"/model/{ENCODED_ARN}/converse-stream")
        body = recorded["body"].encode("utf-8")
        self.assertEqual(
            json.loads(body),
            {
                "messages": CONVERSE["messages"],
                "inferenceConfig": {"temperature": 0.5, "maxTokens": 50},
            },
        )
        headers = {name: values[0] for name, values in recorded["headers"].items()}
        self.assertEqual(headers["x-amz-security-token"], SESSION_TOKEN)
        check_signature(self, "POST", mock.url(recorded["path"]), headers, body)

        record = (await daemon.wait_for_records(1))[-1]
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["request_type"], "ai_stream")
        self.assertEqual(record["instance"], "ai-proxy-bedrock")
        self.assertEqual(
            (record["prompt_tokens"], record["completion_tokens"], record["total_tokens"]),
            (10, 4, 14),
        )
        self.assertIsNone(record["abort_reason"])

        response = await in_thread(
            http_call,
            daemon.port,
            path="/bedrock/converse",
            body=CONVERSE,
            headers={"x-mock-text": "whole", "x-mock-events": "2"},
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json()["output"]["message"]["content"], [{"text": "whole"}])
        self.assertEqual(mock.requests()[-1]["path"], f"/model/{ENCODED_ARN}/converse")
        record = (await daemon.wait_for_records(2))[-1]
        self.assertEqual(record["request_type"], "ai_chat")
        self.assertEqual(
            (record["prompt_tokens"], record["completion_tokens"], record["total_tokens"]),
            (10, 2, 12),
        )
        for line in daemon.lines:
            self.assertNotIn(SECRET_KEY, line)
            self.assertNotIn(SESSION_TOKEN, line)
