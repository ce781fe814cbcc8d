# -*- test-case-name: tests.test_budget_redis -*-
"""
Token counters in Redis (C{policy: redis}), and L{counter_store}, which
gives each distinct Redis or Redis Cluster one store per process.

A L{RedisConnection} keeps one pipelined connection to one server (spoken
with C{txredisapi}'s protocol) and makes it again when lost. While it is
L{ConnectionState.DOWN} a request fails at once; any request fails after
C{redis_timeout} ms without an answer, and the connection is then remade.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from txredisapi import ResponseError
from zope.interface import implementer

from aiproxy.budget.store import StoreUnavailable
from aiproxy.budget.wire import Command, RedisWire
from aiproxy.interfaces import ICounterStore
from aiproxy.upstream.client import tls_policy

__all__ = [
    "CHARGE_SCRIPT",
    "ConnectionState",
    "RedisConnection",
    "RedisCounters",
    "close_counter_stores",
    "counter_store",
    "tls_creator",
]

_log = Logger()

#: Adds C{ARGV[2i-1]} to C{KEYS[i]} and gives a counter without an expiry
#: (one this call created) C{ARGV[2i]} seconds to live; atomic as a whole.
CHARGE_SCRIPT = """\
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[2 * i - 1])
  if redis.call('TTL', key) == -1 then
    redis.call('EXPIRE', key, ARGV[2 * i])
  end
