# -*- test-case-name: tests.test_vertex -*-
"""
An OpenAI embeddings client served by Vertex AI's C{:predict} method
(docs/providers/vertex-ai.md), as APISIX converts it: the client's
C{input} becomes C{instances}, the C{predictions} come back as an OpenAI
embeddings list.

The model travels in the URL, not in the body: the provider's path of
L{VERTEX_PREDICT} requests holds it (L{aiproxy.upstream.vertex}).
"""

from __future__ import annotations

import json
from typing import Any

from zope.interface import implementer

from aiproxy.convert import errors
from aiproxy.convert.encoding import dumps
from aiproxy.interfaces import IConverter, IStreamConverter
from aiproxy.stream.protocols import OPENAI_EMBEDDINGS
from aiproxy.upstream.request import ClientError

__all__ = [
    "EMBEDDINGS_TO_VERTEX_PREDICT",
    "VERTEX_PREDICT",
    "EmbeddingsToVertexPredict",
    "convert_input",
]

#: The protocol of Vertex AI's C{:predict} method (text embedding models).
VERTEX_PREDICT = "vertex-predict"


def _refuse(message: str) -> ClientError:
    """
    A 400 for a client body the conversion cannot take.
    """
    return ClientError(400, message, {"error_msg": message})


def convert_input(value: Any) -> list[dict[str, str]]:
    """
    The C{instances} of an embeddings C{input}: a string, an array of
    strings, or an array whose arrays are joined with spaces (APISIX's rule
    for token arrays; their items are written as text).

    @raise ClientError: 400 for any other value.
    """
    if isinstance(value, str):
        return [{"content": value}]
    if not isinstance(value, list):
        if value is None:
            raise _refuse("`input` is required for embeddings")
        raise _refuse("`input` must be string or array")
    instances = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            instances.append({"content": item})
        elif isinstance(item, list) and all(_joinable(part) for part in item):
            instances.append({"content": " ".join(_text(part) for part in item)})
        else:
            raise _refuse(f"unsupported input type at index {index}")
    return instances


def _joinable(part: Any) -> bool:
    """
    Whether C{part} of an array input can be joined as text (a string or a
    number, not a boolean, object or array).
    """
    return isinstance(part, (str, int, float)) and not isinstance(part, bool)


def _text(part: str | int | float) -> str:
    return part if isinstance(part, str) else json.dumps(part)


def _token_count(prediction: dict[str, Any]) -> int:
    """
    The C{statistics.token_count} of one prediction's embeddings, or 0.
    """
    statistics = prediction["embeddings"].get("statistics")
    count = statistics.get("token_count") if isinstance(statistics, dict) else None
    if isinstance(count, (int, float)) and not isinstance(count, bool):
        return int(count)
    return 0


@implementer(IStreamConverter)
class _NoStream:
    """
    The predict method never streams: an upstream that answers with a
    stream all the same produces nothing, and the conversion stage answers
    502 (L{aiproxy.convert.stage.NO_OUTPUT}).
    """

    def convert_events(self, events: Any, context: Any) -> bytes:
        return b""

    def finish(self, context: Any) -> bytes:
        return b""


@implementer(IConverter)
class EmbeddingsToVertexPredict:
    """
    Converts OpenAI embeddings requests for Vertex AI's C{:predict} method,
    and its answers back. Stateless, shared by every route.
    """

    client_protocol = OPENAI_EMBEDDINGS
    upstream_protocol = VERTEX_PREDICT

    def convert_request(self, body: Any, context: Any) -> dict[str, Any]:
        """
        C{{"instances": [{"content": ...}, ...]}} for the client's C{input}
        (L{convert_input}); every other field is dropped (the model goes in
        the URL).

        @raise ClientError: 400 for an C{input} that is not text.
        """
        if not isinstance(body, dict):
            raise _refuse("`input` is required for embeddings")
        return {"instances": convert_input(body.get("input"))}

    def convert_headers(self, headers: Any, own_credentials: bool) -> None:
        """
        Nothing to change: the route's credentials (C{auth.gcp} or
        C{auth.header}) are already there.
        """

    def convert_answer(self, status: int, body: bytes, context: Any) -> bytes:
        """
        An OpenAI embeddings list for the C{predictions} of a success:
        C{predictions[i].embeddings.values} as the embedding of index C{i},
        the request's model (or C{"unknown"}), and usage whose prompt and
        total tokens are the sum of C{statistics.token_count}; an error
        status's body as an OpenAI error (L{errors.to_openai_error}).

        @raise ValueError: a success whose body holds no predictions (the
            client gets a 500).
        """
        if status >= 400:
            return errors.to_openai_error(status, body)
        document = json.loads(body)
        predictions = document.get("predictions") if isinstance(document, dict) else None
        if not isinstance(predictions, list):
            raise ValueError("vertex response missing predictions")
        data = []
        tokens = 0
        for index, prediction in enumerate(predictions):
            embeddings = prediction.get("embeddings") if isinstance(prediction, dict) else None
            values = embeddings.get("values") if isinstance(embeddings, dict) else None
            if not isinstance(values, list):
                raise ValueError(f"invalid embedding at index {index}")
            tokens += _token_count(prediction)
            data.append({"object": "embedding", "index": index, "embedding": values})
        model = context.llm_model or context.request_llm_model or "unknown"
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        context.set_usage(usage)
        answer = {"object": "list", "data": data, "model": model, "usage": usage}
        return dumps(answer)

    def convert_error(self, status: int, message: str) -> bytes:
        return errors.openai_error(message)

    def stream(self, context: Any) -> IStreamConverter:
        """
        Never used: the predict method answers whole. Should an upstream
        stream anyway, the stream converts to nothing, which is a 502.
        """
        return _NoStream()


#: The converter of OpenAI embeddings to Vertex AI predict, shared.
EMBEDDINGS_TO_VERTEX_PREDICT = EmbeddingsToVertexPredict()
