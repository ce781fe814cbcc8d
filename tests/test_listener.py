# -*- test-case-name: tests.test_listener -*-
"""
Tests for L{aiproxy.listener} through L{aiproxy.server.GatewaySite}: the
C{Host} checks, the request head and body deadlines, the wait for a
request, the cap on client connections and the limits applied at start
and on reload; over L{StringTransport}, time driven by the site's L{Clock}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aiproxy.config import Config, parse_config
from aiproxy.listener import ClientLimits, Phase, RefusedConnection, host_problem
from aiproxy.metrics import Metrics
from aiproxy.monitor import ExchangeMonitor
from aiproxy.tap import GatewayService
from tests.test_lifecycle import fake_build, route_document
from tests.test_metrics import requests_total, value
from tests.test_proxy import CHAT, Gateway, json_response, make_table, request_bytes

#: Host values RFC 9112 §3.2 accepts.
VALID_HOSTS = [
    b"gateway.test",
    b"gateway.test:8080",
    b"GATEWAY.Test",
    b"a_b-c.example.",
    b"xn--bcher-kva.example",
    b"%41.example",
    b"127.0.0.1",
    b"127.0.0.1:80",
    b"localhost:0",
    b"localhost:65535",
    b"[::1]",
    b"[::1]:8443",
    b"[2001:db8::1]",
    b"[::ffff:192.0.2.1]:80",
]

#: Host values it does not.
INVALID_HOSTS = [
    b"evil.example/admin",
    b"127.0.0.1:notaport",
    b"user@host",
    b"user:pass@host",
    b"evil example",
    b"evil.example:80 x",
    b"host:65536",
    b"host:123456",
    b"host:-1",
    b"host:",
    b"host:80:80",
    b"",
    b"::1",
    b"[::1",
    b"[::1]x",
    b"[::1]:",
    b"[not-an-address]",
    b"[fe80::1%eth0]",
    b"%zz.example",
    b"\xc3\xa9.example",
    b"evil.example\\admin",
    b"evil.example?x",
    b"evil.example#x",
]


def config(**fields: Any) -> Config:
    """
    A config without routes, with these top-level fields.
    """
    return Config(listen=(), routes=(), **fields)


def channel_of(gateway: Gateway) -> Any:
    """
    The L{aiproxy.server.GatewayChannel} of the gateway's connection.
    """
    return gateway.channel._channel  # type: ignore[attr-defined]


def head(host: bytes | None = b"gateway.test", length: int = 0, **extra: bytes) -> bytes:
    """
    A POST head for the chat route, with C{Content-Length: length}.
    """
    lines = [b"POST /v1/chat/completions HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + host)
    lines.append(b"Content-Type: application/json")
    lines.append(b"Content-Length: %d" % length)
    lines += [name.encode().replace(b"_", b"-") + b": " + v for name, v in extra.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def monitored_gateway(testcase: SynchronousTestCase, metrics: Metrics | None = None) -> Gateway:
    """
    A test L{Gateway} whose refusals and connections are counted in
    C{metrics}.
    """
    gateway = Gateway(testcase, make_table())
    monitor = ExchangeMonitor(gateway.clock, metrics)
    gateway.resource.monitor = monitor
    gateway.resource._no_route.monitor = monitor
    return gateway


class HostProblemTests(SynchronousTestCase):
    """
    L{host_problem}: RFC 9112 §3.2 on the values of the C{Host} lines.
    """

    def test_valid(self) -> None:
        """
        A reg-name, an IPv4 address or a bracketed IPv6 address, each with
        an optional port, is fine.
        """
        for host in VALID_HOSTS:
            self.assertIsNone(host_problem([host], b"HTTP/1.1"), host)

    def test_invalid(self) -> None:
        """
        Paths, user info, spaces, bad or out-of-range ports, empty values,
        unbracketed or malformed IPv6 and non-ASCII bytes are invalid.
        """
        for host in INVALID_HOSTS:
            self.assertEqual(host_problem([host], b"HTTP/1.1"), "invalid Host header", host)
            self.assertEqual(host_problem([host], b"HTTP/1.0"), "invalid Host header", host)

    def test_checked_again(self) -> None:
        """
        Valid values are remembered, invalid ones never: each is refused
        every time, also after the valid ones were checked twice.
        """
        for _ in range(2):
            for host in VALID_HOSTS:
                self.assertIsNone(host_problem([host], b"HTTP/1.1"), host)
            for host in INVALID_HOSTS:
                self.assertEqual(host_problem([host], b"HTTP/1.1"), "invalid Host header", host)

    def test_missing(self) -> None:
        """
        HTTP/1.1 needs a Host; HTTP/1.0 may go without.
        """
        self.assertEqual(host_problem(None, b"HTTP/1.1"), "missing Host header")
        self.assertEqual(host_problem([], b"HTTP/1.1"), "missing Host header")
        self.assertIsNone(host_problem(None, b"HTTP/1.0"))

    def test_several(self) -> None:
        """
        Two lines, or one line with a comma list, are more than one Host.
        """
        for values in ([b"a.example", b"a.example"], [b"a.example, b.example"], [b"a,b"]):
            self.assertEqual(host_problem(values, b"HTTP/1.1"), "more than one Host header")


class HostCheckTests(SynchronousTestCase):
    """
    A request with a Host problem gets a 400 and never reaches a route.
    """

    def refused(self, raw: bytes, metrics: Metrics | None = None) -> tuple[Any, Gateway]:
        gateway = monitored_gateway(self, metrics)
        gateway.channel.dataReceived(raw)
        response = gateway.response()
        self.assertEqual(response.status, 400, raw)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.header("connection"), "close")
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.client.calls, [])
        self.assertEqual(gateway.raw.count(b"HTTP/1.1 "), 1)
        return response.json(), gateway

    def test_missing(self) -> None:
        """
        An HTTP/1.1 request without Host: 400 C{missing Host header}, an
        access record, counted in the metrics.
        """
        metrics = Metrics()
        body, gateway = self.refused(head(None), metrics)
        self.assertEqual(body, {"message": "missing Host header"})
        record = gateway.record
        self.assertEqual(
            (record["status"], record["abort_reason"], record["path"], record["method"]),
            (400, "invalid_host", "/v1/chat/completions", "POST"),
        )
        self.assertEqual(requests_total(metrics, "400", "", route="", instance=""), 1.0)
        self.assertEqual(value(metrics, "aiproxy_aborts_total", reason="invalid_host"), 1.0)

    def test_two_lines(self) -> None:
        """
        Two Host lines, equal or not: 400 C{more than one Host header}.
        """
        for second in (b"gateway.test", b"evil.example"):
            raw = request_bytes().replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nHost: " + second + b"\r\n")
            body, _ = self.refused(raw)
            self.assertEqual(body, {"message": "more than one Host header"})

    def test_comma_list(self) -> None:
        """
        One Host line listing two hosts: 400 C{more than one Host header}.
        """
        body, _ = self.refused(request_bytes(headers={b"host": b"gateway.test, evil.example"}))
        self.assertEqual(body, {"message": "more than one Host header"})

    def test_invalid(self) -> None:
        """
        Each invalid value: 400 C{invalid Host header}.
        """
        for host in INVALID_HOSTS:
            body, _ = self.refused(request_bytes(headers={b"host": host}))
            self.assertEqual(body, {"message": "invalid Host header"}, host)

    def test_body_not_read(self) -> None:
        """
        The body following a refused head is not read, no C{100 Continue}
        invites it, and nothing more is answered.
        """
        gateway = Gateway(self, make_table())
        raw = request_bytes(headers={b"host": b"user@host", b"expect": b"100-continue"})
        gateway.channel.dataReceived(raw + request_bytes())
        self.assertNotIn(b"100 Continue", gateway.raw)
        self.assertEqual(gateway.raw.count(b"HTTP/1.1 "), 1)
        self.assertEqual(gateway.client.calls, [])
        self.assertEqual(len(gateway.access_records()), 1)

    def test_valid(self) -> None:
        """
        Each valid value reaches the route.
        """
        for host in VALID_HOSTS:
            gateway = Gateway(self, make_table())
            gateway.send(headers={b"host": host})
            self.assertEqual(len(gateway.client.calls), 1, host)

    def test_http10_without_host(self) -> None:
        """
        An HTTP/1.0 request may come without Host.
        """
        gateway = Gateway(self, make_table())
        raw = (
            request_bytes()
            .replace(b"HTTP/1.1", b"HTTP/1.0")
            .replace(b"host: gateway.test\r\n", b"")
        )
        self.assertNotIn(b"host:", raw)
        gateway.channel.dataReceived(raw)
        self.assertEqual(len(gateway.client.calls), 1)

    def test_http10_invalid_host(self) -> None:
        """
        An HTTP/1.0 request with an invalid Host is refused all the same.
        """
        raw = request_bytes(headers={b"host": b"evil.example/admin"}).replace(
            b"HTTP/1.1", b"HTTP/1.0"
        )
        body, _ = self.refused(raw)
        self.assertEqual(body, {"message": "invalid Host header"})

    def test_kept_alive_second_request(self) -> None:
        """
        The check applies to every request of a kept-alive connection.
        """
        gateway = Gateway(self, make_table())
        gateway.send(path=b"/nowhere")
        self.assertEqual(gateway.response().status, 404)
        gateway.transport.clear()
        gateway.channel.dataReceived(request_bytes(headers={b"host": b""}))
        self.assertEqual(gateway.response().status, 400)
        self.assertEqual(gateway.client.calls, [])


class HeaderDeadlineTests(SynchronousTestCase):
    """
    A request head is due C{client_header_timeout} after its first byte,
    however slowly its bytes come; a connection waiting for a request is
    closed after its wait.
    """

    def test_trickle(self) -> None:
        """
        A head trickling one byte every 10 s gets 408 C{request header
        timeout} C{client_header_timeout} after its first byte: not counted
        from the connection's opening, not restarted by each byte.
        """
        gateway = Gateway(self, make_table())
        clock = gateway.site_reactor
        clock.advance(20)
        data = head(length=10)
        gateway.channel.dataReceived(data[:1])
        for byte in data[1:3]:
            clock.advance(10)
            gateway.channel.dataReceived(bytes([byte]))
        clock.advance(9.999)
        self.assertEqual(gateway.raw, b"")
        self.assertFalse(gateway.closed)
        clock.advance(0.001)
        self.assertEqual(clock.seconds(), 50)
        self.assertEqual(gateway.response().json(), {"message": "request header timeout"})

    def test_not_before(self) -> None:
        """
        One moment before the deadline nothing happens; at the deadline the
        408 comes with C{Connection: close}, an access record and no
        upstream call.
        """
        metrics = Metrics()
        gateway = monitored_gateway(self, metrics)
        clock = gateway.site_reactor
        data = head(length=10)
        gateway.channel.dataReceived(data[:1])
        for byte in data[1:40]:
            clock.advance(0.5)
            gateway.channel.dataReceived(bytes([byte]))
        clock.advance(30 - 0.5 * 39 - 0.001)
        self.assertEqual(gateway.raw, b"")
        self.assertFalse(gateway.closed)
        clock.advance(0.001)
        response = gateway.response()
        self.assertEqual(response.status, 408)
        self.assertEqual(response.json(), {"message": "request header timeout"})
        self.assertEqual(response.header("connection"), "close")
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.record["abort_reason"], "request_header_timeout")
        self.assertEqual(requests_total(metrics, "408", "", route="", instance=""), 1.0)
        gateway.channel.dataReceived(data[40:])
        self.assertEqual(gateway.raw.count(b"HTTP/1.1 "), 1)
        self.assertEqual(gateway.client.calls, [])

    def test_aborted_if_not_read(self) -> None:
        """
        A client that does not take its 408 has the connection aborted
        after the channel's C{abortTimeout}.
        """
        gateway = Gateway(self, make_table())
        gateway.channel.dataReceived(b"POST /")
        gateway.site_reactor.advance(30)
        self.assertTrue(gateway.closed)
        self.assertFalse(gateway.transport.disconnected)
        gateway.site_reactor.advance(15)
        self.assertTrue(gateway.transport.disconnected)

    def test_head_in_time(self) -> None:
        """
        A head complete just within the deadline is served, and no 408
        follows while the request is answered, however long it takes.
        """
        gateway = Gateway(self, make_table())
        raw = request_bytes()
        gateway.channel.dataReceived(raw[:10])
        gateway.site_reactor.advance(29.9)
        gateway.channel.dataReceived(raw[10:])
        self.assertEqual(len(gateway.client.calls), 1)
        gateway.site_reactor.advance(1000)
        self.assertEqual(gateway.raw, b"")
        self.assertFalse(gateway.closed)

    def test_silent_connection(self) -> None:
        """
        A new connection that sends nothing is closed (without an answer or
        an access record) after C{client_header_timeout}.
        """
        gateway = Gateway(self, make_table())
        gateway.site.apply_limits(config(client_header_timeout=5))
        gateway.connect()
        gateway.site_reactor.advance(4.999)
        self.assertFalse(gateway.closed)
        gateway.site_reactor.advance(0.001)
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.raw, b"")
        self.assertEqual(gateway.access_records(), [])

    def test_kept_alive(self) -> None:
        """
        After a response a kept-alive connection waits up to the idle
        timeout (75 s) for the next request; the head deadline of that
        request counts from its first byte.
        """
        gateway = Gateway(self, make_table())
        clock = gateway.site_reactor
        gateway.send(path=b"/nowhere")
        self.assertEqual(gateway.response().status, 404)
        gateway.transport.clear()
        clock.advance(74)
        self.assertFalse(gateway.closed)
        gateway.channel.dataReceived(b"POST /v1/chat")
        clock.advance(29.999)
        self.assertEqual(gateway.raw, b"")
        clock.advance(0.001)
        self.assertEqual(gateway.response().status, 408)

    def test_one_timer(self) -> None:
        """
        A connection holds one timer, set once per request on a kept-alive
        connection; a request that was answered quickly does not shorten
        the idle wait after it.
        """
        gateway = Gateway(self, make_table())
        clock = gateway.site_reactor
        made = []
        call_later = clock.callLater
        clock.callLater = lambda *a, **kw: made.append(a) or call_later(*a, **kw)  # type: ignore[method-assign]
        for _ in range(3):
            gateway.send(path=b"/nowhere")
            self.assertEqual(gateway.response().status, 404)
            gateway.transport.clear()
            self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertLessEqual(len(made), 3)
        clock.advance(74.999)
        self.assertFalse(gateway.closed)
        clock.advance(0.001)
        self.assertTrue(gateway.closed)

    def test_idle_kept_alive(self) -> None:
        """
        A kept-alive connection without a next request is closed after the
        idle timeout, without an answer.
        """
        gateway = Gateway(self, make_table())
        gateway.send(path=b"/nowhere")
        gateway.transport.clear()
        gateway.site_reactor.advance(74.999)
        self.assertFalse(gateway.closed)
        gateway.site_reactor.advance(0.001)
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.raw, b"")

    def test_empty_lines_do_not_start(self) -> None:
        """
        An empty line after a request (as some clients send after a body)
        does not start the next request's deadline.
        """
        gateway = Gateway(self, make_table())
        gateway.send(path=b"/nowhere")
        gateway.channel.dataReceived(b"\r\n")
        gateway.transport.clear()
        gateway.site_reactor.advance(60)
        gateway.send(path=b"/nowhere")
        self.assertEqual(gateway.response().status, 404)

    def test_pipelined(self) -> None:
        """
        A request sent while the previous one is answered has its deadline
        from when it is read, after that answer.
        """
        gateway = Gateway(self, make_table())
        clock = gateway.site_reactor
        gateway.channel.dataReceived(request_bytes(CHAT) + b"POST /nowhere HTTP/1.1\r\n")
        clock.advance(100)
        self.assertEqual(gateway.raw, b"")
        body = b'{"choices": []}'
        upstream = gateway.answer(json_response(body))
        upstream.data(body)
        upstream.end()
        self.assertEqual(gateway.response().status, 200)
        self.assertIs(channel_of(gateway)._deadline.phase, Phase.HEAD)
        gateway.transport.clear()
        clock.advance(29.999)
        self.assertEqual(gateway.raw, b"")
        clock.advance(0.001)
        self.assertEqual(gateway.response().status, 408)


class BodyDeadlineTests(SynchronousTestCase):
    """
    A request body is due C{client_body_timeout} after the end of its head,
    plus a second per C{client_body_min_rate} bytes received.
    """

    def test_no_body_bytes(self) -> None:
        """
        A body that never comes: 408 C{request body timeout} at
        C{client_body_timeout}, recorded with its route, never sent
        upstream.
        """
        gateway = Gateway(self, make_table())
        gateway.channel.dataReceived(head(length=5000))
        gateway.site_reactor.advance(29.999)
        self.assertEqual(gateway.raw, b"")
        gateway.site_reactor.advance(0.001)
        response = gateway.response()
        self.assertEqual(response.status, 408)
        self.assertEqual(response.json(), {"message": "request body timeout"})
        self.assertEqual(response.header("connection"), "close")
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.client.calls, [])
        record = gateway.record
        self.assertEqual(
            (record["status"], record["abort_reason"], record["route_id"], record["bytes_in"]),
            (408, "request_body_timeout", "chat", 0),
        )

    def test_rate_extends(self) -> None:
        """
        1000 bytes at 500 B/s extend the deadline by 2 s: 408 at 32 s, not
        before.
        """
        gateway = Gateway(self, make_table())
        clock = gateway.site_reactor
        gateway.channel.dataReceived(head(length=5000))
        clock.advance(10)
        gateway.channel.dataReceived(b"x" * 600)
        clock.advance(10)
        gateway.channel.dataReceived(b"x" * 400)
        clock.advance(11.5)
        self.assertEqual(gateway.raw, b"")
        clock.advance(0.5)
        self.assertEqual(gateway.response().status, 408)
        self.assertEqual(gateway.record["bytes_in"], 1000)

    def test_configured_rate(self) -> None:
        """
        C{client_body_timeout} and C{client_body_min_rate} come from the
        config: 5 s plus 1 s per 100 bytes.
        """
        gateway = Gateway(self, make_table())
        gateway.site.apply_limits(config(client_body_timeout=5, client_body_min_rate=100))
        clock = gateway.site_reactor
        gateway.channel.dataReceived(head(length=5000))
        gateway.channel.dataReceived(b"x" * 250)
        clock.advance(7.25)
        self.assertEqual(gateway.raw, b"")
        clock.advance(0.25)
        self.assertEqual(gateway.response().status, 408)

    def test_no_extension(self) -> None:
        """
        With C{client_body_min_rate: 0} the body has C{client_body_timeout}
        in all, however much of it came.
        """
        gateway = Gateway(self, make_table())
        gateway.site.apply_limits(config(client_body_min_rate=0))
        gateway.channel.dataReceived(head(length=5000))
        gateway.channel.dataReceived(b"x" * 4999)
        gateway.site_reactor.advance(29.999)
        self.assertEqual(gateway.raw, b"")
        gateway.site_reactor.advance(0.001)
        self.assertEqual(gateway.response().status, 408)

    def test_steady_upload(self) -> None:
        """
        A body sent at more than the minimum rate is read however long it
        takes, and served.
        """
        gateway = Gateway(self, make_table())
        body = json.dumps({**CHAT, "padding": "x" * 40_000}).encode()
        gateway.channel.dataReceived(head(length=len(body)))
        for start in range(0, len(body), 600):
            gateway.site_reactor.advance(1)
            gateway.channel.dataReceived(body[start : start + 600])
        self.assertGreater(gateway.site_reactor.seconds(), 60)
        self.assertEqual(gateway.raw, b"")
        self.assertEqual(len(gateway.client.calls), 1)
        self.assertEqual(gateway.upstream.body, body)

    def test_chunked(self) -> None:
        """
        A chunked body's bytes extend the deadline too.
        """
        gateway = Gateway(self, make_table())
        raw = head().replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
        gateway.channel.dataReceived(raw)
        gateway.channel.dataReceived(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
        gateway.site_reactor.advance(31.9)
        self.assertEqual(gateway.raw, b"")
        gateway.site_reactor.advance(0.2)
        self.assertEqual(gateway.response().status, 408)

    def test_not_while_answering(self) -> None:
        """
        Once the body is in, no body deadline runs while the response is
        written.
        """
        gateway = Gateway(self, make_table({"streaming_flush_interval_ms": 0}))
        gateway.stream()
        gateway.site_reactor.advance(1000)
        self.assertFalse(gateway.closed)
        self.assertNotIn(b"408", gateway.raw)
        self.assertIs(channel_of(gateway)._deadline.phase, Phase.HANDLING)
        self.assertEqual(gateway.site_reactor.getDelayedCalls(), [])


class ConnectionCapTests(SynchronousTestCase):
    """
    At most C{max_client_connections} client connections are open; the
    next ones are closed at once and counted.
    """

    def setUp(self) -> None:
        self.metrics = Metrics()
        self.gateway = monitored_gateway(self, self.metrics)
        self.site = self.gateway.site
        self.site.apply_limits(config(max_client_connections=2))

    def new_connection(self) -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def warnings(self) -> list[str]:
        return [
            formatEvent(event)
            for event in self.gateway.events
            if event.get("log_level") == LogLevel.warn
            and event.get("log_namespace") == "aiproxy.listener"
        ]

    def test_refused(self) -> None:
        """
        The connection over the cap is closed at once without a byte read
        or written, counted in C{aiproxy_client_connections_refused_total}
        and logged as a warning; the open ones are in
        C{aiproxy_client_connections}.
        """
        self.new_connection()
        self.assertEqual(self.site.cap.open, 2)
        protocol, transport = self.new_connection()
        self.assertIsInstance(protocol, RefusedConnection)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.site.cap.open, 2)
        self.assertEqual(value(self.metrics, "aiproxy_client_connections_refused_total"), 1.0)
        self.assertEqual(value(self.metrics, "aiproxy_client_connections"), 2.0)
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("max_client_connections 2", self.warnings()[0])

    def test_warning_rate(self) -> None:
        """
        Refusals are logged at most once per 10 s, with the number refused
        since the last warning.
        """
        self.new_connection()
        for _ in range(5):
            self.new_connection()
        self.site.reactor.advance(9.9)  # type: ignore[attr-defined]
        self.new_connection()
        self.assertEqual(len(self.warnings()), 1)
        self.site.reactor.advance(0.1)  # type: ignore[attr-defined]
        self.new_connection()
        self.assertEqual(len(self.warnings()), 2)
        self.assertIn("refused 6 new connection(s)", self.warnings()[1])
        self.assertEqual(value(self.metrics, "aiproxy_client_connections_refused_total"), 7.0)

    def test_slot_freed(self) -> None:
        """
        Once a connection closed, whichever way, a new one is admitted.
        """
        self.new_connection()
        self.assertIsInstance(self.new_connection()[0], RefusedConnection)
        self.gateway.disconnect()
        self.assertEqual(self.site.cap.open, 1)
        self.assertEqual(value(self.metrics, "aiproxy_client_connections"), 1.0)
        protocol, transport = self.new_connection()
        self.assertNotIsInstance(protocol, RefusedConnection)
        self.assertEqual(self.site.cap.open, 2)
        protocol.dataReceived(head(None))
        self.assertIn(b"400", transport.value())
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.site.cap.open, 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.site.cap.open, 1)

    def test_raised(self) -> None:
        """
        A reload raising the cap admits more at once.
        """
        self.new_connection()
        self.assertIsInstance(self.new_connection()[0], RefusedConnection)
        self.site.apply_limits(config(max_client_connections=3))
        self.assertNotIsInstance(self.new_connection()[0], RefusedConnection)

    def test_without_metrics(self) -> None:
        """
        Without metrics the cap works the same.
        """
        gateway = Gateway(self, make_table())
        gateway.site.apply_limits(config(max_client_connections=1))
        protocol = gateway.site.buildProtocol(None)
        self.assertIsInstance(protocol, RefusedConnection)
        self.assertEqual(gateway.site.cap.refused, 1)


class LimitsTests(SynchronousTestCase):
    """
    The limits come from the config, at start and on reload.
    """

    def config(self, **top: Any) -> Config:
        document = {"routes": [route_document("chat", "/v1/chat/completions")], **top}
        return parse_config(json.dumps(document), environ={})

    def test_defaults(self) -> None:
        """
        Without settings: 30 s per head, 30 s per body plus 1 s per 500
        bytes, 10000 connections; the same as a site's before any config.
        """
        limits = ClientLimits.from_config(self.config())
        self.assertEqual(limits, ClientLimits(30.0, 30.0, 500, 10000))
        self.assertEqual(limits, ClientLimits())

    def test_start_and_reload(self) -> None:
        """
        The service applies the config's limits to its site at start and
        after a reload; a new connection gets the new deadline.
        """
        reactor = MemoryReactorClock()
        first = self.config(client_header_timeout=10, max_client_connections=5)
        service = GatewayService(first, fake_build(first, reactor), reactor, ["tcp:0"])
        self.assertEqual(service.site.limits, ClientLimits(10.0, 30.0, 500, 5))
        second = self.config(
            client_header_timeout=2,
            client_body_timeout=4,
            client_body_min_rate=0,
            max_client_connections=7,
        )
        service._reloaded(second)
        self.assertEqual(service.site.limits, ClientLimits(2.0, 4.0, 0, 7))
        protocol = service.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"POST /")
        reactor.advance(2)
        self.assertIn(b"408", transport.value())
