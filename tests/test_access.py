"""
Tests for L{aiproxy.access}: consumers' keys and the C{key-auth} lookup.
"""

from __future__ import annotations

import hashlib
import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from aiproxy.access.consumers import Consumer, ConsumerTable, consumer_problems, key_digest
from aiproxy.access.keyauth import (
    INVALID_KEY,
    MISSING_KEY,
    KeyAuth,
    KeyRefused,
    SentKey,
    without_parameters,
)
from aiproxy.config import ConfigError, parse_config
from aiproxy.routing.balancer import request_hash_key, request_variable

ALICE = "alice-key-0123456789"
BOB = "bob-key-0123456789ab"


def consumer(name: str, key_auth: dict) -> dict:
    return {"username": name, "plugins": {"key-auth": key_auth}}


def table() -> ConsumerTable:
    return ConsumerTable(
        [(key_digest(ALICE), Consumer("alice")), (key_digest(BOB), Consumer("bob"))]
    )


def request(uri: bytes = b"/v1/chat/completions", **headers: str) -> DummyRequest:
    r = DummyRequest([b""])
    r.uri = uri
    for name, value in headers.items():
        r.requestHeaders.addRawHeader(name.replace("_", "-").encode(), value.encode())
    return r


def key_auth(header: str = "apikey", query: str = "apikey") -> KeyAuth:
    return KeyAuth({"header": header, "query": query, "hide_credentials": False}, table())


class ConsumerTableTests(SynchronousTestCase):
    def test_find_by_key(self) -> None:
        self.assertEqual(table().find(ALICE), Consumer("alice"))
        self.assertEqual(table().find(BOB.encode()), Consumer("bob"))
        self.assertIsNone(table().find("nobody-0123456789abc"))

    def test_digest_configured(self) -> None:
        """
        A consumer given by C{key_sha256} is found by its key.
        """
        config = parse_config(
            json.dumps(
                {
                    "consumers": [
                        consumer("carol", {"key_sha256": hashlib.sha256(b"c" * 20).hexdigest()})
                    ]
                }
            ),
            environ={},
        )
        found = ConsumerTable.build(config.consumers).find("c" * 20)
        assert found is not None
        self.assertEqual(found.username, "carol")


class ConsumerProblemsTests(SynchronousTestCase):
    def problems(self, consumers: list) -> list[str]:
        try:
            parse_config(json.dumps({"consumers": consumers}), environ={})
        except ConfigError as e:
            return e.problems
        return []

    def test_valid(self) -> None:
        self.assertEqual(self.problems([consumer("a", {"key": ALICE})]), [])

    def test_duplicate_key_names_both_places(self) -> None:
        digest = hashlib.sha256(ALICE.encode()).hexdigest()
        problems = self.problems(
            [consumer("a", {"key": ALICE}), consumer("b", {"key_sha256": digest})]
        )
        self.assertEqual(len(problems), 1)
        self.assertIn("consumers[1].plugins.key-auth:", problems[0])
        self.assertIn("consumers[0].plugins.key-auth", problems[0])
        self.assertNotIn(ALICE, problems[0])

    def test_duplicate_username(self) -> None:
        problems = self.problems([consumer("a", {"key": ALICE}), consumer("a", {"key": BOB})])
        self.assertEqual(
            problems, ["consumers[1].username: duplicate username 'a' (also consumers[0])"]
        )

    def test_short_key_not_quoted(self) -> None:
        problems = self.problems([consumer("a", {"key": "short-secret"})])
        self.assertEqual(
            problems,
            [
                "consumers[0].plugins.key-auth.key: the key has 12 characters;"
                " at least 16 are required"
            ],
        )

    def test_key_and_digest(self) -> None:
        problems = self.problems([consumer("a", {"key": ALICE, "key_sha256": "0" * 64})])
        self.assertEqual(
            problems,
            ["consumers[0].plugins.key-auth: exactly one of 'key' or 'key_sha256' is required"],
        )

    def test_bad_username(self) -> None:
        problems = self.problems([consumer("a b", {"key": ALICE})])
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("consumers[0].username:"))

    def test_no_key_auth(self) -> None:
        problems = self.problems([{"username": "a", "plugins": {}}])
        self.assertEqual(problems, ["consumers[0].plugins.key-auth: is a required property"])

    def test_problems_skip_malformed(self) -> None:
        self.assertEqual(list(consumer_problems([None, {"plugins": None}])), [])


