"""
Gateway benchmark without sockets: the Python cost of one whole request,
from the client's request bytes to the last byte for the client, through
the real site, route and upstream client, over in-memory transports.

A client connection (kept alive) sends C{--requests} requests one after
the other; each one's upstream answers at once, over one pooled upstream
connection: a small JSON body, or (C{--events N}) a stream of N
chat.completion.chunk events, one HTTP chunk per read, then usage and
C{[DONE]} (with a flush interval, a whole stream arrives within one: it
is written as two chunks). Nothing waits on a socket, so the figures hold
only the CPU of the request path (parsing, the exchange, treq, the access
record, garbage collection), not system calls or reactor turns: for
those, use C{bench_proxy.py} or C{../shared/bench/run.py}. The figure is the best of
C{--runs} runs of the thread's CPU time, with the garbage collections it
ran; C{--profile FILE} writes a cProfile of one more run.

    python bench/bench_gateway.py                        # non-streamed
    python bench/bench_gateway.py --events 50 --flush-ms 0,10
    python bench/bench_gateway.py --profile /tmp/gw.prof
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402

from aiproxy.config import parse_config  # noqa: E402
from aiproxy.logs import text_observer  # noqa: E402
from aiproxy.monitor import ExchangeMonitor  # noqa: E402
from aiproxy.routing.build import build_routes  # noqa: E402
from aiproxy.server import GatewayResource, GatewaySite  # noqa: E402
from aiproxy.upstream import agent  # noqa: E402

__all__ = ["Gateway", "main"]

CONFIG = """
listen: "tcp:port=9080:interface=127.0.0.1"
routes:
  - uri: /v1/chat/completions
    plugins:
      ai-proxy:
        provider: openai
        auth: {header: {Authorization: "Bearer test"}}
        options: {model: gpt-4}
        override: {endpoint: "http://127.0.0.1:7751/v1/chat/completions"}
        streaming_flush_interval_ms: %d
"""


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _request(stream: bool) -> bytes:
    body = json.dumps(
        {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:9080\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def _answer(events: int) -> list[bytes]:
    """
    The upstream's answer, one item per read: a JSON body, or a stream.
    """
    if not events:
        body = json.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "model": "gpt-4",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            }
        ).encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        return [head % len(body) + body]
    reads = []
    for i in range(events):
        document = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "model": "gpt-4",
            "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
        }
        reads.append(_chunk(b"data: " + json.dumps(document).encode() + b"\n\n"))
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}\n\n'
    reads += [_chunk(usage), _chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n"]
    reads[0] = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + reads[0]
    )
    return reads


class _Transport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class Gateway:
    """
    The gateway of L{CONFIG} over in-memory transports: one kept-alive
    client connection and the upstream connections its pool opens.
    """

    def __init__(self, flush_ms: int, events: int) -> None:
        config = parse_config(CONFIG % flush_ms)
        self.upstreams: list[tuple[Any, _Transport]] = []
        agent.EndpointCache.endpointForURI = lambda cache, uri: self  # type: ignore[method-assign,assignment]
        site = GatewaySite(
            GatewayResource(build_routes(config, reactor), reactor, ExchangeMonitor(reactor)),
            reactor=reactor,
        )
        site.apply_limits(config)
        self.client = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = _Transport()
        self.client.makeConnection(self.transport)
        self._request = _request(events > 0)
        self._answer = _answer(events)

    def connect(self, factory: Any) -> Any:
        """
        The upstream endpoint: a new connection over an in-memory transport.
        """
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 7751))
        transport = _Transport()
        protocol.makeConnection(transport)
        self.upstreams.append((protocol, transport))
        return succeed(protocol)

    def one(self) -> None:
        """
        One request, answered whole.
        """
        self.client.dataReceived(self._request)
        upstream, transport = self.upstreams[-1]
        transport.clear()
        for data in self._answer:
            upstream.dataReceived(data)
        if not self.transport.value().startswith(b"HTTP/1.1 200 "):
            raise AssertionError(self.transport.value()[:200])
        self.transport.clear()


def _run(gateway: Gateway, requests: int) -> tuple[float, int]:
    """
    Thread CPU seconds of C{requests} requests, and the collections run.
    """
    collections = sum(s["collections"] for s in gc.get_stats())
    start = time.thread_time()
    for _ in range(requests):
        gateway.one()
    elapsed = time.thread_time() - start
    # Cancelled timers wait here for the reactor's next turn.
    reactor.runUntilCurrent()  # type: ignore[attr-defined]
    return elapsed, sum(s["collections"] for s in gc.get_stats()) - collections


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=0, help="stream events (0: a JSON body)")
    parser.add_argument("--flush-ms", default="0", help="streaming_flush_interval_ms, comma list")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", help="write a cProfile of one more run here")
    args = parser.parse_args(argv)
    # Access records go to memory, as a log file would take them.
    globalLogBeginner.beginLoggingTo(
        [text_observer(io.StringIO())], redirectStandardIO=False, discardBuffer=True
    )
    what = f"stream of {args.events} events" if args.events else "non-streamed request"
    for flush_ms in (int(value) for value in args.flush_ms.split(",")):
        gateway = Gateway(flush_ms, args.events)
        _run(gateway, 200)
        results = [_run(gateway, args.requests) for _ in range(args.runs)]
        seconds, collections = min(results)
        print(
            f"flush {flush_ms} ms, {what}: {1e6 * seconds / args.requests:.1f} us CPU each, "
            f"{collections / args.requests:.3f} garbage collections each, "
            f"{len(gateway.upstreams)} upstream connection(s)"
        )
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(_run, gateway, args.requests)
            profile.dump_stats(args.profile)


if __name__ == "__main__":
    main()
