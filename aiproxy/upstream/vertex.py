# -*- test-case-name: tests.test_vertex -*-
"""
Google Cloud Vertex AI: the request rules of provider C{vertex-ai}.

The host is the region's C{aiplatform} endpoint
(C{https://<region>-aiplatform.googleapis.com}, or
C{https://aiplatform.googleapis.com} for region C{global}); OpenAI chat goes
to the project's OpenAI-compatible endpoint, and OpenAI embeddings,
converted to the predict protocol (L{aiproxy.convert.vertex_predict}), to
the C{:predict} method of the model, which travels in the path.
C{override.llm_options.max_tokens} goes to C{max_completion_tokens}. The
access token of C{auth.gcp} is L{aiproxy.upstream.gcp}'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from twisted.internet.interfaces import IReactorTime

from aiproxy.convert.vertex_predict import VERTEX_PREDICT
from aiproxy.interfaces import IUpstreamAuth
from aiproxy.stream.protocols import OPENAI_CHAT
from aiproxy.upstream.request import ClientError, model_of

__all__ = [
    "CHAT_PATH",
    "MAX_TOKENS_FIELD",
    "PREDICT_PATH",
    "RULES",
    "VertexRules",
    "predict_path",
]

#: The OpenAI-compatible chat completions path of a project and region.
CHAT_PATH = "/v1beta1/projects/{project_id}/locations/{region}/endpoints/openapi/chat/completions"

#: The C{:predict} path of a Google model in a project and region.
PREDICT_PATH = (
    "/v1/projects/{project_id}/locations/{region}/publishers/google/models/{model}:predict"
)

#: Where C{override.llm_options.max_tokens} goes in an OpenAI chat body.
MAX_TOKENS_FIELD = "max_completion_tokens"

#: A Google Cloud location (C{us-central1}, C{europe-west4}, C{global}).
_REGION = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")

#: A project id (C{my-project-123}, or a domain-scoped C{example.com:proj}).
_PROJECT = re.compile(r"^[a-z0-9][a-z0-9.:-]*$")

_NO_MODEL = (
    "could not resolve upstream path: ensure the route or request body specifies a model, "
    "or that override.endpoint includes a path"
)

_NAME = "vertex-ai"


def predict_path(project_id: str, region: str, model: str) -> str:
    """
    The C{:predict} path of C{model}, percent-encoded whole (a C{/} or
    C{:} in it cannot change the path).
    """
    return PREDICT_PATH.format(project_id=project_id, region=region, model=quote(model, safe="@"))


class VertexRules:
    """
    The rules of provider C{vertex-ai} (see
    L{aiproxy.upstream.providers.ProviderRules}).
    """

    note = (
        "host `https://aiplatform.googleapis.com` for region `global`; paths from "
        "`provider_conf.project_id` and `region`; OpenAI embeddings are converted to "
        "vertex-predict; `auth.gcp` gets an access token"
    )

    def problems(self, conf: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
        """
        C{provider_conf.project_id} and C{region} are required, unless
        C{override.endpoint} gives the host and path; a region must be a
        location name (it makes the host name).
        """
        problems: list[tuple[tuple[str, ...], str]] = []
        provider_conf = conf.get("provider_conf") or {}
        project, region = provider_conf.get("project_id"), provider_conf.get("region")
        if region and not _REGION.match(region):
            problems.append(
                (("provider_conf", "region"), f"{region!r} is not a Google Cloud location name")
            )
        if project and not _PROJECT.match(project):
            problems.append(
                (("provider_conf", "project_id"), f"{project!r} is not a Google Cloud project id")
            )
        endpoint = (conf.get("override") or {}).get("endpoint")
        if not endpoint:
            why = f"required for provider '{_NAME}' without override.endpoint"
            problems.extend(
                (("provider_conf", name), why)
                for name, value in (("project_id", project), ("region", region))
                if not value
            )
        elif not urlsplit(endpoint).path and not (project and region):
            problems.append(
                (
                    ("override", "endpoint"),
                    "needs a path unless provider_conf.project_id and region are set",
                )
            )
        return problems

    def base_url(self, conf: Mapping[str, Any]) -> str:
        """
        C{https://<region>-aiplatform.googleapis.com}, or
        C{https://aiplatform.googleapis.com} for region C{global}.
        """
        region = (conf.get("provider_conf") or {}).get("region")
        if region == "global":
            return "https://aiplatform.googleapis.com"
        return f"https://{region}-aiplatform.googleapis.com"

    def path(self, conf: Mapping[str, Any], protocol: str, body: Mapping[str, Any]) -> str:
        """
        The chat path of the project and region, or for C{vertex-predict}
        the C{:predict} path of the request's model (C{options.model}, else
        the client body's C{model}).

        @raise ClientError: 400 for a predict request without a model.
        """
        provider_conf = conf["provider_conf"]
        project, region = provider_conf["project_id"], provider_conf["region"]
        if protocol == VERTEX_PREDICT:
            model = model_of(conf, body)
            if model is None:
                raise ClientError(400, _NO_MODEL, {"error_msg": _NO_MODEL})
            return predict_path(project, region, model)
        if protocol == OPENAI_CHAT:
            return CHAT_PATH.format(project_id=project, region=region)
        message = f"provider {_NAME} does not support {protocol} protocol"
        raise ClientError(400, message)

    def shape_body(self, body: dict[str, Any], protocol: str, conf: Mapping[str, Any]) -> bool:
        """
        Remove C{model} from a predict body (C{options.model} put it there;
        the model is in the path, and Vertex refuses unknown fields).

        @return: whether the body changed.
        """
        if protocol == VERTEX_PREDICT and "model" in body:
            del body["model"]
            return True
        return False

    def auth(self, conf: Mapping[str, Any], clock: IReactorTime) -> IUpstreamAuth | None:
        """
        None of its own: C{auth.header}, or the access token of C{auth.gcp}
        (L{aiproxy.upstream.gcp.gcp_auth}, which needs the instance's
        upstream client and is built with it).
        """
        return None


#: The rules of provider C{vertex-ai}.
RULES = VertexRules()
