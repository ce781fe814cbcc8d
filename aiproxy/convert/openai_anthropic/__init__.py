# -*- test-case-name: tests.test_convert_openai_anthropic -*-
"""
An OpenAI chat client served by an Anthropic Messages upstream
(docs/conversion.md): the request becomes a Messages request
(L{aiproxy.convert.openai_anthropic.request}), the answer a
C{chat.completion}, the event stream C{chat.completion.chunk}s ending in
C{data: [DONE]} (L{aiproxy.convert.openai_anthropic.stream}), error
bodies OpenAI errors.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from aiproxy.convert import errors
from aiproxy.convert.encoding import dumps, encode
from aiproxy.convert.openai_anthropic.request import (
    BUDGETS,
    DEFAULT_MAX_TOKENS,
    client_max_tokens,
    convert_messages,
    convert_tool_choice,
    convert_tools,
    refuse,
)
from aiproxy.convert.openai_anthropic.stream import (
    OpenAIStream,
    finish_reason,
    openai_usage,
)
from aiproxy.interfaces import IConverter
from aiproxy.stream.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT
from aiproxy.upstream.request import ClientError

__all__ = ["ANTHROPIC_VERSION", "DEFAULT_MAX_TOKENS", "OpenAIToAnthropic"]


#: The C{anthropic-version} header sent when the route sets none.
ANTHROPIC_VERSION = b"2023-06-01"

#: How many streamed requests asking for a usage chunk are remembered
#: between L{OpenAIToAnthropic.convert_request} and
#: L{OpenAIToAnthropic.stream} (a request that fails in between leaves its
#: small entry until it is pushed out).
_ASKED_LIMIT = 65536


@implementer(IConverter)
class OpenAIToAnthropic:
    """
    Converts OpenAI chat requests for an Anthropic Messages upstream, and its
    answers back. Shared by a route's requests.

    Whether a streamed request asked C{stream_options.include_usage} is not
    part of the upstream body (Anthropic refuses unknown fields), yet
    L{stream} needs it: L{convert_request} remembers it per context for
    L{stream} (or L{convert_answer}) to take. C{ExchangeContext} has no
    C{__weakref__} slot, so the entry is keyed by C{id(context)} and checked
    against C{context.started}: no context is kept alive, and an entry left
    by a request that failed in between is never read by another request;
    at most L{_ASKED_LIMIT} entries are kept, the oldest pushed out.
    """

    client_protocol = OPENAI_CHAT
    upstream_protocol = ANTHROPIC_MESSAGES

    def __init__(
        self, default_max_tokens: int = DEFAULT_MAX_TOKENS, clock: IReactorTime | None = None
    ) -> None:
        """
        @param default_max_tokens: C{max_tokens} when the client gives none
            (the route's C{override.llm_options.max_tokens} when set).
        @param clock: the source of the C{created} times (the wall clock by
            default).
        """
        self.default_max_tokens = default_max_tokens
        self._clock = clock
        self._asked: dict[int, float] = {}

    def _now(self) -> int:
        return int(self._clock.seconds() if self._clock is not None else time.time())

    def _take_asked(self, context: Any) -> bool:
        """
        Whether the streamed request of C{context} asked for a usage chunk
        (forgotten once taken).
        """
        return self._asked.pop(id(context), None) == context.started

    def convert_request(self, body: Any, context: Any) -> dict[str, Any]:
        if not isinstance(body, Mapping):
            raise refuse("missing messages")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ClientError(400, "missing messages", {"error_msg": "missing messages"})
        system, converted = convert_messages(messages)
        out: dict[str, Any] = {}
        if "model" in body:
            out["model"] = body["model"]
        out["messages"] = converted
        if system:
            out["system"] = "\n\n".join(system)
        max_tokens = client_max_tokens(body)
        effort = body.get("reasoning_effort")
        budget = BUDGETS.get(effort) if isinstance(effort, str) else None
        if max_tokens is None:
            max_tokens = self.default_max_tokens
            if budget is not None and max_tokens <= budget:
                # Anthropic wants room beyond the thinking budget.
                max_tokens += budget
        out["max_tokens"] = max_tokens
        if budget is not None:
            out["thinking"] = {"type": "enabled", "budget_tokens": budget}
        stop = body.get("stop")
        if isinstance(stop, str):
            out["stop_sequences"] = [stop]
        elif isinstance(stop, list):
            sequences = [s for s in stop if isinstance(s, str)]
            if sequences:
                out["stop_sequences"] = sequences
        for key in ("temperature", "top_p"):
            if body.get(key) is not None:
                out[key] = body[key]
        user = body.get("user")
        if isinstance(user, str):
            out["metadata"] = {"user_id": user}
        tools = body.get("tools")
        if tools:
            out["tools"] = convert_tools(tools)
            choice = convert_tool_choice(body.get("tool_choice"))
            if body.get("parallel_tool_calls") is False:
                if choice is None:
                    choice = {"type": "auto"}
                if choice["type"] != "none":
                    choice["disable_parallel_tool_use"] = True
            if choice is not None:
                out["tool_choice"] = choice
        stream = body.get("stream")
        if isinstance(stream, bool):
            out["stream"] = stream
        options = body.get("stream_options")
        if (
            stream is True
            and isinstance(options, dict)
            and options.get("include_usage") is True
            and context is not None
        ):
            asked = self._asked
            asked[id(context)] = context.started
            if len(asked) > _ASKED_LIMIT:
                del asked[next(iter(asked))]
        return out

    def convert_headers(self, headers: Any, own_credentials: bool) -> None:
        """
        Without the route's own credentials the client's C{authorization}
        (the only one there is) is removed, its bearer key sent as
        C{x-api-key}; with them, the client's was already left out and an
        C{authorization} header is the route's own, kept.
        C{anthropic-version} is set when absent.
        """
        if not own_credentials:
            values = headers.getRawHeaders(b"authorization")
            if values:
                headers.removeHeader(b"authorization")
                scheme, _, key = values[0].strip().partition(b" ")
                key = key.strip()
                if scheme.lower() == b"bearer" and key and not headers.hasHeader(b"x-api-key"):
                    headers.setRawHeaders(b"x-api-key", [key])
        if not headers.hasHeader(b"anthropic-version"):
            headers.setRawHeaders(b"anthropic-version", [ANTHROPIC_VERSION])

    def convert_answer(self, status: int, body: bytes, context: Any) -> bytes:
        """
        @raise ValueError: a success whose body is not an Anthropic message.
        """
        self._take_asked(context)
        if status >= 400:
            return errors.to_openai_error(status, body)
        document = json.loads(body)
        if not isinstance(document, dict) or not isinstance(document.get("content"), list):
            raise ValueError("upstream answer is not an Anthropic message")
        texts: list[str] = []
        thinking: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in document["content"]:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                thinking.append(block["thinking"])
            elif kind == "tool_use":
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {
                            "name": block.get("name"),
                            "arguments": encode(block.get("input", {})),
                        },
                    }
                )
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts or not calls else None,
        }
        if thinking:
            message["reasoning_content"] = "".join(thinking)
        if calls:
            message["tool_calls"] = calls
            context.has_tool_calls = True
        usage = document.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        else:
            context.set_usage(usage)
        model = context.llm_model or document.get("model")
        answer = {
            "id": document.get("id"),
            "object": "chat.completion",
            "created": self._now(),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finish_reason(document.get("stop_reason")),
                }
            ],
            "usage": openai_usage(usage),
        }
        return dumps(answer)

    def convert_error(self, status: int, message: str) -> bytes:
        return errors.openai_error(message)

    def stream(self, context: Any) -> OpenAIStream:
        return OpenAIStream(self._now(), self._take_asked(context))
