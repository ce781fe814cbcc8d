"""
Decoder benchmark: aiproxy's SSE decoder beside the openai SDK's on the same bytes.

The corpus is a seeded stream of OpenAI C{chat.completion.chunk} events (mixed
ASCII and UTF-8 content, some CRLF line endings, C{: keep-alive} comments and
multi-line data, then C{data: [DONE]}), cut at random positions into chunks of
1 to C{--max-chunk} bytes. Each decoder is checked against the expected data
first, then timed; C{json.loads} of every payload is timed as a reference cost.

    python bench/bench_decoder.py [--events N] [--max-chunk B] [--runs R] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from _timing import cpu_time  # the benchmarks' folder is sys.path[0]
from openai._streaming import ServerSentEvent, _SSELineDecoder
from openai._streaming import SSEDecoder as OpenAIDecoder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiproxy.stream.sse import SSEDecoder, SSEEvent  # noqa: E402

__all__ = ["build_corpus", "main", "split_chunks"]

_PIECES = [
    "Hi",
    " there",
    ",",
    " stream",
    " of",
    " tokens",
    " from",
    " the",
    " model",
    ".",
    " naïve",
    " façade",
    " Grüße",
    " 你好",
    " мир",
    " ✨",
    " 🙂",
    "\n",
    ' "q"',
    " a\tb",
    " back\\slash",
    " ok",
    "!",
    "?",
]


def build_corpus(events: int, seed: int) -> tuple[bytes, list[bytes]]:
    """
    Build the stream and the data each of its events carries.

    @param events: The number of chunk events before C{[DONE]}.
    @param seed: The random seed.
    @return: The stream's bytes and the expected data of every event.
    """
    rng = random.Random(seed)
    frames: list[bytes] = []
    expected: list[bytes] = []
    for n in range(events):
        if rng.random() < 0.02:
            frames.append(b": keep-alive\n\n")
        chunk = {
            "id": f"chatcmpl-{seed:03d}x{n // 150:07d}",
            "object": "chat.completion.chunk",
            "created": 1710000000 + n // 150,
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "".join(rng.choices(_PIECES, k=rng.randint(1, 3)))},
                    "finish_reason": None,
                }
            ],
        }
        payload = json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode()
        lines = [payload]
        if rng.random() < 0.01:
            cut = payload.index(b",", len(payload) // 2) + 1
            lines = [payload[:cut], payload[cut:]]
        eol = b"\r\n" if rng.random() < 0.1 else b"\n"
        frames.append(b"".join(b"data: " + line + eol for line in lines) + eol)
        expected.append(b"\n".join(lines))
    frames.append(b"data: [DONE]\n\n")
    expected.append(b"[DONE]")
    return b"".join(frames), expected


def split_chunks(stream: bytes, max_chunk: int, seed: int) -> list[bytes]:
    """
    Cut a stream into chunks of random sizes.

    @param stream: The bytes to cut.
    @param max_chunk: The largest chunk size.
    @param seed: The random seed.
    @return: The chunks, in order.
    """
    rng = random.Random(seed ^ 0x5EED)
    chunks = []
    start = 0
    while start < len(stream):
        end = start + rng.randint(1, max_chunk)
        chunks.append(stream[start:end])
        start = end
    return chunks


def decode_aiproxy(chunks: Sequence[bytes]) -> list[SSEEvent]:
    """
    Decode with aiproxy's L{SSEDecoder}.

    @param chunks: The stream's chunks.
    @return: The events.
    """
    decoder = SSEDecoder()
    events = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    return events


def decode_openai(chunks: Sequence[bytes]) -> list[ServerSentEvent]:
    """
    Decode with the openai SDK's decoder, driven as its own stream reader does.

    @param chunks: The stream's chunks.
    @return: The events.
    """
    lines = _SSELineDecoder()
    decoder = OpenAIDecoder()
    events = []
    for chunk in chunks:
        events += list(decoder._decode_lines(lines.feed(chunk)))
    events += list(decoder._decode_lines(lines.finish()))
    return events


def run_json(payloads: Sequence[bytes]) -> None:
    """
    Parse every payload with C{json.loads}, the cost of reading usage.

    @param payloads: The events' data.
    """
    loads = json.loads
    for payload in payloads:
        loads(payload)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Check and time the decoders, print a table.

    @param argv: The command line arguments.
    @return: The exit status: 1 when a decoder gives wrong events, which
        are then not timed.
    """
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000, help="events in the corpus")
    parser.add_argument("--max-chunk", type=int, default=4096, help="largest chunk in bytes")
    parser.add_argument("--runs", type=int, default=5, help="timed runs, the median is shown")
    parser.add_argument("--seed", type=int, default=1, help="corpus and chunking seed")
    args = parser.parse_args(argv)

    stream, expected = build_corpus(args.events, args.seed)
    chunks = split_chunks(stream, args.max_chunk, args.seed)
    print(
        f"corpus: {len(expected)} events, {len(stream):,} bytes "
        f"({len(stream) / len(expected):.0f} B/event), {len(chunks):,} chunks of "
        f"1..{args.max_chunk} B, seed {args.seed}, median CPU time of {args.runs} runs"
    )

    wrong = []
    if [event.data for event in decode_aiproxy(chunks)] != expected:
        wrong.append("aiproxy")
    if [event.data.encode() for event in decode_openai(chunks)] != expected:
        wrong.append("openai")
    if wrong:
        print(f"wrong events from: {', '.join(wrong)}", file=sys.stderr)
        return 1
    runs: list[tuple[str, Callable[[], object]]] = [
        ("aiproxy.stream.sse.SSEDecoder", partial(decode_aiproxy, chunks)),
        ("openai SSEDecoder", partial(decode_openai, chunks)),
    ]
    runs.append(("json.loads per event (reference)", partial(run_json, expected[:-1])))
    rows = [(name, cpu_time(run, args.runs)) for name, run in runs]

    baseline = rows[1][1]
    megabytes = len(stream) / 1e6
    print()
    print(
        f"| {'decoder':<34} | {'MB/s':>7} | {'events/s':>11} | {'µs/event':>8} | {'vs openai':>9} |"
    )
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 13}|{'-' * 10}|{'-' * 11}|")
    for name, seconds in rows:
        print(
            f"| {name:<34} | {megabytes / seconds:>7.1f} | {len(expected) / seconds:>11,.0f} | "
            f"{1e6 * seconds / len(expected):>8.2f} | {baseline / seconds:>8.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
