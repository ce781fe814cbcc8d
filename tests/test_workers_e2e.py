# -*- test-case-name: tests.test_workers_e2e -*-
"""
End-to-end tests of worker processes through the real C{twistd aiproxy
--workers 2}: requests answered by both workers, a killed worker restarted
and serving again, C{/metrics} summing both, C{SIGHUP} with an invalid and
a valid config, C{SIGTERM} with streams in flight, and a UNIX socket shared
by the workers.

Which worker answered is the access record's C{worker} key (its pid); the
parent logs C{worker <index> started (pid <pid>)}.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.daemon import (
    Daemon,
    http_call,
    in_thread,
    proxy_route,
    start_daemon,
    start_mock,
    wait_until,
)
from tests.helpers import data_events, write_config
from tests.test_ops_e2e import CHAT, contents, metrics_port, open_stream, refused, sample, scrape
from tests.test_systemd import _ActivatedDaemon

WORKERS = ["--workers", "2"]

_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")

#: A text line: a timestamp, then the system in brackets.
_TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] ")


def started(daemon: Daemon) -> dict[int, int]:
    """
    The pid of each worker index, as last started.
    """
    pids: dict[int, int] = {}
    for line in daemon.lines:
        match = _STARTED.search(line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def serving(daemon: Daemon, pid: int) -> bool:
    """
    Whether worker C{pid} logged that it accepts on the shared socket.
    """
    return any(f"pid {pid} " in line and "GatewaySite starting on" in line for line in daemon.lines)


async def workers_serving(daemon: Daemon, count: int = 2) -> dict[int, int]:
    """
    Wait until C{count} workers accept; their pids by index.
    """
    await wait_until(
        lambda: (
            len(started(daemon)) == count
            and all(serving(daemon, pid) for pid in started(daemon).values())
        ),
        20,
        what=f"{count} workers to serve",
    )
    return started(daemon)


async def answered_by(
    testcase: TestCase, daemon: Daemon, pids: set[int], path: str = "/v1/chat/completions"
) -> int:
    """
    Send requests, each on a new connection, until each of C{pids} answered
    one with 200; how many were sent.
    """
    seen: set[int] = set()
    sent = 0
    while not pids <= seen:
        testcase.assertLess(sent, 200, f"only {seen} of {pids} answered")
        before = len(daemon.access_records())
        response = await in_thread(http_call, daemon.port, "POST", path, CHAT)
        testcase.assertEqual(response.status, 200, response.body)
        sent += 1
        records = await daemon.wait_for_records(before + 1)
        seen |= {record["worker"] for record in records[before:]}
    return sent


def assert_whole_lines(testcase: TestCase, daemon: Daemon) -> None:
    """
    Every line printed is a whole JSON object or a whole text line.
    """
    for line in daemon.stdout_lines:
        if line.startswith("{"):
            testcase.assertIsInstance(json.loads(line), dict)
        elif line.strip():
            testcase.assertRegex(line, _TEXT_LINE)


class ServeTests(TestCase):
    """
    Two workers share the listener; one that dies is restarted; the
    metrics count both.
    """

    async def test_serve_restart_metrics(self) -> None:
        """
        Requests are answered by both workers (the records name them, the
        responses do not); C{/metrics}, served once by the parent, sums
        both; a worker killed with SIGKILL is logged with its pid and
        signal, restarted, and serves again, the counters going on from
        where they were.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(
            self,
            config={
                "metrics_listen": "tcp:port=0:interface=127.0.0.1",
                "routes": [proxy_route(mock)],
            },
            args=WORKERS,
        )
        pids = await workers_serving(daemon)
        sent = await answered_by(self, daemon, set(pids.values()))
        response = await in_thread(http_call, daemon.port, "POST", "/v1/chat/completions", CHAT)
        self.assertNotIn("worker", " ".join(response.headers))
        for pid in pids.values():
            self.assertNotIn(str(pid), json.dumps(response.headers))
        sent += 1
        await daemon.wait_for_records(sent)

        port = await metrics_port(daemon)
        labels = {"route": "chat", "instance": "ai-proxy-openai", "request_type": "ai_chat"}
        samples = await in_thread(scrape, port)
        self.assertEqual(sample(samples, "aiproxy_requests_total", status="200", **labels), sent)
        self.assertEqual(sample(samples, "aiproxy_workers"), 2)
        self.assertEqual(sample(samples, "aiproxy_in_flight_requests"), 0)
        self.assertEqual(len(await in_thread(scrape, port)), len(samples))

        os.kill(pids[0], 9)
        await daemon.wait_for_line(f"worker 0 (pid {pids[0]}) died after")
        line = await daemon.wait_for_line(f"pid {pids[0]}) died")
        self.assertIn("signal 9 (SIGKILL); restarting it in 0.5 s", line)
        await wait_until(lambda: started(daemon)[0] != pids[0], 10, what="the restart")
        pids = await workers_serving(daemon)
        samples = await in_thread(scrape, port)
        self.assertEqual(sample(samples, "aiproxy_requests_total", status="200", **labels), sent)
        self.assertEqual(sample(samples, "aiproxy_worker_restarts_total"), 1)

        sent += await answered_by(self, daemon, {pids[0]})
        samples = await in_thread(scrape, port)
        self.assertEqual(sample(samples, "aiproxy_requests_total", status="200", **labels), sent)
        assert_whole_lines(self, daemon)


