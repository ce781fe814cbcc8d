# -*- test-case-name: tests.test_listener -*-
"""
The client side's defences against hostile clients: the C{Host} checks of
RFC 9112 §3.2, the one deadline of each client connection (for a request
head, for a request body, for the wait between requests), and the cap on
the client connections open at once.

L{LimitedChannel} applies them to a connection, for the
L{aiproxy.server.GatewaySite} that holds the limits and the cap; every
timer runs on the site's reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from aiproxy.config import Config
from aiproxy.hosts import host_problem

if TYPE_CHECKING:
    from aiproxy.metrics import Metrics

__all__ = [
    "REFUSAL_WARNING_INTERVAL",
    "ClientLimits",
    "ConnectionCap",
    "LimitedChannel",
    "Phase",
    "RefusedConnection",
    "RequestDeadline",
    "host_problem",
]

log = Logger()

#: Seconds between two warnings about connections refused over the cap.
REFUSAL_WARNING_INTERVAL = 10.0

#: A body deadline this close is reached (timer rounding).
_SLACK = 1e-6


@dataclass(frozen=True)
class ClientLimits:
    """
    The limits a client connection is held to (the config's top-level
    fields of the same meaning).

    @ivar header_timeout: seconds for a whole request head, from its first
        byte.
    @ivar body_timeout: seconds for a request body, from the end of its
        head, extended by one per C{body_min_rate} bytes received.
    @ivar body_min_rate: bytes per extra second of body time; 0 for none.
    @ivar max_connections: client connections open at once, at most.
    """

    header_timeout: float = Config.client_header_timeout
    body_timeout: float = Config.client_body_timeout
    body_min_rate: int = Config.client_body_min_rate
    max_connections: int = Config.max_client_connections

    @classmethod
    def from_config(cls, config: Config) -> ClientLimits:
        """
        The limits C{config} sets.
        """
        return cls(
            header_timeout=config.client_header_timeout,
            body_timeout=config.client_body_timeout,
            body_min_rate=config.client_body_min_rate,
            max_connections=config.max_client_connections,
        )


class Phase(Enum):
    """
    Where a client connection is, which decides its deadline.
    """

    #: No byte of a request yet (new or kept-alive connection): closed
    #: without an answer when the wait is over.
    WAITING = "waiting"
    #: Reading a request head: 408 when C{header_timeout} is over.
    HEAD = "head"
    #: Reading a request body: 408 when its deadline is over.
    BODY = "body"
    #: The request is being answered: no deadline.
    HANDLING = "handling"
    #: Refused, timed out or gone: nothing more is read.
    CLOSED = "closed"


class RequestDeadline:
    """
    The one deadline of a client connection, set anew at each change of its
    L{Phase}: the wait for a request, the request head's deadline (counted
    from its first byte, not restarted by later bytes), the request body's
    (counted from the end of the head, extended by a second per
    C{body_min_rate} bytes received, as Apache's C{mod_reqtimeout}); none
    while the request is answered.

    Its timer is moved only when a deadline comes before it: a timer due
    before the deadline fires, finds the deadline later (or none) and is
    set again for it. So a short request on a kept-alive connection costs
    about one timer, not one per phase.

    @ivar phase: the connection's L{Phase}.
    @ivar body_bytes: the bytes of the current request body received so far.
    """

    def __init__(
        self,
        clock: IReactorTime,
        limits: Callable[[], ClientLimits],
        expired: Callable[[Phase], None],
    ) -> None:
        """
        @param clock: the site's reactor.
        @param limits: the limits in force (read as each phase starts, so
            that a reload applies to the deadlines set after it).
        @param expired: called with the phase whose deadline passed; the
            phase is then L{Phase.CLOSED}.
        """
        self.phase = Phase.CLOSED
        self.body_bytes = 0
        self._clock = clock
        self._limits = limits
        self._expired = expired
        self._call: IDelayedCall | None = None
        #: When the current phase's deadline passes (a body's before the
        #: bytes received extend it), or L{None}.
        self._due: float | None = None
        self._body_started = 0.0
        self._body_timeout = 0.0
        self._body_rate = 0

    def wait(self, seconds: float | None) -> None:
        """
        Wait for the first byte of a request, for at most C{seconds}
        (L{None}: for ever).
        """
        self._enter(Phase.WAITING, seconds)

    def request_started(self) -> None:
        """
        The first byte of a request came: its head is due within
        C{header_timeout}.
        """
        self._enter(Phase.HEAD, self._limits().header_timeout)

    def head_received(self, body: bool) -> None:
        """
        The request head is complete; C{body}: a body follows.
        """
        if not body:
            self._enter(Phase.HANDLING, None)
            return
        limits = self._limits()
        self._body_started = self._clock.seconds()
        self._body_timeout = limits.body_timeout
        self._body_rate = limits.body_min_rate
        self.body_bytes = 0
        self._enter(Phase.BODY, limits.body_timeout)

    def body_received(self) -> None:
        """
        The request body is complete: the request is being answered.
        """
        self._enter(Phase.HANDLING, None)

    def close(self) -> None:
        """
        The connection is closing or closed: no more deadline.
        """
        self._enter(Phase.CLOSED, None)

    def body_deadline(self) -> float:
        """
        When the current body is due, by the bytes received so far.
        """
        extra = self.body_bytes / self._body_rate if self._body_rate else 0.0
        return self._body_started + self._body_timeout + extra

    def _enter(self, phase: Phase, seconds: float | None) -> None:
        self.phase = phase
        call = self._call
        if seconds is None:
            self._due = None
            if phase is Phase.CLOSED and call is not None:
                self._call = None
                if call.active():
                    call.cancel()
            return
        due = self._due = self._clock.seconds() + seconds
        if call is not None:
            if call.active() and call.getTime() <= due + _SLACK:
                return
            call.cancel()
        self._call = self._clock.callLater(seconds, self._fire)

    def _fire(self) -> None:
        self._call = None
        due = self._due
        if due is None:
            return
        phase = self.phase
        if phase is Phase.BODY:
            # Extended lazily: the bytes received move the deadline, no
            # timer is touched per chunk.
            due = self.body_deadline()
        left = due - self._clock.seconds()
        if left > _SLACK:
            self._call = self._clock.callLater(left, self._fire)
            return
        self._due = None
        self.phase = Phase.CLOSED
        self._expired(phase)


class LimitedChannel(HTTPChannel):
    """
    An L{HTTPChannel} that holds its client to the site's L{ClientLimits}
    and C{Host} checks, and counts itself in the site's L{ConnectionCap}.

    Its one timer is a L{RequestDeadline} on the site's reactor, in place
    of Twisted's idle timeout that every byte restarts: a new connection
    must start a request within C{header_timeout} (else it is closed), a
    kept-alive one within the site's idle timeout (C{timeOut}); a head is
    due C{header_timeout} after its first byte, a body as L{RequestDeadline}
    says (else 408). A request with a C{Host} problem gets 400 and reaches
    no resource. Refusals go through L{_refuse_head}.
    """

    #: The site that built it: a L{aiproxy.server.GatewaySite}.
    site: Any
    _deadline: RequestDeadline
    _counted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        site = self.site
        self._deadline = RequestDeadline(site.reactor, site.get_limits, self._deadline_passed)
        self._deadline.wait(site.limits.header_timeout)
        self._counted = True
        site.cap.opened()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._deadline.close()
        if self._counted:
            self._counted = False
            self.site.cap.closed()
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        # Empty lines before a request line are ignored (RFC 9112 §2.2):
        # they do not start a request.
        if self._deadline.phase is Phase.WAITING and data.lstrip(b"\r\n"):
            self._deadline.request_started()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        problem = host_problem(
            self.requests[-1].requestHeaders.getRawHeaders(b"host"), self._version
        )
        if problem is not None:
            self._refuse_head(400, problem, "invalid_host")
            return
        self._deadline.head_received(self.length != 0)
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._deadline.phase is Phase.BODY:
            self._deadline.body_bytes += len(data)
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self._deadline.phase is Phase.CLOSED:
            # Refused while its head or body was read: never dispatched.
            return
        self._deadline.body_received()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self.persistent:
            # Before the requests the client sent meanwhile are read.
            self._deadline.wait(self.site.timeOut)
        else:
            self._deadline.close()
        super().requestDone(request)

    def _deadline_passed(self, phase: Phase) -> None:
        """
        The deadline of C{phase} passed: a wait ends with the connection
        closed, a head or body with a 408.
        """
        if phase is Phase.HEAD:
            self._refuse_head(408, "request header timeout", "request_header_timeout")
        elif phase is Phase.BODY:
            self._refuse_head(408, "request body timeout", "request_body_timeout")
        else:
            self.timeoutConnection()

    def closing(self) -> None:
        """
        The connection is closing after a refusal: no more deadline, and it
        is aborted if the client has not taken the answer within
        C{abortTimeout}, as Twisted does after its idle timeout.
        """
        self._deadline.close()
        if self._abortingCall is None and self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def _refuse_head(self, status: int, message: str, reason: str) -> None:
        """
        Answer C{status} with C{{"message": message}}, close the connection
        (calling L{closing}) and read nothing more.
        """
        raise NotImplementedError


class RefusedConnection(Protocol):
    """
    A client connection over the cap: closed as soon as it is made,
    without reading a byte.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class ConnectionCap:
    """
    Counts the open client connections and admits a new one only below
    C{max_connections}; each refusal is counted in the metrics, and logged
    at most once per L{REFUSAL_WARNING_INTERVAL}.

    @ivar open: the client connections open now.
    @ivar refused: the connections refused so far.
    """

    def __init__(
        self,
        clock: IReactorTime,
        limits: Callable[[], ClientLimits],
        metrics: Callable[[], Metrics | None],
    ) -> None:
        """
        @param clock: the site's reactor (times the warnings).
        @param limits: the limits in force.
        @param metrics: the L{aiproxy.metrics.Metrics} to count in, or
            L{None} (looked up at each use).
        """
        self.open = 0
        self.refused = 0
        self._clock = clock
        self._limits = limits
        self._metrics = metrics
        self._unreported = 0
        self._next_warning = float("-inf")

    def admit(self) -> bool:
        """
        Whether a new connection may open; a refusal is counted and maybe
        logged.
        """
        limit = self._limits().max_connections
        if self.open < limit:
            return True
        self.refused += 1
        self._unreported += 1
        metrics = self._metrics()
        if metrics is not None:
            metrics.client_connections_refused.inc()
        now = self._clock.seconds()
        if now >= self._next_warning:
            log.warn(
                "{open} client connections are open (max_client_connections {limit}): "
                "refused {count} new connection(s) since the last warning",
                open=self.open,
                limit=limit,
                count=self._unreported,
            )
            self._unreported = 0
            self._next_warning = now + REFUSAL_WARNING_INTERVAL
        return False

    def opened(self) -> None:
        """
        An admitted connection is open.
        """
        self.open += 1
        self._report()

    def closed(self) -> None:
        """
        An admitted connection closed.
        """
        self.open -= 1
        self._report()

    def _report(self) -> None:
        metrics = self._metrics()
        if metrics is not None:
            metrics.client_connections.set(self.open)
