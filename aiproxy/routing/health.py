# -*- test-case-name: tests.test_health -*-
"""
Active health checks of C{ai-proxy-multi} instances (C{checks.active}, the
fields and defaults of APISIX's health checker).

Each checked instance has a L{HealthChecker}: a L{LoopingCall} that probes
the instance every C{healthy.interval} seconds while it is healthy and every
C{unhealthy.interval} seconds while it is not, one probe at a time. An
instance starts healthy. It turns unhealthy after C{unhealthy.http_failures}
answers with a status of C{unhealthy.http_statuses}, C{unhealthy.tcp_failures}
failed connections or C{unhealthy.timeouts} probes without an answer within
C{timeout}, in a row; and healthy again after C{healthy.successes} answers
with a status of C{healthy.http_statuses} (a C{tcp} probe: connections) in a
row. Other statuses count neither way. A success clears the failure counts
and a failure the success count, as in C{lua-resty-healthcheck}.

L{HealthService} runs the checkers of the route table in force, and stops
them when the table is replaced (reload) or the gateway stops.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.http_headers import Headers
from zope.interface import implementer

from aiproxy.interfaces import IHealthProbe
from aiproxy.upstream.client import DiscardBody, tls_policy

__all__ = ["HTTPProbe", "HealthChecker", "HealthService", "ProbeTarget", "parse_header_lines"]

log = Logger()


@dataclass(frozen=True)
class ProbeTarget:
    """
    Where and how one instance is probed.

    @ivar kind: C{http}, C{https} or C{tcp} (C{checks.active.type}).
    @ivar path: the request path and query (C{http_path}, with the
        instance's C{auth.query}).
    @ivar headers: request headers (C{req_headers}, the instance's
        C{auth.header}, and C{Host} from C{checks.active.host}).
    @ivar timeout: seconds to wait for an answer.
    @ivar verify: check the certificate of an C{https} probe.
    """

    kind: str
    host: str
    port: int
    path: str = "/"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    timeout: float = 1.0
    verify: bool = True

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}://{host}:{self.port}{self.path}"


@implementer(IHealthProbe)
class HTTPProbe:
    """
    Probes over the network: an HTTP(S) C{GET} on a new connection (never
    pooled: a probe checks that connecting works), or a bare TCP connect.
    """

    def __init__(self, reactor: Any, conf: Mapping[str, Any] | None = None) -> None:
        """
        @param reactor: connects and times the probes.
        @param conf: the plugin's shared fields (C{ssl_ca_file} is trusted
            for C{https} probes that verify certificates).
        """
        self._reactor = reactor
        self._conf = dict(conf or {})
        self._agents: dict[bool, Agent] = {}

    def _agent(self, verify: bool) -> Agent:
        agent = self._agents.get(verify)
        if agent is None:
            policy = tls_policy({**self._conf, "ssl_verify": verify})
            pool = HTTPConnectionPool(self._reactor, persistent=False)
            agent = self._agents[verify] = Agent(self._reactor, policy, pool=pool)
        return agent

    def probe(self, target: ProbeTarget) -> Deferred[int | None]:
        reactor = self._reactor
        d: Deferred[Any]
        if target.kind == "tcp":
            endpoint = HostnameEndpoint(reactor, target.host, target.port, timeout=target.timeout)
            d = endpoint.connect(Factory.forProtocol(Protocol))

            def connected(protocol: IProtocol) -> None:
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.loseConnection()

            d = d.addCallback(connected)
        else:
            headers = Headers()
            for name, value in target.headers:
                headers.addRawHeader(name, value)
            d = self._agent(target.verify).request(
                b"GET", target.url.encode("ascii"), headers, None
            )

            def answered(response: Any) -> int:
                response.deliverBody(DiscardBody())
                return int(response.code)

            d = d.addCallback(answered)

        def timed_out(result: object, timeout: float) -> None:
            # Whatever the cancellation became (ConnectingCancelledError...).
            raise TimeoutError(f"no answer within {timeout} s")

        d.addTimeout(target.timeout, reactor, onTimeoutCancel=timed_out)
        return cast("Deferred[int | None]", d)


class HealthChecker:
    """
    The active health check of one instance.

    @ivar healthy: the instance's state (healthy until probes say not).
    """

    def __init__(
        self,
        instance: str,
        route_id: str,
        target: ProbeTarget,
        active: Mapping[str, Any],
        probe: IHealthProbe,
        clock: IReactorTime,
    ) -> None:
        """
        @param instance: the instance's name, for logs.
        @param active: its C{checks.active} config, defaults filled in.
        """
        self.instance = instance
        self.route_id = route_id
        self.target = target
        self.healthy = True
        self._probe = probe
        self._clock = clock
        healthy = active.get("healthy") or {}
        unhealthy = active.get("unhealthy") or {}
        self._healthy_interval = float(healthy.get("interval", 1))
        self._unhealthy_interval = float(unhealthy.get("interval", 1))
        self._healthy_statuses = frozenset(healthy.get("http_statuses", (200, 302)))
        self._unhealthy_statuses = frozenset(
            unhealthy.get("http_statuses", (429, 404, 500, 501, 502, 503, 504, 505))
        )
        self._needed_successes = int(healthy.get("successes", 2))
        self._thresholds = {
            "http": int(unhealthy.get("http_failures", 5)),
            "tcp": int(unhealthy.get("tcp_failures", 2)),
            "timeout": int(unhealthy.get("timeouts", 3)),
        }
        self._successes = 0
        self._failures = dict.fromkeys(self._thresholds, 0)
        self._loop: LoopingCall | None = None
        self._stopped: Deferred[Any] | None = None
        self._pending: Deferred[Any] | None = None
        self.probes = 0

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    def start(self) -> None:
        """
        Probe now, then every interval.
        """
        if self.running:
            return
        loop = self._loop = LoopingCall(self.check)
        loop.clock = self._clock
        interval = self._healthy_interval if self.healthy else self._unhealthy_interval
        self._stopped = loop.start(interval, now=True)
        self._stopped.addErrback(
            lambda f: log.failure("health check of {instance} failed", f, instance=self.instance)
        )

    def stop(self) -> Deferred[Any]:
        """
        Stop probing; a probe in flight is cancelled.

        @return: fires when the checker is idle.
        """
        loop, self._loop = self._loop, None
        stopped, self._stopped = self._stopped, None
        if loop is None or not loop.running:
            return succeed(None)
        loop.stop()
        if self._pending is not None:
            self._pending.cancel()
        return stopped if stopped is not None else succeed(None)

    def check(self) -> Deferred[None]:
        """
        Send one probe and count its result.
        """
        self.probes += 1
        d = self._probe.probe(self.target)
        self._pending = d
        d.addCallbacks(self._answered, self._failed)
        d.addErrback(
            lambda f: log.failure("health check of {instance} failed", f, instance=self.instance)
        )

        def done(result: object) -> None:
            self._pending = None

        return d.addBoth(done)

    def _answered(self, status: int | None) -> None:
        if status is None or status in self._healthy_statuses:
            self._success()
        elif status in self._unhealthy_statuses:
            self._failure("http", f"status {status}")

    def _failed(self, failure: Failure) -> None:
        if self._loop is None:
            return  # cancelled by stop()
        if failure.check(TimeoutError, CancelledError, ConnectTimeoutError) or _timed_out(failure):
            self._failure("timeout", "timed out")
        else:
            self._failure("tcp", failure.getErrorMessage())

    def _success(self) -> None:
        self._failures = dict.fromkeys(self._thresholds, 0)
        self._successes += 1
        if not self.healthy and self._successes >= self._needed_successes:
            self._set(True, "")

    def _failure(self, kind: str, reason: str) -> None:
        self._successes = 0
        self._failures[kind] += 1
        if self.healthy and self._failures[kind] >= self._thresholds[kind]:
            self._set(False, reason)

    def _set(self, healthy: bool, reason: str) -> None:
        self.healthy = healthy
        self._successes = 0
        self._failures = dict.fromkeys(self._thresholds, 0)
        if self._loop is not None:
            self._loop.interval = self._healthy_interval if healthy else self._unhealthy_interval
        if healthy:
            log.info(
                "ai instance {instance} of route {route_id} is healthy again",
                instance=self.instance,
                route_id=self.route_id,
            )
        else:
            log.warn(
                "ai instance {instance} of route {route_id} is unhealthy: health check {reason}",
                instance=self.instance,
                route_id=self.route_id,
                reason=reason,
            )


def _timed_out(failure: Failure) -> bool:
    """
    Whether an Agent failure wraps a timeout or cancellation.
    """
    if failure.check(ResponseNeverReceived):
        reasons = getattr(failure.value, "reasons", None) or []
        return any(r.check(CancelledError, TimeoutError) for r in reasons)
    return False


def parse_header_lines(lines: Iterable[str]) -> list[tuple[bytes, bytes]]:
    """
    C{req_headers} lines (C{"Name: value"}) as header pairs; a line without
    a colon is skipped.
    """
    headers = []
    for line in lines:
        name, sep, value = line.partition(":")
        if sep and name.strip():
            headers.append((name.strip().encode("latin-1"), value.strip().encode("latin-1")))
    return headers


class HealthService(Service):
    """
    Runs the health checkers of the route table in force.
    """

    def __init__(self, checkers: Sequence[HealthChecker] = ()) -> None:
        self.checkers: list[HealthChecker] = list(checkers)

    def startService(self) -> None:
        super().startService()
        for checker in self.checkers:
            checker.start()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self._stop(self.checkers)

    def use(self, checkers: Sequence[HealthChecker]) -> Deferred[Any]:
        """
        Check C{checkers} from now on (a new route table), instead of the
        previous ones, which stop.

        @return: fires when the previous checkers stopped.
        """
        old, self.checkers = self.checkers, list(checkers)
        stopped = self._stop(old)
        if self.running:
            for checker in self.checkers:
                checker.start()
        return stopped

    @staticmethod
    def _stop(checkers: Iterable[HealthChecker]) -> Deferred[Any]:
        return gatherResults([checker.stop() for checker in checkers])
