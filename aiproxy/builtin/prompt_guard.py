# -*- test-case-name: tests.test_builtin -*-
"""
C{ai-prompt-guard}: refuse requests whose prompt matches deny patterns, or
matches none of the allow patterns, before anything is sent upstream.

As APISIX's plugin of that name: the patterns are searched in the text of
the last message (C{match_all_conversation_history} for every message),
from the user only (C{match_all_roles} for every role), the texts joined
with spaces; allow patterns are checked first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from aiproxy.builtin._common import (
    META_PROPERTY,
    PluginConfigError,
    compile_patterns,
    pattern_list,
)
from aiproxy.filters import Reject
from aiproxy.interfaces import IFilterPlugin, IRequestFilter
from aiproxy.stream.protocols import (
    ANTHROPIC_MESSAGES,
    BEDROCK_CONVERSE,
    OPENAI_CHAT,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
)

__all__ = [
    "NOT_ALLOWED",
    "PROHIBITED",
    "UNRECOGNIZED",
    "PromptGuard",
    "PromptGuardPlugin",
    "messages_of",
]

log = Logger()

NOT_ALLOWED = "Request doesn't match allow patterns"
PROHIBITED = "Request contains prohibited content"
UNRECOGNIZED = "Request format not recognized by ai-prompt-guard"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "ai-prompt-guard",
    "properties": {
        "_meta": META_PROPERTY,
        "match_all_roles": {
            "type": "boolean",
            "default": False,
            "description": "Check messages of every role, not only the user's.",
        },
        "match_all_conversation_history": {
            "type": "boolean",
            "default": False,
            "description": "Check every message of the conversation, not only the last one.",
        },
        "allow_patterns": pattern_list(
            "Regular expressions; when set, the prompt must match at least one (400 otherwise)."
        ),
        "deny_patterns": pattern_list(
            "Regular expressions; a prompt matching any of them gets 400."
        ),
        "fail_mode": {
            "enum": ["skip", "warn", "error"],
            "default": "skip",
            "description": (
                "A request in no chat format (passthrough): skip it, skip it with a warning, "
                "or refuse it with 400."
            ),
        },
    },
    "additionalProperties": False,
}


def _text(content: Any) -> str | None:
    """
    The text of a message's content: a string, or the C{text} of its parts
    joined with spaces; L{None} when it has none.
    """
    if isinstance(content, str):
        return content or None
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str) and part["text"]
        ]
        return " ".join(texts) if texts else None
    return None


def _listed(messages: Any, default_role: str | None = None) -> list[tuple[str, str]]:
    """
    C{(role, text)} of each message of a list that has text.
    """
    out = []
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, str):
            if message and default_role is not None:
                out.append((default_role, message))
            continue
        if not isinstance(message, dict):
            continue
        role = message.get("role", default_role)
        text = _text(message.get("content"))
        if isinstance(role, str) and text is not None:
            out.append((role, text))
    return out


def messages_of(protocol: str | None, body: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    """
    The messages of a request as C{(role, text)}, in order.

    @param protocol: the request's client protocol.
    @return: the messages, or L{None} for a request in no chat format.
    """
    if protocol == OPENAI_CHAT:
        return _listed(body.get("messages"))
    if protocol in (ANTHROPIC_MESSAGES, BEDROCK_CONVERSE):
        system = _text(body.get("system"))
        head = [("system", system)] if system is not None else []
        return head + _listed(body.get("messages"))
    if protocol == OPENAI_RESPONSES:
        instructions = body.get("instructions")
        head = [("system", instructions)] if isinstance(instructions, str) and instructions else []
        given = body.get("input")
        if isinstance(given, str):
            return head + ([("user", given)] if given else [])
        return head + _listed(given, default_role="user")
    if protocol == OPENAI_EMBEDDINGS:
        given = body.get("input")
        return [("user", given)] if isinstance(given, str) and given else []
    return None


@implementer(IRequestFilter)
class PromptGuard:
    """
    A route's configured C{ai-prompt-guard}.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        """
        @param config: the validated config.
        @raise PluginConfigError: for a pattern that does not compile.
        """
        self.match_all_roles = config["match_all_roles"]
        self.match_all_history = config["match_all_conversation_history"]
        self.fail_mode = config["fail_mode"]
        problems: list[tuple[list[str | int], str]] = []
        compiled: dict[str, list[Any]] = {}
        for key in ("allow_patterns", "deny_patterns"):
            try:
                compiled[key] = compile_patterns(config[key], [key], allow_empty=True)
            except PluginConfigError as e:
                problems.extend(e.problems)
        if problems:
            raise PluginConfigError(problems)
        self.allow = compiled["allow_patterns"]
        self.deny = compiled["deny_patterns"]

    def filter_request(self, context: Any) -> Reject | None:
        """
        Refuse the request with 400 when its prompt is not allowed.
        """
        body = context.body if isinstance(context.body, dict) else {}
        messages = messages_of(context.protocol, body)
        if messages is None:
            if self.fail_mode == "error":
                return Reject(400, {"message": UNRECOGNIZED})
            if self.fail_mode == "warn":
                log.warn("ai-prompt-guard skipped: request format not recognized")
            return None
        if context.protocol != OPENAI_RESPONSES and not self.match_all_history:
            messages = messages[-1:]
        if not self.match_all_roles:
            messages = [m for m in messages if m[0] == "user"]
        if not messages:
            return None
        content = " ".join(text for _, text in messages)
        if self.allow and not any(p.search(content) for p in self.allow):
            return Reject(400, {"message": NOT_ALLOWED})
        if any(p.search(content) for p in self.deny):
            return Reject(400, {"message": PROHIBITED})
        return None


@implementer(IFilterPlugin)
class PromptGuardPlugin:
    """
    The C{ai-prompt-guard} plugin (APISIX's priority).
    """

    name = "ai-prompt-guard"
    priority = 1072
    config_schema = SCHEMA

    def configure(self, config: dict) -> PromptGuard:
        """
        Compile the route's patterns.
        """
        return PromptGuard(config)
