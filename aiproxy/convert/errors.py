# -*- test-case-name: tests.test_convert -*-
"""
Error bodies in the client's protocol on a converted route: an upstream
error body of the other protocol converted (OpenAI
C{{"error": {message, type, code}}} and Anthropic
C{{"type": "error", "error": {type, message}}}), a body that does not parse
wrapped with its raw text, and the gateway's own errors in the client's
shape. The status is always kept.
"""

from __future__ import annotations

import json
from typing import Any

from aiproxy.convert.encoding import dumps

__all__ = ["anthropic_error", "openai_error", "to_anthropic_error", "to_openai_error"]

#: How much of an upstream error body that does not parse is kept.
RAW_LIMIT = 1024

#: The Anthropic error type of a status the gateway answers with.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _raw_text(body: bytes) -> str:
    return body[:RAW_LIMIT].decode("utf-8", "replace")


def _document(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def anthropic_error(status: int, message: str, kind: str | None = None) -> bytes:
    """
    An Anthropic error body: C{kind}, or the type of C{status}.
    """
    kind = kind or _ANTHROPIC_TYPES.get(status, "api_error")
    return dumps({"type": "error", "error": {"type": kind, "message": message}})


def openai_error(message: str, kind: str = "aiproxy_error", code: Any = None) -> bytes:
    """
    An OpenAI error body.
    """
    return dumps({"error": {"message": message, "type": kind, "code": code}})


def to_anthropic_error(status: int, body: bytes) -> bytes:
    """
    An upstream error body (OpenAI-shaped, or anything) for an Anthropic
    client.
    """
    document = _document(body)
    if isinstance(document, dict):
        if document.get("type") == "error" and isinstance(document.get("error"), dict):
            return body
        error = document.get("error")
        if isinstance(error, dict):
            kind = error.get("type") or error.get("code") or "api_error"
            message = error.get("message")
            return anthropic_error(
                status,
                message if isinstance(message, str) else _raw_text(body),
                kind if isinstance(kind, str) else str(kind),
            )
        if isinstance(error, str):
            return anthropic_error(status, error, "api_error")
        if isinstance(document.get("message"), str):
            return anthropic_error(status, document["message"], "api_error")
    return anthropic_error(status, _raw_text(body), "api_error")


def to_openai_error(status: int, body: bytes) -> bytes:
    """
    An upstream error body (Anthropic-shaped, or anything) for an OpenAI
    client.
    """
    document = _document(body)
    if isinstance(document, dict):
        error = document.get("error")
        if document.get("type") == "error" and isinstance(error, dict):
            message = error.get("message")
            return openai_error(
                message if isinstance(message, str) else _raw_text(body),
                str(error.get("type") or "api_error"),
            )
        if isinstance(error, dict):
            return body
        if isinstance(document.get("message"), str):
            return openai_error(document["message"], "upstream_error")
    return openai_error(_raw_text(body), "upstream_error")
