# -*- test-case-name: tests.test_failures -*-
"""
Tests for L{aiproxy.upstream.failures.classify}: how a failed upstream
request (before its response) reaches the client and the access record,
and the one warning it logs.
"""

from __future__ import annotations

from OpenSSL.SSL import Error as SSLError
from service_identity.exceptions import DNSMismatch, VerificationError
from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived

from aiproxy.upstream.failures import Classified, classify
from tests.helpers import log_events

#: The log namespace of L{classify}'s warnings.
NAMESPACE = "aiproxy.upstream.failures"

TIMEOUT = Classified("timeout", 504, "upstream timed out")
NO_RESPONSE = Classified("upstream_error", 502, "upstream closed the connection without a response")
VERIFY_FAILED = Classified(
    "upstream_error", 502, "TLS with upstream failed: certificate verify failed"
)


def _tls_error() -> Exception:
    """
    The error of a TLS handshake whose certificate check failed.
    """
    return SSLError([("SSL routines", "", "certificate verify failed")])


class ClassifyTests(SynchronousTestCase):
    """
    L{classify}: a reason, a status and a message per failure.
    """

    def setUp(self) -> None:
        self.events = log_events(self, NAMESPACE)

    def assert_classified(self, cases: list[tuple[Failure, Classified, str]]) -> None:
        """
        Each failure is classified as expected, with exactly one warning
        whose text is given.
        """
        for failure, expected, warning in cases:
            self.events.clear()
            self.assertEqual(classify(failure), expected, failure)
            self.assertEqual(len(self.events), 1, (failure, self.events))
            self.assertEqual(self.events[0]["log_level"], LogLevel.warn)
            self.assertEqual(formatEvent(self.events[0]), warning)

    def test_timeouts(self) -> None:
        """
        A cancellation (the request's timeout), a connect timeout, a
        cancelled connection attempt, or a treq failure wrapping a
        cancellation is a 504 C{timeout}.
        """
        warning = "upstream request timed out"
        self.assert_classified(
            [
                (Failure(CancelledError()), TIMEOUT, warning),
                (Failure(TimeoutError()), TIMEOUT, warning),
                (Failure(ConnectingCancelledError(None)), TIMEOUT, warning),
                (Failure(ResponseNeverReceived([Failure(CancelledError())])), TIMEOUT, warning),
                (
                    Failure(
                        ResponseNeverReceived(
                            [Failure(ConnectionLost()), Failure(CancelledError())]
                        )
                    ),
                    TIMEOUT,
                    warning,
                ),
            ]
        )

    def test_connect(self) -> None:
        """
        A failed DNS lookup or a refused connection is a 502 saying the
        connection failed, and why.
        """
        dns = "DNS lookup failed: upstream.test."
        refused = "Connection was refused by other side."
        self.assert_classified(
            [
                (
                    Failure(DNSLookupError("upstream.test")),
                    Classified("upstream_error", 502, f"failed to connect to upstream: {dns}"),
                    f"connecting upstream failed: {dns}",
                ),
                (
                    Failure(ConnectionRefusedError()),
                    Classified("upstream_error", 502, f"failed to connect to upstream: {refused}"),
                    f"connecting upstream failed: {refused}",
                ),
            ]
        )

    def test_tls(self) -> None:
        """
        A TLS failure, alone or wrapped in a treq failure, is a 502 naming
        what the TLS library said went wrong.
        """
        warning = "TLS with upstream failed: certificate verify failed"
        self.assert_classified(
            [
                (Failure(_tls_error()), VERIFY_FAILED, warning),
                (Failure(ResponseNeverReceived([Failure(_tls_error())])), VERIFY_FAILED, warning),
                (
                    Failure(
                        ResponseNeverReceived([Failure(ConnectionLost()), Failure(_tls_error())])
                    ),
                    VERIFY_FAILED,
                    warning,
                ),
            ]
        )

    def test_tls_without_details(self) -> None:
        """
        A TLS failure without the library's error list is described by its
        message.
        """
        self.assert_classified(
            [
                (
                    Failure(SSLError("handshake went wrong")),
                    Classified(
                        "upstream_error", 502, "TLS with upstream failed: handshake went wrong"
                    ),
                    "TLS with upstream failed: handshake went wrong",
                )
            ]
        )

    def test_hostname_mismatch(self) -> None:
        """
        A certificate not valid for the upstream's name (C{service_identity})
        is a TLS failure too, naming the mismatch.
        """
        error = VerificationError(errors=[DNSMismatch(mismatched_id="upstream.test")])
        for failure in (Failure(error), Failure(ResponseNeverReceived([Failure(error)]))):
            self.events.clear()
            reason, status, message = classify(failure)
            self.assertEqual((reason, status), ("upstream_error", 502))
            self.assertTrue(message.startswith("TLS with upstream failed: "), message)
            self.assertIn("upstream.test", message)
            self.assertEqual(len(self.events), 1)
            self.assertEqual(formatEvent(self.events[0]), message)

    def test_anything_else(self) -> None:
        """
        Any other failure is a 502 saying the upstream closed the
        connection without a response; the warning describes the wrapped
        failures.
        """
        self.assert_classified(
            [
                (
                    Failure(ResponseNeverReceived([Failure(ConnectionDone())])),
                    NO_RESPONSE,
                    "upstream request failed: Connection was closed cleanly.",
                ),
                (
                    Failure(RequestTransmissionFailed([Failure(ConnectionLost("reset"))])),
                    NO_RESPONSE,
                    "upstream request failed: Connection to the other side was lost "
                    "in a non-clean fashion: reset.",
                ),
                (
                    Failure(ValueError("odd")),
                    NO_RESPONSE,
                    "upstream request failed: odd",
                ),
            ]
        )

    def test_classified_fields(self) -> None:
        """
        The result names its reason, status and message.
        """
        result = classify(Failure(CancelledError()))
        self.assertEqual(
            (result.reason, result.status, result.message), ("timeout", 504, "upstream timed out")
        )
