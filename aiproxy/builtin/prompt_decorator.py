# -*- test-case-name: tests.test_builtin -*-
"""
C{ai-prompt-decorator}: add configured messages before and after the
conversation of every request, as APISIX's plugin of that name does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from zope.interface import implementer

from aiproxy.builtin._common import META_PROPERTY
from aiproxy.interfaces import IFilterPlugin, IRequestFilter
from aiproxy.stream.protocols import (
    ANTHROPIC_MESSAGES,
    BEDROCK_CONVERSE,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
)

__all__ = ["PromptDecorator", "PromptDecoratorPlugin", "decorate"]

_MESSAGES: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "role": {"enum": ["system", "user", "assistant"]},
            "content": {"type": "string", "minLength": 1},
        },
        "required": ["role", "content"],
        "additionalProperties": False,
    },
}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "ai-prompt-decorator",
    "properties": {
        "_meta": META_PROPERTY,
        "prepend": {**_MESSAGES, "description": "Messages put before the request's messages."},
        "append": {**_MESSAGES, "description": "Messages put after the request's messages."},
    },
    "allOf": [
        {
            "anyOf": [{"required": ["prepend"]}, {"required": ["append"]}],
            "x-message": "at least one of 'prepend' or 'append' is required",
        }
    ],
    "additionalProperties": False,
}

Message = Mapping[str, str]


def _bedrock(body: dict[str, Any], messages: Sequence[Message], front: bool) -> None:
    """
    Bedrock Converse: system messages become C{system} blocks, the others
    messages with one text block.
    """
    system: list[Any] = [{"text": m["content"]} for m in messages if m["role"] == "system"]
    others: list[Any] = [
        {"role": m["role"], "content": [{"text": m["content"]}]}
        for m in messages
        if m["role"] != "system"
    ]
    for key, added in (("system", system), ("messages", others)):
        if added:
            current = body.get(key)
            existing: list[Any] = current if isinstance(current, list) else []
            body[key] = added + existing if front else existing + added


def _responses(body: dict[str, Any], messages: Sequence[Message], front: bool) -> None:
    """
    OpenAI Responses: prepended contents go before C{instructions},
    appended ones after the C{input}; roles are ignored.
    """
    text = "\n".join(m["content"] for m in messages)
    if front:
        instructions = body.get("instructions")
        body["instructions"] = f"{text}\n{instructions}" if isinstance(instructions, str) else text
        return
    given = body.get("input")
    if isinstance(given, str):
        body["input"] = f"{given}\n{text}"
    elif isinstance(given, list):
        given.append({"type": "message", "role": "user", "content": text})
    else:
        body["input"] = text


def decorate(
    protocol: str | None,
    body: dict[str, Any],
    prepend: Sequence[Message],
    append: Sequence[Message],
) -> bool:
    """
    Add C{prepend} and C{append} to a request body, in place.

    @param protocol: the request's client protocol.
    @return: whether the body changed (embeddings and passthrough requests
        are left alone).
    """
    if not prepend and not append:
        return False
    if protocol in (OPENAI_CHAT, ANTHROPIC_MESSAGES):
        current = body.get("messages")
        if not isinstance(current, list):
            current = []
        body["messages"] = (
            [{"role": m["role"], "content": m["content"]} for m in prepend]
            + current
            + [{"role": m["role"], "content": m["content"]} for m in append]
        )
        return True
    if protocol == BEDROCK_CONVERSE:
        _bedrock(body, prepend, front=True)
        _bedrock(body, append, front=False)
        return True
    if protocol == OPENAI_RESPONSES:
        if prepend:
            _responses(body, prepend, front=True)
        if append:
            _responses(body, append, front=False)
        return True
    return False


@implementer(IRequestFilter)
class PromptDecorator:
    """
    A route's configured C{ai-prompt-decorator}.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.prepend: list[Message] = list(config.get("prepend") or ())
        self.append: list[Message] = list(config.get("append") or ())

    def filter_request(self, context: Any) -> None:
        """
        Decorate the request's messages.
        """
        if isinstance(context.body, dict) and decorate(
            context.protocol, context.body, self.prepend, self.append
        ):
            context.mark_body_changed()


@implementer(IFilterPlugin)
class PromptDecoratorPlugin:
    """
    The C{ai-prompt-decorator} plugin (APISIX's priority).
    """

    name = "ai-prompt-decorator"
    priority = 1070
    config_schema = SCHEMA

    def configure(self, config: dict) -> PromptDecorator:
        """
        Keep the route's messages.
        """
        return PromptDecorator(config)
