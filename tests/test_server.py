# -*- test-case-name: tests.test_server -*-
"""
Tests for L{aiproxy.server}: routing, the early 413 of L{GatewayRequest},
the 404 of unknown paths and the request errors answered before any
upstream call, over L{StringTransport}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from aiproxy.context import RECORD_KEYS
from aiproxy.server import UNROUTED_BODY_LIMIT
from aiproxy.upstream.request import too_large_message
from tests.test_proxy import (
    CHAT,
    ENDPOINT,
    Gateway,
    delta,
    make_table,
    parse_response,
    request_bytes,
    stream_response,
)


def route(route_id: str, uri: str, **extra: Any) -> dict[str, Any]:
    """
    A route document to the test endpoint.
    """
    document: dict[str, Any] = {
        "id": route_id,
        "uri": uri,
        "plugins": {
            "ai-proxy": {
                "provider": "openai",
                "auth": {"header": {"x-api-key": "k"}},
                "override": {"endpoint": ENDPOINT},
            }
        },
    }
    document.update(extra)
    return document


def chunked(*pieces: bytes) -> bytes:
    """
    C{pieces} in HTTP/1.1 chunked encoding, with the last chunk.
    """
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


class TooLargeTests(SynchronousTestCase):
    """
    C{max_req_body_size} is enforced before the body is read.
    """

    def headers_only(self, length: int, **extra: bytes) -> bytes:
        head = request_bytes(
            b"",
            headers={
                b"content-length": b"%d" % length,
                **{k.encode(): v for k, v in extra.items()},
            },
        )
        return head

    def test_from_content_length(self) -> None:
        """
        A declared length over the limit gets 413 with a JSON message as
        soon as the headers are in, without waiting for the body, and the
        connection is closed.
        """
        gateway = Gateway(self, make_table({"max_req_body_size": 100}))
        gateway.channel.dataReceived(self.headers_only(5000))
        response = gateway.response()
        self.assertEqual(response.status, 413)
        self.assertEqual(response.json(), {"message": too_large_message(5000, 100)})
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.client.calls, [])
        record = gateway.record
        self.assertEqual(
            (record["status"], record["route_id"], record["abort_reason"]),
            (413, "chat", "request_too_large"),
        )
        self.assertTrue(RECORD_KEYS <= set(record), RECORD_KEYS - set(record))
        self.assertEqual(record["instance"], "ai-proxy-openai")
        self.assertEqual(record["bytes_out"], len(response.body))

    def test_body_after_refusal_ignored(self) -> None:
        """
        Body bytes that still arrive after the refusal change nothing.
        """
        gateway = Gateway(self, make_table({"max_req_body_size": 100}))
        gateway.channel.dataReceived(self.headers_only(150))
        before = gateway.raw
        gateway.channel.dataReceived(b"x" * 150)
        self.assertEqual(gateway.raw, before)
        self.assertEqual(gateway.client.calls, [])
        self.assertEqual(len(gateway.access_records()), 1)

    def test_no_100_continue(self) -> None:
        """
        A client expecting C{100 Continue} for a body that is too large is
        not invited to send it.
        """
        gateway = Gateway(self, make_table({"max_req_body_size": 100}))
        gateway.channel.dataReceived(self.headers_only(5000, expect=b"100-continue"))
        self.assertNotIn(b"100 Continue", gateway.raw)
        self.assertEqual(gateway.response().status, 413)

    def test_chunked(self) -> None:
        """
        A chunked body is refused while it is read, once it passes the limit.
        """
        gateway = Gateway(self, make_table({"max_req_body_size": 100}))
        head = request_bytes(b"", headers={b"transfer-encoding": b"chunked"}).replace(
            b"content-length: 0\r\n", b""
        )
        gateway.channel.dataReceived(head)
        gateway.channel.dataReceived(b"3c\r\n" + b"x" * 60 + b"\r\n")
        self.assertEqual(gateway.raw, b"")
        gateway.channel.dataReceived(b"3c\r\n" + b"x" * 60 + b"\r\n")
        response = gateway.response()
        self.assertEqual(response.status, 413)
        self.assertEqual(response.json(), {"message": too_large_message(120, 100)})
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.client.calls, [])

    def test_chunked_within_limit(self) -> None:
        """
        A chunked body within the limit goes upstream whole.
        """
        gateway = Gateway(self, make_table({"max_req_body_size": 1000}))
        body = json.dumps(CHAT).encode()
        head = request_bytes(b"", headers={b"transfer-encoding": b"chunked"}).replace(
            b"content-length: 0\r\n", b""
        )
        gateway.channel.dataReceived(head + chunked(body[:10], body[10:]))
        self.assertEqual(gateway.upstream.body, body)

    def test_exactly_the_limit(self) -> None:
        """
        A body of exactly C{max_req_body_size} bytes is accepted.
        """
        body = json.dumps(CHAT).encode()
        gateway = Gateway(self, make_table({"max_req_body_size": len(body)}))
        gateway.send(body)
        self.assertEqual(len(gateway.client.calls), 1)


class RoutingTests(SynchronousTestCase):
    """
    Requests reach the route of their path; others get 404.
    """

    def test_unknown_path(self) -> None:
        """
        A path no route serves: 404 with a JSON body, logged.
        """
        gateway = Gateway(self, make_table())
        gateway.send(path=b"/v1/nothing?x=1")
        response = gateway.response()
        self.assertEqual(response.status, 404)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertIn("message", response.json())
        self.assertEqual(gateway.client.calls, [])
        record = gateway.record
        self.assertEqual(record["status"], 404)
        self.assertEqual(record["path"], "/v1/nothing")
        self.assertTrue(RECORD_KEYS <= set(record), RECORD_KEYS - set(record))
        self.assertEqual(record["bytes_in"], len(json.dumps(CHAT)))
        self.assertEqual(record["bytes_out"], len(response.body))

    def test_unknown_path_large_body(self) -> None:
        """
        The 404 does not depend on a route's body limit.
        """
        gateway = Gateway(self, make_table({"max_req_body_size": 10}))
        gateway.send(path=b"/elsewhere")
        self.assertEqual(gateway.response().status, 404)

    def test_query_ignored(self) -> None:
        """
        The query does not take part in matching.
        """
        gateway = Gateway(self, make_table())
        gateway.send(path=b"/v1/chat/completions?trace=1")
        self.assertEqual(len(gateway.client.calls), 1)

    def test_routes(self) -> None:
        """
        Exact paths, C{/*} prefixes (longest first) and method lists select
        the route.
        """
        table = make_table(
            routes=[
                route("exact", "/v1/chat/completions", methods=["POST"]),
                route("prefix", "/v1/*"),
                route("deeper", "/v1/deep/*"),
            ]
        )
        gateway = Gateway(self, table)
        for path, method, expected in [
            (b"/v1/chat/completions", b"POST", "exact"),
            (b"/v1/embeddings", b"POST", "prefix"),
            (b"/v1/deep/x/y", b"POST", "deeper"),
            (b"/v1/chat/completions", b"PUT", "prefix"),
        ]:
            before = {r.id: len(r.instances[0].client.calls) for r in table.routes}  # type: ignore[attr-defined]
            gateway.connect()
            gateway.send(path=path, method=method)
            after = {r.id: len(r.instances[0].client.calls) for r in table.routes}  # type: ignore[attr-defined]
            self.assertEqual([rid for rid in after if after[rid] != before[rid]], [expected], path)

    def test_method_not_allowed(self) -> None:
        """
        A path whose only route excludes the method: 404.
        """
        gateway = Gateway(
            self, make_table(routes=[route("only-post", "/v1/chat/completions", methods=["POST"])])
        )
        gateway.send(path=b"/v1/chat/completions", method=b"PUT")
        self.assertEqual(gateway.response().status, 404)

    def test_new_table_for_new_requests(self) -> None:
        """
        Replacing the table serves new requests with the new routes while a
        request in flight finishes on its old route.
        """
        old = make_table({"streaming_flush_interval_ms": 0})
        gateway = Gateway(self, old)
        gateway.send(CHAT | {"stream": True})
        in_flight = gateway.upstream
        first_transport = gateway.transport
        new = make_table({"override": {"endpoint": "http://new.test/v1/chat/completions"}})
        gateway.resource.set_table(new)
        gateway.connect()
        gateway.send()
        new_client: Any = new.routes[0].instances[0].client
        old_client: Any = old.routes[0].instances[0].client
        self.assertEqual(new_client.last.url, "http://new.test/v1/chat/completions")
        self.assertEqual(len(old_client.calls), 1)
        response = stream_response()
        in_flight.deferred.callback(response)
        response.data(delta("old"))
        parsed = parse_response(first_transport.value())
        assert parsed is not None
        self.assertEqual(parsed.chunks, [delta("old")])


class RequestErrorTests(SynchronousTestCase):
    """
    Request bodies refused before any upstream call (docs/architecture.md).
    """

    def answer(self, body: bytes, content_type: bytes | None = b"application/json") -> Any:
        gateway = Gateway(self, make_table())
        raw = request_bytes(body)
        if content_type is None:
            raw = raw.replace(b"content-type: application/json\r\n", b"")
        else:
            raw = raw.replace(b"content-type: application/json", b"content-type: " + content_type)
        gateway.channel.dataReceived(raw)
        return gateway, parse_response(gateway.raw)

    def test_content_type(self) -> None:
        """
        A body that is not declared JSON: 400 naming the content type.
        """
        gateway, response = self.answer(b"{}", b"text/plain")
        self.assertEqual(response.status, 400)
        self.assertEqual(
            response.json(),
            {"message": "unsupported content-type: text/plain, only application/json is supported"},
        )
        self.assertEqual(gateway.client.calls, [])
        self.assertEqual(gateway.record["status"], 400)

    def test_json_with_parameters(self) -> None:
        """
        C{application/json; charset=utf-8} is JSON.
        """
        gateway, _ = self.answer(json.dumps(CHAT).encode(), b"application/json; charset=utf-8")
        self.assertEqual(len(gateway.client.calls), 1)

    def test_no_content_type(self) -> None:
        """
        A request without C{Content-Type} is treated as JSON.
        """
        gateway, _ = self.answer(json.dumps(CHAT).encode(), None)
        self.assertEqual(len(gateway.client.calls), 1)

    def test_empty(self) -> None:
        """
        An empty body: 400.
        """
        gateway, response = self.answer(b"")
        self.assertEqual(response.status, 400)
        self.assertIn("empty", response.json()["message"])
        self.assertEqual(gateway.client.calls, [])

    def test_invalid_json(self) -> None:
        """
        Invalid JSON: 400 C{could not parse JSON request body: ...}.
        """
        gateway, response = self.answer(b'{"messages": [')
        self.assertEqual(response.status, 400)
        self.assertTrue(
            response.json()["message"].startswith("could not parse JSON request body: ")
        )
        self.assertEqual(gateway.client.calls, [])

    def test_empty_object(self) -> None:
        """
        C{{}} matches no protocol: 400.
        """
        gateway, response = self.answer(b"{}")
        self.assertEqual(response.status, 400)
        self.assertEqual(gateway.client.calls, [])

    def test_too_large_read_by_exchange(self) -> None:
        """
        The exchange refuses a body over the limit with 413 itself too, for
        a request type without the early check.
        """
        gateway = Gateway(self, make_table({"max_req_body_size": 10}))
        gateway.site.requestFactory = Request  # type: ignore[assignment]
        gateway.connect()
        gateway.send()
        response = gateway.response()
        self.assertEqual(response.status, 413)
        self.assertEqual(response.json(), {"message": too_large_message(len(json.dumps(CHAT)), 10)})
        self.assertEqual(gateway.client.calls, [])

    def test_stream_first_chunk(self) -> None:
        """
        Sanity: an accepted request streams normally.
        """
        gateway = Gateway(self, make_table({"streaming_flush_interval_ms": 0}))
        gateway.stream().data(delta("a"))
        self.assertEqual(gateway.response().chunks, [delta("a")])


class HeaderTimeRoutingTests(SynchronousTestCase):
    """
    A request's route is decided when its headers are in, and an unknown
    path's body is not kept.
    """

    def partial(self, gateway: Gateway, path: bytes, body: bytes) -> None:
        """
        Send the head of a request and all of its body but the last byte.
        """
        raw = request_bytes(body, path=path)
        gateway.channel.dataReceived(raw[:-1])
        self.last_byte = raw[-1:]

    def pending_request(self, gateway: Gateway) -> Any:
        return gateway.channel._channel.requests[-1]  # type: ignore[attr-defined]

    def test_unknown_path_body_not_kept(self) -> None:
        """
        The body of a request no route serves is counted, not stored: a
        client cannot fill memory or disk through the 404 path.
        """
        gateway = Gateway(self, make_table())
        body = b"x" * 200_000
        self.partial(gateway, b"/nowhere", body)
        self.assertEqual(self.pending_request(gateway).content.tell(), 0)
        gateway.channel.dataReceived(self.last_byte)
        response = gateway.response()
        self.assertEqual(response.status, 404)
        self.assertEqual(gateway.record["bytes_in"], len(body))
        self.assertFalse(gateway.closed)

    def test_unknown_path_body_not_read_past_limit(self) -> None:
        """
        The body of a request no route serves is not read past
        C{UNROUTED_BODY_LIMIT}: the 404 is sent and the connection closed.
        """
        gateway = Gateway(self, make_table())
        body = b"x" * (UNROUTED_BODY_LIMIT + 10)
        self.partial(gateway, b"/nowhere", body)
        response = gateway.response()
        self.assertEqual(response.status, 404)
        self.assertEqual(response.json(), {"message": "404 Route Not Found"})
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.record["abort_reason"], "no_route")

    def test_route_added_during_upload(self) -> None:
        """
        A reload that adds a route while a request's body is arriving does
        not change that request's answer.
        """
        gateway = Gateway(self, make_table())
        self.partial(gateway, b"/v1/later", json.dumps(CHAT).encode())
        gateway.resource.set_table(make_table(routes=[route("later", "/v1/later")]))
        gateway.channel.dataReceived(self.last_byte)
        self.assertEqual(gateway.response().status, 404)

    def test_route_removed_during_upload(self) -> None:
        """
        A request whose route a reload removes while its body is arriving is
        still served by that route.
        """
        table = make_table()
        gateway = Gateway(self, table)
        self.partial(gateway, b"/v1/chat/completions", json.dumps(CHAT).encode())
        gateway.resource.set_table(make_table(routes=[route("other", "/v1/other")]))
        gateway.channel.dataReceived(self.last_byte)
        self.assertEqual(len(gateway.client.calls), 1)
        self.assertEqual(gateway.upstream.body, json.dumps(CHAT).encode())
