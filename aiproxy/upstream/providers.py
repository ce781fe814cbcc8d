# -*- test-case-name: tests.test_request -*-
"""
LLM providers: default endpoints per protocol, the name of their
C{max_tokens} field, and which client protocols they serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from aiproxy.convert.vertex_predict import VERTEX_PREDICT
from aiproxy.interfaces import IUpstreamAuth
from aiproxy.stream.protocols import (
    ANTHROPIC_MESSAGES,
    BEDROCK_CONVERSE,
    OPENAI_CHAT,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    PASSTHROUGH,
)
from aiproxy.upstream import bedrock, vertex

__all__ = ["PROVIDERS", "Provider", "ProviderRules", "UnsupportedProvider", "get_provider"]

_OPENAI_PATHS = {
    OPENAI_CHAT: "/v1/chat/completions",
    OPENAI_RESPONSES: "/v1/responses",
    OPENAI_EMBEDDINGS: "/v1/embeddings",
}


class UnsupportedProvider(Exception):
    """
    The schema knows the provider, but this version does not serve it.
    """


class ProviderRules(Protocol):
    """
    What a provider needs beyond a fixed host and path table (bedrock:
    L{aiproxy.upstream.bedrock.RULES}): each method gets the target's config
    (an C{ai-proxy} config or a multi instance's).

    @ivar note: said of the provider in the provider table of the docs.
    """

    note: str

    def problems(self, conf: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
        """
        The config's problems for this provider: (path under the target,
        reason) each.
        """

    def base_url(self, conf: Mapping[str, Any]) -> str:
        """
        The default C{scheme://host[:port]}, without C{override.endpoint}.
        """

    def path(self, conf: Mapping[str, Any], protocol: str, body: Mapping[str, Any]) -> str:
        """
        The default path of a request of C{protocol} with C{body} (as the
        client and request filters left it).

        @raise aiproxy.upstream.request.ClientError: when there is none.
        """

    def shape_body(self, body: dict[str, Any], protocol: str, conf: Mapping[str, Any]) -> bool:
        """
        The provider's own body changes, after the generic ones.

        @return: whether C{body} changed.
        """

    def auth(self, conf: Mapping[str, Any], clock: IReactorTime) -> IUpstreamAuth | None:
        """
        What authorizes each request of the target, if anything.
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
    @ivar rules: the provider's own rules (host, path, body, config checks,
        request signing), or L{None}.
    """

    name: str
    base_url: str | None
    paths: Mapping[str, str]
    max_tokens_field: Mapping[str, str] = field(default_factory=dict)
    remove_model: bool = False
    rules: ProviderRules | None = None

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
    "bedrock": Provider(
        "bedrock",
        None,
        {BEDROCK_CONVERSE: "/model/{model}/converse"},
        {BEDROCK_CONVERSE: bedrock.MAX_TOKENS_FIELD},
        remove_model=True,
        rules=bedrock.RULES,
    ),
    "vertex-ai": Provider(
        "vertex-ai",
        None,
        {OPENAI_CHAT: vertex.CHAT_PATH, VERTEX_PREDICT: vertex.PREDICT_PATH},
        {OPENAI_CHAT: vertex.MAX_TOKENS_FIELD},
        rules=vertex.RULES,
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
