# -*- test-case-name: tests.test_listener_e2e -*-
"""
The listener against hostile clients, through the real daemon on loopback:
C{Host} problems answered 400 without reaching the upstream, thousands of
slow request heads that neither starve a normal request nor outlive
C{client_header_timeout}, and the cap on client connections.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field

from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from tests.daemon import (
    http_call,
    in_thread,
    proxy_route,
    sleep,
    start_daemon,
    start_mock,
    wait_until,
)
from tests.test_ops_e2e import metrics_port, sample, scrape
from tests.test_security_e2e import body_of, raw_exchange, status_of

log = Logger()

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}

#: Slow connections held open at once.
SLOW_CONNECTIONS = 2000

#: The daemon's C{client_header_timeout} in the slow-head test.
HEADER_TIMEOUT = 2.0

#: Seconds between two bytes of a slow head.
TRICKLE_INTERVAL = 0.2

#: A head that never ends: its bytes are sent one at a time.
SLOW_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 200


def post_head(host_lines: list[bytes], version: bytes = b"HTTP/1.1", body: bytes = b"") -> bytes:
    """
    A POST head for the chat route with these C{Host} header lines (each
    sent as it is) and a JSON body of C{len(body)}.
    """
    lines = [b"POST /v1/chat/completions " + version]
    lines += [b"Host: " + value for value in host_lines]
    lines += [
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def raise_open_files(wanted: int) -> None:
    """
    Raise this process's soft limit of open files to C{wanted} (as far as
    the hard limit allows); the daemon it starts inherits it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


@dataclass
class SlowReport:
    """
    What became of the slow connections.

    @ivar connected: seconds it took to open them all.
    @ivar lifetimes: for each, seconds from its first byte to the 408 or
        the close that ended it.
    @ivar answered: how many got a 408 (the others saw the connection
        closed or reset first).
    @ivar left_open: how many were still open at the end.
    """

    connected: float = 0.0
    lifetimes: list[float] = field(default_factory=list)
    answered: int = 0
    left_open: int = 0


