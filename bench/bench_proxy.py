"""
Proxy benchmark: the real `twistd aiproxy` between a fast upstream and a
load client, both in this process (asyncio, raw sockets, so they cost little
next to the proxy).

Measures, per scenario: events/s and requests/s the client received, the
proxy's CPU time per event (or per request), time to first token and the
number of HTTP chunks per stream the client saw (the flush mode made
visible). Figures are for comparing runs on one machine: compare ratios
within one run, not absolute numbers across machines.

    python bench/bench_proxy.py                       # every scenario
    python bench/bench_proxy.py --scenario paced --flush-ms 0,10
    python bench/bench_proxy.py --pin 1               # proxy on CPU 1 (taskset)
    python bench/bench_proxy.py --scenario throughput,converted   # conversion's cost
    python bench/bench_proxy.py --scenario nonstream --access none,key-auth,local,redis

`--workers 1,2` runs the proxy with that many worker processes (its CPU and
RSS are the whole process tree's); with the load client in this process,
compare worker counts with the proxy unpinned and read the proxy CPU too:

    python bench/bench_proxy.py --scenario throughput --workers 1,2 --rounds 3

`--access` puts key-auth and budgets on the route: `key-auth` (the client
sends a consumer's key), `local` (key-auth and an `ai-rate-limiting` budget
counted in the process) and `redis` (the same budget in a `redis-server`
started for the run).

The `converted` scenario is `throughput` with an Anthropic Messages client
on the same OpenAI upstream (every event converted); its CPU per event is
per upstream event, so it compares with `throughput`'s.

Two installations in one run (each twistd imports its own aiproxy; their
runs alternate within every round, so drift hits both; medians over rounds):

    python bench/bench_proxy.py --twistd a=/venv-a/bin/twistd,b=/venv-b/bin/twistd --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the upstream -------------------------------------------------------------


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _events(count: int) -> list[bytes]:
    """
    OpenAI chat.completion.chunk events (distinct content per event), the
    usage chunk and [DONE].
    """
    out = []
    for i in range(count):
        delta = {"content": f"tok{i} "} if i else {"role": "assistant", "content": ""}
        document = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "bench-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            "usage": None,
        }
        out.append(b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n")
    usage = {"prompt_tokens": 10, "completion_tokens": count, "total_tokens": count + 10}
    out.append(
        b'data: {"id":"chatcmpl-bench","choices":[],"usage":'
        + json.dumps(usage).encode()
        + b"}\n\n"
    )
    out.append(b"data: [DONE]\n\n")
    return out


NONSTREAM_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }
).encode()


class Upstream:
    """
    An HTTP/1.1 keep-alive server: streams (one write per event, `delay_ms`
    apart) or a small JSON body, chosen by the request's `"stream":true`.
    """

    def __init__(self, events: int, delay_ms: float) -> None:
        self.chunks = [_chunk(e) for e in _events(events)] + [b"0\r\n\r\n"]
        self.delay = delay_ms / 1000.0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                if json.loads(body).get("stream") is True:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                    )
                    last = len(self.chunks) - 1
                    for index, piece in enumerate(self.chunks):
                        writer.write(piece)
                        await writer.drain()
                        if self.delay and index < last:
                            await asyncio.sleep(self.delay)
                else:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(NONSTREAM_BODY), NONSTREAM_BODY)
                    )
                    await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()


# -- the client ---------------------------------------------------------------


@dataclass
class Results:
    requests: int = 0
    events: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    chunks_per_stream: list[int] = field(default_factory=list)


async def _read_response(
    reader: asyncio.StreamReader, results: Results, started: float, stream: bool
) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(head.split(b"\r\n", 1)[0].decode())
    if not stream:
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        return
    events = chunks = 0
    first = None
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        chunks += 1
        count = data.count(b"data: ")
        if count and first is None:
            first = time.perf_counter() - started
        events += count
    if first is not None:
        results.ttft.append(first * 1000)
    results.events += events
    results.chunks_per_stream.append(chunks)


async def client(
    port: int, stream: bool, deadline: float, count: int | None, results: Results, path: bytes
) -> None:
    document = {
        "model": "bench-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
    }
    if path == MESSAGES_PATH:
        document["max_tokens"] = 1024
    body = json.dumps(document).encode()
    request = (
        b"POST %s HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        b"apikey: %s\r\ncontent-length: %d\r\n\r\n%s" % (path, BENCH_KEY.encode(), len(body), body)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    try:
        while time.perf_counter() < deadline and (count is None or done < count):
            started = time.perf_counter()
            writer.write(request)
            try:
                await _read_response(reader, results, started, stream)
            except (ValueError, asyncio.IncompleteReadError, ConnectionError):
                results.errors += 1
                return
            results.requests += 1
            done += 1
    finally:
        writer.close()


# -- the proxy ----------------------------------------------------------------

CHAT_PATH = b"/v1/chat/completions"
MESSAGES_PATH = b"/v1/messages"

CONFIG = """\
listen: "tcp:port={port}:interface=127.0.0.1"
{consumers}routes:
  - uris: [/v1/chat/completions, /v1/messages]
    plugins:
      ai-proxy:
        provider: openai
        auth: {{header: {{Authorization: "Bearer bench"}}}}
        options: {{model: bench-model}}
        override: {{endpoint: "http://127.0.0.1:{upstream}/v1/chat/completions"}}
        streaming_flush_interval_ms: {flush}
        keepalive_pool: 1024
{extra}"""


#: The consumer key the load client sends.
BENCH_KEY = "bench-key-0123456789abcdef"

CONSUMERS = """\
consumers:
  - username: bench
    plugins:
      key-auth: {{key: "{key}"}}
