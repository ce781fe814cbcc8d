# -*- test-case-name: tests.test_proxy -*-
"""
What an exchange leaves behind: its access record (the one place it is
built, for proxied and refused requests alike) and its L{Timings} for the
monitor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiproxy.accesslog import log_access
from aiproxy.context import ExchangeContext

__all__ = ["Timings", "llm_logging_fields", "log_record", "refusal_record"]

#: The request body keys C{logging.payloads} records.
_LOGGED_REQUEST_KEYS = ("model", "system", "messages", "input", "prompt", "stream")


@dataclass(slots=True)
class Timings:
    """
    When the steps of one exchange happened (clock seconds; L{None}: not
    yet, or not timed). The chunk and output times are taken only while the
    monitor wants stream timings (metrics on).

    @ivar started: the request arrived.
    @ivar first_sent: the first upstream attempt was sent.
    @ivar sent: the current upstream attempt was sent.
    @ivar first_chunk: the current attempt's first body chunk arrived.
    @ivar first_output: the first body bytes were written to the client.
    @ivar upstream_ended: the current attempt's upstream answer ended
        (whole, cut, or failed).
    """

    started: float
    first_sent: float | None = None
    sent: float | None = None
    first_chunk: float | None = None
    first_output: float | None = None
    upstream_ended: float | None = None

    def attempt_sent(self, at: float) -> None:
        """
        An upstream attempt was sent C{at}.
        """
        if self.first_sent is None:
            self.first_sent = at
        self.sent = at
        self.first_chunk = self.upstream_ended = None


def llm_logging_fields(
    context: ExchangeContext, logging: Mapping[str, Any], duration_ms: int
) -> dict[str, Any]:
    """
    The access-record keys of a route's C{logging} options, as APISIX adds
    them: C{llm_summary} (C{summaries}); C{llm_request} and
    C{llm_response_text} (C{payloads}). The request part holds the
    conversation only (never headers, so never a credential).
    """
    fields: dict[str, Any] = {}
    if logging.get("summaries"):
        fields["llm_summary"] = {
            "model": context.llm_model or context.request_llm_model,
            "duration": duration_ms,
            "prompt_tokens": context.prompt_tokens,
            "completion_tokens": context.completion_tokens,
            "total_tokens": context.total_tokens,
            "upstream_response_time": context.upstream_response_time_ms,
            "stream": context.stream,
        }
    if logging.get("payloads"):
        body = context.body or {}
        fields["llm_request"] = {key: body[key] for key in _LOGGED_REQUEST_KEYS if key in body}
        fields["llm_response_text"] = {"content": context.text}
    return fields


def log_record(
    context: ExchangeContext,
    attempts: list[dict[str, Any]],
    logging: Mapping[str, Any] | None,
    now: float,
) -> dict[str, Any]:
    """
    Write the access record of a proxied request: the context's figures,
    its upstream C{attempts} and the route's C{logging} extras.

    @return: the record.
    """
    record = context.record()
    record["attempts"] = attempts
    if logging:
        record.update(llm_logging_fields(context, logging, int((now - context.started) * 1000)))
    log_access(record)
    return record


def refusal_record(
    method: bytes,
    path: bytes,
    status: int,
    route_id: str | None = None,
    instance: str | None = None,
    reason: str | None = None,
    bytes_in: int = 0,
    bytes_out: int = 0,
) -> dict[str, Any]:
    """
    The access record of a request refused before an exchange handled it:
    the same keys as an exchange's, figures unknown left null.
    """
    context = ExchangeContext(route_id, instance, 0.0)  # type: ignore[arg-type]
    context.method = method.decode("latin-1")
    context.path = path.partition(b"?")[0].decode("latin-1")
    context.status = status
    context.abort_reason = reason
    context.bytes_in = bytes_in
    context.bytes_out = bytes_out
    record = context.record()
    record["request_type"] = None
    return record
