"""
End-to-end test harness: the real C{twistd aiproxy} daemon in a child
process, the mock upstream in the test's own reactor, and blocking clients
run in threads.

Use it from a trial L{twisted.trial.unittest.TestCase} (real reactor) with
C{async def} tests::

    from tests.daemon import http_call, in_thread, proxy_route, start_daemon, start_mock

    class MyTests(TestCase):
        async def test_stream(self) -> None:
            mock = await start_mock(self)
            daemon = await start_daemon(self, [proxy_route(mock, streaming_flush_interval_ms=0)])
            response = await in_thread(
                http_call, daemon.port, body={"messages": [...], "stream": True},
                headers={"x-mock-events": "3"},
            )
            self.assertEqual(response.status, 200)        # response.chunks: the HTTP chunks
            self.assertEqual(mock.stats()["requests"], 1)  # as GET /_mock/stats shows them
            record = (await daemon.wait_for_records(1))[0]  # the access record

Everything started is stopped by the test's cleanups (the daemon with
SIGTERM, then SIGKILL if it lingers; the mock after its last connection is
gone), so trial finds a clean reactor after each test. Trial cleans the
reactor after every test, so a daemon cannot outlive its test: put several
routes in one config and check related behaviours in one test where the
daemon's start-up time (about a second) matters.

Blocking code (the C{openai} SDK, L{RawHTTPClient}, L{http_call}) must run
in a thread with L{in_thread}, so that the in-process mock keeps serving.
The mock is a L{MockUpstream} on a site of our own rather than
L{aiproxy.testing.upstream.start_mock_upstream}'s, so that cleanup can wait
for its connections to close.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from aiproxy.testing.upstream import MockUpstream
from tests.helpers import write_config

__all__ = [
    "REPO_ROOT",
    "ROUTE_API_KEY",
    "ChildProcess",
    "Daemon",
    "MockServer",
    "RawHTTPClient",
    "RawResponse",
    "closed_port",
    "http_call",
    "IncompleteResponse",
    "in_thread",
    "proxy_route",
    "run_command",
    "sleep",
    "start_daemon",
    "start_mock",
    "twistd_command",
    "wait_until",
]

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The upstream credential of the routes L{proxy_route} builds: it must never
#: appear in anything the daemon prints.
ROUTE_API_KEY = "sk-e2e-route-secret-0123456789abcdef"

_PORT_LINE = re.compile(r"GatewaySite starting on (\d+)")


# -- time -------------------------------------------------------------------------


async def sleep(seconds: float) -> None:
    """
    Let the reactor run for C{seconds}.
    """
    await deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02, what: str = ""
) -> Any:
    """
    Poll C{predicate} until it returns something true, and return that.

    @raise AssertionError: when C{timeout} seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await sleep(interval)


