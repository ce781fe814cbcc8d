# -*- test-case-name: tests.test_context -*-
"""
The per-request context: what filters see and what the access log records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["RECORD_KEYS", "ExchangeContext"]

#: The keys docs/operations.md lists in every access record (an
#: L{ExchangeContext.record} holds them all, and C{method}, C{path} and
#: C{flushes} besides).
RECORD_KEYS = frozenset(
    {
        "route_id",
        "instance",
        "status",
        "request_type",
        "request_llm_model",
        "llm_model",
        "llm_time_to_first_token",
        "upstream_response_time",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "reasoning_tokens",
        "llm_has_tool_calls",
        "bytes_in",
        "bytes_out",
        "abort_reason",
        "consumer",
    }
)


def _int(value: Any) -> int | None:
    """
    C{value} if it is an integer token count, else L{None}.
    """
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _later(known: int | None, new: int | None) -> int | None:
    """
    A count after a later usage object: C{new} unless it is missing, or 0
    while a count is known.
    """
    if new is None or (new == 0 and known):
        return known
    return new


class ExchangeContext:
    """
    Everything known about one proxied request, filled in as it goes.

    Filters read C{events} (the decoded events of the chunk being
    filtered), C{text} (the response text so far), C{usage}, C{done} and
    C{ttft_ms}; the access log reads L{record}.

    @ivar protocol: the client's protocol (request filters read the body in
        it).
    @ivar upstream_protocol: the protocol the upstream answers in (body
        filters read the events in it): the client's, or the protocol it is
        converted to.

    @ivar wants_text: whether the response text is collected (only when a
        body filter is active: collecting it costs a JSON parse per event).
    @ivar done: the upstream ended the response with its own terminator.
    @ivar output_started: bytes (and so the status) reached the client.
    """

    __slots__ = (
        "route_id",
        "instance",
        "provider",
        "protocol",
        "upstream_protocol",
        "stream",
        "body",
        "body_changed",
        "request_llm_model",
        "llm_model",
        "started",
        "ttft_ms",
        "upstream_response_time_ms",
        "usage",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "reasoning_tokens",
        "has_tool_calls",
        "events",
        "wants_text",
        "_text",
        "done",
        "output_started",
        "bytes_in",
        "bytes_out",
        "status",
        "abort_reason",
        "flushes",
        "path",
        "method",
        "consumer",
    )

    def __init__(self, route_id: str, instance: str | None, started: float) -> None:
        self.route_id = route_id
        self.instance = instance
        self.started = started
        self.provider: str | None = None
        self.protocol: str | None = None
        self.upstream_protocol: str | None = None
        self.stream = False
        self.body: dict[str, Any] | None = None
        self.body_changed = False
        self.request_llm_model: str | None = None
        self.wants_text = False
        self.output_started = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.status: int | None = None
        self.abort_reason: str | None = None
        self.flushes = 0
        self.path = ""
        self.method = ""
        #: The consumer's username (L{None}: anonymous).
        self.consumer: str | None = None
        self.reset_response()

    def reset_response(self) -> None:
        """
        Set what an upstream response tells (figures, text, end marker,
        timings) to nothing known: at the start, and when the request falls
        back to another instance, whose answer is the one recorded.
        """
        self.llm_model: str | None = None
        self.ttft_ms: int | None = None
        self.upstream_response_time_ms: int | None = None
        self.usage: Mapping[str, Any] | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.total_tokens: int | None = None
        self.cache_read_input_tokens: int | None = None
        self.cache_creation_input_tokens: int | None = None
        self.reasoning_tokens: int | None = None
        self.has_tool_calls = False
        self.events: list[Any] = []
        self._text: list[str] = []
        self.done = False

    def mark_body_changed(self) -> None:
        """
        A request filter changed C{body}: it is serialised again upstream.
        """
        self.body_changed = True

    @property
    def text(self) -> str:
        """
        The response text received so far (collected only when
        C{wants_text} is set).
        """
        if len(self._text) > 1:
            self._text = ["".join(self._text)]
        return self._text[0] if self._text else ""

    def add_text(self, piece: str) -> None:
        """
        Append a piece of response text.
        """
        self._text.append(piece)

    def set_usage(self, usage: Mapping[str, Any]) -> None:
        """
        Record a usage object in OpenAI, Responses or Anthropic shape; later
        objects update the counts they carry (Anthropic sends usage twice),
        except that a later 0 does not erase a count already known (as in
        APISIX: an Anthropic C{message_delta} may carry C{input_tokens: 0}).
        The total is the upstream's, or at least prompt + completion.
        L{usage} holds every field seen, by the same rule.
        """
        previous = self.usage
        if previous is not None:
            merged = dict(previous)
            merged.update((k, v) for k, v in usage.items() if v or k not in merged)
            usage = merged
        self.usage = usage
        prompt = _int(usage.get("prompt_tokens"))
        if prompt is None:
            prompt = _int(usage.get("input_tokens"))
        completion = _int(usage.get("completion_tokens"))
        if completion is None:
            completion = _int(usage.get("output_tokens"))
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        cached = _int(usage.get("cache_read_input_tokens"))
        if cached is None and isinstance(details, dict):
            cached = _int(details.get("cached_tokens"))
        if cached is None:
            cached = _int(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
        out_details = (
            usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        )
        reasoning = (
            _int(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else None
        )
        self.prompt_tokens = _later(self.prompt_tokens, prompt)
        self.completion_tokens = _later(self.completion_tokens, completion)
        self.cache_read_input_tokens = _later(self.cache_read_input_tokens, cached)
        self.cache_creation_input_tokens = _later(
            self.cache_creation_input_tokens, _int(usage.get("cache_creation_input_tokens"))
        )
        self.reasoning_tokens = _later(self.reasoning_tokens, reasoning)
        total = _later(self.total_tokens, _int(usage.get("total_tokens")))
        if self.prompt_tokens is not None and self.completion_tokens is not None:
            total = max(total or 0, self.prompt_tokens + self.completion_tokens)
        self.total_tokens = total

    def record(self) -> dict[str, Any]:
        """
        The access-log record of this request: every key of L{RECORD_KEYS}
        (docs/operations.md) and C{method}, C{path}, C{flushes}. Never holds
        credentials: only figures and names.
        """
        return {
            "route_id": self.route_id,
            "instance": self.instance,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "request_type": "ai_stream" if self.stream else "ai_chat",
            "request_llm_model": self.request_llm_model,
            "llm_model": self.llm_model or self.request_llm_model,
            "llm_time_to_first_token": self.ttft_ms,
            "upstream_response_time": self.upstream_response_time_ms,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "llm_has_tool_calls": self.has_tool_calls,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "flushes": self.flushes,
            "abort_reason": self.abort_reason,
            "consumer": self.consumer,
        }
