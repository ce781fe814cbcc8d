# -*- test-case-name: tests.test_bedrock -*-
"""
Amazon Bedrock (Converse API): the request rules of provider C{bedrock}.

The host is the region's C{bedrock-runtime} endpoint; the model travels in
the path (C{/model/{model}/converse}, or C{/converse-stream} when the
client asked to stream), not in the body, which loses C{model} and
C{stream}; C{override.llm_options.max_tokens} goes to
C{inferenceConfig.maxTokens}; every request is signed with AWS Signature
Version 4 (L{aiproxy.upstream.sigv4}) for service C{bedrock} in the route's
region, last, over the final bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from twisted.internet.interfaces import IReactorTime

from aiproxy.stream.protocols import BEDROCK_CONVERSE
from aiproxy.upstream.request import ClientError, model_of
from aiproxy.upstream.sigv4 import AWSCredentials, SigV4Auth

__all__ = ["MAX_TOKENS_FIELD", "RULES", "SERVICE", "BedrockRules", "converse_path"]

#: The signing name of the Bedrock runtime API.
SERVICE = "bedrock"

#: Where C{override.llm_options.max_tokens} goes in a Converse body.
MAX_TOKENS_FIELD = "inferenceConfig.maxTokens"

#: What an AWS region name looks like (C{us-east-1}, C{eu-central-2}).
_REGION = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")

_NO_MODEL = (
    "could not resolve upstream path: ensure the route or request body specifies a model, "
    "or that override.endpoint includes a path"
)


def converse_path(model: str, stream: bool) -> str:
    """
    The Converse path of C{model}: percent-encoded whole (an ARN's C{:} and
    C{/} included), C{/converse-stream} for a stream.
    """
    action = "converse-stream" if stream else "converse"
    return f"/model/{quote(model, safe='')}/{action}"


class BedrockRules:
    """
    The rules of provider C{bedrock} (see
    L{aiproxy.upstream.providers.ProviderRules}).
    """

    note = "`model` and `stream` are removed from the body; requests are signed with AWS SigV4"

    def problems(self, conf: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
        """
        C{provider_conf.region} (a region name) and C{auth.aws} are required.
        """
        problems: list[tuple[tuple[str, ...], str]] = []
        region = (conf.get("provider_conf") or {}).get("region")
        if not region:
            problems.append((("provider_conf", "region"), "required for provider 'bedrock'"))
        elif not _REGION.match(region):
            problems.append((("provider_conf", "region"), f"{region!r} is not an AWS region name"))
        if not (conf.get("auth") or {}).get("aws"):
            problems.append((("auth", "aws"), "required for provider 'bedrock'"))
        return problems

    def base_url(self, conf: Mapping[str, Any]) -> str:
        """
        C{https://bedrock-runtime.<region>.amazonaws.com}.
        """
        region = (conf.get("provider_conf") or {}).get("region")
        return f"https://bedrock-runtime.{region}.amazonaws.com"

    def path(self, conf: Mapping[str, Any], protocol: str, body: Mapping[str, Any]) -> str:
        """
        The Converse path of the request's model (L{converse_path}).

        @raise ClientError: 400 when neither the route nor the body names a
            model.
        """
        model = model_of(conf, body)
        if model is None:
            raise ClientError(400, _NO_MODEL, {"error_msg": _NO_MODEL})
        return converse_path(model, body.get("stream") is True)

    def shape_body(self, body: dict[str, Any], protocol: str, conf: Mapping[str, Any]) -> bool:
        """
        Remove C{stream} from a Converse body (the path says it; C{model}
        is removed with the provider's C{remove_model}).

        @return: whether the body changed.
        """
        if protocol == BEDROCK_CONVERSE and "stream" in body:
            del body["stream"]
            return True
        return False

    def auth(self, conf: Mapping[str, Any], clock: IReactorTime) -> SigV4Auth:
        """
        The SigV4 signer of C{auth.aws} for service C{bedrock} in the
        route's region.
        """
        aws = conf["auth"]["aws"]
        credentials = AWSCredentials(
            aws["access_key_id"], aws["secret_access_key"], aws.get("session_token")
        )
        return SigV4Auth(credentials, conf["provider_conf"]["region"], SERVICE, clock)


#: The rules of provider C{bedrock}.
RULES = BedrockRules()