class ReloadTests(TestCase):
    """
    C{SIGHUP} to the parent: it checks the config once; the workers reload
    only a valid one.
    """

    async def test_invalid_then_valid(self) -> None:
        """
        An invalid config is refused by the parent, each problem logged,
        and no worker reloads: the old route still answers. A valid one is
        reloaded by every worker: both answer on the new route, none on the
        old one.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock, route_id="old")], args=WORKERS)
        await workers_serving(daemon)
        write_config(
            daemon.config.parent, {"routes": [proxy_route(mock, streaming_flush_interval_ms=-1)]}
        )
        daemon.signal("HUP")
        line = await daemon.wait_for_line("reload refused")
        self.assertIn("streaming_flush_interval_ms: -1 is less than the minimum of 0", line)
        await daemon.wait_for_line("still serving the previous configuration")
        response = await in_thread(http_call, daemon.port, "POST", "/v1/chat/completions", CHAT)
        self.assertEqual(response.status, 200)
        self.assertNotIn("SIGHUP: reloading", daemon.output)

        write_config(
            daemon.config.parent,
            {"routes": [proxy_route(mock, route_id="new", uri="/v2/chat/completions")]},
        )
        daemon.signal("HUP")
        await wait_until(
            lambda: daemon.output.count("] reloaded ") == 2, 10, what="both workers to reload"
        )
        pids = started(daemon)
        await answered_by(self, daemon, set(pids.values()), "/v2/chat/completions")
        for _ in range(4):
            old = await in_thread(http_call, daemon.port, "POST", "/v1/chat/completions", CHAT)
            self.assertEqual(old.status, 404)
        self.assertTrue(daemon.running)


class StopTests(TestCase):
    """
    C{SIGTERM} to the parent: every worker drains, the parent exits 0.
    """

    async def test_streams_in_flight(self) -> None:
        """
        Streams in flight at SIGTERM all complete intact while new
        connections are refused; every worker exits 0, then the parent
        does, and the records show no abort.
        """
        mock = await start_mock(self)
        daemon = await start_daemon(self, [proxy_route(mock)], args=WORKERS)
        pids = await workers_serving(daemon)
        streams = [
            await open_stream(self, daemon.port, events="25", delay_ms="40") for _ in range(6)
        ]
        daemon.signal("TERM")
        await wait_until(
            lambda: daemon.output.count("SIGTERM: shutting down gracefully") == 2,
            5,
            what="both workers to drain",
        )
        # The parent's copy of the listener and both workers' are closed.
        await wait_until(
            lambda: daemon.output.count(f"(TCP Port {daemon.port} Closed)") == 3,
            5,
            what="the listener to close",
        )
        self.assertTrue(await in_thread(refused, daemon.port))
        for stream in streams:
            response = await in_thread(stream.read)
            self.assertTrue(response.complete)
            self.assertEqual(contents(response.body), [f"tok{i} " for i in range(25)])
            self.assertEqual(data_events(response.body)[-1], b"[DONE]")
        self.assertEqual(await daemon.wait_exit(20), 0, daemon.output)
        for index, pid in pids.items():
            self.assertIn(f"worker {index} (pid {pid}) exited: exit status 0", daemon.output)
        records = daemon.access_records()
        self.assertEqual(len(records), 6)
        self.assertEqual([record["abort_reason"] for record in records], [None] * 6)
        self.assertNotIn("Traceback", daemon.output)
        assert_whole_lines(self, daemon)


def unix_get(path: str) -> int:
    """
    C{GET /nowhere} over the UNIX socket at C{path}; the status. Blocking.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        client.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


