# -*- test-case-name: tests.test_vertex -*-
"""
The mock upstream's OAuth2 token endpoint (C{POST .../token}): the
JWT-bearer grant of a Google service account, answered as Google's
C{https://oauth2.googleapis.com/token} does.

The assertion's form is checked (a JWT whose claims name the issuer,
audience, scope and times), not its signature: the mock knows no key.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import parse_qs

from aiproxy.testing.upstream.controls import MockControls
from aiproxy.testing.upstream.replies import _error_reply, _json_reply, _Reply

__all__ = ["GRANT_TYPE", "TOKEN_PATH", "access_token"]

#: The end of the token endpoint's path (any prefix).
TOKEN_PATH = b"/token"

#: The grant type a token request must carry (RFC 7523).
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"

_FORM = "application/x-www-form-urlencoded"

#: The claims an assertion must have.
_CLAIMS = ("iss", "aud", "scope", "iat", "exp")


def access_token(number: int) -> str:
    """
    @param number: The token request's number (counted from 1).
    @return: The access token it is given: C{mock-token-<number>}.
    """
    return f"mock-token-{number}"


def _oauth_error(status: int, headers: dict[str, str], error: str, description: str) -> _Reply:
    """
    @return: An OAuth2 error answer (RFC 6749 section 5.2).
    """
    return _error_reply(status, headers, {"error": error, "error_description": description})


def _segment(text: str) -> Any:
    """
    @param text: A base64url JWT segment, unpadded.
    @return: Its JSON value.
    @raise ValueError: It is not one.
    """
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("bad base64") from None
    return json.loads(raw)


def _assertion_problem(assertion: str) -> str | None:
    """
    @param assertion: The C{assertion} of a token request.
    @return: What is wrong with its form, or C{None}.
    """
    parts = assertion.split(".")
    if len(parts) != 3 or not all(parts):
        return "Invalid JWT: not three segments"
    try:
        header, claims = _segment(parts[0]), _segment(parts[1])
    except ValueError:
        return "Invalid JWT: a segment is not base64url JSON"
    if not isinstance(header, dict) or header.get("alg") != "RS256":
        return "Invalid JWT: alg is not RS256"
    if not isinstance(claims, dict) or any(name not in claims for name in _CLAIMS):
        return "Invalid JWT: missing claims"
    return None


def token_reply(
    number: int,
    body: bytes,
    content_type: bytes | None,
    controls: MockControls,
    headers: dict[str, str],
) -> _Reply:
    """
    Answer one token request.

    @param number: The token request's number (counted from 1).
    @param body: Its body.
    @param content_type: Its C{Content-Type}.
    @param controls: Its controls: C{status} answers that status with an
        OAuth2 error, C{expires_in} is the token's lifetime.
    @param headers: Headers to send besides the content type and length.
    @return: C{{"access_token", "expires_in", "token_type": "Bearer"}}, or
        an OAuth2 error (400 for a request that is not a JWT-bearer grant).
    """
    if controls.status is not None:
        return _oauth_error(controls.status, headers, "mock_error", "mock error")
    if (content_type or b"").split(b";")[0].strip().decode("latin-1").lower() != _FORM:
        return _oauth_error(400, headers, "invalid_request", f"Content-Type must be {_FORM}")
    form = parse_qs(body.decode("utf-8", "replace"))
    if form.get("grant_type") != [GRANT_TYPE]:
        return _oauth_error(400, headers, "unsupported_grant_type", "Invalid grant_type")
    assertions = form.get("assertion") or [""]
    problem = _assertion_problem(assertions[0])
    if problem is not None:
        return _oauth_error(400, headers, "invalid_grant", problem)
    answer = {
        "access_token": access_token(number),
        "expires_in": controls.expires_in,
        "token_type": "Bearer",
    }
    return _json_reply(200, headers, answer)
