# -*- test-case-name: tests.test_builtin -*-
"""
C{ai-response-redact}: replace what matches configured patterns in the
response text, as it streams, and keep every event valid SSE and JSON.

The text of each choice (OpenAI chat) or content block (Anthropic
messages) goes through a hold-back window in rewrite mode
(L{aiproxy.holdback}): a secret split across chunks (C{user@exa} +
C{mple.com}) is seen whole and replaced; text that cannot start a match
goes on at once, so the added latency is bounded by C{hold_back_chars}
characters and is zero for text far from any match. Events whose text
changed carry re-serialised JSON with the new C{delta.content} (or
C{delta.text}); an event left without text or other content is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import regex
from twisted.logger import Logger
from zope.interface import implementer

from aiproxy.builtin._common import META_PROPERTY, PluginConfigError
from aiproxy.builtin._textstream import ProtocolGate, TextStreamFilter
from aiproxy.filters import Terminate
from aiproxy.holdback import HoldBackWindow, PatternError, compile_pattern
from aiproxy.interfaces import IBodyFilterFactory, IFilterPlugin

__all__ = ["ResponseRedact", "ResponseRedactFilter", "ResponseRedactPlugin"]

log = Logger()

SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "ai-response-redact",
    "properties": {
        "_meta": META_PROPERTY,
        "rules": {
            "type": "array",
            "minItems": 1,
            "description": (
                "Pattern and replacement pairs, tried together: the leftmost match wins, "
                "ties going to the earlier rule."
            ),
            "items": {
                "type": "object",
                "properties": {
                    "pattern": {
                        "type": "string",
                        "minLength": 1,
                        "description": "A regular expression searched in the response text.",
                    },
                    "replacement": {
                        "type": "string",
                        "default": "[REDACTED]",
                        "description": r"What replaces a match; \1 or \g<name> insert a group.",
                    },
                },
                "required": ["pattern"],
                "additionalProperties": False,
            },
        },
        "hold_back_chars": {
            "type": "integer",
            "minimum": 0,
            "maximum": 65536,
            "default": 64,
            "description": (
                "The most characters of text held back while a match is possible; matches "
                "longer than this may be missed."
            ),
        },
    },
    "required": ["rules"],
    "additionalProperties": False,
}


def _check_replacement(pattern: Any, replacement: str) -> None:
    """
    Expand C{replacement} once against an empty match of C{pattern}'s
    groups, so a reference to a group it lacks is a config error.

    @raise ValueError: when the template is not valid for the pattern.
    """
    probe = regex.compile(f"(?:{pattern.pattern})|", pattern.flags)
    match = probe.search("")
    assert match is not None
    try:
        match.expand(replacement)
    except (regex.error, IndexError) as e:
        raise ValueError(f"invalid replacement: {e}") from None


@implementer(IBodyFilterFactory)
class ResponseRedact:
    """
    A route's configured C{ai-response-redact}.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        """
        @raise PluginConfigError: for a pattern that does not compile or a
            replacement naming a group the pattern lacks.
        """
        rules = config["rules"]
        problems: list[tuple[list[str | int], str]] = []
        self.patterns: list[Any] = []
        self.replacements: list[str] = []
        for index, rule in enumerate(rules):
            try:
                pattern = compile_pattern(rule["pattern"])
            except PatternError as e:
                problems.append((["rules", index, "pattern"], str(e)))
                continue
            try:
                _check_replacement(pattern, rule["replacement"])
            except ValueError as e:
                problems.append((["rules", index, "replacement"], str(e)))
                continue
            self.patterns.append(pattern)
            self.replacements.append(rule["replacement"])
        if problems:
            raise PluginConfigError(problems)
        self.hold_back_chars: int = config["hold_back_chars"]
        self._protocols = ProtocolGate(
            log, "ai-response-redact does not read {protocol} responses; they pass unredacted"
        )

    def body_filter(self, context: Any) -> ResponseRedactFilter | None:
        """
        Redact one response of a supported protocol.
        """
        if not self._protocols.reads(context.upstream_protocol):
            return None
        return ResponseRedactFilter(self, context.upstream_protocol)


class ResponseRedactFilter(TextStreamFilter):
    """
    C{ai-response-redact} over one response.
    """

    def __init__(self, redact: ResponseRedact, protocol: str) -> None:
        super().__init__(protocol)
        self.redact = redact

    def make_window(self) -> HoldBackWindow:
        redact = self.redact
        return HoldBackWindow(redact.patterns, redact.hold_back_chars, redact.replacements)

    def hit_result(self, context: Any, stream: bool) -> Terminate:
        raise AssertionError("a rewrite window never hits")


@implementer(IFilterPlugin)
class ResponseRedactPlugin:
    """
    The C{ai-response-redact} plugin.
    """

    name = "ai-response-redact"
    priority = 1025
    config_schema = SCHEMA

    def configure(self, config: dict) -> ResponseRedact:
        """
        Compile the route's rules.
        """
        return ResponseRedact(config)
