# -*- test-case-name: tests.test_builtin -*-
"""
The machinery of the response-text plugins: a body filter that reads the
text of an OpenAI chat or Anthropic messages response, event by event,
through one L{HoldBackWindow} per choice (or content block), and sends on
valid SSE events carrying only the text the windows released.

The filter decodes its own input (not C{context.events}, which describe
the upstream's chunk), so it composes behind any filter that replaced the
bytes. A chunk whose events all pass unchanged, starting and ending at an
event boundary, goes on as the very same bytes; otherwise the filter sends
the complete events it has, re-encoded (an event whose text changed gets
the new text spliced into its JSON, or its JSON re-serialised when the text
is not written as C{json.dumps} would), and keeps an incomplete trailing event until its
end arrives. SSE comments inside a changed chunk are not relayed.

Ordering: an event that ends a text (an OpenAI C{finish_reason} or
C{[DONE]}, an Anthropic C{content_block_stop}, C{message_delta} or
C{message_stop}) releases the held text first. Events that carry no text
(an Anthropic C{ping}, an OpenAI role-only delta) go on at once and may
overtake the few characters held back.

A non-streamed body is read whole at the end.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from aiproxy.builtin._common import dumps, encode_event
from aiproxy.filters import Replace, Terminate
from aiproxy.holdback import HoldBackWindow
from aiproxy.interfaces import IBodyFilter
from aiproxy.stream.protocols import ANTHROPIC_MESSAGES, OPENAI_CHAT
from aiproxy.stream.sse import SSEDecoder, SSEEvent

__all__ = ["SUPPORTED_PROTOCOLS", "ProtocolGate", "TextStreamFilter"]

#: The client protocols whose responses these filters read.
SUPPORTED_PROTOCOLS = frozenset({OPENAI_CHAT, ANTHROPIC_MESSAGES})


class ProtocolGate:
    """
    Whether a response-text plugin reads a response: only in one of the
    L{SUPPORTED_PROTOCOLS}; one in another protocol passes untouched, with
    one warning per protocol (not one per request).
    """

    def __init__(self, log: Logger, warning: str) -> None:
        """
        @param log: the plugin's logger.
        @param warning: the warning's format string, with a C{{protocol}}
            field.
        """
        self._log = log
        self._warning = warning
        self._warned: set[str | None] = set()

    def reads(self, protocol: str | None) -> bool:
        """
        Whether the plugin filters a response in C{protocol}.
        """
        if protocol in SUPPORTED_PROTOCOLS:
            return True
        if protocol not in self._warned:
            self._warned.add(protocol)
            self._log.warn(self._warning, protocol=protocol)
        return False


_ANTHROPIC_ENDS = frozenset({"message_delta", "message_stop", "error"})


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


@implementer(IBodyFilter)
class TextStreamFilter:
    """
    One response's text, through hold-back windows.

    Subclasses say how a window is made (L{make_window}) and what a hit of
    a detect-mode window does (L{hit_result}).

    @ivar protocol: the client protocol (one of L{SUPPORTED_PROTOCOLS}).
    @ivar base: the first OpenAI chunk's C{id}, C{created}, C{model}...
    @ivar model: the model named by the response, if any.
    @ivar open_blocks: Anthropic content blocks started and not stopped.
    @ivar next_block: the Anthropic block index after the highest seen.
    @ivar message_started: an Anthropic C{message_start} was sent on.
    """

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self._decoder = SSEDecoder()
        self._windows: dict[Any, HoldBackWindow] = {}
        self._whole: list[bytes] | None = None
        self._started = False
        self._hit: Any = None
        self._done = False
        self.base: dict[str, Any] = {}
        self.model: str | None = None
        self.open_blocks: set[Any] = set()
        self.next_block = 0
        self.message_started = False

    # -- for subclasses ------------------------------------------------------

    def make_window(self) -> HoldBackWindow:
        """
        A new window for one choice or content block.
        """
        raise NotImplementedError

    def hit_result(self, context: Any, stream: bool) -> Terminate:
        """
        What to answer once a detect-mode window found a match.

        @param stream: whether the response is a stream.
        """
        raise NotImplementedError

    # -- IBodyFilter ---------------------------------------------------------

    def filter_chunk(self, chunk: bytes, context: Any) -> Replace | Terminate | None:
        if self._done:
            return Replace(b"")
        if not self._started:
            if not chunk.strip():
                return None
            self._started = True
            if chunk.lstrip()[:1] == b"{":
                self._whole = []
        if self._whole is not None:
            self._whole.append(chunk)
            return Replace(b"")
        before = self._decoder.pending
        events = self._decoder.feed(chunk)
        parts: list[SSEEvent | bytes] = []
        unchanged = True
        for event in events:
            result = self._event(event)
            if self._hit is not None:
                denial = self._terminate(context, stream=True)
                if context.output_started and parts:
                    # The events before the hit are clean: they go first.
                    sent = b"".join(
                        encode_event(p) if isinstance(p, SSEEvent) else p for p in parts
                    )
                    denial = dataclasses.replace(denial, data=sent + denial.data)
                return denial
            if result is None:
                parts.append(event)
            else:
                unchanged = False
                parts.append(result)
        if unchanged and before == 0 and self._decoder.pending == 0:
            return None
        return Replace(b"".join(encode_event(p) if isinstance(p, SSEEvent) else p for p in parts))

    def finish(self, context: Any) -> Replace | Terminate | None:
        if self._done:
            return None
        if self._whole is not None:
            return self._finish_whole(b"".join(self._whole), context)
        self._decoder.close()
        tail = self._flush_all()
        if self._hit is not None:
            return self._terminate(context, stream=True)
        return Replace(tail) if tail else None

    # -- windows --------------------------------------------------------------

    def _window(self, channel: Any) -> HoldBackWindow:
        window = self._windows.get(channel)
        if window is None:
            window = self._windows[channel] = self.make_window()
        return window

    def _feed(self, channel: Any, text: str) -> str:
        window = self._window(channel)
        released = window.feed(text)
        if window.hit is not None:
            self._hit = window.hit
        return released

    def _flush(self, channel: Any) -> str:
        window = self._windows.get(channel)
        if window is None:
            return ""
        released = window.flush()
        if window.hit is not None:
            self._hit = window.hit
        return released

    def _flush_all(self) -> bytes:
        """
        Release every window's text as synthetic events.
        """
        out = []
        for channel in list(self._windows):
            text = self._flush(channel)
            if self._hit is not None:
                return b""
            if text:
                out.append(self._text_event(channel, text))
        return b"".join(out)

    def _terminate(self, context: Any, stream: bool) -> Terminate:
        self._done = True
        return self.hit_result(context, stream)

    # -- events ---------------------------------------------------------------

    def _event(self, event: SSEEvent) -> bytes | None:
        """
        Process one event: L{None} when it goes on unchanged, else its
        replacement (maybe empty, maybe preceded by released text).
        """
        if self.protocol == OPENAI_CHAT:
            return self._openai_event(event)
        return self._anthropic_event(event)

    def _text_event(self, channel: Any, text: str) -> bytes:
        """
        A synthetic event carrying released C{text} for C{channel}.
        """
        if self.protocol == OPENAI_CHAT:
            document = {
                **self.base,
                "choices": [
                    {
                        "index": channel,
                        "delta": {"content": text},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            return b"data: " + dumps(document) + b"\n\n"
        document = {
            "type": "content_block_delta",
            "index": channel,
            "delta": {"type": "text_delta", "text": text},
        }
        return b"event: content_block_delta\ndata: " + dumps(document) + b"\n\n"

    def _openai_event(self, event: SSEEvent) -> bytes | None:
        data = event.data
        if data == b"[DONE]":
            tail = self._flush_all()
            return tail + encode_event(event) if tail else None
        document = _loads(data)
        if not isinstance(document, dict):
            return None
        if not self.base:
            self.base = {k: v for k, v in document.items() if k not in ("choices", "usage")}
            model = document.get("model")
            self.model = model if isinstance(model, str) else None
        choices = document.get("choices")
        if not isinstance(choices, list) or not choices:
            # A usage or error event: no more text comes.
            tail = self._flush_all()
            return tail + encode_event(event) if tail else None
        changed = False
        spliced: bytes | None = None
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            finishing = choice.get("finish_reason") is not None
            if not isinstance(content, str) and not finishing:
                continue
            channel = choice.get("index", 0)
            text = content if isinstance(content, str) else ""
            released = self._feed(channel, text) if text else ""
            if finishing:
                released += self._flush(channel)
            if self._hit is not None:
                return b""
            if released != text:
                changed = True
                if len(choices) == 1 and isinstance(content, str):
                    spliced = _splice(data, b'"content":', content, released)
                if not isinstance(delta, dict):
                    delta = choice["delta"] = {}
                delta["content"] = released
        if not changed:
            return None
        if all(_held_only(choice) for choice in choices) and document.get("usage") is None:
            return b""
        return encode_event(event, spliced if spliced is not None else dumps(document))

    def _anthropic_event(self, event: SSEEvent) -> bytes | None:
        kind = event.event
        if kind == "content_block_delta":
            document = _loads(event.data)
            delta = document.get("delta") if isinstance(document, dict) else None
            if not isinstance(delta, dict) or not isinstance(delta.get("text"), str):
                return None
            text = delta["text"]
            released = self._feed(document.get("index", 0), text)
            if released == text or self._hit is not None:
                return None if self._hit is None else b""
            if not released:
                return b""
            spliced = _splice(event.data, b'"text":', text, released)
            delta["text"] = released
            return encode_event(event, spliced if spliced is not None else dumps(document))
        if kind == "content_block_stop":
            document = _loads(event.data)
            index = document.get("index", 0) if isinstance(document, dict) else 0
            self.open_blocks.discard(index)
            text = self._flush(index)
            if self._hit is not None:
                return b""
            return self._text_event(index, text) + encode_event(event) if text else None
        if kind == "content_block_start":
            document = _loads(event.data)
            index = document.get("index", 0) if isinstance(document, dict) else 0
            self.open_blocks.add(index)
            if isinstance(index, int):
                self.next_block = max(self.next_block, index + 1)
            return None
        if kind == "message_start":
            self.message_started = True
            document = _loads(event.data)
            message = document.get("message") if isinstance(document, dict) else None
            if isinstance(message, dict) and isinstance(message.get("model"), str):
                self.model = message["model"]
            return None
        if kind in _ANTHROPIC_ENDS:
            tail = self._flush_all()
            return tail + encode_event(event) if tail else None
        return None

    # -- whole bodies ---------------------------------------------------------

    def _finish_whole(self, body: bytes, context: Any) -> Replace | Terminate | None:
        """
        Read a non-streamed body: every text through a fresh window, whole.
        """
        document = _loads(body)
        if not isinstance(document, dict):
            return Replace(body) if body else None
        if isinstance(document.get("model"), str):
            self.model = document["model"]
        changed = False
        for holder, key in _texts(self.protocol, document):
            text = holder[key]
            window = self.make_window()
            released = window.feed(text) + window.flush()
            if window.hit is not None:
                self._hit = window.hit
                return self._terminate(context, stream=False)
            if released != text:
                holder[key] = released
                changed = True
        return Replace(dumps(document) if changed else body)


def _splice(data: bytes, key: bytes, old: str, new: str) -> bytes | None:
    """
    C{data} (a JSON document) with the string value C{old} of C{key}
    replaced by C{new}, without re-serialising the rest: when the value is
    written exactly as C{json.dumps} writes it (either escaping mode), once.

    @return: the new data, or L{None} when the value was not found once.
    """
    for ensure_ascii in (False, True):
        needle = key + json.dumps(old, ensure_ascii=ensure_ascii).encode("utf-8")
        at = data.find(needle)
        if at >= 0:
            if data.find(needle, at + 1) >= 0:
                return None
            value = json.dumps(new, ensure_ascii=ensure_ascii).encode("utf-8")
            return data[:at] + key + value + data[at + len(needle) :]
    return None


def _held_only(choice: Any) -> bool:
    """
    Whether an OpenAI choice carries nothing but (now empty) content.
    """
    if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
        return False
    delta = choice.get("delta")
    return isinstance(delta, dict) and set(delta) <= {"content"} and not delta.get("content")


def _texts(protocol: str, document: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """
    Where the texts of a non-streamed response are: C{(object, key)} pairs.
    """
    found = []
    if protocol == OPENAI_CHAT:
        for choice in document.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                found.append((message, "content"))
    else:
        for block in document.get("content") or ():
            if (
                isinstance(block, dict)
                and block.get("type") == "text"
                and isinstance(block.get("text"), str)
            ):
                found.append((block, "text"))
    return found
