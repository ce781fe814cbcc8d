# -*- test-case-name: tests.test_vertex -*-
"""
Tests for provider C{vertex-ai}: L{aiproxy.upstream.vertex} (hosts, paths,
config checks), L{aiproxy.upstream.gcp} (the service-account key and the
access token of C{auth.gcp}, fetched from the mock upstream's token
endpoint with a key pair made here), L{aiproxy.convert.vertex_predict}
(OpenAI embeddings to C{:predict} and back), the mock's token endpoint and
predict dialect, the upstream requests the gateway sends, and an
end-to-end run through the real daemon.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any
from urllib.parse import parse_qs, urlencode

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from aiproxy.config import ConfigError
from aiproxy.context import ExchangeContext
from aiproxy.convert.vertex_predict import (
    EMBEDDINGS_TO_VERTEX_PREDICT,
    VERTEX_PREDICT,
    convert_input,
)
from aiproxy.exchange.incoming import UpstreamCall
from aiproxy.interfaces import IConverter, IStreamConverter, IUpstreamAuth
from aiproxy.stream.protocols import OPENAI_CHAT, OPENAI_EMBEDDINGS
from aiproxy.testing.upstream import MockUpstream
from aiproxy.testing.upstream.controls import MockControls
from aiproxy.testing.upstream.dialects import _Predict, _Turn
from aiproxy.testing.upstream.replies import _plan
from aiproxy.upstream.gcp import GCPTokenAuth, _read
from aiproxy.upstream.gcp_account import (
    ENVIRONMENT_VARIABLE,
    GRANT_TYPE,
    SCOPE,
    ServiceAccount,
    load_service_account,
)
from aiproxy.upstream.providers import get_provider
from aiproxy.upstream.request import ClientError, Target, upstream_url
from aiproxy.upstream.vertex import RULES
from tests.daemon import http_call, in_thread, start_daemon, start_mock
from tests.helpers import build_table, log_events
from tests.test_proxy import (
    CHAT,
    CHAT_STREAM,
    DONE,
    FakeResponse,
    Gateway,
    delta,
    json_response,
    make_table,
    stream_response,
)

PROJECT = "my-project"
REGION = "us-central1"
CLIENT_EMAIL = "gateway@my-project.iam.gserviceaccount.com"
KEY_ID = "0123456789abcdef0123456789abcdef01234567"

#: Where the unit tests' key files send token requests (the in-memory mock).
TOKEN_URI = "http://mock.test/token"

CHAT_URL = (
    f"https://{REGION}-aiplatform.googleapis.com/v1beta1/projects/{PROJECT}"
    f"/locations/{REGION}/endpoints/openapi/chat/completions"
)

EMBEDDINGS = {"model": "text-embedding-005", "input": ["hello world", "bye"]}


@cache
def private_key() -> rsa.RSAPrivateKey:
    """
    The RSA key of the tests' service account, made once per run.
    """
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem() -> str:
    """
    The PEM (PKCS#8) of L{private_key}, as a key file holds it.
    """
    return (
        private_key()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode("ascii")
    )


def key_body() -> str:
    """
    The base64 body of L{private_pem}: no message or log may hold any line
    of it.
    """
    return "".join(private_pem().splitlines()[1:-1])


def key_json(token_uri: str = TOKEN_URI, **fields: Any) -> str:
    """
    A service-account key file's JSON, C{fields} over it.
    """
    info = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": KEY_ID,
        "private_key": private_pem(),
        "client_email": CLIENT_EMAIL,
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
    info.update(fields)
    return json.dumps({key: value for key, value in info.items() if value is not None})


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def check_assertion(testcase: SynchronousTestCase, assertion: str, audience: str) -> dict[str, Any]:
    """
    C{assertion} is a JWT signed with L{private_key} (RS256, the key's id),
    issued by the account for C{audience} and the cloud-platform scope;
    its claims.
    """
    header_part, claims_part, signature = assertion.split(".")
    header = json.loads(_b64(header_part))
    testcase.assertEqual(header, {"alg": "RS256", "typ": "JWT", "kid": KEY_ID})
    private_key().public_key().verify(
        _b64(signature),
        f"{header_part}.{claims_part}".encode("ascii"),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )
    claims: dict[str, Any] = json.loads(_b64(claims_part))
    testcase.assertEqual(
        {key: claims[key] for key in ("iss", "aud", "scope")},
        {"iss": CLIENT_EMAIL, "aud": audience, "scope": SCOPE},
    )
    testcase.assertEqual(claims["exp"] - claims["iat"], 3600)
    return claims


def vertex_conf(**fields: Any) -> dict[str, Any]:
    """
    An C{ai-proxy} config of provider C{vertex-ai} with C{auth.gcp},
    C{fields} over it.
    """
    conf: dict[str, Any] = {
        "provider": "vertex-ai",
        "provider_conf": {"project_id": PROJECT, "region": REGION},
        "auth": {"gcp": {"service_account_json": key_json()}},
    }
    conf.update(fields)
    return conf


def problems_of(*confs: Mapping[str, Any]) -> list[str]:
    """
    The config problems of C{ai-proxy} routes with C{confs}.
    """
    with SynchronousTestCase().assertRaises(ConfigError) as raised:
        build_table(
            *({"uri": f"/r{i}/*", "plugins": {"ai-proxy": conf}} for i, conf in enumerate(confs))
        )
    return raised.exception.problems


def target(**fields: Any) -> Target:
    return Target("ai-proxy-vertex-ai", get_provider("vertex-ai"), vertex_conf(**fields))


def context(model: str | None = "text-embedding-005") -> ExchangeContext:
    ctx = ExchangeContext("route", None, 0.0)
    ctx.request_llm_model = model
    return ctx


# -- the mock's token endpoint in memory ------------------------------------------------------


class MockTokenClient:
    """
    Sends the token requests of a L{GCPTokenAuth} to a L{MockUpstream} in
    memory (treq's L{StubTreq}), as an upstream client would over a socket.

    @ivar mock: the mock upstream, its stats and recorded requests.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.mock = MockUpstream(clock)
        self._stub = StubTreq(self.mock.resource())

    def request(self, method: str, url: str, headers: Headers, body: bytes | None) -> Deferred[Any]:
        return self._stub.request(method, url, headers=headers, data=body, unbuffered=True)

    def pump(self) -> None:
        """
        Let the mock answer what is due, and the answers travel.
        """
        for _ in range(3):
            self._stub.flush()
            self.clock.advance(0)

    def token_requests(self) -> list[dict[str, list[str]]]:
        """
        The forms of the token requests the mock got.
        """
        return [
            parse_qs(record.body.decode("ascii"))
            for record in self.mock.requests
            if record.path.split("?")[0].endswith("/token")
        ]


class FakeTokenClient:
    """
    A token client whose answers the test gives: each request gets the
    Deferred L{answers} returns (by default one that never fires).
    """

    def __init__(self, answers: Callable[[], Deferred[Any]] | None = None) -> None:
        self.answers = answers or (lambda: Deferred(lambda d: self.cancelled.append(d)))
        self.calls: list[tuple[str, str, Headers, bytes | None]] = []
        self.cancelled: list[Deferred[Any]] = []

    def request(self, method: str, url: str, headers: Headers, body: bytes | None) -> Deferred[Any]:
        self.calls.append((method, url, headers, body))
        return self.answers()


class AnsweringClient:
    """
    A token client answering each request at once with C{status} and a
    body the test then delivers (C{responses[-1]}).
    """

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.responses: list[FakeResponse] = []

    def request(self, method: str, url: str, headers: Headers, body: bytes | None) -> Deferred[Any]:
        self.responses.append(FakeResponse(self.status))
        return succeed(self.responses[-1])


def chat_call() -> UpstreamCall:
    headers = Headers({b"content-type": [b"application/json"], b"x-keep": [b"1"]})
    return UpstreamCall("POST", CHAT_URL, headers, b'{"messages":[]}')


def header(call: UpstreamCall, name: bytes) -> str | None:
    values = call.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


# -- provider rules --------------------------------------------------------------------------


class ProviderTests(SynchronousTestCase):
    """
    Provider C{vertex-ai}: what it serves, its hosts and paths.
    """

    def test_served(self) -> None:
        """
        C{vertex-ai} is served: OpenAI chat as it is, the predict protocol
        (OpenAI embeddings come converted), C{max_tokens} goes to
        C{max_completion_tokens}.
        """
        provider = get_provider("vertex-ai")
        self.assertTrue(provider.serves(OPENAI_CHAT))
        self.assertTrue(provider.serves(VERTEX_PREDICT))
        self.assertFalse(provider.serves(OPENAI_EMBEDDINGS))
        self.assertEqual(dict(provider.max_tokens_field), {OPENAI_CHAT: "max_completion_tokens"})
        self.assertIs(provider.rules, RULES)

    def test_hosts(self) -> None:
        """
        The host is the region's, or the global one for C{global}.
        """
        self.assertEqual(upstream_url(target(), OPENAI_CHAT, "/x", ""), CHAT_URL)
        url = upstream_url(
            target(provider_conf={"project_id": PROJECT, "region": "global"}), OPENAI_CHAT, "/", ""
        )
        self.assertEqual(
            url,
            f"https://aiplatform.googleapis.com/v1beta1/projects/{PROJECT}/locations/global"
            "/endpoints/openapi/chat/completions",
        )

    def test_predict_path(self) -> None:
        """
        The predict path holds the model: C{options.model} over the body's,
        percent-encoded (a C{/} or C{:} cannot change the path).
        """
        base = (
            f"https://{REGION}-aiplatform.googleapis.com/v1/projects/{PROJECT}/locations/{REGION}"
            "/publishers/google/models/"
        )
        for fields, body, model in [
            ({}, {"model": "text-embedding-005"}, "text-embedding-005"),
            (
                {"options": {"model": "gemini-embedding-001"}},
                {"model": "x"},
                "gemini-embedding-001",
            ),
            ({}, {"model": "textembedding-gecko@003"}, "textembedding-gecko@003"),
            ({}, {"model": "a/../b:c"}, "a%2F..%2Fb%3Ac"),
        ]:
            url = upstream_url(target(**fields), VERTEX_PREDICT, "/v1/embeddings", "", body)
            self.assertEqual(url, f"{base}{model}:predict")

    def test_predict_without_model(self) -> None:
        """
        A predict request without a model, on a route without one: 400 with
        APISIX's message.
        """
        with self.assertRaises(ClientError) as raised:
            upstream_url(target(), VERTEX_PREDICT, "/v1/embeddings", "", {"input": "x"})
        self.assertEqual(raised.exception.status, 400)
        self.assertIn(b"could not resolve upstream path", raised.exception.body())

    def test_endpoint(self) -> None:
        """
        C{override.endpoint} without a path gets the default path; with one,
        its path is used verbatim.
        """
        url = upstream_url(
            target(override={"endpoint": "http://127.0.0.1:7751"}), OPENAI_CHAT, "/", ""
        )
        self.assertEqual(url, "http://127.0.0.1:7751" + CHAT_URL.split(".com", 1)[1])
        fixed = "http://127.0.0.1:7751/v1/chat/completions"
        self.assertEqual(
            upstream_url(
                target(override={"endpoint": fixed}, provider_conf={}), OPENAI_CHAT, "/", ""
            ),
            fixed,
        )

    def test_shape_body(self) -> None:
        """
        C{model} is removed from a predict body (the path holds it), kept in
        a chat body.
        """
        body: dict[str, Any] = {"model": "m", "instances": []}
        self.assertTrue(RULES.shape_body(body, VERTEX_PREDICT, {}))
        self.assertEqual(body, {"instances": []})
        chat = {"model": "m", "messages": []}
        self.assertFalse(RULES.shape_body(chat, OPENAI_CHAT, {}))
        self.assertEqual(chat["model"], "m")


class ConfigTests(SynchronousTestCase):
    """
    The config rules of provider C{vertex-ai} and of C{auth.gcp}.
    """

    def test_built(self) -> None:
        """
        A route gets a L{GCPTokenAuth} with the config's settings, its
        token requests sent by the instance's own upstream client; in an
        C{ai-proxy-multi} instance too.
        """
        gcp = {"service_account_json": key_json(), "max_ttl": 600, "expire_early_secs": 30}
        multi = {"instances": [{"name": "v", "weight": 1, **vertex_conf()}]}
        table = build_table(
            {"uri": "/v/*", "plugins": {"ai-proxy": vertex_conf(auth={"gcp": gcp}, timeout=5000)}},
            {"uri": "/m/*", "plugins": {"ai-proxy-multi": multi}},
        )
        for route, (early, ttl, timeout) in zip(
            table.routes, [(30, 600, 5.0), (60, None, 30.0)], strict=True
        ):
            instance = route.instances[0]
            auth = instance.auth
            assert isinstance(auth, GCPTokenAuth)
            self.assertTrue(verifyObject(IUpstreamAuth, auth))
            self.assertEqual(
                (auth.expire_early_secs, auth.max_ttl, auth.timeout), (early, ttl, timeout)
            )
            self.assertEqual(auth.account.client_email, CLIENT_EMAIL)
            self.assertIs(auth._client, instance.client)

    def test_gcp_elsewhere(self) -> None:
        """
        C{auth.gcp} works on any provider (e.g. an OpenAI-compatible
        endpoint taking Google tokens); without it, a vertex-ai route has
        no authorizer (C{auth.header} only).
        """
        table = build_table(
            {
                "uri": "/a/*",
                "plugins": {
                    "ai-proxy": {
                        "provider": "openai-compatible",
                        "auth": {"gcp": {"service_account_json": key_json()}},
                        "override": {"endpoint": "https://example.test/v1/chat/completions"},
                    }
                },
            },
            {"uri": "/b/*", "plugins": {"ai-proxy": vertex_conf(auth={"header": {"x-k": "v"}})}},
        )
        self.assertIsInstance(table.routes[0].instances[0].auth, GCPTokenAuth)
        self.assertIsNone(table.routes[1].instances[0].auth)

    def test_missing(self) -> None:
        """
        Without C{provider_conf.project_id} and C{region} a route needs an
        endpoint, and an endpoint without a path needs both; each problem at
        its path, in an C{ai-proxy-multi} instance too.
        """
        bare = vertex_conf(provider_conf={})
        half = vertex_conf(
            provider_conf={"region": REGION}, override={"endpoint": "http://127.0.0.1:1"}
        )
        multi = {"instances": [{"name": "a", "weight": 1, **bare}]}
        with self.assertRaises(ConfigError) as raised:
            build_table(
                {"uri": "/a/*", "plugins": {"ai-proxy": bare}},
                {"uri": "/b/*", "plugins": {"ai-proxy": half}},
                {"uri": "/c/*", "plugins": {"ai-proxy-multi": multi}},
            )
        why = "required for provider 'vertex-ai' without override.endpoint"
        self.assertEqual(
            raised.exception.problems,
            [
                f"routes[0].plugins.ai-proxy.provider_conf.project_id: {why}",
                f"routes[0].plugins.ai-proxy.provider_conf.region: {why}",
                "routes[1].plugins.ai-proxy.override.endpoint: "
                "needs a path unless provider_conf.project_id and region are set",
                f"routes[2].plugins.ai-proxy-multi.instances[0].provider_conf.project_id: {why}",
                f"routes[2].plugins.ai-proxy-multi.instances[0].provider_conf.region: {why}",
            ],
        )

    def test_endpoint_only(self) -> None:
        """
        An endpoint with a path is enough.
        """
        conf = vertex_conf(
            provider_conf={}, override={"endpoint": "https://proxy.test/v1/chat/completions"}
        )
        build_table({"uri": "/a/*", "plugins": {"ai-proxy": conf}})

    def test_bad_names(self) -> None:
        """
        A region that is not a location name (it makes the host name) or a
        project id holding a C{/} is refused.
        """
        conf = vertex_conf(provider_conf={"project_id": "p/../x", "region": "evil.example/x"})
        self.assertEqual(
            problems_of(conf),
            [
                "routes[0].plugins.ai-proxy.provider_conf.region: "
                "'evil.example/x' is not a Google Cloud location name",
                "routes[0].plugins.ai-proxy.provider_conf.project_id: "
                "'p/../x' is not a Google Cloud project id",
            ],
        )

    def test_bad_key(self) -> None:
        """
        A C{service_account_json} that is not a usable key is a config error
        at its path; no message quotes the key.
        """
        path = "routes[0].plugins.ai-proxy.auth.gcp.service_account_json"
        cases = [
            ("{nope", "not valid JSON"),
            ("[]", "not a JSON object"),
            (key_json(type="authorized_user"), "type is 'authorized_user', not 'service_account'"),
            (key_json(client_email=None, private_key=None), "missing client_email, private_key"),
            (key_json(token_uri="file:///etc/passwd"), "token_uri is not an http(s) URL"),
            (
                key_json(private_key=private_pem().replace("A", "B", 40)),
                "private_key is not a PEM RSA private key",
            ),
        ]
        for text, reason in cases:
            conf = vertex_conf(auth={"gcp": {"service_account_json": text}})
            [problem] = problems_of(conf)
            self.assertTrue(problem.startswith(f"{path}: not a service-account key: "), problem)
            self.assertIn(reason, problem)
            self.assertNotIn("PRIVATE KEY", problem)
            for line in private_pem().splitlines()[1:-1]:
                self.assertNotIn(line, problem)

    def test_environment(self) -> None:
        """
        Without C{service_account_json} the key is read from
        C{GCP_SERVICE_ACCOUNT}; with neither, the route is refused.
        """
        conf = vertex_conf(auth={"gcp": {}})
        self.patch(os, "environ", {ENVIRONMENT_VARIABLE: key_json()})
        table = build_table({"uri": "/a/*", "plugins": {"ai-proxy": conf}})
        self.assertIsInstance(table.routes[0].instances[0].auth, GCPTokenAuth)
        self.patch(os, "environ", {ENVIRONMENT_VARIABLE: "{"})
        [problem] = problems_of(conf)
        self.assertIn("(from the GCP_SERVICE_ACCOUNT environment variable)", problem)
        self.patch(os, "environ", {})
        self.assertEqual(
            problems_of(conf),
            [
                "routes[0].plugins.ai-proxy.auth.gcp.service_account_json: "
                "required, or the GCP_SERVICE_ACCOUNT environment variable"
            ],
        )

    def test_schema_bounds(self) -> None:
        """
        C{max_ttl} is at least 1, C{expire_early_secs} at least 0.
        """
        gcp = {"service_account_json": key_json(), "max_ttl": 0, "expire_early_secs": -1}
        self.assertEqual(
            problems_of(vertex_conf(auth={"gcp": gcp})),
            [
                "routes[0].plugins.ai-proxy.auth.gcp.expire_early_secs: "
                "-1 is less than the minimum of 0",
                "routes[0].plugins.ai-proxy.auth.gcp.max_ttl: 0 is less than the minimum of 1",
            ],
        )


# -- the service account and its token -------------------------------------------------------


class ServiceAccountTests(SynchronousTestCase):
    """
    L{ServiceAccount}: the key file loaded, and the assertions it signs.
    """

    def test_assertion(self) -> None:
        """
        An assertion is an RS256 JWT with the key's id, issued at the time
        given for the key file's token URI and the cloud-platform scope,
        valid an hour.
        """
        account = ServiceAccount.from_json(key_json())
        claims = check_assertion(self, account.assertion(1714566645.7), TOKEN_URI)
        self.assertEqual((claims["iat"], claims["exp"]), (1714566645, 1714566645 + 3600))

    def test_repr(self) -> None:
        """
        Neither the account's nor its authorizer's C{repr} shows the key.
        """
        account = load_service_account({"service_account_json": key_json()})
        auth = GCPTokenAuth(account, FakeTokenClient(), Clock())
        self.assertEqual(repr(account), f"ServiceAccount({CLIENT_EMAIL!r})")
        self.assertEqual(repr(auth), f"GCPTokenAuth(ServiceAccount({CLIENT_EMAIL!r}))")


class TokenFlowTests(SynchronousTestCase):
    """
    L{GCPTokenAuth} against the mock upstream's token endpoint (in memory),
    time driven by a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.client = MockTokenClient(self.clock)
        self.events = log_events(self)

    def auth(self, query: str = "", **kwargs: Any) -> GCPTokenAuth:
        account = ServiceAccount.from_json(key_json(TOKEN_URI + query))
        return GCPTokenAuth(account, self.client, self.clock, **kwargs)

    def authorized(self, auth: GCPTokenAuth) -> UpstreamCall:
        """
        Authorize a call, letting the mock answer; the authorized call.
        """
        d = auth.authorize(chat_call())
        self.client.pump()
        call: UpstreamCall = self.successResultOf(d)
        return call

    def test_interface(self) -> None:
        """
        L{GCPTokenAuth} provides L{IUpstreamAuth}.
        """
        self.assertTrue(verifyObject(IUpstreamAuth, self.auth()))

    def test_fetched_once(self) -> None:
        """
        The first request fetches a token with the JWT-bearer grant (a form
        POST to the key file's C{token_uri}); the next ones use it: one
        fetch for many requests. Each call keeps its other headers and gets
        C{authorization: Bearer <token>}.
        """
        auth = self.auth()
        calls = [self.authorized(auth) for _ in range(3)]
        for call in calls:
            self.assertEqual(header(call, b"authorization"), "Bearer mock-token-1")
            self.assertEqual(header(call, b"x-keep"), "1")
            self.assertEqual((call.url, call.body), (CHAT_URL, b'{"messages":[]}'))
        self.assertEqual(self.client.mock.stats.token_requests, 1)
        [record] = self.client.mock.requests
        self.assertEqual((record.method, record.path), ("POST", "/token"))
        self.assertEqual(record.headers["content-type"], ["application/x-www-form-urlencoded"])
        form = parse_qs(record.body.decode("ascii"))
        self.assertEqual(sorted(form), ["assertion", "grant_type"])
        self.assertEqual(form["grant_type"], [GRANT_TYPE])
        claims = check_assertion(self, form["assertion"][0], TOKEN_URI)
        self.assertEqual(claims["iat"], 1_000_000)

    def test_client_authorization_replaced(self) -> None:
        """
        An C{authorization} already in the call is replaced, not doubled.
        """
        call = chat_call()
        call.headers.setRawHeaders(b"Authorization", [b"Bearer client-key"])
        d = self.auth().authorize(call)
        self.client.pump()
        authorized = self.successResultOf(d)
        self.assertEqual(
            authorized.headers.getRawHeaders(b"authorization"), [b"Bearer mock-token-1"]
        )
        self.assertEqual(call.headers.getRawHeaders(b"authorization"), [b"Bearer client-key"])

    def test_refreshed_before_expiry(self) -> None:
        """
        A token is used until C{expires_in - expire_early_secs} after its
        fetch started, then the next request fetches a new one.
        """
        auth = self.auth("?expires_in=600")
        self.assertEqual(header(self.authorized(auth), b"authorization"), "Bearer mock-token-1")
        self.clock.advance(539)
        self.assertEqual(header(self.authorized(auth), b"authorization"), "Bearer mock-token-1")
        self.clock.advance(1)
        self.assertEqual(header(self.authorized(auth), b"authorization"), "Bearer mock-token-2")
        self.assertEqual(self.client.mock.stats.token_requests, 2)
        first, second = self.client.token_requests()
        self.assertNotEqual(first["assertion"], second["assertion"])

    def test_expire_early_and_max_ttl(self) -> None:
        """
        C{expire_early_secs} is configurable, and C{max_ttl} caps how long a
        token is used.
        """
        auth = self.auth("?expires_in=600", expire_early_secs=0, max_ttl=100)
        self.authorized(auth)
        self.clock.advance(99)
        self.authorized(auth)
        self.assertEqual(self.client.mock.stats.token_requests, 1)
        self.clock.advance(1)
        self.assertEqual(header(self.authorized(auth), b"authorization"), "Bearer mock-token-2")
        auth = self.auth("?expires_in=600", expire_early_secs=0)
        self.authorized(auth)
        self.clock.advance(599)
        self.authorized(auth)
        self.assertEqual(self.client.mock.stats.token_requests, 3)

    def test_concurrent_share_one_fetch(self) -> None:
        """
        Requests arriving while a fetch is under way wait for that fetch:
        one token request for all of them. Each gets its own Deferred:
        cancelling one does not cancel the fetch the others wait for.
        """
        auth = self.auth("?first_delay_ms=500")
        waiting = [auth.authorize(chat_call()) for _ in range(4)]
        self.client.pump()
        for d in waiting:
            self.assertNoResult(d)
        self.assertEqual(len({id(d) for d in waiting}), 4)
        waiting[0].cancel()
        self.failureResultOf(waiting[0], CancelledError)
        self.clock.advance(0.5)
        self.client.pump()
        for d in waiting[1:]:
            self.assertEqual(
                header(self.successResultOf(d), b"authorization"), "Bearer mock-token-1"
            )
        self.assertEqual(self.client.mock.stats.token_requests, 1)
        self.assertEqual(self.client.mock.stats.requests_aborted, 0)

    def test_failure(self) -> None:
        """
        A token endpoint error fails every waiting request with a 500 whose
        body names the reason; the warning logged names the account, and no
        message or log event holds the key, the assertion or a token.
        """
        auth = self.auth("?status=503")
        waiting = [auth.authorize(chat_call()) for _ in range(2)]
        self.client.pump()
        message = (
            "failed to get gcp access token: token endpoint answered 503 (mock_error: mock error)"
        )
        for d in waiting:
            error = self.failureResultOf(d, ClientError).value
            self.assertEqual(error.status, 500)
            self.assertEqual(json.loads(error.body()), {"error_msg": message})
        [assertion] = self.client.token_requests()[0]["assertion"]
        texts = [formatEvent(event) for event in self.events]
        self.assertIn(
            f"failed to get gcp access token for {CLIENT_EMAIL}: "
            "token endpoint answered 503 (mock_error: mock error)",
            texts,
        )
        for text in texts + [message]:
            self.assertNotIn(assertion, text)
            self.assertNotIn(assertion.split(".")[2], text)
            for line in private_pem().splitlines()[1:-1]:
                self.assertNotIn(line, text)

    def test_bad_request_refused(self) -> None:
        """
        The mock refuses a token request that is not a JWT-bearer grant,
        and the reason reaches the client without the assertion.
        """
        auth = self.auth()
        self.patch(auth.account, "assertion", lambda now: "not-a-jwt")
        d = auth.authorize(chat_call())
        self.client.pump()
        error = self.failureResultOf(d, ClientError).value
        self.assertEqual(
            error.message,
            "failed to get gcp access token: token endpoint answered 400 "
            "(invalid_grant: Invalid JWT: not three segments)",
        )


class TokenFailureTests(SynchronousTestCase):
    """
    L{GCPTokenAuth} when the token endpoint cannot be reached, is slow, or
    answers something that is not a token (a fake client).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.events = log_events(self)

    def auth(self, client: Any, **kwargs: Any) -> GCPTokenAuth:
        return GCPTokenAuth(ServiceAccount.from_json(key_json()), client, self.clock, **kwargs)

    def reason(self, d: Deferred[Any]) -> str:
        error = self.failureResultOf(d, ClientError).value
        self.assertEqual(error.status, 500)
        prefix = "failed to get gcp access token: "
        self.assertTrue(error.message.startswith(prefix), error.message)
        self.assertEqual(json.loads(error.body()), {"error_msg": error.message})
        return error.message[len(prefix) :]

    def test_timeout(self) -> None:
        """
        A fetch without an answer within the timeout is cancelled and fails
        its waiters.
        """
        client = FakeTokenClient()
        auth = self.auth(client, timeout=5.0)
        d = auth.authorize(chat_call())
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.reason(d), "no answer from the token endpoint within 5 s")
        self.assertEqual(len(client.cancelled), 1)

    def test_unreachable_then_retry(self) -> None:
        """
        A connection failure fails the waiting requests; the next request
        tries again (no failure is cached).
        """
        client = MockTokenClient(self.clock)
        send = client.request
        refusals = [ConnectionRefusedError("127.0.0.1:1")]

        def request(*args: Any) -> Deferred[Any]:
            return fail(refusals.pop()) if refusals else send(*args)

        self.patch(client, "request", request)
        auth = self.auth(client)
        self.assertEqual(
            self.reason(auth.authorize(chat_call())),
            "token request failed: ConnectionRefusedError: "
            "Connection was refused by other side: 127.0.0.1:1.",
        )
        d = auth.authorize(chat_call())
        client.pump()
        self.assertEqual(header(self.successResultOf(d), b"authorization"), "Bearer mock-token-1")

    def test_bad_answers(self) -> None:
        """
        An answer that gives no usable token fails with its reason; an
        error text echoing a JWT is not repeated.
        """
        jwt = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2lnbmF0dXJl"
        cases = [
            (200, b"not json", "token endpoint answer is not a JSON object"),
            (200, b'{"token_type":"Bearer"}', "token endpoint answer has no access_token"),
            (
                200,
                b'{"access_token":"a\\r\\nx: y"}',
                "token endpoint answer has an invalid access_token",
            ),
            (401, b"<html>", "token endpoint answered 401"),
            (
                400,
                json.dumps({"error": "invalid_grant", "error_description": f"bad {jwt}"}).encode(),
                "token endpoint answered 400 (invalid_grant: bad <jwt>)",
            ),
            (200, b"x" * 70_000, "token endpoint answer over 65536 bytes"),
        ]
        for status, body, reason in cases:
            client = AnsweringClient(status)
            d = self.auth(client).authorize(chat_call())
            client.responses[-1].data(body)
            client.responses[-1].end()
            self.assertEqual(self.reason(d), reason)
            if len(body) > 65536:
                self.assertTrue(client.responses[-1].transport.stopped)

    def test_expires_in(self) -> None:
        """
        A missing C{expires_in} counts as an hour; a numeric string counts.
        """
        for body, lifetime in [
            (b'{"access_token":"t"}', 3600),
            (b'{"access_token":"t","expires_in":"120"}', 120),
        ]:
            client = AnsweringClient()
            responses = client.responses
            auth = self.auth(client, expire_early_secs=0)
            d = auth.authorize(chat_call())
            responses[-1].data(body)
            responses[-1].end()
            self.successResultOf(d)
            self.clock.advance(lifetime - 1)
            self.successResultOf(auth.authorize(chat_call()))
            self.assertEqual(len(responses), 1)
            self.clock.advance(1)
            d = auth.authorize(chat_call())
            self.assertEqual(len(responses), 2)
            responses[-1].data(b'{"access_token":"u"}')
            responses[-1].end()
            self.assertEqual(header(self.successResultOf(d), b"authorization"), "Bearer u")


# -- the embeddings converter ----------------------------------------------------------------


def predictions(*counts: int | None) -> bytes:
    """
    A predict answer: one prediction per count (its C{token_count}, or no
    statistics for L{None}), each a two-value vector.
    """
    items = []
    for index, count in enumerate(counts):
        embeddings: dict[str, Any] = {"values": [index, 0.5]}
        if count is not None:
            embeddings["statistics"] = {"token_count": count, "truncated": False}
        items.append({"embeddings": embeddings})
    return json.dumps({"predictions": items}).encode()


class ConverterTests(SynchronousTestCase):
    """
    L{EMBEDDINGS_TO_VERTEX_PREDICT}: OpenAI embeddings to Vertex AI
    predict, and the answer back.
    """

    converter = EMBEDDINGS_TO_VERTEX_PREDICT

    def test_interface(self) -> None:
        """
        It is an L{IConverter} from openai-embeddings to vertex-predict.
        """
        self.assertTrue(verifyObject(IConverter, self.converter))
        self.assertEqual(
            (self.converter.client_protocol, self.converter.upstream_protocol),
            (OPENAI_EMBEDDINGS, VERTEX_PREDICT),
        )

    def test_request(self) -> None:
        """
        C{input} (a string, strings, or arrays joined with spaces) becomes
        C{instances}; every other field is dropped.
        """
        for value, contents in [
            ("hi", ["hi"]),
            (["a", "b c"], ["a", "b c"]),
            ([["a", "b"], "c", []], ["a b", "c", ""]),
            ([[1, 2, 3], [4.5]], ["1 2 3", "4.5"]),
            ([], []),
        ]:
            body = {"model": "m", "input": value, "dimensions": 8, "user": "u"}
            self.assertEqual(
                self.converter.convert_request(body, context()),
                {"instances": [{"content": content} for content in contents]},
            )

    def test_bad_input(self) -> None:
        """
        Any other C{input} is refused with 400, as APISIX words it.
        """
        for body, message in [
            ({"model": "m"}, "`input` is required for embeddings"),
            ({"input": 42}, "`input` must be string or array"),
            ({"input": {"text": "x"}}, "`input` must be string or array"),
            ({"input": ["a", 1]}, "unsupported input type at index 1"),
            ({"input": [None]}, "unsupported input type at index 0"),
            ({"input": [["a", {"b": 1}]]}, "unsupported input type at index 0"),
            ({"input": [[True]]}, "unsupported input type at index 0"),
        ]:
            with self.assertRaises(ClientError) as raised:
                self.converter.convert_request(body, context())
            self.assertEqual(raised.exception.status, 400)
            self.assertEqual(json.loads(raised.exception.body()), {"error_msg": message})
        self.assertEqual(convert_input("x"), [{"content": "x"}])

    def test_answer(self) -> None:
        """
        C{predictions[i].embeddings.values} become the embedding of index
        C{i}; usage is the sum of C{statistics.token_count} (0 where there
        is none); the model is the request's, or C{"unknown"}; the context
        gets the usage.
        """
        ctx = context()
        answer = json.loads(self.converter.convert_answer(200, predictions(3, None, 4), ctx))
        self.assertEqual(
            answer,
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": [i, 0.5]} for i in range(3)
                ],
                "model": "text-embedding-005",
                "usage": {"prompt_tokens": 7, "total_tokens": 7},
            },
        )
        self.assertEqual((ctx.prompt_tokens, ctx.total_tokens), (7, 7))
        answer = json.loads(self.converter.convert_answer(200, predictions(), context(None)))
        self.assertEqual(answer["model"], "unknown")
        self.assertEqual(answer["usage"], {"prompt_tokens": 0, "total_tokens": 0})

    def test_bad_answer(self) -> None:
        """
        A success without predictions, or with a prediction without values,
        cannot be converted (the exchange answers 500).
        """
        for body, message in [
            (b'{"error": "x"}', "vertex response missing predictions"),
            (b"[]", "vertex response missing predictions"),
            (b'{"predictions": [{"embeddings": {}}]}', "invalid embedding at index 0"),
            (b'{"predictions": [1]}', "invalid embedding at index 0"),
        ]:
            with self.assertRaises(ValueError) as raised:
                self.converter.convert_answer(200, body, context())
            self.assertEqual(str(raised.exception), message)
        self.assertRaises(ValueError, self.converter.convert_answer, 200, b"<html>", context())

    def test_errors(self) -> None:
        """
        An error status keeps a Google error body (it has an OpenAI-style
        C{error} object) and wraps anything else; the gateway's own errors
        are OpenAI errors.
        """
        google = b'{"error":{"code":404,"message":"model not found","status":"NOT_FOUND"}}'
        self.assertEqual(self.converter.convert_answer(404, google, context()), google)
        wrapped = json.loads(self.converter.convert_answer(502, b"bad gateway", context()))
        self.assertEqual(
            wrapped, {"error": {"message": "bad gateway", "type": "upstream_error", "code": None}}
        )
        self.assertEqual(
            json.loads(self.converter.convert_error(504, "timed out")),
            {"error": {"message": "timed out", "type": "aiproxy_error", "code": None}},
        )
        headers = Headers({b"authorization": [b"Bearer t"]})
        self.converter.convert_headers(headers, True)
        self.assertEqual(list(headers.getAllRawHeaders()), [(b"Authorization", [b"Bearer t"])])

    def test_stream(self) -> None:
        """
        Predict never streams: a stream converts to nothing (so the
        conversion stage answers 502).
        """
        stream = self.converter.stream(context())
        self.assertTrue(verifyObject(IStreamConverter, stream))
        self.assertEqual(stream.convert_events([object()], context()), b"")
        self.assertEqual(stream.finish(context()), b"")


# -- the mock upstream -----------------------------------------------------------------------


class MockTests(SynchronousTestCase):
    """
    The mock upstream's OAuth2 token endpoint and predict dialect.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.client = MockTokenClient(self.clock)

    def post(
        self, path: str, body: bytes, content_type: bytes = b"application/x-www-form-urlencoded"
    ) -> tuple[int, Any]:
        headers = Headers({b"content-type": [content_type]})
        d = self.client.request("POST", "http://mock.test" + path, headers, body)
        self.client.pump()
        response = self.successResultOf(d)
        read = _read(response, 1 << 20)
        self.client.pump()
        return response.code, json.loads(self.successResultOf(read))

    def form(self, assertion: str | None = None, grant_type: str = GRANT_TYPE) -> bytes:
        if assertion is None:
            assertion = ServiceAccount.from_json(key_json()).assertion(0)
        return urlencode({"grant_type": grant_type, "assertion": assertion}).encode()

    def test_token(self) -> None:
        """
        A JWT-bearer grant gets C{mock-token-<n>}, C{n} counting the token
        requests, with the C{expires_in} control (an hour by default); the
        requests are recorded and counted.
        """
        self.assertEqual(
            self.post("/token", self.form()),
            (200, {"access_token": "mock-token-1", "expires_in": 3600, "token_type": "Bearer"}),
        )
        self.assertEqual(
            self.post("/oauth2/token?expires_in=5", self.form()),
            (200, {"access_token": "mock-token-2", "expires_in": 5, "token_type": "Bearer"}),
        )
        stats = self.client.mock.stats.as_dict()
        self.assertEqual((stats["requests"], stats["token_requests"]), (2, 2))
        self.assertEqual(self.client.mock.requests[1].path, "/oauth2/token?expires_in=5")

    def test_token_refused(self) -> None:
        """
        A request that is not a JWT-bearer grant gets an OAuth2 error; the
        C{status} control answers that status.
        """
        cases = [
            (self.form(), b"application/json", "invalid_request"),
            (self.form(grant_type="client_credentials"), None, "unsupported_grant_type"),
            (self.form(assertion="a.b"), None, "invalid_grant"),
            (self.form(assertion="e30.e30.c2ln"), None, "invalid_grant"),
        ]
        for body, content_type, error in cases:
            status, answer = self.post(
                "/token", body, content_type or b"application/x-www-form-urlencoded"
            )
            self.assertEqual((status, answer["error"]), (400, error))
        self.assertEqual(
            self.post("/token?status=401", self.form()),
            (401, {"error": "mock_error", "error_description": "mock error"}),
        )

    def test_predict(self) -> None:
        """
        C{:predict} answers one prediction per instance, C{prompt_tokens}
        its token count (no statistics with C{usage=0}); never a stream;
        errors in Google's shape.
        """
        payload = {"instances": [{"content": "ab"}, {"content": "c"}], "stream": True}
        reply = _plan(_Turn(1, payload, MockControls(prompt_tokens=3)), _Predict(), {})
        self.assertEqual(reply.headers["content-type"], "application/json")
        assert isinstance(reply.body, bytes)
        answer = json.loads(reply.body)
        self.assertEqual(len(answer["predictions"]), 2)
        self.assertEqual(
            answer["predictions"][0]["embeddings"]["statistics"],
            {"token_count": 3, "truncated": False},
        )
        self.assertEqual(answer["metadata"], {"billableCharacterCount": 3})
        reply = _plan(_Turn(1, payload, MockControls(usage=False)), _Predict(), {})
        assert isinstance(reply.body, bytes)
        self.assertNotIn("statistics", json.loads(reply.body)["predictions"][0]["embeddings"])
        reply = _plan(_Turn(1, payload, MockControls(status=404)), _Predict(), {})
        assert isinstance(reply.body, bytes)
        self.assertEqual(
            json.loads(reply.body),
            {"error": {"code": 404, "message": "mock error", "status": "NOT_FOUND"}},
        )


# -- the requests the gateway sends ---------------------------------------------------------


class UpstreamRequestTests(SynchronousTestCase):
    """
    The requests the gateway sends to Vertex AI (a fake upstream client
    records them; tokens come from the mock's token endpoint in memory).
    """

    def gateway(self, token_query: str = "", **fields: Any) -> tuple[Gateway, MockTokenClient]:
        gcp = {"service_account_json": key_json(TOKEN_URI + token_query)}
        conf = vertex_conf(auth={"gcp": gcp}, **fields)
        routes = [{"id": "vertex", "uri": "/*", "plugins": {"ai-proxy": conf}}]
        gateway = Gateway(self, make_table(routes=routes))
        instance = gateway.table.routes[0].instances[0]
        assert isinstance(instance.auth, GCPTokenAuth)
        tokens = MockTokenClient(Clock())
        instance.auth._client = tokens
        return gateway, tokens

    def sent(self, gateway: Gateway, tokens: MockTokenClient, body: Any, **kw: Any) -> Any:
        """
        Send C{body} with client credentials, let the token come; the
        upstream call, checked for its URL (unless C{url} is L{None}) and
        credentials.
        """
        url = kw.pop("url", CHAT_URL)
        headers = {b"authorization": b"Bearer client-key", b"cookie": b"a=1", b"x-trace": b"t"}
        gateway.send(body, headers=headers, **kw)
        tokens.pump()
        call = gateway.upstream
        self.assertEqual(call.method, "POST")
        if url is not None:
            self.assertEqual(call.url, url)
        self.assertEqual(call.headers.getRawHeaders(b"authorization"), [b"Bearer mock-token-1"])
        self.assertEqual(call.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(call.headers.getRawHeaders(b"x-trace"), [b"t"])
        self.assertFalse(call.headers.hasHeader(b"cookie"))
        return call

    def test_chat(self) -> None:
        """
        An OpenAI chat request goes to the project's chat path with the
        access token instead of the client's credentials, its bytes
        untouched; the answer is relayed.
        """
        gateway, tokens = self.gateway()
        call = self.sent(gateway, tokens, CHAT)
        self.assertEqual(call.body, json.dumps(CHAT).encode())
        raw = json.dumps({"choices": [], "usage": {"prompt_tokens": 2, "total_tokens": 2}}).encode()
        response = gateway.answer(json_response(raw))
        response.data(raw)
        response.end()
        self.assertEqual(gateway.response().status, 200)
        self.assertEqual(gateway.record["instance"], "ai-proxy-vertex-ai")
        self.assertEqual(tokens.mock.stats.token_requests, 1)

    def test_stream(self) -> None:
        """
        A streamed chat request gets C{stream_options.include_usage}; the
        stream is relayed as it is.
        """
        gateway, tokens = self.gateway()
        call = self.sent(gateway, tokens, CHAT_STREAM)
        self.assertEqual(
            json.loads(call.body), {**CHAT_STREAM, "stream_options": {"include_usage": True}}
        )
        response = gateway.answer(stream_response())
        response.data(delta("hi"), DONE)
        response.end()
        parsed = gateway.response()
        self.assertEqual(parsed.status, 200)
        self.assertEqual(parsed.body, delta("hi") + DONE)

    def test_max_tokens(self) -> None:
        """
        C{override.llm_options.max_tokens} goes to C{max_completion_tokens},
        and the client's C{max_tokens} is removed.
        """
        gateway, tokens = self.gateway(override={"llm_options": {"max_tokens": 64}})
        call = self.sent(gateway, tokens, {**CHAT, "max_tokens": 10})
        self.assertEqual(json.loads(call.body), {**CHAT, "max_completion_tokens": 64})

    def test_global(self) -> None:
        """
        Region C{global} uses the global host.
        """
        gateway, tokens = self.gateway(provider_conf={"project_id": PROJECT, "region": "global"})
        url = CHAT_URL.replace(f"{REGION}-aiplatform", "aiplatform").replace(
            f"locations/{REGION}", "locations/global"
        )
        self.sent(gateway, tokens, CHAT, url=url)

    def test_token_failure(self) -> None:
        """
        No token: the client gets 500 with the reason, nothing goes
        upstream, and no log event holds the key or the assertion.
        """
        gateway, tokens = self.gateway("?status=500")
        gateway.send(CHAT)
        tokens.pump()
        response = gateway.response()
        self.assertEqual(response.status, 500)
        self.assertEqual(
            response.json(),
            {
                "error_msg": "failed to get gcp access token: "
                "token endpoint answered 500 (mock_error: mock error)"
            },
        )
        self.assertEqual(gateway.client.calls, [])
        self.assertEqual(gateway.record["status"], 500)
        [assertion] = tokens.token_requests()[0]["assertion"]
        for text in gateway.messages():
            self.assertNotIn(assertion, text)
            self.assertNotIn(key_body()[:64], text)

    def test_embeddings(self) -> None:
        """
        An OpenAI embeddings request is converted to the C{:predict} of the
        route's model (C{options.model}; C{model} is not in the body), and
        the predictions come back as an OpenAI embeddings list with usage.
        """
        gateway, tokens = self.gateway(options={"model": "gemini-embedding-001"})
        url = (
            f"https://{REGION}-aiplatform.googleapis.com/v1/projects/{PROJECT}/locations/{REGION}"
            "/publishers/google/models/gemini-embedding-001:predict"
        )
        call = self.sent(gateway, tokens, EMBEDDINGS, path=b"/v1/embeddings", url=url)
        self.assertEqual(
            json.loads(call.body), {"instances": [{"content": "hello world"}, {"content": "bye"}]}
        )
        raw = predictions(2, 1)
        response = gateway.answer(json_response(raw))
        response.data(raw)
        response.end()
        answer = gateway.response().json()
        self.assertEqual([item["embedding"] for item in answer["data"]], [[0, 0.5], [1, 0.5]])
        self.assertEqual(answer["usage"], {"prompt_tokens": 3, "total_tokens": 3})
        self.assertEqual(gateway.record["prompt_tokens"], 3)


# -- end to end ------------------------------------------------------------------------------


class EndToEndTests(TestCase):
    """
    The real daemon with vertex-ai routes whose tokens come from the mock
    upstream's token endpoint.
    """

    async def test_vertex(self) -> None:
        """
        Chat requests (one streamed) through the daemon reach the project's
        chat path with C{authorization: Bearer mock-token-1}, one token
        fetch for all of them; a route whose key (read from
        C{GCP_SERVICE_ACCOUNT}) gets no token answers 500 with the reason;
        nothing the daemon prints holds the key or an assertion.
        """
        mock = await start_mock(self)
        good = vertex_conf(
            auth={"gcp": {"service_account_json": key_json(mock.url("/token"))}},
            override={"endpoint": mock.url(""), "llm_options": {"max_tokens": 50}},
            streaming_flush_interval_ms=0,
        )
        failing = vertex_conf(auth={"gcp": {}}, override={"endpoint": mock.url("")})
        daemon = await start_daemon(
            self,
            [
                {"id": "vertex", "uri": "/vertex/*", "plugins": {"ai-proxy": good}},
                {"id": "broken", "uri": "/broken/*", "plugins": {"ai-proxy": failing}},
            ],
            env={ENVIRONMENT_VARIABLE: key_json(mock.url("/token?status=503"))},
        )
        path = CHAT_URL.split(".com", 1)[1]
        for body in (CHAT, CHAT_STREAM, {**CHAT, "max_tokens": 5}):
            response = await in_thread(
                http_call,
                daemon.port,
                path="/vertex/v1/chat/completions",
                body=body,
                headers={"x-mock-text": "Vertex says hi", "authorization": "Bearer client"},
            )
            self.assertEqual(response.status, 200)
            recorded = mock.requests()[-1]
            self.assertEqual(recorded["path"], path)
            self.assertEqual(recorded["headers"]["authorization"], ["Bearer mock-token-1"])
        self.assertIn(b"Vertex says hi", response.body)
        self.assertEqual(json.loads(recorded["body"])["max_completion_tokens"], 50)
        self.assertNotIn("max_tokens", json.loads(recorded["body"]))
        self.assertEqual(mock.stats()["token_requests"], 1)
        [token_request] = [r for r in mock.requests() if r["path"] == "/token"]
        form = parse_qs(token_request["body"])
        self.assertEqual(form["grant_type"], [GRANT_TYPE])
        check_assertion(self, form["assertion"][0], mock.url("/token"))

        response = await in_thread(
            http_call, daemon.port, path="/broken/v1/chat/completions", body=CHAT
        )
        self.assertEqual(response.status, 500)
        self.assertEqual(
            response.json(),
            {
                "error_msg": "failed to get gcp access token: "
                "token endpoint answered 503 (mock_error: mock error)"
            },
        )
        await daemon.wait_for_line("failed to get gcp access token for")
        records = await daemon.wait_for_records(4)
        self.assertEqual([record["status"] for record in records], [200, 200, 200, 500])
        assertions = [
            parse_qs(r["body"])["assertion"][0] for r in mock.requests() if "/token" in r["path"]
        ]
        self.assertEqual(len(assertions), 2)
        for line in daemon.lines:
            self.assertNotIn("mock-token-1", line)
            self.assertNotIn(key_body()[:64], line)
            for assertion in assertions:
                self.assertNotIn(assertion.split(".")[2], line)

    async def test_embeddings(self) -> None:
        """
        An OpenAI embeddings request through the daemon reaches the
        C{:predict} path of the route's model as C{instances}, with the
        access token; the client gets an OpenAI embeddings list.
        """
        mock = await start_mock(self)
        conf = vertex_conf(
            auth={"gcp": {"service_account_json": key_json(mock.url("/token"))}},
            options={"model": "text-embedding-005"},
            override={"endpoint": mock.url("")},
        )
        daemon = await start_daemon(
            self, [{"id": "embed", "uri": "/v1/embeddings", "plugins": {"ai-proxy": conf}}]
        )
        response = await in_thread(
            http_call,
            daemon.port,
            path="/v1/embeddings",
            body=EMBEDDINGS,
            headers={"x-mock-prompt-tokens": "4"},
        )
        self.assertEqual(response.status, 200)
        answer = response.json()
        self.assertEqual(answer["object"], "list")
        self.assertEqual([item["index"] for item in answer["data"]], [0, 1])
        self.assertEqual(answer["model"], "text-embedding-005")
        self.assertEqual(answer["usage"], {"prompt_tokens": 8, "total_tokens": 8})
        recorded = mock.requests()[-1]
        self.assertEqual(
            recorded["path"],
            f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/google/models"
            "/text-embedding-005:predict",
        )
        self.assertEqual(recorded["headers"]["authorization"], ["Bearer mock-token-1"])
        self.assertEqual(
            json.loads(recorded["body"]),
            {"instances": [{"content": "hello world"}, {"content": "bye"}]},
        )
        record = (await daemon.wait_for_records(1))[-1]
        self.assertEqual((record["status"], record["prompt_tokens"]), (200, 8))