end
return 0
"""
_CHARGE_SHA = hashlib.sha1(CHARGE_SCRIPT.encode()).hexdigest()
_SCRIPTS = {_CHARGE_SHA: CHARGE_SCRIPT}

#: Seconds before reconnecting: the first delay, doubled up to the last.
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 2.0


def charge_command(charges: Sequence[tuple[str, int, int]]) -> Command:
    """
    The C{EVALSHA} of L{CHARGE_SCRIPT} for C{charges} (C{(key, amount, ttl_s)}).
    """
    args: list[int] = []
    for _, amount, ttl_s in charges:
        args += [int(amount), max(1, int(ttl_s))]
    return ("EVALSHA", _CHARGE_SHA, len(charges), *(key for key, _, _ in charges), *args)


def tls_creator(host: str, port: int, verify: bool) -> IOpenSSLClientConnectionCreator:
    """
    The TLS client of a connection to C{host}: certificate and host name
    checked against the system's trust store (which C{SSL_CERT_FILE} and
    C{SSL_CERT_DIR} can replace) when C{verify}, not at all otherwise; SNI
    sent either way. The policy of the upstreams' C{ssl_verify}.
    """
    policy = tls_policy({"ssl_verify": verify})
    return policy.creatorForNetloc(host.encode("idna"), port)  # type: ignore[no-any-return]


def _reason(failure: Failure) -> str:
    """
    A short, human account of why a connection failed (never a secret).
    """
    value = failure.value
    if isinstance(getattr(value, "osError", None), int):
        return os.strerror(value.osError)
    known = (ConnectTimeoutError, DNSLookupError, ConnectionDone, ConnectionLost)
    texts = ("connect timed out", "host not found", "connection closed", "connection lost")
    said = [text for kind, text in zip(known, texts, strict=True) if isinstance(value, kind)]
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        said.append("TLS failed: " + ", ".join(str(error[-1]) for error in value.args[0]))
    return said[0] if said else failure.getErrorMessage() or type(value).__name__


class ConnectionState(Enum):
    """
    Where a L{RedisConnection} is. Requests wait while it is C{CONNECTING}
    (within their timeout) and fail at once while it is C{DOWN}.
    """

    CONNECTING = "connecting"
    READY = "ready"
    DOWN = "down"
    CLOSED = "closed"


@dataclass(eq=False)
class _Request:
    commands: Sequence[Command]
    timer: Any = None
    protocol: RedisWire | None = None
    result: Deferred[list[Any]] = field(default_factory=Deferred)


def _retry_delay(attempt: int) -> float:
    delay = min(RECONNECT_FIRST * 2 ** min(attempt - 1, 16), RECONNECT_MAX)
    return delay * (1 + 0.2 * random.random())


class RedisConnection(Factory):
    """
    One connection to one Redis server, kept open and made again when lost.

    @ivar label: C{redis host:port} (with C{/db} for a database other than
        0): what messages call it; never a secret.
    @ivar state: its L{ConnectionState}.
    """

    noisy = False

    def __init__(
        self, reactor: Any, host: str, port: int, conf: Mapping[str, Any], tls: str = "redis_ssl"
    ) -> None:
        """
        @param conf: an C{ai-rate-limiting} config (C{redis_username},
            C{redis_password}, C{redis_database}, C{redis_timeout}).
        @param tls: the field of C{conf} asking for TLS (verified: C{+ "_verify"}).
        """
        username, password = conf.get("redis_username"), conf.get("redis_password")
        database, timeout_ms = conf.get("redis_database", 0), conf.get("redis_timeout", 1000)
        self._reactor = reactor
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.label = f"redis {where}" + (f"/{database}" if database else "")
        credentials = (username, password) if username else (password,)
        auth: list[Command] = [("AUTH", *credentials)] if password else []
        self._greeting = [*auth, *([("SELECT", database)] if database else []), ("PING",)]
        self._timeout_ms = timeout_ms
        self._timeout = timeout_ms / 1000
        self.state, self._cause = ConnectionState.CONNECTING, ""
        self._protocol: RedisWire | None = None
        self._waiting: list[_Request] = []
        self._live: set[RedisWire] = set()
        self._attempts = 0
        self._attempt: Deferred[None] | None = None
        self._retry: Any = None
        endpoint: Any = HostnameEndpoint(reactor, host, port, self._timeout, attemptDelay=0.05)
        if conf.get(tls):
            verify = bool(conf.get(f"{tls}_verify"))
            endpoint = wrapClientTLS(tls_creator(host, port, verify), endpoint)
        self._endpoint = endpoint
        self._connect()

    def buildProtocol(self, addr: Any) -> RedisWire:  # noqa: N802
        return RedisWire(self)

    def pipeline(self, commands: Sequence[Command]) -> Deferred[list[Any]]:
        """
        Send C{commands} together (one round trip) and collect their replies.

        @return: a Deferred firing with one reply per command, in order; an
            error reply is given as its L{txredisapi.ResponseError}, not
            raised. It fails with L{StoreUnavailable} when Redis cannot be
            reached, the connection is lost, or no answer comes in time.
        """
        if self.state is ConnectionState.CLOSED:
            return defer.fail(StoreUnavailable(f"{self.label} is closed"))
        if self.state is ConnectionState.DOWN:
            return defer.fail(StoreUnavailable(self._cause))
        request = _Request(commands)
        request.timer = self._reactor.callLater(self._timeout, self._expire, request)
        if self._protocol is not None:
            self._send(request, self._protocol)
        else:
            self._waiting.append(request)
        return request.result

    def close(self) -> Deferred[None]:
        """
        Fail what waits, stop reconnecting, close: fires once all is closed.
        """
        self.state = ConnectionState.CLOSED
        self._fail_waiting(f"{self.label} is closed")
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        for protocol in list(self._live):
            protocol.transport.abortConnection()
        return defer.gatherResults([p.gone for p in self._live]).addCallback(lambda _: None)

    def _send(self, request: _Request, protocol: RedisWire) -> None:
        request.protocol = protocol
        commands = request.commands
        protocol.send(commands, lambda replies: self._replied(replies, request, protocol))

    def _replied(self, replies: Any, request: _Request, protocol: RedisWire) -> None:
        """
        A request's replies (or the failure that lost them) came: done,
        unless a script was not cached (then it is sent in full).
        """
        commands = request.commands
        missing = []
        if isinstance(replies, list):
            missing = [
                i
                for i, command in enumerate(commands)
                if command[0] == "EVALSHA" and str(replies[i]).startswith("NOSCRIPT")
            ]
        if not missing or request.result.called:
            self._finish(replies, request)
            return
        again: list[Command] = []
        for i in missing:  # the script in full, after the ASKING before it if any
            again += [("ASKING",)] if i and commands[i - 1] == ("ASKING",) else []
            again.append(("EVAL", _SCRIPTS[commands[i][1]], *commands[i][2:]))

        def retried(answers: Any) -> None:
            if isinstance(answers, list):
                pairs = zip(again, answers, strict=True)
                evals = [reply for command, reply in pairs if command[0] == "EVAL"]
                for i, reply in zip(missing, evals, strict=True):
                    replies[i] = reply
                answers = replies
            self._finish(answers, request)

        protocol.send(again, retried)

    def _finish(self, outcome: Any, request: _Request) -> None:
        if request.timer.active():
            request.timer.cancel()
        if request.result.called:
            return
        if isinstance(outcome, Failure) and not outcome.check(StoreUnavailable):
            _log.failure("{store} request failed", outcome, store=self.label)
            outcome = Failure(StoreUnavailable(f"{self.label} failed: {_reason(outcome)}"))
        request.result.callback(outcome)

    def _expire(self, request: _Request) -> None:
        if request in self._waiting:
            self._waiting.remove(request)
        if request.protocol is not None and request.protocol is self._protocol:
            _log.warn("{store} did not answer in time; reconnecting", store=self.label)
            request.protocol.transport.abortConnection()
        if not request.result.called:
            cause = f"{self.label} did not answer within {self._timeout_ms} ms"
            request.result.errback(StoreUnavailable(cause))

    def _fail_waiting(self, cause: str) -> None:
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            self._finish(Failure(StoreUnavailable(cause)), request)

    def _connect(self) -> None:
        self._retry = None
        self._attempt = Deferred.fromCoroutine(self._open())

    async def _open(self) -> None:
        try:
            protocol = await self._endpoint.connect(self)
        except Exception:
            return self._failed(f"{self.label} unreachable: {_reason(Failure())}")
        handshake = Deferred.fromCoroutine(self._handshake(protocol))
        try:
            await handshake.addTimeout(self._timeout, self._reactor)
        except Exception:
            failure = Failure()
            protocol.transport.abortConnection()
            if failure.check(ResponseError):
                cause = f"{self.label} refused the connection: {failure.getErrorMessage()}"
            elif failure.check(defer.TimeoutError):
                cause = f"{self.label} did not answer within {self._timeout_ms} ms"
            else:
                cause = f"{self.label} unreachable: {_reason(protocol.lost_reason or failure)}"
            return self._failed(cause)
        if self.state is ConnectionState.CLOSED or not protocol.connected:
            protocol.transport.abortConnection()
            return self._failed(f"{self.label} connection lost")
        self._attempt = None
        _log.info("Counter store connected: {store}", store=self.label)
        self.state = ConnectionState.READY
        self._attempts = 0
        self._protocol = protocol
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            self._send(request, protocol)

    async def _handshake(self, protocol: RedisWire) -> None:
        answered: Deferred[list[Any]] = Deferred()
        protocol.send(self._greeting, answered.callback)
        for reply in await answered:
            if isinstance(reply, ResponseError):
                raise reply

    def _failed(self, cause: str) -> None:
        self._attempt = None
        if self.state is ConnectionState.CLOSED:
            return
        if self.state is not ConnectionState.DOWN or cause != self._cause:
            _log.warn("Counter store unavailable: {cause}", cause=cause)
        self.state = ConnectionState.DOWN
        self._cause = cause
        self._reconnect_later()
        self._fail_waiting(cause)

    def _reconnect_later(self) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        self._attempts += 1
        self._retry = self._reactor.callLater(_retry_delay(self._attempts), self._connect)

    def _lost(self, protocol: RedisWire) -> None:
        self._live.discard(protocol)
        if protocol is not self._protocol:
            return
        self._protocol = None
        if self.state is ConnectionState.READY:
            reason = _reason(protocol.lost_reason) if protocol.lost_reason else "connection lost"
            _log.warn("{store}: {reason}; reconnecting", store=self.label, reason=reason)
            self.state = ConnectionState.CONNECTING
            self._reconnect_later()


@implementer(ICounterStore)
class RedisCounters:
    """
    Counters in one Redis server: C{spent} is one C{MGET}, C{charge} one
    C{EVALSHA} of L{CHARGE_SCRIPT}: one round trip each.
    """

    def __init__(self, conf: Mapping[str, Any], reactor: Any) -> None:
        """
        @param conf: an C{ai-rate-limiting} config (its C{redis_*} fields).
        """
        port = conf.get("redis_port", 6379)
        self.connection = RedisConnection(reactor, conf["redis_host"], port, conf)
        self.description = self.connection.label
        self.closed = False

    def spent(self, keys: Sequence[str]) -> Deferred[list[int]]:
        if not keys:
            return defer.succeed([])
        sent = self.connection.pipeline([("MGET", *keys)])
        return sent.addCallback(lambda replies: [int(v or 0) for v in self._check(replies)])

    def charge(self, charges: Sequence[tuple[str, int, int]]) -> Deferred[None]:
        if not charges:
            return defer.succeed(None)
        sent = self.connection.pipeline([charge_command(charges)])
        return sent.addCallback(lambda replies: self._check(replies) and None)

    def close(self) -> Deferred[None]:
        self.closed = True
        return self.connection.close()

    def _check(self, replies: list[Any]) -> Any:
        if isinstance(replies[0], ResponseError):
            raise StoreUnavailable(f"{self.description} answered: {replies[0]}")
        return replies[0]


_stores: dict[tuple[Any, ...], Any] = {}


def _registry_key(conf: Mapping[str, Any]) -> tuple[Any, ...]:
    policy = conf.get("policy", "local")
    if policy not in ("redis", "redis-cluster"):
        raise ValueError(f"no shared counter store for policy {policy!r}")
    secret = hashlib.sha256(repr(conf.get("redis_password")).encode()).hexdigest()
    fields = [(k, v) for k, v in conf.items() if k.startswith("redis_") and k != "redis_password"]
    return (policy, secret, *sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fields))


def counter_store(conf: Mapping[str, Any], reactor: Any) -> ICounterStore:
    """
    The counter store of an C{ai-rate-limiting} config whose C{policy} is
    C{redis} (a L{RedisCounters}) or C{redis-cluster} (a
    L{aiproxy.budget.cluster.ClusterCounters}): the same object for every
    config naming the same Redis with the same credentials, database,
    timeout and TLS settings, so that a process keeps one connection per
    Redis. It starts connecting at once.

    @raise ValueError: for another policy.
    """
    key = _registry_key(conf)
    store = _stores.get(key)
    if store is None or store.closed:
        if key[0] == "redis":
            store = RedisCounters(conf, reactor)
        else:
            from aiproxy.budget.cluster import ClusterCounters

            store = ClusterCounters(conf, reactor)
        _stores[key] = store
    return store  # type: ignore[no-any-return]


def close_counter_stores() -> Deferred[None]:
    """
    Close every store L{counter_store} made (at shutdown).

    @return: a Deferred firing once all their connections are closed.
    """
    stores = list(_stores.values())
    _stores.clear()
    return defer.gatherResults([store.close() for store in stores]).addCallback(lambda _: None)
