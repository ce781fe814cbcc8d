# -*- test-case-name: tests.test_vertex -*-
"""
C{auth.gcp}: Google Cloud service-account credentials, and the upstream
authorizer that sends each request of an instance with an OAuth2 access
token (C{authorization: Bearer <token>}).

The key file is loaded and checked once, at start-up. A token is obtained
with the JWT-bearer grant (RFC 7523): an assertion signed with the key
(C{google-auth} loads the key and signs; it does no I/O here) is posted to
the key file's C{token_uri} through the instance's own upstream client,
without blocking. The token is kept until C{expires_in - expire_early_secs}
(at most C{max_ttl}), then fetched anew by the next request; requests that
need one while a fetch is under way wait for that same fetch.

Neither the key, the assertion nor a token ever reaches a message or a log
event.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import Enum
from typing import Any, Protocol, cast
from urllib.parse import urlencode

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as StreamProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from aiproxy.interfaces import IUpstreamAuth
from aiproxy.upstream.gcp_account import GRANT_TYPE, ServiceAccount, load_service_account
from aiproxy.upstream.request import ClientError

__all__ = ["DEFAULT_EXPIRE_EARLY_SECS", "GCPTokenAuth", "gcp_auth"]


log = Logger()

#: Seconds before a token's expiry that it is no longer used.
DEFAULT_EXPIRE_EARLY_SECS = 60

#: The lifetime of a token whose answer gives no C{expires_in}.
_DEFAULT_EXPIRES_IN = 3600

#: The largest token endpoint answer read.
_MAX_ANSWER = 64 * 1024

#: How much of the token endpoint's error text a message keeps.
_MAX_DETAIL = 200

#: What an access token may hold: visible ASCII (it goes in a header).
_TOKEN = re.compile(r"^[\x21-\x7e]+$")

#: A JWT (an assertion an endpoint might echo in its error text).
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]*\.?[\w-]*")


class _Requester(Protocol):
    """
    What sends the token requests: an L{aiproxy.upstream.client.UpstreamClient}.
    """

    def request(self, method: str, url: str, headers: Headers, body: bytes | None) -> Deferred[Any]:
        """
        Send a request; fires with the response once its headers arrived.
        """


class _TokenError(Exception):
    """
    The token endpoint's answer gives no token; the message says why.
    """


class _Reader(StreamProtocol):
    """
    Reads a small response body whole, at most C{limit} bytes (more stops
    the transfer).
    """

    def __init__(self, limit: int, done: Deferred[bytes]) -> None:
        self._limit = limit
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            if not self._done.called:
                self._done.errback(_TokenError(f"token endpoint answer over {self._limit} bytes"))
            # deliverBody hands its protocol a producer, not an ITransport.
            cast(IPushProducer, self.transport).stopProducing()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(_TokenError("token endpoint answer cut short"))


def _read(response: Any, limit: int) -> Deferred[bytes]:
    """
    The body of C{response}; cancelling stops the transfer.
    """
    reader: _Reader

    def cancel(d: Deferred[bytes]) -> None:
        if reader.transport is not None:
            cast(IPushProducer, reader.transport).stopProducing()

    done: Deferred[bytes] = Deferred(cancel)
    reader = _Reader(limit, done)
    response.deliverBody(reader)
    return done


def _detail(document: Any) -> str:
    """
    The C{error} and C{error_description} of an OAuth2 error answer, cut
    short, or nothing.
    """
    if not isinstance(document, dict):
        return ""
    parts = [
        value
        for value in (document.get("error"), document.get("error_description"))
        if isinstance(value, str) and value
    ]
    text = _JWT.sub("<jwt>", " ".join(": ".join(parts).split()))
    return f" ({text[:_MAX_DETAIL]})" if text else ""


def _lifetime(value: Any) -> float:
    """
    The seconds of an answer's C{expires_in} (a number, or digits), or the
    default when it gives none.
    """
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return float(_DEFAULT_EXPIRES_IN)


def _token_answer(status: int, body: bytes) -> tuple[str, float]:
    """
    The access token and its lifetime (seconds) in a token endpoint's answer.

    @raise _TokenError: when it has none.
    """
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if status != 200:
        raise _TokenError(f"token endpoint answered {status}{_detail(document)}")
    if not isinstance(document, dict):
        raise _TokenError("token endpoint answer is not a JSON object")
    token = document.get("access_token")
    if not isinstance(token, str) or not token:
        raise _TokenError("token endpoint answer has no access_token")
    if not _TOKEN.match(token):
        raise _TokenError("token endpoint answer has an invalid access_token")
    return token, _lifetime(document.get("expires_in"))


def _reason(failure: Failure, timeout: float) -> str:
    """
    Why a token fetch failed, for the client and the log: never the request
    (its assertion) nor the answer's token.
    """
    if failure.check(_TokenError):
        return str(failure.value)
    if failure.check(defer.TimeoutError):
        return f"no answer from the token endpoint within {timeout:g} s"
    # ResponseFailed, ResponseNeverReceived: the first reason says it.
    reasons = getattr(failure.value, "reasons", None)
    if reasons and isinstance(reasons[0], Failure):
        failure = reasons[0]
    message = " ".join(failure.getErrorMessage().split())[:_MAX_DETAIL]
    return f"token request failed: {type(failure.value).__name__}: {message}"


class _Phase(Enum):
    """
    Where the token of an authorizer is.
    """

    #: None: the next request fetches one.
    EMPTY = "empty"
    #: One fetch is under way; requests wait for it.
    FETCHING = "fetching"
    #: A token, used until its refresh time.
    READY = "ready"


@implementer(IUpstreamAuth)
class GCPTokenAuth:
    """
    Sends each upstream request of an instance with a Google OAuth2 access
    token of its service account, cached and shared (see the module).
    """

    def __init__(
        self,
        account: ServiceAccount,
        client: _Requester,
        clock: IReactorTime,
        expire_early_secs: float = DEFAULT_EXPIRE_EARLY_SECS,
        max_ttl: float | None = None,
        timeout: float = 30.0,
    ) -> None:
        """
        @param client: sends the token requests (the instance's upstream
            client).
        @param clock: the time of assertions and token lifetimes, and the
            fetch timeout.
        @param expire_early_secs: a token is not used in its last seconds.
        @param max_ttl: the longest a token is used, seconds.
        @param timeout: the longest a fetch may take, seconds.
        """
        self.account = account
        self.expire_early_secs = expire_early_secs
        self.max_ttl = max_ttl
        self.timeout = timeout
        self._client = client
        self._clock = clock
        self._phase = _Phase.EMPTY
        self._token: str | None = None
        self._refresh_at = 0.0
        self._waiters: list[Deferred[str]] = []

    def __repr__(self) -> str:
        return f"GCPTokenAuth({self.account!r})"

    def authorize(self, call: Any) -> Deferred[Any]:
        """
        The call with C{authorization: Bearer <token>} (see
        L{IUpstreamAuth.authorize}); it fails with a 500 L{ClientError}
        when no token could be obtained.
        """

        def authorized(token: str) -> Any:
            headers = call.headers.copy()
            headers.setRawHeaders(b"authorization", [b"Bearer " + token.encode("ascii")])
            return call._replace(headers=headers)

        return self.token().addCallback(authorized)

    def token(self) -> Deferred[str]:
        """
        A valid access token: the cached one, else that of the fetch under
        way (started if there is none). Each call gets its own Deferred:
        cancelling it leaves the fetch to the others.
        """
        if self._phase is _Phase.READY:
            if self._clock.seconds() < self._refresh_at:
                assert self._token is not None
                return succeed(self._token)
            self._phase, self._token = _Phase.EMPTY, None
        waiter: Deferred[str] = Deferred(self._forget)
        self._waiters.append(waiter)
        if self._phase is _Phase.EMPTY:
            self._fetch()
        return waiter

    def _forget(self, waiter: Deferred[str]) -> None:
        """
        A waiter was cancelled: the fetch goes on for the others.
        """
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _fetch(self) -> None:
        """
        Start the one fetch; it ends in L{_fetched} or L{_failed}.
        """
        self._phase = _Phase.FETCHING
        started = self._clock.seconds()
        fetch = Deferred.fromCoroutine(self._request(started))
        fetch.addTimeout(self.timeout, self._clock)
        fetch.addCallbacks(self._fetched, self._failed, callbackArgs=(started,))

    async def _request(self, now: float) -> tuple[str, float]:
        """
        Post a fresh assertion to the token endpoint; the token and its
        lifetime.
        """
        form = urlencode({"grant_type": GRANT_TYPE, "assertion": self.account.assertion(now)})
        headers = Headers(
            {
                b"content-type": [b"application/x-www-form-urlencoded"],
                b"accept": [b"application/json"],
            }
        )
        response = await self._client.request(
            "POST", self.account.token_uri, headers, form.encode("ascii")
        )
        body = await _read(response, _MAX_ANSWER)
        return _token_answer(response.code, body)

    def _fetched(self, answer: tuple[str, float], started: float) -> None:
        """
        Keep the token until C{expires_in - expire_early_secs} after the
        fetch started (at most C{max_ttl}), and give it to every waiter.
        """
        token, expires_in = answer
        ttl = expires_in - self.expire_early_secs
        if self.max_ttl is not None:
            ttl = min(ttl, self.max_ttl)
        self._phase, self._token, self._refresh_at = _Phase.READY, token, started + ttl
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(token)

    def _failed(self, failure: Failure) -> None:
        """
        Tell every waiter that no token could be had: a 500 with
        C{{"error_msg": "failed to get gcp access token: <reason>"}}; the
        next request tries again.
        """
        if failure.check(CancelledError):
            # Not cancelled by anyone but addTimeout, which says TimeoutError.
            failure = Failure(defer.TimeoutError())
        reason = _reason(failure, self.timeout)
        log.warn(
            "failed to get gcp access token for {account}: {reason}",
            account=self.account.client_email,
            reason=reason,
        )
        self._phase = _Phase.EMPTY
        message = f"failed to get gcp access token: {reason}"
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(ClientError(500, message, {"error_msg": message}))


def gcp_auth(conf: Mapping[str, Any], client: _Requester, clock: IReactorTime) -> GCPTokenAuth:
    """
    The authorizer of a target whose C{auth.gcp} is set.

    @param conf: the target's config (already checked: its key loads).
    @param client: the instance's upstream client.
    """
    gcp = conf["auth"]["gcp"]
    return GCPTokenAuth(
        load_service_account(gcp),
        client,
        clock,
        gcp.get("expire_early_secs", DEFAULT_EXPIRE_EARLY_SECS),
        gcp.get("max_ttl"),
        conf.get("timeout", 30000) / 1000.0,
    )
