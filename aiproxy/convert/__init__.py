# -*- test-case-name: tests.test_convert -*-
"""
Protocol conversion: a client speaking one protocol served by an upstream
speaking another (docs/conversion.md).

L{converter_for} picks the converter of a request: none when the provider
speaks the client's protocol (or for passthrough); otherwise one from the
client's protocol to a protocol the provider speaks; none fits is a 400.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiproxy.convert.anthropic_openai import ANTHROPIC_TO_OPENAI
from aiproxy.convert.openai_anthropic import OpenAIToAnthropic
from aiproxy.convert.vertex_predict import EMBEDDINGS_TO_VERTEX_PREDICT, VERTEX_PREDICT
from aiproxy.interfaces import IConverter
from aiproxy.stream.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_EMBEDDINGS,
    PASSTHROUGH,
)
from aiproxy.upstream.request import ClientError, Target

__all__ = ["converter_for", "speaks_messages"]


def speaks_messages(target: Target) -> bool:
    """
    Whether C{target} is an C{anthropic} provider whose endpoint path ends
    in C{/v1/messages}: it speaks Anthropic Messages only, so an OpenAI chat
    client is converted (without such a path, OpenAI clients go to
    Anthropic's OpenAI-compatible path, as in APISIX).
    """
    if target.provider.name != "anthropic":
        return False
    endpoint = (target.conf.get("override") or {}).get("endpoint")
    return bool(endpoint) and urlsplit(str(endpoint)).path.rstrip("/").endswith("/v1/messages")


def converter_for(target: Target, protocol: str) -> IConverter | None:
    """
    The converter of C{protocol} requests sent to C{target}, or L{None}
    when they go as they are.

    @raise ClientError: 400 when no converter fits.
    """
    provider = target.provider
    if protocol == PASSTHROUGH:
        return None
    if speaks_messages(target):
        if protocol == ANTHROPIC_MESSAGES:
            return None
        if protocol == OPENAI_CHAT:
            limit = ((target.conf.get("override") or {}).get("llm_options") or {}).get("max_tokens")
            return OpenAIToAnthropic(limit) if limit else OpenAIToAnthropic()
    elif provider.serves(protocol):
        return None
    elif protocol == ANTHROPIC_MESSAGES and provider.serves(OPENAI_CHAT):
        return ANTHROPIC_TO_OPENAI
    elif protocol == OPENAI_EMBEDDINGS and provider.serves(VERTEX_PREDICT):
        return EMBEDDINGS_TO_VERTEX_PREDICT
    supported = ", ".join(sorted(provider.paths))
    raise ClientError(
        400,
        f"provider {provider.name} does not support {protocol} protocol (supported: {supported})",
    )
