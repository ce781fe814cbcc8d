# -*- test-case-name: tests.test_request -*-
"""
LLM providers: default endpoints per protocol, the name of their
C{max_tokens} field, and which client protocols they serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from aiproxy.stream.protocols import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    PASSTHROUGH,
)

__all__ = ["PROVIDERS", "Provider", "UnsupportedProvider", "get_provider"]

_OPENAI_PATHS = {
    OPENAI_CHAT: "/v1/chat/completions",
    OPENAI_RESPONSES: "/v1/responses",
    OPENAI_EMBEDDINGS: "/v1/embeddings",
}


class UnsupportedProvider(Exception):
    """
    The schema knows the provider, but this version does not serve it.
    """


@dataclass(frozen=True)
class Provider:
    """
    One provider.

    @ivar name: the C{provider} value.
    @ivar base_url: C{scheme://host[:port]} used without C{override.endpoint},
        or L{None} when the endpoint is required.
    @ivar paths: the default path per target protocol; a client protocol not
        in it (other than passthrough) is refused with 400.
    @ivar max_tokens_field: the body field C{override.llm_options.max_tokens}
        sets, per protocol.
    @ivar remove_model: the model travels in the URL, not in the body.
    """

    name: str
    base_url: str | None
    paths: Mapping[str, str]
    max_tokens_field: Mapping[str, str] = field(default_factory=dict)
    remove_model: bool = False

    def serves(self, protocol: str) -> bool:
        """
        Whether requests of C{protocol} can go to this provider as they are.
        """
        return protocol == PASSTHROUGH or protocol in self.paths


def _openai_shaped(
    name: str, base_url: str | None, paths: Mapping[str, str], max_tokens: str
) -> Provider:
    """
    A provider speaking the OpenAI chat (and maybe Responses/embeddings) API.
    """
    fields = {OPENAI_CHAT: max_tokens, OPENAI_RESPONSES: "max_output_tokens"}
    return Provider(name, base_url, paths, fields)


PROVIDERS: dict[str, Provider] = {
    "openai": _openai_shaped(
        "openai", "https://api.openai.com", _OPENAI_PATHS, "max_completion_tokens"
    ),
    "openai-compatible": _openai_shaped("openai-compatible", None, _OPENAI_PATHS, "max_tokens"),
    "deepseek": _openai_shaped(
        "deepseek", "https://api.deepseek.com", {OPENAI_CHAT: "/chat/completions"}, "max_tokens"
    ),
    "aimlapi": _openai_shaped(
        "aimlapi", "https://api.aimlapi.com", {OPENAI_CHAT: "/chat/completions"}, "max_tokens"
    ),
    "openrouter": _openai_shaped(
        "openrouter",
        "https://openrouter.ai",
        {OPENAI_CHAT: "/api/v1/chat/completions"},
        "max_tokens",
    ),
    "gemini": _openai_shaped(
        "gemini",
        "https://generativelanguage.googleapis.com",
        {OPENAI_CHAT: "/v1beta/openai/chat/completions"},
        "max_completion_tokens",
    ),
    "azure-openai": Provider(
        "azure-openai",
        None,
        {OPENAI_CHAT: "/completions"},
        {OPENAI_CHAT: "max_tokens", OPENAI_RESPONSES: "max_output_tokens"},
        remove_model=True,
    ),
    "anthropic": Provider(
        "anthropic",
        "https://api.anthropic.com",
        {OPENAI_CHAT: "/v1/chat/completions", ANTHROPIC_MESSAGES: "/v1/messages"},
        {OPENAI_CHAT: "max_tokens", ANTHROPIC_MESSAGES: "max_tokens"},
    ),
}


def get_provider(name: str) -> Provider:
    """
    The provider called C{name}.

    @raise UnsupportedProvider: if this version does not serve it.
    """
    try:
        return PROVIDERS[name]
    except KeyError:
        raise UnsupportedProvider(f"provider '{name}' is not supported by this version") from None
