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

__all__ = ["INVALID_KEY", "MISSING_KEY", "KeyAuth", "KeyRefused", "SentKey", "without_parameters"]

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
    hold it (wherever it looked), none of which may travel upstream.
    """

    headers: tuple[bytes, ...]
    query: tuple[str, ...]


class KeyAuth:
    """
    The C{key-auth} of one route.
    """

    def __init__(self, conf: Mapping[str, Any], consumers: ConsumerTable) -> None:
        self._header = conf["header"].lower().encode("latin-1")
        self._query = conf["query"]
        self._consumers = consumers

    def _first_key(self, headers: Any, query: bytes) -> bytes | None:
        """
        The first key a request carries, in lookup order.

        @param headers: its L{twisted.web.http_headers.Headers}.
        @param query: its query string.
        """
        for value in headers.getRawHeaders(self._header) or ():
            if value.strip():
                return bytes(value.strip())
        for value in headers.getRawHeaders(b"authorization") or ():
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                return bytes(credentials.strip())
        for value in headers.getRawHeaders(b"x-api-key") or ():
            if value.strip():
                return bytes(value.strip())
        for name, value in _parameters(query):
            if name == self._query and value:
                return value.encode("latin-1")
        return None

    def authenticate(self, request: Any) -> tuple[Consumer, SentKey]:
        """
        The consumer calling, and everywhere its key was sent.

        @raise KeyRefused: no key, or a key no consumer has (the first key
            found is the one that counts).
        """
        return self.authenticate_head(request.requestHeaders, request.uri)

    def authenticate_head(self, headers: Any, target: bytes) -> tuple[Consumer, SentKey]:
        """
        L{authenticate} from a request's head alone: its headers and its
        request target (path and query), before its body is read.
        """
        query = target.partition(b"?")[2]
        key = self._first_key(headers, query)
        if key is None:
            raise KeyRefused(MISSING_KEY, "missing_key")
        consumer = self._consumers.find(key)
        if consumer is None:
            raise KeyRefused(INVALID_KEY, "invalid_key")
        return consumer, _places(headers, query, key)


def _parameters(query: bytes) -> list[tuple[str, str]]:
    """
    The decoded parameters of a query string.
    """
    return parse_qsl(query.decode("latin-1"), keep_blank_values=True) if query else []


def _places(headers: Any, query: bytes, key: bytes) -> SentKey:
    """
    Every header and query parameter that holds C{key} (alone, or after a
    scheme as in C{Bearer <key>}; a parameter once decoded).
    """
    tail = b" " + key
    names = tuple(
        name.lower()
        for name, values in headers.getAllRawHeaders()
        if any(value.strip() == key or value.rstrip().endswith(tail) for value in values)
    )
    text = key.decode("latin-1")
    parameters = tuple(
        dict.fromkeys(name for name, value in _parameters(query) if value.strip() == text)
    )
    return SentKey(names, parameters)


def without_parameters(query: str, names: tuple[str, ...]) -> str:
    """
    A query string without the parameters C{names}.
    """
    return urlencode(
        [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in names]
    )
