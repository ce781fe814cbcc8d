# -*- test-case-name: tests.test_budgets_e2e -*-
"""
End-to-end tests of consumers, C{key-auth} and C{ai-rate-limiting} with
C{policy: local}: the real C{twistd aiproxy} daemon, the mock upstream in
the test's reactor, and the official C{openai} and C{anthropic} SDKs or raw
sockets as clients.

Every test checks that no consumer key reached the upstream (in any header
or query of any request the mock saw) or the daemon's output.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import anthropic
import openai
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.daemon import (
    ROUTE_API_KEY,
    Daemon,
    MockServer,
    RawHTTPClient,
    RawResponse,
    http_call,
    in_thread,
    proxy_route,
    run_command,
    sleep,
    start_daemon,
    start_mock,
)
from tests.helpers import data_events, write_config
from tests.test_ops_e2e import metrics_port, scrape

#: Consumer keys: none of them may reach the upstream or the daemon's output.
ALICE_KEY = "ak-alice-e2e-7Hq2Lw9Zp4Xc1Vb8"
BOB_KEY = "ak-bob-e2e-Rt5Yn3Km8Jd6Fs0G"
CAROL_KEY = "ak-carol-e2e-Pz1Qw7Ex4Ub9Ic2O"
DAVE_KEY = "ak-dave-e2e-Mn6Bv3Cx0Za5Sd8F"
KEYS = (ALICE_KEY, BOB_KEY, CAROL_KEY, DAVE_KEY)

#: Where a client may send alice's key: headers, and a query parameter.
KEY_PLACES: dict[str, tuple[dict[str, str], str]] = {
    "apikey": ({"apikey": ALICE_KEY}, ""),
    "bearer": ({"Authorization": f"Bearer {ALICE_KEY}"}, ""),
    "x-api-key": ({"x-api-key": ALICE_KEY}, ""),
    "x-gateway-key": ({"x-gateway-key": ALICE_KEY}, ""),
    "?apikey": ({}, f"apikey={ALICE_KEY}"),
    "?token": ({}, f"token={ALICE_KEY}"),
}

#: A key with characters that must be percent-encoded in a query.
ERIN_KEY = "ak-erin+e2e/Zx9=Qw7Lp3Vb"

#: A key no consumer has.
STRANGER_KEY = "ak-stranger-e2e-Gh4Jk7Lp0Oi9"

#: A client's own provider credential, forwarded on a route without C{auth}.
CLIENT_PROVIDER_KEY = "sk-client-own-provider-key-42"

CHAT: dict[str, Any] = {"model": "gpt-e2e", "messages": [{"role": "user", "content": "hi"}]}
CHAT_STREAM = {**CHAT, "stream": True}
ANTHROPIC_CHAT: dict[str, Any] = {
    "model": "claude-e2e",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}

#: The mock's five content pieces, joined.
TEXT = "tok0 tok1 tok2 tok3 tok4 "

MISSING = {"message": "Missing API key in request"}
INVALID = {"message": "Invalid API key in request"}
CHALLENGE = 'Key realm="aiproxy"'
RATE_LIMITED = {"error_msg": "rate limit exceeded"}


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def consumer(
    username: str, key: str, hashed: bool = False, budget: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """
    A consumer document, with its key given as such (or as a C{${VAR}})
    or as its digest.
    """
    key_auth = {"key_sha256": sha256(key)} if hashed else {"key": key}
    plugins: dict[str, Any] = {"key-auth": key_auth}
    if budget is not None:
        plugins["ai-rate-limiting"] = dict(budget)
    return {"username": username, "plugins": plugins}


#: alice, bob (by digest), carol and dave.
CONSUMERS = [
    consumer("alice", ALICE_KEY),
    consumer("bob", BOB_KEY, hashed=True),
    consumer("carol", CAROL_KEY),
    consumer("dave", DAVE_KEY, hashed=True),
]


def route(
    mock: MockServer,
    route_id: str,
    key_auth: Mapping[str, Any] | None = None,
    budget: Mapping[str, Any] | None = None,
    endpoint: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """
    A route serving C{/<route_id>/*} with an C{ai-proxy} to the mock's chat
    completions (or C{endpoint}), C{key-auth} when given, a budget when
    given.
    """
    plugins: dict[str, Any] = {}
    if key_auth is not None:
        plugins["key-auth"] = dict(key_auth)
    if budget is not None:
        plugins["ai-rate-limiting"] = dict(budget)
    return proxy_route(
        mock,
        route_id=route_id,
        uri=f"/{route_id}/*",
        endpoint=endpoint,
        plugins=plugins,
        streaming_flush_interval_ms=0,
        **fields,
    )


def anthropic_route(
    mock: MockServer,
    route_id: str,
    key_auth: Mapping[str, Any] | None = None,
    budget: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    A route serving C{/<route_id>/*} with an C{ai-proxy} to the mock's
    Anthropic Messages (clients of C{/v1/messages} are passed through).
    """
    document = route(mock, route_id, key_auth, budget, endpoint=mock.url("/v1/messages"))
    document["plugins"]["ai-proxy"]["provider"] = "anthropic"
    document["plugins"]["ai-proxy"]["auth"] = {"header": {"x-api-key": ROUTE_API_KEY}}
    return document


def multi_route(
    mock: MockServer,
    route_id: str,
    names: Iterable[str],
    key_auth: Mapping[str, Any] | None = None,
    budget: Mapping[str, Any] | None = None,
    same_priority: bool = False,
    failing: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """
    A route serving C{/<route_id>/*} with an C{ai-proxy-multi} of one
    instance per name, each sending to the mock's chat completions with
    C{?instance=<name>} (the mock ignores it; the recorded path shows it).
    The first instance has the highest priority, unless C{same_priority};
    the instance named C{failing} always answers 500.
    """
    names = list(names)
    instances = [
        {
            "name": name,
            "provider": "openai",
            "weight": 1,
            "priority": 0 if same_priority else len(names) - position,
            "auth": {"header": {"Authorization": f"Bearer {ROUTE_API_KEY}"}},
            "override": {
                "endpoint": mock.url()
                + f"?instance={name}"
                + ("&status=500" if name == failing else "")
            },
        }
        for position, name in enumerate(names)
    ]
    plugins: dict[str, Any] = {
        "ai-proxy-multi": {"instances": instances, "streaming_flush_interval_ms": 0, **fields}
    }
    if key_auth is not None:
        plugins["key-auth"] = dict(key_auth)
    if budget is not None:
        plugins["ai-rate-limiting"] = dict(budget)
    return {"id": route_id, "uri": f"/{route_id}/*", "plugins": plugins}


async def start(
    testcase: TestCase,
    routes: Iterable[Mapping[str, Any]],
    consumers: Iterable[Mapping[str, Any]] = CONSUMERS,
    env: Mapping[str, str] | None = None,
) -> Daemon:
    """
    A daemon serving C{routes} to C{consumers}.
    """
    config = {"consumers": list(consumers), "routes": list(routes)}
    return await start_daemon(testcase, config=config, env=env)


def call(
    daemon: Daemon,
    route_id: str,
    key: str | None = None,
    where: str = "apikey",
    body: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> RawResponse:
    """
    One whole request to C{/<route_id><path>} with C{key} sent in one place:
    a header name, C{bearer}, or C{?name} for a query parameter. Blocking.
    """
    all_headers = dict(headers or {})
    if key is not None:
        if where == "bearer":
            all_headers["Authorization"] = f"Bearer {key}"
        elif where.startswith("?"):
            path += ("&" if "?" in path else "?") + f"{where[1:]}={key}"
        else:
            all_headers[where] = key
    return http_call(daemon.port, path=f"/{route_id}{path}", body=body or CHAT, headers=all_headers)


def maybe_quota(response: RawResponse, name: str) -> tuple[int, int, int] | None:
    """
    The C{X-AI-RateLimit-Limit/Remaining/Reset-<name>} values of an
    answer, or L{None} when it has none of them.
    """
    values = [
        response.headers.get(f"x-ai-ratelimit-{kind}-{name}".lower())
        for kind in ("limit", "remaining", "reset")
    ]
    if all(value is None for value in values):
        return None
    assert all(value is not None for value in values), response.headers
    limit, remaining, reset = (int(value or 0) for value in values)
    return limit, remaining, reset


def quota(response: RawResponse, name: str) -> tuple[int, int, int]:
    """
    The C{X-AI-RateLimit-Limit/Remaining/Reset-<name>} values of an answer.

    @raise AssertionError: it has none.
    """
    found = maybe_quota(response, name)
    assert found is not None, (name, response.status, response.headers)
    return found


def quota_headers(response: RawResponse) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ai-ratelimit-")}


def records_of(daemon: Daemon, route_id: str) -> list[dict[str, Any]]:
    return [r for r in daemon.access_records() if r["route_id"] == route_id]


async def record_count(daemon: Daemon, count: int) -> list[dict[str, Any]]:
    """
    Wait until C{count} records were printed (a request is charged when
    its record is written); all of them.
    """
    return await daemon.wait_for_records(count, timeout=10)


def assert_no_keys(
    testcase: TestCase, daemon: Daemon, mock: MockServer | None, keys: Iterable[str] = KEYS
) -> None:
    """
    No consumer key in any header or query of any request the mock saw, nor
    in anything the daemon printed; the route's own upstream key never
    printed either.
    """
    output = daemon.output
    for key in [*keys, STRANGER_KEY]:
        testcase.assertNotIn(key, output)
    testcase.assertNotIn(ROUTE_API_KEY, output)
    if mock is None:
        return
    for request in mock.requests():
        for key in keys:
            testcase.assertNotIn(key, request["path"], request)
            testcase.assertNotIn(key, json.dumps(request["headers"]), request)


def upstream_headers(request: Mapping[str, Any]) -> dict[str, list[str]]:
    return {name.lower(): values for name, values in request["headers"].items()}


class KeyAuthTests(TestCase):
    """
    C{key-auth}: where the key is looked for, the 401s, the key kept from
    the upstream and the output, the consumer named in the record.
    """

    async def _start(self) -> tuple[MockServer, Daemon]:
        mock = await start_mock(self)
        daemon = await start(
            self,
            [
                route(mock, "keyed", {}),
                route(mock, "custom", {"header": "x-gateway-key", "query": "token"}),
                route(mock, "visible", {"hide_credentials": False}),
                route(mock, "byo", {}, auth={}),
                route(mock, "open"),
            ],
            # alice's key from the environment, as the docs advise.
            [consumer("alice", "${ALICE_KEY}"), *CONSUMERS[1:], consumer("erin", ERIN_KEY)],
            {"ALICE_KEY": ALICE_KEY},
        )
        return mock, daemon

    async def test_key_places(self) -> None:
        """
        The key is found in the C{apikey} header, C{Authorization: Bearer},
        C{x-api-key} and the C{apikey} query parameter, or in the route's
        own C{header} and C{query} names (where C{apikey} then counts for
        nothing); a consumer whose key is C{${ALICE_KEY}} is found by the
        variable's value, a C{key_sha256} consumer by its key; the first
        key found counts. No key: 401 C{Missing API key in request}; a key
        no consumer has: 401 C{Invalid API key in request}; both with
        C{WWW-Authenticate}. Each record names the consumer (null for a
        401 and on a route without C{key-auth}), 401s with their
        C{abort_reason}.
        """
        mock, daemon = await self._start()
        cases: list[tuple[str, str | None, str, str | None]] = [
            # route, key, where, the consumer expected (None: 401)
            ("keyed", ALICE_KEY, "apikey", "alice"),
            ("keyed", ALICE_KEY, "bearer", "alice"),
            ("keyed", ALICE_KEY, "x-api-key", "alice"),
            ("keyed", ALICE_KEY, "?apikey", "alice"),
            ("keyed", BOB_KEY, "apikey", "bob"),
            ("keyed", BOB_KEY, "bearer", "bob"),
            ("keyed", DAVE_KEY, "?apikey", "dave"),
            ("custom", CAROL_KEY, "x-gateway-key", "carol"),
            ("custom", CAROL_KEY, "?token", "carol"),
            ("custom", CAROL_KEY, "bearer", "carol"),
            ("custom", CAROL_KEY, "x-api-key", "carol"),
            ("visible", ALICE_KEY, "apikey", "alice"),
        ]
        for route_id, key, where, _ in cases:
            response = await in_thread(call, daemon, route_id, key, where)
            self.assertEqual(response.status, 200, (route_id, where, response.body))
            self.assertEqual(response.json()["choices"][0]["message"]["content"], TEXT)

        refusals: list[tuple[str, str | None, str, dict[str, str]]] = [
            ("keyed", None, "apikey", MISSING),
            ("keyed", "", "apikey", MISSING),
            ("keyed", STRANGER_KEY, "apikey", INVALID),
            ("keyed", STRANGER_KEY, "bearer", INVALID),
            ("keyed", STRANGER_KEY, "x-api-key", INVALID),
            ("keyed", STRANGER_KEY, "?apikey", INVALID),
            ("keyed", ALICE_KEY.upper(), "apikey", INVALID),
            ("keyed", ALICE_KEY[:-1], "apikey", INVALID),
            # The custom route looks in neither apikey place.
            ("custom", CAROL_KEY, "apikey", MISSING),
            ("custom", CAROL_KEY, "?apikey", MISSING),
            ("custom", STRANGER_KEY, "?token", INVALID),
        ]
        for route_id, key, where, body in refusals:
            response = await in_thread(call, daemon, route_id, key, where)
            self.assertEqual(response.status, 401, (route_id, key, where))
            self.assertEqual(response.json(), body, (route_id, key, where))
            self.assertEqual(response.headers.get("www-authenticate"), CHALLENGE)
            self.assertEqual(quota_headers(response), {})

        # The first key found counts: the apikey header before Bearer,
        # Bearer before x-api-key, x-api-key before the query.
        order = [
            ({"apikey": STRANGER_KEY, "Authorization": f"Bearer {ALICE_KEY}"}, "", 401),
            ({"apikey": ALICE_KEY, "Authorization": f"Bearer {STRANGER_KEY}"}, "", 200),
            ({"Authorization": f"Bearer {BOB_KEY}", "x-api-key": STRANGER_KEY}, "", 200),
            ({"x-api-key": STRANGER_KEY}, f"?apikey={ALICE_KEY}", 401),
            ({"x-api-key": BOB_KEY}, f"?apikey={STRANGER_KEY}", 200),
        ]
        for headers, query, status in order:
            response = await in_thread(
                call, daemon, "keyed", headers=headers, path="/v1/chat/completions" + query
            )
            self.assertEqual(response.status, status, headers)

        response = await in_thread(call, daemon, "open")
        self.assertEqual(response.status, 200)

        total = len(cases) + len(refusals) + len(order) + 1
        records = await record_count(daemon, total)
        self.assertEqual(len(records), total)
        self.assertEqual(
            [(r["route_id"], r["consumer"]) for r in records[: len(cases)]],
            [(route_id, expected) for route_id, _, _, expected in cases],
        )
        self.assertEqual([r["status"] for r in records[: len(cases)]], [200] * len(cases))
        for record, (_, _, _, body) in zip(
            records[len(cases) : len(cases) + len(refusals)], refusals, strict=True
        ):
            self.assertEqual(record["status"], 401)
            self.assertIsNone(record["consumer"])
            reason = "missing_key" if body is MISSING else "invalid_key"
            self.assertEqual(record["abort_reason"], reason)
        self.assertEqual(
            [r["consumer"] for r in records[len(cases) + len(refusals) : -1]],
            [None, "alice", "bob", None, "bob"],
        )
        self.assertEqual((records[-1]["route_id"], records[-1]["consumer"]), ("open", None))
        # A 401 never reaches the upstream.
        self.assertEqual(mock.stats()["requests"], len(cases) + 3 + 1)
        assert_no_keys(self, daemon, mock)

    async def _leaks(
        self,
        mock: MockServer,
        daemon: Daemon,
        route_id: str,
        label: str,
        headers: Mapping[str, str],
        query: str,
    ) -> list[str]:
        """
        Send a chat request and a passthrough request (whose query is
        forwarded) to C{route_id} with alice's key in C{headers} and
        C{query}: both are served with the route's own C{Authorization},
        other headers and parameters forwarded; the places where the key
        reached the upstream.
        """
        leaks = []
        for kind, body, path in [
            ("chat", CHAT, "/v1/chat/completions"),
            ("passthrough", {"ping": True}, "/v1/echo"),
        ]:
            before = mock.stats()["requests"]
            response = await in_thread(
                call,
                daemon,
                route_id,
                body=body,
                headers={**headers, "x-keep": "kept"},
                path=f"{path}?keep=1" + (f"&{query}" if query else ""),
            )
            what = f"{route_id}, key in {label}, {kind} request"
            self.assertEqual(response.status, 200, (what, response.body))
            self.assertEqual(mock.stats()["requests"], before + 1)
            request = mock.requests()[-1]
            sent = upstream_headers(request)
            self.assertEqual(sent["authorization"], [f"Bearer {ROUTE_API_KEY}"], what)
            self.assertEqual(sent["x-keep"], ["kept"], what)
            for name, values in sorted(sent.items()):
                if any(ALICE_KEY in value for value in values):
                    leaks.append(f"{what}: forwarded in header {name}")
            if ALICE_KEY in request["path"]:
                leaks.append(f"{what}: forwarded in the query {request['path']}")
            if kind == "passthrough":
                self.assertIn("keep=1", request["path"], what)
        return leaks

    async def test_key_never_forwarded(self) -> None:
        """
        The key sent in each place a route looks in reaches the upstream
        nowhere: not in a chat request, not in a passthrough request whose
        query is forwarded, also with C{hide_credentials: false}, also on a
        route whose C{header}/C{query} are not the defaults; the route's
        own C{Authorization} is sent, other headers and parameters are
        forwarded untouched. On a route without C{auth} of its own the
        client's other credentials still go upstream, the key does not.
        The key appears nowhere in the daemon's output.
        """
        mock, daemon = await self._start()
        looked_in = {
            "keyed": ["apikey", "bearer", "x-api-key", "?apikey"],
            "visible": ["apikey", "bearer", "x-api-key", "?apikey"],
            "custom": ["x-gateway-key", "bearer", "x-api-key", "?token"],
        }
        leaks = []
        for route_id, names in looked_in.items():
            for name in names:
                headers, query = KEY_PLACES[name]
                leaks += await self._leaks(mock, daemon, route_id, name, headers, query)
        self.assertEqual(leaks, [], "\n".join(leaks))

        # A route without auth: the client's own credential goes upstream,
        # the consumer's key does not.
        byo = [
            {"apikey": ALICE_KEY, "Authorization": f"Bearer {CLIENT_PROVIDER_KEY}"},
            {"Authorization": f"Bearer {ALICE_KEY}", "x-api-key": CLIENT_PROVIDER_KEY},
            {"apikey": ALICE_KEY, "x-api-key": CLIENT_PROVIDER_KEY},
        ]
        for headers in byo:
            response = await in_thread(call, daemon, "byo", headers=headers)
            self.assertEqual(response.status, 200)
        sent = [upstream_headers(r) for r in mock.requests()[-3:]]
        self.assertEqual(sent[0]["authorization"], [f"Bearer {CLIENT_PROVIDER_KEY}"])
        self.assertNotIn("apikey", sent[0])
        self.assertNotIn("authorization", sent[1])
        self.assertEqual(sent[1]["x-api-key"], [CLIENT_PROVIDER_KEY])
        self.assertNotIn("apikey", sent[2])
        self.assertEqual(sent[2]["x-api-key"], [CLIENT_PROVIDER_KEY])
        # Bearer is looked at before x-api-key: the provider key is the
        # one that counts, and it is no consumer's.
        response = await in_thread(
            call,
            daemon,
            "byo",
            headers={"x-api-key": ALICE_KEY, "Authorization": f"Bearer {CLIENT_PROVIDER_KEY}"},
        )
        self.assertEqual((response.status, response.json()), (401, INVALID))
        served = mock.stats()["requests"]
        records = await record_count(daemon, served + 1)
        self.assertEqual([r["consumer"] for r in records], ["alice"] * served + [None])
        assert_no_keys(self, daemon, mock)
        self.assertNotIn(CLIENT_PROVIDER_KEY, daemon.output)

    async def test_encoded_key_in_query_never_forwarded(self) -> None:
        """
        A key sent percent-encoded in the query (as it must be when it
        holds C{+ / =}, and as HTTP clients encode it): the consumer is
        found, and the parameter is not forwarded upstream, in any
        encoding.
        """
        mock, daemon = await self._start()
        sent = [
            ("erin", ERIN_KEY, quote(ERIN_KEY, safe="")),
            ("alice", ALICE_KEY, "%61" + ALICE_KEY[1:]),
            ("alice", ALICE_KEY, quote(ALICE_KEY, safe="").replace("-", "%2D")),
        ]
        leaks = []
        for username, key, encoded in sent:
            for route_id, name in (("keyed", "apikey"), ("custom", "token")):
                response = await in_thread(
                    call,
                    daemon,
                    route_id,
                    body={"ping": True},
                    path=f"/v1/echo?keep=1&{name}={encoded}",
                )
                self.assertEqual(response.status, 200, (route_id, encoded, response.body))
                [record] = (await record_count(daemon, mock.stats()["requests"]))[-1:]
                self.assertEqual(record["consumer"], username)
                forwarded = mock.requests()[-1]["path"]
                self.assertIn("keep=1", forwarded)
                values = [v for _, v in parse_qsl(forwarded.partition("?")[2])]
                if key in values or encoded in forwarded or key in forwarded:
                    leaks.append(f"{route_id}: ?{name}={encoded} forwarded as {forwarded}")
        for _, key, encoded in sent:
            self.assertNotIn(key, daemon.output)
            self.assertNotIn(encoded, daemon.output)
        self.assertEqual(leaks, [], "\n".join(leaks))

    async def test_key_sent_everywhere_never_forwarded(self) -> None:
        """
        The key sent in every place at once (C{apikey}, C{Authorization},
        C{x-api-key}, a custom header, the C{apikey} and C{token} query
        parameters): the route finds it in its own first place, and no
        header or query parameter holding it is forwarded, including those
        the route does not look in (docs/budgets.md: "every header and
        query parameter holding the consumer's key is removed").
        """
        mock, daemon = await self._start()
        everywhere = (
            {k: v for headers, _ in KEY_PLACES.values() for k, v in headers.items()},
            "&".join(query for _, query in KEY_PLACES.values() if query),
        )
        leaks = []
        for route_id in ("keyed", "visible", "custom"):
            leaks += await self._leaks(mock, daemon, route_id, "every place", *everywhere)
        records = await record_count(daemon, 6)
        self.assertEqual({r["consumer"] for r in records}, {"alice"})
        assert_no_keys(self, daemon, None)
        self.assertEqual(leaks, [], "\n".join(leaks))

    async def test_refused_before_body(self) -> None:
        """
        A request without a key, or with a key no consumer has, is refused
        with its 401 before its body is read (docs/budgets.md): a client
        that declared a large body and sent none of it gets the 401 at
        once. Nothing reaches the upstream.
        """
        mock = await start_mock(self)
        daemon = await start(self, [route(mock, "keyed", {})])

        def head_only(headers: Mapping[str, str]) -> tuple[int, Any] | str:
            client = RawHTTPClient(daemon.port, timeout=3)
            try:
                client.send_request(
                    "POST",
                    "/keyed/v1/chat/completions",
                    b"x" * 500_000,
                    {"Content-Type": "application/json", **headers},
                    send_body=False,
                )
                response = client.read_body(client.read_head())
                return response.status, response.json()
            except OSError as e:
                return f"no answer: {e!r}"
            finally:
                client.close()

        self.assertEqual(await in_thread(head_only, {}), (401, MISSING))
        self.assertEqual(await in_thread(head_only, {"apikey": STRANGER_KEY}), (401, INVALID))
        self.assertEqual(mock.stats()["requests"], 0)
        assert_no_keys(self, daemon, mock)

    async def test_sdks(self) -> None:
        """
        The C{openai} SDK with a consumer's key as its C{api_key} (sent as
        C{Authorization: Bearer}), streamed and not, and the C{anthropic}
        SDK (sent as C{x-api-key}) on a C{/v1/messages} route converted to
        the OpenAI-style upstream, streamed and not; with an unknown key
        each SDK raises its C{AuthenticationError} (401), the Anthropic one
        with an Anthropic C{authentication_error} body. The metrics count
        each consumer's tokens, and the 401s by status and reason.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(
            self,
            config={
                "metrics_listen": "tcp:port=0:interface=127.0.0.1",
                "consumers": CONSUMERS,
                "routes": [route(mock, "keyed", {}), route(mock, "claude", {})],
            },
        )
        base = f"http://127.0.0.1:{daemon.port}"

        def run_openai() -> tuple[str, str]:
            client = openai.OpenAI(
                base_url=f"{base}/keyed/v1", api_key=ALICE_KEY, max_retries=0, timeout=20
            )
            completion = client.chat.completions.create(model="gpt-e2e", messages=CHAT["messages"])
            stream = client.chat.completions.create(
                model="gpt-e2e", messages=CHAT["messages"], stream=True
            )
            pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
            return completion.choices[0].message.content or "", "".join(pieces)

        whole, streamed = await in_thread(run_openai)
        self.assertEqual((whole, streamed), (TEXT, TEXT))

        def run_anthropic() -> tuple[str, str]:
            client = anthropic.Anthropic(
                base_url=f"{base}/claude", api_key=BOB_KEY, max_retries=0, timeout=20
            )
            message = client.messages.create(**ANTHROPIC_CHAT)
            with client.messages.stream(**ANTHROPIC_CHAT) as stream:
                text = "".join(stream.text_stream)
            return message.content[0].text, text

        whole, streamed = await in_thread(run_anthropic)
        self.assertEqual((whole, streamed), (TEXT, TEXT))

        def refused_openai() -> Any:
            client = openai.OpenAI(
                base_url=f"{base}/keyed/v1", api_key=STRANGER_KEY, max_retries=0, timeout=20
            )
            try:
                client.chat.completions.create(model="gpt-e2e", messages=CHAT["messages"])
            except openai.AuthenticationError as e:
                return e
            return None

        def refused_anthropic() -> Any:
            client = anthropic.Anthropic(
                base_url=f"{base}/claude", api_key=STRANGER_KEY, max_retries=0, timeout=20
            )
            try:
                client.messages.create(**ANTHROPIC_CHAT)
            except anthropic.AuthenticationError as e:
                return e
            return None

        error = await in_thread(refused_openai)
        self.assertIsNotNone(error)
        self.assertEqual(error.status_code, 401)
        self.assertEqual(error.response.json(), INVALID)
        error = await in_thread(refused_anthropic)
        self.assertIsNotNone(error)
        self.assertEqual(error.status_code, 401)
        self.assertEqual(error.response.headers["www-authenticate"], CHALLENGE)
        body = error.response.json()
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], "authentication_error")
        self.assertEqual(body["error"]["message"], INVALID["message"])

        # Without a key on the converted route: the Anthropic shape too.
        response = await in_thread(call, daemon, "claude", body=ANTHROPIC_CHAT, path="/v1/messages")
        self.assertEqual(response.status, 401)
        self.assertEqual(response.headers["www-authenticate"], CHALLENGE)
        body = response.json()
        self.assertEqual(body["error"]["type"], "authentication_error")
        self.assertEqual(body["error"]["message"], MISSING["message"])

        records = await record_count(daemon, 7)
        self.assertEqual(
            [(r["route_id"], r["consumer"], r["status"]) for r in records],
            [
                ("keyed", "alice", 200),
                ("keyed", "alice", 200),
                ("claude", "bob", 200),
                ("claude", "bob", 200),
                ("keyed", None, 401),
                ("claude", None, 401),
                ("claude", None, 401),
            ],
        )

        # Metrics: the tokens by consumer, the 401s by status and reason.
        samples = await in_thread(scrape, await metrics_port(daemon))

        def total(name: str, **labels: str) -> float:
            return sum(
                value
                for (found, have), value in samples.items()
                if found == name and set(labels.items()) <= have
            )

        for name in ("alice", "bob"):
            for kind, tokens in (("prompt", 20), ("completion", 10)):
                self.assertEqual(
                    total("aiproxy_consumer_tokens_total", consumer=name, type=kind),
                    tokens,
                    (name, kind),
                )
        self.assertEqual(total("aiproxy_requests_total", status="401"), 3)
        self.assertEqual(total("aiproxy_requests_total", status="401", route="claude"), 2)
        self.assertEqual(total("aiproxy_aborts_total", reason="invalid_key"), 2)
        self.assertEqual(total("aiproxy_aborts_total", reason="missing_key"), 1)
        assert_no_keys(self, daemon, mock)

    async def test_chash_on_consumer(self) -> None:
        """
        C{ai-proxy-multi} with C{chash} on C{consumer}: every request of one
        consumer goes to one instance, whatever the client's address or
        headers; the consumers are spread over both instances.
        """
        mock = await start_mock(self)
        daemon = await start(
            self,
            [
                multi_route(
                    mock,
                    "hashed",
                    ["a", "b"],
                    {},
                    same_priority=True,
                    balancer={"algorithm": "chash", "hash_on": "consumer"},
                )
            ],
            [consumer(f"user{n}", f"ak-user{n}-e2e-0123456789ab") for n in range(8)],
        )
        sent = []
        for _ in range(4):
            for n in range(8):
                response = await in_thread(
                    call, daemon, "hashed", f"ak-user{n}-e2e-0123456789ab", "bearer"
                )
                self.assertEqual(response.status, 200)
                sent.append(f"user{n}")
        records = await record_count(daemon, len(sent))
        served: dict[str, set[str]] = {}
        for record in records:
            served.setdefault(record["consumer"], set()).add(record["instance"])
        self.assertEqual(sorted(served), sorted(set(sent)))
        for name, instances in served.items():
            self.assertEqual(len(instances), 1, (name, instances))
        self.assertEqual(set().union(*served.values()), {"a", "b"})
        keys = [f"ak-user{n}-e2e-0123456789ab" for n in range(8)]
        assert_no_keys(self, daemon, mock, keys)


class BudgetTests(TestCase):
    """
    C{ai-rate-limiting} with C{policy: local}: refusals once spent, quota
    headers, windows, strategies, rules, consumers' own budgets and
    per-instance quotas.
    """

    async def test_refused_after_spending(self) -> None:
        """
        With 30 tokens per window and 15 per request (10 prompt + 5
        completion): the quota headers show the limit, the remaining tokens
        (30, then 15) and the seconds to the window's end; the third
        request is refused with 503 C{{"error_msg": "rate limit
        exceeded"}}, remaining 0, and an C{abort_reason} of
        C{rate_limited}; a refused request is not sent upstream and costs
        nothing. A custom C{rejected_code}/C{rejected_msg} is used; with
        C{show_limit_quota_header: false} no quota header is sent, neither
        on a 200 nor on the refusal.
        """
        mock = await start_mock(self)
        window = 86400
        daemon = await start(
            self,
            [
                route(mock, "total", {}, {"limit": 30, "time_window": window}),
                route(
                    mock,
                    "custom",
                    {},
                    {
                        "limit": 1,
                        "time_window": window,
                        "rejected_code": 429,
                        "rejected_msg": "token budget spent, come back tomorrow",
                    },
                ),
                route(
                    mock,
                    "quiet",
                    None,
                    {"limit": 1, "time_window": window, "show_limit_quota_header": False},
                ),
            ],
        )
        name = "ai-proxy-openai"
        statuses = []
        for count in range(1, 5):
            response = await in_thread(call, daemon, "total", ALICE_KEY)
            statuses.append(response.status)
            limit, remaining, reset = quota(response, name)
            self.assertEqual(limit, 30)
            self.assertEqual(remaining, max(0, 30 - 15 * (count - 1)))
            self.assertLessEqual(reset, window)
            self.assertGreater(reset, 0)
            if response.status != 200:
                self.assertEqual(response.json(), RATE_LIMITED)
                self.assertEqual(response.headers["content-type"], "application/json")
            await record_count(daemon, count)
        self.assertEqual(statuses, [200, 200, 503, 503])
        self.assertEqual(mock.stats()["requests"], 2)

        # Other consumers share the route's budget.
        response = await in_thread(call, daemon, "total", BOB_KEY, "bearer")
        self.assertEqual(response.status, 503)

        first = await in_thread(call, daemon, "custom", ALICE_KEY)
        self.assertEqual(first.status, 200)
        self.assertEqual(quota(first, name)[:2], (1, 1))
        await record_count(daemon, 6)
        second = await in_thread(call, daemon, "custom", ALICE_KEY)
        self.assertEqual(second.status, 429)
        self.assertEqual(second.json(), {"error_msg": "token budget spent, come back tomorrow"})
        self.assertEqual(quota(second, name)[:2], (1, 0))

        first = await in_thread(call, daemon, "quiet")
        self.assertEqual(first.status, 200)
        self.assertEqual(quota_headers(first), {})
        await record_count(daemon, 8)
        second = await in_thread(call, daemon, "quiet")
        self.assertEqual(second.status, 503)
        self.assertEqual(second.json(), RATE_LIMITED)
        self.assertEqual(quota_headers(second), {})

        records = await record_count(daemon, 9)
        self.assertEqual(
            [(r["route_id"], r["status"], r["abort_reason"]) for r in records],
            [
                ("total", 200, None),
                ("total", 200, None),
                ("total", 503, "rate_limited"),
                ("total", 503, "rate_limited"),
                ("total", 503, "rate_limited"),
                ("custom", 200, None),
                ("custom", 429, "rate_limited"),
                ("quiet", 200, None),
                ("quiet", 503, "rate_limited"),
            ],
        )
        self.assertEqual(records[0]["consumer"], "alice")
        self.assertEqual(records[4]["consumer"], "bob")
        self.assertEqual(mock.stats()["requests"], 4)
        assert_no_keys(self, daemon, mock)

    async def test_window_reset(self) -> None:
        """
        With a 3 s window: spent in one window, refused in it, served
        again in the next one (windows aligned on the epoch); the reset
        header counts the seconds left in the window.
        """
        mock = await start_mock(self)
        window = 3
        daemon = await start(self, [route(mock, "short", {}, {"limit": 10, "time_window": window})])
        # Start just after a window boundary, so that two requests fit in it.
        await sleep(window - time.time() % window + 0.05)
        first = await in_thread(call, daemon, "short", ALICE_KEY)
        self.assertEqual(first.status, 200)
        await record_count(daemon, 1)
        second = await in_thread(call, daemon, "short", ALICE_KEY)
        ended = time.time()
        self.assertEqual(second.status, 503, "the window turned during the test")
        limit, remaining, reset = quota(second, "ai-proxy-openai")
        self.assertEqual((limit, remaining), (10, 0))
        self.assertTrue(1 <= reset <= window, reset)
        # Into the next window.
        await sleep(window - ended % window + 0.05)
        third = await in_thread(call, daemon, "short", ALICE_KEY)
        self.assertEqual(third.status, 200)
        self.assertEqual(quota(third, "ai-proxy-openai")[:2], (10, 10))
        records = await record_count(daemon, 3)
        self.assertEqual([r["status"] for r in records], [200, 503, 200])
        assert_no_keys(self, daemon, mock)

    async def test_strategies(self) -> None:
        """
        C{prompt_tokens} counts only the prompt, C{completion_tokens} only
        the completion, and C{expression} its C{cost_expr} over the
        upstream's raw usage fields: OpenAI's (C{prompt_tokens +
        2 * completion_tokens}) and, on an Anthropic Messages upstream,
        Anthropic's (C{input_tokens + cache_creation_input_tokens +
        3 * output_tokens}, the missing cache field counting 0), streamed
        or not. The remaining header goes down by each request's cost.
        """
        mock = await start_mock(self)
        big = {"time_window": 86400, "limit": 1000}
        daemon = await start(
            self,
            [
                route(mock, "prompt", {}, {**big, "limit_strategy": "prompt_tokens"}),
                route(mock, "completion", {}, {**big, "limit_strategy": "completion_tokens"}),
                route(
                    mock,
                    "expr",
                    {},
                    {
                        **big,
                        "limit_strategy": "expression",
                        "cost_expr": "prompt_tokens + 2 * completion_tokens",
                    },
                ),
                anthropic_route(
                    mock,
                    "claude",
                    {},
                    {
                        **big,
                        "limit_strategy": "expression",
                        "cost_expr": "input_tokens + cache_creation_input_tokens"
                        " + 3 * output_tokens",
                    },
                ),
            ],
        )
        count = 0

        async def remaining_after(
            route_id: str,
            prompt: int,
            events: int,
            body: Mapping[str, Any] = CHAT,
            path: str = "/v1/chat/completions",
        ) -> int:
            nonlocal count
            headers = {"x-mock-prompt-tokens": str(prompt), "x-mock-events": str(events)}
            response = await in_thread(
                call, daemon, route_id, ALICE_KEY, body=body, headers=headers, path=path
            )
            self.assertEqual(response.status, 200, response.body)
            count += 1
            await record_count(daemon, count)
            name = "ai-proxy-anthropic" if route_id == "claude" else "ai-proxy-openai"
            return quota(response, name)[1]

        # The headers show what was left when the request was admitted.
        self.assertEqual(await remaining_after("prompt", 7, 20), 1000)
        self.assertEqual(await remaining_after("prompt", 11, 3), 993)
        self.assertEqual(await remaining_after("prompt", 1, 1), 982)

        self.assertEqual(await remaining_after("completion", 100, 6), 1000)
        self.assertEqual(await remaining_after("completion", 200, 9), 994)
        self.assertEqual(await remaining_after("completion", 1, 1), 985)

        self.assertEqual(await remaining_after("expr", 10, 5), 1000)
        self.assertEqual(await remaining_after("expr", 4, 2, CHAT_STREAM), 980)
        self.assertEqual(await remaining_after("expr", 1, 1), 972)

        messages = "/v1/messages"
        self.assertEqual(await remaining_after("claude", 10, 5, ANTHROPIC_CHAT, messages), 1000)
        stream = {**ANTHROPIC_CHAT, "stream": True}
        self.assertEqual(await remaining_after("claude", 20, 2, stream, messages), 975)
        self.assertEqual(await remaining_after("claude", 1, 1, ANTHROPIC_CHAT, messages), 949)
        assert_no_keys(self, daemon, mock)

    async def test_cost_overflow(self) -> None:
        """
        A C{cost_expr} whose value overflows to infinity for a request
        (C{prompt_tokens * 1e308 * 10}) does not break the request's end:
        no unhandled error is logged, the request spends the budget (the
        next one is refused), and the requests count as ended (a
        C{SIGTERM} finds none in flight and exits at once).
        """
        mock = await start_mock(self)
        budget = {
            "limit": 100,
            "time_window": 86400,
            "limit_strategy": "expression",
            "cost_expr": "prompt_tokens * 1e308 * 10",
        }
        daemon = await start_daemon(
            self,
            config={
                "shutdown_grace_s": 5,
                "consumers": CONSUMERS,
                "routes": [route(mock, "huge", {}, budget)],
            },
        )
        first = await in_thread(call, daemon, "huge", ALICE_KEY)
        self.assertEqual(first.status, 200)
        await record_count(daemon, 1)
        second = await in_thread(call, daemon, "huge", ALICE_KEY)
        self.assertEqual((second.status, second.json()), (503, RATE_LIMITED))
        await record_count(daemon, 2)
        started = time.monotonic()
        daemon.signal("TERM")
        code = await daemon.wait_exit(15)
        self.assertEqual(code, 0)
        self.assertNotIn("Unhandled error", daemon.output)
        self.assertNotIn("#critical]", daemon.output)
        self.assertNotIn("shutdown_grace_s", daemon.output)
        self.assertLess(time.monotonic() - started, 3)
        assert_no_keys(self, daemon, mock)

    async def test_rules_and_consumer_budgets(self) -> None:
        """
        Rules keyed by C{$consumer_name} count each consumer apart (named by
        C{header_prefix}); rules keyed by C{$http_x_team} count each team
        apart (named by the rule's position), and both rules of a route
        apply; a consumer's own C{ai-rate-limiting} (header name
        C{consumer}) caps it on every C{key-auth} route, whatever the
        route's own budget says.
        """
        mock = await start_mock(self)
        consumers = [
            consumer("alice", ALICE_KEY),
            consumer("bob", BOB_KEY, hashed=True),
            consumer("carol", CAROL_KEY, budget={"limit": 20, "time_window": 86400}),
        ]
        daemon = await start(
            self,
            [
                route(
                    mock,
                    "per-consumer",
                    {},
                    {
                        "rules": [
                            {
                                "count": 20,
                                "time_window": 86400,
                                "key": "$consumer_name",
                                "header_prefix": "mine",
                            }
                        ]
                    },
                ),
                route(
                    mock,
                    "per-team",
                    None,
                    {
                        "rules": [
                            {"count": 1000, "time_window": 86400, "key": "all"},
                            {"count": 20, "time_window": 86400, "key": "team-$http_x_team"},
                        ]
                    },
                ),
                route(mock, "carol-a", {}),
                route(mock, "carol-b", {}, {"limit": 1000, "time_window": 86400}),
            ],
            consumers,
        )
        count = 0

        async def send(route_id: str, key: str | None, **headers: str) -> RawResponse:
            nonlocal count
            response = await in_thread(call, daemon, route_id, key, headers=headers)
            count += 1
            await record_count(daemon, count)
            return response

        # alice: 15, then 15 more (over 20, admitted at 5 left), then refused.
        statuses = []
        for _ in range(3):
            response = await send("per-consumer", ALICE_KEY)
            statuses.append((response.status, quota(response, "mine")))
        self.assertEqual([s for s, _ in statuses], [200, 200, 503])
        self.assertEqual([q[1] for _, q in statuses], [20, 5, 0])
        # bob has his own counter.
        response = await send("per-consumer", BOB_KEY)
        self.assertEqual((response.status, quota(response, "mine")[1]), (200, 20))

        teams = []
        for team in ("red", "red", "red", "blue", "blue", "blue"):
            response = await send("per-team", None, **{"x-team": team})
            teams.append((team, response.status, quota(response, "2")[1]))
            self.assertEqual(quota(response, "1")[0], 1000)
        self.assertEqual(
            teams,
            [
                ("red", 200, 20),
                ("red", 200, 5),
                ("red", 503, 0),
                ("blue", 200, 20),
                ("blue", 200, 5),
                ("blue", 503, 0),
            ],
        )
        # The route-wide rule counted all four served requests.
        response = await send("per-team", None, **{"x-team": "green"})
        self.assertEqual(response.status, 200)
        self.assertEqual(quota(response, "1")[1], 1000 - 4 * 15)

        # carol's own budget: 20 tokens, spent across two routes.
        response = await send("carol-a", CAROL_KEY)
        self.assertEqual((response.status, quota(response, "consumer")[:2]), (200, (20, 20)))
        response = await send("carol-b", CAROL_KEY)
        self.assertEqual(response.status, 200)
        self.assertEqual(quota(response, "consumer")[1], 5)
        self.assertEqual(quota(response, "ai-proxy-openai")[1], 1000)
        for route_id in ("carol-a", "carol-b"):
            response = await send(route_id, CAROL_KEY)
            self.assertEqual(response.status, 503, route_id)
            self.assertEqual(response.json(), RATE_LIMITED)
            self.assertEqual(quota(response, "consumer")[1], 0)
        # alice, without a budget of her own, is not limited by carol's.
        response = await send("carol-a", ALICE_KEY)
        self.assertEqual(response.status, 200)
        self.assertIsNone(maybe_quota(response, "consumer"))
        assert_no_keys(self, daemon, mock)

    async def test_instance_quotas(self) -> None:
        """
        Per-instance quotas on C{ai-proxy-multi}: with the default
        C{fallback_strategy} (and with C{rate_limiting}) the preferred
        instance serves until its quota is spent, then the other one does;
        once both are spent, the request is refused with C{rejected_code}
        and never sent upstream. Without C{rate_limiting} in the fallback
        strategy, a request whose picked instance is spent is refused
        although the other has quota left. A fallback after a 5xx skips a
        spent instance too. The headers name the serving instance.
        """
        mock = await start_mock(self)
        quotas = {
            "instances": [
                {"name": "a", "limit": 15, "time_window": 86400},
                {"name": "b", "limit": 30, "time_window": 86400},
            ]
        }
        daemon = await start(
            self,
            [
                multi_route(mock, "default", ["a", "b"], {}, quotas),
                multi_route(
                    mock, "listed", ["a", "b"], {}, quotas, fallback_strategy=["rate_limiting"]
                ),
                multi_route(
                    mock,
                    "failing",
                    ["a", "b", "c"],
                    {},
                    {
                        "instances": [
                            {"name": "b", "limit": 15, "time_window": 86400},
                            {"name": "c", "limit": 1000, "time_window": 86400},
                        ]
                    },
                    fallback_strategy=["http_5xx", "rate_limiting"],
                    failing="a",
                ),
                multi_route(
                    mock,
                    "strict",
                    ["a", "b"],
                    {},
                    {**quotas, "rejected_code": 429},
                    fallback_strategy=["http_5xx"],
                ),
            ],
        )
        count = 0

        async def send(route_id: str) -> tuple[int, str | None, Any, Any]:
            nonlocal count
            response = await in_thread(call, daemon, route_id, ALICE_KEY)
            count += 1
            records = await record_count(daemon, count)
            return (
                response.status,
                records[-1]["instance"] if response.status == 200 else None,
                maybe_quota(response, "a"),
                maybe_quota(response, "b"),
            )

        for route_id in ("default", "listed"):
            before = mock.stats()["requests"]
            results = [await send(route_id) for _ in range(5)]
            self.assertEqual(
                [(status, served) for status, served, _, _ in results],
                [(200, "a"), (200, "b"), (200, "b"), (503, None), (503, None)],
                route_id,
            )
            # Each answer carries the serving instance's quota only.
            self.assertEqual(results[0][2][:2], (15, 15))
            self.assertIsNone(results[0][3])
            self.assertIsNone(results[1][2])
            self.assertEqual(results[1][3][:2], (30, 30))
            self.assertEqual(results[2][3][:2], (30, 15))
            self.assertEqual(mock.stats()["requests"] - before, 3)
        paths = [r["path"].rpartition("instance=")[2] for r in mock.requests()]
        self.assertEqual(paths, ["a", "b", "b", "a", "b", "b"])

        # a always fails (500): its fallback skips b once b is spent.
        attempts = []
        for _ in range(3):
            status, _, _, _ = await send("failing")
            self.assertEqual(status, 200)
            attempts.append(
                [(t["instance"], t["status"]) for t in daemon.access_records()[-1]["attempts"]]
            )
        self.assertEqual(
            attempts,
            [[("a", 500), ("b", 200)], [("a", 500), ("c", 200)], [("a", 500), ("c", 200)]],
        )

        status, served, a, _ = await send("strict")
        self.assertEqual((status, served, a[:2]), (200, "a", (15, 15)))
        status, served, a, b = await send("strict")
        self.assertEqual((status, served), (429, None))
        self.assertEqual(a[:2], (15, 0))
        self.assertEqual(daemon.access_records()[-1]["abort_reason"], "rate_limited")
        assert_no_keys(self, daemon, mock)


class CutStreamTests(TestCase):
    """
    A stream cut short is charged the tokens counted before the cut.
    """

    async def test_charged_when_cut(self) -> None:
        """
        An Anthropic stream reports its input tokens at its start: cut by
        the upstream after two content events, it is charged them (the
        record has C{abort_reason}); a client leaving an endless stream
        after a few chunks is charged them too; the next request's
        remaining header shows both charges. An OpenAI-style stream cut
        before its usage chunk is charged nothing.
        """
        mock = await start_mock(self)
        budget = {"limit": 1000, "time_window": 86400}
        daemon = await start(
            self,
            [anthropic_route(mock, "claude", {}, budget), route(mock, "gpt", {}, budget)],
        )
        stream = {**ANTHROPIC_CHAT, "stream": True}
        name = "ai-proxy-anthropic"

        response = await in_thread(
            call,
            daemon,
            "claude",
            ALICE_KEY,
            body=stream,
            path="/v1/messages",
            headers={"x-mock-truncate": "1", "x-mock-events": "2", "x-mock-prompt-tokens": "40"},
        )
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete and b"message_stop" in response.body)
        [cut] = await record_count(daemon, 1)
        self.assertIsNotNone(cut["abort_reason"])
        self.assertEqual(cut["prompt_tokens"], 40)

        def leave_early() -> RawResponse:
            client = RawHTTPClient(daemon.port, timeout=10)
            try:
                client.send_request(
                    "POST",
                    "/claude/v1/messages",
                    stream,
                    {
                        "x-api-key": ALICE_KEY,
                        "x-mock-endless": "1",
                        "x-mock-delay-ms": "50",
                        "x-mock-prompt-tokens": "70",
                    },
                )
                head = client.read_head()
                return client.read_body(head, max_chunks=4)
            finally:
                client.close()

        left = await in_thread(leave_early)
        self.assertEqual(left.status, 200)
        self.assertEqual(quota(left, name)[1], 960)
        records = await record_count(daemon, 2)
        self.assertEqual(records[-1]["abort_reason"], "client_disconnect")
        self.assertEqual(records[-1]["prompt_tokens"], 70)

        response = await in_thread(
            call, daemon, "claude", ALICE_KEY, body=ANTHROPIC_CHAT, path="/v1/messages"
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(quota(response, name)[1], 1000 - 40 - 70)

        # OpenAI-style: the usage comes last, so a cut stream counted none.
        response = await in_thread(
            call,
            daemon,
            "gpt",
            ALICE_KEY,
            body=CHAT_STREAM,
            headers={"x-mock-truncate": "1", "x-mock-events": "2"},
        )
        self.assertEqual(response.status, 200)
        await record_count(daemon, 4)
        response = await in_thread(call, daemon, "gpt", ALICE_KEY)
        self.assertEqual(quota(response, "ai-proxy-openai")[1], 1000)
        assert_no_keys(self, daemon, mock)


class ConfigErrorTests(TestCase):
    """
    Bad consumers and budgets are refused at start-up, naming the places
    and never printing a key.
    """

    def _config(self, name: str, document: Mapping[str, Any]) -> str:
        return str(write_config(self.mktemp(), document, name).resolve())

    async def _check(self, document: Mapping[str, Any], *args: str) -> str:
        """
        C{aiproxy-check} on C{document}: it exits 1; its output.
        """
        path = self._config("check.yaml", document)
        code, output = await run_command(self, [sys.executable, "-m", "aiproxy.check", *args, path])
        self.assertEqual(code, 1, output)
        return output

    async def _refused_daemon(self, path: str) -> Daemon:
        """
        C{twistd aiproxy} with the config at C{path}: it exits non-zero
        without listening.
        """
        daemon = Daemon(Path(path), ["--listen", "tcp:port=0:interface=127.0.0.1"])
        self.addCleanup(lambda: Deferred.fromCoroutine(daemon.stop()))
        daemon.spawn()
        code = await daemon.wait_exit(15)
        self.assertNotEqual(code, 0, daemon.output)
        self.assertIsNone(daemon.listening_port)
        return daemon

    def _routes(self) -> list[dict[str, Any]]:
        return [
            proxy_route(
                endpoint="http://127.0.0.1:1/v1/chat/completions",
                plugins={"key-auth": {}},
            )
        ]

    async def test_consumer_errors(self) -> None:
        """
        Two consumers with one key (also as a key and a digest of it), a
        key shorter than 16 characters, and two consumers with one username
        are refused, naming both places; no key is printed.
        """
        short = "ak-short-9"
        output = await self._check(
            {
                "consumers": [
                    consumer("alice", ALICE_KEY),
                    consumer("bob", ALICE_KEY),
                    consumer("carol", ALICE_KEY, hashed=True),
                    consumer("dave", short),
                    consumer("alice", BOB_KEY),
                ],
                "routes": self._routes(),
            }
        )
        lines = output.splitlines()
        self.assertTrue(
            any(
                "consumers[1].plugins.key-auth" in line and "consumers[0]" in line for line in lines
            ),
            output,
        )
        self.assertTrue(
            any(
                "consumers[2].plugins.key-auth" in line and "consumers[0]" in line for line in lines
            ),
            output,
        )
        self.assertTrue(
            any(
                line.startswith("consumers[3].plugins.key-auth.key:") and "16" in line
                for line in lines
            ),
            output,
        )
        self.assertTrue(
            any(
                line.startswith("consumers[4].username:")
                and "alice" in line
                and "consumers[0]" in line
                for line in lines
            ),
            output,
        )
        for key in (ALICE_KEY, BOB_KEY, short, sha256(ALICE_KEY)):
            self.assertNotIn(key, output)

        # twistd refuses the same config, the same way.
        path = self._config(
            "daemon.yaml",
            {
                "consumers": [consumer("alice", ALICE_KEY), consumer("bob", ALICE_KEY)],
                "routes": self._routes(),
            },
        )
        daemon = await self._refused_daemon(path)
        self.assertTrue(
            any("consumers[1].plugins.key-auth" in line for line in daemon.lines), daemon.output
        )
        self.assertNotIn(ALICE_KEY, daemon.output)

    async def test_malformed_keys_never_printed(self) -> None:
        """
        A consumer's key put where its digest goes (C{key_sha256:
        ${ALICE_KEY}}, an easy slip), or a key that is not a string, is
        refused naming its place, without printing the value: neither by
        C{aiproxy-check}, nor by the daemon refusing to start.
        """
        numeric = 918273645546372819
        document = {
            "consumers": [
                {"username": "alice", "plugins": {"key-auth": {"key_sha256": ALICE_KEY}}},
                {"username": "bob", "plugins": {"key-auth": {"key": numeric}}},
            ],
            "routes": self._routes(),
        }
        output = await self._check(document)
        lines = output.splitlines()
        for place in (
            "consumers[0].plugins.key-auth.key_sha256: ",
            "consumers[1].plugins.key-auth.key: ",
        ):
            self.assertTrue(any(line.startswith(place) for line in lines), (place, output))
        daemon = await self._refused_daemon(self._config("daemon.yaml", document))
        leaked = [
            where
            for where, text in (("aiproxy-check", output), ("twistd", daemon.output))
            for secret in (ALICE_KEY, str(numeric))
            if secret in text
        ]
        self.assertEqual(leaked, [], output)

    async def test_budget_errors(self) -> None:
        """
        A C{cost_expr} that is not arithmetic over usage fields refuses
        the config at C{routes[0].plugins.ai-rate-limiting.cost_expr}
        (C{aiproxy-check} and the daemon's exit alike); an C{instances}
        entry naming an instance the route does not have is refused at its
        C{name}; C{workers: 2} with C{policy: local} is refused, pointing
        to C{policy: redis}.
        """
        expressions = [
            "__import__('os').system('true')",
            "prompt_tokens ** 2",
            "prompt_tokens +",
            "len(prompt_tokens)",
            "usage.prompt_tokens",
            "prompt_tokens % 7",
            "prompt_tokens and completion_tokens",
            "prompt_tokens if completion_tokens else 1",
            "'text'",
            "prompt_tokens; completion_tokens",
            "[prompt_tokens]",
            "lambda: 1",
            "1 +" * 400 + "1",
        ]
        routes = []
        for index, expression in enumerate(expressions):
            [document] = self._routes()
            document["id"] = f"r{index}"
            document["uri"] = f"/r{index}/*"
            document["plugins"]["ai-rate-limiting"] = {
                "limit": 100,
                "time_window": 60,
                "limit_strategy": "expression",
                "cost_expr": expression,
            }
            routes.append(document)
        output = await self._check({"consumers": CONSUMERS[:1], "routes": routes})
        lines = output.splitlines()
        for index, expression in enumerate(expressions):
            where = f"routes[{index}].plugins.ai-rate-limiting.cost_expr: "
            self.assertTrue(any(line.startswith(where) for line in lines), (expression, output))

        # An empty one is refused by the schema, at the same place.
        routes[0]["plugins"]["ai-rate-limiting"]["cost_expr"] = ""
        output = await self._check({"consumers": CONSUMERS[:1], "routes": routes[:1]})
        self.assertIn("routes[0].plugins.ai-rate-limiting.cost_expr: ", output)

        path = self._config("daemon.yaml", {"consumers": CONSUMERS[:1], "routes": routes[1:2]})
        daemon = await self._refused_daemon(path)
        self.assertTrue(
            any(
                line.startswith("routes[0].plugins.ai-rate-limiting.cost_expr: ")
                for line in daemon.lines
            ),
            daemon.output,
        )

        multi = {
            "id": "multi",
            "uri": "/multi/*",
            "plugins": {
                "ai-proxy-multi": {
                    "instances": [
                        {
                            "name": "a",
                            "provider": "openai",
                            "weight": 1,
                            "auth": {"header": {"Authorization": "Bearer x"}},
                        }
                    ]
                },
                "ai-rate-limiting": {
                    "instances": [
                        {"name": "a", "limit": 10, "time_window": 60},
                        {"name": "zzz", "limit": 10, "time_window": 60},
                    ]
                },
            },
        }
        output = await self._check({"routes": [multi]})
        self.assertIn(
            "routes[0].plugins.ai-rate-limiting.instances[1].name: no instance named 'zzz'",
            output.splitlines(),
        )

        routes = self._routes()
        routes[0]["plugins"]["ai-rate-limiting"] = {"limit": 100, "time_window": 60}
        consumers = [consumer("alice", ALICE_KEY, budget={"limit": 10, "time_window": 60})]
        workers = {"workers": 2, "consumers": consumers, "routes": routes}
        output = await self._check(workers)
        for place in ("routes[0]", "consumers[0]"):
            [line] = [
                line
                for line in output.splitlines()
                if line.startswith(f"{place}.plugins.ai-rate-limiting.policy: ")
            ]
            self.assertIn("policy redis", line)
        daemon = await self._refused_daemon(self._config("workers.yaml", workers))
        self.assertTrue(
            any(
                line.startswith("routes[0].plugins.ai-rate-limiting.policy: ")
                and "policy redis" in line
                for line in daemon.lines
            ),
            daemon.output,
        )
        routes[0]["plugins"]["ai-rate-limiting"]["policy"] = "local"
        output = await self._check({"consumers": CONSUMERS[:1], "routes": routes}, "--workers", "2")
        self.assertIn("routes[0].plugins.ai-rate-limiting.policy", output)
        self.assertIn("policy redis", output)


class KeyRotationTests(TestCase):
    """
    C{SIGHUP} with a consumer's key changed in the file.
    """

    async def test_rotate_key(self) -> None:
        """
        A stream started with alice's old key; alice's key rotated in the
        file and the daemon reloaded: the old key gets 401, the new one is
        served (as alice, the same budget counters as before: a reload does
        not reset them), and the stream in flight finishes whole and is
        charged.
        """
        old_key, new_key = ALICE_KEY, "ak-alice-e2e-rotated-Qm3Wn8Rt"
        mock = await start_mock(self)
        budget = {"limit": 1000, "time_window": 86400}

        def config(key: str) -> dict[str, Any]:
            return {
                "consumers": [consumer("alice", key), consumer("bob", BOB_KEY, hashed=True)],
                "routes": [route(mock, "keyed", {}, budget)],
            }

        daemon = await start_daemon(self, config=config(old_key))
        response = await in_thread(call, daemon, "keyed", old_key)
        self.assertEqual(response.status, 200)
        await record_count(daemon, 1)

        client = RawHTTPClient(daemon.port, timeout=20)
        self.addCleanup(client.close)

        def open_stream() -> RawResponse:
            client.send_request(
                "POST",
                "/keyed/v1/chat/completions",
                CHAT_STREAM,
                {
                    "Authorization": f"Bearer {old_key}",
                    "x-mock-events": "40",
                    "x-mock-delay-ms": "50",
                },
            )
            head = client.read_head()
            return client.read_body(head, max_chunks=1)

        live = await in_thread(open_stream)
        self.assertEqual(live.status, 200)
        self.assertEqual(quota(live, "ai-proxy-openai")[1], 985)

        write_config(daemon.config.parent, config(new_key))
        daemon.signal("HUP")
        await daemon.wait_for_line("reloaded", timeout=10)
        self.assertFalse(live.complete)

        refused = await in_thread(call, daemon, "keyed", old_key, "bearer")
        self.assertEqual(refused.status, 401)
        self.assertEqual(refused.json(), INVALID)
        served = await in_thread(call, daemon, "keyed", new_key, "bearer")
        self.assertEqual(served.status, 200)
        # The counters outlived the reload (the stream is not charged yet).
        self.assertEqual(quota(served, "ai-proxy-openai")[1], 985)

        finished = await in_thread(client.read_body, live)
        self.assertTrue(finished.complete)
        events = data_events(finished.body)
        self.assertEqual(events[-1], b"[DONE]")
        contents = [
            choice["delta"].get("content")
            for event in events[:-1]
            for choice in json.loads(event)["choices"]
        ]
        self.assertEqual("".join(c or "" for c in contents), "".join(f"tok{i} " for i in range(40)))

        records = await record_count(daemon, 4)
        by_status = [(r["consumer"], r["status"], r["abort_reason"]) for r in records]
        self.assertEqual(
            sorted(by_status, key=str),
            sorted(
                [
                    ("alice", 200, None),
                    ("alice", 200, None),
                    ("alice", 200, None),
                    (None, 401, "invalid_key"),
                ],
                key=str,
            ),
        )
        stream_record = next(r for r in records if r["completion_tokens"] == 40)
        self.assertEqual(stream_record["abort_reason"], None)
        after = await in_thread(call, daemon, "keyed", new_key)
        self.assertEqual(quota(after, "ai-proxy-openai")[1], 1000 - 15 - 15 - 50)
        assert_no_keys(self, daemon, mock, [*KEYS, new_key])