"""

#: Route plugin lines of each --access value (the Redis port filled in).
ACCESS = {
    "none": "",
    "key-auth": "      key-auth: {{}}\n",
    "local": "      key-auth: {{}}\n"
    "      ai-rate-limiting: {{limit: 1000000000000, time_window: 3600}}\n",
    "redis": "      key-auth: {{}}\n"
    "      ai-rate-limiting: {{limit: 1000000000000, time_window: 3600, policy: redis,"
    " redis_host: 127.0.0.1, redis_port: {redis_port}}}\n",
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis(tmp: str) -> tuple[subprocess.Popen, int]:
    """
    A C{redis-server} on a free loopback port, for the C{redis} access mode.
    """
    port = _free_port()
    redis = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tmp,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return redis, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def _twistd() -> list[str]:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(twistd):
        return [twistd]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


@dataclass
class Build:
    """One aiproxy under test: its label in the table, its twistd command and environment."""

    label: str
    argv: list[str]
    env: dict[str, str]


def _builds(spec: str | None) -> list[Build]:
    """
    The aiproxy installations to run: each `[LABEL=]PATH` of the
    comma-separated `spec` is a twistd executable that imports its own
    installed aiproxy (PYTHONPATH removed); without `spec`, this checkout
    (on PYTHONPATH) under the twistd beside this Python.
    """
    if not spec:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return [Build("checkout", _twistd(), env)]
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    builds = []
    for item in spec.split(","):
        label, _, path = item.rpartition("=")
        builds.append(Build(label or path, [path], env))
    return builds


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (the worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], ()))
    return tree


def _cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by `pid` and its descendants."""
    total = 0.0
    for member in _tree(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def _rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants."""
    total = 0.0
    for member in _tree(pid):
        try:
            with open(f"/proc/{member}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


async def _wait_ready(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("the proxy did not start")


SCENARIOS = {
    # name: (events per stream, upstream delay ms, concurrency, stream?, seconds)
    "throughput": (200, 0, 64, True, 8.0),
    "paced": (200, 5, 64, True, 8.0),
    "latency": (50, 20, 1, True, 6.0),
    "nonstream": (0, 0, 32, False, 8.0),
    "converted": (200, 0, 64, True, 8.0),
}


async def run(
    scenario: str,
    flush_ms: int,
    pin: str | None,
    filters: str,
    build: Build,
    access: str = "none",
    redis_port: int = 0,
    workers: int = 1,
) -> dict:
    events, delay, concurrency, stream, seconds = SCENARIOS[scenario]
    client_path = MESSAGES_PATH if scenario == "converted" else CHAT_PATH
    upstream = Upstream(events, delay)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, backlog=2048)
    upstream_port = server.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        port = 20000 + os.getpid() % 10000
        path = os.path.join(tmp, "aiproxy.yaml")
        with open(path, "w") as f:
            f.write(
                CONFIG.format(
                    port=port,
                    upstream=upstream_port,
                    flush=flush_ms,
                    extra=filters + ACCESS[access].format(redis_port=redis_port),
                    consumers="" if access == "none" else CONSUMERS.format(key=BENCH_KEY),
                )
            )
        argv = build.argv + ["-n", "--pidfile=", "aiproxy", "--config", path]
        if workers > 1:
            argv += ["--workers", str(workers)]
        if pin is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", pin] + argv
        proxy = subprocess.Popen(
            argv, env=build.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp
        )
        try:
            await _wait_ready(port)
            warm = Results()
            await asyncio.gather(
                *(
                    client(port, stream, time.perf_counter() + 1.0, None, warm, client_path)
                    for _ in range(concurrency)
                )
            )
            results = Results()
            cpu0, wall0 = _cpu_seconds(proxy.pid), time.perf_counter()
            await asyncio.gather(
                *(
                    client(port, stream, wall0 + seconds, None, results, client_path)
                    for _ in range(concurrency)
                )
            )
            wall = time.perf_counter() - wall0
            cpu = _cpu_seconds(proxy.pid) - cpu0
            rss = _rss_mb(proxy.pid)
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(10)
            server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()
    units = results.events if stream else results.requests
    if client_path == MESSAGES_PATH:
        # Per upstream event (its deltas, the usage chunk and [DONE]).
        units = results.requests * (events + 2)
    return {
        "requests_per_s": results.requests / wall,
        "events_per_s": results.events / wall,
        "proxy_cpu_pct": 100 * cpu / wall,
        "cpu_us_per_unit": 1e6 * cpu / units if units else None,
        "ttft_p50_ms": statistics.median(results.ttft) if results.ttft else None,
        "ttft_p99_ms": sorted(results.ttft)[int(len(results.ttft) * 0.99)]
        if results.ttft
        else None,
        "chunks_per_stream": statistics.median(results.chunks_per_stream)
        if results.chunks_per_stream
        else None,
        "errors": results.errors,
        "rss_mb": rss,
    }


def _medians(runs: list[dict]) -> dict:
    """Each figure's median over the runs (None where no run has it); errors added up."""
    out: dict = {"errors": sum(r["errors"] for r in runs)}
    for key in runs[0].keys() - {"errors"}:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenario", default="all", help="one of " + ", ".join(SCENARIOS) + ", or all"
    )
    parser.add_argument(
        "--flush-ms", default="0", help="streaming_flush_interval_ms values, comma-separated"
    )
    parser.add_argument("--pin", default=None, help="CPU list for the proxy (taskset)")
    parser.add_argument(
        "--twistd",
        default=None,
        help="[LABEL=]PATH,... twistd executables to compare (default: this checkout)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of each build per row, alternated; medians shown",
    )
    parser.add_argument(
        "--regex-filter", action="store_true", help="add an ai-response-redact rule"
    )
    parser.add_argument(
        "--workers", default="1", help="worker process counts to compare, comma-separated"
    )
    parser.add_argument(
        "--access",
        default="none",
        help="comma-separated: none, key-auth, local, redis (key-auth and budgets on the route)",
    )
    args = parser.parse_args()
    scenarios = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    filters = ""
    if args.regex_filter:
        filters = "      ai-response-redact: {rules: [{pattern: 'sk-[A-Za-z0-9]{20,}', replacement: '[key]'}]}\n"
    builds = _builds(args.twistd)
    accesses = args.access.split(",")
    redis: subprocess.Popen | None = None
    redis_port = 0
    redis_dir = tempfile.mkdtemp()
    if "redis" in accesses:
        redis, redis_port = _start_redis(redis_dir)
    print(
        "| scenario | flush_ms | build | req/s | events/s | proxy CPU % | CPU µs/event (or /request) | TTFT p50 ms | TTFT p99 ms | HTTP chunks/stream | errors | RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def fmt(value: float | None, spec: str = ".1f") -> str:
        return "-" if value is None else format(value, spec)

    variants = [
        (build, access, int(workers))
        for workers in args.workers.split(",")
        for access in accesses
        for build in builds
    ]

    def label_of(build: Build, access: str, workers: int) -> str:
        label = build.label if access == "none" else f"{build.label} {access}"
        return label if workers == 1 else f"{label} workers={workers}"

    try:
        _rows(args, scenarios, filters, variants, label_of, redis_port, fmt)
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        shutil.rmtree(redis_dir, ignore_errors=True)


def _rows(args, scenarios, filters, variants, label_of, redis_port, fmt) -> None:  # noqa: ANN001
    """
    Run every scenario and flush value for every variant (build and access
    mode), alternating within each round, and print a row per variant.
    """
    for scenario in scenarios:
        for flush in (int(x) for x in args.flush_ms.split(",")):
            runs: dict[str, list[dict]] = {label_of(*v): [] for v in variants}
            for _ in range(args.rounds):
                for build, access, workers in variants:
                    runs[label_of(build, access, workers)].append(
                        asyncio.run(
                            run(
                                scenario,
                                flush,
                                args.pin,
                                filters,
                                build,
                                access,
                                redis_port,
                                workers,
                            )
                        )
                    )
            for label, label_runs in runs.items():
                r = _medians(label_runs)
                print(
                    f"| {scenario} | {flush} | {label} | {fmt(r['requests_per_s'], '.0f')} | {fmt(r['events_per_s'], '.0f')} "
                    f"| {fmt(r['proxy_cpu_pct'])} | {fmt(r['cpu_us_per_unit'])} | {fmt(r['ttft_p50_ms'], '.2f')} "
                    f"| {fmt(r['ttft_p99_ms'], '.2f')} | {fmt(r['chunks_per_stream'], '.0f')} | {r['errors']} "
                    f"| {fmt(r['rss_mb'])} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