class SlowClients:
    """
    Many connections, each trickling a request head that never ends, one
    byte per L{TRICKLE_INTERVAL}, over non-blocking sockets in one thread;
    each is watched until the server answers 408 or closes it.

    Lifetimes are measured with C{time.time()}, the clock of the daemon's
    reactor: the monotonic clock may run at another rate (by 0.5% on some
    virtual machines), which would make a deadline kept to the
    millisecond look early.
    """

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        #: Set once every connection is open and has sent its first byte.
        self.ready = threading.Event()
        #: When the first connection sent its first byte (C{time.time()}).
        self.first_byte = 0.0
        self.report = SlowReport()

    def run(self, give_up: float) -> SlowReport:
        """
        Open the connections, trickle until every one ended or C{give_up}
        seconds passed; the report.
        """
        selector = selectors.DefaultSelector()
        started: dict[socket.socket, float] = {}
        sent: dict[socket.socket, int] = {}
        due: dict[socket.socket, float] = {}
        begin = time.monotonic()
        for _ in range(self.count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            started[sock] = time.time()
            sock.sendall(SLOW_HEAD[:1])
            sock.setblocking(False)
            sent[sock] = 1
            due[sock] = time.monotonic() + TRICKLE_INTERVAL
            selector.register(sock, selectors.EVENT_READ)
        self.report.connected = time.monotonic() - begin
        self.first_byte = min(started.values())
        self.ready.set()

        def ended(sock: socket.socket, answered: bool) -> None:
            self.report.lifetimes.append(time.time() - started.pop(sock))
            self.report.answered += answered
            del due[sock]
            selector.unregister(sock)
            sock.close()

        stop = time.monotonic() + give_up
        while started and time.monotonic() < stop:
            for key, _ in selector.select(timeout=0.01):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                ended(sock, data.startswith(b"HTTP/1.1 408 "))
            now = time.monotonic()
            for sock in [s for s, when in due.items() if when <= now]:
                try:
                    sock.send(SLOW_HEAD[sent[sock] : sent[sock] + 1])
                except BlockingIOError:
                    pass
                except OSError:
                    ended(sock, False)
                    continue
                sent[sock] += 1
                due[sock] = now + TRICKLE_INTERVAL
        self.report.left_open = len(started)
        for sock in started:
            sock.close()
        return self.report


def timed_call(port: int) -> tuple[int, float]:
    """
    One normal chat request on a new connection: its status and the
    seconds it took (blocking).
    """
    begin = time.perf_counter()
    response = http_call(port, body=CHAT)
    return response.status, time.perf_counter() - begin


class HostE2ETests(TestCase):
    """
    RFC 9112 §3.2 through the daemon.
    """

    async def test_bad_hosts(self) -> None:
        """
        A missing Host, two Host lines, a comma list and invalid values get
        400 with a JSON message and C{Connection: close}, each with an
        access record, and none reaches the upstream; an HTTP/1.0 request
        without Host and valid Host forms are served.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock)])
        cases: dict[str, list[list[bytes]]] = {
            "missing Host header": [[]],
            "more than one Host header": [
                [b"127.0.0.1", b"127.0.0.1"],
                [b"127.0.0.1, evil.example"],
            ],
            "invalid Host header": [
                [b"evil.example/admin"],
                [b"127.0.0.1:notaport"],
                [b"user@host"],
                [b"evil example"],
                [b"127.0.0.1:70000"],
                [b""],
                [b"[::1"],
            ],
        }
        refused = 0
        for message, host_sets in cases.items():
            for hosts in host_sets:
                answer = await in_thread(raw_exchange, daemon.port, post_head(hosts))
                self.assertEqual(status_of(answer), 400, hosts)
                self.assertIn(b"connection: close", answer.lower())
                self.assertEqual(body_of(answer), b'{"message": "%s"}' % message.encode())
                refused += 1
        self.assertEqual(mock.stats()["requests"], 0)
        records = await daemon.wait_for_records(refused)
        self.assertEqual(
            [(r["status"], r["abort_reason"]) for r in records],
            [(400, "invalid_host")] * refused,
        )

        body = json.dumps(CHAT).encode()
        served = [
            post_head([], b"HTTP/1.0", body),
            post_head([b"localhost:8080"], body=body),
            post_head([b"[::1]:80"], body=body),
            post_head([b"127.0.0.1"], body=body),
        ]
        for head in served:
            answer = await in_thread(raw_exchange, daemon.port, head, body)
            self.assertEqual(status_of(answer), 200, head)
        self.assertEqual(mock.stats()["requests"], len(served))


class SlowHeadE2ETests(TestCase):
    """
    Slow request heads by the thousand.
    """

    async def test_slow_heads(self) -> None:
        """
        While 2000 connections each trickle a head that never ends, normal
        requests are answered within 50 ms (the median of ten; none takes
        500 ms); every slow connection gets its 408 (or is closed)
        C{client_header_timeout} after its first byte, not before, and the
        daemon serves normally afterwards.
        """
        raise_open_files(3 * SLOW_CONNECTIONS + 1000)
        mock = await start_mock(self)
        daemon = await start_daemon(
            self,
            config={"client_header_timeout": HEADER_TIMEOUT, "routes": [proxy_route(mock)]},
        )
        baseline = []
        for _ in range(5):
            status, seconds = await in_thread(timed_call, daemon.port)
            self.assertEqual(status, 200)
            baseline.append(seconds)

        clients = SlowClients(daemon.port, SLOW_CONNECTIONS)
        done = in_thread(clients.run, HEADER_TIMEOUT + 10)
        await wait_until(clients.ready.is_set, 20, what="the slow connections to open")
        # Let the daemon take in the burst of new connections first.
        await sleep(0.25)
        latencies = []
        for _ in range(10):
            status, seconds = await in_thread(timed_call, daemon.port)
            self.assertEqual(status, 200)
            latencies.append(seconds)
            await sleep(0.05)
        # No slow connection could have ended yet: all were open meanwhile.
        self.assertLess(time.time() - clients.first_byte, HEADER_TIMEOUT)
        report = await done

        self.assertEqual(report.left_open, 0)
        self.assertEqual(len(report.lifetimes), SLOW_CONNECTIONS)
        self.assertGreaterEqual(min(report.lifetimes), HEADER_TIMEOUT)
        self.assertLess(max(report.lifetimes), HEADER_TIMEOUT + 1.0)
        self.assertLess(statistics.median(latencies), 0.05, latencies)
        self.assertLess(max(latencies), 0.5, latencies)
        records = await daemon.wait_for_records(15 + SLOW_CONNECTIONS, timeout=10)
        timed_out = [r for r in records if r["abort_reason"] == "request_header_timeout"]
        self.assertEqual(len(timed_out), SLOW_CONNECTIONS)
        self.assertEqual({r["status"] for r in timed_out}, {408})
        status, _ = await in_thread(timed_call, daemon.port)
        self.assertEqual(status, 200)
        log.info(
            "{count} slow heads opened in {connected:.2f} s; normal requests: {latencies} ms "
            "(without them: {baseline} ms); slow ones ended after {first:.3f}-{last:.3f} s "
            "(median {median:.3f}), {answered} with a 408",
            count=SLOW_CONNECTIONS,
            connected=report.connected,
            latencies=", ".join(f"{seconds * 1000:.1f}" for seconds in latencies),
            baseline=", ".join(f"{seconds * 1000:.1f}" for seconds in baseline),
            first=min(report.lifetimes),
            last=max(report.lifetimes),
            median=statistics.median(report.lifetimes),
            answered=report.answered,
        )


class ConnectionCapE2ETests(TestCase):
    """
    C{max_client_connections} through the daemon.
    """

    async def test_cap(self) -> None:
        """
        With C{max_client_connections: 3} and three connections open, the
        next one is closed at once, counted and logged; once one of the
        three closed, a request is served.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(
            self,
            config={
                "max_client_connections": 3,
                "metrics_listen": "tcp:port=0:interface=127.0.0.1",
                "routes": [proxy_route(mock)],
            },
        )
        port = await metrics_port(daemon)

        async def open_connections(count: int) -> None:
            while sample(await in_thread(scrape, port), "aiproxy_client_connections") != count:
                await sleep(0.05)

        held = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(3)]
        try:
            await open_connections(3)

            def refused() -> bytes:
                """
                What a new connection reads: nothing, as it is closed or
                reset (even before C{connect} returns) at once.
                """
                try:
                    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
                        return sock.recv(100)
                except ConnectionResetError:
                    return b""

            self.assertEqual(await in_thread(refused), b"")
            await daemon.wait_for_line("max_client_connections 3")
            samples = await in_thread(scrape, port)
            self.assertEqual(sample(samples, "aiproxy_client_connections_refused_total"), 1)
            self.assertEqual(sample(samples, "aiproxy_client_connections"), 3)
        finally:
            for sock in held:
                sock.close()
        await open_connections(0)
        response = await in_thread(http_call, daemon.port, body=CHAT)
        self.assertEqual(response.status, 200)
