# -*- test-case-name: tests.test_bedrock -*-
"""
AWS Signature Version 4 (header signing), and the upstream authorizer that
signs every request of a C{bedrock} instance.

The signature covers the request as it is sent: method, the final URL
(path and query), the headers and the SHA-256 of the body bytes, so the
authorizer runs last, after every change to the body. Checked against
AWS's published SigV4 test suite and against botocore's C{SigV4Auth}
(C{tests/test_bedrock.py}).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from zope.interface import implementer

from aiproxy.interfaces import IUpstreamAuth

__all__ = ["AWSCredentials", "SigV4Auth", "Signature", "sign"]

_ALGORITHM = "AWS4-HMAC-SHA256"

#: Headers never signed: those an HTTP client or a proxy on the way may set
#: or change (botocore leaves out the first four too).
_UNSIGNED = frozenset(
    {
        "expect",
        "transfer-encoding",
        "user-agent",
        "x-amzn-trace-id",
        "content-length",
        "connection",
        "accept-encoding",
        "te",
    }
)

#: Headers the authorizer sets itself; a client's are dropped first.
_OWN = (b"authorization", b"x-amz-date", b"x-amz-content-sha256", b"x-amz-security-token")

_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


@dataclass(frozen=True)
class AWSCredentials:
    """
    An access key, and the session token of temporary credentials; the
    secret parts never appear in a C{repr}.
    """

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


class Signature(NamedTuple):
    """
    The result of L{sign}.

    @ivar canonical_request: the canonical request that was signed.
    @ivar string_to_sign: the string to sign.
    @ivar signature: the hex signature.
    @ivar headers: the headers to add to the request (C{x-amz-date}, maybe
        C{x-amz-content-sha256} and C{x-amz-security-token}, and
        C{authorization}).
    """

    canonical_request: str
    string_to_sign: str
    signature: str
    headers: list[tuple[str, str]]


def _remove_dot_segments(path: str) -> str:
    """
    C{path} without C{.}, C{..} and empty segments (RFC 3986 section 5.2.4,
    plus the collapsing of consecutive slashes AWS services expect).
    """
    if not path:
        return "/"
    kept: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if kept:
                kept.pop()
        elif segment and segment != ".":
            kept.append(segment)
    last = "/" if path.endswith("/") and kept else ""
    return "/" + "/".join(kept) + last


def _canonical_path(path: str, normalize: bool) -> str:
    """
    The canonical URI: the path as sent, normalized, then URI-encoded once
    more (so a C{%3A} in the path is signed as C{%253A}, as every AWS
    service but S3 expects).
    """
    if normalize:
        path = _remove_dot_segments(path)
    return quote(path or "/", safe="/~")


def _canonical_query(query: str) -> str:
    """
    The canonical query string: every parameter URI-encoded, sorted by
    name, then value.
    """
    pairs = []
    for item in query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((quote(unquote(name), safe="~"), quote(unquote(value), safe="~")))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def sign(
    method: str,
    url: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    credentials: AWSCredentials,
    region: str,
    service: str,
    when: datetime,
    sign_body: bool = True,
    normalize: bool = True,
) -> Signature:
    """
    Sign a request with AWS Signature Version 4 in its headers.

    @param method: the HTTP method.
    @param url: the URL as sent; its path as it appears on the request line
        (already percent-encoded where needed).
    @param headers: every header to sign, C{host} included, as (name,
        value) pairs; repeated names are joined with commas.
    @param body: the body bytes sent (their SHA-256 is signed).
    @param credentials: the key to sign with; a session token is added as
        C{x-amz-security-token} and signed.
    @param region: the region of the credential scope.
    @param service: the signing name of the service (C{bedrock}).
    @param when: the signing time.
    @param sign_body: add C{x-amz-content-sha256} (and sign it).
    @param normalize: remove dot segments and repeated slashes from the
        path before signing (every service but S3).
    """
    stamp = when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    day = stamp[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    added = [("x-amz-date", stamp)]
    if sign_body:
        added.append(("x-amz-content-sha256", payload_hash))
    if credentials.session_token:
        added.append(("x-amz-security-token", credentials.session_token))
    values: dict[str, list[str]] = {}
    for name, value in [*headers, *added]:
        values.setdefault(name.lower(), []).append(" ".join(value.split()))
    names = sorted(values)
    signed_headers = ";".join(names)
    parts = urlsplit(url)
    canonical_request = "\n".join(
        [
            method.upper(),
            _canonical_path(parts.path, normalize),
            _canonical_query(parts.query),
            "".join(f"{name}:{','.join(values[name])}\n" for name in names),
            signed_headers,
            payload_hash,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [
            _ALGORITHM,
            stamp,
            scope,
            hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
        ]
    )
    key = _hmac(("AWS4" + credentials.secret_access_key).encode("utf-8"), day)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    authorization = (
        f"{_ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return Signature(
        canonical_request, string_to_sign, signature, [*added, ("authorization", authorization)]
    )


def _host(url: str) -> str:
    """
    The C{Host} header of a request to C{url}: its host and port, the
    scheme's default port left out (as Twisted's Agent writes it).
    """
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    default = _DEFAULT_PORTS.get(parts.scheme, "")
    if default and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return netloc


@implementer(IUpstreamAuth)
class SigV4Auth:
    """
    Signs each upstream request of an instance with AWS Signature Version 4:
    sets C{host} (so the signed value is the one sent), C{x-amz-date},
    C{x-amz-content-sha256}, C{x-amz-security-token} with a session token,
    and C{authorization}; the client's own values of these are dropped.
    Every other header of the call is signed too, except those an HTTP
    client may change (C{user-agent}, C{content-length}, ...).
    """

    def __init__(
        self, credentials: AWSCredentials, region: str, service: str, clock: IReactorTime
    ) -> None:
        """
        @param clock: gives the signing time (C{x-amz-date}).
        """
        self.credentials = credentials
        self.region = region
        self.service = service
        self._clock = clock

    def __repr__(self) -> str:
        return f"SigV4Auth({self.credentials!r}, {self.region!r}, {self.service!r})"

    def authorize(self, call: Any) -> Deferred[Any]:
        """
        The call with its signature headers (see L{IUpstreamAuth.authorize}).
        """
        headers = Headers()
        for name, raw_values in call.headers.getAllRawHeaders():
            if name.lower() not in _OWN:
                headers.setRawHeaders(name, raw_values)
        headers.setRawHeaders(b"host", [_host(call.url).encode("latin-1")])
        signed = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, raw_values in headers.getAllRawHeaders()
            if name.decode("latin-1").lower() not in _UNSIGNED
            for value in raw_values
        ]
        when = datetime.fromtimestamp(self._clock.seconds(), UTC)
        signature = sign(
            call.method,
            call.url,
            signed,
            call.body,
            self.credentials,
            self.region,
            self.service,
            when,
        )
        for name, value in signature.headers:
            headers.setRawHeaders(name.encode("latin-1"), [value.encode("latin-1")])
        return succeed(call._replace(headers=headers))
