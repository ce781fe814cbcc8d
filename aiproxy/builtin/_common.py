# -*- test-case-name: tests.test_builtin -*-
"""
What the built-in plugins share: config errors with a path, pattern lists,
schema pieces and SSE encoding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from aiproxy.holdback import PatternError, compile_pattern
from aiproxy.schema import format_path
from aiproxy.stream.sse import SSEEvent

__all__ = [
    "META_PROPERTY",
    "PluginConfigError",
    "compile_patterns",
    "dumps",
    "encode_event",
    "pattern_list",
]

#: APISIX's C{_meta} plugin key: accepted, ignored.
META_PROPERTY: dict[str, Any] = {
    "type": "object",
    "description": "Accepted for APISIX compatibility; ignored.",
}


def pattern_list(description: str) -> dict[str, Any]:
    """
    The schema of a list of regular expressions, empty by default.
    """
    return {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "default": [],
        "description": description,
    }


class PluginConfigError(ValueError):
    """
    A plugin's C{configure} refuses a config that its schema allows (a
    regular expression that does not compile, say). The route loader
    reports each problem at the plugin's path followed by C{path}, like
    every other config error.

    @ivar problems: C{(path, reason)} pairs; a path is a list of keys and
        indexes inside the plugin's config, C{[]} for the config itself.
    """

    def __init__(self, problems: Iterable[tuple[Sequence[str | int], str]]) -> None:
        self.problems = [(list(path), reason) for path, reason in problems]
        super().__init__(
            "; ".join(f"{format_path(path)}: {reason}" for path, reason in self.problems)
        )


def compile_patterns(
    sources: Sequence[str], path: Sequence[str | int], allow_empty: bool = False
) -> list[Any]:
    """
    Compile a config's list of patterns.

    @param sources: the patterns.
    @param allow_empty: accept patterns that match the empty string.
    @param path: the list's path inside the plugin's config, for messages.
    @raise PluginConfigError: naming every pattern that cannot be used, at
        C{path[j]}.
    """
    compiled = []
    problems: list[tuple[list[str | int], str]] = []
    for index, source in enumerate(sources):
        try:
            compiled.append(compile_pattern(source, allow_empty))
        except PatternError as e:
            problems.append(([*path, index], str(e)))
    if problems:
        raise PluginConfigError(problems)
    return compiled


def dumps(document: Any) -> bytes:
    """
    Compact UTF-8 JSON, as providers write it.
    """
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def encode_event(event: SSEEvent, data: bytes | None = None) -> bytes:
    """
    The wire form of one SSE event (LF line ends, one C{data} line per
    line of its data).

    @param data: replaces the event's data.
    """
    out = []
    if event.event != "message":
        out.append(b"event: " + event.event.encode("utf-8") + b"\n")
    if event.id is not None:
        out.append(b"id: " + event.id.encode("utf-8") + b"\n")
    if event.retry is not None:
        out.append(b"retry: %d\n" % event.retry)
    if data is None:
        data = event.data
    for line in data.split(b"\n"):
        out.append(b"data: " + line + b"\n")
    out.append(b"\n")
    return b"".join(out)
