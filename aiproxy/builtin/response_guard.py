# -*- test-case-name: tests.test_builtin -*-
"""
C{ai-response-guard}: cut a response whose text matches a deny pattern,
and answer with a refusal in the client's format instead.

The text is matched as it streams, through a hold-back window
(L{aiproxy.holdback}): text that could be the start of a match is held
until it is decided, so a match split across chunks is found before any of
it reaches the client. Text that cannot start a match goes on at once.

On a hit before anything was sent the client gets C{deny_code} (200 by
default, like APISIX's moderation plugins, so SDKs read the refusal as a
normal completion) and a whole refusal: a stream for a streamed request,
a JSON body otherwise. After output started, the rest of the stream is
replaced by a refusal event and a proper end of stream (C{[DONE]}, or
C{message_stop}). Either way the upstream transfer is aborted.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from aiproxy.builtin._common import META_PROPERTY, compile_patterns, dumps, pattern_list
from aiproxy.builtin._textstream import ProtocolGate, TextStreamFilter
from aiproxy.filters import Terminate
from aiproxy.holdback import HoldBackWindow
from aiproxy.interfaces import IBodyFilterFactory, IFilterPlugin
from aiproxy.stream.protocols import OPENAI_CHAT

__all__ = ["ABORT_REASON", "ResponseGuard", "ResponseGuardFilter", "ResponseGuardPlugin"]

log = Logger()

#: The access record's C{abort_reason} when the guard cut a response.
ABORT_REASON = "ai_response_guard"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "ai-response-guard",
    "properties": {
        "_meta": META_PROPERTY,
        "deny_patterns": {
            **pattern_list("Regular expressions searched in the response text as it streams."),
            "minItems": 1,
        },
        "deny_code": {
            "type": "integer",
            "minimum": 200,
            "maximum": 599,
            "default": 200,
            "description": (
                "HTTP status of the refusal when nothing was sent yet; 200 lets client SDKs "
                "read it as a normal completion."
            ),
        },
        "deny_message": {
            "type": "string",
            "default": "your request is rejected",
            "description": "The refusal's text, sent as the assistant's content.",
        },
        "hold_back_chars": {
            "type": "integer",
            "minimum": 1,
            "maximum": 65536,
            "default": 64,
            "description": (
                "The most characters of text held back while a match is possible; matches "
                "longer than this may be missed."
            ),
        },
    },
    "required": ["deny_patterns"],
    "additionalProperties": False,
}


def _usage(context: Any, protocol: str) -> dict[str, Any]:
    usage = context.usage
    if isinstance(usage, Mapping):
        return dict(usage)
    if protocol == OPENAI_CHAT:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {"input_tokens": 0, "output_tokens": 0}


def _anthropic_event(kind: str, **fields: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, **fields}) + b"\n\n"


@implementer(IBodyFilterFactory)
class ResponseGuard:
    """
    A route's configured C{ai-response-guard}.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        """
        @raise aiproxy.plugins.PluginConfigError: for a pattern that does
            not compile.
        """
        self.patterns = compile_patterns(config["deny_patterns"], ["deny_patterns"])
        self.deny_code: int = config["deny_code"]
        self.deny_message: str = config["deny_message"]
        self.hold_back_chars: int = config["hold_back_chars"]
        self._protocols = ProtocolGate(
            log, "ai-response-guard does not read {protocol} responses; they pass unguarded"
        )

    def body_filter(self, context: Any) -> ResponseGuardFilter | None:
        """
        Guard one response of a supported protocol.
        """
        if not self._protocols.reads(context.upstream_protocol):
            return None
        return ResponseGuardFilter(self, context.upstream_protocol)


class ResponseGuardFilter(TextStreamFilter):
    """
    C{ai-response-guard} over one response.
    """

    def __init__(self, guard: ResponseGuard, protocol: str) -> None:
        super().__init__(protocol)
        self.guard = guard

    def make_window(self) -> HoldBackWindow:
        return HoldBackWindow(self.guard.patterns, self.guard.hold_back_chars)

    def hit_result(self, context: Any, stream: bool) -> Terminate:
        guard = self.guard
        log.info(
            "ai-response-guard denied the response of route {route}: deny_patterns[{index}] matched",
            route=context.route_id,
            index=self._hit[0],
        )
        if not stream:
            return Terminate(
                self._whole_refusal(context), guard.deny_code, "application/json", ABORT_REASON
            )
        if not context.output_started:
            return Terminate(
                self._stream_refusal(context, fresh=True),
                guard.deny_code,
                "text/event-stream",
                ABORT_REASON,
            )
        return Terminate(self._stream_refusal(context, fresh=False), reason=ABORT_REASON)

    def _model(self, context: Any) -> str | None:
        return self.model or context.llm_model or context.request_llm_model

    def _whole_refusal(self, context: Any) -> bytes:
        """
        A non-streamed refusal in the client's format.
        """
        message = self.guard.deny_message
        if self.protocol == OPENAI_CHAT:
            return dumps(
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex}",
                    "object": "chat.completion",
                    "model": self._model(context),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": message},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": _usage(context, self.protocol),
                }
            )
        return dumps(
            {
                "id": f"msg_{uuid.uuid4().hex}",
                "type": "message",
                "role": "assistant",
                "model": self._model(context),
                "content": [{"type": "text", "text": message}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": _usage(context, self.protocol),
            }
        )

    def _stream_refusal(self, context: Any, fresh: bool) -> bytes:
        """
        The refusal events ending a stream: a whole stream when C{fresh},
        else what completes the events already sent.
        """
        message = self.guard.deny_message
        if self.protocol == OPENAI_CHAT:
            base = dict(self.base)
            base.setdefault("id", f"chatcmpl-{uuid.uuid4().hex}")
            base.setdefault("object", "chat.completion.chunk")
            base.setdefault("model", self._model(context))
            chunk = {
                **base,
                "choices": [{"index": 0, "delta": {"content": message}, "finish_reason": "stop"}],
                "usage": _usage(context, self.protocol),
            }
            return b"data: " + dumps(chunk) + b"\n\ndata: [DONE]\n\n"
        out = []
        if fresh or not self.message_started:
            message_start: dict[str, Any] = {
                "id": f"msg_{uuid.uuid4().hex}",
                "type": "message",
                "role": "assistant",
                "model": self._model(context),
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
            out.append(_anthropic_event("message_start", message=message_start))
            open_blocks: list[Any] = []
            index: Any = 0
        else:
            open_blocks = sorted(self.open_blocks, key=str)
            index = open_blocks[0] if open_blocks else self.next_block
        if index not in open_blocks:
            out.append(
                _anthropic_event(
                    "content_block_start", index=index, content_block={"type": "text", "text": ""}
                )
            )
            open_blocks.append(index)
        out.append(
            _anthropic_event(
                "content_block_delta", index=index, delta={"type": "text_delta", "text": message}
            )
        )
        for block in open_blocks:
            out.append(_anthropic_event("content_block_stop", index=block))
        out.append(
            _anthropic_event(
                "message_delta",
                delta={"stop_reason": "end_turn", "stop_sequence": None},
                usage={"output_tokens": context.completion_tokens or 0},
            )
        )
        out.append(_anthropic_event("message_stop"))
        return b"".join(out)


@implementer(IFilterPlugin)
class ResponseGuardPlugin:
    """
    The C{ai-response-guard} plugin.
    """

    name = "ai-response-guard"
    priority = 1030
    config_schema = SCHEMA

    def configure(self, config: dict) -> ResponseGuard:
        """
        Compile the route's patterns.
        """
        return ResponseGuard(config)