def in_thread(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    """
    Run blocking C{f(*args, **kwargs)} in the reactor's thread pool.
    """
    return deferToThread(f, *args, **kwargs)


# -- the mock upstream --------------------------------------------------------------


class _TrackingSite(Site):
    """
    A site that remembers its connections, so that a test can wait until
    the daemon's connections to it are really closed.
    """

    noisy = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections.append(protocol)
        return protocol

    def open_transports(self) -> list[Any]:
        """
        The transports of the connections not closed yet.
        """
        transports = []
        for protocol in self.connections:
            # Site wraps its HTTPChannel in a _GenericHTTPChannelProtocol.
            transport = getattr(getattr(protocol, "_channel", protocol), "transport", None)
            if transport is not None and not transport.disconnected:
                transports.append(transport)
        return transports


@dataclass
class MockServer:
    """
    The mock upstream (L{aiproxy.testing.upstream}) listening on a free
    loopback port in the test's reactor.

    @ivar upstream: its state: C{upstream.stats} (L{MockStats}) and
        C{upstream.requests} (recorded requests).
    """

    upstream: MockUpstream
    port: int
    site: _TrackingSite
    listening: Any

    def url(self, path: str = "/v1/chat/completions") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stats(self) -> dict[str, int]:
        """
        The counters, as C{GET /_mock/stats} shows them.
        """
        return self.upstream.stats.as_dict()

    def requests(self) -> list[dict[str, Any]]:
        """
        The recorded requests, as C{GET /_mock/requests} shows them.
        """
        return [record.as_dict() for record in self.upstream.requests]

    async def stop(self) -> None:
        """
        Stop listening and wait until every connection to the mock closed.
        """
        await self.listening.stopListening()
        for transport in self.site.open_transports():
            transport.loseConnection()
        await wait_until(
            lambda: not self.site.open_transports(), 5, what="mock connections to close"
        )


async def start_mock(testcase: TestCase) -> MockServer:
    """
    Start a mock upstream on a free loopback port, stopped by the test's
    cleanup.
    """
    upstream = MockUpstream(reactor)
    site = _TrackingSite(upstream.resource())
    listening = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    mock = MockServer(upstream, listening.getHost().port, site, listening)
    testcase.addCleanup(lambda: Deferred.fromCoroutine(mock.stop()))
    return mock


def closed_port() -> int:
    """
    A loopback port nothing listens on (bound, then released).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- config ------------------------------------------------------------------------------


def proxy_route(
    mock: MockServer | None = None,
    route_id: str = "chat",
    uri: str = "/v1/chat/completions",
    endpoint: str | None = None,
    plugins: Mapping[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """
    A route document with an C{ai-proxy} (provider openai, an
    C{Authorization} header with L{ROUTE_API_KEY}) sending to the mock's
    chat completions, or to C{endpoint}.

    @param fields: more C{ai-proxy} fields (C{streaming_flush_interval_ms=0}...).
    """
    if endpoint is None:
        assert mock is not None
        endpoint = mock.url()
    conf: dict[str, Any] = {
        "provider": "openai",
        "auth": {"header": {"Authorization": f"Bearer {ROUTE_API_KEY}"}},
        "override": {"endpoint": endpoint},
    }
    conf.update(fields)
    return {"id": route_id, "uri": uri, "plugins": {"ai-proxy": conf, **(plugins or {})}}


# -- the daemon ----------------------------------------------------------------------------


def twistd_command() -> list[str]:
    """
    The command starting C{twistd}: the script next to the running Python,
    else Python running twistd's entry point.
    """
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    The test's environment with the repository first on C{PYTHONPATH}
    (aiproxy and its twistd dropin need not be installed).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ChildProcess(ProcessProtocol):
    """
    A child process whose output is collected line by line.

    @ivar lines: everything it printed, one entry per line, in order
        (stdout and stderr mixed).
    @ivar exit_code: its exit status once it ended (C{-N} when killed by
        signal N).
    @ivar ended: fires when the process ended.
    """

    def __init__(self, command: list[str], env: Mapping[str, str] | None = None) -> None:
        self.command = command
        self.env = child_environment(env)
        self.lines: list[str] = []
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._partial = {1: b"", 2: b""}
        self.exit_code: int | None = None
        self.ended: Deferred[None] = Deferred()
        self.running = False

    def childDataReceived(self, fd: int, data: bytes) -> None:
        data = self._partial.get(fd, b"") + data
        *complete, self._partial[fd] = data.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self.lines.append(line)
            (self.stdout_lines if fd == 1 else self.stderr_lines).append(line)
            self.line_received(line)

    def line_received(self, line: str) -> None:
        """
        Called for each line printed; override to watch the output.
        """

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in list(self._partial.items()):
            if rest:
                self.childDataReceived(fd, b"\n")
        self.running = False
        if reason.check(ProcessDone):
            self.exit_code = 0
        elif reason.check(ProcessTerminated):
            value = reason.value
            self.exit_code = value.exitCode if value.exitCode is not None else -value.signal
        self.ended.callback(None)

    def spawn(self) -> None:
        """
        Start the process, in the repository root.
        """
        self.transport = reactor.spawnProcess(
            self, self.command[0], self.command, env=self.env, path=str(REPO_ROOT)
        )
        self.running = True

    @property
    def process(self) -> Any:
        """
        The process transport (once spawned).
        """
        assert self.transport is not None, "not spawned"
        return self.transport

    @property
    def pid(self) -> int:
        return self.process.pid  # type: ignore[no-any-return]

    async def wait_exit(self, timeout: float = 10.0) -> int | None:
        """
        Wait for the process to end by itself; its exit status.
        """
        await wait_until(lambda: not self.running, timeout, what=f"{self.command} to exit")
        return self.exit_code

    async def stop(self, timeout: float = 10.0) -> None:
        """
        SIGTERM, and SIGKILL if it is still running after C{timeout}.
        """
        if not self.running:
            return
        self.process.signalProcess("TERM")
        try:
            await wait_until(lambda: not self.running, timeout, what=f"{self.command} to stop")
        except AssertionError:
            if self.running:
                self.process.signalProcess("KILL")
            await self.ended

    def signal(self, name: str) -> None:
        """
        Send a signal (C{"HUP"}, C{"TERM"}, ...).
        """
        self.process.signalProcess(name)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def rss_kb(self) -> int:
        """
        The process's resident memory (C{VmRSS}), in KiB (Linux).
        """
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


class Daemon(ChildProcess):
    """
    A C{twistd -n --pidfile= aiproxy --config PATH ...} child process.

    @ivar listening_port: the TCP port of its first listener, from its
        C{GatewaySite starting on <port>} line; L{None} until then.
    """

    def __init__(
        self, config: Path, args: Iterable[str] = (), env: Mapping[str, str] | None = None
    ) -> None:
        self.config = config
        command = twistd_command() + ["-n", "--pidfile=", "aiproxy", "--config", str(config), *args]
        super().__init__(command, env)
        self.listening_port: int | None = None

    @property
    def port(self) -> int:
        """
        The TCP port of its first listener (once started).
        """
        assert self.listening_port is not None, "the daemon is not listening"
        return self.listening_port

    def line_received(self, line: str) -> None:
        if self.listening_port is None:
            match = _PORT_LINE.search(line)
            if match:
                self.listening_port = int(match.group(1))

    async def start(self, timeout: float = 20.0) -> Daemon:
        """
        Start the process and wait until it listens.

        @raise AssertionError: it exited or did not listen in time; the
            message holds what it printed.
        """
        self.spawn()
        try:
            await wait_until(
                lambda: self.listening_port is not None or not self.running,
                timeout,
                what="the daemon to listen",
            )
        except AssertionError:
            raise AssertionError("daemon did not start:\n" + self.output) from None
        if self.listening_port is None:
            raise AssertionError(f"daemon exited with {self.exit_code}:\n" + self.output)
        return self

    def url(self, path: str = "/v1/chat/completions") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def access_records(self) -> list[dict[str, Any]]:
        """
        The access records printed so far: the bare JSON object lines of
        stdout.
        """
        records = []
        for line in self.stdout_lines:
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
        return records

    async def wait_for_records(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """
        Wait until at least C{count} access records were printed; all of them.
        """
        await wait_until(
            lambda: len(self.access_records()) >= count, timeout, what=f"{count} access records"
        )
        return self.access_records()

    async def wait_for_line(self, text: str, timeout: float = 5.0) -> str:
        """
        Wait for a printed line containing C{text}; that line.
        """
        return await wait_until(  # type: ignore[no-any-return]
            lambda: next((line for line in self.lines if text in line), None),
            timeout,
            what=repr(text),
        )


async def start_daemon(
    testcase: TestCase,
    routes: Iterable[Mapping[str, Any]] | None = None,
    config: Mapping[str, Any] | str | None = None,
    args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    listen: str = "tcp:port=0:interface=127.0.0.1",
) -> Daemon:
    """
    Write a config and start C{twistd -n --pidfile= aiproxy --config X
    --listen ...} on a free loopback port; the test's cleanup stops it.

    @param routes: the route documents (see L{proxy_route}).
    @param config: a whole config document or YAML text instead.
    @param args: more C{aiproxy} options.
    """
    if config is None:
        config = {"routes": list(routes or [])}
    path = write_config(Path(testcase.mktemp()).resolve(), config)
    daemon = Daemon(path, ["--listen", listen, *args], env)
    testcase.addCleanup(lambda: Deferred.fromCoroutine(daemon.stop()))
    await daemon.start()
    return daemon


async def run_command(
    testcase: TestCase,
    command: list[str],
    timeout: float = 20.0,
    env: Mapping[str, str] | None = None,
) -> tuple[int | None, str]:
    """
    Run a command in the repository root with the test environment and
    wait for it; its exit status and output (stdout and stderr).
    """
    process = ChildProcess(command, env)
    testcase.addCleanup(lambda: Deferred.fromCoroutine(process.stop()))
    process.spawn()
    code = await process.wait_exit(timeout)
    return code, process.output


# -- blocking clients (run them with in_thread) ------------------------------------------------


class IncompleteResponse(Exception):
    """
    The connection closed before the response was complete.
    """


@dataclass
class RawResponse:
    """
    A response read by L{RawHTTPClient}.

    @ivar chunks: the HTTP chunks of a chunked body, each with the
        C{time.monotonic()} at which it was complete.
    @ivar complete: the body ended with its terminating chunk (or had all
        its C{Content-Length}); L{False} when the connection closed first.
    """

    status: int
    reason: str
    headers: dict[str, str]
    chunks: list[bytes] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    complete: bool = False
    body_bytes: bytes | None = None

    @property
    def body(self) -> bytes:
        return self.body_bytes if self.body_bytes is not None else b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)


class RawHTTPClient:
    """
    A blocking HTTP/1.1 client on a raw socket that shows the chunked
    framing: one L{read_chunk} per HTTP chunk the server wrote.
    """

    def __init__(self, port: int, timeout: float = 10.0, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self._buffer = bytearray()
        self.eof = False

    def send_request(
        self,
        method: str = "POST",
        path: str = "/v1/chat/completions",
        body: bytes | Mapping[str, Any] | None = None,
        headers: Mapping[str, str | None] | None = None,
        send_body: bool = True,
    ) -> None:
        """
        Send a request; a mapping body is sent as JSON with a
        C{Content-Type: application/json} unless C{headers} names another;
        a header given as L{None} is not sent.
        """
        raw = json.dumps(body).encode() if isinstance(body, Mapping) else (body or b"")
        all_headers = {"Host": "127.0.0.1", "Content-Length": str(len(raw))}
        if isinstance(body, Mapping):
            all_headers["Content-Type"] = "application/json"
        for name, value in (headers or {}).items():
            for existing in [k for k in all_headers if k.lower() == name.lower()]:
                del all_headers[existing]
            if value is not None:
                all_headers[name] = value
        head = (
            f"{method} {path} HTTP/1.1\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in all_headers.items())
            + "\r\n"
        )
        self.sock.sendall(head.encode("latin-1") + (raw if send_body else b""))

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self._buffer += data
        return True

    def _line(self) -> bytes:
        start = 0
        while (end := self._buffer.find(b"\r\n", start)) == -1:
            start = max(len(self._buffer) - 1, 0)
            if not self._fill():
                raise IncompleteResponse(bytes(self._buffer))
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not self._fill():
                raise IncompleteResponse(bytes(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read_head(self) -> RawResponse:
        """
        Read the status line and headers (names lower-cased).
        """
        status_line = self._line().decode("latin-1")
        _, status, reason = (status_line.split(" ", 2) + [""])[:3]
        headers: dict[str, str] = {}
        while True:
            line = self._line().decode("latin-1")
            if not line:
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return RawResponse(int(status), reason, headers)

    def read_chunk(self) -> bytes | None:
        """
        The next HTTP chunk; L{None} for the terminating chunk.

        @raise IncompleteResponse: the connection closed first.
        """
        size = int(self._line().split(b";")[0], 16)
        if size == 0:
            self._line()
            return None
        data = self._exact(size)
        self._exact(2)
        return data

    def read_body(self, response: RawResponse, max_chunks: int | None = None) -> RawResponse:
        """
        Read the rest of the body into C{response}: chunk by chunk (up to
        C{max_chunks}), by C{Content-Length}, or up to the close.
        """
        if "content-length" in response.headers:
            try:
                response.body_bytes = self._exact(int(response.headers["content-length"]))
                response.complete = True
            except IncompleteResponse as e:
                response.body_bytes = e.args[0]
            return response
        if response.headers.get("transfer-encoding") != "chunked":
            while self._fill():
                pass
            response.body_bytes = bytes(self._buffer)
            del self._buffer[:]
            return response
        while max_chunks is None or len(response.chunks) < max_chunks:
            try:
                chunk = self.read_chunk()
            except IncompleteResponse:
                return response
            if chunk is None:
                response.complete = True
                return response
            response.chunks.append(chunk)
            response.times.append(time.monotonic())
        return response

    def close(self) -> None:
        self.sock.close()


def http_call(
    port: int,
    method: str = "POST",
    path: str = "/v1/chat/completions",
    body: bytes | Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> RawResponse:
    """
    One whole request and response on a new connection (blocking).
    """
    client = RawHTTPClient(port, timeout)
    try:
        client.send_request(method, path, body, headers)
        return client.read_body(client.read_head())
    finally:
        client.close()