class UNIXSocketTests(TestCase):
    """
    Workers share a UNIX listener without changing its file.
    """

    async def test_shared(self) -> None:
        """
        The socket file keeps the mode the parent gave it, and outlives a
        worker that stops: the restarted worker and the other one still
        answer on it.
        """
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        path = str(directory / "aiproxy.sock")
        config = write_config(directory, {"routes": []})
        daemon = Daemon(config, ["--listen", f"unix:{path}:mode=600", *WORKERS])
        self.addCleanup(lambda: Deferred.fromCoroutine(daemon.stop()))
        daemon.spawn()
        pids = await workers_serving(daemon)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(await in_thread(unix_get, path), 404)

        os.kill(pids[1], 15)
        await daemon.wait_for_line(f"worker 1 (pid {pids[1]}) died after", 10)
        self.assertTrue(os.path.exists(path))
        await wait_until(lambda: started(daemon)[1] != pids[1], 10, what="the restart")
        await workers_serving(daemon)
        statuses: list[Any] = [await in_thread(unix_get, path) for _ in range(4)]
        self.assertEqual(statuses, [404] * 4)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        daemon.signal("TERM")
        self.assertEqual(await daemon.wait_exit(15), 0, daemon.output)
        self.assertFalse(os.path.exists(path))


class SocketActivationTests(TestCase):
    """
    Under systemd the parent receives the socket and passes it on.
    """

    async def test_activated(self) -> None:
        """
        The parent adopts the socket systemd passed, its workers answer on
        it, and after SIGTERM (exit 0) the socket, still systemd's, accepts
        connections for the next start.
        """
        mock = await start_mock(self)
        config = write_config(Path(self.mktemp()).resolve(), {"routes": [proxy_route(mock)]})
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        os.set_inheritable(sock.fileno(), True)
        self.addCleanup(sock.close)
        port = sock.getsockname()[1]
        daemon = _ActivatedDaemon(config, sock)
        daemon.command += WORKERS
        self.addCleanup(lambda: Deferred.fromCoroutine(daemon.stop()))
        daemon.spawn()
        try:
            pids = await workers_serving(daemon)
        except AssertionError:
            raise AssertionError(daemon.output) from None
        answer = await in_thread(http_call, port, "POST", "/v1/chat/completions", CHAT, None, 20)
        self.assertEqual(answer.status, 200)
        await wait_until(lambda: any(line.startswith("{") for line in daemon.stdout_lines), 5)
        [record] = [json.loads(line) for line in daemon.stdout_lines if line.startswith("{")]
        self.assertIn(record["worker"], set(pids.values()))
        daemon.signal("TERM")
        self.assertEqual(await daemon.wait_exit(15), 0, daemon.output)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
