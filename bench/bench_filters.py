"""
Filter benchmark: the per-event CPU cost of the streaming hot path without
body filters, with one no-op filter, and with one regex filter.

The corpus is a seeded OpenAI chat stream (a role chunk, C{--events} content
chunks of one to three short tokens, an e-mail address every 200 events,
the finish, usage and C{[DONE]} chunks), one event per upstream chunk, or
each cut in two with C{--split}. Every chunk goes through what
L{aiproxy.proxy.Exchange} runs per chunk: the SSE decoder, the protocol
observer, and the body-filter chain when there is one (which also turns on
collecting the response text). The regex filters are checked for their
output first, then everything is timed: the median CPU time of C{--runs}
runs, divided by the number of events.

    python bench/bench_filters.py [--events N] [--runs R] [--split] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _timing import cpu_time  # the benchmarks' folder is sys.path[0]
from zope.interface import implementer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiproxy.builtin.response_guard import ResponseGuard  # noqa: E402
from aiproxy.builtin.response_redact import ResponseRedact  # noqa: E402
from aiproxy.context import ExchangeContext  # noqa: E402
from aiproxy.filters import BodyFilterChain, Terminate, open_chain  # noqa: E402
from aiproxy.interfaces import IBodyFilter, IBodyFilterFactory  # noqa: E402
from aiproxy.stream.observers import observer_for  # noqa: E402
from aiproxy.stream.protocols import OPENAI_CHAT  # noqa: E402
from aiproxy.stream.sse import SSEDecoder  # noqa: E402

__all__ = ["build_stream", "main", "run_stream"]

_WORDS = [
    "the",
    "model",
    "streams",
    "tokens",
    "to",
    "a",
    "client",
    "and",
    "then",
    "some",
    "more",
    "text",
    "ok",
    "naïve",
    "über",
]
EMAIL = r"[\w.+-]+@[\w-]+\.[\w.]+"


def build_stream(events: int, seed: int, split: bool) -> list[bytes]:
    """
    The upstream chunks of one response.

    @param events: the number of content events.
    @param seed: the random seed.
    @param split: cut every event in two chunks.
    """
    rng = random.Random(seed)
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1710000000,
        "model": "gpt-4o-mini",
    }

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        document = {**base, "choices": choices, "usage": None, **extra}
        return (
            b"data: "
            + json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
            + b"\n\n"
        )

    frames = [event({"role": "assistant", "content": ""})]
    for n in range(events):
        if n % 200 == 199:
            text = " mail bob.smith@example.com"
        else:
            text = "".join(" " + rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))
        frames.append(event({"content": text}))
    frames.append(event({}, "stop"))
    usage = {"prompt_tokens": 10, "completion_tokens": events, "total_tokens": events + 10}
    frames.append(
        b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n"
    )
    frames.append(b"data: [DONE]\n\n")
    if not split:
        return frames
    chunks = []
    for frame in frames:
        middle = len(frame) // 2
        chunks += [frame[:middle], frame[middle:]]
    return chunks


@implementer(IBodyFilter)
class _Noop:
    def filter_chunk(self, chunk: bytes, context: Any) -> None:
        return None

    def finish(self, context: Any) -> None:
        return None


@implementer(IBodyFilterFactory)
class NoopFactory:
    """
    A body filter that passes everything: the cost of having a chain.
    """

    def body_filter(self, context: Any) -> _Noop:
        return _Noop()


def run_stream(chunks: Sequence[bytes], factories: Sequence[Any]) -> bytes:
    """
    Relay one response's chunks as the exchange does; the bytes sent.
    """
    context = ExchangeContext("bench", "bench", 0.0)
    context.protocol = context.upstream_protocol = OPENAI_CHAT
    context.stream = True
    decoder = SSEDecoder()
    observer = observer_for(OPENAI_CHAT)
    chain: BodyFilterChain | None = open_chain(factories, context)
    context.wants_text = chain is not None
    out = []
    for data in chunks:
        events = decoder.feed(data)
        if events:
            observer.observe_events(events, context)
        if chain is not None:
            context.events = events
            result = chain.filter_chunk(data, context)
            if isinstance(result, Terminate):
                raise AssertionError("terminated")
            data = result
        if data:
            out.append(data)
    decoder.close()
    if chain is not None:
        context.events = []
        tail = chain.finish(context)
        if isinstance(tail, Terminate):
            raise AssertionError("terminated")
        out.append(tail)
    return b"".join(out)


def text_of(body: bytes) -> str:
    """
    The content text of a stream body.
    """
    decoder = SSEDecoder()
    text = []
    for event in decoder.feed(body):
        if event.data != b"[DONE]":
            for choice in json.loads(event.data)["choices"]:
                text.append(choice["delta"].get("content") or "")
    return "".join(text)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Check the filters' output, time every setup, print a table.
    """
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="content events in the stream")
    parser.add_argument("--runs", type=int, default=7, help="timed runs, the median is shown")
    parser.add_argument("--split", action="store_true", help="cut every event in two chunks")
    parser.add_argument("--seed", type=int, default=1, help="corpus seed")
    args = parser.parse_args(argv)

    chunks = build_stream(args.events, args.seed, args.split)
    events = args.events + 4
    guard = ResponseGuard(
        {
            "deny_patterns": ["forbidden content"],
            "deny_code": 200,
            "deny_message": "no",
            "hold_back_chars": 64,
        }
    )
    redact = ResponseRedact(
        {"rules": [{"pattern": EMAIL, "replacement": "[email]"}], "hold_back_chars": 64}
    )
    setups: list[tuple[str, list[Any]]] = [
        ("no body filter", []),
        ("one no-op filter (chain, text on)", [NoopFactory()]),
        ("ai-response-guard, 1 pattern", [guard]),
        ("ai-response-redact, 1 rule", [redact]),
    ]
    plain = text_of(run_stream(chunks, []))
    if text_of(run_stream(chunks, [guard])) != plain:
        print("ai-response-guard changed a clean stream", file=sys.stderr)
        return 1
    redacted = text_of(run_stream(chunks, [redact]))
    if "@" in redacted or redacted.count("[email]") != args.events // 200:
        print("ai-response-redact missed an address", file=sys.stderr)
        return 1
    print(
        f"stream: {events} events in {len(chunks)} chunks{' (split)' if args.split else ''}, "
        f"{sum(map(len, chunks)):,} bytes; median of {args.runs} runs, CPU time"
    )
    print(f"{'setup':<36} {'µs/event':>9} {'vs none':>8}")
    baseline = None
    for name, factories in setups:
        seconds = cpu_time(lambda factories=factories: run_stream(chunks, factories), args.runs)
        per_event = seconds / events * 1e6
        baseline = baseline or per_event
        print(f"{name:<36} {per_event:>9.2f} {per_event / baseline:>7.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
