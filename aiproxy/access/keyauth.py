# -*- test-case-name: tests.test_access -*-
"""
C{key-auth} on a route: the client's key is looked up, the consumer found,
and every place the key was sent is marked, so that it is never forwarded
upstream.

The key is looked for in the configured header (C{apikey} by default),
then in C{Authorization: Bearer <key>} and C{x-api-key} (where the official
OpenAI and Anthropic SDKs put theirs), then in the configured query
parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiproxy.access.consumers import Consumer, ConsumerTable

__all__ = ["INVALID_KEY", "MISSING_KEY", "KeyAuth", "KeyRefused", "SentKey", "without_parameter"]

MISSING_KEY = "Missing API key in request"
INVALID_KEY = "Invalid API key in request"

#: The C{WWW-Authenticate} challenge of a refusal.
CHALLENGE = b'Key realm="aiproxy"'


class KeyRefused(Exception):
    """
    The client gave no key, or one no consumer has.

    @ivar reason: C{missing_key} or C{invalid_key} (metrics and records).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class SentKey:
    """
    Where a client sent its key: the headers and query parameters that
    hold it, none of which may travel upstream.
    """

    headers: tuple[bytes, ...]
    query: str | None


class KeyAuth:
    """
    The C{key-auth} of one route.
    """

    def __init__(self, conf: Mapping[str, Any], consumers: ConsumerTable) -> None:
        self._header = conf["header"].lower().encode("latin-1")
        self._query = conf["query"]
        self._consumers = consumers

    def _candidates(self, request: Any) -> list[tuple[bytes | None, bytes]]:
        """
        Every key the request carries, in lookup order, with its header
        (L{None} for the query parameter).
        """
        headers = request.requestHeaders
        found: list[tuple[bytes | None, bytes]] = []
        for value in headers.getRawHeaders(self._header) or ():
            found.append((self._header, value.strip()))
        for value in headers.getRawHeaders(b"authorization") or ():
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                found.append((b"authorization", credentials.strip()))
        for value in headers.getRawHeaders(b"x-api-key") or ():
            found.append((b"x-api-key", value.strip()))
        query = request.uri.partition(b"?")[2]
        if query:
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                if name == self._query:
                    found.append((None, value.encode("latin-1")))
        return [(where, key) for where, key in found if key]

    def authenticate(self, request: Any) -> tuple[Consumer, SentKey]:
        """
        The consumer calling, and where its key was sent.

        @raise KeyRefused: no key, or a key no consumer has (the first key
            found is the one that counts).
        """
        candidates = self._candidates(request)
        if not candidates:
            raise KeyRefused(MISSING_KEY, "missing_key")
        key = candidates[0][1]
        consumer = self._consumers.find(key)
        if consumer is None:
            raise KeyRefused(INVALID_KEY, "invalid_key")
        headers = tuple(
            dict.fromkeys(where for where, value in candidates if where and value == key)
        )
        in_query = any(where is None and value == key for where, value in candidates)
        return consumer, SentKey(headers, self._query if in_query else None)


def without_parameter(query: str, name: str) -> str:
    """
    A query string without the parameter C{name}.
    """
    return urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != name])
