# -*- test-case-name: tests.test_failures -*-
"""
What a failed upstream request means for the client: the failures of the
treq/Agent client (connecting, TLS, sending, waiting for the headers)
classified into an access-record reason, a status and a message.
"""

from __future__ import annotations

from typing import NamedTuple

from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    TimeoutError,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["Classified", "classify"]

log = Logger()

#: The failures of a TLS handshake or of the certificate's name check.
_TLS_ERRORS = ("OpenSSL.SSL.Error", "service_identity.exceptions.VerificationError")


class Classified(NamedTuple):
    """
    A failed upstream request as the client sees it.
    """

    reason: str
    status: int
    message: str


def classify(failure: Failure) -> Classified:
    """
    Classify (and log) a failure of an upstream request before its
    response: a timeout or cancellation is a 504, a connection, TLS or
    protocol failure a 502.
    """
    if failure.check(CancelledError, TimeoutError, ConnectingCancelledError) or _cancelled(failure):
        log.warn("upstream request timed out")
        return Classified("timeout", 504, "upstream timed out")
    if failure.check(DNSLookupError, ConnectError):
        error = failure.getErrorMessage()
        log.warn("connecting upstream failed: {error}", error=error)
        return Classified("upstream_error", 502, f"failed to connect to upstream: {error}")
    tls = _tls_failure(failure)
    if tls is not None:
        log.warn("TLS with upstream failed: {error}", error=tls)
        return Classified("upstream_error", 502, f"TLS with upstream failed: {tls}")
    log.warn("upstream request failed: {error}", error=_describe(failure))
    return Classified("upstream_error", 502, "upstream closed the connection without a response")


def _reasons(failure: Failure) -> list[Failure]:
    """
    The failures a treq/Agent failure wraps (C{ResponseNeverReceived} and
    its kin carry a list).
    """
    return getattr(failure.value, "reasons", None) or []


def _cancelled(failure: Failure) -> bool:
    """
    Whether a treq/Agent failure wraps a cancellation (its timeout).
    """
    return any(r.check(CancelledError) for r in _reasons(failure))


def _tls_failure(failure: Failure) -> str | None:
    """
    What went wrong with TLS when C{failure} is (or wraps) a TLS failure,
    as C{certificate verify failed}; else L{None}.
    """
    for reason in [failure, *_reasons(failure)]:
        if reason.check(*_TLS_ERRORS):
            entries = reason.value.args[0] if reason.value.args else None
            if isinstance(entries, list):
                details = [
                    str(entry[-1])
                    for entry in entries
                    if isinstance(entry, tuple) and entry and entry[-1]
                ]
                if details:
                    return "; ".join(details)
            return reason.getErrorMessage()
    return None


def _describe(failure: Failure) -> str:
    """
    A short description of a failure, with the reasons it wraps.
    """
    reasons = _reasons(failure)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return failure.getErrorMessage()
