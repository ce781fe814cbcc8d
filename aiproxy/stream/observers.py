# -*- test-case-name: tests.test_protocols -*-
"""
How each protocol's responses are read (model, usage, text, tool calls,
end of stream) into the request's context.

Reading a stream is on the per-chunk hot path: an observer only parses the
JSON of the events it needs (the first one for the model, the one carrying
usage), unless a body filter asked for the text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from aiproxy.stream.protocols import (
    ANTHROPIC_MESSAGES,
    BEDROCK_CONVERSE,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    _json,
)

__all__ = [
    "BEDROCK_OBSERVER",
    "NULL_OBSERVER",
    "AnthropicObserver",
    "BedrockObserver",
    "OpenAIChatObserver",
    "PassthroughObserver",
    "ResponsesObserver",
    "observer_for",
]


_BLANKS = b" \t\r\n"


def _values(data: bytes, key: bytes) -> Iterator[bytes]:
    """
    The start of every value written after C{key} (a quoted JSON key) in
    C{data}: a few bytes from the value's first non-blank byte. A C{key}
    not followed by a colon (a string value, not a key) is skipped.
    """
    at = data.find(key)
    while at != -1:
        start = at + len(key)
        rest = data[start : start + 256].lstrip(_BLANKS)
        if rest[:1] == b":":
            yield rest[1:].lstrip(_BLANKS)
        at = data.find(key, at + 1)


def _has_object(data: bytes, key: bytes) -> bool:
    """
    Whether C{data} holds C{"key": {...}} (not C{null}), without parsing it.
    """
    return any(value[:1] == b"{" for value in _values(data, key))


def _has_items(data: bytes, key: bytes) -> bool:
    """
    Whether C{data} holds C{"key": [...]} with at least one item (not
    C{null} nor C{[]}), without parsing it.
    """
    return any(
        value[:1] == b"[" and value[1:].lstrip(_BLANKS)[:1] not in (b"]", b"")
        for value in _values(data, key)
    )


class _Observer:
    """
    Reads figures out of one response of one protocol into an
    L{aiproxy.context.ExchangeContext}.
    """

    def observe_events(self, events: Iterable[Any], context: Any) -> None:
        """
        Read the decoded events of one chunk of a stream.
        """

    def observe_body(self, body: bytes, context: Any) -> None:
        """
        Read a whole non-streamed JSON body.
        """
        document = _json(body)
        if isinstance(document, dict):
            self.read_document(document, context)

    def read_document(self, document: Mapping[str, Any], context: Any) -> None:
        """
        Read a parsed response (a whole body, or the message/response object
        a stream starts or ends with). The response's model is only used
        when the request named none: C{llm_model} is the model sent
        upstream, as in APISIX, for every protocol and mode.
        """
        model = document.get("model")
        if isinstance(model, str) and context.llm_model is None:
            context.llm_model = model
        usage = document.get("usage")
        if isinstance(usage, dict):
            context.set_usage(usage)


class OpenAIChatObserver(_Observer):
    """
    OpenAI chat completions: C{chat.completion} bodies and
    C{chat.completion.chunk} streams ending in C{data: [DONE]}.
    """

    def observe_events(self, events: Iterable[Any], context: Any) -> None:
        want_text = context.wants_text
        for event in events:
            data = event.data
            if data == b"[DONE]":
                context.done = True
                continue
            document = None
            if context.llm_model is None or want_text:
                document = _json(data)
                if isinstance(document, dict) and context.llm_model is None:
                    model = document.get("model")
                    context.llm_model = model if isinstance(model, str) else ""
            if b'"tool_calls"' in data and _has_items(data, b'"tool_calls"'):
                context.has_tool_calls = True
            if b'"usage"' in data and _has_object(data, b'"usage"'):
                if document is None:
                    document = _json(data)
                if isinstance(document, dict) and isinstance(document.get("usage"), dict):
                    context.set_usage(document["usage"])
            if want_text and isinstance(document, dict):
                for choice in document.get("choices") or ():
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    content = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(content, str) and content:
                        context.add_text(content)

    def read_document(self, document: Mapping[str, Any], context: Any) -> None:
        super().read_document(document, context)
        for choice in document.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict):
                if message.get("tool_calls"):
                    context.has_tool_calls = True
                content = message.get("content")
                if isinstance(content, str):
                    context.add_text(content)


class AnthropicObserver(_Observer):
    """
    Anthropic messages: C{message} bodies and event streams ending in
    C{message_stop}.
    """

    def observe_events(self, events: Iterable[Any], context: Any) -> None:
        for event in events:
            kind = event.event
            if kind == "content_block_delta":
                if context.wants_text:
                    document = _json(event.data)
                    delta = document.get("delta") if isinstance(document, dict) else None
                    if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                        context.add_text(delta["text"])
            elif kind == "message_start":
                document = _json(event.data)
                message = document.get("message") if isinstance(document, dict) else None
                if isinstance(message, dict):
                    self.read_document(message, context)
            elif kind == "message_delta":
                document = _json(event.data)
                if isinstance(document, dict) and isinstance(document.get("usage"), dict):
                    context.set_usage(document["usage"])
            elif kind == "content_block_start":
                if b'"tool_use"' in event.data:
                    context.has_tool_calls = True
            elif kind == "message_stop":
                context.done = True

    def read_document(self, document: Mapping[str, Any], context: Any) -> None:
        super().read_document(document, context)
        for block in document.get("content") or ():
            if isinstance(block, dict):
                if block.get("type") == "tool_use":
                    context.has_tool_calls = True
                elif block.get("type") == "text" and isinstance(block.get("text"), str):
                    context.add_text(block["text"])


class ResponsesObserver(_Observer):
    """
    OpenAI Responses: C{response} bodies and event streams ending in
    C{response.completed} (or C{response.failed}/C{response.incomplete}).
    """

    _END = frozenset({"response.completed", "response.failed", "response.incomplete"})

    def observe_events(self, events: Iterable[Any], context: Any) -> None:
        for event in events:
            kind = event.event
            if kind == "response.output_text.delta":
                if context.wants_text:
                    document = _json(event.data)
                    if isinstance(document, dict) and isinstance(document.get("delta"), str):
                        context.add_text(document["delta"])
            elif kind in self._END or kind == "response.created":
                document = _json(event.data)
                response = document.get("response") if isinstance(document, dict) else None
                if isinstance(response, dict):
                    self.read_document(response, context)
                if kind in self._END:
                    context.done = True
            elif kind == "response.output_item.added" and b'"function_call"' in event.data:
                context.has_tool_calls = True

    def read_document(self, document: Mapping[str, Any], context: Any) -> None:
        super().read_document(document, context)
        for item in document.get("output") or ():
            if isinstance(item, dict) and item.get("type") == "function_call":
                context.has_tool_calls = True

    def observe_body(self, body: bytes, context: Any) -> None:
        """
        Read a whole C{response} object, its output text included (in a
        stream the text comes from the deltas, not from
        C{response.completed}, which repeats it).
        """
        document = _json(body)
        if not isinstance(document, dict):
            return
        self.read_document(document, context)
        for item in document.get("output") or ():
            if isinstance(item, dict) and item.get("type") == "message":
                for part in item.get("content") or ():
                    if (
                        isinstance(part, dict)
                        and part.get("type") == "output_text"
                        and isinstance(part.get("text"), str)
                    ):
                        context.add_text(part["text"])


#: Bedrock's usage names, and the names L{aiproxy.context.ExchangeContext.set_usage} reads.
_BEDROCK_USAGE = (
    ("inputTokens", "input_tokens"),
    ("outputTokens", "output_tokens"),
    ("totalTokens", "total_tokens"),
    ("cacheReadInputTokens", "cache_read_input_tokens"),
    ("cacheWriteInputTokens", "cache_creation_input_tokens"),
)


def _bedrock_usage(usage: Any, context: Any) -> None:
    """
    Record a Bedrock C{usage} object (C{inputTokens}, ...) in C{context}.
    """
    if isinstance(usage, dict):
        context.set_usage({ours: usage[name] for name, ours in _BEDROCK_USAGE if name in usage})


class BedrockObserver(_Observer):
    """
    Bedrock Converse: whole C{Converse} answers, and C{ConverseStream}
    answers as AWS EventStream messages (L{aiproxy.stream.eventstream.EventStreamMessage}):
    C{contentBlockDelta} carries text, C{messageStop} and C{metadata} (with
    the usage) end the stream, and an C{exception} or C{error} message marks
    it failed (C{done} false; its payload is not kept).
    """

    def observe_events(self, events: Iterable[Any], context: Any) -> None:
        for message in events:
            headers = getattr(message, "headers", None)
            if not isinstance(headers, dict):
                continue
            if headers.get(":message-type", "event") != "event":
                context.done = False
                continue
            kind = headers.get(":event-type")
            if kind == "contentBlockDelta":
                if context.wants_text:
                    document = _json(message.payload)
                    delta = document.get("delta") if isinstance(document, dict) else None
                    text = delta.get("text") if isinstance(delta, dict) else None
                    if isinstance(text, str):
                        context.add_text(text)
            elif kind == "contentBlockStart":
                if b'"toolUse"' in message.payload:
                    context.has_tool_calls = True
            elif kind == "messageStop":
                context.done = True
            elif kind == "metadata":
                document = _json(message.payload)
                if isinstance(document, dict):
                    _bedrock_usage(document.get("usage"), context)
                context.done = True

    def read_document(self, document: Mapping[str, Any], context: Any) -> None:
        _bedrock_usage(document.get("usage"), context)
        output = document.get("output")
        message = output.get("message") if isinstance(output, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            if not isinstance(block, dict):
                continue
            if isinstance(block.get("text"), str):
                context.add_text(block["text"])
            elif "toolUse" in block:
                context.has_tool_calls = True


#: Reads Bedrock answers; any AWS EventStream framing (other items are ignored).
BEDROCK_OBSERVER = BedrockObserver()


class PassthroughObserver(_Observer):
    """
    Anything else: only a C{[DONE]} event or a JSON body's C{model} and
    C{usage} are read.
    """

    def observe_events(self, events: Iterable[Any], context: Any) -> None:
        for event in events:
            if event.data == b"[DONE]":
                context.done = True


_OBSERVERS: dict[str, _Observer] = {
    OPENAI_CHAT: OpenAIChatObserver(),
    ANTHROPIC_MESSAGES: AnthropicObserver(),
    OPENAI_RESPONSES: ResponsesObserver(),
    BEDROCK_CONVERSE: BEDROCK_OBSERVER,
}

_PASSTHROUGH_OBSERVER = PassthroughObserver()

#: Reads nothing: for frames that are not SSE events (AWS EventStream).
NULL_OBSERVER = _Observer()


def observer_for(protocol: str) -> _Observer:
    """
    The observer reading responses of C{protocol} (stateless, shared).
    """
    return _OBSERVERS.get(protocol, _PASSTHROUGH_OBSERVER)
