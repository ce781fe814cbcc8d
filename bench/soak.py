"""
Soak test: many concurrent streams through the real daemon for a while, every
byte checked.

It starts the mock upstream (C{python -m aiproxy.testing.upstream}) and the
daemon (C{twistd -n aiproxy}) as child processes, unless given their URLs,
then keeps C{--streams} streams open at once for C{--duration} seconds with
three kinds of clients:

  - fast readers read as fast as the stream comes (seeded text, 30-90 ms
    between upstream events);
  - slow readers have a 4 KiB receive buffer and pause after every read, so
    that backpressure reaches the daemon and the upstream (larger streams
    written in bursts);
  - disconnecting clients drop the connection after a few events (half with
    a reset, half with a close).

Fast and slow readers keep one connection for many streams; disconnecting
clients open one per stream. Each request asks the mock for deterministic
content (C{x-mock-*} headers derived from a per-request seed), and the mock
numbers its answers (C{x-request-id: mock-N}, relayed by the daemon), so the
exact bytes the mock sent are rebuilt with the mock's own code and every
completed stream is compared with them byte for byte; what a disconnecting
client received must be a prefix of them. At the end it reports bytes lost
or duplicated (must be 0), the daemon's peak RSS and RSS per stream, events
per second, and whether the upstream saw every aborted stream closed (the
mock's counters, and the daemon's access records).

    python bench/soak.py [--streams 1000] [--duration 60] [--mix 60,25,15]
    python bench/soak.py --daemon-url http://127.0.0.1:9080 --mock-url http://127.0.0.1:7751 --daemon-pid N

With given URLs the daemon must route C{/v1/chat/completions} to the mock
(C{override.endpoint} = the mock's C{/v1/chat/completions}) without changing
the request body otherwise (no C{options}, no C{override.request_body}), and
no other client should use the mock meanwhile (its counters are compared).
Exit status 0 when nothing was lost, duplicated or corrupted and every
aborted stream was closed upstream; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import reactor as _reactor  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.internet.task import LoopingCall, deferLater, react  # noqa: E402

from aiproxy.testing.upstream import (  # noqa: E402
    MockControls,
    _ChatCompletions,
    _headers,
    _stream_reply,
    _Turn,
)

__all__ = ["expected_body", "main"]

reactor: Any = _reactor

_WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega stream token proxy twisted gateway soak byte event ünïcödé 漢字 🙂"
).split()


# -- what the mock sends -------------------------------------------------------------------


def expected_body(number: int, payload: dict[str, Any], controls: MockControls) -> bytes:
    """
    The exact body the mock upstream streams as its answer number C{number}
    to C{payload} (as the upstream receives it) with C{controls}, rebuilt
    with the mock's own code.
    """
    turn = _Turn(number, payload, controls)
    reply = _stream_reply(_headers(number), _ChatCompletions().stream(turn), controls)
    stream = reply.body
    return b"".join(stream.comments) + b"".join(stream.events)  # type: ignore[union-attr]


@dataclass
class Plan:
    """
    One stream to ask for.
    """

    kind: str
    seed: int
    body: dict[str, Any]
    headers: dict[str, str]
    controls: MockControls
    disconnect_after: int = 0
    reset: bool = False
    pause: float = 0.0


def make_plan(kind: str, seed: int) -> Plan:
    """
    The request of stream C{seed} for a client of C{kind}: its controls and
    text come from the seed.
    """
    rng = random.Random(seed)
    body = {
        "model": f"soak-{seed % 7}",
        "messages": [{"role": "user", "content": f"soak {seed}"}],
        "stream": True,
    }
    if kind == "slow":
        controls = MockControls(events=rng.randint(150, 400), delay_ms=rng.randint(0, 5), burst=20)
        headers = {
            "x-mock-events": str(controls.events),
            "x-mock-delay-ms": str(controls.delay_ms),
            "x-mock-burst": "20",
        }
        return Plan(kind, seed, body, headers, controls, pause=rng.uniform(0.03, 0.12))
    events = rng.randint(10, 40) if kind == "fast" else rng.randint(80, 200)
    delay = rng.randint(30, 90) if kind == "fast" else rng.randint(20, 40)
    text = " ".join(rng.choice(_WORDS) for _ in range(events * 3))
    controls = MockControls(events=events, delay_ms=delay, text=text)
    headers = {"x-mock-events": str(events), "x-mock-delay-ms": str(delay), "x-mock-text": text}
    plan = Plan(kind, seed, body, headers, controls)
    if kind == "disconnect":
        plan.disconnect_after = rng.randint(2000, 8000)
        plan.reset = rng.random() < 0.5
    return plan


def request_bytes(plan: Plan, host: str, keep_alive: bool) -> bytes:
    raw = json.dumps(plan.body).encode()
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(raw)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in plan.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + raw


# -- HTTP/1.1 on the client side -------------------------------------------------------------


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """
    Status, headers (lower-cased names), body (de-chunked, up to what
    arrived) and whether the body is complete.
    """
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        length = int(headers["content-length"])
        return status, headers, rest[:length], len(rest) >= length
    body = bytearray()
    position = 0
    while True:
        end = rest.find(b"\r\n", position)
        if end < 0:
            return status, headers, bytes(body), False
        size = int(rest[position:end].split(b";")[0] or b"0", 16)
        start = end + 2
        if size == 0:
            return status, headers, bytes(body), rest[start : start + 2] == b"\r\n"
        body += rest[start : start + size]
        if len(rest) < start + size + 2:
            return status, headers, bytes(body), False
        position = start + size + 2


def _response_ended(buffer: bytearray, head_end: int) -> bool:
    """
    Whether C{buffer}, whose head ends at C{head_end}, holds a whole
    response (a chunked one ends with the terminating chunk; one with a
    length has all of it).
    """
    if buffer.endswith(b"\r\n0\r\n\r\n") or buffer[head_end + 4 :] == b"0\r\n\r\n":
        return True
    head = bytes(buffer[:head_end]).lower()
    marker = head.find(b"content-length:")
    if marker >= 0:
        length = int(head[marker + 15 :].split(b"\r\n", 1)[0])
        return len(buffer) - head_end - 4 >= length
    return False


class StreamClient(Protocol):
    """
    One client connection: sends a request, reads its response as the
    client's kind reads, and fires C{current} with the raw bytes and
    whether the connection is still usable.
    """

    transport: Any

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.buffer = bytearray()
        self.head_end = -1
        self.current: Deferred[tuple[bytes, bool]] | None = None
        self.plan: Plan | None = None
        self.connected_ = False
        self._resume_call: Any = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.connected_ = True
        if self.kind == "slow":
            sock = self.transport.getHandle()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def ask(self, plan: Plan, host: str) -> Deferred[tuple[bytes, bool]]:
        self.plan = plan
        self.buffer = bytearray()
        self.head_end = -1
        self.current = Deferred()
        self.transport.write(request_bytes(plan, host, keep_alive=self.kind != "disconnect"))
        return self.current

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        plan = self.plan
        if plan is None or self.current is None:
            return
        if self.kind == "disconnect":
            if len(self.buffer) >= plan.disconnect_after:
                if plan.reset:
                    self.transport.abortConnection()
                else:
                    self.transport.loseConnection()
                self._fire(False)
            return
        if self.head_end < 0:
            self.head_end = self.buffer.find(b"\r\n\r\n")
        if self.head_end >= 0 and _response_ended(self.buffer, self.head_end):
            self._fire(True)
            return
        if self.kind == "slow" and self._resume_call is None:
            self.transport.pauseProducing()
            self._resume_call = reactor.callLater(plan.pause, self._resume)

    def _resume(self) -> None:
        self._resume_call = None
        if self.connected_:
            self.transport.resumeProducing()

    def _fire(self, reusable: bool) -> None:
        current, self.current = self.current, None
        if current is not None:
            current.callback((bytes(self.buffer), reusable))

    def connectionLost(self, reason: Any = None) -> None:
        self.connected_ = False
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._fire(False)
        self.lost.callback(None)


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Totals:
    streams: Counter[str] = field(default_factory=Counter)
    completed: int = 0
    disconnects: int = 0
    early_ends: int = 0
    bytes_expected: int = 0
    bytes_received: int = 0
    bytes_lost: int = 0
    bytes_duplicated: int = 0
    corrupted: int = 0
    bad_status: Counter[int] = field(default_factory=Counter)
    events: int = 0
    failures: list[str] = field(default_factory=list)
    numbers: set[int] = field(default_factory=set)
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def fail(self, message: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(message)


def upstream_payload(plan: Plan) -> dict[str, Any]:
    """
    The body as the mock receives it: the daemon adds
    C{stream_options.include_usage} to streamed OpenAI chat requests.
    """
    return {**plan.body, "stream_options": {"include_usage": True}}


def check(plan: Plan, raw: bytes, complete_expected: bool, totals: Totals) -> None:
    """
    Compare what a client received with what the mock sent.
    """
    totals.streams[plan.kind] += 1
    if not raw:
        totals.early_ends += 1
        totals.fail(f"{plan.kind} seed {plan.seed}: nothing received")
        return
    status, headers, body, complete = parse_response(raw)
    if status != 200:
        totals.bad_status[status] += 1
        totals.fail(f"{plan.kind} seed {plan.seed}: status {status}: {body[:200]!r}")
        return
    request_id = headers.get("x-request-id", "")
    if not request_id.startswith("mock-"):
        totals.corrupted += 1
        totals.fail(f"{plan.kind} seed {plan.seed}: no x-request-id")
        return
    number = int(request_id[5:])
    if number in totals.numbers:
        totals.corrupted += 1
        totals.fail(f"answer {number} received twice")
    totals.numbers.add(number)
    expected = expected_body(number, upstream_payload(plan), plan.controls)
    totals.bytes_received += len(body)
    totals.events += body.count(b"\n\ndata: ") + (1 if body.startswith(b"data: ") else 0)
    if complete_expected:
        totals.bytes_expected += len(expected)
        if not complete:
            totals.early_ends += 1
            totals.fail(
                f"{plan.kind} seed {plan.seed} (mock-{number}): incomplete, {len(body)}/{len(expected)} bytes"
            )
        if body != expected:
            common = 0
            for a, b in zip(body, expected, strict=False):
                if a != b:
                    break
                common += 1
            if len(body) < len(expected):
                totals.bytes_lost += len(expected) - len(body)
            else:
                totals.bytes_duplicated += len(body) - len(expected)
            if common < min(len(body), len(expected)):
                totals.corrupted += 1
            totals.fail(
                f"{plan.kind} seed {plan.seed} (mock-{number}): {len(body)} bytes, expected {len(expected)}, "
                f"first difference at {common}"
            )
        else:
            totals.completed += 1
    else:
        totals.disconnects += 1
        if not expected.startswith(body):
            totals.corrupted += 1
            totals.fail(
                f"disconnect seed {plan.seed} (mock-{number}): received bytes are not a prefix"
            )


class Soak:
    """
    The clients, their results and the daemon's memory over time.
    """

    def __init__(self, args: argparse.Namespace, host: str, port: int, pid: int | None) -> None:
        self.args = args
        self.host = host
        self.port = port
        self.pid = pid
        self.totals = Totals()
        self.rss: list[int] = []
        self.open_streams = 0
        self.peak_open = 0
        self.seeds = iter(range(1, 10**9))
        self.cpu = 0.0
        self.load = (0.0, 0.0)
        self.results: list[tuple[Plan, bytes]] = []

    def check_all(self) -> float:
        """
        Check every stream received; the seconds it took.
        """
        started = time.monotonic()
        for plan, raw in self.results:
            check(plan, raw, plan.kind != "disconnect", self.totals)
        self.results = []
        return time.monotonic() - started

    def sample(self) -> None:
        if self.pid is not None:
            self.rss.append(rss_kb(self.pid))

    async def connect(self, kind: str) -> StreamClient:
        endpoint = TCP4ClientEndpoint(reactor, self.host, self.port, timeout=30)
        return await connectProtocol(endpoint, StreamClient(kind))

    async def worker(self, kind: str, start_delay: float, deadline: float) -> None:
        await deferLater(reactor, start_delay, lambda: None)
        client: StreamClient | None = None
        while time.monotonic() < deadline:
            if client is None or not client.connected_:
                try:
                    client = await self.connect(kind)
                except Exception as e:  # noqa: BLE001
                    self.totals.fail(f"connect failed: {e}")
                    await deferLater(reactor, 0.5, lambda: None)
                    continue
            plan = make_plan(kind, next(self.seeds))
            self.open_streams += 1
            self.peak_open = max(self.peak_open, self.open_streams)
            asked = time.monotonic()
            raw, reusable = await client.ask(plan, self.host)
            self.totals.seconds.setdefault(kind, []).append(time.monotonic() - asked)
            self.open_streams -= 1
            # Checked after the run, so that checking does not slow the
            # clients down.
            self.results.append((plan, raw))
            if not reusable:
                if client.connected_:
                    client.transport.loseConnection()
                    await client.lost
                client = None
        if client is not None and client.connected_:
            client.transport.loseConnection()
            await client.lost

    async def run(self) -> float:
        args = self.args
        fast, slow, _ = args.mix
        kinds = []
        for index in range(args.streams):
            share = index % 100
            kinds.append(
                "fast" if share < fast else "slow" if share < fast + slow else "disconnect"
            )
        started = time.monotonic()
        deadline = started + args.ramp + args.duration
        sampler = LoopingCall(self.sample)
        sampler.start(0.5)
        await gatherResults(
            [
                Deferred.fromCoroutine(
                    self.worker(kind, args.ramp * index / args.streams, deadline)
                )
                for index, kind in enumerate(kinds)
            ]
        )
        sampler.stop()
        self.sample()
        return time.monotonic() - started


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """
    The user and system CPU time process C{pid} used so far.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"child exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def start_children(args: argparse.Namespace, workdir: Path) -> tuple[Any, Any, str, int, int, str]:
    """
    Start the mock and the daemon; their processes, the mock URL, the
    daemon port and pid, and the daemon's stdout file.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    mock_port = free_port()
    mock = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aiproxy.testing.upstream",
            "--listen",
            f"tcp:port={mock_port}:interface=127.0.0.1:backlog=4096",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "mock.err").open("wb"),
    )
    wait_listening(mock_port, 20, mock)
    mock_url = f"http://127.0.0.1:{mock_port}"
    daemon_port = free_port()
    config = {
        "routes": [
            {
                "id": "soak",
                "uri": "/v1/chat/completions",
                "plugins": {
                    "ai-proxy": {
                        "provider": "openai",
                        "auth": {"header": {"Authorization": "Bearer sk-soak"}},
                        "override": {"endpoint": f"{mock_url}/v1/chat/completions"},
                        "keepalive_pool": args.streams,
                        "streaming_flush_interval_ms": args.flush_ms,
                    }
                },
            }
        ]
    }
    (workdir / "aiproxy.yaml").write_text(json.dumps(config), encoding="utf-8")
    twistd = Path(sys.executable).with_name("twistd")
    command = (
        [str(twistd)]
        if twistd.exists()
        else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    )
    command += [
        "-n",
        "--pidfile=",
        "aiproxy",
        "--config",
        str(workdir / "aiproxy.yaml"),
        "--listen",
        f"tcp:port={daemon_port}:interface=127.0.0.1:backlog=4096",
    ]
    out = workdir / "daemon.out"
    daemon = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=out.open("wb"), stderr=subprocess.STDOUT
    )
    wait_listening(daemon_port, 30, daemon)
    return mock, daemon, mock_url, daemon_port, daemon.pid, str(out)


async def soak(args: argparse.Namespace) -> int:
    limit = raise_fd_limit(4 * args.streams + 1024)
    workdir = Path(tempfile.mkdtemp(prefix="aiproxy-soak-"))
    children: list[subprocess.Popen[bytes]] = []
    daemon_out = None
    if args.daemon_url:
        host_port = args.daemon_url.split("//", 1)[-1].rstrip("/")
        host, _, port_text = host_port.rpartition(":")
        port = int(port_text)
        mock_url = args.mock_url.rstrip("/")
        pid = args.daemon_pid
    else:
        mock, daemon, mock_url, port, pid, daemon_out = start_children(args, workdir)
        children = [daemon, mock]
        host = "127.0.0.1"
    try:
        before = get_json(f"{mock_url}/_mock/stats")
        baseline = rss_kb(pid) if pid else 0
        cpu_before = cpu_seconds(pid) if pid else 0.0
        load_before = os.getloadavg()[0]
        runner = Soak(args, host, port, pid)
        print(
            f"soak: {args.streams} streams for {args.duration:.0f} s (mix fast/slow/disconnect {args.mix}), "
            f"fd limit {limit}, work dir {workdir}",
            flush=True,
        )
        elapsed = await runner.run()
        runner.cpu = (cpu_seconds(pid) - cpu_before) if pid else 0.0
        runner.load = (load_before, os.getloadavg()[0])
        checking = runner.check_all()
        print(f"soak: {elapsed:.1f} s of load, {checking:.1f} s to check the streams", flush=True)
        stats: dict[str, int] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            stats = get_json(f"{mock_url}/_mock/stats")
            if stats["streams_open"] == 0:
                break
            await deferLater(reactor, 0.2, lambda: None)
        records: Counter[tuple[int, Any]] = Counter()
        if daemon_out is not None:
            await deferLater(reactor, 1.0, lambda: None)
            with open(daemon_out, encoding="utf-8", errors="replace") as out:
                text = out.read()
            for line in text.splitlines():
                if line.startswith("{"):
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    records[(record.get("status"), record.get("abort_reason"))] += 1
            crashes = sum(text.count(word) for word in ("Traceback", "Unhandled Error"))
        else:
            crashes = 0
        return report(args, runner, elapsed, baseline, before, stats, records, crashes)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=40)
            except subprocess.TimeoutExpired:
                child.kill()


def report(
    args: argparse.Namespace,
    runner: Soak,
    elapsed: float,
    baseline: int,
    before: dict[str, int],
    stats: dict[str, int],
    records: Counter[tuple[int, Any]],
    crashes: int,
) -> int:
    totals = runner.totals
    streams = sum(totals.streams.values())
    aborted_upstream = stats.get("streams_aborted", 0) - before.get("streams_aborted", 0)
    finished_upstream = stats.get("streams_finished", 0) - before.get("streams_finished", 0)
    peak = max(runner.rss, default=0)
    summary = {
        "streams_concurrent": args.streams,
        "peak_open_streams": runner.peak_open,
        "duration_s": round(elapsed, 1),
        "streams_total": streams,
        "streams_by_kind": dict(totals.streams),
        "streams_completed_verified": totals.completed,
        "streams_disconnected_by_client": totals.disconnects,
        "bytes_expected_completed": totals.bytes_expected,
        "bytes_received": totals.bytes_received,
        "bytes_lost": totals.bytes_lost,
        "bytes_duplicated": totals.bytes_duplicated,
        "streams_corrupted": totals.corrupted,
        "streams_ended_early": totals.early_ends,
        "bad_statuses": dict(totals.bad_status),
        "events_per_s": round(totals.events / elapsed),
        "mb_per_s": round(totals.bytes_received / elapsed / 1e6, 2),
        "daemon_rss_baseline_mb": round(baseline / 1024, 1),
        "daemon_rss_peak_mb": round(peak / 1024, 1),
        "daemon_rss_end_mb": round(runner.rss[-1] / 1024, 1) if runner.rss else None,
        "daemon_rss_per_stream_kb": round((peak - baseline) / max(runner.peak_open, 1), 1),
        "daemon_cpu_percent_of_one_core": round(100 * runner.cpu / elapsed),
        "host_cpus": os.cpu_count(),
        "host_load_average_before_after": [round(value, 1) for value in runner.load],
        "upstream_streams_finished": finished_upstream,
        "upstream_streams_aborted": aborted_upstream,
        "upstream_streams_open_after": stats.get("streams_open"),
        "access_records": {
            f"{status} {reason}": count
            for (status, reason), count in sorted(records.items(), key=str)
        },
        "daemon_tracebacks": crashes,
        "stream_seconds_p50_p99_max": {
            kind: [round(_percentile(values, q), 2) for q in (0.5, 0.99, 1.0)]
            for kind, values in sorted(totals.seconds.items())
        },
    }
    # A disconnecting client may leave after the upstream already sent its
    # last byte (the rest still on its way): nothing is left to abort then.
    finished_first = finished_upstream - totals.completed
    summary["upstream_finished_before_client_left"] = finished_first
    ok = (
        totals.bytes_lost == 0
        and totals.bytes_duplicated == 0
        and totals.corrupted == 0
        and totals.early_ends == 0
        and not totals.bad_status
        and stats.get("streams_open") == 0
        and aborted_upstream + finished_first == totals.disconnects
        and finished_first >= 0
        and crashes == 0
    )
    if records:
        ok = ok and records.get((499, "client_disconnect"), 0) == totals.disconnects
    summary["ok"] = ok
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    for failure in totals.failures:
        print("FAILURE:", failure)
    return 0 if ok else 1


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--streams", type=int, default=1000, help="concurrent streams (default 1000)"
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of full load (default 60)"
    )
    parser.add_argument(
        "--ramp", type=float, default=3.0, help="seconds to open all streams (default 3)"
    )
    parser.add_argument(
        "--mix", default="60,25,15", help="percent fast,slow,disconnect (default 60,25,15)"
    )
    parser.add_argument(
        "--flush-ms",
        type=int,
        default=10,
        help="the route's streaming_flush_interval_ms (default 10)",
    )
    parser.add_argument("--daemon-url", help="a running daemon instead of starting one")
    parser.add_argument("--daemon-pid", type=int, help="its pid, for the RSS figures")
    parser.add_argument(
        "--mock-url", help="the mock upstream the daemon's route points at (with --daemon-url)"
    )
    args = parser.parse_args(argv)
    args.mix = tuple(int(part) for part in args.mix.split(","))
    if len(args.mix) != 3 or sum(args.mix) != 100:
        parser.error("--mix takes three percentages adding up to 100")
    if bool(args.daemon_url) != bool(args.mock_url):
        parser.error("--daemon-url and --mock-url go together")

    async def run(_: Any) -> None:
        code = await soak(args)
        if code:
            raise SystemExit(code)

    react(lambda r: Deferred.fromCoroutine(run(r)))


if __name__ == "__main__":
    main()