class KeyAuthTests(SynchronousTestCase):
    def found(self, auth: KeyAuth, r: DummyRequest) -> tuple[str, SentKey]:
        who, sent = auth.authenticate(r)
        return who.username, sent

    def test_header(self) -> None:
        self.assertEqual(
            self.found(key_auth(), request(apikey=ALICE)), ("alice", SentKey((b"apikey",), ()))
        )

    def test_custom_header(self) -> None:
        auth = key_auth(header="X-Gateway-Key")
        self.assertEqual(
            self.found(auth, request(x_gateway_key=ALICE)),
            ("alice", SentKey((b"x-gateway-key",), ())),
        )
        with self.assertRaises(KeyRefused):
            auth.authenticate(request(apikey=ALICE))

    def test_bearer(self) -> None:
        self.assertEqual(
            self.found(key_auth(), request(authorization=f"Bearer {BOB}")),
            ("bob", SentKey((b"authorization",), ())),
        )

    def test_x_api_key(self) -> None:
        self.assertEqual(
            self.found(key_auth(), request(x_api_key=BOB)),
            ("bob", SentKey((b"x-api-key",), ())),
        )

    def test_query(self) -> None:
        self.assertEqual(
            self.found(key_auth(), request(b"/v1/chat?x=1&apikey=" + ALICE.encode())),
            ("alice", SentKey((), ("apikey",))),
        )

    def test_custom_query(self) -> None:
        auth = key_auth(query="key")
        self.assertEqual(
            self.found(auth, request(b"/v1/chat?key=" + ALICE.encode())),
            ("alice", SentKey((), ("key",))),
        )

    def test_order(self) -> None:
        """
        The C{header} header wins over C{Authorization}, which wins over
        C{x-api-key}; every place holding that key is reported, the
        others (the client's own provider key) are not.
        """
        r = request(
            b"/v1/chat?apikey=" + ALICE.encode(),
            apikey=ALICE,
            authorization="Bearer sk-client-own",
            x_api_key=ALICE,
        )
        self.assertEqual(
            self.found(key_auth(), r), ("alice", SentKey((b"apikey", b"x-api-key"), ("apikey",)))
        )

    def test_every_place_holding_the_key(self) -> None:
        """
        Headers and parameters the route does not look in are reported too
        when they hold the key.
        """
        r = request(
            b"/v1/chat?token=" + ALICE.encode() + b"&other=1",
            apikey=ALICE,
            x_gateway_key=ALICE,
            x_custom=f"Token {ALICE}",
            x_other="not-the-key",
        )
        self.assertEqual(
            self.found(key_auth(), r),
            ("alice", SentKey((b"apikey", b"x-gateway-key", b"x-custom"), ("token",))),
        )

    def test_encoded_query(self) -> None:
        """
        A key percent-encoded in the query is found, and its parameter
        reported, by its decoded value.
        """
        encoded = b"%61" + ALICE[1:].replace("-", "%2D").encode()
        self.assertEqual(
            self.found(key_auth(), request(b"/v1/chat?apikey=" + encoded)),
            ("alice", SentKey((), ("apikey",))),
        )

    def test_first_key_counts(self) -> None:
        with self.assertRaises(KeyRefused) as caught:
            key_auth().authenticate(request(apikey="unknown-0123456789", x_api_key=ALICE))
        self.assertEqual(
            (caught.exception.message, caught.exception.reason), (INVALID_KEY, "invalid_key")
        )

    def test_missing(self) -> None:
        for r in (request(), request(authorization="Basic abc"), request(apikey="")):
            with self.assertRaises(KeyRefused) as caught:
                key_auth().authenticate(r)
            self.assertEqual(caught.exception.reason, "missing_key")
            self.assertEqual(caught.exception.message, MISSING_KEY)

    def test_without_parameter(self) -> None:
        self.assertEqual(
            without_parameters("a=1&apikey=s&b=&apikey=t&k=u", ("apikey", "k")), "a=1&b="
        )


class ConsumerVariableTests(SynchronousTestCase):
    def test_hash_on_consumer(self) -> None:
        r = request()
        r.consumer_name = "alice"  # type: ignore[attr-defined]
        self.assertEqual(request_hash_key(r, "consumer", None), "alice")
        self.assertEqual(request_variable(r, "consumer_name"), "alice")

    def test_anonymous_hashes_address(self) -> None:
        r = request()
        self.assertEqual(request_hash_key(r, "consumer", None), request_variable(r, "remote_addr"))
